"""Mixture of experts (models/moe.py): the grouped block against transformers' block and a token-by-token loop."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import TINY_MODELS
from nanovllm.config import ModelConfig
from nanovllm.errors import ModelFormatError
from nanovllm.models.moe import SparseMoeBlock, checkpoint_names

pytestmark = pytest.mark.ch01

FAMILY_BLOCKS = {  # transformers' module, block class and config class, and config values
    "mixtral": ("mixtral", "MixtralSparseMoeBlock", "MixtralConfig", dict(num_local_experts=8)),
    "qwen3-moe": ("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig", dict(moe_intermediate_size=40)),
    "qwen2-moe": (  # with a shared expert, and top-k weights not renormalised
        "qwen2_moe",
        "Qwen2MoeSparseMoeBlock",
        "Qwen2MoeConfig",
        dict(moe_intermediate_size=40, shared_expert_intermediate_size=24, norm_topk_prob=False),
    ),
}


def blocks(family: str, idle: int = 3, seed: int = 0):
    """Our block and transformers' with the same random weights, and tokens that leave the last `idle` experts
    without a single token (their router rows point away from every token)."""
    import importlib

    module, block_cls, config_cls, extra = FAMILY_BLOCKS[family]
    hf_module = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    hf_config = getattr(importlib.import_module("transformers"), config_cls)(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_experts_per_tok=2,
        **extra,
    )
    hf_config._experts_implementation = "eager"  # transformers' own loop over the experts that received tokens
    theirs = getattr(hf_module, block_cls)(hf_config).eval()
    cfg = ModelConfig.from_dict(
        {**hf_config.to_dict(), "architectures": [config_cls.replace("Config", "ForCausalLM")], "vocab_size": 16}
    )
    ours = SparseMoeBlock(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    E, size = cfg.num_experts, cfg.moe_intermediate_size
    with torch.no_grad():
        gate = torch.randn(E, 32, generator=gen).abs()
        gate[E - idle :] *= -1  # tokens are positive: these experts score lowest for every one of them
        theirs.gate.weight.copy_(gate)
        theirs.experts.gate_up_proj.copy_(torch.randn(E, 2 * size, 32, generator=gen) * 0.2)
        theirs.experts.down_proj.copy_(torch.randn(E, 32, size, generator=gen) * 0.2)
        ours.gate.weight.copy_(gate)
        for e, expert in enumerate(ours.experts):
            expert.gate_proj.weight.copy_(theirs.experts.gate_up_proj[e, :size])
            expert.up_proj.weight.copy_(theirs.experts.gate_up_proj[e, size:])
            expert.down_proj.weight.copy_(theirs.experts.down_proj[e])
        if ours.shared_expert is not None:
            ours.shared_expert.load_state_dict(theirs.shared_expert.state_dict())
            ours.shared_expert_gate.weight.copy_(theirs.shared_expert_gate.weight * 20)  # gates well away from 1/2
            theirs.shared_expert_gate.weight.copy_(ours.shared_expert_gate.weight)
    x = torch.rand(3, 7, 32, generator=gen)  # (B, T, H): 21 tokens, all positive
    return ours, theirs, x


def token_by_token(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The slow way: each token alone, its chosen experts one after another."""
    rows = x.reshape(-1, x.shape[-1])  # (N, H)
    out = torch.zeros_like(rows)
    for i, row in enumerate(rows):
        probs = torch.softmax(block.gate(row).float(), dim=-1)
        weights, chosen = probs.topk(block.top_k)
        if block.normalize:
            weights = weights / weights.sum()
        for w, e in zip(weights.tolist(), chosen.tolist()):
            out[i] += w * block.experts[e](row)
    return (out + shared_part(block, rows)).view(x.shape)


def shared_part(block: SparseMoeBlock, rows: torch.Tensor) -> torch.Tensor:
    """Qwen2-MoE's shared expert, scaled by its sigmoid gate (0 for the families without one)."""
    if block.shared_expert is None:
        return torch.zeros_like(rows)
    return torch.sigmoid(block.shared_expert_gate(rows)) * block.shared_expert(rows)


@pytest.mark.parametrize("family", FAMILY_BLOCKS)
def test_grouped_experts_equal_transformers_and_a_token_by_token_loop(family):
    ours, theirs, x = blocks(family)
    with torch.no_grad():
        chosen = ours.gate(x.reshape(-1, 32)).topk(2).indices
        got, expected, slow = ours(x), theirs(x), token_by_token(ours, x)
        rows = x.reshape(-1, 32)  # (N, H)
        dense = (ours.dense(rows, *ours_route(ours, x)) + shared_part(ours, rows)).view(x.shape)
    used = set(chosen.flatten().tolist())
    assert len(used) < ours.num_experts - 2  # some experts received no token this step
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, slow, atol=1e-5, rtol=0)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=0)  # the CUDA-graph path, run here on the CPU


def ours_route(block: SparseMoeBlock, x: torch.Tensor):
    from nanovllm.models.moe import route

    weights, experts = route(block.gate(x.reshape(-1, x.shape[-1])), block.top_k, block.normalize)
    return weights.to(x.dtype), experts


def test_each_expert_runs_once_a_step_on_its_whole_group():
    """64 decode rows with top-2 are 128 (token, expert) pairs, but at most one matmul per expert that got any."""
    ours, _, _ = blocks("qwen3-moe", idle=2)
    calls: list[int] = []
    for expert in ours.experts:
        expert.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x = torch.rand(64, 1, 32)  # (B, 1, H): a step of 64 decodes
    with torch.no_grad():
        ours(x)
    assert len(calls) <= ours.num_experts - 2  # the two idle experts never ran
    assert sum(calls) == 64 * 2  # every (token, expert) pair computed exactly once


def test_mixtral_checkpoint_names_map_onto_the_expert_modules():
    t = torch.zeros(1)
    names = checkpoint_names(
        {
            "model.layers.3.block_sparse_moe.gate.weight": t,
            "model.layers.3.block_sparse_moe.experts.11.w1.weight": t,
            "model.layers.3.block_sparse_moe.experts.11.w2.weight": t,
            "model.layers.3.block_sparse_moe.experts.11.w3.weight": t,
            "model.layers.3.mlp.experts.2.up_proj.weight": t,  # Qwen's names are ours already
        }
    )
    assert sorted(names) == [
        "model.layers.3.mlp.experts.11.down_proj.weight",
        "model.layers.3.mlp.experts.11.gate_proj.weight",
        "model.layers.3.mlp.experts.11.up_proj.weight",
        "model.layers.3.mlp.experts.2.up_proj.weight",
        "model.layers.3.mlp.gate.weight",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_local_experts": 0}, "num_local_experts"),
        ({"num_experts_per_tok": 5}, r"num_experts_per_tok' must be an integer in 1\.\.4"),
        ({"num_experts_per_tok": None}, "num_experts_per_tok"),
    ],
)
def test_bad_expert_counts_are_clear_errors(tmp_path, change, message):
    from nanovllm.utils.loader import load_model

    folder = tmp_path / "m"
    shutil.copytree(TINY_MODELS / "tiny-mixtral", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ModelFormatError, match=message):
        load_model(folder)


def test_a_missing_expert_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from nanovllm.utils.loader import load_model

    folder = tmp_path / "m"
    shutil.copytree(TINY_MODELS / "tiny-mixtral", folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelFormatError, match=r"missing tensors.*layers\.1\.mlp\.experts\.2\.up_proj"):
        load_model(folder)


def test_quantized_experts_stay_close_to_full_precision():
    """Chapter 7 quantizes every expert, not the router: on the same input the INT8 block routes exactly as the fp32
    one (so a near-tie cannot flip here) and its output differs by the weights' rounding only."""
    from nanovllm.layers.quantization import QuantLinear
    from nanovllm.utils.loader import load_model

    full, int8 = load_model(TINY_MODELS / "tiny-mixtral"), load_model(TINY_MODELS / "tiny-mixtral", quantization="int8")
    x = torch.randn(16, 1, 64, generator=torch.Generator().manual_seed(0))  # (B, 1, H) a step of 16 decodes
    for a, b in zip(full.model.model.layers, int8.model.model.layers):
        assert all(isinstance(e.down_proj, QuantLinear) for e in b.mlp.experts)
        assert type(b.mlp.gate) is torch.nn.Linear and torch.equal(a.mlp.gate.weight, b.mlp.gate.weight)
        with torch.no_grad():
            want, got = a.mlp(x), b.mlp(x)
        assert 0 < (want - got).abs().max() < 0.05 * want.abs().max()  # a wrong expert or weight: ~100%


def test_benchmark_mixtral_builds_loads_and_counts_its_parameters(tmp_path, monkeypatch):
    """The benchmark's Mixtral-shaped random model (mixtral-tiny's recipe, smaller): built by transformers, loaded
    by us, every parameter counted (routers and experts included)."""
    from benchmarks import models
    from nanovllm.utils.loader import load_model

    spec = models.ModelSpec("mixtral-test", "tiny", models.mixtral(32, 2, 2, 1, 64, 4, 2, 300))
    monkeypatch.setitem(models.MODELS, spec.name, spec)
    loaded = load_model(models.resolve_model(spec.name, cache=tmp_path).path)
    assert all(type(layer.mlp) is SparseMoeBlock for layer in loaded.model.model.layers)
    assert sum(p.numel() for p in loaded.model.parameters()) == models.param_count(spec.config)
