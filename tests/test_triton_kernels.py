"""The Triton attention kernels (nanovllm/kernels/triton), checked against attention computed here from scratch.

The oracle is float64 softmax attention over each sequence's K and V laid out contiguously, made here before they
are scattered into a pool of shuffled blocks, not through any of our paging code. Every slot a kernel must not
read (the rest of the pool, the tail of a last block, the blocks behind a table's padding) holds NaN, so a stray
read shows up as a NaN in the output. Without a GPU the kernels run in Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import require

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton decorates the kernels: run them on the CPU

from nanovllm.kernels import triton as tk  # noqa: E402

pytestmark = pytest.mark.ch05
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # absolute, on outputs of size ~1


@pytest.fixture(autouse=True)
def triton_kernels():
    require(tk.triton_unavailable(), "the Triton kernels")


def make_case(lengths, hkv, d, block_size, dtype, seed=0):
    """Sequences' K/V (L, Hkv, D) scattered into shuffled blocks of a NaN pool; returns pool, tables and the K/V."""
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, hkv, d, generator=gen).to(dtype) for n in lengths]
    values = [torch.randn(n, hkv, d, generator=gen).to(dtype) for n in lengths]
    used = [-(-n // block_size) for n in lengths]
    num_blocks = sum(used) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    spare = order.pop()  # never written: table padding points at it, so reading padding gives NaN
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    tables = []
    for n, k, v in zip(lengths, keys, values):
        table = [order.pop() for _ in range(-(-n // block_size))]
        pos = torch.arange(n)
        blocks = torch.tensor(table)[pos // block_size]
        k_cache[blocks, pos % block_size], v_cache[blocks, pos % block_size] = k, v
        tables.append(table + [spare] * (max(used) - len(table)))
    block_tables = torch.tensor(tables, dtype=torch.int32)  # (S, max_blocks)
    context_lens = torch.tensor(lengths, dtype=torch.int32)
    on = (k_cache, v_cache, block_tables, context_lens)
    return *(t.to(DEVICE) for t in on), keys, values


def reference(q, k, v, first_pos):
    """float64 causal attention of q (T, Hq, D) at positions first_pos.. over k, v (L, Hkv, D) at positions 0.."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)  # (L, Hq, D): query head h reads KV head h // group
    v = v.double().repeat_interleave(group, 1)
    scores = torch.einsum("thd,lhd->htl", q.double().cpu(), k) / q.shape[2] ** 0.5  # (Hq, T, L)
    visible = torch.arange(k.shape[0])[None, :] <= first_pos + torch.arange(q.shape[0])[:, None]  # (T, L)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("htl,lhd->thd", scores.softmax(-1), v)  # (T, Hq, D)


def check(out, expected, dtype):
    assert torch.isfinite(out).all(), "the kernel read a slot it must not (NaN poison) or lost a row"
    torch.testing.assert_close(out.double().cpu(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


# (GQA group, head_dim, dtype, block_size): ratios 1, 4, 8; head_dim 64, 128 and the small models' 24 and 8;
# block sizes 16 and 5 (any size works: each token finds its block)
SHAPES = [
    (1, 64, torch.float32, 16),
    (4, 128, torch.float16, 16),
    (8, 64, torch.float16, 16),
    (4, 64, torch.bfloat16, 16),
    (2, 24, torch.float32, 5),
    (3, 8, torch.float32, 16),  # a group of 3 (Qwen2-0.5B has 7): tiles of rows that are not whole groups
]
LENGTHS = [1, 16, 17, 300]  # one token, exactly a block, a block + 1, several tiles: one batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv_writes_slots_and_skips_padding(dtype):
    hkv, d, block_size, num_blocks = 2, 24, 4, 6
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    wide = torch.randn(5, 2 * hkv, d).to(dtype).to(DEVICE)  # k, v as views of one (N, 2 * Hkv, D) tensor: strided
    k, v = wide[:, :hkv], wide[:, hkv:]
    slots = torch.tensor([3, -1, 22, 4, -1], device=DEVICE)
    tk.store_kv(k_cache, v_cache, k, v, slots.to(torch.int32 if dtype == torch.float16 else torch.int64))
    for cache, new in ((k_cache, k), (v_cache, v)):
        flat = cache.view(-1, hkv, d)  # (num_blocks * block_size, Hkv, D)
        for i, slot in enumerate(slots.tolist()):
            if slot >= 0:
                assert torch.equal(flat[slot], new[i])
        assert flat.isnan().all(-1).all(-1).sum() == num_blocks * block_size - 3  # nothing else written


@pytest.mark.parametrize("group, d, dtype, block_size", SHAPES)
def test_decode_matches_reference(group, d, dtype, block_size):
    hkv = 2
    k_cache, v_cache, tables, lens, keys, values = make_case(LENGTHS, hkv, d, block_size, dtype)
    q = torch.randn(len(LENGTHS), hkv * group, d).to(dtype).to(DEVICE)
    expected = torch.cat([reference(q[s : s + 1], keys[s], values[s], n - 1) for s, n in enumerate(LENGTHS)])
    check(tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=1), expected, dtype)


@pytest.mark.parametrize("num_splits", [2, 3, 16, None])
def test_decode_split_k_matches_single_pass(num_splits):
    """Split-K: 16 splits is more than the blocks (and tiles) of most of these sequences, so many splits are empty."""
    lengths, hkv, d = [300, 1, 40, 17], 2, 64
    k_cache, v_cache, tables, lens, keys, values = make_case(lengths, hkv, d, 16, torch.float32, seed=1)
    q = torch.randn(len(lengths), hkv * 4, d, device=DEVICE)
    expected = torch.cat([reference(q[s : s + 1], keys[s], values[s], n - 1) for s, n in enumerate(lengths)])
    out = tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=num_splits)
    check(out, expected, torch.float32)
    single = tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=1)
    torch.testing.assert_close(out, single, atol=1e-6, rtol=1e-5)


def test_decode_split_k_half_precision():
    k_cache, v_cache, tables, lens, keys, values = make_case([300, 33], 1, 128, 16, torch.float16, seed=2)
    q = torch.randn(2, 8, 128).half().to(DEVICE)
    expected = torch.cat([reference(q[s : s + 1], keys[s], values[s], n - 1) for s, n in enumerate([300, 33])])
    check(tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=4), expected, torch.float16)


@pytest.mark.parametrize("group, d, dtype, block_size", SHAPES)
def test_prefill_matches_reference(group, d, dtype, block_size):
    # (context, chunk): a first token; a prompt of exactly a block; of a block + 1; a chunk after a long cached
    # prefix; a short chunk after a prefix that ends mid-block
    cases = [(1, 1), (16, 16), (17, 17), (300, 40), (23, 5)]
    lengths = [n for n, _ in cases]
    hkv = 2
    k_cache, v_cache, tables, lens, keys, values = make_case(lengths, hkv, d, block_size, dtype, seed=3)
    q_lens = torch.tensor([0] + [t for _, t in cases])
    q_start = q_lens.cumsum(0).to(torch.int32).to(DEVICE)  # (S + 1,)
    q = torch.randn(int(q_lens.sum()), hkv * group, d).to(dtype).to(DEVICE)
    expected = torch.cat(
        [reference(q[q_start[s] : q_start[s + 1]], keys[s], values[s], n - t) for s, (n, t) in enumerate(cases)]
    )
    out = tk.varlen_prefill_attention(q, k_cache, v_cache, tables, q_start, lens)
    check(out, expected, dtype)


def test_prefill_of_one_token_is_decode():
    k_cache, v_cache, tables, lens, _, _ = make_case(LENGTHS, 2, 32, 8, torch.float32, seed=4)
    q = torch.randn(len(LENGTHS), 8, 32, device=DEVICE)
    q_start = torch.arange(len(LENGTHS) + 1, dtype=torch.int32, device=DEVICE)
    prefill = tk.varlen_prefill_attention(q, k_cache, v_cache, tables, q_start, lens, max_query_len=1)
    out = torch.empty_like(q)
    decode = tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, out=out)
    assert decode is out
    torch.testing.assert_close(prefill, decode, atol=1e-6, rtol=1e-5)


def test_scale_and_empty_batch():
    k_cache, v_cache, tables, lens, keys, values = make_case([20], 1, 16, 16, torch.float32, seed=5)
    q = torch.randn(1, 2, 16, device=DEVICE)
    expected = reference(q * 2.0, keys[0], values[0], 19)  # scale 0.5 = twice the default 1/sqrt(16)
    check(tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=0.5), expected, torch.float32)
    none = torch.empty(0, 2, 16, device=DEVICE)
    tables0, lens0 = tables[:0], lens[:0]
    assert tk.paged_decode_attention(none, k_cache, v_cache, tables0, lens0).shape == (0, 2, 16)
    starts = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    assert tk.varlen_prefill_attention(none, k_cache, v_cache, tables0, starts, lens0).shape == (0, 2, 16)


def test_choose_num_splits():
    assert tk.choose_num_splits(64, 8, 1024, 132) == 1  # 512 programs already fill 132 SMs
    assert tk.choose_num_splits(1, 8, 8192, 132) == 17  # 8 programs: 17 splits make 136 >= 132
    assert tk.choose_num_splits(1, 1, 8192, 132) == 32  # capped by max_splits
    assert tk.choose_num_splits(1, 8, 300, 132) == 1  # too short to be worth a partition
    assert tk.choose_num_splits(4, 2, 4096, 1) == 1  # the interpreter: one "SM"


def test_bad_arguments_are_refused():
    k_cache, v_cache, tables, lens, _, _ = make_case([5, 9], 2, 16, 4, torch.float32)
    q = torch.randn(2, 4, 16, device=DEVICE)
    decode = tk.paged_decode_attention
    with pytest.raises(ValueError, match="q and the cache must have one dtype"):
        decode(q.half(), k_cache, v_cache, tables, lens)
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        decode(q, k_cache.transpose(1, 2).contiguous().transpose(1, 2), v_cache, tables, lens)
    with pytest.raises(ValueError, match="block_tables must be torch.int32"):
        decode(q, k_cache, v_cache, tables.long(), lens)
    with pytest.raises(ValueError, match="shapes do not match"):
        decode(torch.randn(2, 3, 16, device=DEVICE), k_cache, v_cache, tables, lens)  # 3 heads, 2 KV heads
    with pytest.raises(ValueError, match="one row per sequence"):
        decode(q[:1], k_cache, v_cache, tables, lens)
    with pytest.raises(ValueError, match="out must be"):
        decode(q, k_cache, v_cache, tables, lens, out=torch.empty(2, 4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="num_splits"):
        decode(q, k_cache, v_cache, tables, lens, num_splits=0)
    with pytest.raises(ValueError, match="k must be"):
        tk.store_kv(k_cache, v_cache, torch.randn(3, 2, 8, device=DEVICE), torch.randn(3, 2, 16), torch.zeros(3))
    if DEVICE != "cpu":
        return  # the checks below read values back: on the CPU only, where that costs no stream stall
    with pytest.raises(ValueError, match="query_start_loc must rise"):
        tk.varlen_prefill_attention(q, k_cache, v_cache, tables, torch.tensor([0, 1, 3], dtype=torch.int32), lens)
    with pytest.raises(IndexError, match="context lengths"):
        decode(q, k_cache, v_cache, tables, torch.tensor([5, 13], dtype=torch.int32))  # 13 > 3 blocks x 4


def layer_reference(q, k, v, first_pos, scale, window, softcap):
    """reference() for a layer with its own scale, a sliding window (positions p - window + 1 .. p) and a soft cap."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)  # (L, Hq, D)
    v = v.double().repeat_interleave(group, 1)
    scores = torch.einsum("thd,lhd->htl", q.double().cpu(), k) * scale  # (Hq, T, L)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = first_pos + torch.arange(q.shape[0])[:, None]  # (T, 1)
    key = torch.arange(k.shape[0])[None, :]  # (1, L)
    visible = (key <= q_pos) & ((key > q_pos - window) if window else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("htl,lhd->thd", scores.softmax(-1), v)  # (T, Hq, D)


def poison_before(k_cache, v_cache, tables, first: list[int]) -> None:
    """NaN into each sequence's positions before `first[s]`: what a window must not read."""
    block_size = k_cache.shape[1]
    for s, n in enumerate(first):
        for p in range(n):
            b = int(tables[s, p // block_size])
            k_cache[b, p % block_size] = v_cache[b, p % block_size] = float("nan")


# (window, softcap): a window under a block of 16 and not a multiple of it; one across tiles of 128 (the interpreter's)
# and blocks; a window of one; a cap alone
WINDOWS = [(5, None), (11, 2.0), (130, 3.0), (1, None), (None, 1.5)]


@pytest.mark.parametrize("window, softcap", WINDOWS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_sliding_window_and_soft_cap(window, softcap, num_splits):
    lengths, hkv, group, d = [1, 5, 6, 16, 17, 300], 2, 2, 32
    k_cache, v_cache, tables, lens, keys, values = make_case(lengths, hkv, d, 16, torch.float32, seed=6)
    q = 4 * torch.randn(len(lengths), hkv * group, d, device=DEVICE)  # large scores, where the cap bends them
    expected = torch.cat(
        [layer_reference(q[s : s + 1], keys[s], values[s], n - 1, 0.3, window, softcap) for s, n in enumerate(lengths)]
    )
    if window:
        poison_before(k_cache, v_cache, tables, [max(0, n - window) for n in lengths])
    out = tk.paged_decode_attention(
        q, k_cache, v_cache, tables, lens, scale=0.3, num_splits=num_splits, window=window, softcap=softcap
    )
    check(out, expected, torch.float32)


@pytest.mark.parametrize("window, softcap", WINDOWS)
def test_prefill_sliding_window_and_soft_cap(window, softcap):
    """Chunks after cached context and first prompts; a query tile's rows see different windows."""
    cases = [(1, 1), (16, 16), (17, 17), (300, 200), (23, 5)]
    lengths, hkv, group, d = [n for n, _ in cases], 2, 2, 32
    k_cache, v_cache, tables, lens, keys, values = make_case(lengths, hkv, d, 16, torch.float32, seed=7)
    q_lens = torch.tensor([0] + [t for _, t in cases])
    q_start = q_lens.cumsum(0).to(torch.int32).to(DEVICE)  # (S + 1,)
    q = 4 * torch.randn(int(q_lens.sum()), hkv * group, d, device=DEVICE)
    expected = torch.cat(
        [
            layer_reference(q[q_start[s] : q_start[s + 1]], keys[s], values[s], n - t, 0.3, window, softcap)
            for s, (n, t) in enumerate(cases)
        ]
    )
    if window:  # before the window of each chunk's first token
        poison_before(k_cache, v_cache, tables, [max(0, n - t - window + 1) for n, t in cases])
    out = tk.varlen_prefill_attention(
        q, k_cache, v_cache, tables, q_start, lens, scale=0.3, window=window, softcap=softcap
    )
    check(out, expected, torch.float32)


def test_window_and_softcap_arguments_are_checked():
    k_cache, v_cache, tables, lens, _, _ = make_case([4], 1, 16, 4, torch.float32)
    q = torch.randn(1, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="window"):
        tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, window=0)
    with pytest.raises(ValueError, match="softcap"):
        tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, softcap=0.0)
