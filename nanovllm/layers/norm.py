"""RMSNorm: scale each vector to unit root-mean-square, then by a learned per-channel weight."""

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square normalisation over the last dimension.

    y = weight * x / sqrt(mean(x**2, dim=-1) + eps)

    The mean and the division run in float32 whatever x's dtype (bf16 has too few bits
    for a sum of squares); the result is cast back to x's dtype *before* the weight is
    applied, which is the order Hugging Face Llama uses, so results match it bit for bit.

    Args:
        x: (..., D) activations.
        weight: (D,) learned scale.
        eps: added to the mean square to avoid division by zero.
    Returns:
        (..., D) tensor with x's shape and dtype.
    """
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """plus_one (Gemma): the scale is 1 + weight, and the whole norm runs in float32 before the cast back, as
    transformers' Gemma does it (Llama casts before the weight).

    Chapter 6: `use_decode_kernels_` (nanovllm/models/fused.py) may give it a C kernel for decode-sized float32
    inputs on a CPU: one call where rms_norm above is six operators, each with its own fixed cost.
    """

    kernel = None  # fn(x, weight, eps) -> y, used for contiguous float32 inputs of up to kernel_max_numel values
    kernel_max_numel = -1

    def __init__(self, dim: int, eps: float = 1e-6, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.kernel_max_numel and x.dtype == torch.float32 and x.is_contiguous():
            return self.kernel(x, self.weight, self.eps)
        if self.plus_one:
            return rms_norm(x.float(), 1.0 + self.weight.float(), self.eps).to(x.dtype)
        return rms_norm(x, self.weight, self.eps)
