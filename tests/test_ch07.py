"""Chapter 7 tests: INT8 and INT4 weight quantization, the quantized linear layer, and the quantized engine's quality
against the full-precision one (perplexity, top-1 agreement) and its weight memory.

Run against your own code with:  pytest --impl=exercises -m ch07 -k task1
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, TINY_MODELS
from nanovllm.layers.linear import Linear
from nanovllm.sampling_params import SamplingParams

CHAPTER = "ch07"
pytestmark = pytest.mark.ch07


def weights(out_features=48, in_features=128, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(out_features, in_features) * torch.linspace(0.01, 3, out_features)[:, None]  # rows of all scales
    w[5] = 0  # a row of zeros
    w[7, 3] = 40.0  # an outlier
    return w


# ---- task 1: INT8 per output channel ---------------------------------------------------------------------


def test_task1_int8_per_channel_round_trips_within_half_a_step(impl):
    from nanovllm.layers.quantization import dequantize_int8

    w = weights()
    q, scale = impl.quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (w.shape[0],)
    assert int(q.abs().max()) == 127 and torch.equal(
        q.abs().amax(1)[scale != 1], torch.full_like(q[:, 0], 127)[scale != 1]
    )
    error = (dequantize_int8(q, scale) - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-6).all()  # rounding to the nearest step
    assert torch.equal(dequantize_int8(q, scale)[5], torch.zeros(w.shape[1]))  # zeros stay zeros
    torch.testing.assert_close(scale, w.abs().amax(1).where(w.abs().amax(1) > 0, torch.tensor(127.0)) / 127)


# ---- task 2: INT4 per group, two values a byte -----------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_task2_int4_groups_pack_two_nibbles_a_byte(impl, group_size):
    from nanovllm.layers.quantization import dequantize_int4

    w = weights()
    packed, scales = impl.quantize_int4(w, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (w.shape[0], w.shape[1] // 2)
    assert scales.shape == (w.shape[0], w.shape[1] // group_size)
    # the layout, checked by hand on one byte: input 2j in the low nibble, 2j + 1 in the high one, each q + 8
    q = torch.round(w[0, :2] / scales[0, 0]).clamp(-8, 7).int() + 8
    assert int(packed[0, 0]) == int(q[0]) | int(q[1]) << 4
    error = (dequantize_int4(packed, scales, group_size) - w).abs()
    step = scales.repeat_interleave(group_size, dim=1)  # (out, in): each weight's group scale
    assert (error <= step / 2 + 1e-6).all()
    # a group's scale comes from its own largest weight: the outlier coarsens its group only
    if scales.shape[1] > 1:
        assert scales[7, 0] > 5 * scales[7, -1]


# ---- task 3: the quantized linear layer -------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 200])
def test_task3_quant_linear_matches_the_dequantized_matmul(impl, scheme, rows):
    linear = Linear(128, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(weights())
        linear.bias.normal_()
    layer = impl.QuantLinear(linear, scheme, 32)
    x = torch.randn(2, rows, 128)
    want = x @ layer.dequantized().T + layer.bias  # the same quantized weights, as a float matmul
    got = layer(x)
    assert got.shape == (2, rows, 48) and got.dtype == x.dtype
    # the kernels also round the activations to int8 (in blocks of 32): a small, bounded error
    torch.testing.assert_close(got, want, atol=0.05 * float(want.abs().max()), rtol=0.0)


# ---- the engine --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_every_family_loads_quantized_and_generates(family, scheme):
    from chapters.ch07_quantization import LLM

    full = LLM(str(TINY_MODELS / family))
    llm = LLM(str(TINY_MODELS / family), quantization=scheme)
    linear = [m for m in llm.model.modules() if type(m).__name__ == "QuantLinear"]
    cfg = llm.config  # qkv and o in each layer, gate_up and down in its MLP or in each of its experts, the lm_head
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    shared = bool(cfg.shared_expert_intermediate_size)  # Qwen2-MoE: a shared expert beside the routed ones
    mlps = cfg.num_layers + moe_layers * (cfg.num_experts + shared - 1)
    assert len(linear) == 2 * cfg.num_layers + 2 * mlps + 1
    routers = [m for m in llm.model.modules() if type(m) is torch.nn.Linear]  # routers and gates stay full precision
    assert len(routers) == moe_layers * (1 + shared)
    assert llm.weight_bytes < full.weight_bytes
    out = llm.generate([[1, 5, 9, 13]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 6


def test_quantized_greedy_tokens_mostly_agree_on_stories260k(stories260k):
    from chapters.ch07_quantization import LLM

    prompts = ["Once upon a time", "Lily and Tom", "The sun was"]
    params = SamplingParams(temperature=0, max_tokens=24)
    full = [o["token_ids"] for o in LLM(str(stories260k)).generate(prompts, params, use_tqdm=False)]
    int8 = [
        o["token_ids"] for o in LLM(str(stories260k), quantization="int8").generate(prompts, params, use_tqdm=False)
    ]
    agree = sum(a == b for f, q in zip(full, int8) for a, b in zip(f, q)) / sum(len(f) for f in full)
    assert agree >= 0.5  # greedy text diverges after the first differing token; the per-token bound is below


@pytest.fixture(scope="module")
def default_quality():
    from benchmarks.quality import heldout_texts, measure

    return {q.scheme: q for q in measure("default", ["int8", "int4"], heldout_texts(12), rows=1)}


def test_int8_keeps_perplexity_within_one_percent_and_top1_at_98(default_quality):
    q = default_quality["int8"]
    assert q.perplexity_change < 0.01 and q.top1_agreement >= 0.98 and q.tokens > 1000
    assert q.linear_bytes <= 0.3 * q.reference_linear_bytes


def test_int4_keeps_perplexity_within_five_percent(default_quality):
    q = default_quality["int4"]
    assert q.perplexity_change < 0.05
    assert q.linear_bytes <= 0.18 * q.reference_linear_bytes


def test_chapters_4_to_6_stay_full_precision():
    from chapters.ch06_cuda_graphs import LLM as Chapter6

    assert Chapter6.pinned["quantization"] is None
    with pytest.raises(TypeError, match="later chapters"):
        Chapter6(str(TINY_MODELS / "tiny-llama"), quantization="int8")


def test_bad_quantization_names_the_choices():
    from chapters.ch07_quantization import LLM

    with pytest.raises(ValueError, match="quantization must be"):
        LLM(str(TINY_MODELS / "tiny-llama"), quantization="int3")
    with pytest.raises(ValueError, match="multiple of 128: choose a smaller group"):
        LLM("default", quantization="int4-g128")  # hidden 192 is no multiple of 128
    from nanovllm.layers.quantization import QuantLinear

    with pytest.raises(ValueError, match="multiple of 32: no INT4 group fits; use int8"):  # no smaller group to name
        QuantLinear(torch.nn.Linear(48, 8), "int4", 32)
