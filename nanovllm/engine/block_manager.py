"""The block manager: a pool of fixed-size KV blocks, block tables, reference counts, and the prefix cache."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nanovllm.engine.sequence import Sequence

NO_HASH = -1


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
    return hash((prev_hash, tuple(token_ids)))


def worst_case_tokens(prompt_len: int, max_tokens: int, max_model_len: int) -> int:
    """The most tokens of a request whose K/V are ever stored: all but the last one sampled."""
    return min(prompt_len + max_tokens, max_model_len) - 1


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = NO_HASH  # set once the block is full and its KV computed; kept after it is freed
    token_ids: list[int] = field(default_factory=list)  # the tokens the hash stands for


class NoFreeBlocksError(RuntimeError):
    """The pool has no free block for an allocation the caller did not check first."""


class BlockManager:
    """Hands out blocks to sequences; full blocks are indexed by prefix hash so later sequences can share them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))  # least recently freed first
        self.hash_to_block: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_fits(self, prompt_len: int, max_tokens: int, max_model_len: int) -> None:
        """A request that could not fit even in an empty pool is refused up front, with what to change.

        The last token sampled is never fed back, so its K/V need no slot: at most prompt + max_tokens - 1
        tokens (and fewer than max_model_len) are ever computed.
        """
        need = self.blocks_for(worst_case_tokens(prompt_len, max_tokens, max_model_len))
        if need > self.num_blocks:
            raise ValueError(
                f"a request of {prompt_len} prompt tokens + max_tokens={max_tokens} needs {need} KV blocks, "
                f"but the whole pool has {self.num_blocks}: raise kv_cache_memory or lower max_tokens"
            )

    # ---- prefix cache ------------------------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids that already hold this sequence's leading full blocks (never all its tokens)."""
        hits: list[int] = []
        if not self.enable_prefix_caching or seq.wants_prompt_logits:
            return hits
        prev = NO_HASH
        # the last token is always computed: its logits choose the next token
        for i in range((len(seq) - 1) // self.block_size):
            tokens = seq.block_tokens(i, self.block_size)
            prev = block_hash(prev, tokens)
            block_id = self.hash_to_block.get(prev)
            if block_id is None or self.blocks[block_id].token_ids != tokens:  # a miss, or a hash collision
                break
            hits.append(block_id)
        return hits

    def _register(self, seq: Sequence, index: int) -> None:
        block = self.blocks[seq.block_table[index]]
        if block.hash != NO_HASH:
            return
        prev = self.blocks[seq.block_table[index - 1]].hash if index > 0 else NO_HASH
        if index > 0 and prev == NO_HASH:
            return  # the chain is broken (e.g. a copied block); nothing after it can be found anyway
        tokens = seq.block_tokens(index, self.block_size)
        block.hash, block.token_ids = block_hash(prev, tokens), tokens
        self.hash_to_block.setdefault(block.hash, block.block_id)

    def commit(self, seq: Sequence) -> None:
        """Index every full block of the sequence's first num_computed_tokens, so other sequences can share it.

        Call it only once the K/V of those tokens are written (or, as chapter 3 does, for the forward pass that
        writes them, evicting them with discard(seq) if it fails): a block indexed too early could be
        found by another sequence, which would then read K/V that an interrupted step never wrote.
        """
        if self.enable_prefix_caching:
            full = seq.num_computed_tokens // self.block_size
            for index in range(seq.num_hashed_blocks, full):
                self._register(seq, index)
            seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    # ---- allocation --------------------------------------------------------------------------------------

    def _take_free(self, block_id: int | None = None) -> int:
        if block_id is None:
            if not self.free_ids:
                raise NoFreeBlocksError("no free KV blocks")
            block_id = self.free_ids.popleft()
            block = self.blocks[block_id]
            if block.hash != NO_HASH:  # evict its cached content
                if self.hash_to_block.get(block.hash) == block_id:
                    del self.hash_to_block[block.hash]
                block.hash, block.token_ids = NO_HASH, []
        else:
            self.free_ids.remove(block_id)  # a cached block that nobody was using
        self.blocks[block_id].ref_count = 1
        return block_id

    def blocks_needed(self, seq: Sequence, num_tokens: int | None = None) -> int:
        """Free blocks that admitting `seq` with room for num_tokens (default: its length) would use up."""
        hits = self.cached_prefix(seq)
        idle_hits = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # these come out of the free pool
        return self.blocks_for(num_tokens or len(seq)) - len(hits) + idle_hits

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq) <= self.num_free_blocks

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
        assert not seq.block_table, "sequence already has blocks"
        if not self.can_allocate(seq):
            raise NoFreeBlocksError(
                f"sequence {seq.seq_id} needs {self.blocks_needed(seq)} blocks, {self.num_free_blocks} free"
            )
        hits = self.cached_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self._take_free(block_id)
            else:
                block.ref_count += 1
        seq.block_table = hits + [self._take_free() for _ in range(self.blocks_for(len(seq)) - len(hits))]
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size

    def can_append(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= self._append_cost(seq)

    def _append_cost(self, seq: Sequence) -> int:
        if len(seq) > len(seq.block_table) * self.block_size:
            return 1  # the newest token starts a new block
        last = self.blocks[seq.block_table[-1]]
        return 1 if last.ref_count > 1 else 0  # the newest token would write into a shared block: copy it

    def append_slot(self, seq: Sequence) -> tuple[int, int] | None:
        """Make sure the block table covers the sequence's newest token (position len(seq) - 1).

        - If the token starts a new block (len(seq) > blocks held * block_size), append a fresh block.
        - If it lands in the last block and that block is shared (ref_count > 1, after a fork),
          copy on write: take a fresh block, drop one reference to the shared one, put the fresh one
          last in the table, and return (shared id, fresh id) so the engine copies the K/V over.
        - Otherwise the last block has room and is ours alone: nothing to do.
        Returns the (src, dst) pair to copy, or None.
        """
        if len(seq) > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take_free())
            return None
        last_id = seq.block_table[-1]
        last = self.blocks[last_id]
        if last.ref_count > 1:  # copy-on-write: the newest token goes into a block another sequence shares
            new_id = self._take_free()
            last.ref_count -= 1
            seq.block_table[-1] = new_id
            return last_id, new_id
        return None

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (parallel sampling, beam search); appends copy on write."""
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_cached_tokens, child.num_computed_tokens = parent.num_cached_tokens, parent.num_computed_tokens
        child.num_hashed_blocks = parent.num_hashed_blocks

    def free(self, seq: Sequence) -> None:
        """Release every block of the sequence.

        Each block loses one reference; a block whose count reaches 0 goes to the back of the
        free list (so the least recently used is reused first) but keeps its hash and tokens:
        a later sequence with the same prefix can still find it until it is reused. Walk the
        table from the end, so a sequence's tail is evicted before its (more shareable) head.
        Afterwards the sequence holds no blocks and no computed tokens.
        """
        for block_id in reversed(seq.block_table):  # the tail is evicted before the shared head
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_tokens = seq.num_hashed_blocks = 0

    def discard(self, seq: Sequence) -> None:
        """Free a sequence whose K/V a failed forward pass may not have written: the blocks nobody else holds
        lose their hashes too, so the prefix cache cannot hand them out."""
        table = list(seq.block_table)
        self.free(seq)
        for block in (self.blocks[i] for i in table):
            if block.ref_count == 0 and block.hash != NO_HASH:
                if self.hash_to_block.get(block.hash) == block.block_id:
                    del self.hash_to_block[block.hash]
                block.hash, block.token_ids = NO_HASH, []
