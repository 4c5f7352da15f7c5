"""Image preprocessing for multimodal models (seed import path), with PIL and torch only.

``get_transform(name, size)`` returns a callable taking an RGB PIL image and returning a float
tensor (3, size, size) normalised with the CLIP mean/std, as the original's torchvision pipelines:

* ``resized_center_crop``: bicubic resize of the short side to ``size`` (long side floored), then a
  centre crop (offsets rounded half-to-even).
* ``padded_resize``: pad to a square with the mean colour (122, 116, 104), the image centred along
  the short side, then a bicubic resize to ``size`` x ``size``.
* ``random_resized_crop`` (training): a random crop of 90-100% of the area and aspect 3/4..4/3,
  resized to ``size`` x ``size``.
"""

import math
from typing import Callable, Tuple

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(c * 255) for c in CLIP_MEAN)  # (122, 116, 104)


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [0, 1] (torch's default float dtype), then CLIP-normalised."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.get_default_dtype()).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=tensor.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=tensor.dtype).view(3, 1, 1)
    return (tensor - mean) / std


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the short side is ``size``; the long side is floor(size * long / short)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {w}x{h} image")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def pad_to_square(image: Image.Image, fill: Tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


def random_resized_crop_box(w: int, h: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop, drawn with torch's RNG as torchvision does."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = torch.randint(0, h - ch + 1, size=(1,)).item()
            left = torch.randint(0, w - cw + 1, size=(1,)).item()
            return top, left, ch, cw
    # fall back to a centre crop at the nearest allowed aspect ratio
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def get_transform(transform_type: str, size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """The preprocessing pipeline ``transform_type`` at ``size`` pixels (see the module docstring)."""
    if transform_type == "resized_center_crop":
        return lambda image: to_normalized_tensor(center_crop(resize_short_side(image, size), size))
    if transform_type == "padded_resize":
        return lambda image: to_normalized_tensor(resize_short_side(pad_to_square(image), size))
    if transform_type == "random_resized_crop":
        def crop_and_resize(image: Image.Image) -> torch.Tensor:
            top, left, ch, cw = random_resized_crop_box(*image.size)
            cropped = image.crop((left, top, left + cw, top + ch))
            return to_normalized_tensor(cropped.resize((size, size), Image.BICUBIC))
        return crop_and_resize
    raise ValueError(f"unknown transform type {transform_type!r}: use 'padded_resize', "
                     f"'resized_center_crop' or 'random_resized_crop'")
