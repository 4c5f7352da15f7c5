"""Image transforms against the formulas in ORIGINAL-mm.md, computed independently with numpy."""

import numpy as np
import pytest
import torch
from PIL import Image

from accessory.data.transform import get_transform

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def random_image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def normalize(array_hwc_uint8):
    x = array_hwc_uint8.astype(np.float64) / 255.0
    return torch.from_numpy(((x - MEAN) / STD).transpose(2, 0, 1)).float()


@pytest.mark.parametrize("w,h", [(37, 91), (301, 117), (224, 224), (225, 300), (640, 481)])
def test_resized_center_crop(w, h):
    size = 224
    image = random_image(w, h, seed=w * h)
    out = get_transform("resized_center_crop", size)(image)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    if w <= h:
        rw, rh = size, int(size * h / w)
    else:
        rw, rh = int(size * w / h), size
    resized = image if (rw, rh) == (w, h) else image.resize((rw, rh), Image.BICUBIC)
    top, left = int(round((rh - size) / 2)), int(round((rw - size) / 2))
    expected = normalize(np.asarray(resized)[top:top + size, left:left + size])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("w,h", [(37, 91), (301, 117), (100, 100), (513, 224)])
def test_padded_resize(w, h):
    size = 448
    image = random_image(w, h, seed=w + h)
    out = get_transform("padded_resize", size)(image)
    side = max(w, h)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = (122, 116, 104)
    if w > h:
        canvas[(w - h) // 2:(w - h) // 2 + h, :w] = np.asarray(image)
    else:
        canvas[:h, (h - w) // 2:(h - w) // 2 + w] = np.asarray(image)
    expected = normalize(np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC)))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_padding_value_after_normalising():
    out = get_transform("padded_resize", 64)(Image.new("RGB", (64, 16), (0, 0, 0)))
    corner = out[:, 0, 0]
    torch.testing.assert_close(corner, torch.tensor([-0.0113, -0.0112, -0.0013]), atol=1e-4, rtol=0)


def test_random_resized_crop_shape_and_unknown_type():
    torch.manual_seed(0)
    out = get_transform("random_resized_crop", 32)(random_image(50, 40, 0))
    assert out.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="padded_resize"):
        get_transform("bogus")
