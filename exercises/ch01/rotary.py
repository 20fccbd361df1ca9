"""Exercises for ch01: your version of nanovllm.layers.rotary.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch01 -k "task2"
"""

from __future__ import annotations
import math
from typing import Any
import torch
from nanovllm.layers.rotary import rope_inv_freq, rope_cos_sin, longrope_cos_sin, apply_partial_rotary  # the rest of the file, as given


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k by its position's angles, in the 'rotate half' layout of Hugging Face.

    Channel j (j < D/2) is paired with channel j + D/2. With x1 = x[..., :D/2] and
    x2 = x[..., D/2:], each pair (x1, x2) is rotated by its angle a:
        out1 = x1 * cos(a) - x2 * sin(a)
        out2 = x2 * cos(a) + x1 * sin(a)
    which is x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1).

    Args:
        x: (B, T, H, D) queries or keys.
        cos, sin: (B, T, D), from `rope_cos_sin`; the same for every head.
    Returns:
        (B, T, H, D) tensor.
    """
    raise NotImplementedError("ch01 task 2: rotate q/k channel pairs by RoPE angles")
