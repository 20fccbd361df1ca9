"""A contiguous KV cache: per layer, one (rows, max_model_len, Hkv, D) tensor for K and one for V, reserved up front."""

from __future__ import annotations

import torch

from nanovllm.layers.attention import AttentionSpec, masked_attention, padded_causal_mask, window_mask


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
) -> None:
    """Store the new tokens' keys and values in the cache, in place: token t of row b goes to slot positions[b, t].

    A row's slot is its token's position, so the cache of row b holds its sequence in order.
    Right padding puts padding after the real tokens, where later decode steps overwrite it.

    Args:
        k_cache, v_cache: (B, max_len, Hkv, D) one layer's cache, one row per sequence.
        k, v: (B, T, Hkv, D) the new tokens' keys and values.
        positions: (B, T) each new token's position.
    """
    rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(positions)  # (B, T)
    k_cache[rows, positions] = k
    v_cache[rows, positions] = v


class ContiguousKVCache:
    """The attention backend of chapter 2: every row reserves max_len slots of K and V, used or not."""

    def __init__(
        self,
        num_layers: int,
        rows: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ):
        shape = (num_layers, rows, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.mask = torch.ones(rows, 1, 1, dtype=torch.bool, device=device)
        self.batch = rows

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def begin_step(self, positions: torch.Tensor) -> None:
        """Set this step's positions (B, T) for B <= rows; the mask is the same for every layer, so build it once."""
        self.positions, self.batch = positions, positions.shape[0]
        self.mask = padded_causal_mask(positions, int(positions.max()) + 1)
        self.window_masks: dict[int, torch.Tensor] = {}  # a sliding-window layer's narrower mask, by window

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec | None = None
    ) -> torch.Tensor:
        k_cache, v_cache = self.k[layer_idx, : self.batch], self.v[layer_idx, : self.batch]
        write_kv(k_cache, v_cache, k, v, self.positions)
        S = self.mask.shape[-1]
        mask = self.mask
        if spec is not None and spec.window is not None:  # keys older than the window are kept, but not read
            if spec.window not in self.window_masks:
                self.window_masks[spec.window] = window_mask(self.mask, self.positions, spec.window)
            mask = self.window_masks[spec.window]
        return masked_attention(q, k_cache[:, :S], v_cache[:, :S], mask, spec=spec)
