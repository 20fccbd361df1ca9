"""`python -m benchmarks.gpu_kernels`: chapter 5's Triton kernels on a CUDA GPU, checked and timed, in one table.

First each kernel (store KV, paged decode in one pass and with split-K, variable-length prefill over the pool) is
checked against attention computed by PyTorch in float64 on each sequence's K/V laid out contiguously, in float16 and
bfloat16; every pool slot a kernel must not read holds NaN. Then the ROADMAP's three targets, each a ratio of two
timings taken in this run:

- decode: the Triton decode kernel against the PyTorch paged path (nanovllm.layers.attention.paged_attention: gather
  the blocks into a padded copy, then scaled_dot_product_attention), batch 64, context 1024: >= 3x;
- bandwidth: K and V bytes the decode kernel reads per second at batch 64, context 4096, as a fraction of the GPU's
  peak HBM bandwidth (PEAK_HBM_TBPS below, or NANOVLLM_HBM_PEAK_TBPS=3.35 for a GPU it does not list): >= 60%;
- split-K: the decode kernel with the heuristic's splits against one pass (num_splits=1), batch 1, context 8192: >= 2x.

One more row has no target: scaled_dot_product_attention on contiguous K/V (no paging at all), the ceiling.
Shapes are Llama-3-8B's attention (32 query heads, 8 KV heads, head size 128), blocks of 16 tokens in shuffled order.
A time is the median of triton.testing.do_bench, which clears the L2 cache before each call; it includes what the
host adds where the GPU waits for it (no CUDA graphs: that is chapter 6). A missed target prints FAIL and the script
still exits 0: it reports, and benchmarks/gpu.sh goes on. Without CUDA it exits at once with one line.

    python -m benchmarks.gpu_kernels [--dtype bfloat16] [--out DIR]   # DIR gets table.md and results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2}  # atol = rtol, on outputs of size ~1
DECODE_MIN_SPEEDUP, MIN_PEAK_FRACTION, SPLIT_K_MIN_SPEEDUP = 3.0, 0.6, 2.0  # the ROADMAP's targets
PEAK_ENV = "NANOVLLM_HBM_PEAK_TBPS"
DEVICE = "cuda"  # tests/test_gpu_kernels.py runs the sections on the CPU, in Triton's interpreter, with small shapes
NO_CUDA = "no CUDA device: this script times the Triton kernels on a GPU (on a CPU, pytest -m ch05 checks them)"

# Peak HBM bandwidth in TB/s (10**12 bytes/s) from the vendors' data sheets, by a piece of torch's device name; the
# first match wins, so a more specific name comes before a shorter one it contains. None: the name does not tell.
PEAK_HBM_TBPS: list[tuple[str, float | None]] = [
    ("GH200", None),  # 4.0 TB/s with 96 GB of HBM3, 4.9 with 144 GB of HBM3e
    ("H200", 4.8),
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),  # "NVIDIA H100 80GB HBM3": the SXM part
    ("A100 80GB PCIe", 1.935),
    ("A100-SXM4-80GB", 2.039),
    ("A100", 1.555),  # the 40 GB parts, SXM and PCIe
    ("L40", 0.864),  # L40 and L40S
    ("A10G", 0.6),
    ("L4", 0.3),
    ("RTX 4090", 1.008),
    ("V100", 0.9),
    ("T4", 0.32),
]


@dataclass
class Row:
    check: str
    measured: str
    target: str
    result: str  # PASS, FAIL, n/a (no peak known), info (no target) or ERROR


def verdict(value: float | None, minimum: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "PASS" if value >= minimum else "FAIL"


def peak_hbm(device_name: str, env: Mapping[str, str] = os.environ) -> tuple[float | None, str]:
    """(peak bytes/s, where it comes from): the environment's override first, then PEAK_HBM_TBPS; None if unknown."""
    if env.get(PEAK_ENV):
        return float(env[PEAK_ENV]) * 1e12, f"{PEAK_ENV}={env[PEAK_ENV]}"
    for piece, tbps in PEAK_HBM_TBPS:
        if piece in device_name and tbps is not None:
            return tbps * 1e12, f"{tbps} TB/s, {device_name}"
        if piece in device_name:
            break
    return None, f"no peak known for {device_name}: set {PEAK_ENV}"


def kv_bytes(batch: int, context: int, kv_heads: int, head_dim: int, element_bytes: int) -> int:
    """What a decode step's attention must read at least: every context token's K and V, once."""
    return 2 * batch * context * kv_heads * head_dim * element_bytes


def decode_row(triton_ms: float, torch_ms: float, batch: int, context: int) -> Row:
    speedup = torch_ms / triton_ms
    return Row(
        f"decode kernel vs PyTorch paged path (batch {batch}, context {context})",
        f"{speedup:.2f}x ({triton_ms * 1e3:.0f} us vs {torch_ms * 1e3:.0f} us)",
        f">= {DECODE_MIN_SPEEDUP:g}x",
        verdict(speedup, DECODE_MIN_SPEEDUP),
    )


def bandwidth_row(triton_ms: float, nbytes: int, peak: float | None, peak_source: str, batch: int, context: int) -> Row:
    achieved = nbytes / (triton_ms * 1e-3)  # bytes/s
    fraction = None if peak is None else achieved / peak
    measured = f"{achieved / 1e12:.2f} TB/s" + ("" if fraction is None else f" = {fraction:.0%}") + f" of {peak_source}"
    return Row(
        f"decode kernel's K/V bandwidth (batch {batch}, context {context})",
        measured,
        f">= {MIN_PEAK_FRACTION:.0%} of peak",
        verdict(fraction, MIN_PEAK_FRACTION),
    )


def split_k_row(split_ms: float, single_ms: float, splits: int, context: int) -> Row:
    speedup = single_ms / split_ms
    return Row(
        f"split-K ({splits} splits) vs one pass (batch 1, context {context})",
        f"{speedup:.2f}x ({split_ms * 1e3:.0f} us vs {single_ms * 1e3:.0f} us)",
        f">= {SPLIT_K_MIN_SPEEDUP:g}x",
        verdict(speedup, SPLIT_K_MIN_SPEEDUP),
    )


def ceiling_row(triton_ms: float, sdpa_ms: float, batch: int, context: int) -> Row:
    return Row(
        f"SDPA on contiguous K/V, the ceiling (batch {batch}, context {context})",
        f"decode kernel takes {triton_ms / sdpa_ms:.2f}x SDPA's time ({sdpa_ms * 1e3:.0f} us)",
        "none",
        "info",
    )


def format_table(rows: list[Row]) -> str:
    lines = ["| check | measured | target | result |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.measured} | {r.target} | **{r.result}** |" for r in rows]
    return "\n".join(lines)


# ---- on the GPU -----------------------------------------------------------------------------------------


def scattered_case(lengths: list[int], dtype: torch.dtype, gen: torch.Generator, poison: bool = True):
    """Sequences' K/V (L, Hkv, D), scattered into shuffled blocks of a pool (NaN elsewhere when `poison`).

    Returns k_cache, v_cache (num_blocks, BLOCK_SIZE, Hkv, D), block tables (S, max_blocks) int32 (padded with a
    block never written), context lengths (S,) int32, and the K and V lists, all on the GPU.
    """
    used = [-(-n // BLOCK_SIZE) for n in lengths]
    num_blocks = sum(used) + 1
    order = torch.randperm(num_blocks, generator=gen).tolist()
    spare = order.pop()  # table padding points here
    fill = float("nan") if poison else 0.0
    k_cache = torch.full((num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM), fill, dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    keys, values, tables = [], [], []
    for n, blocks in zip(lengths, used):
        k = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).to(dtype).to(DEVICE)
        v = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).to(dtype).to(DEVICE)
        table = [order.pop() for _ in range(blocks)]
        pos = torch.arange(n, device=DEVICE)
        where = torch.tensor(table, device=DEVICE)[pos // BLOCK_SIZE]  # (n,) each position's block
        k_cache[where, pos % BLOCK_SIZE], v_cache[where, pos % BLOCK_SIZE] = k, v
        keys.append(k)
        values.append(v)
        tables.append(table + [spare] * (max(used) - blocks))
    block_tables = torch.tensor(tables, dtype=torch.int32, device=DEVICE)  # (S, max_blocks)
    context_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, block_tables, context_lens, keys, values


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int) -> torch.Tensor:
    """float64 causal attention of q (T, Hq, D) at positions first_pos.. over contiguous k, v (L, Hkv, D)."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)  # (L, Hq, D): query head h reads KV head h // group
    v = v.double().repeat_interleave(group, 1)
    scores = torch.einsum("thd,lhd->htl", q.double(), k) / q.shape[2] ** 0.5  # (Hq, T, L)
    t, length = q.shape[0], k.shape[0]
    visible = torch.arange(length, device=q.device)[None, :] <= first_pos + torch.arange(t, device=q.device)[:, None]
    return torch.einsum("htl,lhd->thd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)  # (T, Hq, D)


def compare(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """(within atol = rtol = TOLERANCE[dtype] and finite, max abs error)."""
    tol = TOLERANCE[dtype]
    err = (out.double() - expected).abs()
    ok = bool(torch.isfinite(out).all()) and bool((err <= tol + tol * expected.abs()).all())
    return ok, float(err.nan_to_num(float("inf")).max())


def check_row(name: str, dtype: torch.dtype, ok: bool, err: float) -> Row:
    tol = TOLERANCE[dtype]
    return Row(
        f"{name} vs PyTorch, {str(dtype)[6:]}", f"max abs error {err:.1e}", f"within {tol:g}", "PASS" if ok else "FAIL"
    )


def correctness_rows(
    tk, dtype: torch.dtype, lengths=(1, 16, 17, 1000, 4097), cases=((1, 1), (300, 300), (1000, 200), (2049, 17))
) -> list[Row]:
    """The kernels against float64 attention on contiguous K/V: one token, a block, a block + 1, long contexts.

    `cases` are prefill chunks (context, chunk): first prompts, and chunks after a cached prefix.
    """
    gen = torch.Generator().manual_seed(0)
    rows = []
    # store_kv: two tokens are padding (slot -1) and must not be written
    k_cache = torch.full((8, BLOCK_SIZE, KV_HEADS, HEAD_DIM), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    k, v = (torch.randn(6, KV_HEADS, HEAD_DIM, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    slots = torch.tensor([5, -1, 70, 16, -1, 127], device=DEVICE)
    tk.store_kv(k_cache, v_cache, k, v, slots)
    keep = slots >= 0
    flat_k, flat_v = k_cache.view(-1, KV_HEADS, HEAD_DIM), v_cache.view(-1, KV_HEADS, HEAD_DIM)  # (slots, Hkv, D)
    exact = torch.equal(flat_k[slots[keep]], k[keep]) and torch.equal(flat_v[slots[keep]], v[keep])
    untouched = int(flat_k.isnan().all(-1).all(-1).sum()) == flat_k.shape[0] - int(keep.sum())
    rows.append(
        Row(
            f"store KV, {str(dtype)[6:]}",
            "slots written exactly, padding skipped",
            "exact",
            "PASS" if exact and untouched else "FAIL",
        )
    )

    k_cache, v_cache, tables, lens, keys, values = scattered_case(list(lengths), dtype, gen)
    q = torch.randn(len(lengths), Q_HEADS, HEAD_DIM, generator=gen).to(dtype).to(DEVICE)
    expected = torch.cat([reference_attention(q[s : s + 1], keys[s], values[s], n - 1) for s, n in enumerate(lengths)])
    for name, splits in (("decode, one pass", 1), ("decode, split-K (8 splits)", 8)):
        out = tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=splits)
        rows.append(check_row(name, dtype, *compare(out, expected, dtype)))

    k_cache, v_cache, tables, lens, keys, values = scattered_case([n for n, _ in cases], dtype, gen)
    q_lens = torch.tensor([0] + [t for _, t in cases])
    starts = q_lens.cumsum(0).to(torch.int32).to(DEVICE)  # (S + 1,)
    q = torch.randn(int(q_lens.sum()), Q_HEADS, HEAD_DIM, generator=gen).to(dtype).to(DEVICE)
    expected = torch.cat(
        [reference_attention(q[starts[s] : starts[s + 1]], keys[s], values[s], n - t) for s, (n, t) in enumerate(cases)]
    )
    longest = max(t for _, t in cases)
    out = tk.varlen_prefill_attention(q, k_cache, v_cache, tables, starts, lens, max_query_len=longest)
    rows.append(check_row("prefill over the pool", dtype, *compare(out, expected, dtype)))
    return rows


def bench_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def decode_inputs(batch: int, context: int, dtype: torch.dtype, gen: torch.Generator):
    """A pool holding `batch` sequences of `context` tokens each, in shuffled blocks, and one query per sequence."""
    per_seq = context // BLOCK_SIZE
    num_blocks = batch * per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks, generator=gen).to(DEVICE)
    tables = order.view(batch, per_seq).to(torch.int32).contiguous()  # (B, blocks)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, dtype=dtype, device=DEVICE)
    return q, k_cache, v_cache, tables, lens


def decode_vs_torch(tk, dtype: torch.dtype, gen: torch.Generator, batch=64, context=1024) -> tuple[list[Row], dict]:
    from nanovllm.layers.attention import GatherBuffer, padded_causal_mask, paged_attention

    q, k_cache, v_cache, tables, lens = decode_inputs(batch, context, dtype, gen)
    out = torch.empty_like(q)
    triton_ms = bench_ms(lambda: tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, out=out))
    # the PyTorch path as the engine runs it: the mask and the gather buffers are made once per step, not per layer
    positions = (lens - 1).long()[:, None]  # (B, 1)
    tables64 = tables.long()
    mask = padded_causal_mask(positions, tables.shape[1] * BLOCK_SIZE)  # (B, 1, context)
    buffers = (GatherBuffer(), GatherBuffer())
    q4 = q[:, None]  # (B, 1, Hq, D)
    torch_out = paged_attention(q4, k_cache, v_cache, tables64, positions, mask, buffers)[:, 0]
    agree = torch.allclose(torch_out.float(), out.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    torch_ms = bench_ms(lambda: paged_attention(q4, k_cache, v_cache, tables64, positions, mask, buffers))
    # the ceiling: the same attention on K/V already contiguous, (B, Hkv, context, D), no block table to follow
    k = k_cache[tables64].flatten(1, 2).transpose(1, 2).contiguous()
    v = v_cache[tables64].flatten(1, 2).transpose(1, 2).contiguous()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sdpa_ms = bench_ms(lambda: sdpa(q4.transpose(1, 2), k, v, enable_gqa=True))
    rows = [decode_row(triton_ms, torch_ms, batch, context), ceiling_row(triton_ms, sdpa_ms, batch, context)]
    if not agree:
        rows[0].result = "FAIL"
        rows[0].measured += "; outputs differ from the PyTorch path"
    return rows, {"triton_ms": triton_ms, "torch_paged_ms": torch_ms, "sdpa_ms": sdpa_ms, "outputs_agree": agree}


def bandwidth(
    tk, dtype: torch.dtype, gen: torch.Generator, device_name: str, batch=64, context=4096
) -> tuple[list[Row], dict]:
    q, k_cache, v_cache, tables, lens = decode_inputs(batch, context, dtype, gen)
    out = torch.empty_like(q)
    ms = bench_ms(lambda: tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, out=out))
    nbytes = kv_bytes(batch, context, KV_HEADS, HEAD_DIM, k_cache.element_size())
    peak, source = peak_hbm(device_name)
    row = bandwidth_row(ms, nbytes, peak, source, batch, context)
    return [row], {"triton_ms": ms, "kv_bytes": nbytes, "peak_bytes_per_s": peak, "peak_source": source}


def split_k(tk, dtype: torch.dtype, gen: torch.Generator, sms: int, batch=1, context=8192) -> tuple[list[Row], dict]:
    q, k_cache, v_cache, tables, lens = decode_inputs(batch, context, dtype, gen)
    splits = tk.choose_num_splits(batch, KV_HEADS, context, sms)  # what the wrapper picks by default
    out = torch.empty_like(q)
    split_ms = bench_ms(
        lambda: tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=splits, out=out)
    )
    single_ms = bench_ms(lambda: tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=1, out=out))
    row = split_k_row(split_ms, single_ms, splits, context)
    return [row], {"split_ms": split_ms, "single_ms": single_ms, "num_splits": splits, "num_sms": sms}


def guarded(name: str, section: Callable[[], tuple[list[Row], dict]]) -> tuple[list[Row], dict]:
    """One section's rows, or an ERROR row (and the traceback on stderr): the other sections still run."""
    try:
        return section()
    except Exception as e:  # a compile error, out of memory...: report it in the table
        traceback.print_exc()
        return [Row(name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200], "-", "ERROR")], {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="for the timings")
    parser.add_argument("--out", type=Path, help="folder for table.md and results.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(NO_CUDA)
    from nanovllm.kernels import triton as tk

    if (why := tk.triton_unavailable()) is not None:
        raise SystemExit(f"the Triton kernels cannot run here: {why}")
    import triton

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name()
    print(
        f"GPU: {name} | torch {torch.__version__} | triton {triton.__version__} | timings in {args.dtype}", flush=True
    )
    rows, results = [], {"device": name, "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype}
    for check_dtype in (torch.float16, torch.bfloat16):
        section_rows, _ = guarded(
            f"kernels vs PyTorch, {check_dtype}", lambda d=check_dtype: (correctness_rows(tk, d), {})
        )
        rows += section_rows
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for key, title, section in (
        ("decode", "decode vs PyTorch paged", lambda: decode_vs_torch(tk, dtype, gen)),
        ("bandwidth", "decode bandwidth", lambda: bandwidth(tk, dtype, gen, name)),
        ("split_k", "split-K vs one pass", lambda: split_k(tk, dtype, gen, sms)),
    ):
        section_rows, results[key] = guarded(title, section)
        rows += section_rows
        torch.cuda.empty_cache()  # the next section's pool gets the memory back
    table = format_table(rows)
    print(table)
    failed = [r.check for r in rows if r.result in ("FAIL", "ERROR")]
    print(f"{len(failed)} of {len(rows)} rows missed: {'; '.join(failed)}" if failed else "every check passed")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(f"GPU: {name}, timings in {args.dtype}\n\n{table}\n")
        results["rows"] = [asdict(r) for r in rows]
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0  # a report, not a gate: a missed target is in the table, and gpu.sh goes on


if __name__ == "__main__":
    sys.exit(main())
