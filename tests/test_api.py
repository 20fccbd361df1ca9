"""The public contract every chapter keeps: LLM(model).generate(prompts, sampling_params) and its clear errors."""

from __future__ import annotations

import pytest

from conftest import TINY_MODELS
from nanovllm.errors import PromptTooLongError
from nanovllm.sampling_params import SamplingParams

pytestmark = pytest.mark.ch01


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("temperature", -0.1, "temperature"),
        ("temperature", "hot", "temperature"),
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", 2.5, "max_tokens"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -2, "top_k"),
        ("min_p", 1.5, "min_p"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("presence_penalty", 3.0, "presence_penalty"),
        ("frequency_penalty", -2.5, "frequency_penalty"),
        ("min_tokens", -1, "min_tokens"),
        ("seed", 1.5, "seed"),
        ("stop", [""], "stop"),
        ("stop_token_ids", [-1], "stop_token_ids"),
    ],
)
def test_impossible_sampling_parameters_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=3)


@pytest.fixture(scope="module")
def llm():
    from chapters.ch01_naive import LLM

    return LLM(str(TINY_MODELS / "tiny-llama"))


def test_prompts_as_text_or_ids_with_one_or_many_params(llm, oracle):
    case = oracle["models"]["tiny-llama"]["cases"]
    greedy = SamplingParams(temperature=0.0, max_tokens=5)
    by_text = llm.generate([case[0]["prompt"], case[1]["prompt"]], greedy, use_tqdm=False)
    by_ids = llm.generate([case[0]["prompt_ids"], case[1]["prompt_ids"]], [greedy, greedy], use_tqdm=False)
    assert [o["token_ids"] for o in by_text] == [o["token_ids"] for o in by_ids] == [c["greedy"][:5] for c in case[:2]]
    assert all(set(o) >= {"text", "token_ids", "finish_reason"} for o in by_text)
    # a single prompt (not in a list) is accepted too
    assert llm.generate(case[0]["prompt"], greedy, use_tqdm=False)[0]["token_ids"] == case[0]["greedy"][:5]
    # per-prompt params apply to their own prompt, in order
    outs = llm.generate(
        [case[0]["prompt"]] * 2, [SamplingParams(temperature=0, max_tokens=n) for n in (2, 4)], use_tqdm=False
    )
    assert [len(o["token_ids"]) for o in outs] == [2, 4]


def test_text_is_the_decoded_continuation(llm):
    out = llm.generate(["The cat"], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    full = llm.tokenizer.decode(llm.tokenizer.encode("The cat") + out["token_ids"])
    assert full == "The cat" + out["text"]


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=7)
    a = llm.generate(["Once"], params, use_tqdm=False)[0]["token_ids"]
    b = llm.generate(["Once"], params, use_tqdm=False)[0]["token_ids"]
    c = llm.generate(["Once"], SamplingParams(temperature=1.0, max_tokens=12, seed=8), use_tqdm=False)[0]["token_ids"]
    assert a == b and a != c


def test_prompt_longer_than_the_context_is_a_clear_error(llm):
    with pytest.raises(PromptTooLongError, match="256"):
        llm.generate([[5] * 300], SamplingParams(max_tokens=1), use_tqdm=False)


def test_bad_prompts_and_mismatched_params(llm):
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([[]], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 99999]], SamplingParams(), use_tqdm=False)
    with pytest.raises(TypeError, match="prompt"):
        llm.generate([3.5], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)


def test_chapter1_refuses_sampling_it_does_not_implement(llm):
    with pytest.raises(ValueError, match="top_p"):
        llm.generate(["a"], SamplingParams(top_p=0.5), use_tqdm=False)
    with pytest.raises(ValueError, match="min_tokens"):
        llm.generate(["a"], SamplingParams(min_tokens=2), use_tqdm=False)


def test_generation_stops_at_the_context_end(oracle):
    from chapters.ch01_naive import LLM

    small = LLM(str(TINY_MODELS / "tiny-llama"), max_model_len=10)
    out = small.generate([[1, 5, 6, 7]], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 6 and out[0]["finish_reason"] == "length"
