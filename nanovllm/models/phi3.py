"""Phi-3 (Phi3ForCausalLM): the Llama decoder, with its checkpoint's fused projections split at load time.

What else sets Phi-3 apart is configuration, read by ModelConfig: longrope (a short and a long set of RoPE
factors, see layers/rotary.py) and partial_rotary_factor (RoPE on part of each head). Its checkpoint stores
q, k, v as one qkv_proj and gate, up as one gate_up_proj; splitting them gives the Llama layout every chapter
runs, and chapter 6's fuse_projections fuses them again, as it does for the others.
"""

from __future__ import annotations

import torch

from nanovllm.config import ModelConfig


def checkpoint_names(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """qkv_proj.weight -> q_proj, k_proj, v_proj; gate_up_proj.weight -> gate_proj, up_proj (rows, in order)."""
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {}
    for name, tensor in tensors.items():
        prefix, _, param = name.rpartition(".")
        if prefix.endswith("self_attn.qkv_proj") and tensor.shape[0] == q_rows + 2 * kv_rows:
            layer = prefix.removesuffix("qkv_proj")
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)  # rows: q's, then k's, then v's
            out.update({f"{layer}q_proj.{param}": q, f"{layer}k_proj.{param}": k, f"{layer}v_proj.{param}": v})
        elif prefix.endswith("mlp.gate_up_proj") and tensor.shape[0] == 2 * cfg.intermediate_size:
            layer = prefix.removesuffix("gate_up_proj")
            gate, up = tensor.chunk(2, dim=0)  # (intermediate, hidden) each: gate first, as transformers splits it
            out.update({f"{layer}gate_proj.{param}": gate, f"{layer}up_proj.{param}": up})
        else:  # a fused tensor of the wrong size stays fused: the loader then names it as unexpected
            out[name] = tensor
    return out
