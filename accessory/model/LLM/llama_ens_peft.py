"""SPHINX with PEFT text layers (``llama_type = "llama_ens_peft"``): llama_ens's image path on a
llama whose linears take LoRA (``lora_rank > 0``) and, with ``bias_tuning``, a bias on wq, wo, w1,
w2, w3 (never wk, wv), as the original.

The original declares ``image_words = 289`` but inserts 291 vectors; here ``image_words`` is the
inserted count (291), so generation budgets are right. It has no ``image_size`` attribute there;
here it is the view size (224), what the original's callers fall back to.
"""

from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

from ..layers.multimodal import tag_views
from . import llama, llama_peft
from ._sphinx import ENCODER_PREFIXES, SphinxArgs, SphinxVisual, check_views, resize
from .llama_adapter import adapter_linear_factory


@dataclass
class ModelArgs(SphinxArgs, llama.ModelArgs):
    """llama's fields (4096/32/32), the original's PEFT fields and defaults, the SPHINX fields."""
    lora_rank: int = -1  # <= 0: no LoRA
    bias_tuning: bool = False
    norm_tuning: bool = True


class Transformer(SphinxVisual, llama.Transformer):
    is_peft = True
    split_plan = llama_peft.Transformer.split_plan

    def __init__(self, args: ModelArgs, with_visual: bool = False):
        llama.Transformer.__init__(self, args, linear=adapter_linear_factory(args))
        if with_visual:
            self.build_visual(args, light=False)
            self.image_size = args.view_size
            self.image_words = self.queries + self.tokens_per_view + 2

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        check_views(images, self.image_size, "llama_ens_peft")
        queries, ens = self.ensemble_features(images, resize(images, self.convnext_half_size, "nearest"))
        return tag_views([self.project_views(queries, ens)], self.start_img, self.end_img)

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        """Names containing bias or lora (and norm with ``norm_tuning``), outside the encoders and
        the projections (so the projections and the tags stay frozen, as in the original)."""
        words = ["bias", "lora"] + (["norm"] if self.args.norm_tuning else [])
        return llama_peft.trainable_by_name(self, words, exclude_prefixes=ENCODER_PREFIXES + ("qformer_proj", "visual_proj"))
