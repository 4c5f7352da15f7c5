"""Scaled dot-product attention over a position-addressed KV cache."""

from typing import Optional

import torch
import torch.nn.functional as F

_last_mask = (None, 0, None)  # (positions, n_keys, mask): every layer of one forward shares it


def visibility_mask(positions: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(batch, 1, seq, n_keys) bool: key j is visible to a query at position p when j <= p."""
    global _last_mask
    cached_positions, cached_keys, cached = _last_mask
    if cached_positions is positions and cached_keys == n_keys:
        return cached
    key_positions = torch.arange(n_keys, device=positions.device)
    mask = key_positions[None, None, None, :] <= positions[:, None, :, None]
    _last_mask = (positions, n_keys, mask)
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
    mask = visibility_mask(positions, k.shape[2])
    if k.dtype != q.dtype:  # a float32 cache (see KVCache): attend in its precision
        out = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, enable_gqa=n_rep > 1)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_rep > 1)
