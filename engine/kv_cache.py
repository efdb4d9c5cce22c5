"""A preallocated KV cache with one length per sequence slot.

The buffers are allocated once. A forward writes its new K/V rows at per-sequence positions and
reads the slots' buffers back up to the longest sequence; what each query may see is decided by
the step's 4-D attention mask, not by the cache. Accepting a tree path is an index copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """K and V as [layers, slots, kv_heads, capacity, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        slots: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_layers, slots, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def writer(self, rows: slice, positions: torch.Tensor, kv_len: int) -> CacheWriter:
        """The object handed to the HF forward as `cache` for slots `rows`; positions [B, T]."""
        batch_index = torch.arange(positions.shape[0], device=positions.device)[:, None]
        return CacheWriter(self, rows, batch_index, positions, kv_len)

    def move(self, rows: slice, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy positions src [B, A] to dst [B, A] within each slot of `rows`, in every layer."""
        batch_index = torch.arange(src.shape[0], device=src.device)[:, None]
        for buf in (self.k, self.v):
            view = buf[:, rows]  # [L, B, H, C, Dh]
            view[:, batch_index, :, dst] = view[:, batch_index, :, src]  # gather first, then scatter

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Move one sequence's first `length` positions to another slot (batch compaction)."""
        for buf in (self.k, self.v):
            buf[:, dst, :, :length] = buf[:, src, :, :length]


@dataclass
class CacheWriter:
    """Duck-types the part of transformers' Cache that attention layers call: `update`."""

    cache: KVCache
    rows: slice
    batch_index: torch.Tensor  # [B, 1]
    positions: torch.Tensor  # [B, T]: where each new token's K/V goes
    kv_len: int  # keys returned per slot: the longest sequence after this forward

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key, value [B, kv_heads, T, head_dim] -> this step's keys and values [B, kv_heads, S, head_dim]."""
        k = self.cache.k[layer_idx, self.rows]  # [B, H, C, Dh], a view
        v = self.cache.v[layer_idx, self.rows]
        k[self.batch_index, :, self.positions] = key.transpose(1, 2)
        v[self.batch_index, :, self.positions] = value.transpose(1, 2)
        return k[:, :, : self.kv_len], v[:, :, : self.kv_len]


def step_mask(lengths: torch.Tensor, write: torch.Tensor, tree_mask: torch.Tensor, kv_len: int, dtype: torch.dtype
              ) -> torch.Tensor:
    """A step's additive attention mask [B, 1, T, S]: each new token sees its sequence's cached prefix
    (lengths [B]) and, among the new tokens (written at cache rows write [B, T]), those its tree
    allows (tree_mask [B, T, T])."""
    b, t = write.shape
    visible = (torch.arange(kv_len, device=write.device) < lengths[:, None])[:, None, :].repeat(1, t, 1)
    visible.scatter_(2, write[:, None, :].expand(b, t, t), tree_mask)  # [B, T, S]
    mask = torch.zeros(b, 1, t, kv_len, dtype=dtype, device=write.device)
    return mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
