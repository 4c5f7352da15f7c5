"""A tiny test-only multimodal llama_type, ``tiny_mm``: llama plus a one-conv image encoder.

It exercises the multimodal plumbing (MetaModel, the engine, layers/multimodal.py) before the
real encoders exist. With ``with_visual=True`` an image (3, S, S) becomes (S/P)^2 patch vectors
``visual_proj(visual_patch(image))``; the ``tagged`` layout wraps them in ``start_img`` /
``end_img`` and puts them after the first token, the ``prefix`` layout puts them before it.

Use::

    import multimodal_tiny
    multimodal_tiny.register()                       # llama_type "tiny_mm" in this process
    ckpt = multimodal_tiny.write_checkpoint(tmp_path, layout="tagged")
    model = MetaModel.from_pretrained(ckpt, with_visual=True, dtype=torch.float32, device="cpu")
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from accessory.model.LLM import llama, register_llama_type
from accessory.model.layers.multimodal import LAYOUTS, tag_views

import ckpt_utils

NAME = "tiny_mm"


@dataclass
class ModelArgs(llama.ModelArgs):
    image_size: int = 32
    patch_size: int = 16
    visual_dim: int = 24
    image_layout: str = "tagged"


class Transformer(llama.Transformer):
    def __init__(self, args: ModelArgs, with_visual: bool = False):
        super().__init__(args)
        if not with_visual:
            return
        if args.image_layout not in LAYOUTS:
            raise ValueError(f"image_layout must be one of {LAYOUTS}, got {args.image_layout!r}")
        self.image_layout = args.image_layout
        self.image_size = args.image_size
        grid = args.image_size // args.patch_size
        self.visual_patch = nn.Conv2d(3, args.visual_dim, args.patch_size, stride=args.patch_size)
        self.visual_proj = nn.Linear(args.visual_dim, args.dim)
        tagged = args.image_layout == "tagged"
        if tagged:
            self.start_img = nn.Parameter(torch.rand(1, 1, args.dim))
            self.end_img = nn.Parameter(torch.rand(1, 1, args.dim))
        self.image_words = grid * grid + (2 if tagged else 0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.visual_patch(images).flatten(2).transpose(1, 2)  # (B, grid^2, visual_dim)
        vectors = self.visual_proj(patches)
        if self.image_layout == "tagged":
            return tag_views([vectors], self.start_img, self.end_img)
        return vectors


def register() -> None:
    """Make ``llama_type="tiny_mm"`` loadable in this process."""
    register_llama_type(NAME, sys.modules[__name__])


def visual_state(cfg: Mapping, layout: str, seed: int = 1) -> Dict[str, torch.Tensor]:
    """Random encoder weights scaled so image vectors have about unit size, like token embeddings."""
    gen = torch.Generator().manual_seed(seed)
    patch, vdim, dim = cfg.get("patch_size", 16), cfg.get("visual_dim", 24), cfg["dim"]
    state = {
        "visual_patch.weight": torch.randn(vdim, 3, patch, patch, generator=gen) / math.sqrt(3 * patch * patch),
        "visual_patch.bias": 0.1 * torch.randn(vdim, generator=gen),
        "visual_proj.weight": torch.randn(dim, vdim, generator=gen) * 2.0 / math.sqrt(vdim),
        "visual_proj.bias": 0.1 * torch.randn(dim, generator=gen),
    }
    if layout == "tagged":
        state["start_img"] = torch.randn(1, 1, dim, generator=gen)
        state["end_img"] = torch.randn(1, 1, dim, generator=gen)
    return state


def image_vectors(state: Mapping[str, torch.Tensor], images: torch.Tensor, layout: str, patch: int = 16):
    """What one image inserts, computed from the raw weights (the tests' reference): (B, N, dim)."""
    x = F.conv2d(images.double(), state["visual_patch.weight"].double(), state["visual_patch.bias"].double(),
                 stride=patch)
    x = x.flatten(2).transpose(1, 2) @ state["visual_proj.weight"].double().T + state["visual_proj.bias"].double()
    if layout == "tagged":
        bsz = x.shape[0]
        x = torch.cat([state["start_img"].double().expand(bsz, 1, -1), x,
                       state["end_img"].double().expand(bsz, 1, -1)], dim=1)
    return x


def config(layout: str = "tagged") -> Dict:
    return dict(ckpt_utils.TINY_LLAMA, image_size=32, patch_size=16, visual_dim=24, image_layout=layout)


def full_state(layout: str = "tagged", seed: int = 5) -> Dict[str, torch.Tensor]:
    cfg = config(layout)
    state = ckpt_utils.random_llama_state(cfg, ckpt_utils.LLAMA_SPM_VOCAB, seed=seed)
    state.update(visual_state(cfg, layout, seed=seed + 1))
    return state


def write_checkpoint(directory, layout: str = "tagged", seed: int = 5) -> Path:
    """An mp=1 checkpoint of llama_type tiny_mm (Llama 2 tokenizer), config.json with the layout."""
    return ckpt_utils.write_checkpoint(directory, full_state(layout, seed), config(layout), full_config=False,
                                       llama_type=NAME)
