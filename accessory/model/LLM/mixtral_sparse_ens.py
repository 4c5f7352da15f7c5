"""SPHINX-MoE (``llama_type = "mixtral_sparse_ens"``): mixtral_sparse with the four-encoder
ensemble on a 512 image.

BLIP-2, CLIP and DINOv2 see a bicubic 224 downsample; ConvNeXt sees the image at 512 (a nearest
resize: a no-op) and its 16 x 16 map is the grid. ``[start, 32 + 257, end]``: N = 291.
"""

from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

from ..layers.multimodal import tag_views
from . import mixtral, mixtral_sparse
from ._sphinx import SphinxArgs, SphinxVisual, check_views, resize


@dataclass
class ModelArgs(SphinxArgs, mixtral.ModelArgs):
    """mixtral's fields and defaults (load_balancing_weight 0.1), then the SPHINX fields."""


class Transformer(SphinxVisual, mixtral_sparse.Transformer):
    def __init__(self, args: ModelArgs, with_visual: bool = False):
        mixtral_sparse.Transformer.__init__(self, args)
        if with_visual:
            self.build_visual(args, light=False)
            self.image_size = self.convnext_size
            self.image_words = self.queries + self.tokens_per_view + 2

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        check_views(images, self.image_size, "mixtral_sparse_ens")
        queries, ens = self.ensemble_features(resize(images, self.view_size, "bicubic"),
                                              resize(images, self.convnext_size, "nearest"))
        return tag_views([self.project_views(queries, ens)], self.start_img, self.end_img)

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        """Everything but the encoders."""
        return self.non_encoder_params()
