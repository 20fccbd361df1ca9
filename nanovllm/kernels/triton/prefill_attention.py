"""Triton kernel 3: causal variable-length prefill attention (FlashAttention tiling) whose keys come from the pool."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton import _common as c
from nanovllm.kernels.triton.decode_attention import LOG2E, online_softmax_update, soft_cap


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, qstart_ptr, lens_ptr, out_ptr,
    scale_log2, max_blocks, window,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr, SOFTCAP_LOG2: tl.constexpr,
):  # fmt: skip
    """Program (query tile, sequence, KV head): BLOCK_Q of the chunk's tokens x the GROUP query heads of one KV head.

    The tile's rows are (token, head) pairs, row r = token r // GROUP, head r % GROUP: the group's heads share each
    K/V tile loaded, as in the decode kernel, and the rows fill tl.dot's M dimension even for a short chunk.
    """
    tile, s, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(qstart_ptr + s)
    q_len = tl.load(qstart_ptr + s + 1) - q_start
    if tile * BLOCK_Q >= q_len:  # the grid is sized for the longest chunk; shorter ones have fewer tiles
        return
    length = tl.load(lens_ptr + s)
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)  # head dim, padded to a power of 2 >= 16
    i = tile * BLOCK_Q + r // GROUP  # (BLOCK_M,) token of each row within the chunk
    row_ok = (r < BLOCK_Q * GROUP) & (i < q_len)  # BLOCK_M need not be a multiple of GROUP (7 heads a group...)
    d_ok = d < D
    # (BLOCK_M,) rows of q and out viewed as (N * Hq, D)
    heads = (q_start + i).to(tl.int64) * HQ + kvh * GROUP + r % GROUP
    q = tl.load(q_ptr + heads[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    # the chunk is the last q_len of the sequence's `length` tokens: token i sits at this position and sees <= it
    q_pos = length - q_len + i  # (BLOCK_M,)
    # causal: no row of this tile sees past its last token, so keys stop there, not at the end of the context
    kv_end = tl.minimum(length, length - q_len + (tile + 1) * BLOCK_Q)
    # a sliding window: keys start at the first one the tile's first token sees (p > q_pos - window). The tile's
    # last token sees its first key at most BLOCK_Q - 1 <= BLOCK_N - 1 later, so every row has one in the first tile
    kv_start = tl.maximum(length - q_len + tile * BLOCK_Q - window + 1, 0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for t0 in range(kv_start, kv_end, BLOCK_N):
        pos = t0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
        ok = pos < kv_end
        block = tl.load(tables_ptr + s * max_blocks + pos // BLOCK_SIZE, mask=ok, other=0)
        row = (block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * (HKV * D) + kvh * D  # int64: see decode
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=kv_ok, other=0.0)
        if DOT_F32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # (BLOCK_M, BLOCK_N)
        if SOFTCAP_LOG2 > 0:
            scores = soft_cap(scores, SOFTCAP_LOG2)
        # each row sees a key of the first tile (key 0, or its window's first), so its max is finite from the
        # first tile on, and a later tile the mask hides from a row entirely leaves that row's m unchanged
        seen = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(seen, scores, float("-inf"))
        m, l, acc = online_softmax_update(m, l, acc, scores, v)

    out_ok = row_ok[:, None] & d_ok[None, :]
    tl.store(out_ptr + heads[:, None] * D + d[None, :], (acc / l[:, None]).to(out_ptr.dtype.element_ty), out_ok)


def varlen_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of several sequences' chunks, flattened into one batch, over their K/V in the block pool.

    Sequence s's chunk is q[query_start_loc[s] : query_start_loc[s + 1]] (q_len rows), the LAST q_len of its
    context_lens[s] tokens; its K/V must already be stored. Chunk token i is at position context_lens[s] - q_len + i
    and sees every position up to its own: the cached prefix (prefix caching, earlier chunks) and causally itself.
    Keys are read only through block_tables[s], so a first prompt and a later chunk are the same case.

    Args:
        q: (N, Hq, D) contiguous, N = query_start_loc[-1], the pool's dtype.
        k_cache, v_cache: (num_blocks, block_size, Hkv, D) contiguous, one layer's pool.
        block_tables: (S, max_blocks) int32.
        query_start_loc: (S + 1,) int32 cumulative row offsets of the chunks in q, starting at 0.
        context_lens: (S,) int32 tokens of each sequence up to and including its chunk (>= its q_len).
        scale: the score scale, head_dim ** -0.5 by default.
        out: optional (N, Hq, D) contiguous tensor of q's dtype to write into.
        max_query_len: the longest chunk, which sizes the grid; None computes it from query_start_loc
            (on a GPU that reads a number back and waits for the stream: pass it when the host knows it).
        window: a token at position p sees positions p - window + 1 .. p only (a sliding window); None: all.
        softcap: Gemma 2's soft cap on the scores, softcap * tanh(s / softcap); None: none.
    Returns:
        (N, Hq, D) attention output in q's dtype.
    """
    c.check_window_softcap(window, softcap)
    num_blocks, block_size, hkv, d = c.check_cache(k_cache, v_cache)
    out = c.check_query(q, k_cache, out)
    num_tokens, hq, _ = q.shape
    c.check_tensor("query_start_loc", query_start_loc, (torch.int32,), 1)
    num_seqs = query_start_loc.shape[0] - 1
    if num_seqs < 0:
        raise ValueError("query_start_loc must have S + 1 entries, got none")
    c.check_tables(block_tables, context_lens, num_seqs)
    c.check_device(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
        query_start_loc=query_start_loc, context_lens=context_lens,
    )  # fmt: skip
    c.check_ranges(block_tables, context_lens, num_blocks, block_size)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # (S,)
    if q.device.type == "cpu" and num_seqs:
        if int(query_start_loc[0]) != 0 or int(query_start_loc[-1]) != num_tokens or int(q_lens.min()) < 0:
            raise ValueError(f"query_start_loc must rise from 0 to q's {num_tokens} rows, got {query_start_loc}")
        if bool((q_lens > context_lens).any()):
            raise ValueError("a chunk is longer than its sequence's context length")
    if num_seqs == 0 or num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = int(q_lens.max())
    group = hq // hkv
    block_m = max(c.PREFILL_BLOCK_M, c.next_pow2(group))  # at least one token's whole group per tile
    block_q = block_m // group  # chunk tokens per tile
    assert block_q <= c.PREFILL_BLOCK_N  # what the kernel's window start relies on
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, hkv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        (d**-0.5 if scale is None else scale) * LOG2E, block_tables.shape[1], window or c.NO_WINDOW,
        HQ=hq, HKV=hkv, D=d, GROUP=group, BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_M=block_m,
        BLOCK_D=max(16, c.next_pow2(d)), BLOCK_N=c.PREFILL_BLOCK_N, DOT_F32=c.dot_in_fp32(q.dtype),
        SOFTCAP_LOG2=(softcap or 0.0) * LOG2E,
    )  # fmt: skip
    return out
