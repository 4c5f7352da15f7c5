"""InternLM (first generation, 7B) as the original ports it (``llama_type = "internlm"``).

Pre-norm decoder blocks like llama's, with four differences that stay visible here:

* q, k and v come from ONE fused projection ``mixer.Wqkv`` (with bias) whose output is laid out
  ``(three, heads, head_dim)``: all of q, then all of k, then all of v; ``out_proj`` has a bias too;
* rotary embeddings pair ``x[i]`` with ``x[i + hd/2]`` (NeoX / HF ``rotate_half``), not Meta's
  interleaved pairs;
* the feed-forward is ``w3(silu(w1 x) * w2 x)``: ``w2`` is the second UP projection and ``w3`` the
  DOWN projection (llama uses w2 for down), none with a bias;
* the norms are RMSNorm with eps ``layer_norm_epsilon`` (``norm_eps`` is accepted but unused, as in
  the original), or LayerNorm (weight and bias) when ``norm_type`` is not ``"rmsnorm"``.

Block: ``r = x + mixer(norm1 x); out = r + mlp(norm2 r)``; then ``norm`` and the untied ``head``.
Dropout (``drop_rate``) is a training-time option of the original and is not applied here.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.attention import attend
from ..layers.decoder import CausalDecoder
from ..layers.kv_cache import KVCache
from ..layers.norm import RMSNorm
from ..layers.panel_linear import head_logits
from ..layers.parallel import COLUMN, ROW, GroupSlices, Relayout, SplitPlan
from ..layers.rotary import RotaryEmbedding


@dataclass
class ModelArgs:
    """The original's config fields, in its order and with its defaults (InternLM-7B sizes)."""
    num_layers: int = 32
    hidden_size: int = 4096
    num_attention_heads: int = 32
    mlp_ratio: float = 8 / 3  # the original annotates it `int` but defaults to 8/3
    drop_rate: float = 0.0  # training-time dropout; unused at inference
    layer_norm_epsilon: float = 1e-5  # the eps every norm uses
    norm_type: str = "rmsnorm"  # anything else selects LayerNorm (with bias)
    norm_eps: float = 1e-5  # unused by the original too
    use_scaled_init: bool = True  # initialisation only
    use_swiglu: bool = True  # initialisation only: the MLP is SwiGLU either way
    vocab_size: int = -1  # set from the tokenizer
    multiple_of: int = 256  # FFN width is rounded up to a multiple of this
    rope_theta: float = 10000

    max_batch_size: int = 32
    max_seq_len: int = 2048

    rope_scaling: Optional[float] = None  # multiplies the rotary positions, as in llama


def ffn_hidden_dim(hidden_size: int, mlp_ratio: float, multiple_of: int) -> int:
    """The SwiGLU width: ``int(hidden_size * mlp_ratio)`` rounded up to a multiple of ``multiple_of``."""
    hidden = int(hidden_size * mlp_ratio)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def make_norm(args: ModelArgs) -> nn.Module:
    """RMSNorm, or LayerNorm (weight and bias) when ``norm_type != "rmsnorm"``; eps = layer_norm_epsilon."""
    if args.norm_type == "rmsnorm":
        return RMSNorm(args.hidden_size, eps=args.layer_norm_epsilon)
    return nn.LayerNorm(args.hidden_size, eps=args.layer_norm_epsilon)


class MHA(nn.Module):
    """Multi-head attention with a fused, biased qkv projection (no grouped KV heads)."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.num_attention_heads
        self.head_dim = args.hidden_size // args.num_attention_heads
        self.Wqkv = nn.Linear(args.hidden_size, 3 * args.hidden_size, bias=True)
        self.out_proj = nn.Linear(args.hidden_size, args.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: Optional[KVCache], causal_from_zero: bool) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        qkv = self.Wqkv(x).view(bsz, seqlen, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)
        q, k = rotary(q, positions), rotary(k, positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, positions, k, v)
        out = attend(q, k, v, None if causal_from_zero else positions)
        return self.out_proj(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """``w3(silu(w1 x) * w2 x)``: w1 and w2 go up to the FFN width, w3 comes back down."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class PackedFlashBaseLayer1D(nn.Module):
    """One decoder block (the original's class name): ``r = x + mixer(norm1 x); r + mlp(norm2 r)``."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.mixer = MHA(args, layer_id)
        self.norm1 = make_norm(args)
        self.norm2 = make_norm(args)
        self.mlp = FeedForward(args.hidden_size, ffn_hidden_dim(args.hidden_size, args.mlp_ratio, args.multiple_of))

    def forward(self, x, positions, rotary, kv_cache, causal_from_zero):
        residual = x + self.mixer(self.norm1(x), positions, rotary, kv_cache, causal_from_zero)
        return residual + self.mlp(self.norm2(residual))


class Transformer(CausalDecoder):
    """The decoder. ``forward_tokens`` is the one entry point the engine uses."""

    # The original's fairscale layers, and so the pieces its model-parallel shards hold:
    # * Wqkv is ColumnParallelLinear(D, 3D): weight and bias cut CONTIGUOUSLY along dim 0, so rank 0
    #   of 2 holds all of q and the first half of k -- not per-rank [q_r, k_r, v_r] blocks. Joining
    #   the pieces back along dim 0 restores the full (three, heads, hd) tensor exactly, which is all
    #   merging needs; running on those pieces (as the original would at mp>1) is wrong math.
    # * mlp.w2 is RowParallelLinear(D, F): weight (F, D) cut along dim 1 (its D input), though it is
    #   fed the full, unsplit x. That is why the original cannot run internlm at mp>1 (a shape
    #   error); such shards only arise from loading a 1-shard checkpoint at mp=2 and saving it.
    # * mlp.w3 is ColumnParallelLinear(F, D): weight (D, F) cut along dim 0.
    # Checkpoints keep those cuts (merging and resharding); running tensor-parallel, each rank
    # instead holds whole heads of q, k and v (GroupSlices(3)), w2 cut like w1 (rows) and w3 by
    # its F input columns (its output all-reduced): the Relayout rules.
    split_plan = SplitPlan([
        (r"(^|\.)embedding\.weight$", ROW),  # ParallelEmbedding splits the embedding dim
        (r"\.mixer\.Wqkv\.(weight|bias)$", Relayout(COLUMN, GroupSlices(3))),
        (r"\.mixer\.out_proj\.weight$", ROW),  # its bias is replicated
        (r"\.mlp\.w1\.weight$", COLUMN),
        (r"\.mlp\.w2\.weight$", Relayout(ROW, COLUMN)),
        (r"\.mlp\.w3\.weight$", Relayout(COLUMN, ROW)),
        (r"(^|\.)head\.weight$", COLUMN),
    ], gather=[r"(^|\.)head$"])

    def __init__(self, args: ModelArgs, with_visual: bool = False):
        super().__init__()
        if with_visual:
            raise NotImplementedError("internlm has no visual variant (the original raises too); "
                                      "load it with with_visual=False")
        if args.hidden_size % args.num_attention_heads:
            raise ValueError(f"internlm hidden_size {args.hidden_size} is not divisible by "
                             f"num_attention_heads {args.num_attention_heads}")
        self.args = args
        self.params = args
        self.vocab_size = args.vocab_size
        self.n_layers = args.num_layers
        self.head_dim = args.hidden_size // args.num_attention_heads
        self.n_kv_heads = args.num_attention_heads  # every head has its own keys and values
        self.embedding = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(PackedFlashBaseLayer1D(i, args) for i in range(args.num_layers))
        self.norm = make_norm(args)
        self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # The original's table spans 2 * max_seq_len positions.
        self.rotary = RotaryEmbedding(self.head_dim, args.max_seq_len * 2, theta=args.rope_theta,
                                      scaling=args.rope_scaling, style="half")
        self._inference_cache: Optional[KVCache] = None

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return head_logits(self.head, self.norm(h))

    def _reference_weight(self) -> torch.Tensor:
        return self.embedding.weight
