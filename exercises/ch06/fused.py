"""Exercises for ch06: your version of nanovllm.models.fused.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch06 -k "task3"
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
from nanovllm.models.fused import fused_linear, FusedSelfAttention, FusedMLP, fuse_projections_, use_decode_kernels_  # the rest of the file, as given


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
    raise NotImplementedError("ch06 task 3: cut the fused projection into q, k and v")
