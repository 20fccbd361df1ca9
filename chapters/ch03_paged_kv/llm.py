"""Chapter 3's engine: batches still run to completion, but KV lives in blocks, so memory follows real lengths."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Seq

import torch
from tqdm.auto import tqdm

from chapters.ch01_naive.llm import LLM as Chapter1LLM
from chapters.ch01_naive.llm import sample_token
from nanovllm.engine.block_manager import BlockManager, worst_case_tokens
from nanovllm.engine.io import Prompt, check_engine_args, finish_reason, make_output
from nanovllm.engine.kv_cache import KVPool, pool_for_model, slot_mapping
from nanovllm.engine.sequence import Sequence, Status
from nanovllm.layers.attention import (
    AttentionSpec,
    GatherBuffer,
    pad_block_tables,
    padded_causal_mask,
    paged_attention,
    store_kv,
    window_mask,
)
from nanovllm.sampling_params import SamplingParams


class PagedAttention:
    """The attention backend of chapter 3: store new K/V by slot mapping, read K/V through block tables."""

    def __init__(self, pool: KVPool):
        self.pool = pool
        self.buffers = (GatherBuffer(), GatherBuffer())  # gathered K, V: the same memory for every layer and step

    def begin_step(self, seqs: list[Sequence], num_new: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Lay out this step's tokens right-padded (B, T); returns (input ids, positions) for the model."""
        T = max(num_new)
        bs = self.pool.block_size
        ids, positions, slots = [], [], []
        for seq, n in zip(seqs, num_new):
            start = len(seq) - n
            pos = list(range(start, len(seq)))
            ids.append(seq.token_ids[start:] + [0] * (T - n))
            # padding repeats the last position: it sees only real keys, and its slot is -1 (not stored)
            positions.append(pos + [pos[-1]] * (T - n))
            slots.append(slot_mapping(seq.block_table, pos, bs) + [-1] * (T - n))
        device = self.pool.k.device
        self.block_tables = pad_block_tables([s.block_table for s in seqs], device)  # (B, max_blocks)
        width = self.block_tables.shape[1]
        slots = torch.tensor(slots, device=device).flatten()  # (B * T,)
        self.stored = (slots >= 0).nonzero()[:, 0]  # the rows of real tokens, once for all layers
        self.slots = slots[self.stored]
        self.positions = torch.tensor(positions, device=device)  # (B, T)
        self.mask = padded_causal_mask(self.positions, width * bs)  # (B, T, S): the same for every layer
        self.window_masks: dict[int, torch.Tensor] = {}  # a sliding-window layer's narrower mask, by window
        return torch.tensor(ids, device=device), self.positions

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec | None = None
    ) -> torch.Tensor:
        k_cache, v_cache = self.pool.k[layer_idx], self.pool.v[layer_idx]
        store_kv(k_cache, v_cache, k.flatten(0, 1)[self.stored], v.flatten(0, 1)[self.stored], self.slots)
        mask = self.mask
        if spec is not None and spec.window is not None:  # blocks older than the window stay, unread
            if spec.window not in self.window_masks:
                self.window_masks[spec.window] = window_mask(self.mask, self.positions, spec.window)
            mask = self.window_masks[spec.window]
        return paged_attention(q, k_cache, v_cache, self.block_tables, self.positions, mask, self.buffers, spec)


class LLM(Chapter1LLM):
    """Chapter 3's engine: admit what the block pool can hold, run that batch to completion, repeat."""

    chapter = "chapter 3"

    def __init__(
        self,
        model: str,
        dtype: str | torch.dtype | None = None,
        device: str = "cpu",
        max_model_len: int | None = None,
        seed: int = 0,
        max_num_seqs: int = 16,
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
    ):
        check_engine_args(
            max_num_seqs=max_num_seqs,
            block_size=block_size,
            kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
        )
        super().__init__(model, dtype, device, max_model_len, seed)
        self.max_num_seqs = max_num_seqs
        # by default, the memory chapter 2 reserves: max_num_seqs rows of max_model_len tokens
        self.pool = pool_for_model(
            self.config,
            self.model.lm_head.weight.dtype,
            device,
            block_size,
            kv_cache_memory,
            gpu_memory_utilization,
            max_num_seqs * self.max_model_len,
            max_model_len=self.max_model_len,
        )
        self.block_manager = BlockManager(self.pool.num_blocks, block_size, enable_prefix_caching)
        self.attention = PagedAttention(self.pool)
        self.stats = {"prompt_tokens": 0, "prefill_tokens_computed": 0, "prefix_cached_tokens": 0, "peak_running": 0}

    @property
    def kv_cache_bytes(self) -> int:
        return self.pool.nbytes

    def worst_case_tokens(self, seq: Sequence) -> int:
        return worst_case_tokens(len(seq), seq.params.max_tokens, self.max_model_len)

    def admit(self, waiting: deque[Sequence]) -> list[Sequence]:
        """Take waiting sequences in order while the pool can hold every one of them at its longest."""
        bm, batch, reserved = self.block_manager, [], 0
        while waiting and len(batch) < self.max_num_seqs:
            seq = waiting[0]
            worst = self.worst_case_tokens(seq)
            if bm.blocks_needed(seq, worst) + reserved > bm.num_free_blocks:
                break  # wait for this batch to finish and free its blocks
            bm.allocate(seq)
            reserved += bm.blocks_for(worst) - len(seq.block_table)  # blocks it may still ask for
            seq.num_computed_tokens = len(seq)  # the prefill below computes the rest of the prompt
            bm.commit(seq)  # its full blocks are shareable by sequences admitted after it, in this same step
            seq.status = Status.RUNNING
            batch.append(waiting.popleft())
        return batch

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], num_new: list[int]) -> None:
        """One forward pass over num_new tokens of each sequence, then one sampled token for each."""
        ids, positions = self.attention.begin_step(seqs, num_new)
        hidden = self.model(ids, positions, self.attention)  # (B, T, E)
        last = torch.tensor(num_new) - 1
        logits = self.model.compute_logits(hidden[torch.arange(len(seqs)), last])  # (B, V)
        for seq, row in zip(seqs, logits):
            seq.token_ids.append(sample_token(row, seq.params.temperature, seq.generator))
            seq.finish_reason = finish_reason(
                seq.output_ids, seq.params, self.tokenizer.eos_token_ids, len(seq), self.max_model_len
            )

    def run_batch(self, batch: list[Sequence]) -> None:
        bm = self.block_manager
        num_new = [len(s) - s.num_cached_tokens for s in batch]
        self.stats["prompt_tokens"] += sum(len(s) for s in batch)
        self.stats["prefill_tokens_computed"] += sum(num_new)
        self.stats["prefix_cached_tokens"] += sum(s.num_cached_tokens for s in batch)
        self.stats["peak_running"] = max(self.stats["peak_running"], len(batch))
        self.step(batch, num_new)
        running = batch
        while True:
            for seq in running:
                if seq.finish_reason is not None:
                    seq.status = Status.FINISHED
                    bm.free(seq)  # its blocks go back at once, though new requests wait for the next batch
            running = [s for s in running if not s.is_finished]
            if not running:
                return
            for seq in running:
                bm.append_slot(seq)  # room for the token sampled last step; the reservation guarantees it
                seq.num_computed_tokens = len(seq)
                bm.commit(seq)
            self.step(running, [1] * len(running))

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict]:
        seqs = []
        for ids, params in self.prepare(prompts, sampling_params):
            self.block_manager.check_fits(len(ids), params.max_tokens, self.max_model_len)
            seqs.append(Sequence(ids, params, generator=self.generator_for(params)))
        waiting = deque(seqs)
        try:
            with tqdm(total=len(seqs), desc="generate", disable=not use_tqdm) as bar:
                while waiting:
                    batch = self.admit(waiting)
                    self.run_batch(batch)
                    bar.update(len(batch))
        except BaseException:  # an error or Ctrl-C mid-batch: give the blocks back, and forget what was not written
            for seq in seqs:
                if seq.block_table:
                    self.block_manager.discard(seq)
            raise
        return [make_output(self.tokenizer, s.prompt_ids, s.output_ids, s.finish_reason) for s in seqs]
