"""Reads a llama2.c checkpoint (legacy version 0) into a Hugging Face Llama config and state dict."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from nanovllm.errors import ModelFormatError

HEADER = struct.Struct("<7i")


def _rope_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows inside each head from llama2.c's interleaved pairs to Hugging Face's rotate-half."""
    out_dim, in_dim = w.shape
    # rows of one head: (0,1),(2,3),... pairs -> first all even rows, then all odd rows
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def read_llama2c(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (hf_config_dict, state_dict) for a llama2.c `.bin` file."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < HEADER.size:
        raise ModelFormatError(f"{path}: too short to be a llama2.c checkpoint ({len(raw)} bytes)")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack_from(raw)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len) <= 0 or dim % n_heads:
        raise ModelFormatError(f"{path}: header {HEADER.unpack_from(raw)} is not a llama2.c checkpoint")
    shared = vocab > 0
    vocab = abs(vocab)
    head = dim // n_heads
    kv_dim = n_kv_heads * head
    sizes = {
        "embed": (vocab, dim),
        "rms_att": (n_layers, dim),
        "wq": (n_layers, dim, dim),
        "wk": (n_layers, kv_dim, dim),
        "wv": (n_layers, kv_dim, dim),
        "wo": (n_layers, dim, dim),
        "rms_ffn": (n_layers, dim),
        "w1": (n_layers, hidden, dim),
        "w2": (n_layers, dim, hidden),
        "w3": (n_layers, hidden, dim),
        "rms_final": (dim,),
        "rope_tables": (seq_len * head,),  # two legacy tables of seq_len * head/2, skipped
    }
    if not shared:
        sizes["wcls"] = (vocab, dim)
    expected = HEADER.size + 4 * sum(int(np.prod(s)) for s in sizes.values())
    if len(raw) != expected:
        raise ModelFormatError(f"{path}: {len(raw)} bytes, but its header implies {expected}")
    flat = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=HEADER.size).copy())
    arrays, offset = {}, 0
    for name, shape in sizes.items():
        n = int(np.prod(shape))
        arrays[name] = flat[offset : offset + n].view(shape)
        offset += n

    sd = {"model.embed_tokens.weight": arrays["embed"], "model.norm.weight": arrays["rms_final"]}
    sd["lm_head.weight"] = arrays["embed"] if shared else arrays["wcls"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = arrays["rms_att"][i]
        sd[p + "self_attn.q_proj.weight"] = _rope_halves(arrays["wq"][i], n_heads)
        sd[p + "self_attn.k_proj.weight"] = _rope_halves(arrays["wk"][i], n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = arrays["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
        sd[p + "mlp.down_proj.weight"] = arrays["w2"][i]
        sd[p + "mlp.up_proj.weight"] = arrays["w3"][i]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "max_position_embeddings": seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": shared,
        "hidden_act": "silu",
        "bos_token_id": 1,
        # llama2.c ends a sample at BOS (its sequence delimiter) as well as at EOS.
        "eos_token_id": [2, 1],
        "torch_dtype": "float32",
    }
    return config, sd
