"""Chapter 6: decode steps from static buffers, one CUDA graph per batch-size bucket (replayed eagerly on a CPU).

A decode step at small batch is mostly fixed cost: on a GPU, hundreds of kernel launches, each a few microseconds
of CPU work while the GPU waits. A CUDA graph records a step's launches once and replays them as one. A graph
fixes every tensor's shape and address, so the step's inputs live in static buffers sized for max_num_seqs, and
a batch is padded up to the nearest captured size (its bucket): padding rows store no K/V (slot -1) and their
logits are dropped. Prefill and mixed steps, and batches above the largest bucket, run eagerly.

On a CPU there are no graphs: the same buffers, buckets and padding run eagerly ("replay" = run the model on the
static buffers), so every test run proves that padding never touches the pool and a padded batch gives the
unpadded batch's tokens.
"""

from __future__ import annotations

import logging
import time

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import pad_block_tables
from nanovllm.layers.paged_attention import PagedAttention
from nanovllm.models import DecoderForCausalLM

log = logging.getLogger("nanovllm")


def decode_buckets(max_num_seqs: int) -> list[int]:
    """The batch sizes that get a graph: 1, 2, 4, 8, then every 8 up to 64, every 16 beyond, and max_num_seqs."""
    sizes = [1, 2, 4, *range(8, 65, 8), *range(80, max_num_seqs + 1, 16)]
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


def bucket_for(batch_size: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds batch_size sequences; None when the batch is larger than every bucket.

    Each bucket is a captured graph, so a batch runs in the first one with room for it, padded up to its size:
    3 sequences run in the bucket of 4, with one padding row. Buckets are sorted, smallest first.

    Args:
        batch_size: the number of sequences decoding this step (>= 1).
        buckets: the captured batch sizes, ascending.
    Returns:
        the bucket, or None (the step then runs eagerly, unpadded).
    """
    for size in buckets:
        if size >= batch_size:
            return size
    return None


class DecodeBuffers:
    """The static inputs of a decode step for up to max_batch sequences; a graph reads them at fixed addresses."""

    def __init__(self, max_batch: int, max_blocks: int, device: torch.device | str):
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slots = torch.full((max_batch,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)


def fill_decode_buffers(
    buffers: DecodeBuffers,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    block_tables: torch.Tensor,
    bucket: int,
    block_size: int,
) -> None:
    """Write one decode step's n sequences into the first rows of the static buffers, and pad rows n..bucket-1.

    Real row i: its newest token, its position, its block table (the rest of the row zero), context length
    position + 1, and its slot, computed with tensor operations (no loop over sequences):
        slot = block_tables[i, position // block_size] * block_size + position % block_size.
    Padding rows: token 0, position 0, a zero block table, context length 1 (a valid read the logits of which
    are dropped) and slot -1, so they store nothing into the pool. Rows past the bucket are left alone.

    Args:
        buffers: the static buffers (their rows >= bucket).
        token_ids, positions: (n,) long, on the buffers' device.
        block_tables: (n, width) int32, width <= the buffers' table width.
        bucket: the padded batch size, >= n.
        block_size: tokens per KV block.
    """
    n, width = block_tables.shape
    buffers.input_ids[:n] = token_ids
    buffers.positions[:n] = positions
    buffers.block_tables[:n, :width] = block_tables
    buffers.block_tables[:n, width:] = 0
    buffers.context_lens[:n] = positions + 1
    blocks = block_tables.gather(1, (positions // block_size)[:, None])[:, 0]  # (n,): each position's block
    buffers.slots[:n] = blocks.long() * block_size + positions % block_size
    buffers.input_ids[n:bucket] = 0
    buffers.positions[n:bucket] = 0
    buffers.block_tables[n:bucket] = 0
    buffers.context_lens[n:bucket] = 1
    buffers.slots[n:bucket] = -1


class DecodeGraphs:
    """Runs decode-only steps padded to a bucket from static buffers: CUDA graphs on a GPU, eagerly on a CPU."""

    def __init__(self, model: DecoderForCausalLM, attention: PagedAttention, max_num_seqs: int, max_model_len: int):
        self.model, self.attention = model, attention
        pool = attention.pool
        self.block_size, self.device = pool.block_size, pool.k.device
        self.buckets = decode_buckets(max_num_seqs)
        self.max_blocks = -(-max_model_len // self.block_size)
        self.buffers = DecodeBuffers(self.buckets[-1], self.max_blocks, self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.stats = {"graph_steps": 0, "padded_rows": 0}
        # a graph replays every row's store: only a backend whose store skips slot -1 can be captured
        if self.device.type == "cuda" and attention.store_skips_padding:
            self.capture()

    def can_run(self, num_tokens: list[int]) -> bool:
        """A step of decodes only (one token each), no more than the largest bucket."""
        return all(n == 1 for n in num_tokens) and len(num_tokens) <= self.buckets[-1]

    def _forward(self, bucket: int, real_rows: int | None) -> torch.Tensor:
        """The model over the first `bucket` rows of the buffers: logits (bucket, V)."""
        b = self.buffers
        self.attention.begin_static_decode(
            b.slots[:bucket], b.positions[:bucket], b.block_tables[:bucket], b.context_lens[:bucket], real_rows
        )
        hidden = self.model(b.input_ids[:bucket][None], b.positions[:bucket][None], self.attention)  # (1, B, E)
        return self.model.compute_logits(hidden[0])

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits (len(seqs), V) of one decode step for these sequences, each computing its newest token."""
        n = len(seqs)
        bucket = bucket_for(n, self.buckets)
        positions = [s.num_computed_tokens for s in seqs]
        fill_decode_buffers(
            self.buffers,
            torch.tensor([s.token_ids[p] for s, p in zip(seqs, positions)], device=self.device),
            torch.tensor(positions, device=self.device),
            pad_block_tables([s.block_table for s in seqs], self.device).to(torch.int32),  # (n, width)
            bucket,
            self.block_size,
        )
        self.stats["graph_steps"] += 1
        self.stats["padded_rows"] += bucket - n
        if bucket in self.graphs:
            graph, logits = self.graphs[bucket]
            graph.replay()
            return logits[:n]
        return self._forward(bucket, real_rows=n)[:n]

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per bucket, largest first, all on one memory pool (a smaller graph reuses the larger's
        memory: they never run at once). Each is warmed up eagerly first: the first call of a kernel may
        compile or allocate, which a capture must not see."""
        start, before = time.perf_counter(), torch.cuda.memory_allocated(self.device)
        pool = None
        for bucket in reversed(self.buckets):
            fill_decode_buffers(
                self.buffers,
                torch.zeros(0, dtype=torch.long, device=self.device),
                torch.zeros(0, dtype=torch.long, device=self.device),
                torch.zeros(0, 1, dtype=torch.int32, device=self.device),
                bucket,
                self.block_size,
            )  # every row padding: a capture stores nothing
            self._forward(bucket, real_rows=None)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(bucket, real_rows=None)
            pool = graph.pool() if pool is None else pool
            self.graphs[bucket] = (graph, logits)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        self.graph_memory = torch.cuda.memory_allocated(self.device) - before
        log.info(
            "captured %d CUDA graphs (batch sizes %s) in %.1f s, %.0f MiB",
            len(self.graphs), self.buckets, self.capture_seconds, self.graph_memory / 2**20,
        )  # fmt: skip
