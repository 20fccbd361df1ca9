"""What the three Triton kernels' wrappers share: whether Triton interprets, tile sizes, and the argument checks."""

from __future__ import annotations

import os

import torch
import triton


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.3 reads the variable through its knobs
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Read once, before any kernel below is decorated: @triton.jit makes an interpreted function by this same setting.
INTERPRETING = _interpreting()

# The interpreter runs each program's tile operations as numpy calls, one program after another: its cost grows with
# programs x loop iterations, not with the tile's size, so it gets big tiles. On a GPU a tile must fit in registers.
DECODE_BLOCK_N = 128 if INTERPRETING else 64  # context tokens per iteration of the decode kernel
PREFILL_BLOCK_M = 128 if INTERPRETING else 64  # (query token, query head) rows per prefill program
PREFILL_BLOCK_N = 128 if INTERPRETING else 64  # context tokens per iteration of the prefill kernel

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NO_WINDOW = 2**30  # the window the kernels get for a layer without one: wider than any context


def check_window_softcap(window: int | None, softcap: float | None) -> None:
    """A sliding window is a positive integer (below NO_WINDOW) or None; a soft cap a positive number or None."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or not 0 < window < NO_WINDOW):
        raise ValueError(f"window must be a positive integer or None, got {window!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap <= 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")


def interpret_triton_library() -> None:
    """Make Triton's own library functions (tl.max, tl.sum, tl.rand, ...) interpreted, like our kernels.

    @triton.jit reads TRITON_INTERPRET when it decorates. torch imports Triton for its own uses (torch._dynamo asks
    whether it is installed), and if that happened before this package set the variable, the library's functions
    were made for GPU compilation, and an interpreted kernel that calls tl.max fails with "Cannot call @triton.jit'd
    outside of the scope of a kernel". Reloading those modules decorates them again, now interpreted; the names
    `triton.language` re-exports from them are bound to the new functions.
    """
    import importlib

    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.standard.max, InterpretedFunction):
        return  # Triton was imported with the interpreter on: nothing to redo
    for module in (tl.standard, tl.random):
        old = {name: value for name, value in vars(module).items() if not name.startswith("__")}
        importlib.reload(module)  # the same module object, its functions decorated again (tensor methods too)
        for name, value in vars(tl).items():
            if name in old and value is old[name]:
                setattr(tl, name, getattr(module, name))


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot's operands are cast to float32 first.

    Always for a float32 pool (the dot itself then asks for IEEE precision, not TF32, so an fp32 engine gets fp32
    results), and always in the interpreter: there tl.dot on bf16 returns garbage (numpy has no bf16 and multiplies
    the raw bits) and numpy's fp16 matmul is slow. On a GPU fp16 and bf16 go to the tensor cores as they are.
    """
    return INTERPRETING or dtype == torch.float32


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def check_tensor(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], ndim: int, contiguous=True) -> None:
    """A ValueError that names the argument unless t has one of `dtypes`, `ndim` dimensions and is contiguous."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")


def check_device(**tensors: torch.Tensor) -> None:
    """Compiled kernels read CUDA memory; the interpreter reads CPU memory. All tensors on one device."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"all tensors must be on one device, got {where}")
    device = devices.pop()
    if not INTERPRETING and device.type != "cuda":
        raise ValueError(
            f"the Triton kernels compile for CUDA tensors, got {device}; "
            "set TRITON_INTERPRET=1 before importing nanovllm.kernels.triton to run them on the CPU"
        )


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """One layer's pool, (num_blocks, block_size, Hkv, D) contiguous: the kernels compute addresses from that layout."""
    check_tensor("k_cache", k_cache, FLOAT_DTYPES, 4)
    check_tensor("v_cache", v_cache, FLOAT_DTYPES, 4)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"k_cache and v_cache must match, got {tuple(k_cache.shape)} {k_cache.dtype} "
            f"and {tuple(v_cache.shape)} {v_cache.dtype}"
        )
    num_blocks, block_size, hkv, d = k_cache.shape
    if d < 1 or hkv < 1 or block_size < 1:
        raise ValueError(f"empty cache dimensions: {tuple(k_cache.shape)}")
    return num_blocks, block_size, hkv, d


def check_query(q: torch.Tensor, k_cache: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """q (rows, Hq, D) of the pool's dtype and head size, Hq a multiple of Hkv; returns `out` or a new one like q."""
    check_tensor("q", q, FLOAT_DTYPES, 3)
    hkv, d = k_cache.shape[2:]
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q and the cache must have one dtype, got {q.dtype} and {k_cache.dtype}")
    if q.shape[2] != d or q.shape[1] % hkv:
        raise ValueError(
            f"shapes do not match: q {tuple(q.shape)} needs head_dim {d} and a multiple of {hkv} heads "
            f"(k_cache {tuple(k_cache.shape)})"
        )
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous() or out.device != q.device:
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    return out


def check_tables(block_tables: torch.Tensor, context_lens: torch.Tensor, num_seqs: int) -> None:
    check_tensor("block_tables", block_tables, (torch.int32,), 2)
    check_tensor("context_lens", context_lens, (torch.int32,), 1)
    if block_tables.shape[0] != num_seqs or context_lens.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
            f"need one row per sequence ({num_seqs})"
        )


def check_ranges(block_tables: torch.Tensor, context_lens: torch.Tensor, num_blocks: int, block_size: int) -> None:
    """On the CPU only (on a GPU, reading the values back would stall the stream): lengths and block ids in range.

    A kernel reads memory by these numbers without checking them; the interpreter would index out of its arrays.
    """
    if context_lens.device.type != "cpu" or context_lens.numel() == 0:
        return
    max_blocks = block_tables.shape[1]
    if int(context_lens.min()) < 1 or int(context_lens.max()) > max_blocks * block_size:
        raise IndexError(f"context lengths must be in 1..{max_blocks * block_size} (max_blocks x block_size)")
    used = torch.arange(max_blocks)[None, :] * block_size < context_lens[:, None]  # (S, max_blocks) blocks read
    ids = block_tables[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise IndexError(f"a block id of a block in use is outside the pool's 0..{num_blocks - 1}")
