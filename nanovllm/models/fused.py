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
from nanovllm.layers.norm import RMSNorm
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

    rotary_kernel = None  # use_decode_kernels_: fn(qkv, cos, sin, heads, head_dim) rotating q and k in place
    kernel_max_numel = -1

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend):
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)  # (B, T, (Hq + 2 Hkv) D)
        if qkv.numel() <= self.kernel_max_numel and qkv.is_contiguous() and cos.is_contiguous():
            # q's heads and k's lie side by side at the start of each row: one C call turns both, in place
            self.rotary_kernel(qkv, cos, sin, self.num_heads + self.num_kv_heads, self.head_dim)
            q, k, v = split_qkv(qkv, self.num_heads, self.num_kv_heads, self.head_dim)
            q, k = q.contiguous(), k.contiguous()  # as the rotary's new tensors were: some backends need it
        else:
            q, k, v = split_qkv(qkv, self.num_heads, self.num_kv_heads, self.head_dim)
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

    silu_kernel = None  # use_decode_kernels_: fn(gate_up) -> silu(gate) * up
    kernel_max_numel = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (..., 2F)
        if gate_up.numel() <= self.kernel_max_numel and gate_up.is_contiguous():
            return self.down_proj(self.silu_kernel(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # (..., F) each
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


def use_decode_kernels_(model: nn.Module, enabled: bool, max_rows: int) -> bool:
    """Give the model's RMSNorms, fused attentions and fused SwiGLU MLPs the C kernels of a decode step's small
    operations (nanovllm/kernels/decode_ops.py) for up to max_rows tokens, or take them away (enabled=False).

    Only where they compute what the PyTorch forms do: float32 on the CPU (checked again at each call, on the
    activations), Llama's norm order (not Gemma's 1 + weight), no per-head q/k norm before the rotary (Qwen3),
    SwiGLU (not GeGLU). Returns whether the kernels are in use (False too where they cannot be built).
    """
    from nanovllm.kernels import decode_ops  # imported here: building the kernels is the engine's choice

    if not enabled and getattr(model, "decode_plan", None) is not None:
        model.decode_plan = None  # the replayed step calls the same kernels: it goes with them
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)  # (a quantized layer's are int)
    enabled = enabled and weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32
    enabled = enabled and decode_ops.decode_ops_unavailable() is None
    for m in model.modules():
        if isinstance(m, RMSNorm) and not m.plus_one and m.weight.dtype == torch.float32:
            m.kernel, m.kernel_max_numel = (decode_ops.rms_norm, max_rows * m.weight.numel()) if enabled else (None, -1)
        elif isinstance(m, FusedSelfAttention) and not m.qk_norm:
            width = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
            m.rotary_kernel, m.kernel_max_numel = (decode_ops.rotary_, max_rows * width) if enabled else (None, -1)
        elif isinstance(m, FusedMLP) and m.hidden_act == "silu":
            width = m.gate_up_proj.out_features
            m.silu_kernel, m.kernel_max_numel = (decode_ops.silu_mul, max_rows * width) if enabled else (None, -1)
    return enabled
