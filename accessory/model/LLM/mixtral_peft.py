"""Mixtral with parameter-efficient fine-tuning options (``llama_type = "mixtral_peft"``).

Exactly :mod:`mixtral` plus, on the four attention linears (``wq wk wv wo``) and on every
expert's ``w1 w2 w3``:

* ``bias_tuning`` (default True): a ``bias`` (zero-initialised in the original);
* ``lora_rank > 0``: an unscaled low-rank path ``y = W x + b + lora_b(lora_a x)``.

The router ``gate`` never gets either. ``norm_tuning`` (default False here, unlike llama_peft)
changes nothing in the math: it only decides whether the norms are trainable.
"""

from dataclasses import dataclass
from typing import Dict

from torch import nn

from ..layers.parallel import COLUMN, ROW, SplitPlan
from . import mixtral
from .llama_peft import peft_linear_factory, trainable_by_name


@dataclass
class ModelArgs(mixtral.ModelArgs):
    """mixtral's fields, then the original's PEFT fields with its defaults."""
    lora_rank: int = -1  # <= 0: no LoRA
    bias_tuning: bool = True
    norm_tuning: bool = False


# Attention follows the original's LoRA parallel layers: wq/wk/wv (Column) cut bias and lora_b by
# rows and hold lora_a whole; wo (Row) holds its bias and lora_b whole and cuts lora_a by columns.
# Expert biases and LoRA travel with their whole expert (mixtral's rule).
PEFT_SPLIT_RULES = [
    (r"\.attention\.(wq|wk|wv)\.bias$", COLUMN),
    (r"\.attention\.(wq|wk|wv)\.lora_b\.weight$", COLUMN),
    (r"\.attention\.wo\.lora_a\.weight$", ROW),
]


class Transformer(mixtral.Transformer):
    """mixtral's decoder built with :func:`peft_linear_factory`."""

    is_peft = True
    split_plan = mixtral.split_plan_for(extra_rules=PEFT_SPLIT_RULES)

    def __init__(self, args: ModelArgs, with_visual: bool = False):
        super().__init__(args, with_visual, linear=peft_linear_factory(args))

    @classmethod
    def plan_for(cls, num_experts: int) -> SplitPlan:
        return mixtral.split_plan_for(num_experts, extra_rules=PEFT_SPLIT_RULES)

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        """As the original: names containing ``lora`` (when lora_rank > 0), ``bias`` (when
        bias_tuning) or ``norm`` (when norm_tuning). These are the keys a fine-tune saved with
        ``only_save_trainable`` holds."""
        key_words = ((["lora"] if self.args.lora_rank > 0 else []) + (["bias"] if self.args.bias_tuning else [])
                     + (["norm"] if self.args.norm_tuning else []))
        return trainable_by_name(self, key_words, exclude_prefixes=("clip.",))
