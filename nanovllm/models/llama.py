"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma, Gemma 2), from scratch, with Hugging Face
weight names. Gemma's differences are config switches (ModelConfig): embedding scale, (1 + weight) norms, GeGLU, and
Gemma 2's extra norms, soft caps, query scale and sliding-window layers."""

from __future__ import annotations

import torch
from torch import nn

from nanovllm.config import ModelConfig
from nanovllm.layers.activation import gated_activation
from nanovllm.layers.attention import AttentionBackend, AttentionSpec
from nanovllm.layers.linear import Linear
from nanovllm.layers.norm import RMSNorm
from nanovllm.layers.rotary import apply_partial_rotary, longrope_cos_sin, rope_cos_sin, rope_inv_freq


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.spec = attention_spec(cfg, layer_idx)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, Hq, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)  # Phi-3 rotates a part
        # a Llama layer calls with four arguments; only a layer that attends otherwise passes its spec
        out = attn(self.layer_idx, q, k, v) if self.spec is None else attn(self.layer_idx, q, k, v, self.spec)
        return self.o_proj(out.reshape(B, T, -1))  # (B, T, E)


def attention_spec(cfg: ModelConfig, layer_idx: int) -> AttentionSpec | None:
    """How this layer attends, or None for plain causal attention scaled by head_dim ** -0.5."""
    spec = AttentionSpec(
        scale=cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else None,
        window=cfg.window_of(layer_idx),
        softcap=cfg.attn_logit_softcapping,
    )
    return None if spec == AttentionSpec() else spec


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        size = intermediate_size or cfg.intermediate_size  # an expert of a mixture has its own size
        self.gate_proj = Linear(cfg.hidden_size, size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, size, bias=False)
        self.down_proj = Linear(size, cfg.hidden_size, bias=False)
        self.hidden_act = cfg.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_activation(self.hidden_act, self.gate_proj(x), self.up_proj(x)))


def build_mlp(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The layer's feed-forward part: the MLP, or routed experts in a mixture-of-experts layer."""
    if cfg.is_moe_layer(layer_idx):
        from nanovllm.models.moe import SparseMoeBlock  # imported here: moe.py builds its experts from MLP above

        return SparseMoeBlock(cfg)
    return MLP(cfg)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, plus_one=cfg.norm_plus_one)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = SelfAttention(cfg, layer_idx)
        self.post_attention_layernorm = norm()
        self.mlp = build_mlp(cfg, layer_idx)
        self.sandwich_norms = cfg.sandwich_norms
        if cfg.sandwich_norms:  # Gemma 2: post_attention_layernorm normalises attention's output, not the MLP's input
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x, cos, sin, attn: AttentionBackend):
        if self.sandwich_norms:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, attn))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, plus_one=cfg.norm_plus_one)


class CausalLMHead(nn.Module):
    """What every family's model has around its decoder (`self.model`, with `embed_tokens`): the output layer, tied
    to the embedding or not, the W^T layout for inference, and the logits."""

    def __init__(self, cfg: ModelConfig, model: nn.Module):
        super().__init__()
        self.config = cfg
        self.model = model
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def transpose_weights_(self) -> None:
        """For inference: every Linear keeps W^T (faster matrix-vector products); tied embeddings share it."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.transpose_weight_()
        # the embedding reads the same memory as a (vocab, hidden) view (a quantized lm_head keeps its own)
        if self.config.tie_word_embeddings and isinstance(self.lm_head, Linear):
            del self.model.embed_tokens.weight  # a plain tensor from now on: one parameter, counted once
            self.model.embed_tokens.weight = self.lm_head.weight.t()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., E) -> (..., vocab) logits in float32; call it on the positions you sample from only."""
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap  # Gemma 2


class DecoderForCausalLM(CausalLMHead):
    """token ids -> hidden states -> logits. The KV storage is the `attn` backend's business."""

    decode_plan = None  # chapter 6 on a CPU (models/decode_step.py): replays a decode-only step's layers in C

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, DecoderModel(cfg))
        inv_freq = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        """.to(dtype), .half(), .bfloat16() cast the weights but keep inv_freq float32, as transformers does:
        rounded to bf16 its rotation angles drift from the true ones more at every position."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if inv_freq.dtype == torch.float32 and not inv_freq.is_meta and self.inv_freq.dtype != torch.float32:
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """input_ids, positions: (B, T) -> final hidden states (B, T, E), normalised."""
        x = self.model.embed_tokens(input_ids)  # (B, T, E)
        if self.config.scale_embeddings:  # Gemma: by sqrt(hidden) rounded to the model's dtype, as transformers does
            x = x * float(torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype))  # a Python number: graph-safe
        cos, sin = self.rope(positions, x.dtype)  # (B, T, rotary_dim) each
        if self.decode_plan is not None and self.decode_plan.covers(x, attn):  # chapter 6: all layers, one C call
            x = self.decode_plan(x, cos, sin, attn)
        else:
            for layer in self.model.layers:
                x = layer(x, cos, sin, attn)
        return self.model.norm(x)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, T, rotary_dim) of each position's rotation, shared by every layer."""
        scaling = self.config.rope_scaling
        if scaling is not None and scaling["rope_type"] == "longrope":  # Phi-3: the factors depend on the position
            return longrope_cos_sin(positions, self.inv_freq, scaling, dtype)
        return rope_cos_sin(positions, self.inv_freq, dtype)
