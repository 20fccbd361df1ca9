"""Chapter 7's CPU INT8 / INT4 linear kernels, measured the llm.c way: each version checked, then timed against fp32.

    python -m benchmarks.quant_kernels                 # the tables of benchmarks/results/cpu-quant-kernels.md
    python -m benchmarks.quant_kernels --quick         # the native version only, fewer rounds and rows

A version is one code path of nanovllm/kernels/quant_linear_cpu.c (avx512vnni, avx512bw, avx2, scalar), built with
its own flags through NANOVLLM_KERNEL_FLAGS; only the paths this CPU can run are measured. Before a version is
timed, its output on every shape is checked against nanovllm.layers.quant_reference. The baseline is what the fp32
engine runs: x @ W_t with W_t (in, out) contiguous.

Weights are read cold, as a decode step reads a model larger than the last-level cache: each call reads the next
of enough copies of the matrix to fill 96 MB. GB/s counts the weight bytes a call reads (scales included). Each
time is the best of several rounds, a round running every kernel of a table row in turn: the machines are shared,
and the best round is the one least disturbed by others.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from nanovllm.kernels import cpu as kernels
from nanovllm.layers import quant_reference as ref

# (name, in, out): the linear layers of a decode step of llama-134m (hidden 768, FFN 2048, vocab 32000)
SHAPES = [("qkv", 768, 2304), ("gate_up", 768, 4096), ("down", 2048, 768), ("lm_head", 768, 32000)]
LM_HEAD_MAX_ROWS = 256  # the output layer only sees each sequence's last token: it never gets a prefill's rows
COLD_BYTES = 96 << 20  # three times the 32 MB L3 of the development machine
FORMATS = ("fp32", "int8", "int4-g32", "int4-g128")


def use_version(version: str | None) -> str:
    """Make nanovllm.kernels.cpu's wrappers use this version (None: the default -march=native build); its name."""
    if version is None:
        os.environ.pop("NANOVLLM_KERNEL_FLAGS", None)
    else:
        os.environ["NANOVLLM_KERNEL_FLAGS"] = kernels.quant_kernel_paths()[version]
    kernels._load.cache_clear()
    why = kernels.quantized_kernels_unavailable()
    if why is not None:
        raise SystemExit(f"the quantized kernels are not available: {why}")
    return kernels.quant_kernel_isa()


def random_weights(fmt: str, in_f: int, out_f: int, gen: torch.Generator) -> tuple:
    """One matrix in `fmt`: the arguments after x of its kernel (for fp32, W_t (in, out) as the engine stores it)."""
    if fmt in ("fp32", "fp32-c"):  # fp32-c: the same matrix through chapter 6's C kernel (benchmarks/linear_kernel.py)
        return (torch.randn(in_f, out_f, generator=gen),)
    if fmt == "int8":
        return torch.randint(-128, 128, (out_f, in_f), dtype=torch.int8, generator=gen), torch.rand(out_f) / 100
    group = int(fmt.split("-g")[1])
    packed = torch.randint(0, 256, (out_f, in_f // 2), dtype=torch.uint8, generator=gen)
    return packed, torch.rand(out_f, in_f // group, generator=gen) / 100, group


def weight_bytes(args: tuple) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def kernel(fmt: str):
    if fmt == "fp32":
        return lambda x, w_t: x @ w_t
    if fmt == "fp32-c":
        return kernels.fp32_linear
    return kernels.int8_linear if fmt == "int8" else kernels.int4_linear


def check(fmt: str, in_f: int, out_f: int, rows: int) -> float:
    """The kernel's largest error against its reference, relative to sum |x| |w| of that output (~1e-7 expected)."""
    gen = torch.Generator().manual_seed(in_f * out_f + rows)
    args = random_weights(fmt, in_f, out_f, gen)
    x = torch.randn(rows, in_f, generator=gen)
    if fmt == "int8":
        expected, w = ref.int8_linear_reference(x, *args), ref.dequantize_int8(*args)
    else:
        expected, w = ref.int4_linear_reference(x, *args), ref.dequantize_int4(*args)
    error = ((kernel(fmt)(x, *args) - expected).abs() / (x.abs() @ w.abs().T)).max().item()
    if error > 1e-5:
        raise SystemExit(f"{fmt} {in_f}x{out_f} does not match its reference: relative error {error:.2e}")
    return error


def check_all(rows: int) -> float:
    return max(check(fmt, in_f, out_f, rows) for _, in_f, out_f in SHAPES for fmt in FORMATS[1:])


def best_times(calls: dict, rounds: int, min_seconds: float = 0.02) -> dict[str, float]:
    """Seconds per call of each entry of calls {name: (fn, [args of each copy])}: the best round, rounds interleaved."""
    best = dict.fromkeys(calls, float("inf"))
    for fn, copies in calls.values():  # warm up: page every copy in
        for args in copies:
            fn(*args)
    for _ in range(rounds):
        for name, (fn, copies) in calls.items():
            n, start = 0, time.perf_counter()
            while True:  # whole passes over the copies, so that every call reads cold weights
                for args in copies:
                    fn(*args)
                n += len(copies)
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            best[name] = min(best[name], elapsed / n)
    return best


def measure(shape: tuple, formats, rows_list, threads_list, rounds: int, label: str = "") -> list[dict]:
    """Time every format at every (rows, threads) on one shape, the weights in cold copies."""
    name, in_f, out_f = shape
    gen = torch.Generator().manual_seed(0)
    copies = {}
    for fmt in formats:
        one = random_weights(fmt, in_f, out_f, gen)
        more = -(-COLD_BYTES // weight_bytes(one)) - 1
        copies[fmt] = [one] + [tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in one) for _ in range(more)]
    results = []
    before = torch.get_num_threads()
    try:
        for threads in threads_list:
            torch.set_num_threads(threads)
            for rows in rows_list:
                x = torch.randn(rows, in_f, generator=gen)
                times = best_times({fmt: (kernel(fmt), [(x, *a) for a in copies[fmt]]) for fmt in formats}, rounds)
                for fmt in formats:
                    results.append(
                        {"label": label or name, "shape": f"{in_f}x{out_f}", "rows": rows, "threads": threads,
                         "format": fmt, "us": times[fmt] * 1e6, "GB/s": weight_bytes(copies[fmt][0]) / times[fmt] / 1e9,
                         "x fp32": times["fp32"] / times[fmt]}
                    )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return results


def table(results: list[dict], formats, keys: tuple[str, ...], columns: tuple[str, ...]) -> str:
    """A markdown table: one line per distinct value of `keys`, and `columns` of each format side by side."""
    head = [*keys] + [f"{fmt} {c}" for fmt in formats for c in columns if not (fmt == "fp32" and c == "x fp32")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in dict.fromkeys(tuple(r[k] for k in keys) for r in results):
        mine = {r["format"]: r for r in results if tuple(r[k] for k in keys) == key}
        cells = [str(k) for k in key]
        for fmt in formats:
            cells += [format_cell(c, mine[fmt][c]) for c in columns if not (fmt == "fp32" and c == "x fp32")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_cell(column: str, value: float) -> str:
    return f"{value:.0f}" if column == "us" else f"{value:.1f}" if column == "GB/s" else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the native version only, 3 rounds, fewer rows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,256,1024", help="rows of x (tokens) for the batch table")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    threads = [int(t) for t in args.threads.split(",")]
    rows = [1, 16, 64] if args.quick else [int(m) for m in args.rows.split(",")]
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {kernels.quant_kernel_isa()} build")

    if not args.quick:
        print("\n## Every version, 1 row of x, 1 thread\n")
        results = []
        for version in kernels.quant_kernel_paths():
            use_version(version)
            print(f"{version}: checked against the reference on every shape at 3 rows, error {check_all(3):.1e}")
            results += [r for s in SHAPES for r in measure(s, FORMATS, [1], [1], rounds, label=f"{version} {s[0]}")]
        print()
        print(table(results, FORMATS, ("label", "shape"), ("GB/s", "x fp32")))

    native = use_version(None)
    print(f"\n{native} (native): checked against the reference on every shape at 17 rows, error {check_all(17):.1e}")
    print(f"\n## {native}, 1 row of x (decode-1), 1 and 2 threads\n")
    results = [r for s in SHAPES for r in measure(s, FORMATS, [1], threads, rounds)]
    print(table(results, FORMATS, ("label", "shape", "threads"), ("us", "GB/s", "x fp32")))

    print(f"\n## {native}, rows of x (batched decode, prefill chunks)\n")
    formats = ("fp32", "int8", "int4-g32")
    results = []
    for s in SHAPES:
        mine = [m for m in rows if s[0] != "lm_head" or m <= LM_HEAD_MAX_ROWS]
        results += measure(s, formats, mine, threads, rounds)
    results.sort(key=lambda r: (r["threads"], [s[0] for s in SHAPES].index(r["label"]), r["rows"]))
    print(table(results, formats, ("threads", "label", "shape", "rows"), ("us", "x fp32")))
    for t in threads:
        slower = sorted({r["rows"] for r in results if r["threads"] == t and r["format"] != "fp32" and r["x fp32"] < 1})
        print(f"\n{t} thread(s): rows where a quantized kernel was slower than fp32 on some shape: {slower or 'none'}")

    if not args.quick:
        print("\n## Where each version stops beating fp32 (1 thread; rows doubled until either format loses)\n")
        found = {}
        for version in kernels.quant_kernel_paths():
            use_version(version)
            found[version] = crossover(rounds)
        print("| version | largest rows where int8 and int4-g32 beat fp32 on qkv and down | QUANT_KERNEL_MAX_ROWS |")
        print("|---|---|---|")
        for version, (wins, detail) in found.items():
            print(f"| {version} | {wins} ({detail}) | {kernels.QUANT_KERNEL_MAX_ROWS.get(version)} |")
        use_version(None)


def crossover(rounds: int, limit: int = 1024) -> tuple[int, str]:
    """The largest power-of-2 rows up to which both formats beat fp32 on qkv and down; and the ratios around it."""
    wins, rows, last = 0, 1, ""
    while rows <= limit:
        results = [r for s in SHAPES if s[0] in ("qkv", "down") for r in measure(s, ("fp32", "int8", "int4-g32"),
                   [rows], [1], rounds)]  # fmt: skip
        worst = min(r["x fp32"] for r in results if r["format"] != "fp32")
        last = f"worst x fp32 at {rows} rows: {worst:.2f}"
        if worst < 1:
            return wins, last
        wins, rows = rows, rows * 2
    return wins, last + f" (not measured past {limit})"


if __name__ == "__main__":
    main()
