"""The KV pool: K and V for every layer as fixed-size blocks, sized from a memory budget; and the slot mapping."""

from __future__ import annotations

import torch

from nanovllm.config import ModelConfig


def slot_mapping(block_table: list[int], positions: list[int], block_size: int) -> list[int]:
    """Where each token's K and V go in the pool, as flat slot numbers.

    Position p of a sequence lives in logical block p // block_size, at offset p % block_size;
    the block table maps the logical block to a physical one, so the flat slot is
        block_table[p // block_size] * block_size + p % block_size.

    Args:
        block_table: the sequence's physical block ids, in order.
        positions: the positions of the tokens to store.
        block_size: tokens per block.
    Returns:
        one slot number per position.
    """
    return [block_table[p // block_size] * block_size + p % block_size for p in positions]


class KVPool:
    """K and V tensors of shape (layers, num_blocks, block_size, kv_heads, head_dim)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ):
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        # zeros, not empty: attention may read (then mask out) slots no token wrote, and 0 * NaN is NaN
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V bytes of one block, all layers; every pool is sized through here, so it checks block_size."""
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @classmethod
    def from_budget(
        cls,
        budget: int,
        num_layers: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ) -> KVPool:
        per_block = cls.bytes_per_block(num_layers, block_size, kv_heads, head_dim, dtype)
        if budget < per_block:
            raise ValueError(
                f"a KV budget of {budget} bytes holds no block: one block of {block_size} tokens "
                f"needs {per_block} bytes"
            )
        return cls(num_layers, budget // per_block, block_size, kv_heads, head_dim, dtype, device)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst gets block src's K and V, in every layer (before anything new is stored)."""
        src = torch.tensor([s for s, _ in pairs], device=self.k.device)
        dst = torch.tensor([d for _, d in pairs], device=self.k.device)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        return (
            f"KV cache: {self.num_blocks} blocks x {self.block_size} tokens = {self.num_tokens} tokens, "
            f"{self.nbytes / 2**20:.1f} MiB"
        )


def pool_for_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: str | torch.device,
    block_size: int,
    kv_cache_memory: int | None,
    gpu_memory_utilization: float,
    default_tokens: int,
) -> KVPool:
    """The model's KV pool: `kv_cache_memory` bytes, else a fraction of free GPU memory, else default_tokens on CPU."""
    args = (config.num_layers, block_size, config.num_kv_heads, config.head_dim, dtype)
    per_block = KVPool.bytes_per_block(*args)  # first: it refuses a block_size below 1
    if kv_cache_memory is not None:
        budget = int(kv_cache_memory)
    elif torch.device(device).type == "cuda":
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        free, total = torch.cuda.mem_get_info(torch.device(device))
        budget = int(free - (1.0 - gpu_memory_utilization) * total)
    else:
        budget = -(-default_tokens // block_size) * per_block
    return KVPool.from_budget(budget, *args, device=device)
