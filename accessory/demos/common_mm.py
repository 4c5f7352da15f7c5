"""What the multimodal demos share: loading a model that takes images, and turning an uploaded
picture into the tensor it expects."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

#: The "Image Transform" choices (accessory.data.transform); the multi-turn page starts at the first.
IMAGE_TRANSFORMS = ["padded_resize", "resized_center_crop"]


def require_checkpoint(args: argparse.Namespace) -> None:
    """Exit with the reason when no --pretrained_path is given (the embedded demo model is text-only)."""
    if not args.pretrained_path:
        sys.exit("error: the multimodal demos need --pretrained_path (a multimodal checkpoint directory); "
                 "the embedded demo model takes no images")


def load_multimodal_model(args: argparse.Namespace, mp_group=None, chat: bool = False):
    """``load_model`` with ``with_visual=True`` (``load_chat_model``, the prompt cache on, with
    ``chat``); exits with the reason when the model takes no images. ``mp_group``: this process's
    model-parallel group (see demos/parallel.py), or None."""
    from accessory.demos.common import configure_prompt_cache, load_model

    require_checkpoint(args)
    model = load_model(args, with_visual=True, mp_group=mp_group)
    if not model.takes_images:
        sys.exit(f"error: llama_type {model.llama_type!r} takes no images, so the multimodal demos cannot "
                 f"serve it; use a multimodal checkpoint (--pretrained_path), or the text demos "
                 f"(python -m accessory.demos.single_turn / multi_turn) for this one")
    return configure_prompt_cache(model, args) if chat else model


def load_multimodal_chat_model(args: argparse.Namespace, mp_group=None):
    """``load_multimodal_model`` for the multi-turn demo: a chat's next turn about the same picture
    reuses the picture's and the history's keys and values (the engine's prompt cache)."""
    return load_multimodal_model(args, mp_group=mp_group, chat=True)


def image_tensor(model, image, transform_type: str):
    """An uploaded PIL image as a (1, 3, S, S) tensor: ``get_transform(transform_type, S)`` at the
    model's own size S (``model.image_size``); None stays None (the question is then asked
    without a picture). The model casts it to its dtype and device."""
    if image is None:
        return None
    from accessory.data.transform import get_transform

    return get_transform(transform_type, model.image_size)(image.convert("RGB")).unsqueeze(0)


def check_transform(transform_type: Optional[str]) -> str:
    if transform_type not in IMAGE_TRANSFORMS:
        raise ValueError(f"unknown image transform {transform_type!r}; use one of {', '.join(IMAGE_TRANSFORMS)}")
    return transform_type
