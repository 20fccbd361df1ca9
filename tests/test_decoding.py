"""Decoding strategies of the final engine: n and best_of candidates that share the prompt's KV blocks, each with its
own random stream, and log-probabilities checked against transformers. (Beam search: tests/test_beam_search.py.)"""

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


def test_n4_on_a_200_token_prompt_prefills_once_and_adds_at_most_4_blocks():
    """The issue's measure, from the block manager: n=4 candidates on a 200-token prompt compute it once, and after
    their first tokens hold the prompt's 12 full blocks (shared by all 4) plus one last block each."""
    from nanovllm import LLM

    llm = LLM(MODEL, block_size=16, enable_prefix_caching=False)
    prompt = [1] + [(7 * j) % 380 + 3 for j in range(199)]
    bm, shared = llm.block_manager, -(-200 // 16)  # 13 blocks: 12 full, the last one half full
    rid = llm.add_request(prompt, SamplingParams(temperature=0.8, max_tokens=4, n=4, seed=5, ignore_eos=True))
    llm.step()  # the prompt once, then 4 first tokens
    llm.step()  # each candidate writes its token into the shared half-full block: copy on write
    assert llm.stats["prefill_tokens"] == 200
    tables = [llm.requests[m].block_table for m in llm.groups[rid]]
    assert len(tables) == 4 and all(t[:12] == tables[0][:12] for t in tables)
    assert all(bm.blocks[b].ref_count == 4 for b in tables[0][:12])
    in_use = bm.num_blocks - bm.num_free_blocks
    assert shared < in_use <= shared + 4  # 12 shared + 4 own last blocks (13 + 3 here)
    while llm.has_unfinished():
        llm.step()
    llm.release(rid)
    assert idle(llm)


# ---- logit_bias, allowed_token_ids, prompt_logprobs ------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_logprobs():
    """transformers' log_softmax at every position of a token list (fp32): the oracle."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)

    return logprobs


NEIGHBOUR = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=21)


def with_neighbour(llm, params: SamplingParams) -> tuple[dict, dict]:
    """(this request's result, a seeded neighbour's) from one batch: the neighbour must not notice."""
    prompt = [1, 9, 8, 7, 6, 5]
    mine, theirs = llm.generate([PROMPT, prompt], [params, NEIGHBOUR], use_tqdm=False)
    alone = llm.generate([prompt], NEIGHBOUR, use_tqdm=False)[0]
    assert theirs["token_ids"] == alone["token_ids"]
    return mine, theirs


def test_a_large_negative_bias_on_the_argmax_picks_transformers_runner_up(llm, hf_logprobs):
    first, second = hf_logprobs(PROMPT)[-1].topk(2).indices.tolist()
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    assert plain["token_ids"] == [first]
    params = SamplingParams(temperature=0, max_tokens=1, logit_bias={first: -100.0}, logprobs=1)
    mine, _ = with_neighbour(llm, params)
    assert mine["token_ids"] == [second]
    # logprobs stay the model's own distribution (vLLM's raw_logprobs): the bias does not enter them
    raw = hf_logprobs(PROMPT)[-1]
    assert mine["logprobs"][0]["logprob"] == pytest.approx(float(raw[second]), abs=1e-4)
    assert mine["logprobs"][0]["top"][0][0] == first
    assert idle(llm)


def test_a_positive_bias_adds_to_the_logit_before_the_argmax(llm, hf_logprobs):
    raw = hf_logprobs(PROMPT)[-1]
    order = raw.argsort(descending=True).tolist()
    third, gap = order[2], float(raw[order[0]] - raw[order[2]])  # log-softmax differences are logit differences
    below = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, logit_bias={third: gap - 0.05}),
                         use_tqdm=False)[0]  # fmt: skip
    above = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, logit_bias={third: gap + 0.05}),
                         use_tqdm=False)[0]  # fmt: skip
    assert below["token_ids"] == [order[0]] and above["token_ids"] == [third]


def test_allowed_token_ids_restrict_every_token_and_nothing_else(llm, hf_logprobs):
    allowed = [5, 77, 150, 301]
    mine, _ = with_neighbour(llm, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=4,
                                                 allowed_token_ids=allowed))  # fmt: skip
    assert len(mine["token_ids"]) == 12 and set(mine["token_ids"]) <= set(allowed)
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, allowed_token_ids=allowed),
                          use_tqdm=False)[0]  # fmt: skip
    raw = hf_logprobs(PROMPT)[-1]
    assert greedy["token_ids"] == [max(allowed, key=lambda t: float(raw[t]))]
    assert idle(llm)


def test_prompt_logprobs_match_transformers_with_a_neighbour(llm, hf_logprobs):
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    mine, _ = with_neighbour(llm, params)
    check_prompt_logprobs(mine["prompt_logprobs"], PROMPT, hf_logprobs(PROMPT), 3)


def check_prompt_logprobs(got: list, prompt: list[int], want: torch.Tensor, k: int) -> None:
    """vLLM's shape: None for the first token, then each token's logprob and its top k, against transformers."""
    assert len(got) == len(prompt) and got[0] is None
    for p in range(1, len(prompt)):
        row = want[p - 1]  # position p - 1's logits score token p
        assert got[p]["logprob"] == pytest.approx(float(row[prompt[p]]), abs=1e-4)
        top = row.topk(k)
        assert [t for t, _ in got[p]["top"]] == top.indices.tolist()
        assert [v for _, v in got[p]["top"]] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_prompt_logprobs_chunk_by_chunk_and_past_the_prefix_cache(hf_logprobs):
    """Chunks of 6 tokens over blocks of 4; the prompt's prefix is already cached, and the request skips the cache
    (as vLLM does: cached blocks have no logits), so it computes every prompt token and still gets them all."""
    from nanovllm import LLM

    llm = LLM(MODEL, block_size=4, max_num_batched_tokens=6)
    prompt = [1] + [(11 * j) % 380 + 3 for j in range(22)]  # 23 tokens: four chunks
    llm.generate([prompt[:17]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)  # 4 blocks cached
    before = llm.stats["prefill_tokens"]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=2, n=2)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert llm.stats["prefill_tokens"] - before == len(prompt)  # no cache hit, and one prefill for both candidates
    check_prompt_logprobs(out["prompt_logprobs"], prompt, hf_logprobs(prompt), 2)
    again = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]  # now it may hit
    assert llm.stats["prefill_tokens"] - before < 2 * len(prompt) and again["token_ids"] == out["token_ids"][:1]
    assert idle(llm)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"logit_bias": {5: 101.0}}, r"logit_bias\[5\] must be in \[-100"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias.*finite"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias keys"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias keys"),
        ({"logit_bias": [(5, 1.0)]}, "logit_bias must be a dict"),
        ({"allowed_token_ids": []}, "allowed_token_ids must be a non-empty list"),
        ({"allowed_token_ids": [1.5]}, "allowed_token_ids must be an integer"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ],
)
def test_bad_bias_allowed_and_prompt_logprobs_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


@pytest.mark.parametrize("options", [{"logit_bias": {100_000: 1.0}}, {"allowed_token_ids": [3, 100_000]}])
def test_token_ids_outside_the_vocabulary_are_refused_before_anything_runs(llm, options):
    name = next(iter(options))
    with pytest.raises(ValueError, match=f"{name} has token ids \\[100000\\] outside the vocabulary"):
        llm.generate([PROMPT], SamplingParams(**options), use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.add_request(PROMPT, SamplingParams(**options))
    assert idle(llm)


@pytest.mark.parametrize("options", [{"logit_bias": {5: 1.0}}, {"allowed_token_ids": [5]}, {"prompt_logprobs": 1}])
def test_earlier_chapters_refuse_bias_allowed_and_prompt_logprobs(options):
    from chapters.ch03_paged_kv import LLM

    with pytest.raises(ValueError, match=next(iter(options))):
        LLM(MODEL).generate([PROMPT], SamplingParams(**options), use_tqdm=False)


def test_prompt_logprobs_survive_preemption(hf_logprobs):
    """A pool too small for every request at once and a small token budget: prompts are cut into chunks, and
    requests are preempted (mid-prompt too) and recomputed; each prompt's logprobs still come out whole, as
    transformers computes them, and the generated tokens are each request's lone-run tokens."""
    from nanovllm import LLM
    from nanovllm.config import ModelConfig
    from nanovllm.engine.kv_cache import KVPool

    cfg = ModelConfig.from_folder(MODEL)
    block = KVPool.bytes_per_block(cfg.num_layers, 4, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    llm = LLM(MODEL, block_size=4, kv_cache_memory=12 * block, max_num_batched_tokens=4, max_num_seqs=4)
    mid_prompt, preempt = [], llm.scheduler.preempt

    def spy(seq):  # preempted with some, not all, of its prompt logprobs
        mid_prompt.append(1 < len(seq.prompt_logprobs or ()) < seq.num_prompt_tokens)
        preempt(seq)

    llm.scheduler.preempt = spy
    prompts = [[1] + [(m * j) % 380 + 3 for j in range(14 + m)] for m in (3, 5, 7, 11)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert any(mid_prompt)
    for prompt, out in zip(prompts, outs):
        check_prompt_logprobs(out["prompt_logprobs"], prompt, hf_logprobs(prompt), 1)
        lone = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        assert out["token_ids"] == lone[0]["token_ids"]
    assert idle(llm)


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_prompt_logprobs_one_token_a_step_also_through_the_decode_graphs(hf_logprobs, enforce_eager):
    """A budget of one token: each prompt token is a step of its own, which the decode graphs run (chapter 6)."""
    from nanovllm import LLM

    llm = LLM(MODEL, block_size=4, max_num_batched_tokens=1, enforce_eager=enforce_eager)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0), use_tqdm=False)[0]
    check_prompt_logprobs(out["prompt_logprobs"], PROMPT, hf_logprobs(PROMPT), 0)
    assert enforce_eager or llm.runner.graphs.stats["graph_steps"] >= len(PROMPT)


def test_allowed_ids_that_min_tokens_bans_entirely_are_refused(llm):
    eos = llm.tokenizer.eos_token_ids[0]
    params = SamplingParams(min_tokens=2, allowed_token_ids=[eos, 7], stop_token_ids=[7])
    with pytest.raises(ValueError, match="allowed_token_ids .* are all EOS or stop ids, which min_tokens=2 bans"):
        llm.generate([PROMPT], params, use_tqdm=False)
    fine = SamplingParams(temperature=0, max_tokens=3, min_tokens=2, allowed_token_ids=[eos, 7], ignore_eos=True)
    tokens = llm.generate([PROMPT], fine, use_tqdm=False)[0]["token_ids"]  # ignore_eos: EOS is not banned
    assert len(tokens) == 3 and set(tokens) <= {eos, 7} and idle(llm)
