"""Exercises for ch01: your version of nanovllm.layers.norm.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch01 -k "task1"
"""

import torch
from torch import nn
from nanovllm.layers.norm import RMSNorm  # the rest of the file, as given


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
    raise NotImplementedError("ch01 task 1: RMSNorm, normalise by the root mean square")
