"""Exercises for ch05: your version of nanovllm.kernels.triton.decode_attention.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch05 -k "task1|task2|task3"
"""

from __future__ import annotations
import functools
import torch
import triton
import triton.language as tl
from nanovllm.kernels.triton import _common as c
from nanovllm.kernels.triton.decode_attention import LOG2E, soft_cap, _decode_kernel, _reduce_kernel, choose_num_splits, _num_sms, paged_decode_attention  # the rest of the file, as given


@triton.jit
def online_softmax_update(m, l, acc, scores, v):
    """Fold one tile of scores and values into a running softmax: FlashAttention's update, for M rows at once.

    The softmax of a row's scores is never formed whole. A row keeps its largest score so far, m, the sum
    l = sum_j exp2(score_j - m) and acc = sum_j exp2(score_j - m) * v_j over the positions seen so far; the output is
    acc / l once every tile is in. A tile whose largest score beats m rescales what was summed before.

    Args:
        m: (M,) float32, each row's running max (-inf before its first tile).
        l: (M,) float32, each row's running sum of exp2(score - m) (0 before its first tile).
        acc: (M, BLOCK_D) float32, each row's running sum of exp2(score - m) * v (0 before its first tile).
        scores: (M, N) float32, this tile's scores in base 2 (q . k x scale x log2(e)), -inf where a position is
            masked. A row's first tile has at least one finite score.
        v: (N, BLOCK_D), this tile's values (float32, or the pool's fp16/bf16 for the tensor cores).
    Returns:
        (m, l, acc) after the tile, float32, the same shapes.
    """
    raise NotImplementedError("ch05 task 1: fold one tile into the running max, sum and output")


@triton.jit
def attend_blocks(
    q, k_ptr, v_ptr, table_ptr, kvh, start, end, scale_log2,
    HKV: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
    SOFTCAP_LOG2: tl.constexpr = 0.0,
):  # fmt: skip
    """The decode kernel's loop: one query tile against positions start .. end - 1 of a sequence, read in place.

    Walks the range BLOCK_N positions at a time. Position p's K and V are at offset p % BLOCK_SIZE of physical block
    table_ptr[p // BLOCK_SIZE], KV head kvh: the pool is (num_blocks, BLOCK_SIZE, HKV, D) contiguous, so that
    token's head starts at element (block * BLOCK_SIZE + p % BLOCK_SIZE) * HKV * D + kvh * D (in int64: a pool of a
    few GB passes 2**31 elements). Nothing at or past `end` is read, neither table entries nor slots.
    Each tile's scores q . k^T x scale_log2 go through online_softmax_update.

    Args:
        q: (BLOCK_G, BLOCK_D) the query rows (the query heads that share KV head kvh; padding rows and columns 0),
            float32 when DOT_F32, else the pool's dtype.
        k_ptr, v_ptr: the layer's K and V pool.
        table_ptr: the sequence's row of the block table (int32 block ids).
        kvh: the KV head.
        start, end: the positions to attend to (a sliding window's start need not be a multiple of BLOCK_N);
            start >= end is an empty range.
        scale_log2: the score scale x log2(e), so that scores are in base 2 for exp2.
        HKV, D, BLOCK_SIZE: KV heads, head size and tokens per block of the pool.
        BLOCK_G, BLOCK_D, BLOCK_N: the tile: query rows, head size padded to a power of 2, positions per step.
        DOT_F32: cast K and V to float32 before tl.dot.
        SOFTCAP_LOG2: Gemma 2's soft cap x log2(e), applied by soft_cap to each tile's scores; 0 for none.
    Returns:
        (m, l, acc) of online_softmax_update after the last tile: (BLOCK_G,), (BLOCK_G,), (BLOCK_G, BLOCK_D) float32,
        unnormalized; (-inf, 0, 0) for an empty range.
    """
    raise NotImplementedError("ch05 task 2: the decode loop over a context's tiles, read through the block table")


@triton.jit
def combine_splits(m, l, acc):
    """Split-K's reduce: merge the partial softmaxes of one (sequence, query head)'s splits into its output.

    Split j attended to its own share of the context and left m_j (its max score, base 2), l_j (its sum of
    exp2(score - m_j)) and acc_j (its sum of exp2(score - m_j) * v). Rescaled to the common max M = max_j m_j, they
    add up to the softmax over the whole context: out = sum_j exp2(m_j - M) acc_j / sum_j exp2(m_j - M) l_j.

    Args:
        m: (BLOCK_SPLITS,) float32 each split's max; -inf for an empty split (a short context) or a padding entry.
        l: (BLOCK_SPLITS,) float32 each split's sum; 0 for an empty split or padding.
        acc: (BLOCK_SPLITS, BLOCK_D) float32 each split's weighted sum of values; 0 for an empty split or padding.
            Split 0 always holds a token (a context has at least one), so M is finite.
    Returns:
        (BLOCK_D,) float32, the attention output of this (sequence, query head).
    """
    raise NotImplementedError("ch05 task 3: merge split-K's partial softmaxes")
