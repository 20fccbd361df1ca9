"""Exercises for ch01: your version of nanovllm.layers.attention.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch01 -k "task4"
"""

from __future__ import annotations
import math
from dataclasses import dataclass
from typing import Protocol
import torch
import torch.nn.functional as F
from nanovllm.layers.attention import AttentionSpec, AttentionBackend, spec_causal_attention, masked_attention, softcapped_attention, window_mask, store_kv, gather_kv, pad_block_tables, GatherBuffer, paged_attention, padded_causal_mask  # the rest of the file, as given


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
    raise NotImplementedError("ch01 task 4: causal attention with grouped KV heads")
