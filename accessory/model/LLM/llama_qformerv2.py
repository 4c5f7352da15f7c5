"""LLaMA with a BLIP-2 Q-Former image input (``llama_type = "llama_qformerv2"``).

llama's decoder; with ``with_visual=True`` an image (B, 3, 224, 224) becomes BLIP-2's 32 Q-Former
query outputs (768) through ``qformer_proj`` (Linear(768, dim) + LayerNorm(dim)), wrapped in the
learned ``start_img`` / ``end_img`` vectors and put after the first text token (layout
``"tagged"``): N = 34 inserted vectors. The original declares ``image_words = 32`` but inserts 34;
here ``image_words`` is the inserted count (docs/differences.md).

Keys (the original's): ``qformer.*`` (HF ``Blip2Model`` without the OPT language model:
``qformer.vision_model.*``, ``qformer.qformer.*``, ``qformer.query_tokens``),
``qformer_proj.0.{weight,bias}``, ``qformer_proj.1.{weight,bias}``, ``start_img``, ``end_img``.
BLIP-2 is frozen, replicated on every model-parallel rank (each rank encodes its slice of an image
batch, ``layers/multimodal.encode_split_by_batch``; the original encodes the whole batch on every
rank, with the same numbers) and kept in full precision under ``--quant`` with ``qformer_proj``. It runs in the model's dtype (the
original keeps it in float16 whatever the model dtype).

``qformer_config`` (a config field, default None = blip2-opt-2.7b's sizes) overrides
:class:`BLIP2Config` fields, so a config.json can describe a tiny model. With
``with_visual=False`` only the text model is built (the original builds BLIP-2 regardless); a
multimodal checkpoint's visual entries are then dropped with a warning.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from ...errors import ConfigError
from ..layers.multimodal import tag_views
from ..visual import BLIP2, BLIP2Config
from . import llama
from ._clip_prefix import freeze

#: Module names kept in full precision by --quant.
QFORMER_MODULES = ("qformer", "qformer_proj")


@dataclass
class ModelArgs(llama.ModelArgs):
    """llama's fields (and defaults), plus the BLIP-2 size overrides."""
    qformer_config: Optional[Dict[str, Any]] = None


def blip2_config_from(overrides: Optional[Dict[str, Any]], llama_type: str) -> BLIP2Config:
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(BLIP2Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"qformer_config of llama_type {llama_type!r} has unknown field(s) {unknown}; "
                          f"it takes: {', '.join(sorted(known))}")
    return BLIP2Config(**overrides)


class QFormerImageMixin:
    """BLIP-2 Q-Former features, projected and tagged; shared by llama_qformerv2(_peft)."""

    def build_visual(self, args) -> None:
        if getattr(args, "clip_config", None):
            raise ConfigError("llama_qformerv2 has no CLIP: its config's clip_config does not apply; use "
                              "qformer_config for the BLIP-2 sizes")
        config = blip2_config_from(getattr(args, "qformer_config", None), type(self).__module__.rsplit(".", 1)[-1])
        self.qformer = BLIP2(config)
        freeze(self.qformer)
        self.qformer_proj = nn.Sequential(nn.Linear(config.qformer_width, args.dim), nn.LayerNorm(args.dim))
        self.start_img = nn.Parameter(torch.rand(1, 1, args.dim))
        self.end_img = nn.Parameter(torch.rand(1, 1, args.dim))
        self.image_layout = "tagged"
        self.image_words = config.num_query_tokens + 2
        self.image_size = config.image_size
        self.quant_blocklist = list(QFORMER_MODULES)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in the model's dtype -> (B, 34, dim): [start_img, 32 query vectors, end_img]."""
        self._refuse_image(images)
        with torch.no_grad():
            queries = self.qformer.qformer_features(images)
        return tag_views([self.qformer_proj(queries)], self.start_img, self.end_img)

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        """As the original: everything but BLIP-2."""
        return {name: param for name, param in self.named_parameters() if not name.startswith("qformer.")}


class Transformer(QFormerImageMixin, llama.Transformer):
    """llama's decoder with the Q-Former image input (``with_visual=True``)."""
