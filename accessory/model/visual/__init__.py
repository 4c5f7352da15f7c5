"""Image encoders of the multimodal llama_types, as plain nn.Modules with the original's key names.

* :class:`CLIP` (OpenAI ViT-L/14 via open_clip): ``encode_image(x, project=True)``.
* :class:`BLIP2` (EVA ViT-g + Q-Former, HF ``Blip2Model`` names): ``qformer_features(x)``.
* :class:`ConvNeXt` (OpenCLIP ConvNeXt-XXLarge trunk, timm names): ``forward(x)`` -> normed map.
* :class:`DINOv2` (ViT-g/14, hub names): ``forward_features(x)`` -> dict.
* :class:`ViTBlock` (timm ``Block``): llama_adapter's visual blocks.

Each takes a config dataclass whose defaults are the real sizes, builds on the meta device, and
gives every module that owns parameters a ``reset_parameters``. HF weights convert with
:mod:`accessory.checkpoint.hf_visual`.
"""

from .blip2 import BLIP2, BLIP2Config
from .clip import CLIP, CLIPConfig
from .convnext import ConvNeXt, ConvNeXtConfig
from .dinov2 import DINOv2, DINOv2Config, resize_pos_embed
from .vit_block import ViTBlock

__all__ = ["BLIP2", "BLIP2Config", "CLIP", "CLIPConfig", "ConvNeXt", "ConvNeXtConfig", "DINOv2",
           "DINOv2Config", "resize_pos_embed", "ViTBlock"]
