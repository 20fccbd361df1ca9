"""Exercises for ch04: your version of nanovllm.engine.scheduler.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch04 -k "task1|task2"
"""

from __future__ import annotations
from collections import deque
from dataclasses import dataclass, field
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, Status
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler  # the rest of the file, as given
import nanovllm.engine.scheduler as _reference


class Scheduler(_reference.Scheduler):
    """Waiting and running queues; iteration-level batching with a sequence budget and a token budget. Yours: the methods below; the rest is inherited."""

    def preempt(self, seq: Sequence) -> None:
        """Take a running sequence off the GPU to make room: free its blocks, recompute it later.

        It leaves `running`, its blocks go back to the pool (their hashes stay, so whatever
        survives is a prefix-cache hit when it returns), its computed-token count drops to 0, and
        it goes to the *front* of the waiting queue, to be readmitted first. Its tokens, prompt
        and generated, are kept: recomputing them rebuilds exactly the KV it had.
        """
        raise NotImplementedError("ch04 task 2: free a sequence to recompute it later")

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
        raise NotImplementedError("ch04 task 1: one step of iteration-level scheduling")
