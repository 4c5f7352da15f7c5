"""SPHINX-1k / SPHINX-v2-1k (``llama_type = "llama_ens5"``): llama_ens on five views of a 448 image.

Views: a bicubic 224 downsample of the whole image, then its four 224 quadrants TL, TR, BL, BR.
They are encoded as one view-major batch (every image's global view first) exactly as llama_ens
encodes one view, and each becomes ``[start_img, 32 + 257 vectors, end_img]``: N = 5 * 291 = 1455.
"""

from typing import Dict

import torch
from torch import nn

from ..layers.multimodal import tag_views
from . import llama
from ._sphinx import SphinxVisual, check_views, crops, resize, view_major
from .llama_ens import ModelArgs

__all__ = ["ModelArgs", "Transformer"]


class Transformer(SphinxVisual, llama.Transformer):
    per_side = 2  # the image is per_side x per_side views of view_size

    def __init__(self, args: ModelArgs, with_visual: bool = False):
        llama.Transformer.__init__(self, args)
        if with_visual:
            self.build_visual(args, light=False)
            self.image_size = self.per_side * args.view_size
            self.n_views = 1 + self.per_side ** 2
            self.image_words = self.n_views * (self.queries + self.tokens_per_view + 2)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        check_views(images, self.image_size, type(self).__module__.rsplit(".", 1)[-1])
        views = view_major([resize(images, self.view_size, "bicubic")] + crops(images, self.per_side, self.view_size))
        queries, ens = self.ensemble_features(views, resize(views, self.convnext_half_size, "nearest"))
        return tag_views(self.project_views(queries, ens).chunk(self.n_views), self.start_img, self.end_img)

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        """Everything but the encoders."""
        return self.non_encoder_params()
