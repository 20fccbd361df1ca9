"""The model runner: lays one step's tokens out as a single flattened batch, runs the model, returns logits."""

from __future__ import annotations

import torch

from nanovllm.engine.cuda_graphs import DecodeGraphs
from nanovllm.engine.kv_cache import KVPool, slot_mapping
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.paged_attention import BACKENDS, PagedAttention, PrefillChunk, StepLayout, make_attention_backend
from nanovllm.models import DecoderForCausalLM


def resolve_attention_backend(backend: str, pool: KVPool, allowed: tuple[str, ...] = tuple(BACKENDS)) -> str:
    """The name of the backend `backend` ('auto', 'torch', 'c', ...) resolves to for this pool."""
    return make_attention_backend(backend, pool, allowed).name


class ModelRunner:
    def __init__(
        self,
        model: DecoderForCausalLM,
        pool: KVPool,
        attention_backend: str = "auto",
        allowed_backends: tuple[str, ...] = tuple(BACKENDS),
        decode_graphs: tuple[int, int] | None = None,
    ):
        """decode_graphs = (max_num_seqs, max_model_len) runs decode-only steps through DecodeGraphs (chapter 6)."""
        self.model, self.pool = model, pool
        self.attention: PagedAttention = make_attention_backend(attention_backend, pool, allowed_backends)
        self.graphs = DecodeGraphs(model, self.attention, *decode_graphs) if decode_graphs else None

    def prepare(self, seqs: list[Sequence], num_tokens: list[int]) -> tuple[torch.Tensor, StepLayout, list[int]]:
        """Flatten this step's tokens, decodes first: (input ids (1, N), the layout, each sequence's last row).

        Sequence i computes its num_tokens[i] tokens from num_computed_tokens on (nothing is counted as computed
        before the forward has written it). Decodes are laid out longest context first: the C kernel balances its
        threads that way, and the PyTorch path cuts them into groups of similar length.
        """
        device, bs = self.pool.k.device, self.pool.block_size
        decodes = sorted((i for i, n in enumerate(num_tokens) if n == 1), key=lambda i: -len(seqs[i].block_table))
        prefills = [i for i, n in enumerate(num_tokens) if n > 1]
        ids, positions, slots, last = [], [], [], [0] * len(seqs)
        decode_tables, chunks = [], []
        for i in decodes + prefills:
            seq, n = seqs[i], num_tokens[i]
            start = seq.num_computed_tokens
            if n == 1:
                decode_tables.append(seq.block_table)
            else:
                chunks.append(PrefillChunk(len(ids), n, start, seq.block_table[: -(-(start + n) // bs)]))
            pos = list(range(start, start + n))
            ids += seq.token_ids[start : start + n]
            positions += pos
            slots += slot_mapping(seq.block_table, pos, bs)
            last[i] = len(ids) - 1
        layout = StepLayout(
            slots=torch.tensor(slots, device=device),
            positions=torch.tensor(positions, device=device),  # (N,)
            decode_tables=decode_tables,
            prefills=chunks,
        )
        return torch.tensor(ids, device=device)[None], layout, last

    @torch.inference_mode()
    def run(
        self,
        seqs: list[Sequence],
        num_tokens: list[int],
        sample_rows: list[int],
        copies: list[tuple[int, int]] = (),
        every_rows: list[int] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Forward this step's tokens; logits (len(sample_rows), V) at the last token of the listed sequences, and
        for each sequence i in every_rows, logits (num_tokens[i], V) at every token it computed (prompt logprobs).

        `copies` are copy-on-write block pairs (src, dst) the scheduler asked for: done before anything is stored.
        """
        if self.graphs is not None and self.graphs.can_run(num_tokens):  # one token each: a decode, or a 1-token chunk
            if copies:
                self.pool.copy_blocks(copies)
            logits = self.graphs.run(seqs)
            return logits[sample_rows], {i: logits[i : i + 1] for i in every_rows}
        ids, layout, last = self.prepare(seqs, num_tokens)
        # the output layer only where logits are wanted: its (rows, V) product is a large part of a step
        rows = [last[i] for i in sample_rows]
        for i in every_rows:
            rows += range(last[i] - num_tokens[i] + 1, last[i] + 1)
        logits = self.forward(ids, layout, rows, list(copies))  # (len(rows), V)
        every, start = {}, len(sample_rows)
        for i in every_rows:
            every[i], start = logits[start : start + num_tokens[i]], start + num_tokens[i]
        return logits[: len(sample_rows)], every

    def forward(
        self, ids: torch.Tensor, layout: StepLayout, rows: list[int], copies: list[tuple[int, int]]
    ) -> torch.Tensor:
        """The laid-out step on this model: copy-on-write copies first, then the forward; logits (len(rows), V) at
        the listed rows of the flattened batch. Every rank of a tensor-parallel engine runs this on its shard."""
        if copies:
            self.pool.copy_blocks(copies)
        self.attention.begin_step(layout)
        hidden = self.model(ids, layout.positions[None], self.attention)  # (1, N, E)
        return self.model.compute_logits(hidden[0, rows])  # (len(rows), V)
