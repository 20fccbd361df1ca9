"""Chapter 1 exercise tests: each task against an independent oracle, then the whole model against transformers.

Run against your own code with:  pytest --impl=exercises -m ch01 -k task1
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from conftest import FAMILIES, TINY_MODELS

CHAPTER = "ch01"
pytestmark = pytest.mark.ch01


def test_task1_rms_norm_matches_transformers(impl):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) * 3
    ref = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(16) + 0.5)
    torch.testing.assert_close(impl.rms_norm(x, ref.weight.detach(), 1e-5), ref(x).detach())


def test_task1_rms_norm_keeps_dtype_and_is_scale_invariant(impl):
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    w = torch.ones(8, dtype=torch.bfloat16)
    assert impl.rms_norm(x, w, 1e-6).dtype == torch.bfloat16
    x = torch.randn(4, 32)
    w = torch.rand(32)
    torch.testing.assert_close(impl.rms_norm(7.0 * x, w, 0.0), impl.rms_norm(x, w, 0.0))


def test_task2_apply_rotary_matches_transformers(impl):
    torch.manual_seed(1)
    B, T, H, D = 2, 6, 3, 8
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    angles = torch.rand(B, T, D // 2) * 6
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    # transformers' layout is (B, H, T, D)
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    torch.testing.assert_close(impl.apply_rotary(q, cos, sin), ref_q.transpose(1, 2))
    torch.testing.assert_close(impl.apply_rotary(k, cos, sin), ref_k.transpose(1, 2))


def test_task2_rotary_scores_depend_on_relative_position_only(impl):
    from nanovllm.layers.rotary import rope_cos_sin, rope_inv_freq

    torch.manual_seed(2)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    inv_freq = rope_inv_freq(16, 10000.0)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), inv_freq, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), inv_freq, torch.float32)
        return (impl.apply_rotary(q, cq, sq) * impl.apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_task3_silu_and_mul(impl):
    torch.manual_seed(3)
    gate, up = torch.randn(4, 10), torch.randn(4, 10)
    torch.testing.assert_close(impl.silu_and_mul(gate, up), gate * torch.sigmoid(gate) * up)


def reference_attention(q, k, v):
    """Attention written out with explicit loops over heads: softmax(q k^T / sqrt(D) + causal mask) v."""
    B, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    out = torch.empty_like(q)
    mask = torch.ones(T, T).tril().bool()
    for h in range(Hq):
        scores = q[:, :, h] @ k[:, :, h // group].transpose(1, 2) / D**0.5  # (B, T, T)
        scores = scores.masked_fill(~mask, float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ v[:, :, h // group]
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_task4_causal_attention_with_grouped_heads(impl, heads, kv_heads):
    torch.manual_seed(4)
    q = torch.randn(2, 7, heads, 8)
    k, v = torch.randn(2, 7, kv_heads, 8), torch.randn(2, 7, kv_heads, 8)
    torch.testing.assert_close(impl.causal_attention(q, k, v), reference_attention(q, k, v))


def test_task4_attention_never_looks_ahead(impl):
    torch.manual_seed(5)
    q, k, v = torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4)
    before = impl.causal_attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, 4:], v2[:, 4:] = 100.0, -100.0  # change the future
    after = impl.causal_attention(q, k2, v2)
    torch.testing.assert_close(after[:, :4], before[:, :4])


def test_task5_greedy_is_argmax(impl):
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert impl.sample_token(logits, 0.0, torch.Generator().manual_seed(0)) == 1


def test_task5_temperature_sampling_follows_softmax(impl):
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    gen = torch.Generator().manual_seed(0)
    n = 6000
    counts = torch.zeros(5)
    for _ in range(n):
        counts[impl.sample_token(logits, 0.7, gen)] += 1
    expected = torch.softmax(logits / 0.7, -1)
    total_variation = 0.5 * (counts / n - expected).abs().sum()
    assert total_variation < 0.03, (counts / n, expected)


def test_task5_seeded_sampling_repeats(impl):
    logits = torch.randn(50)
    draws = [
        [impl.sample_token(logits, 1.0, g) for _ in range(20)]
        for g in (torch.Generator().manual_seed(3), torch.Generator().manual_seed(3))
    ]
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def load(name: str):
    from nanovllm.utils.loader import load_model

    return load_model(TINY_MODELS / name)


def test_task6_naive_generate_matches_transformers_greedy(impl, oracle):
    from nanovllm.sampling_params import SamplingParams

    m = load("tiny-llama")
    for case in oracle["models"]["tiny-llama"]["cases"]:
        params = SamplingParams(temperature=0.0, max_tokens=oracle["models"]["tiny-llama"]["max_new_tokens"])
        tokens, reason = impl.naive_generate(m.model, case["prompt_ids"], params, m.tokenizer.eos_token_ids, 256)
        assert tokens == case["greedy"]
        assert reason == "length"


def test_task6_naive_generate_stops_at_eos_and_at_the_context_end(impl, oracle):
    from nanovllm.sampling_params import SamplingParams

    m = load("tiny-llama3")
    case = oracle["models"]["tiny-llama3"]["cases"][0]
    assert case["greedy"][-1] == 2, "the oracle case ends with EOS"
    tokens, reason = impl.naive_generate(
        m.model, case["prompt_ids"], SamplingParams(temperature=0, max_tokens=50), [2], 256
    )
    assert (tokens, reason) == (case["greedy"], "stop")
    # ignore_eos keeps going; a context of prompt + 3 ends it
    max_len = len(case["prompt_ids"]) + 3
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    tokens, reason = impl.naive_generate(m.model, case["prompt_ids"], params, [2], max_len)
    assert (len(tokens), reason) == (3, "length")


@pytest.mark.parametrize("family", FAMILIES)
def test_all_tasks_model_matches_transformers(impl, oracle, family):
    """With your pieces patched in, every family's greedy tokens equal transformers' and logits agree."""
    from chapters.ch01_naive import LLM, SamplingParams
    from chapters.ch01_naive.llm import no_cache_attention

    data = oracle["models"][family]
    llm = LLM(str(TINY_MODELS / family))
    prompts = [c["prompt"] for c in data["cases"]]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=data["max_new_tokens"]), use_tqdm=False)
    for case, out in zip(data["cases"], outs):
        assert out["token_ids"] == case["greedy"]
        ids = torch.tensor([case["prompt_ids"]])
        with torch.no_grad():
            hidden = llm.model(ids, torch.arange(ids.shape[1])[None], no_cache_attention)
        logits = llm.model.compute_logits(hidden[0, -1])
        # fp32 tolerance: ours and transformers' differ only in summation order
        torch.testing.assert_close(logits, torch.tensor(case["last_logits"]), atol=1e-4, rtol=0)
