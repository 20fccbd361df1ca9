"""Rotary position embedding (RoPE): rotate pairs of channels of q and k by an angle that grows with position."""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """The rotation speed of each channel pair: theta ** (-2i / head_dim), i = 0 .. head_dim/2 - 1.

    `scaling` stretches the slow (long-wavelength) channels for longer contexts:
    'linear' divides every frequency by `factor`; 'llama3' divides only the low
    frequencies and blends smoothly between `low_freq_factor` and `high_freq_factor`;
    'longrope' (Phi-3) divides each frequency by its own factor, from a short list or a long one,
    and returns both sets, (2, head_dim/2): row 0 short, row 1 long (see `longrope_cos_sin`).
    `head_dim` is the number of channels RoPE rotates (all of a head's, or a part: ModelConfig.rotary_dim).
    """
    powers = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)
    if scaling is not None and scaling["rope_type"] == "longrope":
        factors = torch.tensor([scaling["short_factor"], scaling["long_factor"]], dtype=torch.float32, device="cpu")
        return 1.0 / (factors * powers)  # (2, head_dim/2)
    inv_freq = 1.0 / powers
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


def longrope_cos_sin(
    positions: torch.Tensor, inv_freqs: torch.Tensor, scaling: dict[str, Any], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_cos_sin for longrope: each position rotates with the short frequencies below
    original_max_position_embeddings and with the long ones from there on; cos and sin are scaled by
    attention_factor (which scales the scores q.k by its square, sharpening attention over a longer context).

    The choice is made token by token, from the token's own position, so a key is rotated once, when it is
    computed, and stays valid in the KV cache: every engine (no cache, a cache, chunks, prefix caching,
    recomputation after preemption) gives the same angles. transformers' Phi-3 model chooses one set for a whole
    forward call instead, by its largest position: run token by token with a cache, as here, that is this rule.
    Its generate() goes further: when a sequence first grows past original_max_position_embeddings it drops the
    cache and recomputes every earlier token with the long set (and a longer prompt is all long from the start).
    Our engines do not: up to that length they agree with transformers exactly, past it the tokens before
    original_max_position_embeddings keep their short rotation (book/ch01.md, "Adding a family").

    Args:
        positions: (..., T) positions.
        inv_freqs: (2, rotary_dim/2) from rope_inv_freq: short, long.
    Returns:
        cos, sin: (..., T, rotary_dim) each.
    """
    use_long = (positions >= scaling["original_max_position_embeddings"]).long()  # (..., T): 0 short, 1 long
    freqs = positions[..., None].float() * inv_freqs.to(positions.device)[use_long]  # (..., T, rotary_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, rotary_dim)
    factor = scaling["attention_factor"]
    return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary on the first cos.shape[-1] channels of each head; the others pass through (partial rotary,
    Phi-3's partial_rotary_factor). With a full-width cos it is apply_rotary itself.

    Args:
        x: (B, T, H, D) queries or keys.
        cos, sin: (B, T, R), R <= D and even.
    Returns:
        (B, T, H, D) tensor.
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    rotated = apply_rotary(x[..., :rotary_dim], cos, sin)  # (B, T, H, R)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)  # (B, T, H, D)


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
