"""Linear layers with the original's PEFT options: a bias and a low-rank (LoRA) side path.

Checkpoint names: ``weight``, ``bias`` (when present), ``lora_a.weight`` (rank, in) and
``lora_b.weight`` (out, rank). The original adds the LoRA term unscaled: ``W x + b + B(A x)``.
"""

import torch
import torch.nn.functional as F
from torch import nn


class LoraDown(nn.Linear):
    """LoRA's ``lora_a`` (rank, in): truncated normal, std 0.02, as the original initialises it."""

    def reset_parameters(self) -> None:
        # Drawn in float32: trunc_normal_ does not support every low-precision dtype.
        draw = nn.init.trunc_normal_(torch.empty(self.weight.shape, dtype=torch.float32,
                                                 device=self.weight.device), std=0.02)
        with torch.no_grad():
            self.weight.copy_(draw)


class LoraUp(nn.Linear):
    """LoRA's ``lora_b`` (out, rank): zeros, so a fresh LoRA leaves the layer's output unchanged."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


class LoraLinear(nn.Linear):
    """``nn.Linear`` plus an optional unscaled low-rank update ``lora_b(lora_a(x))``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, lora_rank: int = 0):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_rank = lora_rank
        if lora_rank > 0:
            self.lora_a = LoraDown(in_features, lora_rank, bias=False)
            self.lora_b = LoraUp(lora_rank, out_features, bias=False)
        else:
            self.lora_a = self.lora_b = None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)  # the original zero-initialises tuned biases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora_a is not None:
            out = out + self.lora_b(self.lora_a(x))
        return out


def make_linear(in_features: int, out_features: int, bias: bool = False, lora_rank: int = 0) -> nn.Linear:
    """A plain ``nn.Linear`` when neither bias nor LoRA is asked for, else a :class:`LoraLinear`."""
    if not bias and lora_rank <= 0:
        return nn.Linear(in_features, out_features, bias=False)
    return LoraLinear(in_features, out_features, bias=bias, lora_rank=lora_rank)
