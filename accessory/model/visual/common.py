"""Small pieces the image encoders share: channels-first LayerNorm, activations, attention math."""

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, H, W) map (timm's ``LayerNorm2d``; keys weight, bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``: the two-layer MLP of timm / HF ViTs (keys ``fc1.*``, ``fc2.*``)."""

    def __init__(self, dim: int, hidden_dim: int, act: nn.Module = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act if act is not None else nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Unmasked softmax attention over the sequence axis.

    ``q`` (B, Lq, H*D), ``k`` and ``v`` (B, Lk, H*D) -> (B, Lq, H*D); scores scaled by ``D ** -0.5``.
    """
    batch, q_len, width = q.shape
    head_dim = width // n_heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, t.shape[1], n_heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return out.transpose(1, 2).reshape(batch, q_len, width)


class QKVAttention(nn.Module):
    """Self-attention with one packed ``qkv`` Linear and an output ``proj`` (timm / DINOv2 naming)."""

    def __init__(self, dim: int, n_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"attention width {dim} is not a multiple of the head count {n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attend(q, k, v, self.n_heads))


def check_grid(pixels: torch.Tensor, patch_size: int, grid: int, what: str) -> None:
    """Raise a clear error unless ``pixels`` (B, 3, H, W) makes exactly ``grid`` x ``grid`` patches."""
    if pixels.dim() != 4:
        raise ValueError(f"{what} expects images shaped (batch, 3, height, width), got {tuple(pixels.shape)}")
    size = grid * patch_size
    if tuple(pixels.shape[-2:]) != (size, size):
        raise ValueError(f"{what} has position embeddings for {size}x{size} images ({grid}x{grid} patches of "
                         f"{patch_size}) but got {pixels.shape[-2]}x{pixels.shape[-1]}; resize the images "
                         f"to {size}x{size} first")
