"""Falcon as the original ports it (``llama_type = "falcon"``; 7B, 40B and 180B shapes).

What sets it apart from llama, all visible below:

* LayerNorm (weight and bias) everywhere, eps ``layer_norm_epsilon``; ``bias`` puts a bias on EVERY
  linear of the blocks (the output head never has one);
* separate q/k/v projections ``wq wk wv`` (HF fuses them into ``query_key_value``) and ``dense``;
* the key/value heads, as the original builds them:

  * ``multi_query=True``: ONE key/value head, ``wk``/``wv`` of shape (head_dim, D), replicated on
    every model-parallel rank -- even when ``new_decoder_architecture`` is set and
    ``num_kv_heads`` names more (the original builds the grouped projections and then replaces
    them; its own 180B config says num_kv_heads=8, multi_query=true and so runs with one kv head);
  * ``multi_query=False``: as many key/value heads as query heads (``num_kv_heads`` is unused);

* rotate-half rotary embeddings (pairs ``x[i]``, ``x[i + hd/2]``), and an MLP
  ``dense_4h_to_h(gelu(dense_h_to_4h x))`` with the exact (erf) GELU and width 4·D;
* three ways to combine a layer's output:

  * ``new_decoder_architecture``: ``x + attn(ln_attn x) + mlp(ln_mlp x)`` (``parallel_attn`` unused);
  * ``parallel_attn``: ``x + attn(ln x) + mlp(ln x)`` with one ``input_layernorm``;
  * otherwise sequential: ``r = x + attn(ln x); r + mlp(post_attention_layernorm r)``.

Then ``ln_f`` and the untied ``output``. The dropout fields are training-time options and are
not applied here.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.attention import attend
from ..layers.decoder import CausalDecoder
from ..layers.kv_cache import KVCache
from ..layers.panel_linear import head_logits
from ..layers.parallel import COLUMN, REPLICATED, ROW, SplitPlan
from ..layers.rotary import RotaryEmbedding


@dataclass
class ModelArgs:
    """The original's config fields, in its order and with its defaults (Falcon-180B sizes)."""
    num_layers: int = 80
    hidden_size: int = 14848
    num_attention_heads: int = 232

    attention_dropout: float = 0.0  # training-time dropout; unused at inference
    hidden_dropout: float = 0.0  # training-time dropout; unused at inference
    bias: bool = False  # a bias on every linear of the blocks
    multi_query: bool = True  # one key/value head (wins over num_kv_heads)
    new_decoder_architecture: bool = True  # ln_attn + ln_mlp, parallel attention and MLP
    parallel_attn: bool = True  # old architecture only: attention and MLP side by side
    initializer_range = 0.02  # not a field (no annotation): not in config.json, rejected if given
    num_kv_heads: Optional[int] = None  # read by the original only to check divisibility by mp
    layer_norm_epsilon: float = 1e-5
    vocab_size: int = -1  # set from the tokenizer
    rope_theta: float = 10000

    max_batch_size: int = 32
    max_seq_len: int = 2048

    rope_scaling: Optional[float] = None  # multiplies the rotary positions, as in llama


def kv_heads(args: ModelArgs) -> int:
    """Key/value heads as the original builds them: 1 when multi_query, else one per query head."""
    return 1 if args.multi_query else args.num_attention_heads


class FalconAttention(nn.Module):
    """Attention with ``n_kv_heads`` = 1 (multi-query) or = heads; biases when ``args.bias``."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.num_attention_heads
        self.head_dim = args.hidden_size // args.num_attention_heads
        self.n_kv_heads = kv_heads(args)
        dim, kv_dim = args.hidden_size, self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(dim, dim, bias=args.bias)
        self.wk = nn.Linear(dim, kv_dim, bias=args.bias)
        self.wv = nn.Linear(dim, kv_dim, bias=args.bias)
        self.dense = nn.Linear(dim, dim, bias=args.bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: Optional[KVCache], causal_from_zero: bool) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = rotary(q, positions), rotary(k, positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, positions, k, v)
        out = attend(q, k, v, None if causal_from_zero else positions)
        return self.dense(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FalconMLP(nn.Module):
    """``dense_4h_to_h(gelu(dense_h_to_4h x))``, exact GELU."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(args.hidden_size, 4 * args.hidden_size, bias=args.bias)
        self.dense_4h_to_h = nn.Linear(4 * args.hidden_size, args.hidden_size, bias=args.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    """One block; which norms exist and how the residual is formed depend on the architecture flags."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.new_decoder_architecture = args.new_decoder_architecture
        self.parallel_attn = args.parallel_attn
        self.self_attention = FalconAttention(args, layer_id)
        self.mlp = FalconMLP(args)
        dim, eps = args.hidden_size, args.layer_norm_epsilon
        if args.new_decoder_architecture:
            self.ln_attn = nn.LayerNorm(dim, eps=eps)
            self.ln_mlp = nn.LayerNorm(dim, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(dim, eps=eps)
            if not args.parallel_attn:
                self.post_attention_layernorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, positions, rotary, kv_cache, causal_from_zero):
        def attention(normed):
            return self.self_attention(normed, positions, rotary, kv_cache, causal_from_zero)

        if self.new_decoder_architecture:
            return x + attention(self.ln_attn(x)) + self.mlp(self.ln_mlp(x))
        normed = self.input_layernorm(x)
        if self.parallel_attn:
            return x + attention(normed) + self.mlp(normed)
        residual = x + attention(normed)
        return residual + self.mlp(self.post_attention_layernorm(residual))


class FalconSplitPlan(SplitPlan):
    """The original's split rules; ``wk``/``wv`` depend on ``multi_query``.

    ``wk``/``wv`` are ColumnParallelLinear pieces (cut along dim 0) when ``multi_query=False`` and
    replicated ``nn.Linear`` copies when ``multi_query=True``. A built model carries the exact plan
    for its config (``multi_query`` given). The class-level plan (``multi_query=None``), which is
    what MetaModel reads before any config is known, lets the shards decide: a weight piece of
    ``in_features / mp`` rows is a column piece, any other row count a replica; when the two
    coincide (one head per rank) or for a bias, identical pieces are replicas, differing ones
    column pieces.
    """

    def __init__(self, multi_query: Optional[bool] = None):
        kv_dim = REPLICATED if multi_query else COLUMN
        super().__init__([
            (r"(^|\.)word_embeddings\.weight$", ROW),  # ParallelEmbedding splits the embedding dim
            (r"\.self_attention\.wq\.(weight|bias)$", COLUMN),
            (r"\.self_attention\.(wk|wv)\.(weight|bias)$", kv_dim),
            (r"\.self_attention\.dense\.weight$", ROW),  # its bias is replicated
            (r"\.mlp\.dense_h_to_4h\.(weight|bias)$", COLUMN),
            (r"\.mlp\.dense_4h_to_h\.weight$", ROW),  # its bias is replicated
            (r"(^|\.)output\.weight$", COLUMN),
        ], gather=[r"(^|\.)output$"],
            # multi-query: each rank's query heads share the ONE replicated key/value head
            head_counts=("n_heads",) if multi_query else ("n_heads", "n_kv_heads"))
        self.multi_query = multi_query
        self._kv_pattern = self.rules[2][0]

    def merge(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        if (self.multi_query is None and len(shards) > 1 and self._kv_pattern.search(name)
                and _are_replicas(shards)):
            return shards[0]
        return super().merge(name, shards)


def _are_replicas(shards: Sequence[torch.Tensor]) -> bool:
    """Whether the model-parallel pieces of a wk/wv tensor are copies of one multi-query projection."""
    first = shards[0]
    if any(s.shape != first.shape for s in shards):
        return False
    if first.dim() == 2 and first.shape[0] * len(shards) != first.shape[1]:
        return True  # a column piece of a (D, D) projection has exactly D / mp rows
    return all(torch.equal(s, first) for s in shards[1:])


class Transformer(CausalDecoder):
    """The decoder. ``forward_tokens`` is the one entry point the engine uses."""

    split_plan = FalconSplitPlan()  # config-free; each instance gets the exact one below

    def __init__(self, args: ModelArgs, with_visual: bool = False):
        super().__init__()
        if with_visual:
            raise NotImplementedError("falcon has no visual variant (the original raises too); "
                                      "load it with with_visual=False")
        if args.hidden_size % args.num_attention_heads:
            raise ValueError(f"falcon hidden_size {args.hidden_size} is not divisible by "
                             f"num_attention_heads {args.num_attention_heads}")
        self.args = args
        self.params = args
        self.vocab_size = args.vocab_size
        self.n_layers = args.num_layers
        self.head_dim = args.hidden_size // args.num_attention_heads
        self.n_kv_heads = kv_heads(args)
        self.split_plan = FalconSplitPlan(args.multi_query)
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(FalconDecoderLayer(i, args) for i in range(args.num_layers))
        self.ln_f = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_epsilon)
        self.output = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # The original's table spans 2 * max_seq_len positions.
        self.rotary = RotaryEmbedding(self.head_dim, args.max_seq_len * 2, theta=args.rope_theta,
                                      scaling=args.rope_scaling, style="half")
        self._inference_cache: Optional[KVCache] = None

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(tokens)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return head_logits(self.output, self.ln_f(h))

    def _reference_weight(self) -> torch.Tensor:
        return self.word_embeddings.weight
