"""ModelConfig: the handful of numbers a Llama-family decoder needs, read from a Hugging Face config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanovllm.errors import ModelFormatError, UnsupportedArchitectureError

# Each supported `architectures` entry and what sets it apart from plain Llama.
# Qwen2 puts a bias on q/k/v; Qwen3 normalises q and k per head (and has no bias).
ARCHITECTURES: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
    # Gemma: embeddings scaled by sqrt(hidden), RMSNorm by (1 + weight), GeGLU; Gemma 2 adds the "sandwich" norms
    # around attention and MLP, soft caps on attention scores and logits, and a window on alternate layers
    "GemmaForCausalLM": {"gemma": True},
    "Gemma2ForCausalLM": {"gemma": True, "sandwich_norms": True},
    # mixture of experts (models/moe.py): Mixtral always renormalises its top-k routing weights
    "MixtralForCausalLM": {"moe": True, "norm_topk_prob": True},
    "Qwen3MoeForCausalLM": {"qk_norm": True, "moe": True},
    "Qwen2MoeForCausalLM": {"qkv_bias": True, "moe": True},  # and a shared expert every token goes through
    # Phi-3: Llama with q/k/v and gate/up fused in the checkpoint (split at load), longrope, partial rotary
    "Phi3ForCausalLM": {},
    # GPT-2: its own decoder (models/gpt2.py): learned positions, LayerNorm, GELU MLP, biases, Conv1D weights
    "GPT2LMHeadModel": {},
}

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "longrope")
# the MLP's gate: SwiGLU, GeGLU (tanh approximation), exact GeGLU; gelu_new: GPT-2's ungated MLP (tanh approximation)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu", "gelu_new")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None
    # the layers that attend within sliding_window (Mistral: all; Gemma 2: every other one); the rest see everything
    sliding_layers: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    hidden_act: str = "silu"
    scale_embeddings: bool = False  # Gemma: x = embedding * sqrt(hidden_size)
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight)
    sandwich_norms: bool = False  # Gemma 2: norms after attention and around the MLP too
    query_pre_attn_scalar: float | None = None  # Gemma 2: scores scaled by this ** -0.5, not head_dim ** -0.5
    attn_logit_softcapping: float | None = None  # Gemma 2: scores s -> cap * tanh(s / cap) before the softmax
    final_logit_softcapping: float | None = None  # Gemma 2: the same on the output logits
    # mixture of experts: 0 experts is a dense model; see models/moe.py
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: an MLP every token goes through, gated by a sigmoid
    partial_rotary_factor: float = 1.0  # RoPE rotates the first head_dim * this channels of each head (Phi-3)
    position_embedding: str = "rope"  # or "learned": a table of positions added to the embeddings (GPT-2)
    layer_norm_eps: float = 1e-5  # GPT-2's LayerNorm
    scale_attn_by_inverse_layer_idx: bool = False  # a GPT-2 option: layer i's scores also divided by i + 1

    @property
    def rotary_dim(self) -> int:
        """How many channels of each head RoPE rotates; the rest pass through unrotated."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether this layer's MLP is the routed experts (Qwen-MoE may keep some layers dense)."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def window_of(self, layer_idx: int) -> int | None:
        """The sliding window of this layer (a query at p sees positions p - window + 1 .. p), or None.

        Every backend applies it; no block is freed when it leaves the window, though: Gemma 2's global layers
        still read it, and an all-window model (Mistral) would need holes in its block tables (see book/ch04.md).
        """
        return self.sliding_window if layer_idx in self.sliding_layers else None

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt + output) the engine will run."""
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedArchitectureError(
                f"{source}: architectures {archs or '(missing)'} is not supported; "
                f"nano-vLLM supports {', '.join(ARCHITECTURES)}"
            )
        if arch == "GPT2LMHeadModel":
            hf = gpt2_config(hf, source)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        optional = ("num_key_value_heads", "head_dim", "max_position_embeddings")  # absent is fine; 0 or "8" is not
        for key in required + optional:
            value = hf.get(key)
            if (value is not None or key in required) and (type(value) is not int or value <= 0):
                raise ModelFormatError(f"{source}: '{key}' must be a positive integer, got {value!r}")
        # Gemma's configs name the MLP's activation `hidden_activation` (their `hidden_act` is an older field)
        act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ModelFormatError(f"{source}: hidden_act {act!r} is not supported (supported: {ACTIVATIONS})")
        if (act == "gelu_new") != (arch == "GPT2LMHeadModel"):  # GPT-2's MLP is ungated, the others' gated
            raise ModelFormatError(f"{source}: hidden_act {act!r} is not supported for {arch}")
        num_heads = hf["num_attention_heads"]
        num_kv_heads = hf.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise ModelFormatError(
                f"{source}: num_attention_heads ({num_heads}) must be a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads

        # transformers >= 5 writes `rope_parameters`; older configs write `rope_theta` + `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = positive_number(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)), "rope_theta", source)
        partial_rotary = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_type = "longrope" if rope_type == "su" else rope_type  # Phi-3's first configs called it "su"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelFormatError(
                f"{source}: RoPE scaling {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
            )
        if not isinstance(partial_rotary, (int, float)) or not 0 < partial_rotary <= 1:
            raise ModelFormatError(f"{source}: 'partial_rotary_factor' must be in (0, 1], got {partial_rotary!r}")
        if int(head_dim * partial_rotary) % 2:
            raise ModelFormatError(
                f"{source}: partial_rotary_factor {partial_rotary} rotates {int(head_dim * partial_rotary)} of "
                f"{head_dim} channels; RoPE rotates pairs, so that must be even"
            )
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        if rope_type == "longrope":
            rope_scaling = longrope_scaling(rope, hf, int(head_dim * partial_rotary), source)

        eos_ids = eos_token_ids(hf.get("eos_token_id"), source)
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=positive_number(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", source),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=ARCHITECTURES[arch].get("qkv_bias", False) or bool(hf.get("attention_bias", False)),
            qk_norm=ARCHITECTURES[arch].get("qk_norm", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=sliding,
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype"),
            **gemma_fields(hf, arch, source),
            **window_fields(hf, arch, sliding, source),
            **(moe_fields(hf, arch, source) if ARCHITECTURES[arch].get("moe") else {}),
            partial_rotary_factor=float(partial_rotary),
            position_embedding=hf.get("position_embedding", "rope"),
            layer_norm_eps=positive_number(hf.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon", source),
            scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ModelFormatError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
        try:
            hf = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(hf, dict):
            raise ModelFormatError(f"{path}: expected a JSON object")
        cfg = cls.from_dict(hf, source=str(path))
        gen = Path(folder) / "generation_config.json"
        if gen.is_file():
            try:
                gen_cfg = json.loads(gen.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelFormatError(f"{gen}: not valid JSON ({e})") from e
            if not isinstance(gen_cfg, dict):
                raise ModelFormatError(f"{gen}: expected a JSON object")
            if gen_cfg.get("eos_token_id") is not None:
                cfg.eos_token_ids = eos_token_ids(gen_cfg["eos_token_id"], str(gen))
        return cfg


def positive_number(value: Any, key: str, source: str) -> float:
    """A config's float that must be finite and above 0 (a norm's epsilon, RoPE's base)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelFormatError(f"{source}: '{key}' must be a positive number, got {value!r}")
    return float(value)


def moe_fields(hf: dict[str, Any], arch: str, source: str) -> dict[str, Any]:
    """The routed-experts numbers of a Mixtral or Qwen-MoE config.json, checked."""
    experts = hf.get("num_local_experts", hf.get("num_experts"))  # Mixtral's name, Qwen's name
    top_k = hf.get("num_experts_per_tok")
    if not isinstance(experts, int) or experts <= 0:
        raise ModelFormatError(f"{source}: 'num_local_experts' (or 'num_experts') must be a positive integer")
    if not isinstance(top_k, int) or not 0 < top_k <= experts:
        raise ModelFormatError(f"{source}: 'num_experts_per_tok' must be an integer in 1..{experts}, got {top_k!r}")
    size_key = "intermediate_size" if arch == "MixtralForCausalLM" else "moe_intermediate_size"  # Mixtral: MLP-sized
    expert_size = hf.get(size_key)
    if not isinstance(expert_size, int) or expert_size <= 0:
        raise ModelFormatError(f"{source}: '{size_key}' must be a positive integer, got {expert_size!r}")
    step = hf.get("decoder_sparse_step") or 1
    if not isinstance(step, int) or step <= 0:
        raise ModelFormatError(f"{source}: 'decoder_sparse_step' must be a positive integer, got {step!r}")
    return dict(
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=expert_size,
        norm_topk_prob=ARCHITECTURES[arch].get("norm_topk_prob", False) or bool(hf.get("norm_topk_prob", False)),
        decoder_sparse_step=step,
        mlp_only_layers=list(hf.get("mlp_only_layers") or []),
        shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
    )


def gemma_fields(hf: dict[str, Any], arch: str, source: str) -> dict[str, Any]:
    """The MLP's activation, and what Gemma and Gemma 2 add (with transformers' defaults where a key is absent)."""
    fields: dict[str, Any] = {"hidden_act": hf.get("hidden_activation") or hf.get("hidden_act", "silu")}
    if not ARCHITECTURES[arch].get("gemma"):
        return fields
    fields.update(scale_embeddings=True, norm_plus_one=True)
    if ARCHITECTURES[arch].get("sandwich_norms"):
        fields.update(
            sandwich_norms=True,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0),
            final_logit_softcapping=hf.get("final_logit_softcapping", 30.0),
        )
        for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = fields[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ModelFormatError(f"{source}: {key!r} must be a positive number or null, got {value!r}")
    return fields


def window_fields(hf: dict[str, Any], arch: str, window: Any, source: str) -> dict[str, Any]:
    """Which layers attend within the sliding window: `layer_types` when the config lists them, else the family's
    rule as transformers applies it (Gemma 2: layers 0, 2, 4, ...; Qwen2/3: from max_window_layers on; else all)."""
    if window is None:
        return {"sliding_layers": []}
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ModelFormatError(f"{source}: 'sliding_window' must be a positive integer or null, got {window!r}")
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n:
            raise ModelFormatError(f"{source}: 'layer_types' must list one type for each of the {n} layers")
        layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    elif arch == "Gemma2ForCausalLM":
        layers = list(range(0, n, 2))
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        layers = list(range(hf.get("max_window_layers", n), n))
    else:
        layers = list(range(n))
    return {"sliding_layers": layers}


def gpt2_config(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """A GPT-2 config.json in the names the other families use (n_embd -> hidden_size, ...)."""
    for key, value in (("add_cross_attention", False), ("scale_attn_weights", True)):
        if hf.get(key, value) != value:
            raise ModelFormatError(f"{source}: GPT-2 with {key}={hf[key]!r} is not supported")
    n_embd = hf.get("n_embd")
    return {
        **hf,
        "hidden_size": n_embd,
        "intermediate_size": hf.get("n_inner") or (4 * n_embd if isinstance(n_embd, int) else None),
        "num_hidden_layers": hf.get("n_layer"),
        "num_attention_heads": hf.get("n_head"),
        "num_key_value_heads": hf.get("n_head"),
        "max_position_embeddings": hf.get("n_positions", 1024),
        "hidden_act": hf.get("activation_function", "gelu_new"),
        "tie_word_embeddings": hf.get("tie_word_embeddings", True),  # GPT-2's output layer is its embedding
        "position_embedding": "learned",
    }


def longrope_scaling(rope: dict[str, Any], hf: dict[str, Any], rotary_dim: int, source: str) -> dict[str, Any]:
    """Phi-3's longrope: a short and a long divisor per frequency, the length from which the long ones are used,
    and the factor cos and sin are multiplied by (when absent, a default that grows with the context's stretch)."""
    original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if not isinstance(original, int) or original <= 0:
        raise ModelFormatError(f"{source}: longrope needs original_max_position_embeddings, got {original!r}")
    for key in ("short_factor", "long_factor"):
        factors = rope.get(key)
        if not isinstance(factors, list) or len(factors) != rotary_dim // 2:
            raise ModelFormatError(
                f"{source}: longrope's {key} must be a list of {rotary_dim // 2} numbers (one per rotated channel "
                f"pair), got {factors!r}"
            )
    factor = rope.get("factor") or hf.get("max_position_embeddings", original) / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:  # the LongRoPE paper's choice: grows with the log of the stretch
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    return {
        "rope_type": "longrope",
        "short_factor": [float(f) for f in rope["short_factor"]],
        "long_factor": [float(f) for f in rope["long_factor"]],
        "original_max_position_embeddings": original,
        "attention_factor": float(attention_factor),
    }


def eos_token_ids(value: Any, source: str) -> list[int]:
    """`eos_token_id` as a list: null, one id, or a list of ids (each a non-negative integer)."""
    ids = [] if value is None else [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ModelFormatError(f"{source}: 'eos_token_id' must be a token id or a list of them, got {value!r}")
    return list(ids)
