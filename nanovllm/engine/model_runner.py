"""The model runner: lays one step's tokens out as a single flattened batch, runs the model, returns logits."""

from __future__ import annotations

import torch

from nanovllm.engine.kv_cache import KVPool, pad_block_tables, slot_mapping
from nanovllm.engine.sequence import Sequence
from nanovllm.kernels.cpu import c_kernels_unavailable, paged_decode_attention
from nanovllm.layers.attention import GatherBuffer, causal_attention, padded_causal_mask, paged_attention, store_kv
from nanovllm.models import DecoderForCausalLM

ATTENTION_BACKENDS = ("auto", "torch", "c")


def resolve_attention_backend(backend: str, pool: KVPool) -> str:
    """'torch' (gather the blocks, then PyTorch attention) or 'c' (the C kernel reads them in place) for this pool.

    'auto' takes the C kernel where it applies (a float32 pool on the CPU) and compiles, else PyTorch.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    k = pool.k
    if k.device.type != "cpu" or k.dtype != torch.float32:  # checked first: no C build where it could not be used
        why = f"it runs on float32 CPU tensors, and this KV pool is {k.dtype} on {k.device}"
    else:
        why = c_kernels_unavailable()
    if why is None:
        return "c"
    if backend == "c":
        raise ValueError(f"attention_backend='c' cannot be used: {why}")
    return "torch"


class VarlenPagedAttention:
    """Attention over a flattened batch (1, N): decodes are batched together, prefill chunks run one by one.

    Every token's K/V is stored by slot mapping first, then each query reads its sequence's
    K/V through the block table, so a chunk sees the cached context before it as well as itself.

    Decodes take one of two paths. 'torch' gathers each group's blocks into a padded copy and runs
    PyTorch attention over it with a mask. 'c' hands every decode to one call of a C kernel that reads
    the blocks where they lie, each sequence only as far as its own length: no copy, no padding, no mask.
    """

    def __init__(self, pool: KVPool, backend: str = "auto"):
        self.pool = pool
        self.backend = resolve_attention_backend(backend, pool)
        self.buffers = (GatherBuffer(), GatherBuffer())  # gathered K, V: the same memory for every group and layer

    def prepare(self, seqs: list[Sequence], num_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Flatten this step's tokens, decodes first: (input ids (1, N), positions (1, N), each sequence's last row).

        Decodes are laid out longest context first. The C kernel takes them all in one group (each sequence read to
        its own length; longest first balances its threads). The torch path cuts them into groups of similar
        length: each group gathers K/V padded only to its own longest sequence, not to the longest in the batch.
        """
        device, bs = self.pool.k.device, self.pool.block_size
        decodes = sorted((i for i, n in enumerate(num_tokens) if n == 1), key=lambda i: -len(seqs[i].block_table))
        prefills = [i for i, n in enumerate(num_tokens) if n > 1]
        ids, positions, slots = [], [], []
        last = [0] * len(seqs)
        self.decode_groups, self.prefills = [], []
        group_tables: list[list[int]] = []
        for i in decodes:
            table = seqs[i].block_table
            # the C kernel reads each sequence to its own length: all decodes make one group
            if not group_tables or (self.backend == "torch" and len(table) < self.GROUP_RATIO * len(group_tables[0])):
                self._close_group(group_tables, len(ids), device)
                group_tables = []
            group_tables.append(table)
            self._append(seqs[i], 1, ids, positions, slots, last, i, bs)
        self._close_group(group_tables, len(ids), device)
        for i in prefills:
            n = num_tokens[i]
            start = seqs[i].num_computed_tokens - n
            # a chunk reads the blocks up to its own last token, not those later chunks will fill
            table = seqs[i].block_table[: -(-(start + n) // bs)]
            self.prefills.append((len(ids), n, start, torch.tensor([table], device=device)))
            self._append(seqs[i], n, ids, positions, slots, last, i, bs)
        self.slots = torch.tensor(slots, device=device)
        self.positions = torch.tensor(positions, device=device)  # (N,)
        # what the decode groups read by is the same for every layer: built once per step. The torch path masks
        # by position, (S, 1, width * block_size); the C kernel takes each sequence's context length, (S,) int32.
        self.decode_masks = [
            padded_causal_mask(self.positions[first:end, None], tables.shape[1] * bs)
            if self.backend == "torch"
            else (self.positions[first:end] + 1).to(torch.int32)
            for first, end, tables in self.decode_groups
        ]
        # a chunk after cached context: (1, n, blocks * block_size); a first chunk is plainly causal (None)
        self.prefill_masks = [
            padded_causal_mask(self.positions[None, offset : offset + n], table.shape[1] * bs) if start else None
            for offset, n, start, table in self.prefills
        ]
        return torch.tensor(ids, device=device)[None], self.positions[None], last

    GROUP_RATIO = 0.7  # a decode joins the current group while its block count is >= 70% of the group's first

    def _close_group(self, tables: list[list[int]], end: int, device: torch.device) -> None:
        if tables:
            padded = pad_block_tables(tables, device)  # (S, width)
            if self.backend == "c":
                padded = padded.to(torch.int32)
            self.decode_groups.append((end - len(tables), end, padded))

    @staticmethod
    def _append(seq: Sequence, n: int, ids: list, positions: list, slots: list, last: list, i: int, bs: int) -> None:
        start = seq.num_computed_tokens - n  # the scheduler already counted this step's tokens
        pos = list(range(start, start + n))
        ids += seq.token_ids[start : start + n]
        positions += pos
        slots += slot_mapping(seq.block_table, pos, bs)
        last[i] = len(ids) - 1

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.pool.k[layer_idx], self.pool.v[layer_idx]
        q, k, v = q[0], k[0], v[0]  # (N, H, D)
        store_kv(k_cache, v_cache, k, v, self.slots)
        parts = []
        for (first, end, tables), mask in zip(self.decode_groups, self.decode_masks):
            if self.backend == "c":  # here the "mask" is the context lengths (S,)
                parts.append(paged_decode_attention(q[first:end].contiguous(), k_cache, v_cache, tables, mask))
                continue
            q_dec = q[first:end, None]  # (S, 1, Hq, D): one query per decoding sequence
            pos = self.positions[first:end, None]  # (S, 1)
            parts.append(paged_attention(q_dec, k_cache, v_cache, tables, pos, mask, self.buffers)[:, 0])
        for (offset, n, start, table), mask in zip(self.prefills, self.prefill_masks):
            rows = slice(offset, offset + n)
            if start == 0:  # nothing cached before this chunk: plain causal attention on its own K/V
                parts.append(causal_attention(q[None, rows], k[None, rows], v[None, rows])[0])
            else:
                pos = self.positions[None, rows]  # (1, n)
                parts.append(paged_attention(q[None, rows], k_cache, v_cache, table, pos, mask, self.buffers)[0])
        return torch.cat(parts)[None]  # (1, N, Hq, D), rows in the order prepare() laid them out


class ModelRunner:
    def __init__(self, model: DecoderForCausalLM, pool: KVPool, attention_backend: str = "auto"):
        self.model, self.pool = model, pool
        self.attention = VarlenPagedAttention(pool, attention_backend)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_tokens: list[int], sample_rows: list[int]) -> torch.Tensor:
        """Forward this step's tokens; logits (len(sample_rows), V) at the last token of the listed sequences."""
        ids, positions, last = self.attention.prepare(seqs, num_tokens)
        hidden = self.model(ids, positions, self.attention)  # (1, N, E)
        return self.model.compute_logits(hidden[0, [last[i] for i in sample_rows]])
