"""Triton kernel 1: write each new token's K and V into the block pool at its slot (slot -1 = padding, skipped)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton._common import INTERPRETING, check_cache, check_device, check_tensor, next_pow2

# elements (tokens x Hkv*D) per program: a few KB per program on a GPU, big tiles for the interpreter
STORE_TILE = 16384 if INTERPRETING else 2048


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    num_tokens, stride_kt, stride_kh, stride_vt, stride_vh,
    HD: tl.constexpr,  # Hkv * D: the elements of one token's K (or V), one slot of the pool
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_HD: tl.constexpr,  # HD rounded up to a power of 2 (tl.arange needs one)
):  # fmt: skip
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) the tokens of this program
    e = tl.arange(0, BLOCK_HD)  # (BLOCK_HD,) element of a token's (Hkv, D) slice
    h, d = e // D, e % D
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    # padding rows (slot -1) and tokens past the end are neither read nor written
    ok = (slot >= 0)[:, None] & (e < HD)[None, :]  # (BLOCK_T, BLOCK_HD)
    t64 = t.to(tl.int64)[:, None]  # int64: token * stride passes 2**31 for a long prefill of a wide model
    k = tl.load(k_ptr + t64 * stride_kt + (h * stride_kh + d)[None, :], mask=ok)
    v = tl.load(v_ptr + t64 * stride_vt + (h * stride_vh + d)[None, :], mask=ok)
    # the pool is (num_blocks, block_size, Hkv, D) contiguous: slot s starts at element s * HD, whatever the block size
    dst = slot[:, None] * HD + e[None, :]
    tl.store(k_cache_ptr + dst, k, mask=ok)
    tl.store(v_cache_ptr + dst, v, mask=ok)


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write N tokens' K and V into one layer's pool: what nanovllm.layers.attention.store_kv does, padding allowed.

    Token i goes to flat slot slot_mapping[i], i.e. block slot // block_size at offset slot % block_size.

    Args:
        k_cache, v_cache: (num_blocks, block_size, Hkv, D) contiguous float32, float16 or bfloat16, written in place.
        k, v: (N, Hkv, D) of the cache's dtype; any token and head strides, the last dimension contiguous.
        slot_mapping: (N,) int32 or int64 contiguous; -1 marks a padding row that is not written.
    """
    num_blocks, block_size, hkv, d = check_cache(k_cache, v_cache)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, (k_cache.dtype,), 3, contiguous=False)
        if tuple(t.shape[1:]) != (hkv, d) or t.stride(2) != 1:
            raise ValueError(
                f"{name} must be (N, {hkv}, {d}) with a contiguous last dimension to match k_cache "
                f"{tuple(k_cache.shape)}, got shape {tuple(t.shape)}, strides {t.stride()}"
            )
    check_tensor("slot_mapping", slot_mapping, (torch.int32, torch.int64), 1)
    n = slot_mapping.shape[0]
    if k.shape[0] != n or v.shape[0] != n:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} and slot_mapping {tuple(slot_mapping.shape)} differ")
    check_device(k_cache=k_cache, v_cache=v_cache, k=k, v=v, slot_mapping=slot_mapping)
    if n == 0:
        return
    if slot_mapping.device.type == "cpu" and int(slot_mapping.max()) >= num_blocks * block_size:
        raise IndexError(f"a slot is past the pool's {num_blocks * block_size} slots")
    block_hd = next_pow2(hkv * d)
    block_t = max(1, STORE_TILE // block_hd)
    grid = (triton.cdiv(n, block_t),)
    _store_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping, n, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HD=hkv * d, D=d, BLOCK_T=block_t, BLOCK_HD=block_hd,
    )  # fmt: skip
