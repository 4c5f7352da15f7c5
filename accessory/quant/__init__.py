"""Weight-only quantization of a model's linear layers (``MetaModel.from_pretrained(quant=...)``).

* :func:`resolve_scheme` turns the user's ``quant`` (``True``, ``"int8"``, ``"int4"``, ``"nf4"``,
  ``"int4-g64"``, a :class:`QuantScheme`) into a scheme, or None for full precision.
* :func:`quantize_model` replaces every eligible linear layer by a :class:`QuantLinear`.
* :class:`Quantizer` does the same while a checkpoint loads: each weight is packed right after it is
  read, so the full-precision model never exists in memory at once.

Eligible: ``nn.Linear`` layers (plain, with bias, with LoRA) of the language model, the output head
included as in the original. Kept in full precision: embeddings and norms (not linear), LoRA's own
``lora_a`` / ``lora_b``, mixture-of-experts routers (``…gate``: tiny, and routing decides which
experts run), the modules a model lists in ``get_quant_blocklist()`` (visual encoders and their
projections), and matrices whose input size the format cannot group.
"""

import logging
from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn

from .formats import SCHEMES, QuantScheme, dequantize, quantize
from .linear import QuantLinear, fuse_quant_linears
from .memory import release_file_pages, return_freed_heap  # noqa: F401 (public names)

__all__ = ["QuantScheme", "QuantLinear", "Quantizer", "resolve_scheme", "quantize_model", "make_shells",
           "quantize", "dequantize", "eligible_linears", "fuse_quant_linears", "SCHEMES"]

log = logging.getLogger(__name__)


def resolve_scheme(quant, device: Optional[torch.device] = None) -> Optional[QuantScheme]:
    """``quant`` as a :class:`QuantScheme`; None for False/None (full precision).

    ``True`` picks 4-bit for the device, as the original's ``--quant`` does: ``int4`` (group 32)
    on the CPU, ``nf4`` on CUDA. Strings: ``"int8"``, ``"int4"``, ``"nf4"``, optionally with a
    group size, ``"int4-g64"``.
    """
    if quant is None or quant is False:
        return None
    if isinstance(quant, QuantScheme):
        return quant
    if quant is True:
        return QuantScheme("nf4" if device is not None and torch.device(device).type == "cuda" else "int4")
    if isinstance(quant, dict):
        return QuantScheme.from_json(quant)
    if isinstance(quant, str):
        name, _, group = quant.lower().partition("-g")
        try:
            return QuantScheme(name, int(group) if group else 0)
        except ValueError as exc:
            raise ValueError(f"quant={quant!r}: {exc}. Examples: quant=True, 'int8', 'int4', 'int4-g64', "
                             f"'nf4'") from exc
    raise TypeError(f"quant={quant!r}: pass True/False, one of {', '.join(SCHEMES)} "
                    f"(optionally '-g<group size>') or a QuantScheme")


#: Names of the output head (the vocabulary projection) across the zoo's architectures.
HEAD_NAMES = ("output", "head", "lm_head")


def scheme_for(name: str, scheme: QuantScheme) -> QuantScheme:
    """The format of layer ``name`` under ``scheme``: the output head keeps 8 bits under the 4-bit
    schemes (as llama.cpp keeps it at 6-8 bits): on SmolLM2, int4 everywhere raised perplexity
    9.1%, int4 with the head at int8 -0.1% (noise; benchmarks/quant.py)."""
    if scheme.bits == 4 and name.split(".")[-1] in HEAD_NAMES:
        return QuantScheme("int8")
    return scheme


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).__name__ not in ("LoraDown", "LoraUp")


def eligible_linears(model: nn.Module, scheme: QuantScheme, blocklist: Sequence[str] = ()) -> List[str]:
    """Names of the linear layers of ``model`` that :func:`quantize_model` would pack."""
    names = []
    for name, module in model.named_modules():
        if not _linear_like(module) or "lora" in name.split(".")[-1]:
            continue
        if name.split(".")[-1] == "gate" or any(name == b or name.startswith(b + ".") for b in blocklist):
            continue
        if not scheme.supports(module.weight.shape[1]):
            log.info("%s stays in full precision: its %d inputs are not a multiple of group size %d",
                     name, module.weight.shape[1], scheme.group_size)
            continue
        names.append(name)
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    new._forward_hooks.update(old._forward_hooks)  # keep model-parallel collectives
    new._forward_pre_hooks.update(old._forward_pre_hooks)
    setattr(parent, attr, new)


def quantize_model(model: nn.Module, scheme: QuantScheme, blocklist: Sequence[str] = (),
                   names: Optional[Iterable[str]] = None) -> int:
    """Replace the eligible linear layers of ``model`` (or just ``names``) by QuantLinears, in
    place, one at a time; returns how many."""
    count = 0
    for name in list(eligible_linears(model, scheme, blocklist) if names is None else names):
        module = model.get_submodule(name)
        if isinstance(module, QuantLinear) or module.weight.is_meta:
            continue
        _replace(model, name, QuantLinear.from_linear(module, scheme_for(name, scheme)))
        count += 1
    return count




def make_shells(model: nn.Module, scheme: QuantScheme, names: Iterable[str]) -> None:
    """Turn the (meta-device) linear layers ``names`` into empty QuantLinears: the shape a
    pre-quantized checkpoint is loaded into."""
    for name in names:
        _replace(model, name, QuantLinear.shell_of(model.get_submodule(name), scheme_for(name, scheme)))


class Quantizer:
    """Packs each eligible linear layer of a meta-built model as soon as the loader has set its
    weight (``after_load`` below), and whatever is left at ``finish()``."""

    def __init__(self, model: nn.Module, scheme: QuantScheme, blocklist: Sequence[str] = (),
                 prefix: str = ""):
        self.model, self.scheme, self.prefix = model, scheme, prefix
        self.targets = set(eligible_linears(model, scheme, blocklist))
        self.count = 0

    def after_load(self, key: str) -> List[str]:
        """Called by the loader with each parameter name it has set; returns the names of the
        packed parameters that now stand for it (empty when nothing was packed)."""
        module_name, _, attr = key.rpartition(".")
        if attr != "weight" or module_name not in self.targets:
            return []
        weight = self.model.get_submodule(module_name).weight
        self.count += quantize_model(self.model, self.scheme, names=[module_name])
        release_file_pages(weight)
        del weight
        return_freed_heap()
        return [f"{module_name}.{name}" for name in scheme_for(module_name, self.scheme).tensor_names()]

    def finish(self) -> int:
        self.count += quantize_model(self.model, self.scheme, names=sorted(self.targets))
        return self.count

