"""Attention math shared by every chapter: scaled dot-product attention with a causal mask and grouped KV heads."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    """The seam between the model and the KV storage: what changes from chapter to chapter.

    Each attention layer hands its rotated q, k, v to the backend and gets the attention
    output back. A backend decides where K and V are kept (nowhere, a contiguous cache,
    paged blocks) and which past tokens each query sees.
    """

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (B, T, Hq, D); k, v: (B, T, Hkv, D) for the new tokens. Returns (B, T, Hq, D)."""
        ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention over one whole sequence, with grouped-query attention (GQA).

    out[t] = sum_{s <= t} softmax_s(q[t] . k[s] / sqrt(D)) v[s]

    Query head h reads KV head h // (Hq / Hkv): each KV head is shared by a group of
    Hq / Hkv query heads. Token t sees tokens 0..t only (the causal mask).

    Args:
        q: (B, T, Hq, D) queries.
        k, v: (B, T, Hkv, D) keys and values; Hq is a multiple of Hkv.
    Returns:
        (B, T, Hq, D) attention output.
    """
    return masked_attention(q, k, v, mask=None, causal=True)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool = False
) -> torch.Tensor:
    """Attention of q (B, Tq, Hq, D) over k, v (B, Tk, Hkv, D) with a boolean mask (B, Tq, Tk) (True = may attend)."""
    group = q.shape[2] // k.shape[2]
    q = q.transpose(1, 2)  # (B, Hq, Tq, D)
    k = k.transpose(1, 2).repeat_interleave(group, dim=1)  # (B, Hq, Tk, D)
    v = v.transpose(1, 2).repeat_interleave(group, dim=1)  # (B, Hq, Tk, D)
    if mask is not None:
        mask = mask[:, None]  # (B, 1, Tq, Tk): the same for every head
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    return out.transpose(1, 2)  # (B, Tq, Hq, D)
