"""Mistral AI's Mixtral sparse mixture-of-experts decoder (``llama_type = "mixtral"``).

llama's blocks with the feed-forward replaced by a mixture of experts: a router ``gate`` (E, dim)
scores each token, the top ``num_experts_per_tok`` experts (softmax, top-k, weights renormalised
to sum to 1) each run their SwiGLU ``w2(silu(w1 x) * w3 x)``, and the outputs are summed with
those weights. Attention, norms and rotary are llama's (interleaved RoPE, ``rope_theta`` 1e6 by
default); the ``head_dim`` field is accepted but ignored (``head_dim = dim // n_heads``), as in the
original.

Checkpoint names are the original's: ``layers.N.feed_forward.gate.weight`` and
``layers.N.feed_forward.experts.{e}.{w1,w2,w3}.weight``. At model-parallel size ``mp`` rank ``r``
holds whole experts ``r*E/mp .. (r+1)*E/mp - 1``, keyed by their global index.

Training mode adds the Switch load-balancing loss to ``forward``'s second result, weighted once
by ``load_balancing_weight`` (the original mixtral folds the weight in a second time).
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ...errors import ConfigError
from ..layers import multimodal
from ..layers.moe import dispatch, load_balancing_loss, route_top_k
from ..layers.norm import RMSNorm
from ..layers.parallel import COLUMN, ROW, SplitPlan, WholeExperts
from . import llama
from .llama import Attention, FeedForward, LinearFactory, plain_linear


@dataclass
class ModelArgs:
    """The original's config fields and defaults (config.json is ``asdict`` of this)."""
    dim: int = 4096
    hidden_dim: int = 16384  # each expert's SwiGLU width (Mixtral-8x7B's config sets 14336)
    head_dim: int = 128  # ignored: the head width is dim // n_heads, as in the original
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # set from the tokenizer
    norm_eps: float = 1e-5
    rope_theta: float = 1000000

    max_batch_size: int = 32
    max_seq_len: int = 2048

    moe: Dict[str, int] = field(default_factory=lambda: {
        "num_experts_per_tok": 2,
        "num_experts": 8,
    })
    load_balancing_weight: float = 0.1

    rope_scaling: Optional[float] = None

    # Not the original's: CLIPConfig overrides for with_visual=True (see llama.ModelArgs).
    clip_config: Optional[Dict[str, Any]] = None


def moe_sizes(args) -> Tuple[int, int]:
    """``(num_experts, num_experts_per_tok)`` from ``args.moe``, checked."""
    moe = args.moe or {}
    missing = [k for k in ("num_experts", "num_experts_per_tok") if k not in moe]
    if missing:
        raise ConfigError(f"the config's \"moe\" entry {moe!r} lacks {missing}; it must give both, "
                          f"e.g. {{\"num_experts\": 8, \"num_experts_per_tok\": 2}}")
    num_experts, top_k = int(moe["num_experts"]), int(moe["num_experts_per_tok"])
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"moe.num_experts_per_tok is {top_k}; it must be between 1 and "
                          f"moe.num_experts ({num_experts})")
    return num_experts, top_k


def split_plan_for(num_experts: Optional[int] = None, extra_rules=()) -> SplitPlan:
    """mixtral's model-parallel cuts: llama's attention, embedding and output rules, whole experts
    per rank (``num_experts`` is needed only to split), the router replicated.
    ``extra_rules`` go first (mixtral_peft's bias / LoRA cuts)."""
    return SplitPlan(list(extra_rules) + [
        (r"(^|\.)tok_embeddings\.weight$", ROW),  # ParallelEmbedding splits the embedding dim
        (r"\.attention\.(wq|wk|wv)\.weight$", COLUMN),
        (r"\.attention\.wo\.weight$", ROW),
        (r"\.feed_forward\.experts\.\d+\.", WholeExperts(num_experts)),
        (r"(^|\.)output\.weight$", COLUMN),
    ], gather=[r"(^|\.)output$"])


class MoE(nn.Module):
    """The original's ``MoE``: router ``gate`` and experts ``experts.{e}`` (llama's SwiGLU)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, num_experts_per_tok: int,
                 linear: LinearFactory = plain_linear):
        super().__init__()
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.experts = nn.ModuleDict({str(e): FeedForward(dim, hidden_dim, linear) for e in range(num_experts)})
        self.gate = nn.Linear(dim, num_experts, bias=False)  # never biased nor LoRA'd, even in mixtral_peft
        self.load_balancing_loss: Optional[torch.Tensor] = None  # set by each training-mode forward

    def _run_expert(self, expert_id: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[str(expert_id)](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        # Softmax in the activations' dtype, as the original mixtral does.
        weights, expert_ids, probs = route_top_k(self.gate(tokens), self.num_experts_per_tok)
        if self.training:
            self.load_balancing_loss = load_balancing_loss(probs, expert_ids, self.num_experts)
        local = None if len(self.experts) == self.num_experts else [int(e) for e in self.experts]
        out = dispatch(tokens, expert_ids, weights.to(tokens.dtype), self._run_expert, self.num_experts, local)
        return out.view_as(x)


class TransformerBlock(nn.Module):
    """llama's pre-norm block with :class:`MoE` as its feed-forward."""

    def __init__(self, layer_id: int, args: ModelArgs, linear: LinearFactory = plain_linear):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, linear)
        self.feed_forward = self.build_feed_forward(args, linear)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def build_feed_forward(self, args: ModelArgs, linear: LinearFactory) -> nn.Module:
        num_experts, top_k = moe_sizes(args)
        return MoE(args.dim, args.hidden_dim, num_experts, top_k, linear)

    def forward(self, x, positions, rotary, kv_cache, causal_from_zero):
        h = x + self.attention(self.attention_norm(x), positions, rotary, kv_cache, self.layer_id, causal_from_zero)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(llama.Transformer):
    """llama's decoder (embedding, cache, ``forward_tokens``) built from MoE blocks.

    The original's ``forward`` returns ``(logits, additional_losses)``; ``forward_tokens`` and
    ``forward_inference`` return logits only.
    """

    block_cls = TransformerBlock
    split_plan = split_plan_for()  # merges; the built model's own plan also knows E, to split

    def __init__(self, args: ModelArgs, with_visual: bool = False, linear: LinearFactory = plain_linear):
        num_experts, _ = moe_sizes(args)
        super().__init__(args, with_visual, linear=linear)
        self.split_plan = self.plan_for(num_experts)

    @classmethod
    def plan_for(cls, num_experts: int) -> SplitPlan:
        """This architecture's split plan for ``num_experts`` experts."""
        return split_plan_for(num_experts)

    def forward(self, examples: torch.Tensor, image=None):
        """``(logits, additional_losses)`` for every position of ``examples`` (batch, seq), no cache.

        ``additional_losses`` is ``{}`` in eval mode; in training mode
        ``{"load_balancing": (mean loss over layers, load_balancing_weight)}``.
        """
        self._refuse_image(image)
        for layer in self.layers:
            layer.feed_forward.load_balancing_loss = None
        logits = (self.forward_tokens(examples) if image is None
                  else multimodal.forward_with_images(self, examples, image))
        additional = {}
        if self.training:
            losses = [layer.feed_forward.load_balancing_loss for layer in self.layers]
            losses = [loss for loss in losses if loss is not None]
            additional["load_balancing"] = (sum(losses) / max(len(losses), 1), self.args.load_balancing_weight)
        return logits, additional

    def get_trainable_params(self):
        """Everything but the CLIP (with_visual), as the original."""
        return {name: param for name, param in self.named_parameters() if not name.startswith("clip.")}
