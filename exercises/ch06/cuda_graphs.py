"""Exercises for ch06: your version of nanovllm.engine.cuda_graphs.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch06 -k "task1|task2"
"""

from __future__ import annotations
import logging
import time
import torch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import pad_block_tables
from nanovllm.layers.paged_attention import PagedAttention
from nanovllm.models import DecoderForCausalLM
from nanovllm.engine.cuda_graphs import log, decode_buckets, DecodeBuffers, DecodeGraphs  # the rest of the file, as given


def bucket_for(batch_size: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds batch_size sequences; None when the batch is larger than every bucket.

    Each bucket is a captured graph, so a batch runs in the first one with room for it, padded up to its size:
    3 sequences run in the bucket of 4, with one padding row. Buckets are sorted, smallest first.

    Args:
        batch_size: the number of sequences decoding this step (>= 1).
        buckets: the captured batch sizes, ascending.
    Returns:
        the bucket, or None (the step then runs eagerly, unpadded).
    """
    raise NotImplementedError("ch06 task 1: the smallest captured batch size that fits")


def fill_decode_buffers(
    buffers: DecodeBuffers,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    block_tables: torch.Tensor,
    bucket: int,
    block_size: int,
) -> None:
    """Write one decode step's n sequences into the first rows of the static buffers, and pad rows n..bucket-1.

    Real row i: its newest token, its position, its block table (the rest of the row zero), context length
    position + 1, and its slot, computed with tensor operations (no loop over sequences):
        slot = block_tables[i, position // block_size] * block_size + position % block_size.
    Padding rows: token 0, position 0, a zero block table, context length 1 (a valid read the logits of which
    are dropped) and slot -1, so they store nothing into the pool. Rows past the bucket are left alone.

    Args:
        buffers: the static buffers (their rows >= bucket).
        token_ids, positions: (n,) long, on the buffers' device.
        block_tables: (n, width) int32, width <= the buffers' table width.
        bucket: the padded batch size, >= n.
        block_size: tokens per KV block.
    """
    raise NotImplementedError("ch06 task 2: a decode step into static buffers")
