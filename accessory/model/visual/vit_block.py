"""timm's ``vision_transformer.Block`` as llama_adapter uses it (``visual_blocks.N.*``).

``Block(768, 16, 4.0, qkv_bias=True)`` with timm's defaults: nn.LayerNorm (eps 1e-5), exact GELU, no
layer scale, no q/k norm. Keys: ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``.
"""

import torch
from torch import nn

from .common import Mlp, QKVAttention


class ViTBlock(nn.Module):
    """Pre-LN transformer block on (B, L, dim): ``x += attn(norm1 x)``; ``x += mlp(norm2 x)``."""

    def __init__(self, dim: int = 768, heads: int = 16, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = QKVAttention(dim, heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
