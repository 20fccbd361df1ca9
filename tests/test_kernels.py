"""The C paged decode attention kernel (nanovllm/kernels), checked against PyTorch's own attention.

The oracle is F.scaled_dot_product_attention run on each sequence's K and V laid out contiguously,
built here straight from the positions, not through any of our paging code.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from conftest import require
from nanovllm.kernels import cpu as kernels

pytestmark = pytest.mark.ch04


@pytest.fixture(autouse=True)
def c_kernel():
    require(kernels.c_kernels_unavailable(), "the C kernel")


def random_case(S, Hq, Hkv, D, block_size, lengths, num_blocks=None, seed=0):
    """S sequences of the given lengths in shuffled blocks of a pool: the kernel's inputs, the oracle, the tables."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    need = sum(-(-n // block_size) for n in lengths)
    num_blocks = num_blocks or need + 7
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=gen)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)  # (S, width)
    q = torch.randn(S, Hq, D, generator=gen)
    expected = []
    for s, n in enumerate(lengths):
        slots = [tables[s][p // block_size] * block_size + p % block_size for p in range(n)]
        k = k_cache.view(-1, Hkv, D)[slots].transpose(0, 1)  # (Hkv, n, D), positions in order
        v = v_cache.view(-1, Hkv, D)[slots].transpose(0, 1)
        out = F.scaled_dot_product_attention(q[s][:, None], k, v, enable_gqa=True)  # (Hq, 1, D)
        expected.append(out[:, 0])
    inputs = (q, k_cache, v_cache, block_tables, torch.tensor(lengths, dtype=torch.int32))
    return inputs, torch.stack(expected), tables


@pytest.mark.parametrize(
    "S, Hq, Hkv, D, block_size, lengths",
    [
        (1, 4, 4, 64, 16, [1]),  # one token of context
        (1, 12, 4, 64, 16, [37]),  # one sequence, fewer than threads: its KV heads are shared out
        (3, 8, 2, 32, 5, [5, 10, 11]),  # grouped-query attention; lengths at and just past a block's end
        (5, 6, 6, 17, 1, [1, 2, 9, 4, 3]),  # one token per block; a head size no vector width divides
        (7, 4, 1, 80, 3, [20, 1, 13, 6, 9, 2, 30]),  # one KV head for every query head (multi-query)
        (8, 8, 4, 64, 16, [300, 290, 260, 200, 160, 120, 64, 17]),  # enough work for several threads
        (2, 4, 2, 128, 16, [40, 129]),  # the other head size with a vectorized copy
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_matches_pytorch_attention(S, Hq, Hkv, D, block_size, lengths, threads):
    inputs, expected, _ = random_case(S, Hq, Hkv, D, block_size, lengths)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the kernel uses as many threads as torch does
    try:
        out = kernels.paged_decode_attention(*inputs)
    finally:
        torch.set_num_threads(before)
    assert out.shape == (S, Hq, D)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sharpness", [8.0, 60.0])
def test_peaked_scores_whose_exponentials_underflow(sharpness):
    """Scores spread over hundreds: most exponentials fall below float32's range (the vectorized exp flushes them
    to 0, as their float32 sum would) and the softmax is nearly one-hot."""
    inputs, _, tables = random_case(3, 4, 4, 64, 16, [77, 200, 9], seed=5)
    q = inputs[0] * sharpness
    k_cache, v_cache = inputs[1], inputs[2]
    out = kernels.paged_decode_attention(q, *inputs[1:])
    for s, n in enumerate([77, 200, 9]):
        slots = [tables[s][p // 16] * 16 + p % 16 for p in range(n)]
        k = k_cache.view(-1, 4, 64)[slots].transpose(0, 1)  # (H, n, D)
        v = v_cache.view(-1, 4, 64)[slots].transpose(0, 1)
        expected = F.scaled_dot_product_attention(q[s][:, None].double(), k.double(), v.double())[:, 0]  # (H, D)
        # a score of size ~sharpness * 8 carries float32 rounding of that size times 6e-8 into its exponential
        tolerance = 1e-5 * sharpness / 8
        torch.testing.assert_close(out[s].double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("D", [64, 128, 17])  # the two vectorized head sizes, and the plain loops
@pytest.mark.parametrize("threads", [1, 2])
def test_a_bfloat16_pool_reads_as_its_float32_copy(D, threads):
    """A bfloat16 pool (kv_cache_dtype='bfloat16'): the kernel widens each value exactly, so it gives the float32
    kernel's result on the same values to float32 rounding: the vectorized copies (D 64 and 128) add up a bfloat16
    row's even and odd elements in separate lanes, and the compiler may vectorize (and fuse into FMAs) the plain
    loops' two instantiations differently (bit for bit on an AVX2 build, not on an AVX-512 one)."""
    inputs, _, _ = random_case(4, 8, 4, D, 16, [300, 17, 64, 129], seed=D)
    q, k_cache, v_cache, tables, lens = inputs
    k16, v16 = k_cache.bfloat16(), v_cache.bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernels.paged_decode_attention(q, k16, v16, tables, lens)
        want = kernels.paged_decode_attention(q, k16.float(), v16.float(), tables, lens)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # a value widened wrongly is off by far more
    with pytest.raises(ValueError, match="v_cache"):
        kernels.paged_decode_attention(q, k16, v_cache, tables, lens)  # K and V in different dtypes


@pytest.mark.parametrize("D", [16, 64])  # the plain loops, and the vectorized copy's groups of four positions
def test_reads_nothing_outside_each_sequence_blocks_and_length(D):
    """NaN everywhere the kernel must not look: unused blocks and each last block's slots past the length."""
    lengths = [23, 7, 40]
    inputs, expected, tables = random_case(3, 4, 2, D, 8, lengths, num_blocks=40)
    q, k_cache, v_cache, block_tables, context_lens = inputs
    used = {(b, i) for t, n in zip(tables, lengths) for p in range(n) for b, i in [(t[p // 8], p % 8)]}
    for b in range(40):
        for i in range(8):
            if (b, i) not in used:
                k_cache[b, i] = float("nan")
                v_cache[b, i] = float("nan")
    out = kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_writes_into_out_and_bad_inputs_raise():
    inputs, expected, _ = random_case(2, 4, 4, 16, 4, [5, 9])
    q, k_cache, v_cache, block_tables, context_lens = inputs
    out = torch.full_like(q, 7.0)
    assert kernels.paged_decode_attention(*inputs, out=out) is out
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match="out of range"):  # a block id past the pool
        kernels.paged_decode_attention(q, k_cache, v_cache, block_tables + k_cache.shape[0], context_lens)
    with pytest.raises(IndexError, match="out of range"):  # longer than its block table
        kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens * 10)
    with pytest.raises(IndexError, match="out of range"):  # no context at all
        kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens * 0)
    with pytest.raises(ValueError, match="int32"):
        kernels.paged_decode_attention(q, k_cache, v_cache, block_tables.long(), context_lens)
    with pytest.raises(ValueError, match="float32"):
        kernels.paged_decode_attention(q.double(), k_cache, v_cache, block_tables, context_lens)
    with pytest.raises(ValueError, match="float32"):  # a non-contiguous view would be read wrongly: refused
        kernels.paged_decode_attention(q.transpose(0, 1).contiguous().transpose(0, 1), k_cache, v_cache,
                                       block_tables, context_lens)  # fmt: skip


def test_switched_off_the_engine_keeps_to_pytorch(monkeypatch):
    from nanovllm.engine.kv_cache import KVPool
    from nanovllm.engine.model_runner import resolve_attention_backend

    pool = KVPool(1, 4, 4, 2, 8, torch.float32)
    assert resolve_attention_backend("auto", pool) == "c"
    assert resolve_attention_backend("torch", pool) == "torch"
    assert resolve_attention_backend("auto", KVPool(1, 4, 4, 2, 8, torch.bfloat16)) == "c"  # kv_cache_dtype's
    assert resolve_attention_backend("auto", KVPool(1, 4, 4, 2, 8, torch.float16)) == "torch"
    with pytest.raises(ValueError, match="float16"):
        resolve_attention_backend("c", KVPool(1, 4, 4, 2, 8, torch.float16))
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_attention_backend("cuda", pool)
    monkeypatch.setenv("NANOVLLM_C_KERNELS", "0")
    kernels._load.cache_clear()
    try:
        assert kernels.c_kernels_unavailable() == "NANOVLLM_C_KERNELS=0"
        assert resolve_attention_backend("auto", pool) == "torch"
        with pytest.raises(ValueError, match="NANOVLLM_C_KERNELS=0"):
            resolve_attention_backend("c", pool)
    finally:
        monkeypatch.undo()
        kernels._load.cache_clear()


def test_builds_into_a_fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOVLLM_KERNEL_CACHE", str(tmp_path))
    kernels._load.cache_clear()
    try:
        assert kernels.c_kernels_unavailable() is None
        assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # the library, and no half-written leftovers
    finally:
        monkeypatch.undo()
        kernels._load.cache_clear()


def test_a_cache_folder_that_cannot_be_made_builds_elsewhere(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("NANOVLLM_KERNEL_CACHE", str(tmp_path / "a-file" / "kernels"))  # no folder can go there
    kernels._load.cache_clear()
    try:
        assert kernels.c_kernels_unavailable() is None
        inputs, expected, _ = random_case(2, 4, 2, 16, 4, [6, 3])
        torch.testing.assert_close(kernels.paged_decode_attention(*inputs), expected, rtol=1e-5, atol=1e-5)
    finally:
        monkeypatch.undo()
        kernels._load.cache_clear()


def test_a_compiler_that_fails_leaves_the_pytorch_path(monkeypatch, tmp_path):
    from nanovllm.engine.kv_cache import KVPool
    from nanovllm.engine.model_runner import resolve_attention_backend

    monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
    monkeypatch.setenv("NANOVLLM_KERNEL_CACHE", str(tmp_path))
    kernels._load.cache_clear()
    try:
        assert "did not compile" in kernels.c_kernels_unavailable()
        assert resolve_attention_backend("auto", KVPool(1, 4, 4, 2, 8, torch.float32)) == "torch"
        with pytest.raises(RuntimeError, match="not available"):
            kernels.paged_decode_attention(*random_case(1, 2, 2, 8, 4, [3])[0])
        assert list(tmp_path.iterdir()) == []  # no half-built files left behind
    finally:
        monkeypatch.undo()
        kernels._load.cache_clear()


def windowed_reference(q, k_cache, v_cache, tables, lengths, scale, window, softcap):
    """float64 decode attention of each sequence's last query over its last `window` positions, scores scaled and
    soft-capped (softcap * tanh(s / softcap)), written out here from the positions (transformers' Gemma 2 order)."""
    S, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = []
    for s, n in enumerate(lengths):
        first = max(0, n - window) if window else 0
        slots = [tables[s][p // bs] * bs + p % bs for p in range(first, n)]
        k = k_cache.view(-1, Hkv, D)[slots].double().repeat_interleave(Hq // Hkv, 1)  # (n', Hq, D)
        v = v_cache.view(-1, Hkv, D)[slots].double().repeat_interleave(Hq // Hkv, 1)
        scores = torch.einsum("hd,lhd->hl", q[s].double(), k) * scale  # (Hq, n')
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
    return torch.stack(out).float()


@pytest.mark.parametrize("window, softcap", [(5, None), (11, 2.0), (1, None), (None, 1.5), (64, 3.0)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("D, kv_dtype", [(16, torch.float32), (64, torch.float32), (64, torch.bfloat16)])
def test_sliding_window_soft_cap_and_scale(window, softcap, threads, D, kv_dtype):
    """Windows under a block of 8, across blocks and wider than some contexts; keys before each window are NaN, so
    any read of them shows. The scale is a model's own (Gemma 2's query_pre_attn_scalar ** -0.5), not 1/sqrt(D).
    D 16 takes the plain loops, 64 the vectorized copy (four positions at a time: windows that start and end inside
    a group of four), in float32 and in bfloat16 (against the reference on the same rounded values)."""
    lengths = [1, 5, 6, 8, 9, 40, 100]
    inputs, _, tables = random_case(len(lengths), 8, 2, D, 8, lengths, seed=3)
    q, k_cache, v_cache, block_tables, context_lens = inputs
    k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    q = q * 4 * (16 / D) ** 0.5  # large scores, where the cap bends them
    expected = windowed_reference(q, k_cache.float(), v_cache.float(), tables, lengths, 0.3, window, softcap)
    if window:
        for t, n in zip(tables, lengths):
            for p in range(max(0, n - window)):
                k_cache[t[p // 8], p % 8] = v_cache[t[p // 8], p % 8] = float("nan")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernels.paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale=0.3, window=window, softcap=softcap
        )
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="window"):
        kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, window=0)
    with pytest.raises(ValueError, match="softcap"):
        kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, softcap=-1.0)


def test_every_vector_width_this_cpu_builds(monkeypatch, tmp_path):
    """The vectorized copies (head sizes 64 and 128) built as wide as each flag set allows (16, 8 or 4 floats: the
    shuffle tree that sums four dot products differs by width, and so does the order a bfloat16 row is read in),
    float32 and bfloat16 pools, against the oracle; lengths that end inside a group of four positions."""
    monkeypatch.setenv("NANOVLLM_KERNEL_CACHE", str(tmp_path))
    lengths = [1, 3, 6, 33, 130]
    try:
        for name, flags in kernels.quant_kernel_paths().items():
            monkeypatch.setenv("NANOVLLM_KERNEL_FLAGS", flags)
            kernels._load.cache_clear()
            assert kernels.c_kernels_unavailable() is None, name
            for D in (64, 128):
                inputs, expected, _ = random_case(len(lengths), 8, 2, D, 16, lengths, seed=D)
                q, k_cache, v_cache, tables, lens = inputs
                out = kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens)
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=f"{name}, D {D}")
                k16, v16 = k_cache.bfloat16(), v_cache.bfloat16()
                want = kernels.paged_decode_attention(q, k16.float(), v16.float(), tables, lens)
                got = kernels.paged_decode_attention(q, k16, v16, tables, lens)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name}, D {D}, bfloat16")
    finally:
        monkeypatch.undo()
        kernels._load.cache_clear()
