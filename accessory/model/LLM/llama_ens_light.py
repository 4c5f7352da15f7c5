"""SPHINX-Tiny (``llama_type = "llama_ens_light"``): llama with ConvNeXt + DINOv2 only, 512 images.

ConvNeXt runs on the 512 image itself (a nearest resize to 512: a no-op) and its 16 x 16 map is the
grid, no repeat; DINOv2 runs on a bicubic 224 downsample, re-normalised as
``x*(σc/σd) + (μc−μd)/σd``. ``visual_proj`` takes 3072 + 1536 = 4608 channels; no Q-Former, no
CLIP. N = 257 + 2 = 259.
"""

from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

from ..layers.multimodal import tag_views
from . import llama
from ._sphinx import SphinxArgs, SphinxVisual, check_views, resize, trainable_by_mode


@dataclass
class ModelArgs(SphinxArgs, llama.ModelArgs):
    """llama's fields with the original's defaults (5120/40/40), the SPHINX fields, trainable_mode."""
    dim: int = 5120
    n_layers: int = 40
    n_heads: int = 40
    trainable_mode: str = "mm_stage2"  # "mm_stage1": only visual_proj; "mm_stage2": all but the encoders


class Transformer(SphinxVisual, llama.Transformer):
    def __init__(self, args: ModelArgs, with_visual: bool = False):
        llama.Transformer.__init__(self, args)
        if with_visual:
            self.build_visual(args, light=True)
            self.image_size = self.convnext_size
            self.image_words = self.tokens_per_view + 2

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        check_views(images, self.image_size, "llama_ens_light")
        _, ens = self.ensemble_features(resize(images, self.view_size, "bicubic"),
                                        resize(images, self.convnext_size, "nearest"), factored_renorm=True)
        return tag_views([self.project_views(None, ens)], self.start_img, self.end_img)

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        return trainable_by_mode(self, self.args.trainable_mode, ["visual_proj"])
