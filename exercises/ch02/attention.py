"""Exercises for ch02: your version of nanovllm.layers.attention.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch02 -k "task2"
"""

from __future__ import annotations
import math
from dataclasses import dataclass
from typing import Protocol
import torch
import torch.nn.functional as F
from nanovllm.layers.attention import AttentionSpec, AttentionBackend, causal_attention, spec_causal_attention, masked_attention, softcapped_attention, window_mask, store_kv, gather_kv, pad_block_tables, GatherBuffer, paged_attention  # the rest of the file, as given


def padded_causal_mask(positions: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Which cache slots each new token may attend to: slot j is visible from position p when j <= p.

    With right padding this causal rule is also the padding mask: every padding slot lies to
    the right of every real token of its row, so no real query can see one, and a decode
    step at position p sees exactly the row's p + 1 real tokens.

    Args:
        positions: (B, T) positions of the new tokens.
        num_slots: how many cache slots the attention reads (the largest position + 1).
    Returns:
        (B, T, num_slots) boolean mask, True where attention is allowed.
    """
    raise NotImplementedError("ch02 task 2: the mask for a padded batch")
