"""The scheduler: every step, decide which requests run and how many of their tokens, within the budgets.

A step has two phases. `schedule()` makes the plan: it admits, preempts and hands out blocks, but counts
nothing as computed. Only after the forward pass has written the plan's K/V does `postprocess(plan)` count
those tokens and index the blocks they complete. So a step that raises, or is interrupted, leaves nothing half
done: the same plan can simply run again, and the prefix cache never finds a block whose K/V were not written.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens each sequence computes this step
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks, before the run

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)


class Scheduler:
    """Waiting and running queues; iteration-level batching with a sequence budget and a token budget."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        # admission keeps 1% of the pool free, so a request is not admitted only to be preempted a step later
        self.watermark_blocks = int(0.01 * block_manager.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, seq: Sequence) -> None:
        """Take a running sequence off the GPU to make room: free its blocks, recompute it later.

        It leaves `running`, its blocks go back to the pool (their hashes stay, so whatever
        survives is a prefix-cache hit when it returns), its computed-token count drops to 0, and
        it goes to the *front* of the waiting queue, to be readmitted first. Its tokens, prompt
        and generated, are kept: recomputing them rebuilds exactly the KV it had.
        """
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work: (sequence, number of tokens to compute) pairs, and whom it preempted.

        1. Running sequences first, oldest first. Each wants its uncomputed tokens
           (len(seq) - seq.num_computed_tokens: 1 when decoding, the rest of its prompt when
           part-way through a chunked prefill), capped by the tokens left in the step budget. If
           the block manager cannot append its newest token, preempt the most recently admitted
           running sequence (self.running[-1]) and retry; if that was this sequence itself, stop.
           Then self.block_manager.append_slot(seq); a (src, dst) pair it returns goes to batch.copies.
        2. Then waiting sequences, first come first served, while tokens are left in the budget,
           fewer than max_num_seqs are running, nothing was preempted this step, and its blocks
           (self.block_manager.blocks_needed(seq)) fit with self.watermark_blocks to spare (no
           spare needed when nothing is running).
           Allocate them (prefix-cache hits count as computed), move it to running, and schedule
           min(uncomputed, budget left) tokens; without chunked prefill, a prompt that does not
           fit the budget whole waits instead.
        Nothing is counted as computed here: postprocess() does that once the forward pass has run.
        """
        batch, budget = ScheduledBatch(), self.max_num_batched_tokens
        bm = self.block_manager
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted as a victim below
                break
            while not bm.can_append(seq):
                victim = self.running[-1]
                self.preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            if (copy := bm.append_slot(seq)) is not None:
                batch.copies.append(copy)
            n = min(len(seq) - seq.num_computed_tokens, budget)
            batch.add(seq, n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.preempted:
            seq = self.waiting[0]
            # alone, a request may fill the whole pool: check_fits let it in on that promise
            spare = self.watermark_blocks if self.running else 0
            if bm.blocks_needed(seq) + spare > bm.num_free_blocks:
                break
            if not self.enable_chunked_prefill and len(seq) - len(bm.cached_prefix(seq)) * bm.block_size > budget:
                break
            bm.allocate(seq)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed_tokens, budget)
            batch.add(seq, n)
            budget -= n
        return batch

    def postprocess(self, batch: ScheduledBatch) -> None:
        """The forward pass wrote this plan's K/V: count its tokens as computed, and index the blocks they filled
        in the prefix cache (only now may another sequence share them)."""
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Queue a copy of `parent` (same tokens): it shares the parent's blocks if the parent runs, and is
        admitted like any request (finding the parent's full blocks in the prefix cache) if it waits."""
        if parent.status is Status.RUNNING:
            self.block_manager.fork(parent, child)
            child.status = Status.RUNNING
            self.running.append(child)
        else:
            self.add(child)

    def finish(self, seq: Sequence, reason: str) -> None:
        """A sequence is done (or aborted): it leaves its queue and its blocks go back at once."""
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
