"""A preallocated key/value cache addressed by absolute position, one slot per batch row."""

import itertools
from typing import List, Optional, Tuple

import torch

from ...quant.memory import zeros_in_huge_pages


def cache_dtype(weight_dtype: torch.dtype, device: torch.device, native: bool = False) -> torch.dtype:
    """The dtype to keep keys and values in: the model's, except on a CPU, where a half-precision
    model's cache is float32 unless its decode steps run natively.

    CPUs without native half-precision arithmetic run torch's half-precision attention several
    times slower than float32 (measured 5-7x on AVX2), and handing it float32 copies of a bf16
    cache each step cost a decode step at 1536 tokens a quarter of its speed. The native decode
    step (``native``: ``layers/fast_decode.py`` takes this model's steps) reads a bf16 cache
    directly: half the memory, and half the bytes each step reads (113 MB in float32 for a
    12-layer, 768-wide model at 1536 tokens; measured 1.07x faster there).
    """
    if torch.device(device).type == "cpu" and weight_dtype in (torch.bfloat16, torch.float16):
        return torch.bfloat16 if native and weight_dtype is torch.bfloat16 else torch.float32
    return weight_dtype


class KVCache:
    """Keys and values of every layer, laid out (batch, kv_heads, max_len, head_dim).

    Each row writes at its own positions, so rows of different prompt lengths share one cache
    without padding tokens ever being attended: a query at position p sees keys at positions <= p
    of its own row only (see :func:`accessory.model.layers.attention.attend`).
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        if torch.device(device).type == "cpu":
            # one allocation in 2 MiB pages where the system gives them (quant/memory.py): a
            # decode step reads every layer's keys and values after its weights have evicted them
            # from the caches and the TLB
            size = batch_size * n_kv_heads * max_len * head_dim
            every = zeros_in_huge_pages(2 * n_layers * size, dtype).view(2 * n_layers, *shape)
            self.keys: List[torch.Tensor] = list(every[:n_layers].unbind())
            self.values: List[torch.Tensor] = list(every[n_layers:].unbind())
        else:
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self._planned_for: Optional[torch.Tensor] = None
        self._plan = None

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def _write_plan(self, positions: torch.Tensor):
        """How to write at ``positions``; worked out once per forward (every layer shares it)."""
        if self._planned_for is positions:
            return self._plan
        bsz, seqlen = positions.shape
        if seqlen == 1 and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # a decode step captured in a CUDA graph (generation/cuda_graphs.py): no read of the
            # device, so attend over the whole cache (the mask hides slots beyond each position)
            plan = ("rows", (torch.arange(bsz, device=positions.device), positions[:, 0]), self.max_len)
            self._planned_for, self._plan = positions, plan
            return plan
        used_len = int(positions.max()) + 1
        if used_len > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {used_len} requested")
        first = positions[:, :1]
        if seqlen == 1:
            plan = ("rows", (torch.arange(bsz, device=positions.device), positions[:, 0]), used_len)
        elif bool((positions == first[0, 0] + torch.arange(seqlen, device=positions.device)).all()):
            start = int(first[0, 0])
            plan = ("slice", (start, start + seqlen), used_len)  # the same range in every row
        else:
            plan = ("scatter", positions, used_len)
        self._planned_for, self._plan = positions, plan
        return plan

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               used_len: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (batch, kv_heads, seq, head_dim) at ``positions`` (batch, seq) and
        return this layer's keys and values up to the highest position written so far
        (``used_len`` overrides that length)."""
        kind, where, planned_len = self._write_plan(positions)
        keys, values = self.keys[layer], self.values[layer]
        if kind == "rows":
            rows, cols = where
            keys[rows, :, cols] = k[:, :, 0].to(keys.dtype)
            values[rows, :, cols] = v[:, :, 0].to(values.dtype)
        elif kind == "slice":
            keys[:, :, where[0]:where[1]] = k
            values[:, :, where[0]:where[1]] = v
        else:
            index = where[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            keys.scatter_(2, index, k.to(keys.dtype))
            values.scatter_(2, index, v.to(values.dtype))
        length = planned_len if used_len is None else used_len
        if length > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {length} requested")
        return keys[:, :, :length], values[:, :, :length]

    @property
    def geometry(self) -> Tuple[int, int, int]:
        """(layers, kv heads, head size): what a cache must share with another to take its keys."""
        return (len(self.keys), self.keys[0].shape[1], self.keys[0].shape[3]) if self.keys else (0, 0, 0)

    def copy_prefix_from(self, other: "KVCache", length: int, row: int = 0) -> bool:
        """Copy positions 0..length-1 of every layer's keys and values from ``other``'s first row
        into batch row ``row`` (the engine's prompt cache); False, copying nothing, when the two
        differ in geometry or either holds fewer positions."""
        if other.geometry != self.geometry or length > min(self.max_len, other.max_len):
            return False
        for mine, theirs in itertools.chain(zip(self.keys, other.keys), zip(self.values, other.values)):
            mine[row, :, :length].copy_(theirs[0, :, :length])
        self._planned_for = self._plan = None
        return True

    def row_prefix(self, row: int, length: int) -> "KVCache":
        """A one-row cache of ``length`` positions: a copy of batch row ``row``'s first ones."""
        out = KVCache.__new__(KVCache)
        out.keys = [k[row:row + 1, :, :length].clone() for k in self.keys]
        out.values = [v[row:row + 1, :, :length].clone() for v in self.values]
        out.max_len = length
        out._planned_for = out._plan = None
        return out

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (a 1-D index), e.g. once other rows have finished."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self._planned_for = self._plan = None
