"""The engine's attention backends: one small class per way of reading a step's K/V through block tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanovllm.kernels.cpu import KV_DTYPES, c_kernels_unavailable, paged_decode_attention
from nanovllm.layers.attention import (
    AttentionSpec,
    GatherBuffer,
    pad_block_tables,
    padded_causal_mask,
    paged_attention,
    spec_causal_attention,
    store_kv,
    window_mask,
)


@dataclass
class PrefillChunk:
    first: int  # its first row in the flattened batch
    num_tokens: int
    start: int  # position of its first token (tokens before it are cached in the pool)
    block_table: list[int]  # the blocks up to its own last token, not those later chunks will fill


@dataclass
class StepLayout:
    """One step's flattened batch (N rows) as attention sees it, the same for every layer; the runner builds it.

    Rows [0, len(decode_tables)) are decodes, one token each, longest context first; the prefill chunks follow.
    """

    slots: torch.Tensor  # (N,) where each row's K and V go in the pool
    positions: torch.Tensor  # (N,)
    decode_tables: list[list[int]]
    prefills: list[PrefillChunk]


class PagedAttention:
    """Store every new token's K/V by slot mapping, then attend: decodes by the subclass's method, prefill chunks
    in PyTorch (a chunk after cached context reads it through its block table; a first chunk is plainly causal).

    Every backend honours a layer's AttentionSpec: its scale, its soft cap and its sliding window. The window only
    narrows what is read; no block is freed when it slides out of every window (Gemma 2's global layers still read
    it, and an all-window model such as Mistral would need holes in its block tables and in the prefix cache).
    """

    name = "paged"

    def __init__(self, pool):
        self.pool = pool  # a KVPool: .k and .v of shape (layers, num_blocks, block_size, Hkv, D)
        self.buffers = (GatherBuffer(), GatherBuffer())  # gathered K, V: the same memory for every layer and step

    store_rows: int | None = None  # store only the first rows' K/V (the rest pad a static batch); None: all
    store_skips_padding = False  # whether the store itself skips slot -1 (what a CUDA graph of a padded step needs)

    def begin_step(self, layout: StepLayout) -> None:
        """Build what every layer reads by, once per step."""
        self.store_rows = None
        self.layout, device, bs = layout, layout.positions.device, self.pool.block_size
        self.window_masks: dict = {}
        self.num_decodes = len(layout.decode_tables)
        self.prefill_tables = [torch.tensor([c.block_table], device=device) for c in layout.prefills]  # (1, blocks)
        self.prefill_masks = [  # (1, n, blocks * block_size) after cached context; None for a first chunk
            padded_causal_mask(layout.positions[None, c.first : c.first + c.num_tokens], len(c.block_table) * bs)
            if c.start
            else None
            for c in layout.prefills
        ]
        if self.num_decodes:
            self.begin_decodes(layout.decode_tables, layout.positions[: self.num_decodes])

    @staticmethod
    def unavailable(pool) -> str | None:
        """Why this backend cannot run on this pool, or None when it can."""
        return None

    def begin_decodes(self, tables: list[list[int]], positions: torch.Tensor) -> None:
        raise NotImplementedError

    def begin_static_decode(
        self,
        slots: torch.Tensor,
        positions: torch.Tensor,
        tables: torch.Tensor,
        context_lens: torch.Tensor,
        real_rows: int | None,
    ) -> None:
        """A decode-only step read from static buffers (chapter 6): B rows, one query each, whatever B's real ones.

        slots (B,) with -1 on padding rows, positions (B,), tables (B, width) int32, context_lens (B,) int32. Only
        tensor operations follow from here, so a CUDA graph can capture the step; `real_rows` (None under a graph)
        lets a backend whose store cannot skip slot -1 store the real rows alone.
        """
        self.layout = StepLayout(slots, positions, [], [])
        self.window_masks = {}
        self.num_decodes, self.store_rows = len(slots), real_rows
        self.prefill_tables, self.prefill_masks = [], []
        self.begin_static_decodes(tables, context_lens, positions)

    def begin_static_decodes(self, tables: torch.Tensor, context_lens: torch.Tensor, positions: torch.Tensor) -> None:
        raise NotImplementedError

    def decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, spec: AttentionSpec | None = None
    ) -> torch.Tensor:
        """q (S, Hq, D), one query per decoding sequence -> (S, Hq, D)."""
        raise NotImplementedError

    def windowed(self, key, mask: torch.Tensor, positions: torch.Tensor, spec: AttentionSpec | None) -> torch.Tensor:
        """The step's mask narrowed to the layer's window: built once per step for each (part of the step, window)."""
        window = spec.window if spec else None
        if window is None:
            return mask
        if (key, window) not in self.window_masks:
            self.window_masks[key, window] = window_mask(mask, positions, window)
        return self.window_masks[key, window]

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec | None = None
    ) -> torch.Tensor:
        k_cache, v_cache = self.pool.k[layer_idx], self.pool.v[layer_idx]
        q, k, v = q[0], k[0], v[0]  # (N, H, D)
        n = self.store_rows
        store_kv(k_cache, v_cache, k[:n], v[:n], self.layout.slots[:n])  # padding rows' K/V are never stored
        parts = [self.decode(q[: self.num_decodes], k_cache, v_cache, spec)] if self.num_decodes else []
        for i, (chunk, table, mask) in enumerate(zip(self.layout.prefills, self.prefill_tables, self.prefill_masks)):
            rows = slice(chunk.first, chunk.first + chunk.num_tokens)
            if mask is None:  # nothing cached before this chunk: plain causal attention on its own K/V, as stored
                k_own, v_own = as_stored(k[None, rows], k_cache), as_stored(v[None, rows], v_cache)
                parts.append(spec_causal_attention(q[None, rows], k_own, v_own, spec)[0])
            else:
                pos = self.layout.positions[None, rows]  # (1, n)
                mask = self.windowed(("prefill", i), mask, pos, spec)
                parts.append(paged_attention(q[None, rows], k_cache, v_cache, table, pos, mask, self.buffers, spec)[0])
        return torch.cat(parts)[None]  # (1, N, Hq, D), rows in the layout's order


def as_stored(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """x as the pool holds it: a bfloat16 pool under a float32 model rounds K and V, and a chunk that attends to its
    own fresh K/V must see them rounded too, or the same tokens would read differently in one chunk than in two (or
    after a preemption) and greedy output would depend on the schedule."""
    return x if cache.dtype == x.dtype else x.to(cache.dtype).to(x.dtype)


class TorchPagedAttention(PagedAttention):
    """Decodes in plain PyTorch: each group of similar lengths gathers its blocks into a padded copy, then masks."""

    name = "torch"
    GROUP_RATIO = 0.7  # a decode joins the current group while its block count is >= 70% of the group's first

    def begin_decodes(self, tables: list[list[int]], positions: torch.Tensor) -> None:
        # the layout is longest first: cut it where a table falls below GROUP_RATIO of its group's first, so each
        # group gathers K/V padded only to its own longest sequence, not to the longest in the batch
        self.groups = []
        first = 0
        for i in range(1, len(tables) + 1):
            if i == len(tables) or len(tables[i]) < self.GROUP_RATIO * len(tables[first]):
                padded = pad_block_tables(tables[first:i], positions.device)  # (S, width)
                mask = padded_causal_mask(positions[first:i, None], padded.shape[1] * self.pool.block_size)
                self.groups.append((first, i, padded, mask))
                first = i

    def begin_static_decodes(self, tables: torch.Tensor, context_lens: torch.Tensor, positions: torch.Tensor) -> None:
        # one group as wide as the buffers: shapes that do not change from step to step, as a graph needs
        mask = padded_causal_mask(positions[:, None], tables.shape[1] * self.pool.block_size)  # (B, 1, S)
        self.groups = [(0, len(positions), tables.long(), mask)]

    def decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, spec: AttentionSpec | None = None
    ) -> torch.Tensor:
        parts = []
        for first, end, tables, mask in self.groups:
            pos = self.layout.positions[first:end, None]  # (S, 1)
            q_dec = q[first:end, None]  # (S, 1, Hq, D)
            mask = self.windowed(("decode", first), mask, pos, spec)
            parts.append(paged_attention(q_dec, k_cache, v_cache, tables, pos, mask, self.buffers, spec)[:, 0])
        return torch.cat(parts)


class KernelDecodeAttention(PagedAttention):
    """Decodes by a kernel that reads each sequence's blocks only as far as its own length: it takes int32 block
    tables and context lengths, the same for every layer of a step (the C and Triton backends)."""

    def begin_decodes(self, tables: list[list[int]], positions: torch.Tensor) -> None:
        self.tables = pad_block_tables(tables, positions.device).to(torch.int32)  # (S, width)
        self.context_lens = (positions + 1).to(torch.int32)  # (S,)

    def begin_static_decodes(self, tables: torch.Tensor, context_lens: torch.Tensor, positions: torch.Tensor) -> None:
        self.tables, self.context_lens = tables, context_lens


class CDecodeAttention(KernelDecodeAttention):
    """Decodes in one call of the C kernel (nanovllm/kernels), which reads each sequence's blocks where they lie,
    only as far as its own length: no copy, no padding, no mask."""

    name = "c"

    def decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, spec: AttentionSpec | None = None
    ) -> torch.Tensor:
        spec = spec or AttentionSpec()
        out = paged_decode_attention(  # the kernel computes in float32: a bfloat16 model's q is widened, out narrowed
            q.float().contiguous(), k_cache, v_cache, self.tables, self.context_lens,
            scale=spec.scale, window=spec.window, softcap=spec.softcap,
        )  # fmt: skip
        return out.to(q.dtype)

    @staticmethod
    def unavailable(pool) -> str | None:
        k = pool.k
        if k.device.type != "cpu" or k.dtype not in KV_DTYPES:  # checked first: no C build where it cannot be used
            return f"it reads float32 or bfloat16 CPU pools, and this KV pool is {k.dtype} on {k.device}"
        return c_kernels_unavailable()


class TritonAttention(KernelDecodeAttention):
    """Chapter 5: the store, the decodes and every prefill chunk in Triton kernels (nanovllm/kernels/triton), one
    call each per layer. On a GPU they are compiled; on a CPU, Triton's interpreter runs them (exact, and slow:
    for checking, so 'auto' picks this backend on a GPU only)."""

    name = "triton"
    store_skips_padding = True

    def __init__(self, pool):
        super().__init__(pool)
        from nanovllm.kernels import triton as kernels  # sets TRITON_INTERPRET on a machine without CUDA

        self.kernels = kernels

    @staticmethod
    def unavailable(pool) -> str | None:
        from nanovllm.kernels.triton import triton_unavailable

        return triton_unavailable()

    def begin_step(self, layout: StepLayout) -> None:
        self.layout, device = layout, layout.positions.device
        self.num_decodes = nd = len(layout.decode_tables)
        if nd:
            self.begin_decodes(layout.decode_tables, layout.positions[:nd])
        chunks = layout.prefills
        if chunks:
            self.prefill_tables = pad_block_tables([c.block_table for c in chunks], device).to(torch.int32)
            self.prefill_lens = torch.tensor([c.start + c.num_tokens for c in chunks], dtype=torch.int32, device=device)
            starts = [0]
            for c in chunks:
                starts.append(starts[-1] + c.num_tokens)
            self.query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)  # (chunks + 1,)
            self.max_query_len = max(c.num_tokens for c in chunks)  # from the host: the GPU need not be asked

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec | None = None
    ) -> torch.Tensor:
        k_cache, v_cache = self.pool.k[layer_idx], self.pool.v[layer_idx]
        q, k, v = q[0], k[0], v[0]  # (N, H, D)
        self.kernels.store_kv(k_cache, v_cache, k, v, self.layout.slots)  # slot -1 (padding) is skipped
        out = torch.empty_like(q)
        nd = self.num_decodes
        spec = spec or AttentionSpec()
        layer = dict(scale=spec.scale, window=spec.window, softcap=spec.softcap)
        if nd:
            # split-K is chosen from the shapes alone (never the lengths, which a graph replay changes)
            self.kernels.paged_decode_attention(
                q[:nd], k_cache, v_cache, self.tables, self.context_lens, out=out[:nd], **layer
            )
        if self.layout.prefills:  # keys come from the pool (stored above), so a first chunk needs no special case
            self.kernels.varlen_prefill_attention(
                q[nd:],
                k_cache,
                v_cache,
                self.prefill_tables,
                self.query_start_loc,
                self.prefill_lens,
                out=out[nd:],
                max_query_len=self.max_query_len,
                **layer,
            )
        return out[None]  # (1, N, Hq, D)


BACKENDS: dict[str, type[PagedAttention]] = {
    "torch": TorchPagedAttention,
    "c": CDecodeAttention,
    "triton": TritonAttention,
}
AUTO_ORDER = ("triton", "c", "torch")  # what 'auto' tries, best first
AUTO_DEVICES = {"triton": "cuda"}  # on a CPU the Triton interpreter checks tokens; it is no way to run fast


def make_attention_backend(name: str, pool, allowed: tuple[str, ...] = tuple(BACKENDS)) -> PagedAttention:
    """The backend called `name` for this pool; 'auto' takes the first of AUTO_ORDER (within `allowed`) that
    applies here. A backend that cannot run here is a ValueError that says why."""
    choices = ("auto", *allowed)
    if name not in choices:
        later = " (it arrives in a later chapter)" if name in BACKENDS else ""
        raise ValueError(f"attention_backend must be one of {choices}, got {name!r}{later}")
    for candidate in AUTO_ORDER if name == "auto" else (name,):
        if candidate not in allowed:
            continue
        if name == "auto" and AUTO_DEVICES.get(candidate, pool.k.device.type) != pool.k.device.type:
            continue
        cls = BACKENDS[candidate]
        why = cls.unavailable(pool)
        if why is None:
            return cls(pool)
        if name != "auto":
            raise ValueError(f"attention_backend={name!r} cannot be used: {why}")
    raise ValueError(f"no attention backend of {allowed} can run on this KV pool")
