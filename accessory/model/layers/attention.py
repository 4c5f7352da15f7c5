"""Scaled dot-product attention over a position-addressed KV cache."""

from typing import Optional

import torch
import torch.nn.functional as F


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
        mask = None
        is_causal = q.shape[2] > 1
    else:
        key_positions = torch.arange(k.shape[2], device=q.device)
        mask = key_positions[None, None, None, :] <= positions[:, None, :, None]
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=n_rep > 1)
