"""Linear layers with the original's PEFT options: a bias and a low-rank (LoRA) side path.

Checkpoint names: ``weight``, ``bias`` (when present), ``lora_a.weight`` (rank, in) and
``lora_b.weight`` (out, rank). The original adds the LoRA term unscaled: ``W x + b + B(A x)``.
"""

from typing import Optional

import torch
from torch import nn

from ...kernels.linear import NativeLinear
from ...kernels.linear import linear as fast_linear
from ...quant.linear import fuse_quant_linears
from ...quant.memory import in_huge_pages, release_file_pages, zeros_in_huge_pages
from .fused import FusedViews, one_run, side_by_side, tied_parameters
from .panel_linear import fuse_panel_linears

_FUSABLE = (nn.Linear, NativeLinear)


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
        out = fast_linear(x, self.weight, self.bias)
        if self.lora_a is not None:
            out = out + self.lora_b(self.lora_a(x))
        return out


def make_linear(in_features: int, out_features: int, bias: bool = False, lora_rank: int = 0) -> nn.Linear:
    """A plain ``nn.Linear`` when neither bias nor LoRA is asked for, else a :class:`LoraLinear`."""
    if not bias and lora_rank <= 0:
        return nn.Linear(in_features, out_features, bias=False)
    return LoraLinear(in_features, out_features, bias=bias, lora_rank=lora_rank)


class FusedLinear(FusedViews):
    """Bias-free plain linears sharing one input, as one (sum(out), in) matrix product."""

    def __init__(self, weight: torch.Tensor, modules):
        self.weight, self.sizes = weight, [m.weight.shape[0] for m in modules]
        self.watch_views(modules, "weight")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight)


def fuse_linears(*linears: nn.Module):
    """One product for several bias-free linears sharing one input: a :class:`FusedLinear` (or,
    for quantized layers, a ``quant.linear.FusedQuantLinear``, for weights in panels a
    ``panel_linear.FusedPanelLinear``) called as ``fused(x)``, whose
    ``sizes`` give each module's share of the output's last dim.

    Each module's weight becomes a view of its rows, so names, checkpoints and ``state_dict()``
    are unchanged. Returns None when the modules cannot be fused (biases, LoRA, different inputs
    or dtypes).
    """
    fused = fuse_quant_linears(linears)
    if fused is None:
        fused = fuse_panel_linears(linears)
    if fused is not None:
        return fused
    if any(type(m) not in _FUSABLE or m.bias is not None for m in linears):
        return None
    weights = [m.weight for m in linears]
    if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1 or any(w.is_meta for w in weights):
        return None
    run = one_run(weights)
    if run is not None:  # already one run (rows_in_huge_pages put them side by side): its view, no copy
        return FusedLinear(run.view(-1, weights[0].shape[1]), linears)
    fused = torch.cat([w.detach() for w in weights], dim=0)
    start = 0
    for module, weight in zip(linears, weights):
        rows = weight.shape[0]
        module.weight = nn.Parameter(fused[start:start + rows], requires_grad=weight.requires_grad)
        start += rows
        # a weight used in place from the memory-mapped checkpoint: its pages, read once for the
        # copy, would otherwise stay resident beside the fused matrix
        release_file_pages(weight)
    return FusedLinear(fused, linears)


def rows_in_huge_pages(model: nn.Module) -> int:
    """Copy the bf16 CPU weights of ``model``'s plain linears (``nn.Linear``, ``NativeLinear``;
    a weight several modules share stays) into one allocation in 2 MiB pages
    (``quant.memory.zeros_in_huge_pages``), the children a module names in ``fused_children``
    side by side, so that fusing them takes a view instead of a copy. Returns how many; 0 where
    the system gives no huge pages (or below one page's worth).

    The row-major kernels' products of a 768-wide, 12-layer model's matrices, one row, every
    matrix from memory: 1.28x (AVX-512 kernel) and 1.20x (AVX2) in 2 MiB pages; 1.1B's
    1.01-1.02x (benchmarks/README.md, session 16). Weights in panels get the same from
    ``panel_linear.use_panels``."""
    tied = tied_parameters(model)

    def movable(module) -> bool:
        weight = module._parameters.get("weight") if type(module) in _FUSABLE else None
        return weight is not None and weight.dtype is torch.bfloat16 and weight.device.type == "cpu" and \
            weight.dim() == 2 and weight.numel() > 0 and id(weight) not in tied
    order = side_by_side(model, movable)
    total = sum(module.weight.numel() for module in order)
    if not in_huge_pages(total * 2):  # (a copy into ordinary memory would gain nothing)
        return 0
    arena = zeros_in_huge_pages(total, torch.bfloat16, populate=False)  # (faulted in as the copy goes)
    start = 0
    for module in order:
        weight = module._parameters["weight"]
        part = arena[start:start + weight.numel()].view(weight.shape)
        part.copy_(weight.detach())
        module.weight = nn.Parameter(part, requires_grad=weight.requires_grad)
        release_file_pages(weight)  # a weight used in place from the memory-mapped checkpoint
        start += weight.numel()
        del weight  # (the old weight's last reference)
    return len(order)


def fuse_children(parent: nn.Module, names) -> Optional[FusedViews]:
    """:func:`fuse_linears` of ``parent``'s children ``names``, the result relying on those
    children staying ``parent``'s (see ``fused.FusedViews.owned_by``); None when they cannot be
    fused."""
    fused = fuse_linears(*(getattr(parent, name) for name in names))
    return None if fused is None else fused.owned_by(parent, names)


def still_fused(fused) -> bool:
    """Whether ``fused`` (None, or what :func:`fuse_linears` returned) still backs every one of its
    modules' weights (a ``.to()``, a reload or an assigned weight replaces one)."""
    return fused is not None and fused.backs()
