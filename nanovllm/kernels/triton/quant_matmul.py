"""Triton kernel 4 (chapter 7): weight-only INT8 / INT4 matmul, y = x W^T + b, reading W as its quantized bytes.

The weights stay in the layout the quantizers and the CPU kernels use (nanovllm/layers/quant_reference.py), with
no repacking at load time:
    INT8: qweight int8 (N, K), scale float32 (N,): W[n, k] = scale[n] * qweight[n, k].
    INT4: qweight uint8 (N, K / 2), byte j holding input 2j (low nibble) and 2j + 1 (high nibble), nibble v meaning
          v - 8; scales float32 (N, K / G): W[n, k] = scales[n, k // G] * (v - 8).
Unlike the CPU kernels the activations are not quantized: x stays in its dtype (bf16, fp16 or fp32), the integer
weights are converted to that dtype inside the tile (-127..127 and -8..7 are exact in bf16 and fp16), tl.dot
multiplies them on the tensor cores into a float32 accumulator, and the scales are applied to the float32 sums.
So the result is that of x @ dequantized(W)^T, up to the order of float32 additions; each weight byte is read
from memory once per tile of rows, which is what makes a decode step (a few rows) faster than reading bf16 weights.

A plain tiled GEMM: program (m, n, split) computes the (BLOCK_M, BLOCK_N) tile of y for rows m and output channels
n, over its share of K. Split-K is for decode: at M = 1 a layer of 1024 outputs is only 16 tiles of 64, too few to
fill a GPU's ~132 SMs, so K is cut into splits whose float32 partial sums are added up afterwards.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from nanovllm.kernels.cpu import INT4_GROUP_SIZES  # one list of group sizes for the CPU and the GPU kernels
from nanovllm.kernels.triton._common import FLOAT_DTYPES, check_device, check_tensor, dot_in_fp32, next_pow2

BLOCK_N = 64  # output channels per program
INT8_BLOCK_K = 128  # inputs per loop step (128 bytes of each weight row); INT4 steps one group at a time


# M, N and the split sizes change with every batch: not specialized on (each value % 16 would be another compile).
# K and the row strides are: with K a multiple of 16 the compiler knows each weight row starts on a 16-byte boundary
# and loads it 16 bytes at a time. The loops count steps, not inputs, for the same reason: the first input of step s
# is s * BLOCK_K, a multiple the compiler can see (split * a runtime size would hide it, and the loads would go byte
# by byte).
NOT_SPECIALIZED = ["M", "N", "steps_per_split", "SPLIT_K"]


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _int8_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, steps_per_split,
    SPLIT_K, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (m, n, split): y[rows, cols] over steps split * steps_per_split .. + steps_per_split of BLOCK_K inputs.

    SPLIT_K is an ordinary argument, not a constexpr: one compiled kernel serves every number of splits > 1.
    """
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x and y
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output channels: rows of W
    row_ok, col_ok = rows < M, cols < N
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)  # N * K passes 2**31 for a large vocabulary's output layer
    first = split * steps_per_split
    last = tl.minimum(first + steps_per_split, (K + BLOCK_K - 1) // BLOCK_K)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for step in range(first, last):
        k = step * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,) inputs of this step
        k_ok = k < K  # only the last step of a K that BLOCK_K does not divide is partial
        x = tl.load(x_ptr + rows64[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # W^T's tile, (BLOCK_K, BLOCK_N): element (k, n) is W[n, k], one byte each
        w = tl.load(w_ptr + cols64[None, :] * K + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0)
        if DOT_F32:
            x, w = x.to(tl.float32), w.to(tl.float32)
        else:
            w = w.to(x.dtype)  # -127..127: exact in fp16 and bf16
        acc += tl.dot(x, w, input_precision="ieee")  # (BLOCK_M, BLOCK_N) float32
    acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]  # one scale per output channel
    out_ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows64[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:  # float32 partial sums, (SPLIT_K, M, N): the wrapper adds them and the bias
        tl.store(out_ptr + (split * M + rows64)[:, None] * N + cols[None, :], acc, mask=out_ok)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _int4_kernel(
    x_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, row_bytes, steps_per_split,
    SPLIT_K, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (m, n, split): y[rows, cols] over groups split * steps_per_split .. + steps_per_split, one per step.

    The packed bytes are never interleaved back into K order: the low nibbles are the weights of the even inputs and
    the high nibbles those of the odd inputs, so the step is two dots, even columns of x with the low nibbles and
    odd columns with the high ones. A step is exactly one group (K is a multiple of GROUP), so it has one scale per
    output channel, applied to its float32 sum. row_bytes = K / 2, the packed weight's row stride.
    """
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok, col_ok = rows < M, cols < N
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    x_ok = row_ok[:, None]
    w_ok = col_ok[None, :]
    groups = K // GROUP
    first = split * steps_per_split
    last = tl.minimum(first + steps_per_split, groups)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for g in range(first, last):
        j = g * (GROUP // 2) + tl.arange(0, GROUP // 2)  # (GROUP / 2,) group g's bytes; byte j holds inputs 2j, 2j + 1
        x_even = tl.load(x_ptr + rows64[:, None] * K + 2 * j[None, :], mask=x_ok, other=0.0)  # (BLOCK_M, GROUP / 2)
        x_odd = tl.load(x_ptr + rows64[:, None] * K + 2 * j[None, :] + 1, mask=x_ok, other=0.0)
        # (GROUP / 2, BLOCK_N) uint8, the bytes of W^T's tile
        packed = tl.load(w_ptr + cols64[None, :] * row_bytes + j[:, None], mask=w_ok, other=0)
        low = (packed & 15).to(tl.float32) - 8.0  # (GROUP / 2, BLOCK_N) weights of inputs 2j, in -8..7
        high = (packed >> 4).to(tl.float32) - 8.0  # weights of inputs 2j + 1
        if DOT_F32:
            x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
        else:
            low, high = low.to(x_even.dtype), high.to(x_even.dtype)  # -8..7: exact in fp16 and bf16
        part = tl.dot(x_even, low, input_precision="ieee") + tl.dot(x_odd, high, input_precision="ieee")
        scale = tl.load(scales_ptr + cols64 * groups + g, mask=col_ok, other=0.0)  # (BLOCK_N,) group g's scales
        acc += part * scale[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows64[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(out_ptr + (split * M + rows64)[:, None] * N + cols[None, :], acc, mask=out_ok)


def choose_split_k(tiles: int, k_steps: int, num_sms: int, min_steps_per_split: int = 2, max_splits: int = 16) -> int:
    """How many parts to cut K into so that the (row tiles x column tiles) programs, times the splits, fill the GPU.

    With tiles >= num_sms every SM already has a program: 1. Otherwise about num_sms / tiles splits, but each
    with at least min_steps_per_split loop steps (a shorter one reads too little to pay for its partial sums), and
    at most max_splits. On the CPU (num_sms=1, the interpreter runs programs one by one): always 1.
    """
    if tiles >= num_sms:
        return 1
    return max(1, min(-(-num_sms // tiles), k_steps // min_steps_per_split, max_splits))


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _block_m(m: int) -> int:
    """Rows per tile: tl.dot needs at least 16; a decode step's few rows fill one tile, a prefill's 64 a tile."""
    return min(64, max(16, next_pow2(m)))


def _check_x_bias(x: torch.Tensor, bias: torch.Tensor | None, k: int, n: int) -> None:
    check_tensor("x", x, FLOAT_DTYPES, 2)
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} inputs per row, the weight {k}")
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES, 1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have {n} values (one per output channel), got {bias.shape[0]}")


def _launch(kernel, x, qweight, scales, bias, n, k_steps, split_k, *args, **constexprs) -> torch.Tensor:
    """Run `kernel` over the (row tiles, column tiles, splits) grid, K cut into k_steps loop steps; with split-K, add
    the partial sums and the bias. `args` go between K and steps_per_split."""
    m, k = x.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    block_m = _block_m(m)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, BLOCK_N)
    if split_k is None:
        split_k = choose_split_k(tiles, k_steps, _num_sms(x.device))
    if not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be an integer >= 1, got {split_k!r}")
    steps_per_split = triton.cdiv(k_steps, split_k)
    split_k = triton.cdiv(k_steps, steps_per_split)  # no empty split
    target = out if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N), split_k)
    kernel[grid](
        x, qweight, scales, bias if bias is not None else scales, target, m, n, k, *args, steps_per_split,
        HAS_BIAS=bias is not None, SPLIT_K=split_k, DOT_F32=dot_in_fp32(x.dtype),
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, **constexprs,
    )  # fmt: skip
    if split_k > 1:
        y = target.sum(0)  # (M, N) float32
        if bias is not None:
            y += bias
        out.copy_(y)
    return out


def int8_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x W^T + b with W = scale[:, None] * qweight, read as int8: the GPU twin of nanovllm.kernels.cpu.int8_linear.

    Args:
        x: (M, K) contiguous, float32, float16 or bfloat16; any M >= 0 and any K.
        qweight: (N, K) int8 contiguous; scale: (N,) float32 contiguous.
        bias: optional (N,) float tensor, added in float32.
        split_k: parts of K summed separately (None: choose_split_k for this GPU; 1 on the CPU).
    Returns:
        (M, N) in x's dtype, accumulated in float32.
    """
    check_tensor("qweight", qweight, (torch.int8,), 2)
    check_tensor("scale", scale, (torch.float32,), 1)
    n, k = qweight.shape
    if scale.shape[0] != n:
        raise ValueError(f"scale must have {n} values (one per output channel), got {scale.shape[0]}")
    _check_x_bias(x, bias, k, n)
    check_device(x=x, qweight=qweight, scale=scale, **({} if bias is None else {"bias": bias}))
    steps = triton.cdiv(k, INT8_BLOCK_K)
    return _launch(_int8_kernel, x, qweight, scale, bias, n, steps, split_k, BLOCK_K=INT8_BLOCK_K)


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x W^T + b with W the packed INT4 weight and its group scales: the GPU twin of cpu.int4_linear.

    Args:
        x: (M, K) contiguous, float32, float16 or bfloat16; K a multiple of group_size.
        qweight: (N, K // 2) uint8 contiguous, two inputs a byte (low nibble first).
        scales: (N, K // group_size) float32 contiguous.
        group_size: 32, 64 or 128 inputs per scale.
        bias, split_k: as int8_matmul.
    Returns:
        (M, N) in x's dtype, accumulated in float32.
    """
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    check_tensor("qweight", qweight, (torch.uint8,), 2)
    check_tensor("scales", scales, (torch.float32,), 2)
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if k % group_size:
        raise ValueError(f"K ({k}) must be a multiple of group_size ({group_size}): each step reads one whole group")
    if scales.shape != (n, k // group_size):
        want = (n, k // group_size)
        raise ValueError(f"scales must be {want} for groups of {group_size}, got {tuple(scales.shape)}")
    _check_x_bias(x, bias, k, n)
    check_device(x=x, qweight=qweight, scales=scales, **({} if bias is None else {"bias": bias}))
    return _launch(_int4_kernel, x, qweight, scales, bias, n, k // group_size, split_k, k // 2, GROUP=group_size)
