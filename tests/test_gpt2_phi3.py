"""GPT-2 and Phi-3 beyond the shared parity tests: positions past GPT-2's table, Phi-3's longrope crossing its
original context (against transformers run token by token), checkpoint layouts, and bad configs."""

from __future__ import annotations

import json
import random
import shutil
import warnings

import pytest
import torch

from conftest import TINY_MODELS
from nanovllm.config import ARCHITECTURES, ModelConfig
from nanovllm.errors import ModelFormatError, PromptTooLongError, UnsupportedArchitectureError
from nanovllm.models import DecoderForCausalLM, GPT2ForCausalLM, model_class
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.loader import load_model

pytestmark = pytest.mark.ch01


def random_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randint(3, 380) for _ in range(n - 1)]


def hf_model(family: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY_MODELS / family, dtype=torch.float32).eval()


@torch.no_grad()
def hf_stepwise(model, prompt: list[int], new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """transformers' model fed one token a forward call, with its KV cache (no generate(): that one recomputes
    Phi-3's cache when a sequence crosses original_max_position_embeddings). Returns each position's logits
    (prompt and generated) and the greedy tokens."""
    from transformers import DynamicCache

    cache, logits, tokens = DynamicCache(), [], list(prompt)
    for p in range(len(prompt) + new_tokens - 1):
        ids = torch.tensor([[tokens[p]]])
        with warnings.catch_warnings():  # transformers 5 renames past_key_values (cache); 4 knows only this name
            warnings.simplefilter("ignore", FutureWarning)
            out = model(input_ids=ids, position_ids=torch.tensor([[p]]), past_key_values=cache, use_cache=True)
        logits.append(out.logits[0, -1])
        if p >= len(prompt) - 1:
            tokens.append(int(out.logits[0, -1].argmax()))
    return torch.stack(logits), tokens[len(prompt) :]


# ---- Phi-3: longrope past original_max_position_embeddings -------------------------------------------------


def test_phi3_longrope_crossing_matches_transformers_token_by_token():
    """A 70-token sequence crosses original_max_position_embeddings (48): every position's logits from one
    forward of ours (no cache) equal transformers' from a cached run one token at a time, and the long factors
    matter there (with the short ones everywhere the logits past 48 are wrong)."""
    from chapters.ch01_naive.llm import no_cache_attention

    model = load_model(TINY_MODELS / "tiny-phi3").model
    assert model.config.rope_scaling["original_max_position_embeddings"] == 48
    ids = random_prompt(70, seed=3)
    expected, _ = hf_stepwise(hf_model("tiny-phi3"), ids, 1)
    with torch.no_grad():
        got = model.compute_logits(model(torch.tensor([ids]), torch.arange(70)[None], no_cache_attention))[0]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        model.inv_freq[1] = model.inv_freq[0]  # long factors := short ones
        short = model.compute_logits(model(torch.tensor([ids]), torch.arange(70)[None], no_cache_attention))[0]
    torch.testing.assert_close(short[:48], expected[:48], atol=1e-4, rtol=0)
    assert (short[48:] - expected[48:]).abs().max() > 1e-2


@pytest.mark.parametrize("chapter", ["ch02", "ch03", "ch04", "final"])
@pytest.mark.parametrize(("prompt_len", "new_tokens"), [(40, 20), (60, 6)])
def test_phi3_engines_cross_longrope_switch_like_transformers_token_by_token(chapter, prompt_len, new_tokens):
    """Decoding across position 48, or a prompt that crosses it (in chunks of 5 in the paged engines): the
    greedy tokens of transformers fed one token at a time with its cache."""
    from chapters.ch02_kv_cache import LLM as Chapter2
    from chapters.ch03_paged_kv import LLM as Chapter3
    from chapters.ch04_continuous_batching import LLM as Chapter4
    from nanovllm import LLM

    folder = str(TINY_MODELS / "tiny-phi3")
    llm = {
        "ch02": lambda: Chapter2(folder),
        "ch03": lambda: Chapter3(folder, block_size=4),
        "ch04": lambda: Chapter4(folder, block_size=4, max_num_batched_tokens=5),
        "final": lambda: LLM(folder, block_size=4, max_num_batched_tokens=5),
    }[chapter]()
    prompt = random_prompt(prompt_len, seed=prompt_len)
    _, expected = hf_stepwise(hf_model("tiny-phi3"), prompt, new_tokens)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    assert llm.generate([prompt], params, use_tqdm=False)[0]["token_ids"] == expected


def test_phi3_fused_checkpoint_is_split_in_order_and_fuses_back():
    """Unfused, q/k/v and gate/up are the checkpoint's rows in order; chapter 6 fuses them back to its tensors."""
    from safetensors.torch import load_file

    ckpt = load_file(TINY_MODELS / "tiny-phi3" / "model.safetensors")
    plain = load_model(TINY_MODELS / "tiny-phi3").model.model.layers[1]
    fused = load_model(TINY_MODELS / "tiny-phi3", fuse_projections=True).model.model.layers[1]
    qkv, gate_up = ckpt["model.layers.1.self_attn.qkv_proj.weight"], ckpt["model.layers.1.mlp.gate_up_proj.weight"]
    assert torch.equal(plain.self_attn.q_proj.weight.t(), qkv[:64]) and torch.equal(
        plain.mlp.up_proj.weight.t(), gate_up[128:]
    )
    assert torch.equal(fused.self_attn.qkv_proj.weight.t(), qkv)  # transposed for inference: (in, out)
    assert torch.equal(fused.mlp.gate_up_proj.weight.t(), gate_up)


# ---- GPT-2: a table of positions, and the checkpoint's layouts ---------------------------------------------


@pytest.mark.parametrize("chapter", ["ch01", "final"])
def test_gpt2_generates_to_the_end_of_its_position_table_and_refuses_a_prompt_that_fills_it(chapter):
    from chapters.ch01_naive import LLM as Chapter1
    from nanovllm import LLM

    folder = str(TINY_MODELS / "tiny-gpt2")
    llm = Chapter1(folder) if chapter == "ch01" else LLM(folder)
    assert llm.max_model_len == 48  # n_positions
    prompt = random_prompt(40, seed=7)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)[0]
    _, expected = hf_stepwise(hf_model("tiny-gpt2"), prompt, 8)  # positions 40..47: the table's last rows
    assert out["token_ids"] == expected and out["finish_reason"] == "length"
    with pytest.raises(PromptTooLongError, match="48 tokens"):
        llm.generate([random_prompt(48, seed=8)], SamplingParams(max_tokens=1), use_tqdm=False)


def test_gpt2_loads_the_hub_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """openai-community/gpt2's safetensors name tensors without 'transformer.' and keep each layer's causal mask
    ('h.N.attn.bias'): the same model, the same logits."""
    from safetensors.torch import load_file, save_file

    from chapters.ch01_naive.llm import no_cache_attention

    folder = tmp_path / "gpt2"
    shutil.copytree(TINY_MODELS / "tiny-gpt2", folder)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(48, 48, dtype=torch.bool))[None, None]
    save_file(tensors, folder / "model.safetensors")
    ids, pos = torch.tensor([random_prompt(12, seed=1)]), torch.arange(12)[None]
    with torch.no_grad():
        a, b = (load_model(f).model for f in (TINY_MODELS / "tiny-gpt2", folder))
        assert torch.equal(
            a.compute_logits(a(ids, pos, no_cache_attention)), b.compute_logits(b(ids, pos, no_cache_attention))
        )


def test_gpt2_wrong_conv1d_shape_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "gpt2"
    shutil.copytree(TINY_MODELS / "tiny-gpt2", folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"] = tensors["transformer.h.1.mlp.c_fc.weight"][:, :96].contiguous()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight' has shape \(96, 64\)"):
        load_model(folder)


# ---- the registry and bad configs ---------------------------------------------------------------------------


def test_every_supported_architecture_has_a_class_and_others_are_refused():
    assert model_class("GPT2LMHeadModel") is GPT2ForCausalLM and model_class("Phi3ForCausalLM") is DecoderForCausalLM
    assert all(isinstance(model_class(arch), type) for arch in ARCHITECTURES)
    with pytest.raises(UnsupportedArchitectureError, match="GPTNeoXForCausalLM.*GPT2LMHeadModel"):
        model_class("GPTNeoXForCausalLM")


def phi3_config(**changes) -> dict:
    cfg = json.loads((TINY_MODELS / "tiny-phi3" / "config.json").read_text())
    return {**cfg, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_parameters": {**phi3_config()["rope_parameters"], "short_factor": [1.0] * 3}}, "short_factor.*4"),
        (
            {"rope_parameters": {**phi3_config()["rope_parameters"], "original_max_position_embeddings": None}},
            "original_max_position_embeddings",
        ),
        ({"rope_parameters": {**phi3_config()["rope_parameters"], "partial_rotary_factor": 0.4375}}, "even"),
        ({"rope_parameters": {**phi3_config()["rope_parameters"], "partial_rotary_factor": 1.5}}, r"\(0, 1\]"),
    ],
)
def test_bad_phi3_rope_configs_are_clear_errors(changes, message):
    hf = phi3_config(**changes)
    hf.pop("original_max_position_embeddings") if "original_max_position_embeddings" in message else None
    with pytest.raises(ModelFormatError, match=message):
        ModelConfig.from_dict(hf)


def test_phi3_config_reads_longrope_and_its_attention_factor():
    cfg = ModelConfig.from_dict(phi3_config())
    assert cfg.rotary_dim == 8 and cfg.head_dim == 16
    # transformers' default: sqrt(1 + ln(max / original) / ln(original)), here max 96 and original 48
    assert cfg.rope_scaling["attention_factor"] == pytest.approx(
        (1 + torch.log(torch.tensor(2.0)) / torch.log(torch.tensor(48.0))).sqrt().item()
    )


@pytest.mark.parametrize(("key", "value"), [("add_cross_attention", True), ("scale_attn_weights", False)])
def test_unsupported_gpt2_options_are_clear_errors(key, value):
    hf = json.loads((TINY_MODELS / "tiny-gpt2" / "config.json").read_text())
    with pytest.raises(ModelFormatError, match=key):
        ModelConfig.from_dict({**hf, key: value})


@pytest.mark.parametrize(("family", "act"), [("tiny-gpt2", "relu"), ("tiny-gpt2", "silu"), ("tiny-phi3", "gelu_new")])
def test_an_activation_the_family_does_not_use_is_a_clear_error(family, act):
    hf = json.loads((TINY_MODELS / family / "config.json").read_text())
    key = "activation_function" if family == "tiny-gpt2" else "hidden_act"
    with pytest.raises(ModelFormatError, match=f"hidden_act '{act}' is not supported"):
        ModelConfig.from_dict({**hf, key: act})


def test_gpt2_config_names_and_defaults():
    """GPT-2's own names (n_embd, n_layer, ...) read as the other families'; n_inner null means 4 x n_embd."""
    hf = json.loads((TINY_MODELS / "tiny-gpt2" / "config.json").read_text())
    cfg = ModelConfig.from_dict({**hf, "n_inner": None, "n_embd": 96, "n_head": 3})
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        96,
        384,
        3,
        3,
        32,
    )
    assert (cfg.num_layers, cfg.max_model_len, cfg.position_embedding, cfg.tie_word_embeddings) == (
        2,
        48,
        "learned",
        True,
    )
