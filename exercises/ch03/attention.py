"""Exercises for ch03: your version of nanovllm.layers.attention.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch03 -k "task6"
"""

from __future__ import annotations
import math
from dataclasses import dataclass
from typing import Protocol
import torch
import torch.nn.functional as F
from nanovllm.layers.attention import AttentionSpec, AttentionBackend, causal_attention, spec_causal_attention, masked_attention, softcapped_attention, window_mask, store_kv, pad_block_tables, GatherBuffer, paged_attention, padded_causal_mask  # the rest of the file, as given


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read each sequence's K (or V) out of the block pool, in position order, through its block table.

    Logical block i of sequence b lives in physical block block_tables[b, i], so position p
    of sequence b is cache[block_tables[b, p // block_size], p % block_size].

    Args:
        cache: (num_blocks, block_size, Hkv, D) one layer's pool of K or V.
        block_tables: (B, max_blocks) physical block ids; rows shorter than max_blocks are
            padded with any valid id (what is read there is masked out by position).
        out: optional (B * max_blocks, block_size, Hkv, D) tensor to copy the blocks into, so that
            call after call reuses the same memory (see GatherBuffer); the result is then a view of it.
    Returns:
        (B, max_blocks * block_size, Hkv, D): entry [b, p] is position p of sequence b.
    """
    raise NotImplementedError("ch03 task 6: read K/V through the block table")
