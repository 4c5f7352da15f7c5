"""SPHINX-MoE-1k (``llama_type = "mixtral_sparse_ens5"``): mixtral_sparse_ens on five views of a
1024 image, cut as llama_ens5_light's (224-side views for BLIP-2 / CLIP / DINOv2: bicubic 224 +
quadrants of a bicubic 448; 512-side views for ConvNeXt: bicubic 512 + the input's quadrants),
image-major. Each view inserts ``[start, 32 + 257, end]``: N = 5 * 291 = 1455.
"""

from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

from ..layers.multimodal import tag_views
from . import mixtral, mixtral_sparse
from ._sphinx import SphinxArgs, SphinxVisual, check_views, trainable_by_mode
from .llama_ens5_light import five_views


@dataclass
class ModelArgs(SphinxArgs, mixtral.ModelArgs):
    """mixtral's fields (load_balancing_weight 0.01 here), the SPHINX fields, trainable_mode."""
    load_balancing_weight: float = 0.01
    trainable_mode: str = "mm_stage2"  # "mm_stage1": visual_proj and the tags; "mm_stage2": all but the encoders


class Transformer(SphinxVisual, mixtral_sparse.Transformer):
    def __init__(self, args: ModelArgs, with_visual: bool = False):
        mixtral_sparse.Transformer.__init__(self, args)
        if with_visual:
            self.build_visual(args, light=False)
            self.image_size = 2 * self.convnext_size
            self.image_words = 5 * (self.queries + self.tokens_per_view + 2)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        check_views(images, self.image_size, "mixtral_sparse_ens5")
        views, convnext_views = five_views(self, images)
        queries, ens = self.ensemble_features(views, convnext_views)
        projected = self.project_views(queries, ens)
        per_image = projected.view(images.shape[0], 5, *projected.shape[1:])
        return tag_views(per_image.unbind(1), self.start_img, self.end_img)

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        return trainable_by_mode(self, self.args.trainable_mode, ["visual_proj", "start_img", "end_img"])
