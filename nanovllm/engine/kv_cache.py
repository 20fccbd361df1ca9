"""The KV pool: K and V for every layer as fixed-size blocks, sized from a memory budget; and the slot mapping."""

from __future__ import annotations

import os
from pathlib import Path

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
    max_model_len: int | None = None,
) -> KVPool:
    """The model's KV pool: `kv_cache_memory` bytes, else a fraction of free GPU memory, else on the CPU room for
    default_tokens, but no more than CPU_MEMORY_FRACTION of the memory available now (a long-context model's
    default would not fit). When that cannot hold one sequence of max_model_len tokens, it says what to set."""
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
        available = available_memory()
        if available is not None and budget > CPU_MEMORY_FRACTION * available:
            budget = int(CPU_MEMORY_FRACTION * available)
            one = -(-(max_model_len or 1) // block_size) * per_block  # one sequence of the full context
            if budget < max(one, per_block):
                raise ValueError(
                    f"the KV cache does not fit: one sequence of max_model_len={max_model_len or 1} tokens needs "
                    f"{one / 2**20:.1f} MiB, and the default KV budget is {CPU_MEMORY_FRACTION:.0%} of the "
                    f"{available / 2**20:.0f} MiB of memory available, {budget / 2**20:.1f} MiB; "
                    f"pass a smaller max_model_len, or kv_cache_memory (bytes) to choose the budget yourself"
                )
    return KVPool.from_budget(budget, *args, device=device)


CPU_MEMORY_FRACTION = 0.25  # of the memory available when the engine starts: the default CPU KV budget's ceiling


def available_memory() -> int | None:
    """Bytes of memory this process can still take without swapping, or None where that cannot be told.

    psutil when it is installed; else Linux's MemAvailable (capped by a cgroup v2 memory limit, as in a
    container); else the free physical pages os.sysconf reports.
    """
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = next(int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvail"))
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # Windows has no sysconf; macOS has no SC_AVPHYS_PAGES
            return None
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(available, 0)
