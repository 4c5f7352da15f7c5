"""A preallocated key/value cache addressed by absolute position, one slot per batch row."""

from typing import List, Tuple

import torch


class KVCache:
    """Keys and values of every layer, laid out (batch, kv_heads, max_len, head_dim).

    Each row writes at its own positions, so rows of different prompt lengths share one cache
    without padding tokens ever being attended: a query at position p sees keys at positions <= p
    of its own row only (see :func:`accessory.model.layers.attention.attend`).
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.keys: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               used_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (batch, kv_heads, seq, head_dim) at ``positions`` (batch, seq) and
        return the first ``used_len`` positions of this layer's keys and values."""
        if used_len > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {used_len} requested")
        index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.keys[layer].scatter_(2, index, k.to(self.keys[layer].dtype))
        self.values[layer].scatter_(2, index, v.to(self.values[layer].dtype))
        return self.keys[layer][:, :, :used_len], self.values[layer][:, :, :used_len]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (a 1-D index), e.g. once other rows have finished."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
