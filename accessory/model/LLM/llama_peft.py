"""LLaMA with parameter-efficient fine-tuning options (``llama_type = "llama_peft"``).

Exactly :mod:`llama` plus, on each of the seven linears (``wq wk wv wo w1 w2 w3``):

* ``bias_tuning``: a ``bias`` (zero-initialised in the original);
* ``lora_rank > 0``: an unscaled low-rank path ``y = W x + b + lora_b(lora_a x)``.

With ``lora_rank = -1`` and ``bias_tuning = False`` the parameters are llama's, key for key.
``norm_tuning`` changes nothing in the math: it only decides whether the norms are trainable.
"""

from dataclasses import dataclass
from typing import Dict

from torch import nn

from ..layers.linear import make_linear
from ..layers.parallel import COLUMN, ROW
from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    """llama's fields, then the original's PEFT fields with its defaults."""
    lora_rank: int = -1  # <= 0: no LoRA
    bias_tuning: bool = True
    norm_tuning: bool = True


# Model-parallel cuts of the PEFT parameters, after llama's rules for the weights. A Column layer
# (wq wk wv w1 w3) cuts its bias with its rows and holds lora_a whole, lora_b cut by rows; a Row
# layer (wo w2) holds its bias whole (added after the all-reduce), lora_a cut by columns, lora_b
# whole. Anything not listed is replicated.
PEFT_SPLIT_RULES = [
    (r"\.attention\.(wq|wk|wv)\.bias$", COLUMN),
    (r"\.feed_forward\.(w1|w3)\.bias$", COLUMN),
    (r"\.attention\.(wq|wk|wv)\.lora_b\.weight$", COLUMN),
    (r"\.feed_forward\.(w1|w3)\.lora_b\.weight$", COLUMN),
    (r"\.attention\.wo\.lora_a\.weight$", ROW),
    (r"\.feed_forward\.w2\.lora_a\.weight$", ROW),
]


def peft_linear_factory(args) -> llama.LinearFactory:
    """The linear factory giving every linear a bias and/or LoRA as ``args`` (any ModelArgs with
    ``bias_tuning`` and ``lora_rank``: llama_peft's, mixtral_peft's) asks."""
    def linear(name: str, in_features: int, out_features: int) -> nn.Module:
        return make_linear(in_features, out_features, bias=args.bias_tuning, lora_rank=args.lora_rank)
    return linear


def trainable_by_name(model: nn.Module, key_words, exclude_prefixes=()) -> Dict[str, nn.Parameter]:
    """Parameters whose name contains one of ``key_words`` and starts with none of ``exclude_prefixes``."""
    return {name: param for name, param in model.named_parameters()
            if not name.startswith(tuple(exclude_prefixes)) and any(word in name for word in key_words)}


class Transformer(llama.Transformer):
    """llama's decoder built with :func:`peft_linear_factory`."""

    is_peft = True
    split_plan = llama.Transformer.split_plan.extended(PEFT_SPLIT_RULES)

    def __init__(self, args: ModelArgs, with_visual: bool = False):
        super().__init__(args, with_visual, linear=peft_linear_factory(args))

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        """As the original: names containing ``bias`` or ``lora``, and ``norm`` when ``norm_tuning``.

        These are the keys a fine-tune saved with ``only_save_trainable`` holds."""
        key_words = ["bias", "lora"] + (["norm"] if self.args.norm_tuning else [])
        return trainable_by_name(self, key_words, exclude_prefixes=("clip.",))
