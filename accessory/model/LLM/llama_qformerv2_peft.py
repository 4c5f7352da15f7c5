"""llama_qformerv2 with llama_peft's linears (``llama_type = "llama_qformerv2_peft"``).

The text side is :mod:`llama_peft` (``lora_rank``, ``bias_tuning``, ``norm_tuning`` with its
defaults -1 / True / True), the image side :mod:`llama_qformerv2`'s (BLIP-2 ``qformer.*``,
``qformer_proj``, ``start_img`` / ``end_img``, tagged, N = 34).
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional

from torch import nn

from . import llama_peft, llama_qformerv2
from .llama_peft import trainable_by_name


@dataclass
class ModelArgs(llama_peft.ModelArgs):
    """llama_peft's fields, plus the BLIP-2 size overrides."""
    qformer_config: Optional[Dict[str, Any]] = None


class Transformer(llama_qformerv2.QFormerImageMixin, llama_peft.Transformer):
    """llama_peft's decoder with the Q-Former image input (``with_visual=True``)."""

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        """As the original: names containing bias / lora (/ norm with ``norm_tuning``) outside BLIP-2,
        so the tags and the ``qformer_proj`` weights (not their biases) stay frozen."""
        key_words = ["bias", "lora"] + (["norm"] if self.args.norm_tuning else [])
        return trainable_by_name(self, key_words, exclude_prefixes=("qformer.",))
