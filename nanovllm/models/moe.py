"""Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): a router sends each token to its top-k expert MLPs, and
each expert runs once a step on all the tokens it was sent, not once per token.

A step holds N tokens (decodes and prefill chunks together). The router scores every expert for every token and
keeps the top k: N * k (token, expert) pairs. Running them one pair at a time would be N * k small matmuls, each
reading a whole expert's weights (on a CPU, a decode batch of 64 with top-2 would read experts 128 times a layer).
Instead the pairs are sorted by expert, so each expert's tokens lie side by side, and each expert that received
tokens multiplies its group at once (a segmented matmul: one matmul per expert, rows = its group), reading its
weights once. The outputs, each scaled by its routing weight, are added back to their tokens with one index_add_.

The experts are the decoder's own MLP modules, one per expert, with the checkpoint's names (`mlp.experts.3.up_proj`):
chapter 6 fuses each expert's gate and up like any MLP's, chapter 7 quantizes each expert's Linear layers like any
other, and transposed weights apply to them too. The router stays a plain nn.Linear in full precision (neither
transposed nor quantized): it is small (experts x hidden) and a rounding that flips a top-k choice changes which
weights run at all. Qwen2-MoE adds a shared expert that every token goes through, scaled by a sigmoid gate.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from nanovllm.config import ModelConfig
from nanovllm.models.llama import MLP


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts, then the k most probable; their probabilities renormalised to sum to 1 if asked
    (Mixtral always, Qwen-MoE when norm_topk_prob).

    Args:
        logits: (N, E) router scores.
    Returns:
        weights (N, k) float32 and experts (N, k) long, most probable first.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (N, E), in float32 whatever the weights' dtype
    weights, experts = probs.topk(top_k, dim=-1)  # (N, k) each
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class SparseMoeBlock(nn.Module):
    """In place of the MLP: route each token to top-k experts, run each expert on its group, add the results."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k, self.normalize = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:  # Qwen2-MoE: every token also goes through this one, gated
            self.shared_expert = MLP(cfg, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H): every token of the step, whatever sequence it belongs to
        weights, experts = route(self.gate(x), self.top_k, self.normalize)  # (N, k) each
        weights = weights.to(x.dtype)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            out = self.dense(x, weights, experts)  # a CUDA graph cannot read group sizes back to the host
        else:
            out = self.grouped(x, weights, experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # (N, 1) * (N, H)
        return out.view(shape)

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Sort the (token, expert) pairs by expert, run each expert once on its contiguous group, scatter back.

        Args:
            x: (N, H) tokens; weights, experts: (N, k) each token's routing weights and chosen experts.
        Returns:
            (N, H): for each token, the sum over its k experts of weight * expert(x).
        """
        pairs = experts.flatten()  # (N * k,): pair j is token j // k's choice number j % k
        order = pairs.argsort(stable=True)  # (N * k,) the pairs, grouped by expert
        tokens = order // self.top_k  # (N * k,) the token of each sorted pair
        counts = torch.bincount(pairs, minlength=self.num_experts).tolist()  # group sizes, read once on the host
        rows = x[tokens]  # (N * k, H): each token copied once per expert it goes to, grouped by expert
        out = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts):  # a loop over experts (at most E matmuls a layer), never over tokens
            if n:  # experts that received no token cost nothing
                out[start : start + n] = self.experts[e](rows[start : start + n])
            start += n
        out *= weights.flatten()[order, None]  # (N * k, H) each pair's output scaled by its routing weight
        return torch.zeros_like(x).index_add_(0, tokens, out)  # (N, H): each token's k outputs summed

    def dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The same sum with shapes that never depend on the routing: every expert on every token, weighted by 0
        where the token did not choose it. E / k times the arithmetic, for CUDA graph capture (a decode step on
        a GPU reads every expert's weights anyway once the batch spreads over all of them)."""
        per_expert = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        per_expert.scatter_(1, experts, weights)  # (N, E): a token's weight for each expert, 0 if not chosen
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out += per_expert[:, e : e + 1] * expert(x)
        return out


# Mixtral's checkpoints name the block `block_sparse_moe` and an expert's matrices w1 (gate), w3 (up), w2 (down)
MIXTRAL_NAMES = re.compile(r"\.block_sparse_moe\.(gate\.|experts\.\d+\.)(w[123])?")
MIXTRAL_MATRICES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def checkpoint_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names: Mixtral's renamed to the Qwen-MoE names the modules use,
    `model.layers.0.block_sparse_moe.experts.3.w1.weight` -> `model.layers.0.mlp.experts.3.gate_proj.weight`."""

    def ours(match: re.Match) -> str:
        return ".mlp." + match[1] + (MIXTRAL_MATRICES[match[2]] if match[2] else "")

    return {MIXTRAL_NAMES.sub(ours, name): tensor for name, tensor in tensors.items()}
