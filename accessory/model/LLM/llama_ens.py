"""SPHINX (``llama_type = "llama_ens"``): llama with the four-encoder ensemble on one 224 view.

An image (B, 3, 224, 224), CLIP-normalised, inserts after the first token
``[start_img, qformer_proj(Q-Former) (32), visual_proj(ens) (257), end_img]``: N = 291, where
``ens = cat[CLIP (no proj), ConvNeXt on a nearest 256 resize (8x8 map repeated 2x2, gap token
first), DINOv2 on the DINO-renormalised view]`` (5632 channels). See :mod:`._sphinx`.
"""

from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

from ..layers.multimodal import tag_views
from . import llama
from ._sphinx import SphinxArgs, SphinxVisual, check_views, resize


@dataclass
class ModelArgs(SphinxArgs, llama.ModelArgs):
    """llama's fields with the original's llama_ens defaults, then the SPHINX fields."""
    dim: int = 5120
    n_layers: int = 40
    n_heads: int = 40


class Transformer(SphinxVisual, llama.Transformer):
    """llama's decoder; with ``with_visual`` also the encoders and connectors."""

    def __init__(self, args: ModelArgs, with_visual: bool = False):
        llama.Transformer.__init__(self, args)
        if with_visual:
            self.build_visual(args, light=False)
            self.image_size = args.view_size
            self.image_words = self.queries + self.tokens_per_view + 2

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        check_views(images, self.image_size, "llama_ens")
        queries, ens = self.ensemble_features(images, resize(images, self.convnext_half_size, "nearest"))
        return tag_views([self.project_views(queries, ens)], self.start_img, self.end_img)

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        """Everything but the encoders."""
        return self.non_encoder_params()
