"""Chapter 6 on the CPU: the small operations of a decode step (RMSNorm, rotary, SwiGLU) as one C call each.

Each is a chain of 4-8 PyTorch operators that costs 25-55 us a call on a few thousand floats, almost all of it the
operators' fixed cost (nanovllm/kernels/decode_ops_cpu.c has the figures); in C each takes a few microseconds. The
engine uses them where it uses chapter 6's C linear kernel (`linear_kernel`, decode-sized inputs on a CPU); their
PyTorch forms (nanovllm/layers/norm.py, rotary.py, activation.py) stay the reference they are tested against.
"""

from __future__ import annotations

import torch

from nanovllm.kernels.cpu import _check, _load


def decode_ops_unavailable() -> str | None:
    """None when the C small-operation kernels are ready to use; otherwise why they are not."""
    return _load("decode_ops_cpu")[1]


def _library():
    lib, why = _load("decode_ops_cpu")
    if lib is None:
        raise RuntimeError(f"the C decode-step kernels are not available: {why}")
    return lib


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """nanovllm.layers.norm.rms_norm for float32: weight * (x / sqrt(mean(x ** 2) + eps)) over the last dimension.

    Args:
        x: (..., D) float32, contiguous.
        weight: (D,) float32.
        out: optional (..., D) float32 tensor to write into (x itself is allowed).
    Returns:
        (..., D) float32.
    """
    D = x.shape[-1]
    _check("x", x, torch.float32)
    _check("weight", weight, torch.float32, (D,))
    out = torch.empty_like(x) if out is None else out
    _check("out", out, torch.float32, x.shape)
    if x.numel():
        _library().rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // D, D, eps)
    return out


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Rotate, in place, the first `heads` heads of every row of x by its position's angles: what
    nanovllm.layers.rotary.apply_partial_rotary computes, head by head (exactly: the same products and sums).

    For a fused q/k/v projection's output, q's heads and then k's lie side by side at the start of each row, so one
    call rotates both (heads = Hq + Hkv) and leaves v, past them, as it is.

    Args:
        x: (..., W) float32, contiguous, W >= heads * head_dim: one row per token.
        cos, sin: (..., R) float32, contiguous, one row per token, R <= head_dim and even (R < head_dim: partial
            rotary, the channels from R on are left as they are).
        heads, head_dim: how the start of each row is cut into heads.
    Returns:
        x.
    """
    _check("x", x, torch.float32)
    R = cos.shape[-1]
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    _check("cos", cos, torch.float32)
    _check("sin", sin, torch.float32, cos.shape)
    if cos.numel() != rows * R or R % 2 or R > head_dim or heads * head_dim > x.shape[-1]:
        raise ValueError(
            f"cos and sin must have one row of an even width <= head_dim ({head_dim}) per row of x, and x's rows "
            f"{heads} heads of {head_dim}: got x {tuple(x.shape)}, cos {tuple(cos.shape)}"
        )
    if rows:
        _library().rotary(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows, heads, head_dim, R, x.shape[-1])
    return x


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU of a fused gate/up projection's output: silu(gate) * up with gate, up = gate_up.chunk(2, -1).

    Args:
        gate_up: (..., 2F) float32, contiguous.
        out: optional (..., F) float32 tensor to write into.
    Returns:
        (..., F) float32.
    """
    _check("gate_up", gate_up, torch.float32)
    F = gate_up.shape[-1] // 2
    if gate_up.shape[-1] != 2 * F:
        raise ValueError(f"gate_up's last dimension must be even (gate, then up), got {gate_up.shape[-1]}")
    out = gate_up.new_empty(*gate_up.shape[:-1], F) if out is None else out
    _check("out", out, torch.float32, (*gate_up.shape[:-1], F))
    if out.numel():
        _library().silu_mul(gate_up.data_ptr(), out.data_ptr(), out.numel() // F, F)
    return out
