"""Meta's LLaMA / LLaMA-2 / Code Llama architecture (``llama_type = "llama"``).

Pre-norm decoder blocks: RMSNorm -> attention (interleaved RoPE, grouped KV heads) -> residual,
RMSNorm -> SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)`` -> residual; final RMSNorm and an untied
output projection. Parameter names are the original's, so its checkpoints load as they are.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.attention import attend
from ..layers.compiled_decode import compiled_decode_layers
from ..layers.decoder import CausalDecoder
from ..layers.fast_decode import decode_layers, decode_logits, native_step_fits
from ..layers.kv_cache import KVCache
from ..layers.linear import fuse_children, make_linear, still_fused
from ..layers.norm import RMSNorm
from ..layers.panel_linear import head_logits
from ..layers.parallel import COLUMN, ROW, SplitPlan
from ..layers.rotary import RotaryEmbedding
from ._clip_prefix import CLIPPrefixMixin


@dataclass
class ModelArgs:
    """The original's config fields and defaults (config.json is ``asdict`` of this)."""
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # set from the tokenizer
    multiple_of: int = 256  # FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000

    max_batch_size: int = 32
    max_seq_len: int = 2048

    rope_scaling: Optional[float] = None

    # Not the original's: CLIPConfig fields overriding ViT-L/14 for with_visual=True (None = the
    # real sizes), so a config.json can describe a tiny multimodal model.
    clip_config: Optional[Dict[str, Any]] = None


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """The SwiGLU width: int(2 * 4 * dim / 3), times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# A factory (name, in_features, out_features) -> module for each of the seven linears, so that
# PEFT variants (biases, LoRA) reuse these blocks unchanged.
LinearFactory = Callable[[str, int, int], nn.Module]


def plain_linear(name: str, in_features: int, out_features: int) -> nn.Module:
    return make_linear(in_features, out_features)


class Attention(nn.Module):
    #: the children fuse() multiplies as one matrix (``panel_linear.use_panels`` packs them as one run)
    fused_children = ("wq", "wk", "wv")

    def __init__(self, args: ModelArgs, linear: LinearFactory = plain_linear):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = linear("wq", args.dim, self.n_heads * self.head_dim)
        self.wk = linear("wk", args.dim, self.n_kv_heads * self.head_dim)
        self.wv = linear("wv", args.dim, self.n_kv_heads * self.head_dim)
        self.wo = linear("wo", self.n_heads * self.head_dim, args.dim)
        self._wqkv = None  # set by fuse(): one (q+k+v rows, dim) matrix viewed by wq/wk/wv

    def fuse(self) -> None:
        """Compute q, k and v with one matrix product (see ``layers.linear.fuse_linears``)."""
        self._wqkv = fuse_children(self, self.fused_children)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: Optional[KVCache], layer_id: int, causal_from_zero: bool) -> torch.Tensor:
        _, out = self.attend_heads(x, positions, rotary, kv_cache, layer_id, causal_from_zero)
        return self.wo(out.transpose(1, 2).flatten(2))

    def attend_heads(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                     kv_cache: Optional[KVCache], layer_id: int,
                     causal_from_zero: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """The rotated queries and the per-head attention output, both (batch, heads, seq, head_dim),
        before ``wo`` (variants such as llama_adapter add their own terms in between)."""
        bsz, seqlen, _ = x.shape
        n_q, n_kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if still_fused(self._wqkv):
            qkv = self._wqkv(x)
            # q and k sit side by side in the fused output: one rotation for both heads' sets
            # (the same element-wise arithmetic, a third of the operations: a GPU step launches
            # every one of them)
            qk = rotary(qkv[..., :(n_q + n_kv) * hd].view(bsz, seqlen, n_q + n_kv, hd), positions)
            q, k = qk.split((n_q, n_kv), dim=2)
            v = qkv[..., (n_q + n_kv) * hd:].view(bsz, seqlen, n_kv, hd)
        else:
            q = rotary(self.wq(x).view(bsz, seqlen, n_q, hd), positions)
            k = rotary(self.wk(x).view(bsz, seqlen, n_kv, hd), positions)
            v = self.wv(x).view(bsz, seqlen, n_kv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_id, positions, k, v)
        return q, attend(q, k, v, None if causal_from_zero else positions)


class FeedForward(nn.Module):
    fused_children = ("w1", "w3")  # (see Attention)

    def __init__(self, dim: int, hidden_dim: int, linear: LinearFactory = plain_linear):
        super().__init__()
        self.w1 = linear("w1", dim, hidden_dim)
        self.w2 = linear("w2", hidden_dim, dim)
        self.w3 = linear("w3", dim, hidden_dim)
        self._w13 = None  # set by fuse(): w1 and w3 stacked, one matrix product for both

    def fuse(self) -> None:
        self._w13 = fuse_children(self, self.fused_children)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if still_fused(self._w13):
            gate, up = self._w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    attention_cls = Attention  # variants with extra attention terms (llama_adapter) subclass both

    def __init__(self, layer_id: int, args: ModelArgs, linear: LinearFactory = plain_linear):
        super().__init__()
        self.layer_id = layer_id
        self.attention = self.attention_cls(args, linear)
        self.feed_forward = FeedForward(args.dim, ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
                                        linear)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, positions, rotary, kv_cache, causal_from_zero, **attention_extra):
        """``attention_extra``: keyword arguments passed on to ``attention_cls`` (none for llama)."""
        h = x + self.attention(self.attention_norm(x), positions, rotary, kv_cache, self.layer_id, causal_from_zero,
                               **attention_extra)
        return h + self.feed_forward(self.ffn_norm(h))


#: the block classes whose decode steps the native CPU step and the compiled GPU step know (exactly
#: these types: a variant's subclass adds terms of its own)
PLAIN_BLOCK_TYPES = (Attention, FeedForward, TransformerBlock)


def _first_of_one(output_index: Optional[torch.Tensor]) -> bool:
    """Whether ``output_index`` is None or picks, in every row of a one-token step, that token."""
    return output_index is None or (output_index.dim() == 1 and not output_index.is_floating_point()
                                    and bool(((output_index == 0) | (output_index == -1)).all()))


class Transformer(CLIPPrefixMixin, CausalDecoder):
    """The decoder. ``forward_tokens`` is the one entry point the engine uses.

    ``with_visual=True`` adds the CLIP image prefix (:mod:`._clip_prefix`)."""

    block_cls = TransformerBlock
    split_plan = SplitPlan([
        (r"(^|\.)tok_embeddings\.weight$", ROW),  # ParallelEmbedding splits the embedding dim
        (r"\.attention\.(wq|wk|wv)\.weight$", COLUMN),
        (r"\.attention\.wo\.weight$", ROW),
        (r"\.feed_forward\.(w1|w3)\.weight$", COLUMN),
        (r"\.feed_forward\.w2\.weight$", ROW),
        (r"(^|\.)output\.weight$", COLUMN),
    ], gather=[r"(^|\.)output$"])  # the logits leave the model whole

    def __init__(self, args: ModelArgs, with_visual: bool = False, linear: LinearFactory = plain_linear):
        super().__init__()
        if args.dim % args.n_heads:
            raise ValueError(f"dim {args.dim} is not divisible by n_heads {args.n_heads}")
        n_kv = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        if args.n_heads % n_kv:
            raise ValueError(f"n_heads {args.n_heads} is not a multiple of n_kv_heads {n_kv}")
        self.args = args
        self.params = args  # the original's name for the same object
        self.vocab_size = args.vocab_size
        self.n_layers = args.n_layers
        self.head_dim = args.dim // args.n_heads
        self.n_kv_heads = n_kv
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(self.block_cls(i, args, linear) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # The original's table spans 2 * max_seq_len positions.
        self.rotary = RotaryEmbedding(self.head_dim, args.max_seq_len * 2, theta=args.rope_theta,
                                      scaling=args.rope_scaling, style="interleaved")
        self._inference_cache: Optional[KVCache] = None
        if with_visual:
            self.build_visual(args)

    def forward_tokens(self, tokens: Optional[torch.Tensor], positions: Optional[torch.Tensor] = None,
                       kv_cache: Optional[KVCache] = None, output_index: Optional[torch.Tensor] = None,
                       **extra) -> torch.Tensor:
        """As ``CausalDecoder.forward_tokens``; a CPU decode step of a plain model (these ends and
        plain blocks) runs whole in one native call (``layers/fast_decode.py``'s ``decode_logits``)."""
        cls = type(self)
        if (kv_cache is not None and tokens is not None and positions is not None and not extra and tokens.is_cpu
                and cls.run_layers is Transformer.run_layers and cls.embed_tokens is Transformer.embed_tokens
                and cls.logits is Transformer.logits and _first_of_one(output_index)):
            logits = decode_logits(self, tokens, positions, kv_cache, PLAIN_BLOCK_TYPES)
            if logits is not None:
                return logits if output_index is not None else logits[:, None]
        return super().forward_tokens(tokens, positions, kv_cache, output_index, **extra)

    def run_layers(self, h: torch.Tensor, positions: torch.Tensor, kv_cache: Optional[KVCache],
                   causal_from_zero: bool, **extra) -> torch.Tensor:
        """The blocks over ``h``; a decode step of plain blocks runs in native kernels on a CPU
        (``layers/fast_decode.py``; a prompt's tokens too, where its ``prefill_layers`` takes them)
        and compiled on a GPU (``layers/compiled_decode.py``), anything else through the modules."""
        if kv_cache is not None and not extra:
            out = decode_layers(self, h, positions, kv_cache, PLAIN_BLOCK_TYPES)
            if out is None:
                out = compiled_decode_layers(self, h, positions, kv_cache, PLAIN_BLOCK_TYPES)
            if out is not None:
                return out
        return super().run_layers(h, positions, kv_cache, causal_from_zero, **extra)

    def decodes_natively(self, rows: int) -> bool:
        return native_step_fits(self, PLAIN_BLOCK_TYPES, rows)

    def build_visual(self, args: ModelArgs) -> None:
        """The image side for ``with_visual=True``: the CLIP prefix (variants build their own)."""
        self.build_clip_prefix(args)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head's logits (float32 sums of a bf16 head on the CPU: ``head_logits``)."""
        return head_logits(self.output, self.norm(h))

    def _reference_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight

    def fuse_projections(self) -> None:
        """Fuse q/k/v and w1/w3 of every block where the linears allow it (plain, bias-free)."""
        for module in self.modules():
            if module is not self and hasattr(module, "fuse"):
                module.fuse()
