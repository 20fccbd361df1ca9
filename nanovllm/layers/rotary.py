"""Rotary position embedding (RoPE): rotate pairs of channels of q and k by an angle that grows with position."""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """The rotation speed of each channel pair: theta ** (-2i / head_dim), i = 0 .. head_dim/2 - 1.

    `scaling` stretches the slow (long-wavelength) channels for longer contexts:
    'linear' divides every frequency by `factor`; 'llama3' divides only the low
    frequencies and blends smoothly between `low_freq_factor` and `high_freq_factor`.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: wavelengths longer than the original context / low_freq_factor are slowed by `factor`,
    # shorter than original / high_freq_factor are kept, and the band between is interpolated.
    old_len = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and sin of position * inv_freq, each (..., head_dim), computed once per forward pass.

    Both halves of the last dimension repeat the same angles, matching the rotate-half layout.
    """
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # (..., head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


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
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (B, T, 1, D): broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
