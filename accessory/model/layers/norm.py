"""Normalisation layers with the original's checkpoint names (`weight`, and `bias` for LayerNorm)."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x * rsqrt(mean(x^2) + eps) * weight``, the statistics in float32.

    The normalised activations are cast back to the input dtype before the weight is applied, as
    Meta's reference and the original (apex FusedRMSNorm) do.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            # torch's CUDA kernel reads a bf16/fp16 x and computes in float32 itself: the same
            # arithmetic without the two casts around it (two of a GPU decode step's ~30 launches
            # per layer went to them)
            normed = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        else:
            normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
