"""The default model that ships in the package: small, loadable by short name, an oracle case, and really trained."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections import Counter

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.ch01

FOLDER = ROOT / "nanovllm" / "assets" / "default"
PROMPTS = ["Once upon a time", "One day, Tom and his dog went to the park.", 'Lily said, "Look!']


def storygen():
    """tools/storygen.py, the generator of the model's corpus (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("storygen", ROOT / "tools" / "storygen.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["storygen"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llm():
    from chapters.ch01_naive import LLM

    return LLM("default")


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()


def test_folder_is_a_small_hugging_face_model_folder():
    names = {p.name for p in FOLDER.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "MODEL_CARD.md",
        "loss_curve.png",
    ):
        assert required in names
    assert sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file()) <= 10 * 1024 * 1024
    config = json.loads((FOLDER / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention


def last_logits(llm, ids: list[int]) -> torch.Tensor:
    from chapters.ch01_naive.llm import no_cache_attention

    with torch.no_grad():
        hidden = llm.model(torch.tensor([ids]), torch.arange(len(ids))[None], no_cache_attention)
        return llm.model.compute_logits(hidden[0, -1])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_transformers_agrees_with_the_engine(llm, hf_model, prompt):
    from chapters.ch01_naive import SamplingParams

    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    ids = torch.tensor([llm.tokenizer.encode(prompt)])
    with torch.no_grad():
        expected = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=len(out["token_ids"]),
            pad_token_id=0,
        )
        hf_logits = hf_model(ids).logits[0, -1]
    assert out["token_ids"] == expected[0, ids.shape[1] :].tolist()
    torch.testing.assert_close(last_logits(llm, ids[0].tolist()), hf_logits, atol=1e-4, rtol=0)


def test_greedy_story_stops_at_eos(llm):
    from chapters.ch01_naive import SamplingParams

    out = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=240), use_tqdm=False)[0]
    assert out["finish_reason"] == "stop"
    assert out["token_ids"][-1] in llm.tokenizer.eos_token_ids
    assert out["text"].rstrip().endswith((".", "!", '"'))
    assert len(out["text"].split()) > 30  # a whole little story, not a sentence


def test_heldout_loss_is_far_below_the_unigram_baseline(llm):
    from chapters.ch01_naive.llm import no_cache_attention

    """Fresh stories (a stream not used in training): the model's loss vs the unigram baseline of the same tokens."""
    gen = storygen()
    tok, eos = llm.tokenizer, llm.tokenizer.eos_token_ids[0]
    counted = [tok.encode(text) + [eos] for text in gen.stories(1500, seed=0)]  # the training stream's start
    fresh = [tok.encode(text) + [eos] for text in gen.stories(24, seed=424242)]
    counts = Counter(t for ids in counted for t in ids[1:])
    total = sum(counts.values()) + llm.config.vocab_size
    unigram = -sum(math.log((counts[t] + 1) / total) for ids in fresh for t in ids[1:])
    nll = 0.0
    for ids in fresh:
        with torch.no_grad():
            hidden = llm.model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], no_cache_attention)
            logits = llm.model.compute_logits(hidden[0])
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
    n = sum(len(ids) - 1 for ids in fresh)
    model_loss, unigram_loss = nll / n, unigram / n
    assert model_loss < 0.2 * unigram_loss  # measured: about 0.07x
    recorded = json.loads((FOLDER / "training.json").read_text())["metrics"]
    assert abs(model_loss - recorded["heldout_loss"]) < 0.15 * recorded["heldout_loss"]
