"""Tensor parallelism, the model's side: which slice of each weight a rank keeps, and the three places ranks talk.

With N ranks, every layer is split so that each rank does 1/N of the arithmetic and holds 1/N of the weights:

- attention: rank r keeps heads [r * Hq/N, (r+1) * Hq/N) of q_proj's output rows, the KV heads those query heads
  read (a KV head is replicated when there are fewer KV heads than ranks), and the matching input columns of
  o_proj. Each rank attends with its own heads over its own KV pool, and o_proj's partial sums are added across
  ranks: one all-reduce.
- MLP: gate_proj and up_proj keep 1/N of their output rows (column-parallel), down_proj the matching input
  columns (row-parallel): one all-reduce. A mixture of experts splits every expert the same way (the router is
  replicated: every rank routes every token identically) and all-reduces the block's sum once.
- the embedding and the output layer keep 1/N of the vocabulary (padded to a multiple of N): a token's row comes
  from the one rank that holds it (the others add zeros, one all-reduce), and each rank's logits for its slice are
  gathered on rank 0, the only rank that samples.

A row-parallel bias (GPT-2's) is kept by rank 0 only: every rank adds its partial product, the bias is added once.
Norms, positions and the router are replicated. The slicing happens tensor by tensor as the checkpoint is read:
a rank reads only its rows or columns of the file (a family whose checkpoint must first be renamed or split,
GPT-2's and Phi-3's, reads one whole tensor at a time and cuts it), so it never holds much more than its shard.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.config import ModelConfig


class Collectives(Protocol):
    """What the model needs from the process group (engine/tensor_parallel.py provides it)."""

    rank: int
    size: int

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...  # in place, and returned

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor: ...  # rank 0: every rank's, side by side


# what each module of ours is, by its own name (after the checkpoint's names were mapped to ours)
COLUMN = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "qkv_proj": "qkv", "gate_proj": "col", "up_proj": "col"}
ROW = {"o_proj", "down_proj"}
VOCAB = {"embed_tokens", "lm_head"}


def shard_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The config of one rank's model: its heads, KV heads, MLP width and vocabulary slice; a model that cannot be
    split `size` ways is a clear error."""
    if size == 1:
        return cfg

    def split(what: str, value: int) -> int:
        if value % size:
            raise ValueError(f"tensor_parallel_size={size} must divide the model's {what} ({value})")
        return value // size

    hkv = cfg.num_kv_heads
    if hkv < size and size % hkv:
        raise ValueError(
            f"tensor_parallel_size={size}: with {hkv} KV heads, each rank needs whole KV heads or an equal share "
            f"of replicas (choose a size that divides {hkv} or that {hkv} divides)"
        )
    return dataclasses.replace(
        cfg,
        num_heads=split("attention heads", cfg.num_heads),
        num_kv_heads=split("KV heads", hkv) if hkv >= size else 1,
        intermediate_size=split("MLP width (intermediate_size)", cfg.intermediate_size),
        moe_intermediate_size=split("expert width", cfg.moe_intermediate_size) if cfg.num_experts else 0,
        shared_expert_intermediate_size=split("shared expert width", cfg.shared_expert_intermediate_size)
        if cfg.shared_expert_intermediate_size
        else 0,
        vocab_size=vocab_shard(cfg.vocab_size, size),
    )


def vocab_shard(vocab_size: int, size: int) -> int:
    """Rows of the embedding each rank holds: the vocabulary divided by `size`, rounded up (the last is padded)."""
    return -(-vocab_size // size)


def shard_tensor(name: str, tensor, cfg: ModelConfig, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s slice of the checkpoint tensor `name` (our names; `cfg` is the whole model's config).

    `tensor` is a torch.Tensor or anything with `.shape` that reads rows or columns when indexed (the loader's
    CheckpointSlice): only the indexing below touches it, so a rank reads its slice of a file, not the whole."""
    if size == 1:
        return tensor[:]
    module, param = name.rsplit(".", 2)[-2:]
    kind = "row" if module in ROW else "vocab" if module in VOCAB else COLUMN.get(module)
    if kind is None:  # norms, positions, the router, q_norm/k_norm (per head_dim): every rank has them whole
        return tensor[:]
    if kind in ("q", "col"):
        return tensor[share(tensor.shape[0], rank, size)].contiguous()
    if kind == "kv":
        return kv_rows(tensor, cfg, rank, size)
    if kind == "qkv":  # GPT-2's c_attn: q, k and v each cut by heads, then side by side again
        return torch.cat([part.chunk(size, dim=0)[rank] for part in tensor[:].chunk(3, dim=0)])
    if kind == "row":
        if param == "bias":  # added once, by rank 0, after the partial products
            return tensor[:] if rank == 0 else torch.zeros_like(tensor[:])
        return tensor[:, share(tensor.shape[1], rank, size)].contiguous()
    rows = vocab_shard(cfg.vocab_size, size)  # "vocab": embedding and output layer, by rows, the last padded
    part = tensor[rank * rows : min((rank + 1) * rows, tensor.shape[0])]
    return F.pad(part, (0, 0, 0, rows - part.shape[0])) if part.shape[0] < rows else part.contiguous()


def share(length: int, rank: int, size: int) -> slice:
    """Rank `rank`'s equal share of `length` rows or columns (shard_config checked that `size` divides it)."""
    step = length // size
    return slice(rank * step, (rank + 1) * step)


def kv_rows(tensor, cfg: ModelConfig, rank: int, size: int) -> torch.Tensor:
    """k_proj's or v_proj's rows for this rank: its share of KV heads, or, with fewer KV heads than ranks, the one
    KV head its query heads read (query heads [r Hq/N, (r+1) Hq/N) all fall in KV head r Hkv / N)."""
    if cfg.num_kv_heads >= size:
        return tensor[share(tensor.shape[0], rank, size)].contiguous()
    head = rank * cfg.num_kv_heads // size
    return tensor[head * cfg.head_dim : (head + 1) * cfg.head_dim].contiguous()


class AllReduced(nn.Module):
    """A module whose output is a partial sum on each rank (attention ending in a row-parallel o_proj, an MLP or a
    mixture ending in down_proj): the ranks' outputs added, so every rank goes on with the whole."""

    def __init__(self, inner: nn.Module, group: Collectives):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, *args) -> torch.Tensor:
        return self.group.all_reduce(self.inner(*args).contiguous())


class VocabParallelEmbedding(nn.Module):
    """The embedding of this rank's vocabulary slice [start, start + rows): other tokens look up zeros, and the
    all-reduce adds the one rank's row that is not zero."""

    def __init__(self, inner: nn.Embedding, group: Collectives):
        super().__init__()
        self.inner, self.group = inner, group
        self.rows = inner.weight.shape[0]
        self.start = group.rank * self.rows

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = self.inner(local.masked_fill(outside, 0))  # (..., E)
        return self.group.all_reduce(x.masked_fill(outside[..., None], 0.0))


class GatheredLogits(nn.Module):
    """The output layer of this rank's vocabulary slice; rank 0 gathers every slice and drops the padding. The
    other ranks return nothing to sample from: (rows, 0)."""

    def __init__(self, inner: nn.Module, group: Collectives, vocab_size: int):
        super().__init__()
        self.inner, self.group, self.vocab_size = inner, group, vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.group.gather_last_dim(self.inner(hidden).contiguous())  # rank 0: (rows, N * V/N)
        return logits[..., : self.vocab_size]


def row_max(group: Collectives):
    """For quantize_model_: a row-parallel layer's INT8 scales from the whole rows (the largest magnitude over
    every rank's columns), the others' from their own rows, which are whole."""
    if group.size == 1:
        return None
    return lambda name: group.all_reduce_max if name.rpartition(".")[2] in ROW else None


@torch.no_grad()
def parallelize_(model: nn.Module, group: Collectives, vocab_size: int) -> nn.Module:
    """Put the all-reduces and the gather into a rank's loaded model (after fusion, quantization and the W^T
    transpose, which work on each rank's shard as they would on a whole model)."""
    if group.size == 1:
        return model
    for layer in model.model.layers:
        layer.self_attn = AllReduced(layer.self_attn, group)
        layer.mlp = AllReduced(layer.mlp, group)
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, group)
    model.lm_head = GatheredLogits(model.lm_head, group, vocab_size)
    return model
