"""The CLIP image prefix of the text llama_types built with ``with_visual=True`` (llama, llama_peft,
mixtral, mixtral_peft, mixtral_sparse): one shared implementation, mixed into their Transformers.

An image (B, 3, 224, 224) becomes ``clip_proj_norm(clip_proj(clip.encode_image(image)))``: the
CLIP's 257 tokens after ``ln_post`` and ``visual.proj`` (768), a Linear to ``dim`` and a
LayerNorm. They go BEFORE the first text token, untagged (layout ``"prefix"``), N = 257.

Keys (the original's): ``clip.*`` (the whole open_clip CLIP, text tower included:
``clip.transformer.resblocks.*``, ``clip.token_embedding.weight`` ...; only the image side runs),
``clip_proj.{weight,bias}``, ``clip_proj_norm.{weight,bias}``. The CLIP is the OpenAI build, so
its MLPs use QuickGELU. It is frozen, replicated on every model-parallel rank (each rank encodes its
slice of an image batch, ``layers/multimodal.encode_split_by_batch``), and kept in full
precision under ``--quant`` with the two projections.

``clip_config`` (a config field, default None = ViT-L/14 at 224) overrides :class:`CLIPConfig`
fields, e.g. ``{"width": 32, "layers": 1, ...}`` for a tiny test model. The original runs its CLIP
in float32 whatever the model dtype; here it runs in the model dtype (docs/differences.md).
"""

import dataclasses
from typing import Any, Dict, Optional

import torch
from torch import nn

from ...errors import ConfigError
from ..visual import CLIP, CLIPConfig

#: Module names kept in full precision by --quant (MetaModel.get_quant_blocklist adds ``llma.``).
CLIP_PREFIX_MODULES = ("clip", "clip_proj", "clip_proj_norm")


def clip_config_from(overrides: Optional[Dict[str, Any]], llama_type: str, **fixed) -> CLIPConfig:
    """A :class:`CLIPConfig` from the config's ``clip_config`` entry, with ``fixed`` fields forced
    (how the original builds it: ``quick_gelu``, ``text_tower``)."""
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(CLIPConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"clip_config of llama_type {llama_type!r} has unknown field(s) {unknown}; "
                          f"it takes: {', '.join(sorted(known - set(fixed)))}")
    forced = sorted(k for k in overrides if k in fixed and overrides[k] != fixed[k])
    if forced:
        raise ConfigError(f"clip_config of llama_type {llama_type!r} cannot set {forced}: the original "
                          f"builds this CLIP with {dict((k, fixed[k]) for k in forced)}; remove them")
    overrides.update(fixed)
    return CLIPConfig(**overrides)


def freeze(module: nn.Module) -> None:
    """Encoders never train (and are left out of ``get_trainable_params``)."""
    for param in module.parameters():
        param.requires_grad_(False)


class CLIPPrefixMixin:
    """Adds the CLIP prefix to a :class:`~..layers.decoder.CausalDecoder` subclass: call
    :meth:`build_clip_prefix` at the end of ``__init__`` when ``with_visual``."""

    def build_clip_prefix(self, args) -> None:
        config = clip_config_from(getattr(args, "clip_config", None), type(self).__module__.rsplit(".", 1)[-1],
                                  quick_gelu=True, text_tower=True)
        self.clip = CLIP(config)
        freeze(self.clip)
        self.clip_proj = nn.Linear(config.embed_dim, args.dim)
        self.clip_proj_norm = nn.LayerNorm(args.dim)
        self.image_layout = "prefix"
        self.image_words = config.grid ** 2 + 1
        self.image_size = config.image_size
        self.quant_blocklist = list(CLIP_PREFIX_MODULES)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in the model's dtype -> (B, 257, dim) prefix vectors."""
        self._refuse_image(images)
        with torch.no_grad():
            features = self.clip.encode_image(images, project=True)
        return self.clip_proj_norm(self.clip_proj(features.to(self.clip_proj.weight.dtype)))

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        """As the original: everything but the CLIP (variants narrow it further)."""
        return {name: param for name, param in self.named_parameters() if not name.startswith("clip.")}
