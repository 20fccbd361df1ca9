"""Chapter 5 tests: the kernels' three exercise functions, each through the real kernels against PyTorch reference
attention; then the engine on the Triton attention backend (the interpreter on a CPU) gives chapter 4's tokens, which
are transformers' greedy tokens, on every family; chapter 5 pins what later chapters add.

A task's function runs inside a kernel, never alone: a kernel calls it by its module-global name, and `impl` sets that
name to your version (Triton's interpreter looks it up when the kernel runs). Task 2 calls task 1's function, so do
them in order. The kernels' other checks (store, GQA ratios, head sizes, dtypes, bad arguments) are in
tests/test_triton_kernels.py. Run against your own code with:  pytest --impl=exercises -m ch05 -k task1
"""

from __future__ import annotations

import pytest
import torch
from test_triton_kernels import DEVICE, check, make_case, reference

from conftest import FAMILIES, TINY_MODELS, require
from nanovllm.kernels import triton as tk  # sets TRITON_INTERPRET on a machine without CUDA, before Triton decorates
from nanovllm.sampling_params import SamplingParams

CHAPTER = "ch05"
pytestmark = pytest.mark.ch05
needs_triton = pytest.mark.usefixtures("triton_kernels")  # before `impl`, which imports the kernels' module


@pytest.fixture
def triton_kernels():
    require(tk.triton_unavailable(), "the Triton kernels", " (pip install -e '.[triton]' on Linux)")


def kernels_call(impl, name):
    """The task's function the kernels will call: yours under --impl=exercises, the reference otherwise."""
    from nanovllm.kernels.triton import decode_attention, prefill_attention

    assert getattr(decode_attention, name) is getattr(impl, name)
    if name == "online_softmax_update":  # the prefill kernel imports it by name: it calls yours too
        assert prefill_attention.online_softmax_update is impl.online_softmax_update


def prefill_case(cases, group, hkv, d, block_size, q_scale=1.0, seed=0):
    """Prefill chunks (context length, chunk length) over a NaN-poisoned pool: (q, pool and tables, expected)."""
    k_cache, v_cache, tables, lens, keys, values = make_case(
        [n for n, _ in cases], hkv, d, block_size, torch.float32, seed
    )
    q_lens = torch.tensor([0] + [t for _, t in cases])
    q_start = q_lens.cumsum(0).to(torch.int32).to(DEVICE)  # (S + 1,)
    q = (q_scale * torch.randn(int(q_lens.sum()), hkv * group, d)).to(DEVICE)
    expected = torch.cat(
        [reference(q[q_start[s] : q_start[s + 1]], keys[s], values[s], n - t) for s, (n, t) in enumerate(cases)]
    )
    return q, (k_cache, v_cache, tables, q_start, lens), expected


# ---- task 1: the online-softmax update -------------------------------------------------------------------


@needs_triton
def test_task1_online_softmax_prefill_over_several_tiles(impl):
    """The prefill kernel folds each tile of keys into (m, l, acc) with your update. Contexts of 300 and 200 tokens
    span several tiles (128 keys each under the interpreter), so later tiles raise the running max; in the chunk of
    150 after a 50-token prefix, a query tile's second key tile is entirely in the future for its first rows."""
    kernels_call(impl, "online_softmax_update")
    q, pool, expected = prefill_case([(300, 40), (200, 150), (23, 5), (1, 1)], group=2, hkv=2, d=32, block_size=16)
    check(tk.varlen_prefill_attention(q, *pool), expected, torch.float32)


@needs_triton
def test_task1_online_softmax_large_scores_do_not_overflow(impl):
    """Scores in the hundreds: exp2 of a raw score overflows float32; exp2(score - running max) never does."""
    kernels_call(impl, "online_softmax_update")
    q, pool, expected = prefill_case([(300, 3), (130, 2)], group=1, hkv=2, d=32, block_size=8, q_scale=40.0, seed=1)
    check(tk.varlen_prefill_attention(q, *pool), expected, torch.float32)


# ---- task 2: the decode kernel's loop over a context's blocks ---------------------------------------------


# (GQA group, head_dim, dtype, block_size): one query head per KV head, and a group of 4; a head size padded to a
# power of 2; blocks of 5, which tiles of 128 positions cut in the middle
@pytest.mark.parametrize("group, d, dtype, block_size", [(1, 64, torch.float32, 16), (4, 24, torch.float16, 5)])
@needs_triton
def test_task2_decode_reads_each_context_through_its_block_table(impl, group, d, dtype, block_size):
    """One token, exactly a block, a block + 1, three tiles: one batch. Every slot the loop must not read is NaN."""
    kernels_call(impl, "attend_blocks")
    lengths, hkv = [1, 16, 17, 300], 2
    k_cache, v_cache, tables, lens, keys, values = make_case(lengths, hkv, d, block_size, dtype, seed=2)
    q = torch.randn(len(lengths), hkv * group, d).to(dtype).to(DEVICE)
    expected = torch.cat([reference(q[s : s + 1], keys[s], values[s], n - 1) for s, n in enumerate(lengths)])
    check(tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=1), expected, dtype)


# ---- task 3: split-K's reduce -----------------------------------------------------------------------------


@needs_triton
def test_task3_combine_splits_merges_partial_softmaxes(impl):
    """The reduce kernel alone, on partial results made here in float64 from known scores and values: each row's
    context cut into 5 splits (BLOCK_SPLITS 8: 3 padding entries), short rows leaving splits empty, and scores
    spread so widely that a split's weight exp2(m_j - M) ranges from 1 to nearly 0."""
    kernels_call(impl, "combine_splits")
    from nanovllm.kernels.triton.decode_attention import _reduce_kernel

    gen = torch.Generator().manual_seed(3)
    lengths, num_splits, d = [1, 3, 7, 40, 100, 9], 5, 24
    part_m = torch.full((len(lengths), num_splits), float("-inf"), dtype=torch.float64)
    part_l = torch.zeros(len(lengths), num_splits, dtype=torch.float64)
    part_acc = torch.zeros(len(lengths), num_splits, d, dtype=torch.float64)
    expected = []
    for r, n in enumerate(lengths):
        scores = 20 * torch.randn(n, generator=gen, dtype=torch.float64)  # base 2, as the kernel's
        values = torch.randn(n, d, generator=gen, dtype=torch.float64)
        expected.append(torch.softmax(scores * torch.log(torch.tensor(2.0, dtype=torch.float64)), 0) @ values)
        per_split = -(-n // num_splits)
        for j in range(num_splits):
            s, v = scores[j * per_split : (j + 1) * per_split], values[j * per_split : (j + 1) * per_split]
            if len(s):  # an empty split keeps (-inf, 0, 0), as the decode kernel stores it
                part_m[r, j] = s.max()
                part_l[r, j] = torch.exp2(s - s.max()).sum()
                part_acc[r, j] = torch.exp2(s - s.max()) @ v
    out = torch.empty(len(lengths), d, device=DEVICE)
    parts = (t.float().contiguous().to(DEVICE) for t in (part_acc, part_m, part_l))
    _reduce_kernel[(len(lengths),)](*parts, out, D=d, NUM_SPLITS=num_splits, BLOCK_SPLITS=8, BLOCK_D=32)
    check(out, torch.stack(expected), torch.float32)


@needs_triton
def test_tasks2to3_split_k_decode_matches_reference(impl):
    """Split-K end to end: each split's loop starts mid-context (task 2), 16 splits leave most of these contexts'
    splits empty, and the reduce merges them (task 3)."""
    lengths, hkv, d = [300, 1, 40, 17], 2, 64
    k_cache, v_cache, tables, lens, keys, values = make_case(lengths, hkv, d, 16, torch.float32, seed=4)
    q = torch.randn(len(lengths), hkv * 4, d, device=DEVICE)
    expected = torch.cat([reference(q[s : s + 1], keys[s], values[s], n - 1) for s, n in enumerate(lengths)])
    for num_splits in (3, 16):
        check(
            tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=num_splits), expected, torch.float32
        )


# ---- the engine ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@needs_triton
def test_all_tasks_triton_backend_gives_chapter4_tokens_with_chunks_and_cached_prefixes(impl, oracle, family):
    from chapters.ch05_triton_attention import LLM

    # blocks of 4 and a 16-token budget: decodes, first chunks and chunks after cached context share steps
    llm = LLM(
        str(TINY_MODELS / family), attention_backend="triton", block_size=4, max_num_batched_tokens=16, device=DEVICE
    )
    assert llm.runner.attention.name == "triton"
    data = oracle["models"][family]
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = [c["prompt"] for c in data["cases"]]
    first = llm.generate(prompts, greedy, use_tqdm=False)
    again = llm.generate(prompts, greedy, use_tqdm=False)  # whole blocks now come from the prefix cache
    expected = [c["greedy"][:8] for c in data["cases"]]
    assert [o["token_ids"] for o in first] == expected
    assert [o["token_ids"] for o in again] == expected
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_auto_keeps_the_c_or_torch_path_on_a_cpu():
    from chapters.ch05_triton_attention import LLM

    llm = LLM(str(TINY_MODELS / "tiny-llama"))
    assert llm.runner.attention.name in ("c", "torch")  # the interpreter is for checking, not for speed


def test_chapter5_pins_what_chapter4_pins_and_keeps_the_engine_options():
    from chapters.ch04_continuous_batching import LLM as Chapter4
    from chapters.ch05_triton_attention import LLM
    from nanovllm.engine.llm_engine import LLMEngine

    assert LLM.pinned == Chapter4.pinned and "triton" in LLM.attention_backends
    assert set(LLM.attention_backends) == set(LLMEngine.attention_backends)  # chapter 5 brings the last one
    with pytest.raises(ValueError, match="later chapter"):
        Chapter4(str(TINY_MODELS / "tiny-llama"), attention_backend="triton")
