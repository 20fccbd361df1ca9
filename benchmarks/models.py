"""Benchmark models by name: stories260K, and seeded random-weight Llama/Qwen models built once into a cache folder.

Every engine reads the same weights: the chapters load `path`, transformers (and the GGUF
converter) load `hf_path`, a Hugging Face folder. For random-weight models the two are the
same folder; for stories260K (a llama2.c checkpoint) `hf_path` is a converted copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STORIES260K = ROOT.parent / "shared" / "models" / "stories260K"
BUILD_VERSION = 1  # bump when the way models are built changes: cached folders are rebuilt

_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class ModelSpec:
    """A named model: a Hugging Face config to fill with seeded random weights, or a checkpoint on disk."""

    name: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)  # empty for checkpoints on disk
    dtype: str = "float32"  # the dtype the weights are stored in
    seed: int = 0


def llama(
    hidden: int,
    layers: int,
    heads: int,
    ffn: int,
    vocab: int,
    tied: bool,
    kv_heads: int | None = None,
    max_len: int = 2048,
) -> dict[str, Any]:
    return {
        **_LLAMA,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "max_position_embeddings": max_len,
    }


def mixtral(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, experts: int, top_k: int, vocab: int):
    """A Mixtral-shaped config: every layer's MLP is `experts` expert MLPs of size ffn, each token routed to top_k."""
    return {
        **llama(hidden, layers, heads, ffn, vocab, tied=False, kv_heads=kv_heads),
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
    }


# Qwen3-0.6B's published config.json (the numbers only; the weights here are random).
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
}
# Llama-3.2-1B's published config.json (again, random weights).
LLAMA32_1B = {
    **_LLAMA,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "pad_token_id": 128001,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}

MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec("stories260k", "llama2.c stories260K (trained, 0.26M params), from ../shared/models"),
        ModelSpec(  # wide and shallow: per-layer work outweighs per-op overhead, as in real models
            "llama-5m",
            "random Llama, hidden 384, 2 layers, FFN 1024, vocab 4096, tied (perf tests)",
            llama(384, 2, 6, 1024, 4096, tied=True),
        ),
        ModelSpec(
            "llama-20m",
            "random Llama, hidden 384, 6 layers, FFN 1024, vocab 32000, tied (quick runs)",
            llama(384, 6, 6, 1024, 32000, tied=True),
        ),
        ModelSpec(
            "llama-134m",
            "random Llama, hidden 768, 12 layers, FFN 2048, vocab 32000, untied",
            llama(768, 12, 12, 2048, 32000, tied=False),
        ),
        ModelSpec(  # Mixtral's proportions, scaled down: 8 experts, top-2, GQA 4:1; mixed-64 in about a minute on a CPU
            "mixtral-tiny",
            "random Mixtral, hidden 512, 4 layers, 8 experts of FFN 1024, top-2, vocab 32000, untied (MoE runs)",
            mixtral(512, 4, 8, 2, 1024, 8, 2, 32000),
        ),
        ModelSpec("qwen3-0.6b", "Qwen3-0.6B's real config, random weights, bf16 (GPU runs)", QWEN3_0_6B, "bfloat16"),
        ModelSpec("llama3.2-1b", "Llama-3.2-1B's real config, random weights, bf16 (GPU runs)", LLAMA32_1B, "bfloat16"),
    ]
}


@dataclass
class ResolvedModel:
    """A model ready to load: the folder the chapters read and the Hugging Face folder for transformers."""

    name: str
    path: Path
    hf_path: Path
    config: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def max_model_len(self) -> int:
        return int(self.config.get("max_position_embeddings", 2048))

    @property
    def special_ids(self) -> set[int]:
        ids: set[int] = set()
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = self.config.get(key)
            ids.update([value] if isinstance(value, int) else value or [])
        return ids

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "hf_path": str(self.hf_path),
            "params": param_count(self.config),
            "config": self.config,
        }


def cache_dir() -> Path:
    """Where built models live: $NANOVLLM_BENCH_CACHE, else ~/.cache/nanovllm/bench-models."""
    env = os.environ.get("NANOVLLM_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nanovllm" / "bench-models"


def param_count(cfg: dict[str, Any]) -> int:
    """Parameters implied by a Llama-family or mixture-of-experts config (embedding counted once when tied)."""
    e, f, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or e // heads
    kv = cfg.get("num_key_value_heads") or heads
    attn = e * heads * d * 2 + e * kv * d * 2 + (2 * d if cfg.get("model_type") == "qwen3" else 0)
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    mlp = experts * (3 * e * cfg.get("moe_intermediate_size", f) + e) if experts else 3 * e * f  # + the router
    layer = attn + mlp + 2 * e
    return n * layer + v * e * (1 if cfg.get("tie_word_embeddings") else 2) + e


def resolve_model(name_or_path: str, cache: Path | None = None) -> ResolvedModel:
    """A named model (built into the cache on first use) or a Hugging Face folder / llama2.c checkpoint path."""
    check_model(name_or_path)
    cache = cache or cache_dir()
    if name_or_path in MODELS:
        spec = MODELS[name_or_path]
        if spec.name == "stories260k":
            return _llama2c(STORIES260K, spec.name, cache)
        folder = cache / spec.name
        if _stamp(folder) != _spec_stamp(spec):
            _build_random(spec, folder)
        return ResolvedModel(spec.name, folder, folder, json.loads((folder / "config.json").read_text()))
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return ResolvedModel(path.name, path, path, json.loads((path / "config.json").read_text()))
    return _llama2c(path, path.stem, cache)


def check_model(name_or_path: str) -> None:
    """A FileNotFoundError, in one line, for a model that cannot be had here (checked before anything is built)."""
    if name_or_path == "stories260k" and not STORIES260K.exists():
        raise FileNotFoundError(
            f"model stories260k needs the shared folder beside this clone: {STORIES260K} is absent "
            "(a built model such as llama-20m needs nothing; see --list)"
        )
    if name_or_path not in MODELS and not Path(name_or_path).exists():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a named model ({', '.join(MODELS)}) nor a folder or checkpoint"
        )


def _spec_stamp(spec: ModelSpec) -> dict[str, Any]:
    return {"build_version": BUILD_VERSION, **asdict(spec)}


def _stamp(folder: Path) -> dict[str, Any] | None:
    stamp = folder / "bench_spec.json"
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def _publish(tmp: Path, folder: Path, stamp: dict[str, Any]) -> None:
    """Move a finished build into place, so a half-written folder is never seen (builds may race)."""
    (tmp / "bench_spec.json").write_text(json.dumps(stamp, indent=1) + "\n")
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:  # another process published first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _specials(cfg: dict[str, Any]) -> dict[str, int]:
    """Special-token names at the ids the config names (word-level, so any unique string will do)."""
    out: dict[str, int] = {}
    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    for name, idx in (
        ("<unk>", 0),
        ("<s>", cfg.get("bos_token_id")),
        ("</s>", eos),
        ("<pad>", cfg.get("pad_token_id")),
    ):
        if isinstance(idx, int) and idx not in out.values():
            out[name] = idx
    return out


def _save_tokenizer(cfg: dict[str, Any], folder: Path) -> None:
    """A word-level tokenizer, one word per id ('t123'): prompts are token ids, so only decoding uses it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = _specials(cfg)
    names = [f"t{i}" for i in range(cfg["vocab_size"])]
    for token, idx in specials.items():
        names[idx] = token
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token=names[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    roles = {"<unk>": "unk_token", "<s>": "bos_token", "</s>": "eos_token", "<pad>": "pad_token"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{roles[t]: t for t in specials})
    fast.save_pretrained(folder)


def _build_random(spec: ModelSpec, folder: Path) -> None:
    """Fill the config with seeded random weights (std 0.02, as transformers initialises) and save the folder."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()

    print(f"building {spec.name} ({param_count(spec.config) / 1e6:.1f}M params) into {folder} ...", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=folder.parent))
    cfg = dict(spec.config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    config.architectures = spec.config["architectures"]
    dtype = getattr(torch, spec.dtype)
    torch.manual_seed(spec.seed)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        gen = torch.Generator().manual_seed(spec.seed)
        for p in model.parameters():
            if p.dim() == 1:  # norm weights
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.to(dtype).save_pretrained(tmp, safe_serialization=True)
    _save_tokenizer(spec.config, tmp)
    _publish(tmp, folder, _spec_stamp(spec))


def _llama2c(path: Path, name: str, cache: Path) -> ResolvedModel:
    """A llama2.c checkpoint: the chapters read it as is; transformers reads a converted Hugging Face copy."""
    from nanovllm.utils.loader import find_llama2c

    found = find_llama2c(path)
    if found is None:
        raise FileNotFoundError(f"{path}: neither a Hugging Face folder nor a llama2.c checkpoint")
    ckpt = found[0]
    folder = cache / f"{name}-hf"
    stamp = {
        "build_version": BUILD_VERSION,
        "source": str(ckpt.resolve()),
        "size": ckpt.stat().st_size,
        "mtime": ckpt.stat().st_mtime,
    }
    if _stamp(folder) != stamp:
        _convert_llama2c(ckpt, folder, stamp)
    return ResolvedModel(name, path, folder, json.loads((folder / "config.json").read_text()))


def _convert_llama2c(ckpt: Path, folder: Path, stamp: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from nanovllm.utils.llama2c import read_llama2c

    config, tensors = read_llama2c(ckpt)
    if config["tie_word_embeddings"]:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"}
    )
    config = {**config, "pad_token_id": 0}
    (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    _save_tokenizer({**config, "eos_token_id": 2}, tmp)
    _publish(tmp, folder, stamp)
