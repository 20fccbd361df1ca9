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
    transformers' Gemma does it (Llama casts before the weight)."""

    def __init__(self, dim: int, eps: float = 1e-6, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plus_one:
            return rms_norm(x.float(), 1.0 + self.weight.float(), self.eps).to(x.dtype)
        return rms_norm(x, self.weight, self.eps)
