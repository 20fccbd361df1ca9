"""Chapter 5 tests: the engine on the Triton attention backend (the interpreter on a CPU) gives chapter 4's tokens,
which are transformers' greedy tokens, on every family; chapter 5 pins what later chapters add.

The kernels themselves are checked against PyTorch reference attention in tests/test_triton_kernels.py.
"""

from __future__ import annotations

import pytest

from conftest import FAMILIES, TINY_MODELS
from nanovllm.sampling_params import SamplingParams

CHAPTER = "ch05"
pytestmark = pytest.mark.ch05


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_gives_chapter4_tokens_with_chunks_and_cached_prefixes(oracle, family):
    from chapters.ch05_triton_attention import LLM

    # blocks of 4 and a 16-token budget: decodes, first chunks and chunks after cached context share steps
    llm = LLM(str(TINY_MODELS / family), attention_backend="triton", block_size=4, max_num_batched_tokens=16)
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
