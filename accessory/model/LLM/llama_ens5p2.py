"""``llama_type = "llama_ens5p2"``: llama_ens5's five views of a 448 image, with the four local
views' patch grids halved.

The global view inserts ``[start, 32 + 257, end]`` as llama_ens. For each quadrant the raw 5632-d
ensemble's 16 x 16 patch rows are reduced to 8 x 8 by bilinear ``F.interpolate(scale_factor=1/2)``
(class token kept, 65 rows) before ``visual_proj``: ``[start, 32 + 65, end]`` each.
N = 291 + 4 * 99 = 687.
"""

from typing import Dict

import torch
from torch import nn

from ..layers.multimodal import tag_views
from . import llama
from ._sphinx import SphinxVisual, check_views, crops, reduce_patches, resize, view_major
from .llama_ens import ModelArgs

__all__ = ["ModelArgs", "Transformer"]


class Transformer(SphinxVisual, llama.Transformer):
    def __init__(self, args: ModelArgs, with_visual: bool = False):
        llama.Transformer.__init__(self, args)
        if with_visual:
            self.build_visual(args, light=False)
            self.image_size = 2 * args.view_size
            local_tokens = (self.grid // 2) ** 2 + 1
            self.image_words = (self.queries + self.tokens_per_view + 2) + 4 * (self.queries + local_tokens + 2)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        check_views(images, self.image_size, "llama_ens5p2")
        bsz = images.shape[0]
        views = view_major([resize(images, self.view_size, "bicubic")] + crops(images, 2, self.view_size))
        queries, ens = self.ensemble_features(views, resize(views, self.convnext_half_size, "nearest"))
        global_view = self.project_views(queries[:bsz], ens[:bsz])
        local_views = self.project_views(queries[bsz:], reduce_patches(ens[bsz:], self.grid))
        return tag_views([global_view, *local_views.chunk(4)], self.start_img, self.end_img)

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        """Everything but the encoders."""
        return self.non_encoder_params()
