"""Exercises for ch03: your version of nanovllm.engine.kv_cache.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch03 -k "task5"
"""

from __future__ import annotations
import os
from pathlib import Path
import torch
from nanovllm.config import ModelConfig
from nanovllm.engine.kv_cache import KVPool, pool_for_model, CPU_MEMORY_FRACTION, available_memory  # the rest of the file, as given


def slot_mapping(block_table: list[int], positions: list[int], block_size: int) -> list[int]:
    """Where each token's K and V go in the pool, as flat slot numbers.

    Position p of a sequence lives in logical block p // block_size, at offset p % block_size;
    the block table maps the logical block to a physical one, so the flat slot is
        block_table[p // block_size] * block_size + p % block_size.

    Args:
        block_table: the sequence's physical block ids, in order.
        positions: the positions of the tokens to store.
        block_size: tokens per block.
    Returns:
        one slot number per position.
    """
    raise NotImplementedError("ch03 task 5: where each token's K/V goes in the pool")
