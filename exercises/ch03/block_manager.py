"""Exercises for ch03: your version of nanovllm.engine.block_manager.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch03 -k "task1|task2|task3|task4"
"""

from __future__ import annotations
from collections import deque
from dataclasses import dataclass, field
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.block_manager import NO_HASH, worst_case_tokens, Block, NoFreeBlocksError, BlockManager  # the rest of the file, as given
import nanovllm.engine.block_manager as _reference


def block_hash(prev_hash: int, token_ids: list[int]) -> int:
    """The prefix-cache key of one full block: a hash chained over the block's tokens and the block before it.

    Chaining makes the key stand for the whole prefix up to the end of this block, so two
    sequences share block i only if they agree on every token of blocks 0..i. The first
    block of a sequence uses prev_hash = -1. Collisions are possible in principle, which is
    why a hit is confirmed by comparing the block's stored tokens too.

    Args:
        prev_hash: the key of the previous block, or -1 for the first block.
        token_ids: the block's tokens (exactly block_size of them).
    Returns:
        an integer key (the same inputs always give the same key, in every process).
    """
    raise NotImplementedError("ch03 task 1: the chained hash of a full block")


class BlockManager(_reference.BlockManager):
    """Hands out blocks to sequences; full blocks are indexed by prefix hash so later sequences can share them. Yours: the methods below; the rest is inherited."""

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence a block table covering all its tokens, sharing cached prefix blocks.

        1. hits = self.cached_prefix(seq): physical blocks already holding its leading full blocks.
           A hit block in use by another sequence gains a reference (ref_count += 1); an idle one
           (ref_count 0, still in the free list with its hash) is taken back with self._take_free(id).
        2. Every other block the tokens need comes fresh from self._take_free(), which evicts
           whatever cached content that block held.
        3. seq.block_table = hits + fresh blocks; seq.num_cached_tokens and seq.num_computed_tokens
           = the tokens covered by the hits (their KV need not be computed again).
        Raises NoFreeBlocksError (and changes nothing) when self.can_allocate(seq) is False.
        """
        raise NotImplementedError("ch03 task 2: allocate, sharing cached blocks")

    def append_slot(self, seq: Sequence) -> tuple[int, int] | None:
        """Make sure the block table covers the sequence's newest token (position len(seq) - 1).

        - If the token starts a new block (len(seq) > blocks held * block_size), append a fresh block.
        - If it lands in the last block and that block is shared (ref_count > 1, after a fork),
          copy on write: take a fresh block, drop one reference to the shared one, put the fresh one
          last in the table, and return (shared id, fresh id) so the engine copies the K/V over.
        - Otherwise the last block has room and is ours alone: nothing to do.
        Returns the (src, dst) pair to copy, or None.
        """
        raise NotImplementedError("ch03 task 3: grow by one token")

    def free(self, seq: Sequence) -> None:
        """Release every block of the sequence.

        Each block loses one reference; a block whose count reaches 0 goes to the back of the
        free list (so the least recently used is reused first) but keeps its hash and tokens:
        a later sequence with the same prefix can still find it until it is reused. Walk the
        table from the end, so a sequence's tail is evicted before its (more shareable) head.
        Afterwards the sequence holds no blocks and no computed tokens.
        """
        raise NotImplementedError("ch03 task 4: release blocks, keep their hashes")
