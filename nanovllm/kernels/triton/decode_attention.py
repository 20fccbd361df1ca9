"""Triton kernel 2: paged decode attention, one query per sequence, with split-K (flash-decoding) and its reduce."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton import _common as c

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): scores are scaled into base 2 once, exp2 is the cheap one


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
    m_new = tl.maximum(m, tl.max(scores, 1))  # (M,) finite from a row's first tile on
    alpha = tl.exp2(m - m_new)  # (M,) what the old max's terms are worth now: 0 on the first tile, where m = -inf
    p = tl.exp2(scores - m_new[:, None])  # (M, N) 0 where masked
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l, acc


@triton.jit
def soft_cap(scores, CAP: tl.constexpr):
    """Gemma 2's soft cap, CAP * tanh(scores / CAP), on scores in base 2 (CAP = the model's cap x log2(e), which
    caps the natural-log scores by the model's cap). tanh(x) = 2 sigmoid(2x) - 1: Triton has no tanh of its own."""
    return CAP * (2.0 * tl.sigmoid(2.0 * scores / CAP) - 1.0)


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
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of each row's scores (base 2)
    l = tl.full([BLOCK_G], 0.0, tl.float32)  # running sum of exp2(score - m)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)  # running sum of exp2(score - m) * v
    # (tl.zeros is a jitted helper, which the interpreter re-patches on every call: tl.full is not)
    for t0 in range(start, end, BLOCK_N):
        pos = t0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) positions of this tile
        ok = pos < end  # nothing past the range is read: neither its table entries nor its slots
        block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=ok, other=0)
        # element offset of each token's KV head; int64, as block * block stride passes 2**31 in a pool of a few GB
        row = (block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * (HKV * D) + kvh * D
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=kv_ok, other=0.0)
        if DOT_F32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # (BLOCK_G, BLOCK_N)
        if SOFTCAP_LOG2 > 0:
            scores = soft_cap(scores, SOFTCAP_LOG2)
        # every tile has at least one valid position, so each row's max is finite from the first tile on
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m, l, acc = online_softmax_update(m, l, acc, scores, v)
    return m, l, acc


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
    w = tl.exp2(m - tl.max(m, 0))  # (BLOCK_SPLITS,) an empty split's weight is exp2(-inf) = 0
    return tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    scale_log2, max_blocks, window,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_F32: tl.constexpr, SOFTCAP_LOG2: tl.constexpr,
):  # fmt: skip
    """Program (s, kv head, split): the GROUP query heads that share this KV head, over one split of the context."""
    s, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = tl.arange(0, BLOCK_G)  # query head within the group; rows >= GROUP are padding (tl.dot needs M >= 16)
    d = tl.arange(0, BLOCK_D)  # head dim, padded to a power of 2 >= 16
    g_ok, d_ok = g < GROUP, d < D
    heads = (s * HQ + kvh * GROUP + g).to(tl.int64)  # (BLOCK_G,) rows of q and out, viewed as (S * Hq, D)
    q = tl.load(q_ptr + heads[:, None] * D + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    length = tl.load(lens_ptr + s)
    # a sliding window starts `window` positions before the end (the wrapper passes a huge window for none)
    first = tl.maximum(length - window, 0)
    # this split's share of the attended positions: a whole number of tiles, so only the last tile is partial.
    # Short sequences leave late splits empty; they store (m=-inf, l=0, acc=0), which the reduce weighs 0.
    # (tl.cdiv and tl.zeros are jitted helpers, which the interpreter re-patches on every call: ~3 ms each)
    per_split = ((length - first + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = first + split * per_split
    end = tl.minimum(start + per_split, length)

    m, l, acc = attend_blocks(
        q, k_ptr, v_ptr, tables_ptr + s * max_blocks, kvh, start, end, scale_log2,
        HKV, D, BLOCK_SIZE, BLOCK_G, BLOCK_D, BLOCK_N, DOT_F32, SOFTCAP_LOG2,
    )  # fmt: skip

    out_ok = g_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + heads[:, None] * D + d[None, :], (acc / l[:, None]).to(out_ptr.dtype.element_ty), out_ok)
    else:  # partial results, (S * Hq, NUM_SPLITS) of m and l and (S * Hq, NUM_SPLITS, D) of acc, left unnormalized
        part = heads * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m, mask=g_ok)
        tl.store(part_l_ptr + part, l, mask=g_ok)
        tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=out_ok)


@triton.jit
def _reduce_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr,
    D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program r = (sequence, query head): combine the splits' partial softmaxes into one, rescaled to a common max."""
    r = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    sp_ok = sp < NUM_SPLITS
    m = tl.load(part_m_ptr + r * NUM_SPLITS + sp, mask=sp_ok, other=float("-inf"))  # (BLOCK_SPLITS,)
    l = tl.load(part_l_ptr + r * NUM_SPLITS + sp, mask=sp_ok, other=0.0)
    acc_ok = sp_ok[:, None] & (d < D)[None, :]
    acc = tl.load(part_acc_ptr + (r * NUM_SPLITS + sp)[:, None] * D + d[None, :], mask=acc_ok, other=0.0)
    out = combine_splits(m, l, acc)  # (BLOCK_D,)
    tl.store(out_ptr + r * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def choose_num_splits(
    batch: int, kv_heads: int, max_context: int, num_sms: int, min_tokens_per_split: int = 256, max_splits: int = 32
) -> int:
    """How many partitions to split each context into (split-K), so that a decode step fills the GPU.

    Without splitting the kernel runs batch * kv_heads programs, each streaming its sequence's whole context.
    A GPU runs at least one program per SM at a time, so when batch * kv_heads >= num_sms every SM is already
    busy and splitting would only add partial results and a reduce launch: 1 (batch 64 x 8 KV heads = 512
    programs on an H100's 132 SMs). Small batch x long context is the opposite: batch 1 x 8 KV heads = 8 programs
    leave 124 SMs idle while 8 of them each read 8192 tokens. Splitting each context into about
    num_sms / (batch * kv_heads) partitions gives every SM a program; but never below min_tokens_per_split
    tokens a partition (a shorter one reads too little to pay for writing and reducing its partial result),
    and at most max_splits. On the CPU (the interpreter runs programs one by one) pass num_sms=1: always 1.
    """
    programs = max(1, batch * kv_heads)
    if programs >= num_sms:
        return 1
    by_sms = -(-num_sms // programs)
    by_length = max(1, max_context // min_tokens_per_split)
    return max(1, min(by_sms, by_length, max_splits))


@functools.cache
def _num_sms(device: torch.device) -> int:
    """The GPU's streaming multiprocessors; 1 on the CPU, where the interpreter runs one program at a time."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode attention read in place from the block pool: the Triton twin of nanovllm.kernels.cpu's C kernel.

    Sequence s attends to its positions 0 .. context_lens[s] - 1, found through block_tables[s]; nothing past its
    own length is read. GQA: one program per (sequence, KV head) handles that head's whole group of Hq / Hkv query
    heads as the rows of one tile, so each K/V tile is loaded once for the group, not once per query head.

    Args:
        q: (S, Hq, D) contiguous, one query per sequence (its newest token, whose K/V are already stored).
        k_cache, v_cache: (num_blocks, block_size, Hkv, D) contiguous, one layer's pool, q's dtype
            (float32, float16 or bfloat16).
        block_tables: (S, max_blocks) int32 physical block ids; entries past a sequence's length are not read.
        context_lens: (S,) int32, each sequence's length including its newest token (1 .. max_blocks * block_size).
        scale: the score scale, head_dim ** -0.5 by default.
        num_splits: partitions of each context (split-K); None picks choose_num_splits(...) with max_blocks *
            block_size as the longest context (known without reading context_lens back from the GPU).
        out: optional (S, Hq, D) contiguous tensor of q's dtype to write into.
        window: attend to each sequence's last `window` positions only (nothing before is read); None: all.
        softcap: Gemma 2's soft cap on the scores, softcap * tanh(s / softcap); None: none.
    Returns:
        (S, Hq, D) attention output, in q's dtype (accumulated in float32).
    """
    c.check_window_softcap(window, softcap)
    num_blocks, block_size, hkv, d = c.check_cache(k_cache, v_cache)
    out = c.check_query(q, k_cache, out)
    num_seqs, hq, _ = q.shape
    c.check_tables(block_tables, context_lens, num_seqs)
    c.check_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)
    c.check_ranges(block_tables, context_lens, num_blocks, block_size)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, hkv, block_tables.shape[1] * block_size, _num_sms(q.device))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an integer >= 1, got {num_splits!r}")
    if num_seqs == 0:
        return out
    group = hq // hkv
    scale_log2 = (d**-0.5 if scale is None else scale) * LOG2E
    block_d = max(16, c.next_pow2(d))
    if num_splits == 1:
        parts = (out, out, out)  # not touched: the kernel writes the output itself
    else:
        parts = (
            torch.empty(num_seqs * hq, num_splits, d, dtype=torch.float32, device=q.device),  # acc
            torch.empty(num_seqs * hq, num_splits, dtype=torch.float32, device=q.device),  # m
            torch.empty(num_seqs * hq, num_splits, dtype=torch.float32, device=q.device),  # l
        )
    _decode_kernel[(num_seqs, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, *parts,
        scale_log2, block_tables.shape[1], window or c.NO_WINDOW,
        HQ=hq, HKV=hkv, D=d, GROUP=group, BLOCK_SIZE=block_size, BLOCK_G=max(16, c.next_pow2(group)), BLOCK_D=block_d,
        BLOCK_N=c.DECODE_BLOCK_N, NUM_SPLITS=num_splits, DOT_F32=c.dot_in_fp32(q.dtype),
        SOFTCAP_LOG2=(softcap or 0.0) * LOG2E,
    )  # fmt: skip
    if num_splits > 1:
        _reduce_kernel[(num_seqs * hq,)](
            *parts, out, D=d, NUM_SPLITS=num_splits, BLOCK_SPLITS=c.next_pow2(num_splits), BLOCK_D=block_d
        )
    return out
