"""Chapter 6's replay of a decode step's layers in C (nanovllm/models/decode_step.py): the same bits as the module
path, on every step it covers and only on those, for float32, INT8 and INT4 weights; refused where a layer is not
one it can replay. (Chapter 6 against chapter 5's greedy tokens on every family: tests/test_linear_kernel.py.)"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, TINY_MODELS, require
from nanovllm.kernels import decode_ops
from nanovllm.models.decode_step import DecodeStepPlan, decode_step_unsupported
from nanovllm.sampling_params import SamplingParams

REPLAYABLE = ("tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-mistral-window", "tiny-qwen2", "tiny-phi3")
PROMPTS = [[1] + [(11 * i + 7 * j) % 380 + 3 for j in range(n)] for i, n in enumerate([5, 13, 3, 17, 8, 2, 21])]


@pytest.fixture(autouse=True)
def c_kernels():
    require(decode_ops.decode_ops_unavailable(), "the C decode-step kernels")


def checked_replays(monkeypatch, llm) -> list[int]:
    """Make every replayed step also run the module path on the same input and assert the same bits; returns the
    list that collects each replayed step's number of sequences."""
    replayed, replay = [], DecodeStepPlan.__call__

    def both(plan, x, cos, sin, attn):
        got = replay(plan, x, cos, sin, attn)
        want = x
        for layer in llm.model.model.layers:  # stores the same K/V at the same slots again: harmless
            want = layer(want, cos, sin, attn)
        assert torch.equal(got, want)
        replayed.append(x.shape[1])
        return got

    monkeypatch.setattr(DecodeStepPlan, "__call__", both)
    return replayed


CASES = [(family, None) for family in REPLAYABLE] + [
    ("tiny-llama", "int8"),
    ("tiny-llama", "int4"),
    ("tiny-qwen2", "int8"),
]


@pytest.mark.parametrize("family, quantization", CASES)
def test_replayed_steps_are_the_module_paths_bit_for_bit(monkeypatch, family, quantization):
    from nanovllm import LLM

    llm = LLM(str(TINY_MODELS / family), block_size=4, quantization=quantization, max_num_seqs=4)
    assert llm.model.decode_plan is not None
    replayed = checked_replays(monkeypatch, llm)
    params = [SamplingParams(max_tokens=6 + i % 3, ignore_eos=True, temperature=0) for i in range(len(PROMPTS))]
    llm.generate(PROMPTS, params, use_tqdm=False)
    assert replayed and max(replayed) == 4 and min(replayed) >= 1  # batches of decodes, up to max_num_seqs
    steps_with_decodes = sum(p.max_tokens - 1 for p in params)  # every token after a request's first
    assert sum(replayed) < steps_with_decodes  # some decodes shared a step with a prefill: those were not replayed


@pytest.mark.parametrize("family, quantization", [("tiny-llama", None), ("tiny-qwen2", "int8")])
def test_a_bfloat16_kv_cache_is_replayed_bit_for_bit_too(monkeypatch, family, quantization):
    """kv_cache_dtype='bfloat16': the replay rounds K and V as it stores them, as PyTorch's .to(bfloat16) does, and
    reads them through the bfloat16 attention kernel, as the module path does."""
    from nanovllm import LLM

    llm = LLM(str(TINY_MODELS / family), block_size=4, quantization=quantization, max_num_seqs=4,
              kv_cache_dtype="bfloat16")  # fmt: skip
    assert llm.pool.k.dtype == torch.bfloat16 and llm.model.decode_plan is not None
    replayed = checked_replays(monkeypatch, llm)
    params = [SamplingParams(max_tokens=6 + i % 3, ignore_eos=True, temperature=0) for i in range(len(PROMPTS))]
    llm.generate(PROMPTS, params, use_tqdm=False)
    assert replayed and max(replayed) == 4


def test_only_decode_only_steps_are_replayed(monkeypatch):
    from nanovllm import LLM

    llm = LLM(str(TINY_MODELS / "tiny-llama"), block_size=4)
    replayed = checked_replays(monkeypatch, llm)
    llm.generate([PROMPTS[1]], SamplingParams(max_tokens=5, ignore_eos=True, temperature=0), use_tqdm=False)
    assert replayed == [1] * 4  # the prompt's step is the module path's; the 4 decodes are replayed


@pytest.mark.parametrize("family", FAMILIES)
def test_which_families_are_replayed(family):
    """Llama's layer is (Llama 2/3, Mistral with or without its window, Qwen2's q/k/v bias, Phi-3's partial rotary);
    Gemma's norms, Qwen3's q/k norms, mixtures of experts and GPT-2's layer are not, and say why."""
    from nanovllm import LLM

    llm = LLM(str(TINY_MODELS / family), block_size=4)
    why = decode_step_unsupported(llm.model)
    replayable = family in REPLAYABLE
    assert (llm.model.__dict__.get("decode_plan") is not None) == replayable == (why is None), why
    if not replayable:
        assert isinstance(why, str) and why


def test_chapter5_and_torch_matmuls_have_no_replay():
    from chapters.ch05_triton_attention import LLM as Chapter5
    from nanovllm import LLM

    assert Chapter5(str(TINY_MODELS / "tiny-llama"), block_size=4).model.decode_plan is None
    assert LLM(str(TINY_MODELS / "tiny-llama"), block_size=4, linear_kernel="torch").model.decode_plan is None


def test_a_slot_out_of_the_pool_is_an_error_not_a_write(monkeypatch):
    from nanovllm import LLM

    llm = LLM(str(TINY_MODELS / "tiny-llama"), block_size=4)
    plan, replay = llm.model.decode_plan, DecodeStepPlan.__call__

    def bad_slot(self, x, cos, sin, attn):
        attn.layout.slots.fill_(llm.pool.num_blocks * llm.pool.block_size)  # one past the pool's last slot
        return replay(self, x, cos, sin, attn)

    monkeypatch.setattr(DecodeStepPlan, "__call__", bad_slot)
    assert plan is not None
    with pytest.raises(IndexError, match="out of range"):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)


def test_a_hook_on_a_layer_gets_the_module_path(monkeypatch):
    """A forward hook must see its module run: while one is on any module of a layer, decode steps are not
    replayed (and the tokens are the same)."""
    from nanovllm import LLM

    llm = LLM(str(TINY_MODELS / "tiny-llama"), block_size=4)
    replayed = checked_replays(monkeypatch, llm)
    params = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0)
    want = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0]["token_ids"]
    assert replayed == [1] * 4
    seen = []
    handle = llm.model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(1))
    try:
        got = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0]["token_ids"]
    finally:
        handle.remove()
    assert got == want and len(seen) == 5 and replayed == [1] * 4  # every step ran the module: none was replayed
