"""What a fused product (one matrix product for several linears sharing one input) relies on."""

import copy
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn


class FusedViews:
    """Base of the fused products (``layers.linear.FusedLinear``, ``quant.linear.FusedQuantLinear``,
    ``panel_linear.FusedPanelLinear``): each module's parameter ``name`` is a view of its part of
    the fused matrix, and :meth:`backs` says whether every one still is. A ``.to()``, a reload, an
    assigned weight or a weight put back in rows replaces one, and the fused matrix would then
    compute with stale values."""

    views: list
    owners = ()

    def owned_by(self, parent: nn.Module, names: Sequence[str]) -> "FusedViews":
        """Also rely on ``parent``'s children ``names`` staying the fused modules (a child replaced
        by another module leaves the fused matrix stale too). Returns self."""
        self.owners = [(parent._modules, name, parent._modules[name]) for name in names]
        return self

    def watch_views(self, modules: Sequence[nn.Module], name: str) -> None:
        """Remember each module's ``name`` parameter as it is now: (parameters, name, address),
        the entries ``fast_decode``'s watch re-reads before each step."""
        self.fused_modules = list(modules)
        self.views = [(module._parameters, name, module._parameters[name].data_ptr()) for module in modules]

    def __deepcopy__(self, memo) -> "FusedViews":
        """The copies of the modules fused again. A field-by-field copy would not be what they
        view (each parameter deep-copies on its own): the copied model would run unfused, and a
        fused matrix that is a view of a larger allocation (weights in panels share one) would
        copy all of it."""
        from .linear import fuse_linears  # (linear.py imports this module)
        fused = fuse_linears(*(copy.deepcopy(module, memo) for module in self.fused_modules))
        if fused is not None and self.owners:
            fused.owners = copy.deepcopy(self.owners, memo)
        memo[id(self)] = fused
        return fused

    def backs(self) -> bool:
        for children, name, module in self.owners:
            if children.get(name) is not module:
                return False
        for parameters, name, address in self.views:
            parameter = parameters.get(name)
            if parameter is None or parameter.data_ptr() != address:
                return False
        return True


def one_run(parts: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """A flat view of ``parts`` when they already lie one after another in one storage (each
    contiguous: laid out so by ``side_by_side``), so fusing them copies nothing; else None."""
    if not all(part.is_contiguous() for part in parts) or not all(
            b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() and
            b.data_ptr() == a.data_ptr() + a.numel() * a.element_size() for a, b in zip(parts, parts[1:])):
        return None
    first = parts[0].detach()
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (sum(p.numel() for p in parts),))


def tied_parameters(model: nn.Module) -> set:
    """ids of ``model``'s parameters that more than one module holds (tied weights)."""
    seen, tied = set(), set()
    for _, parameter in model.named_parameters(remove_duplicate=False):
        (tied if id(parameter) in seen else seen).add(id(parameter))
    return tied


def side_by_side(model: nn.Module, fits: Callable[[nn.Module], bool],
                 group_fits: Callable[[List[nn.Module]], bool] = lambda children: True) -> List[nn.Module]:
    """The modules of ``model`` that ``fits``, in the order to lay their weights out in one
    allocation: the children each module names in ``fused_children`` together (when every one of
    them fits and ``group_fits`` them), so fusing them later takes a view, then the others."""
    order, placed = [], set()
    for parent in list(model.modules()):
        children = [parent._modules.get(name) for name in getattr(parent, "fused_children", ())]
        if children and all(child is not None and fits(child) and id(child) not in placed for child in children) \
                and group_fits(children):
            order.extend(children)
            placed.update(id(child) for child in children)
    order.extend(module for module in model.modules() if fits(module) and id(module) not in placed)
    return order
