"""BLIP-2's image side (EVA ViT-g + Q-Former) with HF transformers' ``Blip2Model`` key names.

The original builds ``Blip2Model`` for Salesforce/blip2-opt-2.7b and drops the OPT language model
and ``language_projection``; what is left (the ``qformer.*`` keys of its checkpoints) is this
module's state: ``vision_model.*``, ``qformer.*`` and ``query_tokens``. :meth:`BLIP2.qformer_features`
is ``Blip2Model.get_qformer_features(...).last_hidden_state`` in eval mode (no dropout).
"""

from dataclasses import dataclass

import torch
from torch import nn

from .common import Mlp, attend, check_grid


@dataclass
class BLIP2Config:
    """Sizes; the defaults are blip2-opt-2.7b's bundled config (1,091,114,496 parameters)."""

    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1408
    vision_layers: int = 39
    vision_heads: int = 16
    vision_mlp: int = 6144
    vision_eps: float = 1e-6
    qformer_width: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_mlp: int = 3072
    qformer_eps: float = 1e-12
    cross_attention_frequency: int = 2   # layers 0, f, 2f, ... attend to the image
    num_query_tokens: int = 32

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


# ------------------------------------------------------------------------------------------------
# Vision encoder (keys vision_model.*)


class BLIP2VisionEmbeddings(nn.Module):
    """Patch conv + class token + learned positions (keys ``class_embedding``, ``patch_embedding``,
    ``position_embedding``)."""

    def __init__(self, config: BLIP2Config):
        super().__init__()
        self.config = config
        width = config.vision_width
        self.class_embedding = nn.Parameter(torch.empty(1, 1, width))
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.empty(1, config.grid ** 2 + 1, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.class_embedding, std=0.02)
        nn.init.trunc_normal_(self.position_embedding, std=0.02)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        check_grid(pixels, self.config.patch_size, self.config.grid, "the BLIP-2 vision encoder")
        dtype = self.patch_embedding.weight.dtype     # like HF, the images are cast to the conv's dtype
        x = self.patch_embedding(pixels.to(dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(dtype)


class BLIP2VisionAttention(nn.Module):
    """Self-attention with a packed, biased ``qkv`` and an output ``projection``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.projection = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.projection(attend(q, k, v, self.heads))


class BLIP2VisionLayer(nn.Module):
    """Pre-LN ViT layer: ``x += attn(LN1 x)``; ``x += fc2(gelu(fc1(LN2 x)))`` (exact GELU)."""

    def __init__(self, config: BLIP2Config):
        super().__init__()
        width = config.vision_width
        self.self_attn = BLIP2VisionAttention(width, config.vision_heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=config.vision_eps)
        self.mlp = Mlp(width, config.vision_mlp)
        self.layer_norm2 = nn.LayerNorm(width, eps=config.vision_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class BLIP2VisionEncoder(nn.Module):
    """``layers.N``: the stack of :class:`BLIP2VisionLayer`."""

    def __init__(self, config: BLIP2Config):
        super().__init__()
        self.layers = nn.ModuleList(BLIP2VisionLayer(config) for _ in range(config.vision_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class BLIP2VisionModel(nn.Module):
    """(B, 3, 224, 224) -> image_embeds (B, 257, 1408), ``post_layernorm`` on every token."""

    def __init__(self, config: BLIP2Config):
        super().__init__()
        self.embeddings = BLIP2VisionEmbeddings(config)
        self.encoder = BLIP2VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.vision_width, eps=config.vision_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixels)))


# ------------------------------------------------------------------------------------------------
# Q-Former (keys qformer.*): post-LN BERT layers over the query tokens, cross-attending to the image


class QFormerMultiHeadAttention(nn.Module):
    """``query`` from the queries; ``key``/``value`` from the queries or, cross, the image embeds."""

    def __init__(self, width: int, heads: int, kv_width: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return attend(self.query(x), self.key(context), self.value(context), self.heads)


class QFormerOutput(nn.Module):
    """``LayerNorm(dense(x) + residual)`` (BERT's post-LN residual)."""

    def __init__(self, in_width: int, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class QFormerAttention(nn.Module):
    """``attention`` + ``output``: ``LN(dense(attn(x, context)) + x)``."""

    def __init__(self, config: BLIP2Config, kv_width: int):
        super().__init__()
        width = config.qformer_width
        self.attention = QFormerMultiHeadAttention(width, config.qformer_heads, kv_width)
        self.output = QFormerOutput(width, width, config.qformer_eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x, context), x)


class QFormerIntermediate(nn.Module):
    """``gelu(dense(x))`` (exact GELU)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(width, hidden)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    """Self-attention, cross-attention to the image (on every ``cross_attention_frequency``-th
    layer), then the query FFN (``intermediate_query``, ``output_query``)."""

    def __init__(self, config: BLIP2Config, index: int):
        super().__init__()
        self.attention = QFormerAttention(config, config.qformer_width)
        self.has_cross_attention = index % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, config.vision_width)
        self.intermediate_query = QFormerIntermediate(config.qformer_width, config.qformer_mlp)
        self.output_query = QFormerOutput(config.qformer_mlp, config.qformer_width, config.qformer_eps)

    def forward(self, x: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x)
        if self.has_cross_attention:
            x = self.crossattention(x, image_embeds)
        return self.output_query(self.intermediate_query(x), x)


class QFormerEncoder(nn.Module):
    """``layer.N``: the stack of :class:`QFormerLayer`."""

    def __init__(self, config: BLIP2Config):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i) for i in range(config.qformer_layers))

    def forward(self, x: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, image_embeds)
        return x


class QFormer(nn.Module):
    """``layernorm`` on the query embeddings, then the layers; no final norm."""

    def __init__(self, config: BLIP2Config):
        super().__init__()
        self.layernorm = nn.LayerNorm(config.qformer_width, eps=config.qformer_eps)
        self.encoder = QFormerEncoder(config)

    def forward(self, query_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.layernorm(query_embeds)
        return self.encoder(x, image_embeds.to(x.dtype))


class BLIP2(nn.Module):
    """The BLIP-2 image encoder + Q-Former (keys ``vision_model.*``, ``qformer.*``, ``query_tokens``)."""

    def __init__(self, config: BLIP2Config = None):
        super().__init__()
        config = config or BLIP2Config()
        self.config = config
        self.vision_model = BLIP2VisionModel(config)
        self.qformer = QFormer(config)
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_query_tokens, config.qformer_width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.query_tokens, std=0.02)

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) -> the vision encoder's output (B, 257, vision_width)."""
        return self.vision_model(pixels)

    def qformer_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) -> the Q-Former's last hidden state (B, num_query_tokens, qformer_width),
        i.e. (B, 32, 768) at the real sizes."""
        image_embeds = self.vision_model(pixels)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(queries, image_embeds)

    forward = qformer_features
