"""Mixtral with stacked expert weights (``llama_type = "mixtral_sparse"``).

The same model as :mod:`mixtral`, stored the way the original's MegaBlocks kernel wants it: each
layer's experts are three plain Parameters ``feed_forward.{w1,w2,w3}`` of shape (E*h, dim), rows
``e*h:(e+1)*h`` belonging to expert ``e``. w1 and w3 are applied as ``x @ W_e.T`` but w2 as
``y @ W2_e``, so ``W2_e`` is the TRANSPOSE of mixtral's ``experts.e.w2.weight``. The router is
``feed_forward.gate.weight`` (E, dim); its softmax runs in float32 and the renormalised weights
are cast to the activations' dtype.

The original needs MegaBlocks on CUDA (and a per-rank h that is a multiple of 128); here each
selected expert runs as dense matmuls on its own tokens (:func:`accessory.model.layers.moe.dispatch`),
on any device and for any h. At model-parallel size ``mp`` every rank holds ``h/mp`` rows of every
expert (and, running tensor-parallel, computes every routed expert on them: the layer's output is
summed over ranks); merging shards needs the expert count, which the built model's ``split_plan``
carries.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.moe import dispatch, load_balancing_loss, route_top_k
from ..layers.parallel import COLUMN, ROW, ExpertSlices, SplitPlan
from . import mixtral
from .llama import LinearFactory, plain_linear
from .mixtral import ModelArgs  # the original's fields and defaults are mixtral's

__all__ = ["ModelArgs", "SparseMoE", "Transformer"]


def split_plan_for(num_experts: Optional[int] = None) -> SplitPlan:
    """llama's attention, embedding and output cuts; every expert sliced across ranks."""
    return SplitPlan([
        (r"(^|\.)tok_embeddings\.weight$", ROW),
        (r"\.attention\.(wq|wk|wv)\.weight$", COLUMN),
        (r"\.attention\.wo\.weight$", ROW),
        (r"\.feed_forward\.(w1|w2|w3)$", ExpertSlices(num_experts)),
        (r"(^|\.)output\.weight$", COLUMN),
    ], gather=[r"(^|\.)output$"])


class SparseMoE(nn.Module):
    """Router ``gate`` and stacked experts ``w1``, ``w2``, ``w3`` (E*h, dim)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, num_experts_per_tok: int):
        super().__init__()
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.hidden_dim = hidden_dim
        self.w1 = nn.Parameter(torch.empty(num_experts * hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts * hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts * hidden_dim, dim))
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.load_balancing_loss: Optional[torch.Tensor] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original's init of the stacked weights (kaiming uniform, a = sqrt(5))."""
        for weight in (self.w1, self.w2, self.w3):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def _run_expert(self, expert_id: int, x: torch.Tensor) -> torch.Tensor:
        # Each expert's rows: hidden_dim, or hidden_dim / mp on a model-parallel rank (ExpertSlices).
        per_expert = self.w1.shape[0] // self.num_experts
        rows = slice(expert_id * per_expert, (expert_id + 1) * per_expert)
        hidden = F.silu(F.linear(x, self.w1[rows])) * F.linear(x, self.w3[rows])
        return hidden @ self.w2[rows]  # w2 is stored (h, dim): no transpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, expert_ids, probs = route_top_k(self.gate(tokens), self.num_experts_per_tok,
                                                 softmax_dtype=torch.float32)
        if self.training:
            self.load_balancing_loss = load_balancing_loss(probs, expert_ids, self.num_experts)
        out = dispatch(tokens, expert_ids, weights.to(tokens.dtype), self._run_expert, self.num_experts)
        return out.view_as(x)


class TransformerBlock(mixtral.TransformerBlock):
    def build_feed_forward(self, args: ModelArgs, linear: LinearFactory) -> nn.Module:
        num_experts, top_k = mixtral.moe_sizes(args)
        return SparseMoE(args.dim, args.hidden_dim, num_experts, top_k)


class Transformer(mixtral.Transformer):
    """mixtral's decoder with :class:`SparseMoE` feed-forwards."""

    block_cls = TransformerBlock
    split_plan = split_plan_for()  # cannot merge expert slices without E: use the built model's plan

    def __init__(self, args: ModelArgs, with_visual: bool = False):
        super().__init__(args, with_visual, linear=plain_linear)

    @classmethod
    def plan_for(cls, num_experts: int) -> SplitPlan:
        return split_plan_for(num_experts)
