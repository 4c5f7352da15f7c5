"""Scaled dot-product attention over a position-addressed KV cache."""

from typing import Optional

import torch
import torch.nn.functional as F

_last_mask = (None, 0, None, None)  # (positions, n_keys, dtype, mask): every layer of one forward shares it

#: What :func:`visibility_mask` returns for a prefill from position 0 in every row: the fused
#: causal kernel needs no mask.
CAUSAL = "causal"


def visibility_mask(positions: torch.Tensor, n_keys: int,
                    dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """(batch, 1, seq, n_keys) bool: key j is visible to a query at position p when j <= p.

    ``dtype``: the same mask as the additive 0 / -inf that scaled_dot_product_attention turns a
    bool mask into (on a GPU that conversion costs three small kernels per layer; made here, it
    is made once per forward).

    None when every key is visible: a CPU decode step whose rows all sit at the last cached
    position (one stream, or streams of equal length). torch's CPU attention is about ten times
    slower with a mask than without one for a single query (measured 600 vs 66 us a call, 32
    heads over 48 keys), which made the mask a large share of a decode step.

    :data:`CAUSAL` when every row's queries are at 0 .. n_keys-1 (a prefill from the start, rows
    right-padded): the fused causal kernel skips the keys past the diagonal instead of computing
    and masking them, 1.7-1.9x faster than the mask at 1400 positions on the 2-core CPU of
    benchmarks/README.md (1.13x at 512), where a picture's 1,295 positions make such prefills.
    """
    global _last_mask
    cached_positions, cached_keys, cached_dtype, cached = _last_mask
    if cached_positions is positions and cached_keys == n_keys and cached_dtype == dtype:
        return cached
    if positions.shape[1] == 1 and positions.device.type == "cpu" and bool((positions == n_keys - 1).all()):
        mask = None
    elif positions.shape[1] == n_keys > 1 and bool((positions == torch.arange(n_keys, device=positions.device)).all()):
        mask = CAUSAL
    else:
        key_positions = torch.arange(n_keys, device=positions.device)
        mask = key_positions[None, None, None, :] <= positions[:, None, :, None]
        if dtype is not None:
            mask = torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    _last_mask = (positions, n_keys, dtype, mask)
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           positions: Optional[torch.Tensor]) -> torch.Tensor:
    """Causal attention for q (batch, heads, seq, hd) over k/v (batch, kv_heads, keys, hd).

    ``positions`` (batch, seq) gives each query's absolute position; key ``j`` is visible to a
    query at position ``p`` when ``j <= p``. ``None`` means q and k cover the same positions
    0..seq-1 (a full forward without cache), where the fused causal kernel is used.
    Query head ``h`` reads kv head ``h // (heads / kv_heads)`` (the original's repeat_interleave).
    """
    n_rep = q.shape[1] // k.shape[1]
    if positions is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=n_rep > 1)
    # (None: all visible, q is one position per row; additive on a GPU, in the dtype attention runs in)
    mask = visibility_mask(positions, k.shape[2], k.dtype if k.is_cuda else None)
    causal = mask is CAUSAL
    if causal:
        mask = None
    # on a CPU in float32 (half precision runs several times slower there without native half
    # arithmetic; a bf16 cache is read through float32 copies), elsewhere in the cache's dtype
    dtype = torch.float32 if k.device.type == "cpu" else k.dtype
    if q.dtype != dtype or k.dtype != dtype:
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask,
                                             is_causal=causal, enable_gqa=n_rep > 1)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=n_rep > 1)
