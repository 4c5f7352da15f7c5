"""Model-parallel split declarations: which parameter is cut along which dim across ranks.

An architecture declares one ``SplitPlan``; checkpoint merging (many shards -> one model) reads it
today, and runtime tensor parallelism and resharding read the same declaration.

Dims follow the original's fairscale layers: column-parallel linears split their output rows
(dim 0), row-parallel linears their input columns (dim 1), ``ParallelEmbedding`` its embedding dim
(dim 1); everything else is replicated (``None``).
"""

import re
from typing import List, Optional, Sequence, Tuple

import torch

COLUMN = 0
ROW = 1
REPLICATED = None


class SplitPlan:
    """An ordered list of (regex, dim) rules matched against parameter names (first match wins)."""

    def __init__(self, rules: Sequence[Tuple[str, Optional[int]]]):
        self.rules: List[Tuple[re.Pattern, Optional[int]]] = [(re.compile(p), d) for p, d in rules]

    def shard_dim(self, name: str) -> Optional[int]:
        """The dim ``name`` is split along, or None when it is replicated on every rank."""
        for pattern, dim in self.rules:
            if pattern.search(name):
                return dim
        return REPLICATED

    def merge(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Join the per-rank pieces of ``name`` into the full tensor."""
        if len(shards) == 1:
            return shards[0]
        dim = self.shard_dim(name)
        if dim is None or shards[0].dim() <= dim:
            return shards[0]
        return torch.cat(list(shards), dim=dim)

