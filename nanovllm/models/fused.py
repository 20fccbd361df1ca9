"""Chapter 6's fused projections: q, k and v as one matrix, gate and up as another: fewer, bigger matmuls a layer.

A decode step multiplies one row per sequence by every weight matrix, and each matmul has a fixed cost (a kernel
launch on a GPU, dispatch and thread wake-up on a CPU) on top of reading its weights. Concatenating the weights
that read the same input turns 3 + 2 matmuls a layer into 1 + 1: the same bytes, read by fewer calls. The
checkpoint keeps its separate tensors; the concatenation happens once, at load time.
"""

from __future__ import annotations

import torch
from torch import nn

from nanovllm.layers.activation import gated_activation
from nanovllm.layers.attention import AttentionBackend
from nanovllm.layers.linear import Linear
from nanovllm.layers.rotary import apply_partial_rotary
from nanovllm.models.llama import MLP, DecoderForCausalLM, SelfAttention


def split_qkv(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut the fused projection's output into q, k and v, each with its heads split out.

    The fused weight is [W_q; W_k; W_v] stacked along the output dimension, so each token's output row is
    q's num_heads * head_dim values, then k's num_kv_heads * head_dim, then v's as many: three slices of the
    last dimension, each then viewed as (heads, head_dim). Slices and views copy nothing.

    Args:
        qkv: (B, T, (num_heads + 2 * num_kv_heads) * head_dim) output of the fused projection.
    Returns:
        q (B, T, num_heads, head_dim), k and v (B, T, num_kv_heads, head_dim).
    """
    B, T, _ = qkv.shape
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[..., :q_size].view(B, T, num_heads, head_dim)  # (B, T, Hq, D)
    k = qkv[..., q_size : q_size + kv_size].view(B, T, num_kv_heads, head_dim)  # (B, T, Hkv, D)
    v = qkv[..., q_size + kv_size :].view(B, T, num_kv_heads, head_dim)  # (B, T, Hkv, D)
    return q, k, v


def fused_linear(parts: list[Linear]) -> Linear:
    """One Linear whose output is the parts' outputs side by side: weights (out, in) and biases concatenated."""
    weight = torch.cat([p.weight for p in parts], dim=0)  # (sum of outs, in)
    fused = Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None, device="meta")  # no init
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


class FusedSelfAttention(nn.Module):
    """SelfAttention with one qkv_proj; the same computation as the unfused module it is built from."""

    def __init__(self, attn: SelfAttention):
        super().__init__()
        self.layer_idx = attn.layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.qkv_proj = fused_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.qk_norm, self.spec = attn.qk_norm, attn.spec
        if attn.qk_norm:
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend):
        B, T, _ = x.shape
        q, k, v = split_qkv(self.qkv_proj(x), self.num_heads, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        out = attn(self.layer_idx, q, k, v) if self.spec is None else attn(self.layer_idx, q, k, v, self.spec)
        return self.o_proj(out.reshape(B, T, -1))  # (B, T, E)


class FusedMLP(nn.Module):
    """The MLP with one gate_up_proj: gate and up in one matmul, then split in half."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.gate_up_proj = fused_linear([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj
        self.hidden_act = mlp.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (..., F) each
        return self.down_proj(gated_activation(self.hidden_act, gate, up))


@torch.no_grad()
def fuse_projections_(model: DecoderForCausalLM) -> DecoderForCausalLM:
    """Replace every layer's attention and MLP by their fused forms, in place (before the weights are transposed)."""
    if not isinstance(model, DecoderForCausalLM):  # GPT-2: its checkpoint holds q, k, v fused already
        return model
    for layer in model.model.layers:
        layer.self_attn = FusedSelfAttention(layer.self_attn)
        if isinstance(layer.mlp, MLP):
            layer.mlp = FusedMLP(layer.mlp)
        else:  # routed experts (models/moe.py): each expert is an MLP, fused the same way (a shared one too)
            layer.mlp.experts = nn.ModuleList(FusedMLP(expert) for expert in layer.mlp.experts)
            if layer.mlp.shared_expert is not None:
                layer.mlp.shared_expert = FusedMLP(layer.mlp.shared_expert)
    return model
