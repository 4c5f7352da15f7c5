"""bf16 linear layers whose weights are held in 16-row panels (``kernels.panels``), for the CPU.

On CPUs with AVX512-BF16 (and no AMX, where torch's own product was not measured against them)
the weights of a model's bf16 ``nn.Linear`` layers are kept in panels instead of rows: each
group of 16 output rows is one sequential stream, which the products of decoding (1-64 token
rows) read 1.1-1.5x faster than row-major weights, and which prompts (hundreds of rows) multiply
about as fast as torch's product (``benchmarks/panels.py``, numbers in ``benchmarks/README.md``).
The panels *are* the weight: one copy, the same bytes plus padding to 16 rows and an even input
count.

To everything outside, a :class:`PanelLinear` is still the linear it was:

* ``state_dict()`` holds ``weight`` (row-major, unpacked bit for bit) and ``load_state_dict``
  takes ``weight`` (packed in place), so checkpoints, conversions and merges see the usual names;
* reading or assigning ``module.weight`` turns the module back into its row-major class for good
  (``to_row_major``) and then reads or sets the real parameter, so code that reads a weight, edits
  it in place or trains it works as before, at the row-major speed;
* ``.to()``, ``.cuda()``, ``.float()`` and any cast that leaves the CPU or bf16 do the same first,
  and so does a forward that autograd must follow through the weight.

``ACCESSORY_PANELS=0`` keeps every weight row-major. Turning a module back is not thread-safe
against another thread's forward through the same module.
"""

import logging
from typing import Optional, Sequence

import torch
from torch import nn

from ...kernels import cpu_flags, switched_off
from ...kernels.linear import NativeLinear, linear as native_linear
from ...kernels.panels import PANEL_ROWS, pack, panel_elements, panel_linear, panels_available, unpack
from ...quant.memory import release_file_pages, zeros_in_huge_pages
from .fused import FusedViews, one_run, side_by_side, tied_parameters

log = logging.getLogger(__name__)
_CONVERTIBLE = (nn.Linear, NativeLinear)


def panels_wanted() -> bool:
    """Whether bf16 CPU weights go into panels here: the kernels run (AVX512-BF16, a compiler), the
    CPU has no AMX, and ``ACCESSORY_PANELS`` is not 0."""
    return not switched_off("ACCESSORY_PANELS") and panels_available() and "amx_bf16" not in (cpu_flags() or ())


class PanelLinear(nn.Linear):
    """An ``nn.Linear`` (or ``NativeLinear``) whose weight is stored as panels: parameter
    ``panels`` (1-D bf16) of a weight of ``panel_shape`` (out, in), and the usual optional
    ``bias``. Made by :func:`to_panels`, undone by
    :func:`to_row_major` (see the module docstring for what reads and casts do)."""

    def __init__(self, *args, **kwargs):
        raise TypeError("a PanelLinear is made from a bf16 CPU nn.Linear by "
                        "accessory.model.layers.panel_linear.to_panels(module)")

    @property
    def weight(self) -> nn.Parameter:
        return to_row_major(self).weight

    def __setattr__(self, name, value):
        if name == "weight":
            setattr(to_row_major(self), name, value)
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name):
        if name == "weight":
            delattr(to_row_major(self), name)
        else:
            super().__delattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _panels_multiply(x, self.panels):
            return to_row_major(self)(x)  # torch's product: its autograd, its errors
        return panel_linear(x, self.panels, self.panel_shape[0], self.bias)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=torch.bfloat16))
        if probe.device.type != "cpu" or probe.dtype is not torch.bfloat16:
            return to_row_major(self)._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = unpack(self.panels.detach(), *self.panel_shape)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key, shape = prefix + "weight", self.panel_shape
        weight = state_dict.get(key)
        if weight is not None:
            if tuple(weight.shape) != shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)} "
                                  f"from checkpoint, the shape in current model is {torch.Size(shape)}.")
            else:
                with torch.no_grad():  # copy_, not pack(out=): torch counts the write (the engine's
                    # prompt caches are dropped when a weight they were computed from changes)
                    self.panels.copy_(pack(weight.detach().to(device="cpu", dtype=torch.bfloat16)))
        elif strict:
            missing_keys.append(key)
        # the bias (and the checks for unexpected names) as nn.Module does them, without the weight
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k != key}
        missing_before = len(missing_keys)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        missing_keys[missing_before:] = [k for k in missing_keys[missing_before:] if k != prefix + "panels"]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight in 16-row panels"


def head_logits(output: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``output(x)`` for a model's output head, except that on the CPU a bf16 head in panels, or a
    bf16 ``NativeLinear`` without hooks, returns its float32 sums unrounded, as the native decode
    step gives them: rounded to bf16, logits near 25 are 0.125 apart, and greedy decoding then
    settles near ties by token order (SmolLM2's first answer token flipped that way). Every
    architecture's ``logits`` goes through here."""
    if type(output) is PanelLinear:
        return output(x.float())  # (float32 in, float32 out)
    if type(output) is NativeLinear and x.dtype is torch.bfloat16 and not output._forward_hooks and \
            not output._forward_pre_hooks:
        return native_linear(x, output.weight, output.bias, float32_out=True)
    return output(x)


def _panels_multiply(x: torch.Tensor, panels: torch.Tensor) -> bool:
    """Whether the panel product takes ``x``: a bf16 or float32 CPU input, and no gradient that
    autograd would have to follow through it."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and \
        not (torch.is_grad_enabled() and (x.requires_grad or panels.requires_grad))


def _one_run(shapes) -> bool:
    """Whether weights of these (out, in) shapes can be one run of panels, each a whole part of it:
    one input size, and row counts that are multiples of 16 but for the last."""
    return len({inputs for _, inputs in shapes}) == 1 and not any(rows % PANEL_ROWS for rows, _ in shapes[:-1])


def _convertible(module: nn.Module) -> bool:
    weight = module._parameters.get("weight") if type(module) in _CONVERTIBLE else None
    return weight is not None and weight.dtype is torch.bfloat16 and weight.device.type == "cpu" and \
        weight.dim() == 2 and weight.numel() > 0 and (module.bias is None or module.bias.device.type == "cpu")


def to_panels(module: nn.Module, into: Optional[torch.Tensor] = None) -> bool:
    """Hold ``module``'s weight in panels (an ``nn.Linear`` / ``NativeLinear`` with a bf16 CPU
    weight; its class becomes :class:`PanelLinear`), packed into ``into`` when given (a slice of
    a run, see :func:`use_panels`). Returns whether it did."""
    if not _convertible(module):
        return False
    weight = module._parameters["weight"]
    row_major_class = type(module)
    panels = pack(weight.detach(), out=into)
    module.register_parameter("panels", nn.Parameter(panels, requires_grad=weight.requires_grad))
    del module._parameters["weight"]
    module.__class__ = PanelLinear
    # the weight's own shape: under model parallelism a module's in/out_features name the whole
    # matrix and its weight holds this rank's slice
    module.__dict__.update(_row_major_class=row_major_class, panel_shape=tuple(weight.shape))
    release_file_pages(weight)  # a weight used in place from the memory-mapped checkpoint
    return True


def to_row_major(module: nn.Module) -> nn.Module:
    """Undo :func:`to_panels`: the weight unpacked (bit-identical) into ``weight`` and the module's
    class back to what it was. Returns the module (unchanged when it holds no panels)."""
    if type(module) is not PanelLinear:
        return module
    panels = module._parameters.pop("panels")
    log.debug("%s: weight back in rows (read, assigned, cast or trained)", module.extra_repr())
    weight = unpack(panels.detach(), *module.__dict__.pop("panel_shape"))
    module.__class__ = module.__dict__.pop("_row_major_class")
    module.weight = nn.Parameter(weight, requires_grad=panels.requires_grad)
    return module


def use_panels(model: nn.Module) -> int:
    """Hold the bf16 CPU weights of ``model``'s plain linears (``nn.Linear``, ``NativeLinear``) in
    panels where :func:`panels_wanted`; returns how many. A weight that is one parameter of
    several modules (tied) stays as it is.

    Run before the model fuses its products: the children a module names in ``fused_children``
    (q/k/v, w1/w3) are packed straight into one run when they can share one (one copy of the
    weights at load, not a copy per module and another to fuse them: S's load 4.0 -> 1.3-1.4 s on
    the 2-core Zen 4, against 0.5-0.7 s in rows, where only the fused matrices are copied)."""
    if not panels_wanted():
        return 0
    tied = tied_parameters(model)

    def convertible(module) -> bool:
        return _convertible(module) and id(module._parameters["weight"]) not in tied
    order = side_by_side(model, convertible, lambda children: all(child.bias is None for child in children) and
                         _one_run([tuple(child._parameters["weight"].shape) for child in children]))
    sizes = [panel_elements(*module._parameters["weight"].shape) for module in order]
    # one allocation for all of them, in 2 MiB pages where the system gives them
    # (quant/memory.py); a group's members side by side, so each group is one run. Its pages are
    # faulted in as the packing writes them and each row-major weight goes once packed, so the two
    # are never both whole (weights converted on load are not the checkpoint's mapped pages)
    arena = zeros_in_huge_pages(sum(sizes), torch.bfloat16, populate=False)
    start = count = 0
    for module, size in zip(order, sizes):
        count += to_panels(module, into=arena[start:start + size])
        start += size
    return count


class FusedPanelLinear(FusedViews):
    """Bias-free :class:`PanelLinear` modules sharing one input, their panels concatenated into one
    run (each module's ``panels`` becomes a view of its part): one product for all of them."""

    def __init__(self, modules: Sequence[PanelLinear]):
        self.in_features = modules[0].panel_shape[1]
        self.sizes = [m.panel_shape[0] for m in modules]
        self.out_features = sum(self.sizes)
        self.panel_shape = (self.out_features, self.in_features)  # as a PanelLinear's
        parts = [m.panels.detach() for m in modules]
        self.panels = one_run(parts)  # already one run (use_panels packed them so): its view, no copy
        if self.panels is None:
            self.panels = torch.cat(parts)
            start = 0
            for module in modules:
                count = module.panels.numel()
                module.panels = nn.Parameter(self.panels[start:start + count], requires_grad=module.panels.requires_grad)
                start += count
        self.watch_views(modules, "panels")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not _panels_multiply(x, self.fused_modules[0].panels):  # (the modules' parameters carry requires_grad)
            return torch.cat([module(x) for module in self.fused_modules], dim=-1)
        return panel_linear(x, self.panels, self.out_features)


def fuse_panel_linears(modules: Sequence[nn.Module]) -> Optional[FusedPanelLinear]:
    """A :class:`FusedPanelLinear` when ``modules`` are bias-free PanelLinears of one input size
    whose row counts, but for the last, are multiples of 16 (so each one's panels are a whole run
    of the fused matrix's); else None."""
    if not all(type(m) is PanelLinear and m.bias is None for m in modules):
        return None
    return FusedPanelLinear(modules) if _one_run([m.panel_shape for m in modules]) else None
