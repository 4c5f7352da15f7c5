"""OpenAI CLIP ViT-L/14 as open_clip 2.24 lays it out (the original's ``clip.*`` keys).

Only the image side runs: :meth:`CLIP.encode_image` is the original repo's ``clip_encode_image``
(all 257 tokens after ``ln_post``, then optionally ``@ visual.proj``). The text-side tensors
(``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection``, ``logit_scale``
and, for the CLIP-prefix llama_types, the text tower ``transformer.*``) exist only so checkpoints
load with their exact key set; nothing reads them.

The activation depends on how the original built the CLIP: ``pretrained='openai'`` gives QuickGELU
(the CLIP-prefix types and llama_adapter), ``pretrained=None`` gives exact GELU (the ens types,
SPHINX). Pick it with :attr:`CLIPConfig.quick_gelu`.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from .common import QuickGELU, attend, check_grid


@dataclass
class CLIPConfig:
    """Sizes of the CLIP; the defaults are ViT-L/14 at 224 px (visual 303,966,208 parameters)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024            # visual transformer width
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    embed_dim: int = 768         # output width of visual.proj and text_projection
    quick_gelu: bool = False     # True for open_clip's pretrained='openai' build, False for pretrained=None
    text_tower: bool = False     # build transformer.resblocks.* (CLIP-prefix llama_types keep them)
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 768
    text_heads: int = 12
    text_layers: int = 12
    eps: float = 1e-5

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


class CLIPAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter names (``in_proj_*``, ``out_proj``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"CLIP width {width} is not a multiple of the head count {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(attend(q, k, v, self.heads))


class CLIPMlp(nn.Module):
    """``c_proj(act(c_fc(x)))`` (open_clip's ``mlp.c_fc`` / ``mlp.c_proj`` names)."""

    def __init__(self, width: int, hidden: int, quick_gelu: bool):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class CLIPResidualBlock(nn.Module):
    """Pre-LN block: ``x += attn(ln_1 x)``; ``x += mlp(ln_2 x)``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = CLIPAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMlp(width, int(width * mlp_ratio), quick_gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CLIPTransformer(nn.Module):
    """A stack of :class:`CLIPResidualBlock` (keys ``resblocks.N.*``), batch-first (B, L, width).

    The original permutes to sequence-first around open_clip's transformer; per token the math is
    the same, so this one stays batch-first.
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool, eps: float):
        super().__init__()
        self.resblocks = nn.ModuleList(
            CLIPResidualBlock(width, heads, mlp_ratio, quick_gelu, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class CLIPVisionTransformer(nn.Module):
    """open_clip's ``VisionTransformer`` (keys ``conv1``, ``class_embedding``, ``positional_embedding``,
    ``ln_pre``, ``transformer.resblocks.N``, ``ln_post``, ``proj``)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(config.grid ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=config.eps)
        self.transformer = CLIPTransformer(width, config.layers, config.heads, config.mlp_ratio,
                                           config.quick_gelu, config.eps)
        self.ln_post = nn.LayerNorm(width, eps=config.eps)
        self.proj = nn.Parameter(torch.empty(width, config.embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = self.config.width ** -0.5
        for param in (self.class_embedding, self.positional_embedding, self.proj):
            nn.init.normal_(param, std=scale)

    def forward(self, pixels: torch.Tensor, project: bool = True) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, grid²+1, embed_dim) with ``project``, else (B, grid²+1, width).

        All tokens go through ``ln_post`` (class token first, then patches in raster order).
        """
        check_grid(pixels, self.config.patch_size, self.config.grid, "CLIP")
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        return x @ self.proj if project else x


class CLIP(nn.Module):
    """The whole open_clip ``CLIP`` state as the original checkpoints hold it; runs images only.

    ``CLIP(config).state_dict()`` keys: ``visual.*``, ``token_embedding.weight``,
    ``positional_embedding``, ``ln_final.*``, ``text_projection``, ``logit_scale``, and
    ``transformer.resblocks.*`` when ``config.text_tower``.
    """

    def __init__(self, config: CLIPConfig = None):
        super().__init__()
        config = config or CLIPConfig()
        self.config = config
        self.visual = CLIPVisionTransformer(config)
        self.transformer = (CLIPTransformer(config.text_width, config.text_layers, config.text_heads, 4.0,
                                            config.quick_gelu, config.eps)
                            if config.text_tower else None)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.ln_final = nn.LayerNorm(config.text_width, eps=config.eps)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.config.text_width ** -0.5)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))

    def encode_image(self, pixels: torch.Tensor, project: bool = True) -> torch.Tensor:
        """The original's ``clip_encode_image``: (B, 3, 224, 224) -> (B, 257, 768) with ``project``
        (CLIP-prefix types, llama_adapter), (B, 257, 1024) without (ens types). Images must already
        be in the CLIP's dtype."""
        return self.visual(pixels, project=project)

    forward = encode_image
