"""Pure-PyTorch references for the CPU INT8 / INT4 linear kernels (nanovllm/kernels/quant_linear_cpu.c): same math.

They quantize the activations exactly as the kernels do (llama.cpp's q8_0: blocks of 32, d = max|x| / 127,
q = round-half-even(x * (1 / d)) clamped to +-127) and compute every block's integer dot product exactly (in float64,
where sums of int8 products are exact), so a kernel must match them up to the float32 rounding of its own sums.
They are for checking, not for speed: they build (rows, out, blocks) tensors.

Weight formats (shared with the quantizers and the kernels):
    INT8: qweight int8 (out, in), scale float32 (out,): w[o, i] = scale[o] * qweight[o, i].
    INT4: qweight uint8 (out, in // 2), byte j holding input 2j (low nibble) and 2j + 1 (high nibble), nibble n
          meaning n - 8; scales float32 (out, in // group_size): w[o, i] = scales[o, i // group_size] * (n - 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QBLOCK = 32  # activations are quantized in blocks of this many values


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q8_0 of each row of x (M, K) float32: (q (M, Kp) int8, d (M, Kp // 32) float32), Kp = K rounded up to 32.

    The padding is zeros, as in the kernels (a partial last block's scale comes from its real values only).
    """
    M, K = x.shape
    blocks = F.pad(x.float(), (0, -K % QBLOCK)).view(M, -1, QBLOCK)
    d = blocks.abs().amax(-1) / 127  # float32 ops in the kernel's order, so the same roundings
    inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = (blocks * inverse[..., None]).clamp(-127, 127).round()  # torch.round: half to even, as the kernel
    return q.to(torch.int8).view(M, -1), d


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """(out, in // 2) uint8 -> (out, in) int8 in -8..7: byte j's low nibble is input 2j, its high nibble 2j + 1."""
    low = (qweight & 15).to(torch.int8) - 8
    high = (qweight >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).view(qweight.shape[0], -1)


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 (out, in) weight an INT8 (qweight, scale) pair stands for."""
    return scale[:, None] * qweight.float()


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 (out, in) weight an INT4 (qweight, scales) pair stands for."""
    return scales.repeat_interleave(group_size, dim=1) * unpack_int4(qweight).float()


def _block_dots(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact integer dot products of every activation block with every weight row's block: (M, out, blocks) float64.

    q: (M, Kp) int8 quantized activations; w: (out, K) integer-valued weights, padded here with zeros to Kp.
    """
    M, Kp = q.shape
    w = F.pad(w.to(torch.float64), (0, Kp - w.shape[1])).view(w.shape[0], -1, QBLOCK)
    return torch.einsum("mbk,obk->mob", q.to(torch.float64).view(M, -1, QBLOCK), w)


def _finish(y: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.float().view(*x.shape[:-1], y.shape[-1])


def int8_linear_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What nanovllm.kernels.cpu.int8_linear computes: x (..., in) -> (..., out), in float64 then rounded once."""
    q, d = quantize_activations(x.reshape(-1, x.shape[-1]))
    dots = _block_dots(q, qweight)  # (M, out, blocks)
    y = (dots * d.to(torch.float64)[:, None, :]).sum(-1) * scale.to(torch.float64)
    return _finish(y, bias, x)


def int4_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """What nanovllm.kernels.cpu.int4_linear computes: x (..., in) -> (..., out), in float64 then rounded once."""
    q, d = quantize_activations(x.reshape(-1, x.shape[-1]))
    dots = _block_dots(q, unpack_int4(qweight))  # (M, out, blocks), each block inside one group (group_size >= 32)
    block_scales = scales.to(torch.float64).repeat_interleave(group_size // QBLOCK, dim=1)  # (out, blocks)
    y = (dots * d.to(torch.float64)[:, None, :] * block_scales).sum(-1)
    return _finish(y, bias, x)
