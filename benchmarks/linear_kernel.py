"""Chapter 6's CPU fp32 linear kernel for decode-sized rows, measured the llm.c way: checked, then timed against torch.

    python -m benchmarks.linear_kernel            # the tables of benchmarks/results/cpu-linear-kernel.md
    python -m benchmarks.linear_kernel --quick    # fewer rounds and rows

The kernel (nanovllm/kernels/linear_cpu.c, through nanovllm.kernels.cpu.fp32_linear) multiplies x by the engine's
W^T (in, out) as `x @ W_t` does. Before it is timed, its output on every shape is checked against torch in float64.
The shapes are the linear layers of a decode step of llama-20m and llama-134m. Weights are read cold and each time is
the best of interleaved rounds, as in benchmarks/quant_kernels.py (whose timing code this reuses); GB/s counts the
weight bytes a call reads, next to the read bandwidth of a plain sum (torch's) over 256 MiB at the same threads.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from benchmarks.measure import read_bandwidth
from benchmarks.quant_kernels import measure, table
from nanovllm.kernels import cpu as kernels

# (name, in, out) of llama-20m (hidden 384, FFN 1024, vocab 32000, fused q/k/v and gate/up) and llama-134m
SHAPES = [
    ("20m qkv", 384, 1152), ("20m o", 384, 384), ("20m gate_up", 384, 2048), ("20m down", 1024, 384),
    ("20m lm_head", 384, 32000), ("134m qkv", 768, 2304), ("134m gate_up", 768, 4096), ("134m down", 2048, 768),
]  # fmt: skip
FORMATS = ("fp32", "fp32-c")


def check(in_f: int, out_f: int, rows: int) -> float:
    """The kernel's largest error against torch in float64, relative to sum |x| |w| of that output (~1e-7)."""
    gen = torch.Generator().manual_seed(in_f * out_f + rows)
    x, w_t = torch.randn(rows, in_f, generator=gen), torch.randn(in_f, out_f, generator=gen)
    expected = x.double() @ w_t.double()
    error = ((kernels.fp32_linear(x, w_t).double() - expected).abs() / (x.double().abs() @ w_t.double().abs())).max()
    if error > 1e-6:
        raise SystemExit(f"fp32_linear {in_f}x{out_f} at {rows} rows does not match torch: relative error {error:.2e}")
    return error.item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, rows 1, 8 and 64")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", default="1", help="comma-separated torch thread counts")
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128", help="rows of x (tokens) for the batch table")
    args = parser.parse_args(argv)
    why = kernels.linear_kernel_unavailable()
    if why is not None:
        raise SystemExit(f"the C linear kernel is not available: {why}")
    rounds = 3 if args.quick else args.rounds
    threads = [int(t) for t in args.threads.split(",")]
    rows = [1, 8, 64] if args.quick else [int(m) for m in args.rows.split(",")]
    lanes = kernels._load("linear_cpu")[0].dense_linear_lanes()
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, vectors of {lanes} floats")
    error = max(check(i, o, m) for _, i, o in SHAPES for m in (1, 3, 17, kernels.LINEAR_KERNEL_MAX_ROWS))
    print(f"checked against torch (float64) on every shape at 1, 3, 17 and {kernels.LINEAR_KERNEL_MAX_ROWS} rows: "
          f"largest relative error {error:.1e}")  # fmt: skip

    before = torch.get_num_threads()
    for t in threads:
        torch.set_num_threads(t)
        print(f"\n{t} thread(s): read bandwidth (a sum over 256 MiB) {read_bandwidth('cpu') / 1e9:.1f} GB/s")
    torch.set_num_threads(before)
    print("\n## 1 row of x (decode-1)\n")
    results = [r for s in SHAPES for r in measure(s, FORMATS, [1], threads, rounds)]
    print(table(results, FORMATS, ("label", "shape", "threads"), ("us", "GB/s", "x fp32")))

    print("\n## rows of x (batched decode): where the kernel stops beating torch\n")
    results = [r for s in SHAPES for r in measure(s, FORMATS, rows, threads, rounds)]
    print(table(results, FORMATS, ("threads", "label", "shape", "rows"), ("us", "x fp32")))
    for t in threads:
        slower = sorted({r["rows"] for r in results if r["threads"] == t and r["format"] != "fp32" and r["x fp32"] < 1})
        print(f"\n{t} thread(s): rows where the kernel was slower than torch on some shape: {slower or 'none'} "
              f"(LINEAR_KERNEL_MAX_ROWS = {kernels.LINEAR_KERNEL_MAX_ROWS})")  # fmt: skip


if __name__ == "__main__":
    main()
