"""`python -m benchmarks.allreduce`: what one all-reduce costs tensor-parallel ranks on this CPU, gloo against the
shared-memory slots of nanovllm/engine/process_group.py.

N one-thread processes each run a small MLP (a decode step's share of one layer's work, hidden 768 by default)
and all-reduce its (1, hidden) output, as a decode step does after attention and after the MLP; printed: the time
per iteration and per all-reduce (waiting for the slower rank included), for each path, and the sums checked equal.

    python -m benchmarks.allreduce                     # 2 ranks, 1000 iterations
    python -m benchmarks.allreduce --ranks 4 --hidden 2048
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from nanovllm.engine.process_group import ProcessGroup
from nanovllm.engine.tensor_parallel import free_port


def rank_main(rank: int, size: int, init: str, path: str, hidden: int, iterations: int) -> None:
    torch.set_num_threads(1)
    group = ProcessGroup(rank, size, init, "cpu")
    if path == "gloo":
        group.shared = None
    elif group.shared is None:
        sys.exit("shared-memory slots are not available here (x86, one machine only)")
    g = torch.Generator().manual_seed(rank)
    width = 4 * hidden // size  # this rank's share of the MLP
    up, down = torch.randn(hidden, width, generator=g), torch.randn(width, hidden, generator=g)
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(0))
    for _ in range(50):  # warm-up
        group.all_reduce(((x @ up).relu() @ down).contiguous())
    group.seconds, start = 0.0, time.perf_counter()
    for _ in range(iterations):
        out = group.all_reduce(((x @ up).relu() @ down).contiguous())  # (1, hidden)
    total = time.perf_counter() - start
    if rank == 0:
        per, comm = total / iterations * 1e6, group.seconds / iterations * 1e6
        print(f"{path:>13}: {per:7.0f} us per iteration, {comm:7.0f} us of it in the all-reduce   sum[:2] {out[0, :2]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--iterations", type=int, default=1000)
    args = parser.parse_args()
    print(
        f"{args.ranks} ranks, one thread each, all-reduce of (1, {args.hidden}) float32 after a (1, {args.hidden}) "
        f"x ({args.hidden}, {4 * args.hidden // args.ranks}) MLP share:"
    )
    for path in ("gloo", "shared memory"):
        init = f"tcp://127.0.0.1:{free_port()}"
        code = "import ast, sys; from benchmarks.allreduce import rank_main; "
        code += "rank_main(*map(ast.literal_eval, sys.argv[1:]))"
        ranks = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    code,
                    str(r),
                    str(args.ranks),
                    repr(init),
                    repr(path),
                    str(args.hidden),
                    str(args.iterations),
                ]
            )
            for r in range(args.ranks)
        ]
        if any(p.wait() for p in ranks):
            sys.exit(f"a rank of the {path} run failed")


if __name__ == "__main__":
    main()
