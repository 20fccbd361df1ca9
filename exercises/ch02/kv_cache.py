"""Exercises for ch02: your version of chapters.ch02_kv_cache.kv_cache.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch02 -k "task1"
"""

from __future__ import annotations
import torch
from nanovllm.layers.attention import AttentionSpec, masked_attention, padded_causal_mask, window_mask
from chapters.ch02_kv_cache.kv_cache import ContiguousKVCache  # the rest of the file, as given


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
) -> None:
    """Store the new tokens' keys and values in the cache, in place: token t of row b goes to slot positions[b, t].

    A row's slot is its token's position, so the cache of row b holds its sequence in order.
    Right padding puts padding after the real tokens, where later decode steps overwrite it.

    Args:
        k_cache, v_cache: (B, max_len, Hkv, D) one layer's cache, one row per sequence.
        k, v: (B, T, Hkv, D) the new tokens' keys and values.
        positions: (B, T) each new token's position.
    """
    raise NotImplementedError("ch02 task 1: store new K/V at their positions")
