"""Chapter 2 tests: the cache update, the padded mask, padding, and the prefill/decode loop; then the whole engine.

Run against your own code with:  pytest --impl=exercises -m ch02 -k task1
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, TINY_MODELS

CHAPTER = "ch02"
pytestmark = pytest.mark.ch02


def test_task1_write_kv_puts_each_token_at_its_position(impl):
    k_cache, v_cache = torch.zeros(2, 6, 1, 2), torch.zeros(2, 6, 1, 2)
    k = torch.arange(1.0, 9.0).view(2, 2, 1, 2)
    positions = torch.tensor([[0, 1], [3, 4]])
    impl.write_kv(k_cache, v_cache, k, -k, positions)
    assert torch.equal(k_cache[0, :2], k[0]) and torch.equal(k_cache[1, 3:5], k[1])
    assert torch.equal(v_cache[1, 3:5], -k[1])
    assert k_cache[0, 2:].abs().sum() == 0 and k_cache[1, :3].abs().sum() == 0 and k_cache[1, 5:].abs().sum() == 0


def test_task2_padded_causal_mask(impl):
    positions = torch.tensor([[0, 1, 2], [4, 5, 6]])
    mask = impl.padded_causal_mask(positions, 7)
    assert mask.shape == (2, 3, 7) and mask.dtype == torch.bool
    expected = torch.arange(7)[None, None, :] <= positions[:, :, None]
    assert torch.equal(mask, expected)
    decode = impl.padded_causal_mask(torch.tensor([[2], [5]]), 6)
    assert decode[0, 0].tolist() == [True, True, True, False, False, False]
    assert decode[1, 0].all()


def test_task3_right_pad(impl):
    ids, positions, lengths = impl.right_pad([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert positions.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert lengths.tolist() == [3, 1]


def cache_for(model, rows, max_len=256):
    from chapters.ch02_kv_cache import ContiguousKVCache

    cfg = model.config
    return ContiguousKVCache(cfg.num_layers, rows, max_len, cfg.num_kv_heads, cfg.head_dim, torch.float32)


def test_task4_generate_batch_matches_transformers_padded_or_alone(impl, oracle):
    from nanovllm.sampling_params import SamplingParams
    from nanovllm.utils.loader import load_model

    for family in ("tiny-llama", "tiny-qwen3"):
        m = load_model(TINY_MODELS / family)
        data = oracle["models"][family]
        prompts = [c["prompt_ids"] for c in data["cases"]]
        params = [SamplingParams(temperature=0.0, max_tokens=data["max_new_tokens"])] * len(prompts)
        gens = [torch.Generator() for _ in prompts]
        batched = impl.generate_batch(m.model, prompts, params, [2], 256, gens, cache_for(m.model, 3))
        assert [tokens for tokens, _ in batched] == [c["greedy"] for c in data["cases"]]
        alone = impl.generate_batch(m.model, prompts[1:2], params[:1], [2], 256, gens[:1], cache_for(m.model, 1))
        assert alone[0][0] == data["cases"][1]["greedy"]


def test_task4_rows_finish_on_their_own(impl, oracle):
    from nanovllm.sampling_params import SamplingParams
    from nanovllm.utils.loader import load_model

    m = load_model(TINY_MODELS / "tiny-llama3")
    cases = oracle["models"]["tiny-llama3"]["cases"]
    assert cases[0]["greedy"][-1] == 2  # this prompt's greedy output ends with EOS
    prompts = [c["prompt_ids"] for c in cases]
    params = [
        SamplingParams(temperature=0, max_tokens=30),
        SamplingParams(temperature=0, max_tokens=3),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
    ]
    res = impl.generate_batch(m.model, prompts, params, [2], 256, [torch.Generator()] * 3, cache_for(m.model, 3))
    assert res[0] == (cases[0]["greedy"], "stop")
    assert res[1] == (cases[1]["greedy"][:3], "length")
    assert len(res[2][0]) == 30 and res[2][0][:24] == cases[2]["greedy"]


@pytest.mark.parametrize("family", FAMILIES)
def test_all_tasks_engine_matches_chapter1_and_transformers(impl, oracle, family):
    from chapters.ch01_naive import LLM as Chapter1
    from chapters.ch02_kv_cache import LLM, SamplingParams

    data = oracle["models"][family]
    prompts = [c["prompt"] for c in data["cases"]]
    params = SamplingParams(temperature=0.0, max_tokens=data["max_new_tokens"])
    for rows in (1, 2, 3):  # alone, a batch plus a remainder, all in one batch
        outs = LLM(str(TINY_MODELS / family), max_num_seqs=rows).generate(prompts, params, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == [c["greedy"] for c in data["cases"]]
    # sampling with a seed reproduces chapter 1's tokens exactly (same logits, same random stream)
    sampled = SamplingParams(temperature=0.8, max_tokens=12, seed=11)
    ours = LLM(str(TINY_MODELS / family)).generate(prompts, sampled, use_tqdm=False)
    theirs = Chapter1(str(TINY_MODELS / family)).generate(prompts, sampled, use_tqdm=False)
    assert [o["token_ids"] for o in ours] == [o["token_ids"] for o in theirs]


def test_kv_cache_memory_buys_whole_rows():
    from chapters.ch02_kv_cache import LLM

    one_row = 256 * 2 * 2 * 2 * 16 * 4  # max_len * (K and V) * layers * kv_heads * head_dim * fp32
    llm = LLM(str(TINY_MODELS / "tiny-llama"), kv_cache_memory=3 * one_row + 100)
    assert llm.cache.k.shape[1] == 3 and llm.cache.nbytes == 3 * one_row
    with pytest.raises(ValueError, match="holds no sequence"):
        LLM(str(TINY_MODELS / "tiny-llama"), kv_cache_memory=one_row - 1)
