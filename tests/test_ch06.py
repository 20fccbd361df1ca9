"""Chapter 6 tests: buckets and padding, the static decode buffers, fused projections; then the engine with its
decode steps replayed from the static buffers (as a CUDA graph would be), against transformers and chapter 5.

Run against your own code with:  pytest --impl=exercises -m ch06 -k task1
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, TINY_MODELS
from nanovllm.config import ModelConfig
from nanovllm.engine.kv_cache import KVPool
from nanovllm.sampling_params import SamplingParams

CHAPTER = "ch06"
pytestmark = pytest.mark.ch06


def engine(family="tiny-llama", blocks=None, block_size=4, **options):
    """Chapter 6's engine with decodes from the static buffers (on a CPU the default runs them plainly eagerly)."""
    from chapters.ch06_cuda_graphs import LLM

    options.setdefault("enforce_eager", False)
    if blocks is not None:
        cfg = ModelConfig.from_folder(TINY_MODELS / family)
        options["kv_cache_memory"] = blocks * KVPool.bytes_per_block(
            cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, torch.float32
        )
    return LLM(str(TINY_MODELS / family), block_size=block_size, **options)


def greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


PROMPTS = [[1] + [(13 * i + 5 * j) % 380 + 3 for j in range(n)] for i, n in enumerate([5, 11, 3, 17, 8, 2, 21, 9, 14])]


# ---- task 1: the bucket a batch runs in ------------------------------------------------------------------


def test_task1_bucket_for_picks_the_smallest_bucket_that_holds_the_batch(impl):
    from nanovllm.engine.cuda_graphs import decode_buckets

    buckets = decode_buckets(64)
    assert buckets[:5] == [1, 2, 4, 8, 16] and buckets[-1] == 64
    assert [impl.bucket_for(n, buckets) for n in (1, 2, 3, 4, 5, 8, 9, 17, 63, 64)] == [
        1,
        2,
        4,
        4,
        8,
        8,
        16,
        24,
        64,
        64,
    ]
    assert impl.bucket_for(65, buckets) is None  # larger than every graph: the step runs eagerly
    assert impl.bucket_for(3, [4, 12]) == 4 and impl.bucket_for(5, [4, 12]) == 12


# ---- task 2: filling the static buffers ------------------------------------------------------------------


def test_task2_fill_decode_buffers_writes_real_rows_and_pads_the_rest(impl):
    from nanovllm.engine.cuda_graphs import DecodeBuffers

    buffers = DecodeBuffers(max_batch=8, max_blocks=5, device="cpu")
    buffers.slots.fill_(99)  # stale values from an earlier, larger step
    buffers.block_tables.fill_(7)
    tables = torch.tensor([[3, 1, 4], [2, 0, 0]], dtype=torch.int32)  # two sequences; the second has one block
    impl.fill_decode_buffers(buffers, torch.tensor([11, 12]), torch.tensor([9, 2]), tables, bucket=4, block_size=4)
    assert buffers.input_ids[:4].tolist() == [11, 12, 0, 0]
    assert buffers.positions[:4].tolist() == [9, 2, 0, 0]
    assert buffers.slots[:4].tolist() == [4 * 4 + 1, 2 * 4 + 2, -1, -1]  # position 9: block 2 of [3, 1, 4], offset 1
    assert buffers.context_lens[:4].tolist() == [10, 3, 1, 1]
    assert buffers.block_tables[:4].tolist() == [[3, 1, 4, 0, 0], [2, 0, 0, 0, 0], [0] * 5, [0] * 5]
    assert buffers.slots[4:].tolist() == [99] * 4  # rows past the bucket are not the step's: left alone


# ---- task 3: the fused projection, split -----------------------------------------------------------------


def test_task3_split_qkv_undoes_the_concatenation(impl):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    wq, wk, wv = torch.randn(4 * 8, 16), torch.randn(2 * 8, 16), torch.randn(2 * 8, 16)
    qkv = x @ torch.cat([wq, wk, wv]).T  # (2, 3, (4 + 2 + 2) * 8)
    q, k, v = impl.split_qkv(qkv, num_heads=4, num_kv_heads=2, head_dim=8)
    torch.testing.assert_close(q, (x @ wq.T).view(2, 3, 4, 8))
    torch.testing.assert_close(k, (x @ wk.T).view(2, 3, 2, 8))
    torch.testing.assert_close(v, (x @ wv.T).view(2, 3, 2, 8))


# ---- the engine ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_all_tasks_replayed_decodes_and_fused_weights_match_transformers(impl, oracle, family):
    """Late arrivals, a tiny token budget and a tiny pool (chunks, preemption), decodes from the static buffers."""
    llm = engine(family, blocks=14, max_num_batched_tokens=5)
    data = oracle["models"][family]
    cases = data["cases"] * 2
    ids = {}
    for step in range(400):
        if step % 3 == 0 and len(ids) < len(cases):
            params = SamplingParams(temperature=0.0, max_tokens=data["max_new_tokens"])  # EOS ends it, as it did there
            ids[llm.add_request(cases[len(ids)]["prompt"], params)] = cases[len(ids)]["greedy"]
        llm.step()
        if len(ids) == len(cases) and not llm.has_unfinished():
            break
    assert {i: llm.output(i)["token_ids"] for i in ids} == ids
    graphs = llm.runner.graphs
    assert graphs.stats["graph_steps"] > 0 and graphs.stats["padded_rows"] > 0 and llm.stats["preemptions"] > 0
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


@pytest.mark.parametrize("backend", ["torch", "c"])
def test_a_padded_batch_gives_the_unpadded_batchs_tokens_across_bucket_boundaries(backend):
    from chapters.ch05_triton_attention import LLM as Chapter5

    if backend == "c":
        from nanovllm.kernels.cpu import c_kernels_unavailable

        if c_kernels_unavailable():
            pytest.skip(f"no C kernel here: {c_kernels_unavailable()}")
    params = [greedy(6 + i % 4) for i in range(len(PROMPTS))]
    ours = engine(attention_backend=backend)
    theirs = Chapter5(str(TINY_MODELS / "tiny-llama"), block_size=4, attention_backend=backend)
    for n in (1, 2, 3, 5, 9):  # buckets 1, 2, 4, 8, 16: padded by 0, 0, 1, 3, 7 rows
        got = ours.generate(PROMPTS[:n], params[:n], use_tqdm=False)
        want = theirs.generate(PROMPTS[:n], params[:n], use_tqdm=False)
        assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want], n
    assert ours.runner.graphs.stats["padded_rows"] > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padding_rows_store_nothing_in_the_pool(backend):
    """One replayed step of 3 decodes in the bucket of 4: the pool changes at the 3 real slots and nowhere else."""
    llm = engine(attention_backend=backend)
    ids = [llm.add_request(p, greedy(4)) for p in PROMPTS[:3]]
    llm.step()  # the three prompts
    seqs = [llm.requests[i] for i in ids]
    k, v = llm.pool.k.clone(), llm.pool.v.clone()
    before = llm.runner.graphs.stats["padded_rows"]
    llm.step()  # three decodes, padded to 4
    assert llm.runner.graphs.stats["padded_rows"] == before + 1
    positions = [s.num_computed_tokens - 1 for s in seqs]  # what the step computed
    slots = {s.block_table[p // 4] * 4 + p % 4 for s, p in zip(seqs, positions)}
    changed = ((llm.pool.k != k) | (llm.pool.v != v)).flatten(3).any(-1).any(0).flatten()  # (num_blocks * bs,)
    assert set(changed.nonzero()[:, 0].tolist()) == slots


def test_enforce_eager_turns_the_static_path_off_and_chapter5_pins_it():
    from chapters.ch05_triton_attention import LLM as Chapter5

    assert engine(enforce_eager=True).runner.graphs is None
    assert engine(enforce_eager=None).runner.graphs is None  # the CPU default: replaying buys nothing there
    chapter5 = Chapter5(str(TINY_MODELS / "tiny-llama"))
    assert chapter5.runner.graphs is None and hasattr(chapter5.model.model.layers[0].self_attn, "q_proj")
    assert hasattr(engine().model.model.layers[0].self_attn, "qkv_proj")
    with pytest.raises(TypeError, match="later chapters"):
        Chapter5(str(TINY_MODELS / "tiny-llama"), enforce_eager=False)
