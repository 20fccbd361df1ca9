"""Decoding strategies of the final engine: n and best_of candidates that share the prompt's KV blocks, each with its
own random stream, and log-probabilities checked against transformers. (Beam search is still to come.)"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_MODELS
from nanovllm.sampling_params import SamplingParams

MODEL = str(TINY_MODELS / "tiny-llama")
PROMPT = [1, 17, 45, 88, 203, 9, 311, 42, 7, 150]  # 10 tokens: with blocks of 4, the last block is shared partly full


@pytest.fixture(scope="module")
def llm():
    from nanovllm import LLM

    return LLM(MODEL, block_size=4)


def idle(llm) -> bool:
    return not llm.requests and not llm.groups and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_n_greedy_candidates_share_one_prefill_and_equal_the_single_answer(llm):
    prompt = [1, *PROMPT[:0:-1]]  # a prompt no earlier test has put in the prefix cache
    before = llm.stats["prefill_tokens"]
    three = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, n=3), use_tqdm=False)
    assert llm.stats["prefill_tokens"] - before == len(prompt)  # the prompt is computed once, not three times
    one = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    outputs = three[0]["outputs"]
    assert len(outputs) == 3 and all(o["token_ids"] == one["token_ids"] for o in outputs)
    assert three[0]["token_ids"] == one["token_ids"] and idle(llm)


def test_candidates_share_the_prompts_blocks(llm):
    rid = llm.add_request(PROMPT, SamplingParams(temperature=0.8, max_tokens=6, n=3, seed=1))
    llm.step()  # the prompt, then three first tokens
    members = llm.groups[rid]
    tables = [llm.requests[m].block_table for m in members]
    assert len(members) == 3 and tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert all(llm.block_manager.blocks[b].ref_count == 3 for b in tables[0][:2])
    while llm.has_unfinished():
        llm.step()
    llm.release(rid)
    assert idle(llm)


def test_each_seeded_candidate_is_a_lone_request_with_its_own_seed(llm):
    params = dict(temperature=1.0, top_k=50, max_tokens=8, ignore_eos=True)
    group = llm.generate([PROMPT], SamplingParams(**params, n=3, seed=11), use_tqdm=False)[0]["outputs"]
    alone = [llm.generate([PROMPT], SamplingParams(**params, seed=11 + j), use_tqdm=False)[0] for j in range(3)]
    assert sorted(o["token_ids"] for o in group) == sorted(a["token_ids"] for a in alone)
    again = llm.generate([PROMPT], SamplingParams(**params, n=3, seed=11), use_tqdm=False)[0]["outputs"]
    assert [o["token_ids"] for o in again] == [o["token_ids"] for o in group]


def test_best_of_returns_the_n_most_likely_candidates(llm):
    params = SamplingParams(temperature=1.2, max_tokens=8, ignore_eos=True, n=2, best_of=5, seed=3)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    scores = [o["cumulative_logprob"] for o in out["outputs"]]
    assert len(scores) == 2 and scores[0] >= scores[1] and out["cumulative_logprob"] == scores[0]
    every = llm.generate([PROMPT], SamplingParams(temperature=1.2, max_tokens=8, ignore_eos=True, n=5, seed=3),
                         use_tqdm=False)[0]["outputs"]  # fmt: skip
    assert scores == sorted((o["cumulative_logprob"] for o in every), reverse=True)[:2]
    assert idle(llm)


def test_logprobs_match_transformers(llm):
    from transformers import AutoModelForCausalLM

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT + out["token_ids"]])
    with torch.no_grad():
        expected = hf(ids).logits[0].log_softmax(-1)  # (T, V)
    for k, (token, got) in enumerate(zip(out["token_ids"], out["logprobs"])):
        want = expected[len(PROMPT) - 1 + k]
        assert got["logprob"] == pytest.approx(float(want[token]), abs=1e-4)
        top = want.topk(3)
        assert [t for t, _ in got["top"]] == top.indices.tolist()
        assert [v for _, v in got["top"]] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert out["cumulative_logprob"] == pytest.approx(sum(g["logprob"] for g in out["logprobs"]), abs=1e-4)


@pytest.mark.parametrize(
    "options, field", [({"n": 0}, "n"), ({"n": 3, "best_of": 2}, "best_of"), ({"logprobs": 21}, "logprobs")]
)
def test_impossible_candidate_settings_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**options)


def test_earlier_chapters_refuse_candidates_and_logprobs():
    from chapters.ch03_paged_kv import LLM

    with pytest.raises(ValueError, match="final engine"):
        LLM(MODEL).generate([PROMPT], SamplingParams(n=2), use_tqdm=False)
