"""Model-parallel split declarations: which parameter is cut along which dim across ranks.

An architecture declares one ``SplitPlan``; checkpoint merging (many shards -> one model) reads it
today, and runtime tensor parallelism and resharding read the same declaration.

Dims follow the original's fairscale layers: column-parallel linears split their output rows
(dim 0), row-parallel linears their input columns (dim 1), ``ParallelEmbedding`` its embedding dim
(dim 1); everything else is replicated (``None``).

Mixture-of-experts weights are cut in two other ways, declared with a :class:`Partition` in place
of a dim: :class:`WholeExperts` (mixtral: each rank holds whole experts) and
:class:`ExpertSlices` (mixtral_sparse: each rank holds a slice of every expert). Where the layout
the original's shards store differs from the one a rank needs to compute with (internlm),
:class:`Relayout` names both.

Each rule answers two questions: how checkpoint shards are merged and split (``merge``, ``split``,
``shard_dim``: the stored layout), and what a rank holds and computes with at runtime
(``local_piece``, ``local_shape``, ``runtime_dim``, ``reduce_at``; read by
:mod:`accessory.model.layers.tensor_parallel` and the loader).
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

    #: The dim each rank's stored shard holds part of, or None when a shard holds the tensor whole
    #: (or not at all).
    shard_dim: Optional[int] = None

    @property
    def runtime_dim(self) -> Optional[int]:
        """The dim a running rank's piece is cut along, as a Linear / Embedding cut reads it
        (0: output rows, no collective; 1: input columns, output all-reduced); None: no such cut."""
        return self.shard_dim

    def merge(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def split(self, name: str, tensor: torch.Tensor, mp_size: int) -> List[Optional[torch.Tensor]]:
        raise NotImplementedError

    # ---- runtime: what rank ``rank`` of ``size`` holds and computes with
    def holds(self, name: str, rank: int, size: int) -> bool:
        """Whether that rank holds any of ``name`` (False: the parameter is absent there)."""
        return True

    def local_split(self, name: str, tensor: torch.Tensor, size: int) -> List[Optional[torch.Tensor]]:
        """The full ``tensor`` cut into the pieces running ranks hold (default: the stored cut)."""
        return self.split(name, tensor, size)

    def local_shape(self, name: str, shape: Sequence[int], rank: int, size: int) -> Optional[Tuple[int, ...]]:
        """The shape of that rank's piece of a tensor of full ``shape`` (None: it holds none)."""
        if not self.holds(name, rank, size):
            return None
        piece = self.local_split(name, torch.empty(tuple(shape), device="meta"), size)[rank]
        return None if piece is None else tuple(piece.shape)

    def local_piece(self, name: str, pieces: Sequence[torch.Tensor], rank: int, size: int) -> Optional[torch.Tensor]:
        """That rank's runtime piece, from the stored shards' ``pieces``."""
        return self.local_split(name, self.merge(name, pieces), size)[rank]

    def reduce_at(self, name: str) -> Optional[str]:
        """The module whose output is a partial sum over ranks because of this cut (its output is
        all-reduced), or None."""
        return None


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

    def holds(self, name: str, rank: int, size: int) -> bool:
        return self.owner(name, size) == rank

    def reduce_at(self, name: str) -> Optional[str]:
        """The mixture holding ``experts``: each rank adds up its own experts' weighted outputs
        (zero for tokens routed elsewhere), so the mixture's output is summed over ranks."""
        match = self._EXPERT.search(name)
        return None if match is None else name[:match.start()]


class GroupSlices(Partition):
    """Rows stacked as ``groups`` equal blocks, each block cut evenly across ranks: rank ``r`` of
    ``mp`` holds ``W.view(groups, h, ...)[:, r*h/mp:(r+1)*h/mp]`` (weights and 1-D biases alike).

    Used at runtime for a fused projection whose output is ``groups`` blocks of heads (internlm's
    ``Wqkv``: q, k, v), so each rank computes whole heads of each block; its output stays local,
    like a column-parallel Linear's.
    """

    shard_dim = 0

    def __init__(self, groups: Optional[int] = None):
        self.groups = groups

    def _groups(self, what: str) -> int:
        return _need_experts(self.groups, what)

    def merge(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        groups = self._groups(f"merging {name}")
        if len(shards) == 1:
            return shards[0]
        tail = tuple(shards[0].shape[1:])
        return torch.cat([s.reshape(groups, -1, *tail) for s in shards], dim=1).reshape(-1, *tail)

    def split(self, name: str, tensor: torch.Tensor, mp_size: int) -> List[Optional[torch.Tensor]]:
        groups = self._groups(f"splitting {name}")
        rows, tail = tensor.shape[0], tuple(tensor.shape[1:])
        if rows % (groups * mp_size):
            raise ValueError(f"{name} {tuple(tensor.shape)}: {rows} rows are not {groups} blocks "
                             f"cut into {mp_size} equal slices")
        per_group = tensor.reshape(groups, -1, *tail)
        return [piece.reshape(-1, *tail) for piece in torch.chunk(per_group, mp_size, dim=1)]


class ExpertSlices(GroupSlices):
    """Experts stacked as (E*h, dim) rows, each expert's h rows cut evenly across ranks
    (the original's mixtral_sparse): rank ``r`` holds ``W.view(E, h, dim)[:, r*h/mp:(r+1)*h/mp]``.

    At runtime each rank runs every expert on its h/mp hidden units; w2 brings them back to the
    model width, so the mixture's (the parameters' module's) output is summed over ranks.
    """

    def __init__(self, num_experts: Optional[int] = None):
        super().__init__(num_experts)

    @property
    def num_experts(self) -> Optional[int]:
        return self.groups

    @property
    def runtime_dim(self) -> Optional[int]:
        return None  # raw Parameters of the mixture, not a Linear: reduce_at says what to sum

    def reduce_at(self, name: str) -> Optional[str]:
        return name.rsplit(".", 1)[0] if "." in name else ""


class Relayout(Partition):
    """Shards stored cut one way (``stored``: the original's layout, used to merge and split
    checkpoints), while a running rank holds a piece cut another way (``runtime``).

    internlm needs it: the original's fairscale cuts of its ``Wqkv`` (contiguous rows, mixing q, k
    and v), ``mlp.w2`` (by input columns, of an unsplit input) and ``mlp.w3`` (by output rows) give
    pieces that cannot compute locally; the runtime cuts are per-head blocks of q, k and v, w2 by
    rows and w3 by columns (llama's w1/w3 and w2 roles).
    """

    def __init__(self, stored: "Rule", runtime: "Rule"):
        self.stored, self.runtime = stored, runtime

    @property
    def shard_dim(self) -> Optional[int]:
        return self.stored.shard_dim if isinstance(self.stored, Partition) else self.stored

    @property
    def runtime_dim(self) -> Optional[int]:
        return self.runtime.runtime_dim if isinstance(self.runtime, Partition) else self.runtime

    def merge(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        return merge_by(self.stored, name, shards)

    def split(self, name: str, tensor: torch.Tensor, mp_size: int) -> List[Optional[torch.Tensor]]:
        return split_by(self.stored, name, tensor, mp_size)

    def holds(self, name: str, rank: int, size: int) -> bool:
        return self.runtime.holds(name, rank, size) if isinstance(self.runtime, Partition) else True

    def local_split(self, name: str, tensor: torch.Tensor, size: int) -> List[Optional[torch.Tensor]]:
        if isinstance(self.runtime, Partition):
            return self.runtime.local_split(name, tensor, size)
        return split_by(self.runtime, name, tensor, size)

    def reduce_at(self, name: str) -> Optional[str]:
        return self.runtime.reduce_at(name) if isinstance(self.runtime, Partition) else None


Rule = Union[Optional[int], Partition]

#: Module attributes holding a head count that each running rank holds ``1/size`` of.
HEAD_COUNTS = ("n_heads", "n_kv_heads")


def merge_by(rule: Rule, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Join the per-rank pieces of ``name``, cut by ``rule``, into the full tensor."""
    if isinstance(rule, Partition):
        return rule.merge(name, shards)
    if len(shards) == 1:
        return shards[0]
    if rule is None or shards[0].dim() <= rule:
        if any(s.shape != shards[0].shape or not torch.equal(s, shards[0]) for s in shards[1:]):
            warnings.warn(f"{name} is replicated across model-parallel ranks but the shards differ; "
                          f"using rank 0's copy", stacklevel=3)
        return shards[0]
    return torch.cat(list(shards), dim=rule)


def split_by(rule: Rule, name: str, tensor: torch.Tensor, mp_size: int) -> List[Optional[torch.Tensor]]:
    """The piece of ``name``, cut by ``rule``, each of ``mp_size`` ranks holds (None: none)."""
    if isinstance(rule, Partition):
        return rule.split(name, tensor, mp_size)
    if rule is None or mp_size == 1 or tensor.dim() <= rule:
        return [tensor] * mp_size
    if tensor.shape[rule] % mp_size:
        raise ValueError(f"{name} {tuple(tensor.shape)}: dim {rule} does not split into {mp_size} equal pieces")
    return list(torch.chunk(tensor, mp_size, dim=rule))


class SplitPlan:
    """An ordered list of (regex, dim or :class:`Partition`) rules matched against parameter names
    (first match wins).

    ``gather``: regexes naming the modules whose column-split (dim 0) output must be whole at
    runtime (the output head: its vocab slices are all-gathered); other column-split outputs stay
    local and feed a row-split module (see :mod:`accessory.model.layers.tensor_parallel`).
    ``head_counts``: the module attributes (head counts) a running rank divides by the group size,
    because the projections producing those heads are cut (falcon's multi-query plan leaves
    ``n_kv_heads`` out: its one key/value head is replicated).
    """

    def __init__(self, rules: Sequence[Tuple[str, Rule]], gather: Sequence[str] = (),
                 head_counts: Sequence[str] = HEAD_COUNTS):
        self.rules: List[Tuple[re.Pattern, Rule]] = [(re.compile(p), d) for p, d in rules]
        self.gather: List[re.Pattern] = [re.compile(p) for p in gather]
        self.head_counts: Tuple[str, ...] = tuple(head_counts)

    def extended(self, rules: Sequence[Tuple[str, Rule]], gather: Sequence[str] = ()) -> "SplitPlan":
        """This plan with more rules (and gathered modules) after its own."""
        plan = SplitPlan([], [], self.head_counts)
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
        """The dim each stored shard holds a piece of ``name`` along, or None when every shard holds
        it whole (replicated) or only one shard does (:class:`WholeExperts`)."""
        rule = self.rule(name)
        return rule.shard_dim if isinstance(rule, Partition) else rule

    def merge(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Join the per-rank pieces of ``name`` into the full tensor."""
        return merge_by(self.rule(name), name, shards)

    def split(self, name: str, tensor: torch.Tensor, mp_size: int) -> List[Optional[torch.Tensor]]:
        """The piece of ``name`` each of ``mp_size`` ranks holds (None: that rank holds none)."""
        return split_by(self.rule(name), name, tensor, mp_size)

    # ---- runtime tensor parallelism: what a running rank holds (layers/tensor_parallel.py)
    def runtime_dim(self, name: str) -> Optional[int]:
        """The dim a running rank's piece of ``name`` is cut along (None: whole, or a cut that
        :meth:`reduce_at` handles)."""
        rule = self.rule(name)
        return rule.runtime_dim if isinstance(rule, Partition) else rule

    def reduce_at(self, name: str) -> Optional[str]:
        """The module whose output must be all-reduced because of how ``name`` is cut, or None
        (Linear / Embedding cuts are read off :meth:`runtime_dim` instead)."""
        rule = self.rule(name)
        return rule.reduce_at(name) if isinstance(rule, Partition) else None

    def holds(self, name: str, rank: int, size: int) -> bool:
        """Whether running rank ``rank`` of ``size`` holds any of ``name``."""
        rule = self.rule(name)
        return rule.holds(name, rank, size) if isinstance(rule, Partition) else True

    def local_shape(self, name: str, shape: Sequence[int], rank: int, size: int) -> Optional[Tuple[int, ...]]:
        """The shape of rank ``rank``'s runtime piece of a tensor of full ``shape`` (None: it holds
        none). ValueError when the cut does not divide."""
        rule = self.rule(name)
        if isinstance(rule, Partition):
            return rule.local_shape(name, shape, rank, size)
        if rule is None or len(shape) <= rule or size == 1:
            return tuple(shape)
        if shape[rule] % size:
            raise ValueError(f"{name} {tuple(shape)}: dim {rule} does not split into {size} equal pieces; "
                             f"use a model-parallel size dividing {shape[rule]}")
        return tuple(shape[:rule]) + (shape[rule] // size,) + tuple(shape[rule + 1:])

    def local_piece(self, name: str, pieces: Sequence[torch.Tensor], rank: int, size: int) -> Optional[torch.Tensor]:
        """Running rank ``rank`` of ``size``'s piece of ``name`` from a checkpoint's ``pieces``
        (one per stored shard that has it): the stored piece itself when the checkpoint is cut
        the same way, else merged and re-cut."""
        rule = self.rule(name)
        if isinstance(rule, Partition):
            return rule.local_piece(name, pieces, rank, size)
        if rule is not None and len(pieces) == size and size > 1:
            return pieces[rank]
        return self.split(name, self.merge(name, pieces), size)[rank]
