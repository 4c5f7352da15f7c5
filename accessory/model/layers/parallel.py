"""Model-parallel split declarations: which parameter is cut along which dim across ranks.

An architecture declares one ``SplitPlan``; checkpoint merging (many shards -> one model) reads it
today, and runtime tensor parallelism and resharding read the same declaration.

Dims follow the original's fairscale layers: column-parallel linears split their output rows
(dim 0), row-parallel linears their input columns (dim 1), ``ParallelEmbedding`` its embedding dim
(dim 1); everything else is replicated (``None``).

Mixture-of-experts weights are cut in two other ways, declared with a :class:`Partition` in place
of a dim: :class:`WholeExperts` (mixtral: each rank holds whole experts) and
:class:`ExpertSlices` (mixtral_sparse: each rank holds a slice of every expert).
"""

import re
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch

COLUMN = 0
ROW = 1
REPLICATED = None


class Partition:
    """A cut that is not "concatenate along one dim": it merges and splits tensors itself."""

    #: The dim each rank holds part of, or None when a rank holds the tensor whole (or not at all).
    shard_dim: Optional[int] = None

    def merge(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def split(self, name: str, tensor: torch.Tensor, mp_size: int) -> List[Optional[torch.Tensor]]:
        raise NotImplementedError


def _need_experts(num_experts: Optional[int], what: str) -> int:
    if num_experts is None:
        raise ValueError(f"{what} needs the expert count: use the split_plan of a built model "
                         f"(Transformer(args).split_plan), not the class attribute")
    return num_experts


class WholeExperts(Partition):
    """Whole experts per rank, named by their GLOBAL index (the original's mixtral / mixtral_peft).

    Rank ``r`` of ``mp`` holds every parameter under ``experts.{e}.`` for ``e`` in
    ``[r*E/mp, (r+1)*E/mp)`` and nothing of the other experts, so a merge has one piece per name.
    """

    _EXPERT = re.compile(r"(^|\.)experts\.(\d+)\.")

    def __init__(self, num_experts: Optional[int] = None):
        self.num_experts = num_experts

    def owner(self, name: str, mp_size: int) -> int:
        """The rank holding ``name`` when the experts are spread over ``mp_size`` ranks."""
        num_experts = _need_experts(self.num_experts, "splitting whole experts")
        if num_experts % mp_size:
            raise ValueError(f"{num_experts} experts cannot be spread evenly over {mp_size} model-parallel ranks")
        match = self._EXPERT.search(name)
        if match is None:
            raise ValueError(f"{name} is not an expert parameter (no 'experts.<index>.' in its name)")
        return int(match.group(2)) // (num_experts // mp_size)

    def merge(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        return shards[0]  # only the owning rank has it

    def split(self, name: str, tensor: torch.Tensor, mp_size: int) -> List[Optional[torch.Tensor]]:
        owner = self.owner(name, mp_size)
        return [tensor if rank == owner else None for rank in range(mp_size)]


class ExpertSlices(Partition):
    """Experts stacked as (E*h, dim) rows, each expert's h rows cut evenly across ranks
    (the original's mixtral_sparse): rank ``r`` holds ``W.view(E, h, dim)[:, r*h/mp:(r+1)*h/mp]``."""

    shard_dim = 0

    def __init__(self, num_experts: Optional[int] = None):
        self.num_experts = num_experts

    def merge(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        num_experts = _need_experts(self.num_experts, f"merging {name}")
        if len(shards) == 1:
            return shards[0]
        dim = shards[0].shape[-1]
        return torch.cat([s.reshape(num_experts, -1, dim) for s in shards], dim=1).reshape(-1, dim)

    def split(self, name: str, tensor: torch.Tensor, mp_size: int) -> List[Optional[torch.Tensor]]:
        num_experts = _need_experts(self.num_experts, f"splitting {name}")
        rows, dim = tensor.shape
        if rows % (num_experts * mp_size):
            raise ValueError(f"{name} {tuple(tensor.shape)}: {rows} rows are not {num_experts} experts "
                             f"cut into {mp_size} equal slices")
        per_expert = tensor.reshape(num_experts, -1, dim)
        return [piece.reshape(-1, dim) for piece in torch.chunk(per_expert, mp_size, dim=1)]


Rule = Union[Optional[int], Partition]


class SplitPlan:
    """An ordered list of (regex, dim or :class:`Partition`) rules matched against parameter names
    (first match wins).

    ``gather``: regexes naming the modules whose column-split (dim 0) output must be whole at
    runtime (the output head: its vocab slices are all-gathered); other column-split outputs stay
    local and feed a row-split module (see :mod:`accessory.model.layers.tensor_parallel`).
    """

    def __init__(self, rules: Sequence[Tuple[str, Rule]], gather: Sequence[str] = ()):
        self.rules: List[Tuple[re.Pattern, Rule]] = [(re.compile(p), d) for p, d in rules]
        self.gather: List[re.Pattern] = [re.compile(p) for p in gather]

    def extended(self, rules: Sequence[Tuple[str, Rule]], gather: Sequence[str] = ()) -> "SplitPlan":
        """This plan with more rules (and gathered modules) after its own."""
        plan = SplitPlan([], [])
        plan.rules = self.rules + [(re.compile(p), d) for p, d in rules]
        plan.gather = self.gather + [re.compile(p) for p in gather]
        return plan

    def gathers_output(self, module_name: str) -> bool:
        """Whether ``module_name``'s column-split output is all-gathered to its full width."""
        return any(pattern.search(module_name) for pattern in self.gather)

    def rule(self, name: str) -> Rule:
        """The dim or :class:`Partition` ``name`` is cut by, or None when it is replicated."""
        for pattern, rule in self.rules:
            if pattern.search(name):
                return rule
        return REPLICATED

    def shard_dim(self, name: str) -> Optional[int]:
        """The dim each rank holds a piece of ``name`` along, or None when every rank holds it
        whole (replicated) or only one rank does (:class:`WholeExperts`)."""
        rule = self.rule(name)
        return rule.shard_dim if isinstance(rule, Partition) else rule

    def merge(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Join the per-rank pieces of ``name`` into the full tensor."""
        rule = self.rule(name)
        if isinstance(rule, Partition):
            return rule.merge(name, shards)
        if len(shards) == 1:
            return shards[0]
        if rule is None or shards[0].dim() <= rule:
            if any(s.shape != shards[0].shape or not torch.equal(s, shards[0]) for s in shards[1:]):
                warnings.warn(f"{name} is replicated across model-parallel ranks but the shards differ; "
                              f"using rank 0's copy", stacklevel=2)
            return shards[0]
        return torch.cat(list(shards), dim=rule)

    def split(self, name: str, tensor: torch.Tensor, mp_size: int) -> List[Optional[torch.Tensor]]:
        """The piece of ``name`` each of ``mp_size`` ranks holds (None: that rank holds none)."""
        rule = self.rule(name)
        if isinstance(rule, Partition):
            return rule.split(name, tensor, mp_size)
        if rule is None or mp_size == 1 or tensor.dim() <= rule:
            return [tensor] * mp_size
        if tensor.shape[rule] % mp_size:
            raise ValueError(f"{name} {tuple(tensor.shape)}: dim {rule} does not split into {mp_size} equal pieces")
        return list(torch.chunk(tensor, mp_size, dim=rule))
