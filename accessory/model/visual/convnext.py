"""OpenCLIP ConvNeXt-XXLarge's image trunk (timm ``ConvNeXt``, the original's ``openclip_convnext_xxl.*``).

The original takes ``open_clip``'s ``visual.trunk`` and replaces ``head.global_pool`` and
``head.flatten`` with identities, so the forward is the feature map after ``head.norm``:
(B, 3, H, W) -> (B, 3072, H/32, W/32). Keys: ``stem.{0,1}``, ``stages.S.downsample.{0,1}``
(stages 1-3), ``stages.S.blocks.B.{gamma, conv_dw, norm, mlp.fc1, mlp.fc2}``, ``head.norm``.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from .common import LayerNorm2d, Mlp


@dataclass
class ConvNeXtConfig:
    """Sizes; the defaults are convnext_xxlarge (843,398,016 parameters)."""

    depths: Tuple[int, ...] = (3, 4, 30, 3)
    dims: Tuple[int, ...] = (384, 768, 1536, 3072)
    patch_size: int = 4
    kernel_size: int = 7
    mlp_ratio: int = 4
    eps: float = 1e-5               # timm's convnext_xxlarge sets norm_eps=1e-5 for every norm
    layer_scale_init: float = 1e-6  # gamma's initial value (a checkpoint replaces it)
    head_eps: Optional[float] = None  # eps of head.norm when it differs from ``eps`` (HF ConvNextModel)


class ConvNeXtBlock(nn.Module):
    """``x + gamma * fc2(gelu(fc1(LN(dwconv7x7(x)))))``, the LN and MLP channels-last."""

    def __init__(self, dim: int, config: ConvNeXtConfig):
        super().__init__()
        self.layer_scale_init = config.layer_scale_init
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=config.kernel_size, padding=config.kernel_size // 2,
                                 groups=dim)
        self.norm = nn.LayerNorm(dim, eps=config.eps)
        self.mlp = Mlp(dim, config.mlp_ratio * dim)
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    """Optional 2x2 stride-2 ``downsample`` (LN2d then conv), then ``blocks``."""

    def __init__(self, in_dim: int, dim: int, depth: int, config: ConvNeXtConfig, downsample: bool):
        super().__init__()
        self.downsample = (nn.Sequential(LayerNorm2d(in_dim, eps=config.eps),
                                         nn.Conv2d(in_dim, dim, kernel_size=2, stride=2))
                           if downsample else nn.Identity())
        self.blocks = nn.Sequential(*(ConvNeXtBlock(dim, config) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtHead(nn.Module):
    """What is left of timm's ``NormMlpClassifierHead``: ``norm`` (LayerNorm2d)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = LayerNorm2d(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ConvNeXt(nn.Module):
    """The trunk: (B, 3, H, W) -> ``head.norm`` of the last stage's map (B, dims[-1], H/32, W/32)."""

    def __init__(self, config: ConvNeXtConfig = None):
        super().__init__()
        config = config or ConvNeXtConfig()
        if len(config.depths) != len(config.dims):
            raise ValueError(f"ConvNeXt depths {config.depths} and dims {config.dims} differ in length")
        self.config = config
        self.stem = nn.Sequential(nn.Conv2d(3, config.dims[0], kernel_size=config.patch_size,
                                            stride=config.patch_size),
                                  LayerNorm2d(config.dims[0], eps=config.eps))
        dims_in = (config.dims[0],) + tuple(config.dims[:-1])
        self.stages = nn.ModuleList(
            ConvNeXtStage(dim_in, dim, depth, config, downsample=index > 0)
            for index, (dim_in, dim, depth) in enumerate(zip(dims_in, config.dims, config.depths)))
        self.head = ConvNeXtHead(config.dims[-1], config.eps if config.head_eps is None else config.head_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, dims[-1], H/32, W/32) (H, W multiples of 32 at the real sizes)."""
        x = self.stem(pixels)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)
