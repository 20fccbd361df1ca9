"""Sliding-window attention, soft caps and a layer's own scale (Gemma 2, Mistral) in every engine backend.

The oracles are transformers' own: its mask rule (masking_utils), its eager attention of Gemma 2, and its generate()
on the tiny window models, run here on prompts longer than a KV block (16 tokens) and far longer than the windows.
The chapter tests check the same families on the oracle's shorter prompts; the kernels' own window tests are in
tests/test_kernels.py (C) and tests/test_triton_kernels.py (Triton).
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import TINY_MODELS
from nanovllm.config import ModelConfig
from nanovllm.layers.attention import AttentionSpec, masked_attention, padded_causal_mask, window_mask
from nanovllm.sampling_params import SamplingParams

pytestmark = pytest.mark.ch04


@pytest.mark.parametrize("window", [1, 2, 5, 7, 16])
def test_window_mask_is_transformers_rule(window):
    """A query at p sees p - window + 1 .. p: the boundary key p - window is out, p - window + 1 is in."""
    from transformers.masking_utils import causal_mask_function, sliding_window_overlay

    T = 20
    positions = torch.arange(T)[None]  # (1, T)
    ours = window_mask(padded_causal_mask(positions, T), positions, window)[0]  # (T, T)
    rule = sliding_window_overlay(window)
    theirs = torch.tensor(
        [[causal_mask_function(0, 0, q, kv) and rule(0, 0, q, kv) for kv in range(T)] for q in range(T)]
    )
    assert torch.equal(ours, theirs)
    assert ours.sum(-1).max() == min(window, T)  # every query sees at most `window` keys


@pytest.mark.parametrize("window", [None, 3])
def test_softcapped_scaled_attention_matches_transformers_gemma2(window):
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    gen = torch.Generator().manual_seed(0)
    B, T, Hq, Hkv, D = 2, 9, 4, 2, 16
    q, k, v = (torch.randn(B, T, h, D, generator=gen) * 3 for h in (Hq, Hkv, Hkv))
    spec = AttentionSpec(scale=20**-0.5, window=window, softcap=2.0)
    positions = torch.arange(T)[None].expand(B, T)
    mask = window_mask(padded_causal_mask(positions, T), positions, window)  # (B, T, T)
    ours = masked_attention(q, k, v, mask, spec=spec)

    module = torch.nn.Module()
    module.num_key_value_groups, module.head_dim, module.training = Hq // Hkv, D, False
    additive = torch.zeros(B, 1, T, T).masked_fill(~mask[:, None], float("-inf"))
    theirs, _ = eager_attention_forward(
        module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), additive, scaling=20**-0.5, softcap=2.0
    )  # (B, T, Hq, D)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    plain = masked_attention(q, k, v, mask, spec=AttentionSpec(scale=20**-0.5, window=window))
    assert (plain - theirs).abs().max() > 1e-2  # the cap matters on these scores


def test_a_window_no_longer_caps_the_context():
    cfg = ModelConfig.from_folder(TINY_MODELS / "tiny-mistral-window")
    assert cfg.sliding_window == 7 and cfg.sliding_layers == [0, 1]
    assert cfg.max_model_len == cfg.max_position_embeddings == 256
    gemma2 = ModelConfig.from_folder(TINY_MODELS / "tiny-gemma2")
    assert [gemma2.window_of(i) for i in range(3)] == [5, None, 5]  # transformers: layer i slides when i is even


def transformers_greedy(family: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODELS / family, dtype=torch.float32).eval()
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, pad_token_id=0
            )
        outs.append(out[0, len(prompt) :].tolist())
    return outs


PROMPT_LENGTHS = [40, 23, 3]  # past two blocks of 16, past one, inside the first: all far longer than the windows


@pytest.mark.parametrize("family", ["tiny-gemma2", "tiny-mistral-window"])
@pytest.mark.parametrize("backend", ["torch", "c", "triton"])
def test_every_backend_runs_far_past_the_window(family, backend):
    """Chapter 6's engine (decodes from the static buffers) with blocks of 16: prompts split into chunks of 8 read the
    window across block boundaries through the pool, decodes run 20 tokens past the prompt; tokens are transformers'."""
    from chapters.ch06_cuda_graphs import LLM

    rng = random.Random(5)
    prompts = [[1] + [rng.randint(3, 380) for _ in range(n - 1)] for n in PROMPT_LENGTHS]
    n = 20 if backend != "triton" else 8  # the interpreter is slow
    try:
        llm = LLM(str(TINY_MODELS / family), attention_backend=backend, enforce_eager=False, max_num_batched_tokens=8)
    except ValueError as e:  # no C compiler, no Triton
        pytest.skip(str(e))
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n), use_tqdm=False)
    assert [o["token_ids"] for o in outs] == transformers_greedy(family, prompts, n)
    assert llm.runner.attention.name == backend and llm.runner.graphs.stats["graph_steps"] > 0


@pytest.mark.parametrize(
    "config_cls, extra",
    [
        ("Gemma2Config", dict(num_hidden_layers=5, sliding_window=9)),
        (
            "Gemma2Config",
            dict(num_hidden_layers=4, sliding_window=9, layer_types=["full_attention", "sliding_attention"] * 2),
        ),
        ("Qwen2Config", dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=9, max_window_layers=1)),
        ("Qwen2Config", dict(num_hidden_layers=4, use_sliding_window=False, sliding_window=9)),
        ("MistralConfig", dict(num_hidden_layers=3, sliding_window=9)),
        ("MistralConfig", dict(num_hidden_layers=3, sliding_window=None)),
    ],
)
def test_which_layers_slide_is_transformers_choice(config_cls, extra):
    """The layers that attend within the window, and Gemma 2's defaults, as transformers' configs fill them in."""
    import transformers

    hf = getattr(transformers, config_cls)(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **extra
    )
    hf.architectures = [config_cls.replace("Config", "ForCausalLM")]
    cfg = ModelConfig.from_dict(hf.to_dict())
    theirs = getattr(hf, "layer_types", None) or ["sliding_attention" if hf.sliding_window else "full_attention"] * 3
    expected = [i for i, t in enumerate(theirs) if t == "sliding_attention" and hf.sliding_window]
    assert cfg.sliding_layers == expected
    assert [cfg.window_of(i) for i in range(cfg.num_layers)] == [
        9 if i in expected else None for i in range(cfg.num_layers)
    ]
    if config_cls == "Gemma2Config":
        assert (cfg.query_pre_attn_scalar, cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (
            hf.query_pre_attn_scalar,
            hf.attn_logit_softcapping,
            hf.final_logit_softcapping,
        )
        assert cfg.hidden_act == hf.hidden_activation and cfg.norm_plus_one and cfg.scale_embeddings


@pytest.mark.parametrize(
    "change, match",
    [
        ({"sliding_window": 0}, "sliding_window"),
        ({"sliding_window": "7"}, "sliding_window"),
        ({"layer_types": ["sliding_attention"]}, "layer_types"),
        ({"attn_logit_softcapping": -1.0}, "attn_logit_softcapping"),
        ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar"),
        ({"hidden_activation": "relu"}, "gelu_pytorch_tanh"),
    ],
)
def test_bad_window_and_gemma_fields_are_clear_errors(change, match):
    import json

    from nanovllm.errors import ModelFormatError

    hf = json.loads((TINY_MODELS / "tiny-gemma2" / "config.json").read_text())
    with pytest.raises(ModelFormatError, match=match):
        ModelConfig.from_dict({**hf, **change})
