"""DINOv2 ViT-g/14 as ``torch.hub.load("facebookresearch/dinov2", "dinov2_vitg14")`` builds it
(the original's ``dinov2_vitg14.*`` keys: ``cls_token``, ``pos_embed``, ``mask_token``,
``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.w12, mlp.w3,
ls2.gamma}``, ``norm``).

Position embeddings are stored for a 37x37 grid (518 px). Other grids get them resized the way the
hub code does: bicubic ``F.interpolate`` in float32 with ``scale_factor = (grid + 0.1) / 37`` per
axis (not ``size=grid``, which maps coordinates differently) and no antialiasing; a square input
with exactly 37x37 patches uses them as they are.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import QKVAttention


@dataclass
class DINOv2Config:
    """Sizes; the defaults are dinov2_vitg14 (1,136,480,768 parameters)."""

    image_size: int = 518        # the grid the position embeddings are stored for (37x37)
    patch_size: int = 14
    width: int = 1536
    layers: int = 40
    heads: int = 24
    mlp_ratio: float = 4.0
    eps: float = 1e-6
    layer_scale_init: float = 1.0
    interpolate_offset: float = 0.1

    @property
    def grid(self) -> int:
        """Patches per side of the stored position embeddings."""
        return self.image_size // self.patch_size

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden width: 2/3 of ``width * mlp_ratio``, rounded up to a multiple of 8 (4096)."""
        return (int(int(self.width * self.mlp_ratio) * 2 / 3) + 7) // 8 * 8


class PatchEmbed(nn.Module):
    """``proj``: the patch conv; (B, 3, H, W) -> (B, H/14 * W/14, width) in raster order."""

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    """``x * gamma`` per channel."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class SwiGLUFFN(nn.Module):
    """``w3(silu(a) * b)`` with ``[a, b] = chunk(w12(x), 2)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class DINOv2Block(nn.Module):
    """``x += ls1 * attn(norm1 x)``; ``x += ls2 * mlp(norm2 x)``."""

    def __init__(self, config: DINOv2Config):
        super().__init__()
        width = config.width
        self.norm1 = nn.LayerNorm(width, eps=config.eps)
        self.attn = QKVAttention(width, config.heads)
        self.ls1 = LayerScale(width, config.layer_scale_init)
        self.norm2 = nn.LayerNorm(width, eps=config.eps)
        self.mlp = SwiGLUFFN(width, config.ffn_hidden)
        self.ls2 = LayerScale(width, config.layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resize_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int, offset: float = 0.1) -> torch.Tensor:
    """The hub code's position-embedding resize: (1, 1+G*G, C) -> (1, 1+grid_h*grid_w, C).

    Computed in float32 and returned in ``pos_embed``'s dtype. The class position is kept; the G x G
    patch positions are resized by bicubic interpolation (align_corners=False, no antialias) with
    ``scale_factor = ((grid_h + offset) / G, (grid_w + offset) / G)``.
    """
    n_patches = pos_embed.shape[1] - 1
    stored = int(round(n_patches ** 0.5))
    if stored * stored != n_patches:
        raise ValueError(f"DINOv2 pos_embed has {n_patches} patch positions, not a square grid")
    dim = pos_embed.shape[-1]
    table = pos_embed.float()
    patches = table[:, 1:].reshape(1, stored, stored, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, mode="bicubic", antialias=False,
                            scale_factor=((grid_h + offset) / stored, (grid_w + offset) / stored))
    if tuple(patches.shape[-2:]) != (grid_h, grid_w):
        raise ValueError(f"resizing DINOv2 position embeddings from {stored}x{stored} to {grid_h}x{grid_w} "
                         f"gave {tuple(patches.shape[-2:])}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat([table[:, :1], patches], dim=1).to(pos_embed.dtype)


class DINOv2(nn.Module):
    """DINOv2 ViT: images (B, 3, H, W), H and W multiples of 14 -> :meth:`forward_features`."""

    def __init__(self, config: DINOv2Config = None):
        super().__init__()
        config = config or DINOv2Config()
        self.config = config
        width = config.width
        self.cls_token = nn.Parameter(torch.empty(1, 1, width))
        self.pos_embed = nn.Parameter(torch.empty(1, config.grid ** 2 + 1, width))
        self.mask_token = nn.Parameter(torch.empty(1, width))   # only used with masks (training)
        self.patch_embed = PatchEmbed(config.patch_size, width)
        self.blocks = nn.ModuleList(DINOv2Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(width, eps=config.eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.zeros_(self.mask_token)

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a ``grid_h`` x ``grid_w`` patch grid (1, 1+grid_h*grid_w, width)."""
        if grid_h == grid_w == self.config.grid:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, grid_h, grid_w, self.config.interpolate_offset)

    def prepare_tokens(self, pixels: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + H/14 * W/14, width): patches (masked ones replaced by
        ``mask_token`` where ``masks`` (B, n_patches) is True), class token, positions."""
        if pixels.dim() != 4 or pixels.shape[-2] % self.config.patch_size or pixels.shape[-1] % self.config.patch_size:
            raise ValueError(f"DINOv2 expects images (batch, 3, H, W) with H and W multiples of "
                             f"{self.config.patch_size}, got {tuple(pixels.shape)}")
        grid_h, grid_w = pixels.shape[-2] // self.config.patch_size, pixels.shape[-1] // self.config.patch_size
        x = self.patch_embed(pixels)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + self.interpolate_pos_encoding(grid_h, grid_w).to(x.dtype)

    def forward_features(self, pixels: torch.Tensor,
                         masks: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) -> ``{"x_norm_clstoken": (B, width), "x_norm_patchtokens": (B, N, width),
        "x_prenorm": (B, 1+N, width)}`` with N = H/14 * W/14 (256 at 224 px); the first two after
        the final ``norm``."""
        x = self.prepare_tokens(pixels, masks)
        for block in self.blocks:
            x = block(x)
        normed = self.norm(x)
        return {"x_norm_clstoken": normed[:, 0], "x_norm_patchtokens": normed[:, 1:], "x_prenorm": x}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normed tokens, class token first (B, 1+N, width)."""
        features = self.forward_features(pixels)
        return torch.cat([features["x_norm_clstoken"][:, None], features["x_norm_patchtokens"]], dim=1)
