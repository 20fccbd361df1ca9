"""ModelConfig: the handful of numbers a Llama-family decoder needs, read from a Hugging Face config.json."""

from __future__ import annotations

import json
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
}

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


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
    torch_dtype: str | None = None

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt + output) the engine will run."""
        # A sliding-window model attends to a window only; we do not implement the window,
        # so we stay inside it, where full attention and windowed attention agree.
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
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
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if not isinstance(hf.get(key), int) or hf[key] <= 0:
                raise ModelFormatError(f"{source}: '{key}' must be a positive integer, got {hf.get(key)!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelFormatError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
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
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelFormatError(
                f"{source}: RoPE scaling {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
            )
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}

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
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
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


def eos_token_ids(value: Any, source: str) -> list[int]:
    """`eos_token_id` as a list: null, one id, or a list of ids (each a non-negative integer)."""
    ids = [] if value is None else [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ModelFormatError(f"{source}: 'eos_token_id' must be a token id or a list of them, got {value!r}")
    return list(ids)
