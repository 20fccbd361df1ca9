"""`python -m benchmarks.gpu_quant`: chapter 7's Triton INT8 / INT4 matmuls on a CUDA GPU, checked, then timed.

First, the llm.c way, each kernel is checked against x times the dequantized weight (nanovllm.layers.quant_reference)
computed in float64, in bf16, fp16 and fp32, one row to 300, with K cut into splits and without. Only a scheme
that passes is timed. Then every linear layer of a Qwen3-0.6B decode step (28 x qkv, o, gate_up, down, and the
lm_head; fused projections, as the engine runs them) at M = 1, 8 and 64 rows, in bf16 activations:

- bf16: F.linear on the bf16 weight, the baseline;
- int8, int4-g32, int4-g128: the Triton kernels on the quantized weight, as QuantLinear runs them on a GPU;
- int8 torch: torch._weight_int8pack_mm, where this torch build has it for CUDA (a line to compare with);
- int8 dequantized: what QuantLinear did on a GPU before the kernel, dequantize to float32 and multiply.

A time is the median of triton.testing.do_bench (the L2 cache cleared before each call); a row's time is the sum
over a decode step's layers. Rows report ratios to bf16 in this run and the weight bytes each format reads; there
is no target (the issue sets them on the CPU). Without CUDA it exits at once with one line;
`--cpu-smoke` runs every section instead on tiny shapes in Triton's interpreter, one call per "timing" (no
measurement: it is how tests/test_triton_quant.py keeps this script from rotting).

    python -m benchmarks.gpu_quant [--out DIR]     # DIR gets table.md and results.json
    python -m benchmarks.gpu_quant --cpu-smoke
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_kernels import Row, format_table, guarded
from nanovllm.layers import quant_reference as ref
from nanovllm.layers.quantization import quantize_int4, quantize_int8

# (name, in, out, times per decode step): Qwen3-0.6B, hidden 1024, 16 query / 8 KV heads of 128, FFN 3072, 28 layers
QWEN3_0_6B = [
    ("qkv", 1024, 4096, 28),
    ("o", 2048, 1024, 28),
    ("gate_up", 1024, 6144, 28),
    ("down", 3072, 1024, 28),
    ("lm_head", 1024, 151936, 1),
]
ROWS = (1, 8, 64)
SCHEMES = ("int8", "int4-g32", "int4-g128")
# what is checked in which activation dtype (each (scheme, dtype) is a kernel compiled: a few seconds each)
CHECKS = {torch.bfloat16: SCHEMES, torch.float16: ("int8", "int4-g32"), torch.float32: ("int8", "int4-g64")}
CHECK_SHAPES = ((1024, 1000), (3072, 1024))  # (in, out): a column tile left partial; a long K for split-K
CHECK_ROWS = (1, 8, 64, 300)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # atol = rtol on outputs of size ~1
INT8PACK = "int8 torch"  # torch._weight_int8pack_mm
DEQUANTIZED = "int8 dequantized"
NO_CUDA = "no CUDA device: this script times the Triton quantized matmuls on a GPU (on a CPU, try --cpu-smoke)"


def quantize(scheme: str, w: torch.Tensor) -> tuple[tuple, torch.Tensor, int]:
    """One (out, in) weight in `scheme`: (the kernel's arguments after x, the dequantized float32 weight, bytes)."""
    if scheme == "int8":
        q, s = quantize_int8(w)
        return (q, s), ref.dequantize_int8(q, s), q.nbytes + s.nbytes
    group = int(scheme.split("-g")[1])
    q, s = quantize_int4(w, group)
    return (q, s, group), ref.dequantize_int4(q, s, group), q.nbytes + s.nbytes


def kernel_of(tk, scheme: str) -> Callable[..., torch.Tensor]:
    return tk.int8_matmul if scheme == "int8" else tk.int4_matmul


def call_with(kernel: Callable[..., torch.Tensor], args: tuple, x: torch.Tensor) -> torch.Tensor:
    return kernel(x, *args)


def int8pack_row(device: str) -> Row:
    """torch._weight_int8pack_mm (bf16 x, int8 W, bf16 scales) against the same reference as our kernels: PASS, FAIL,
    or n/a where this torch build has no such op for this device."""
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(1000, 1024, generator=gen) * 0.02).to(device)
    q, s = quantize_int8(w)
    x = torch.randn(8, 1024, generator=gen).to(torch.bfloat16).to(device)
    try:
        out = torch._weight_int8pack_mm(x, q, s.to(torch.bfloat16))
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        return Row(INT8PACK, f"unavailable: {str(e).splitlines()[0][:120]}", "-", "n/a")
    want = x.double() @ ref.dequantize_int8(q, s).double().T  # its scales are rounded to bf16: within the tolerance
    err = (out.double() - want).abs()
    tol = TOLERANCE[torch.bfloat16]
    ok = bool((err <= tol + tol * want.abs()).all())
    return Row(f"{INT8PACK} vs x @ dequantized W, bfloat16", f"max abs error {float(err.max()):.1e}", f"within {tol:g}",
               "PASS" if ok else "FAIL")  # fmt: skip


def correctness_rows(
    tk, device: str, checks=CHECKS, shapes=CHECK_SHAPES, rows=CHECK_ROWS
) -> tuple[list[Row], dict[torch.dtype, set[str]]]:
    """Each (scheme, dtype) of `checks` on every shape and row count, split as the GPU chooses and in one pass,
    against float64 x @ dequantized(W)^T + b; returns the rows and the schemes that passed, by dtype."""
    gen = torch.Generator().manual_seed(0)
    table, passed = [], {}
    for dtype, schemes in checks.items():
        passed[dtype] = set()
        tol = TOLERANCE[dtype]
        for scheme in schemes:
            ok, worst, cases = True, 0.0, 0
            for k, n in shapes:
                w = (torch.randn(n, k, generator=gen) * 0.02).to(device)  # (out, in)
                # bf16, the timed dtype, without a bias as Qwen3's layers (the same compiled kernels as the timings)
                bias = None if dtype == torch.bfloat16 else torch.randn(n, generator=gen).to(device)
                args, dequantized, _ = quantize(scheme, w)
                for m in rows:
                    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
                    want = x.double() @ dequantized.double().T  # (m, n)
                    want = want if bias is None else want + bias.double()
                    for split_k in (None, 1):
                        out = kernel_of(tk, scheme)(x, *args, bias=bias, split_k=split_k)
                        err = (out.double() - want).abs()
                        ok &= out.dtype == dtype and bool((err <= tol + tol * want.abs()).all())
                        worst = max(worst, float(err.nan_to_num(float("inf")).max()))
                        cases += 1
            if ok:
                passed[dtype].add(scheme)
            measured = f"max abs error {worst:.1e} over {cases} cases"
            check = f"{scheme} kernel vs x @ dequantized W, {str(dtype)[6:]}"
            table.append(Row(check, measured, f"within {tol:g}", "PASS" if ok else "FAIL"))
    return table, passed


def bench_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def formats_for(tk, scheme_ok: set[str], w: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[Callable, int]]:
    """Every format of one layer's weight w (out, in): name -> (function of x, bytes of weights it reads)."""
    wb = w.to(dtype)
    out = {"bf16" if dtype == torch.bfloat16 else str(dtype)[6:]: (lambda x: F.linear(x, wb), wb.nbytes)}
    for scheme in SCHEMES:
        if scheme in scheme_ok:
            args, _, nbytes = quantize(scheme, w)
            out[scheme] = (functools.partial(call_with, kernel_of(tk, scheme), args), nbytes)
    q, s = quantize_int8(w)
    if INT8PACK in scheme_ok:
        s_x = s.to(dtype)
        out[INT8PACK] = (lambda x: torch._weight_int8pack_mm(x, q, s_x), q.nbytes + s_x.nbytes)
    out[DEQUANTIZED] = (lambda x: (x.float() @ ref.dequantize_int8(q, s).T).to(dtype), q.nbytes + s.nbytes)
    return out


def time_step(
    tk, scheme_ok: set[str], device: str, timer=bench_ms, dtype=torch.bfloat16, layers=QWEN3_0_6B, rows=ROWS
) -> tuple[list[Row], dict]:
    """Each format's time (by `timer`) for all the linear layers of one decode step, at each row count.

    scheme_ok: the formats whose check passed (the others are not timed). Returns the rows and the results."""
    gen = torch.Generator().manual_seed(1)
    step_ms: dict[int, dict[str, float]] = {m: {} for m in rows}
    per_layer: dict[str, dict] = {}
    step_bytes: dict[str, int] = {}
    for name, k, n, count in layers:
        w = (torch.randn(n, k, generator=gen) * 0.02).to(device)  # (out, in)
        per_layer[name] = {}
        for fmt, (fn, nbytes) in formats_for(tk, scheme_ok, w, dtype).items():
            step_bytes[fmt] = step_bytes.get(fmt, 0) + count * nbytes
            for m in rows:
                x = torch.randn(m, k, generator=gen).to(dtype).to(device)
                ms = timer(functools.partial(fn, x))
                per_layer[name].setdefault(m, {})[fmt] = ms
                step_ms[m][fmt] = step_ms[m].get(fmt, 0.0) + count * ms
        del w
        if device == "cuda":
            torch.cuda.empty_cache()
    base = next(iter(step_bytes))  # the float format, first
    table = []
    for m in rows:
        for fmt, ms in step_ms[m].items():
            measured = f"{ms:.3f} ms" + ("" if fmt == base else f" = {step_ms[m][base] / ms:.2f}x {base}'s speed")
            weights = f"{step_bytes[fmt] / 2**20:.0f} MiB ({step_bytes[fmt] / step_bytes[base]:.2f}x)"
            table.append(Row(f"decode step's linears, M={m}, {fmt}: weights {weights}", measured, "none", "info"))
    return table, {"step_ms": step_ms, "per_layer_ms": per_layer, "weight_bytes": step_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for table.md and results.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="every section on tiny shapes, in the interpreter")
    args = parser.parse_args(argv)
    device, timer = "cuda", bench_ms
    checks, shapes, rows, layers, step_rows = CHECKS, CHECK_SHAPES, CHECK_ROWS, QWEN3_0_6B, ROWS
    if args.cpu_smoke:
        if torch.cuda.is_available():
            raise SystemExit("--cpu-smoke is for a machine without CUDA: on this one, run the script itself")
        device, timer = "cpu", _one_call_ms
        checks = {torch.bfloat16: SCHEMES, torch.float32: ("int8",)}
        shapes, rows, step_rows = ((128, 80),), (1, 17), (1, 8)
        layers = [("qkv", 128, 96, 2), ("lm_head", 128, 160, 1)]
    elif not torch.cuda.is_available():
        raise SystemExit(NO_CUDA)
    from nanovllm.kernels import triton as tk

    if (why := tk.triton_unavailable()) is not None:
        raise SystemExit(f"the Triton kernels cannot run here: {why}")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton's interpreter (times are not timings)"
    print(f"device: {name} | torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    check = guarded("Triton quantized matmuls vs reference", lambda: correctness_rows(tk, device, checks, shapes, rows))
    table, passed = check[0], check[1] or {}
    scheme_ok = set(passed.get(torch.bfloat16, ()))  # only what passed is timed
    table.append(int8pack_row(device))
    if table[-1].result == "PASS":
        scheme_ok.add(INT8PACK)
    print(f"checked in {time.perf_counter() - started:.0f} s", flush=True)
    step_table, results = guarded(
        "decode-step timings", lambda: time_step(tk, scheme_ok, device, timer, layers=layers, rows=step_rows)
    )
    table += step_table
    text = format_table(table)
    print(text)
    failed = [r.check for r in table if r.result in ("FAIL", "ERROR")]
    print(f"{len(failed)} rows failed: {'; '.join(failed)}" if failed else "every check passed")
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(f"{name}, bf16 activations\n\n{text}\n")
        results.update(device=name, torch=torch.__version__, rows=[asdict(r) for r in table])
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0  # a report: gpu.sh goes on


def _one_call_ms(fn: Callable[[], object]) -> float:
    """--cpu-smoke's stand-in for do_bench: runs fn once (the interpreter's times measure nothing)."""
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


if __name__ == "__main__":
    sys.exit(main())
