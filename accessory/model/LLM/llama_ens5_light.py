"""SPHINX-Tiny-1k (``llama_type = "llama_ens5_light"``): llama_ens_light on five views of a 1024 image.

DINOv2 views: bicubic 224 of the whole image, then the four quadrants of a bicubic 448. ConvNeXt
views: bicubic 512 of the whole image, then the four 512 quadrants of the input. Both are stacked
image-major (each image's five views adjacent); each view becomes ``[start, 257, end]``:
N = 5 * 259 = 1295.
"""

from typing import Dict

import torch
from torch import nn

from ..layers.multimodal import tag_views
from . import llama
from ._sphinx import SphinxVisual, check_views, crops, image_major, resize, trainable_by_mode
from .llama_ens_light import ModelArgs

__all__ = ["ModelArgs", "Transformer"]


def five_views(model: SphinxVisual, images: torch.Tensor):
    """(dino_views, convnext_views), each (B*5, ...) image-major: global + four quadrants."""
    view, cnx = model.view_size, model.convnext_size
    dino = [resize(images, view, "bicubic")] + crops(resize(images, 2 * view, "bicubic"), 2, view)
    convnext = [resize(images, cnx, "bicubic")] + crops(images, 2, cnx)
    return image_major(dino), image_major(convnext)


class Transformer(SphinxVisual, llama.Transformer):
    def __init__(self, args: ModelArgs, with_visual: bool = False):
        llama.Transformer.__init__(self, args)
        if with_visual:
            self.build_visual(args, light=True)
            self.image_size = 2 * self.convnext_size
            self.image_words = 5 * (self.tokens_per_view + 2)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        check_views(images, self.image_size, "llama_ens5_light")
        dino_views, convnext_views = five_views(self, images)
        _, ens = self.ensemble_features(dino_views, convnext_views, factored_renorm=True)
        projected = self.project_views(None, ens)
        per_image = projected.view(images.shape[0], 5, *projected.shape[1:])
        return tag_views(per_image.unbind(1), self.start_img, self.end_img)

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        return trainable_by_mode(self, self.args.trainable_mode, ["visual_proj"])
