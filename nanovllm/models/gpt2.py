"""GPT-2 (GPT2LMHeadModel), from scratch: learned positions, LayerNorm, a GELU MLP, biases everywhere, tied output.

It differs from the Llama family in most of its parts, so it has its own file rather than switches in llama.py;
it keeps the interface every engine calls: forward(input_ids, positions, attn), compute_logits,
transpose_weights_, and the same module names (model.embed_tokens, model.layers, lm_head, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.config import ModelConfig
from nanovllm.layers.attention import AttentionBackend
from nanovllm.layers.linear import Linear
from nanovllm.models.fused import split_qkv
from nanovllm.models.llama import CausalLMHead


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's activation ('gelu_new'): GELU with the tanh approximation,
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        # the checkpoint's c_attn: q, k and v side by side in one matrix, as chapter 6 fuses the Llama ones
        heads = cfg.num_heads * cfg.head_dim  # the hidden size, or a tensor-parallel rank's share of the heads
        self.qkv_proj = Linear(cfg.hidden_size, 3 * heads, bias=True)
        self.o_proj = Linear(heads, cfg.hidden_size, bias=True)
        # an option of GPT-2's config: scores of layer i divided by i + 1 as well; scaling q by it is the same
        self.q_scale = 1.0 / (layer_idx + 1) if cfg.scale_attn_by_inverse_layer_idx else None

    def forward(self, x: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = split_qkv(self.qkv_proj(x), self.num_heads, self.num_heads, self.head_dim)  # (B, T, H, D) each
        # views into the fused output; the Triton kernels read q as one dense array (k and v are copied into the
        # cache anyway), which in the Llama layers RoPE's output is
        q = q.contiguous() if self.q_scale is None else q * self.q_scale
        out = attn(self.layer_idx, q, k, v)  # (B, T, H, D)
        return self.o_proj(out.reshape(B, T, -1))  # (B, T, E)


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)  # c_fc
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)  # c_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.up_proj(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # ln_1
        self.self_attn = GPT2Attention(cfg, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # ln_2
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # wte
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)  # wpe
        self.layers = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # ln_f


class GPT2ForCausalLM(CausalLMHead):
    """token ids + positions -> hidden states -> logits; the KV storage is the `attn` backend's business.

    Positions enter once, as a learned vector added to each token's embedding, not as a rotation of q and k:
    a position past the table (max_position_embeddings = n_positions) has no vector, which the engines' context
    check (ModelConfig.max_model_len) refuses before it gets here.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, GPT2Model(cfg))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """input_ids, positions: (B, T) -> final hidden states (B, T, E), normalised."""
        x = self.model.embed_tokens(input_ids) + self.model.embed_positions(positions)  # (B, T, E)
        for layer in self.model.layers:
            x = layer(x, attn)
        return self.model.norm(x)


# The checkpoint's module names -> ours. Conv1D, GPT-2's linear layer, stores its weight as (in, out): y = x W + b.
HF_NAMES = {
    "ln_1": "input_layernorm",
    "attn.c_attn": "self_attn.qkv_proj",
    "attn.c_proj": "self_attn.o_proj",
    "ln_2": "post_attention_layernorm",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
TOP_NAMES = {"wte": "model.embed_tokens", "wpe": "model.embed_positions", "ln_f": "model.norm"}


def checkpoint_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2's tensors under our names, Conv1D weights transposed to (out, in); unknown names are kept, so that
    the loader names them. Checkpoints come with and without the 'transformer.' prefix."""
    out = {}
    for name, tensor in tensors.items():
        base = name.removeprefix("transformer.")
        module, _, param = base.rpartition(".")
        if module in TOP_NAMES:
            out[f"{TOP_NAMES[module]}.{param}"] = tensor
            continue
        parts = module.split(".", 2)  # "h", layer index, the module inside the block
        if len(parts) == 3 and parts[0] == "h" and parts[1].isdigit():
            inner = parts[2]
            if inner == "attn" and param in ("bias", "masked_bias"):
                continue  # the causal mask as a buffer, which older checkpoints saved: not a weight
            if inner in HF_NAMES:
                if inner in CONV1D and param == "weight":
                    tensor = tensor.t().contiguous()  # (in, out) -> (out, in), nn.Linear's layout
                out[f"model.layers.{parts[1]}.{HF_NAMES[inner]}.{param}"] = tensor
                continue
        out[name] = tensor
    return out
