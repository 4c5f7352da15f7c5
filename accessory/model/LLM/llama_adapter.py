"""LLaMA-Adapter: llama with a learned, gated prefix in its last layers (``llama_type = "llama_adapter"``).

llama plus:

* a prefix of ``prefix_len`` learned vectors per adapted layer, ``prefix (P, 1, prefix_len, dim)``,
  attended by the LAST ``P = prefix_layers`` layers (all layers when ``prefix_layers`` is None);
  layer ``n_layers - P + i`` uses ``prefix[i]``;
* "zero-init attention": in those layers, for every head h,
  ``out_h = attn_causal(q, k, v)_h + tanh(prefix_gate[i, h]) * prefix_new_gate[i] * attn(q, wk(prefix), wv(prefix))_h``
  where the prefix attention has no mask and the prefix keys get no rotary embedding;
  ``prefix_gate (P, n_heads)`` starts at zero, so a fresh adapter leaves llama unchanged;
  ``prefix_new_gate (P,)`` exists only with ``use_prefix_new_gate`` (ones upstream);
* a ``bias`` (``bias_tuning``) on every linear except ``wk`` and ``wv``, and LoRA on all seven
  when ``lora_rank > 0``, as in :mod:`llama_peft`. The prefix goes through the LoRA'd ``wk``/``wv``.

The prefix keys/values depend on the weights only, so they never enter the positional KV cache:
:class:`PrefixKVCache` keeps them beside it, computed once per sequence (at its position-0 prefill).

Model parallelism: ``prefix`` and ``prefix_new_gate`` are replicated. ``prefix_gate`` holds one
column per head; the original marks it model-parallel without a merge rule (its merge keeps
rank 0's half, so its own mp>1 checkpoints cannot be reloaded). Each rank trains the gates of its
own heads, which are ``wq``'s rank-r rows, so here the shards are joined along dim 1 (heads).

``with_visual=True`` (multimodal LLaMA-Adapter): an image (B, 3, 224, 224) gives CLIP's 257 tokens
(OpenAI ViT-L/14, QuickGELU, no text tower; keys ``clip.*``) -> ``clip_proj_norm(clip_proj(.))``
(768 -> ``v_embed_dim``); the learned ``visual_query (prefix_len, v_embed_dim)`` is put before them
and the whole goes through ``v_depth`` ViT blocks (``visual_blocks.N``); the first ``prefix_len``
outputs -> ``visual_proj_norm(visual_proj(.))`` (``dim``) are ADDED to every adapted layer's prefix
for that row: ``prefix[i] + q`` (the original's ``prefix + q[None]``). The image takes no sequence
positions (``image_words`` 0; layout ``"adapter"`` in layers/multimodal.py); its per-row prefix
keys/values are kept in the :class:`PrefixKVCache` for the decode steps. The encoder and all the
visual modules stay in full precision under ``--quant``; the CLIP is frozen.
``clip_config`` shrinks the CLIP and ``visual_config`` overrides the ``v_*`` sizes (tests).
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..layers.kv_cache import KVCache, cache_dtype
from ..layers.linear import make_linear
from ..layers.parallel import ROW
from ..layers.rotary import RotaryEmbedding
from ..visual import CLIP, ViTBlock
from . import llama, llama_peft
from ._clip_prefix import clip_config_from, freeze
from .llama_peft import trainable_by_name


@dataclass
class ModelArgs(llama.ModelArgs):
    """llama's fields, then the original's adapter fields with its defaults."""
    prefix_layers: Optional[int] = None  # adapted layers, counted from the top; None = all
    prefix_len: int = 10
    use_prefix_new_gate: bool = False

    # Sizes of the visual branch (with_visual). Class attributes without annotations, as in the
    # original: not config fields, not in config.json.
    v_embed_dim = 768
    v_depth = 8
    v_num_heads = 16
    v_mlp_ratio = 4.0

    lora_rank: int = -1  # <= 0: no LoRA
    bias_tuning: bool = True
    norm_tuning: bool = True
    trainable_mode: str = "sg"  # which parameters train: "sg" (text), "mm_stage1", "mm_stage2"

    # Not the original's: overrides of the v_* sizes above for with_visual=True (tiny test models).
    visual_config: Optional[Dict[str, Any]] = None


VISUAL_SIZES = ("v_embed_dim", "v_depth", "v_num_heads", "v_mlp_ratio")

#: Module names kept in full precision by --quant (the encoder and every visual connector).
VISUAL_MODULES = ("clip", "clip_proj", "clip_proj_norm", "visual_blocks", "visual_proj", "visual_proj_norm")


def adapter_linear_factory(args: ModelArgs) -> llama.LinearFactory:
    """LoRA on every linear; a bias on all but ``wk`` and ``wv`` (which the prefix also goes through)."""
    def linear(name: str, in_features: int, out_features: int) -> nn.Module:
        bias = args.bias_tuning and name not in ("wk", "wv")
        return make_linear(in_features, out_features, bias=bias, lora_rank=args.lora_rank)
    return linear


class PrefixKVCache(KVCache):
    """llama's positional cache plus each adapted layer's prefix keys/values, (1, heads, prefix_len, hd)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # (1 or batch, heads, prefix_len, hd): batch rows when an image changed the prefix per row
        self.prefix_kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def select_rows(self, rows: torch.Tensor) -> None:
        super().select_rows(rows)
        self.prefix_kv = {i: tuple(t.index_select(0, rows) if t.shape[0] > 1 else t for t in kv)
                          for i, kv in self.prefix_kv.items()}


class AdapterAttention(llama.Attention):
    """llama's attention, plus the gated prefix term in the adapted layers."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: Optional[KVCache], layer_id: int, causal_from_zero: bool,
                prefix_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                prefix_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``prefix_kv``: from :meth:`prefix_keys_values`; ``prefix_gate`` (heads,): the effective gate."""
        q, out = self.attend_heads(x, positions, rotary, kv_cache, layer_id, causal_from_zero)
        if prefix_kv is not None:
            prefix_k, prefix_v = (t.expand(q.shape[0], -1, -1, -1) for t in prefix_kv)
            prefix_out = F.scaled_dot_product_attention(q, prefix_k, prefix_v)  # no mask: every query sees it
            out = out + prefix_gate.view(1, -1, 1, 1).to(out.dtype) * prefix_out
        return self.wo(out.transpose(1, 2).flatten(2))

    def prefix_keys_values(self, prefix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, heads, prefix_len, head_dim) of ``prefix`` (B, prefix_len, dim); no RoPE.
        B is 1 for the learned prefix, the batch when images were added to it."""
        rows, prefix_len = prefix.shape[:2]
        keys = self.wk(prefix).view(rows, prefix_len, self.n_heads, self.head_dim).transpose(1, 2)
        values = self.wv(prefix).view(rows, prefix_len, self.n_heads, self.head_dim).transpose(1, 2)
        return keys, values


class AdapterBlock(llama.TransformerBlock):
    attention_cls = AdapterAttention


def check_adapter_args(args: ModelArgs) -> int:
    """Reject configs the adapter cannot run; returns the number of adapted layers."""
    if args.n_kv_heads is not None and args.n_kv_heads != args.n_heads:
        raise ConfigError(
            f"llama_adapter needs n_kv_heads == n_heads (its prefix keys/values have one head per query "
            f"head), but the config has n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}; set "
            f"n_kv_heads to null, or use llama_type 'llama_peft' for grouped-query models")
    if args.prefix_len <= 0:
        raise ConfigError(
            f"llama_adapter needs prefix_len > 0, the config has prefix_len={args.prefix_len} "
            f"(the original crashes without a prefix); for a model without one use llama_type 'llama_peft'")
    prefix_layers = args.n_layers if args.prefix_layers is None else args.prefix_layers
    if not 1 <= prefix_layers <= args.n_layers:
        raise ConfigError(
            f"llama_adapter prefix_layers={args.prefix_layers} must be between 1 and n_layers={args.n_layers} "
            f"(or null for all layers)")
    return prefix_layers


class Transformer(llama.Transformer):
    """llama's decoder with :class:`AdapterBlock` layers and the prefix parameters."""

    is_peft = True
    block_cls = AdapterBlock
    split_plan = llama_peft.Transformer.split_plan.extended([(r"(^|\.)prefix_gate$", ROW)])

    def __init__(self, args: ModelArgs, with_visual: bool = False):
        prefix_layers = check_adapter_args(args)
        super().__init__(args, with_visual, linear=adapter_linear_factory(args))
        self.prefix_layers = prefix_layers
        self.prefix = nn.Parameter(torch.empty(prefix_layers, 1, args.prefix_len, args.dim))
        self.prefix_gate = nn.Parameter(torch.empty(prefix_layers, args.n_heads))
        self.prefix_new_gate = nn.Parameter(torch.empty(prefix_layers)) if args.use_prefix_new_gate else None
        self.reset_parameters()

    def build_visual(self, args: ModelArgs) -> None:
        """CLIP, its projection, the visual query and blocks, and the projection to ``dim``."""
        sizes = {name: getattr(args, name) for name in VISUAL_SIZES}
        overrides = dict(args.visual_config or {})
        unknown = sorted(set(overrides) - set(VISUAL_SIZES))
        if unknown:
            raise ConfigError(f"visual_config of llama_type 'llama_adapter' has unknown field(s) {unknown}; "
                              f"it takes: {', '.join(VISUAL_SIZES)}")
        sizes.update(overrides)
        width = sizes["v_embed_dim"]
        config = clip_config_from(args.clip_config, "llama_adapter", quick_gelu=True, text_tower=False)
        self.clip = CLIP(config)
        freeze(self.clip)
        self.clip_proj = nn.Linear(config.embed_dim, width)
        self.clip_proj_norm = nn.LayerNorm(width)
        self.visual_query = nn.Parameter(torch.empty(args.prefix_len, width))
        self.visual_blocks = nn.ModuleList(ViTBlock(width, sizes["v_num_heads"], sizes["v_mlp_ratio"], qkv_bias=True)
                                           for _ in range(sizes["v_depth"]))
        self.visual_proj = nn.Linear(width, args.dim)
        self.visual_proj_norm = nn.LayerNorm(args.dim)
        nn.init.normal_(self.visual_query)
        self.image_layout = "adapter"
        self.image_words = 0  # the image changes the prefix and takes no sequence positions
        self.image_size = config.image_size
        self.quant_blocklist = list(VISUAL_MODULES)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in the model's dtype -> (B, prefix_len, dim), added to each adapted layer's prefix."""
        self._refuse_image(images)
        with torch.no_grad():
            feats = self.clip.encode_image(images, project=True)
        feats = self.clip_proj_norm(self.clip_proj(feats.to(self.clip_proj.weight.dtype)))
        queries = self.visual_query.to(feats.dtype).expand(feats.shape[0], -1, -1)
        x = torch.cat([queries, feats], dim=1)
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, : queries.shape[1]]))

    def reset_parameters(self) -> None:
        """Initialise the adapter's own parameters as the original (the layers reset themselves)."""
        nn.init.normal_(self.prefix)
        nn.init.zeros_(self.prefix_gate)
        if self.prefix_new_gate is not None:
            nn.init.ones_(self.prefix_new_gate)

    def new_kv_cache(self, batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None,
                     device: Optional[torch.device] = None) -> PrefixKVCache:
        """A zeroed cache for ``batch_size`` rows of up to ``max_len`` positions, with room for the prefix."""
        weight = self.tok_embeddings.weight
        return PrefixKVCache(self.n_layers, batch_size, max_len, self.n_kv_heads, self.head_dim,
                             dtype or cache_dtype(weight.dtype, weight.device), device or weight.device)

    def prefix_gate_of(self, index: int) -> torch.Tensor:
        """The effective per-head gate (heads,) of adapted layer ``index``: tanh(gate) * new_gate."""
        gate = self.prefix_gate[index].tanh()
        if self.prefix_new_gate is not None:
            gate = gate * self.prefix_new_gate[index]
        return gate

    def run_layers(self, h: torch.Tensor, positions: torch.Tensor, kv_cache: Optional[KVCache],
                   causal_from_zero: bool, image_prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """llama's layers; the last ``prefix_layers`` of them also attend to their prefix, plus
        ``image_prefix`` (batch, prefix_len, dim; :meth:`encode_images`) when images were given."""
        first_adapted = self.n_layers - self.prefix_layers
        for layer in self.layers[:first_adapted]:
            h = layer(h, positions, self.rotary, kv_cache, causal_from_zero)
        # A cache's stored prefix keys stay valid for the sequences it holds; recompute them when a
        # sequence starts (a write at position 0), so a reused cache never serves stale ones.
        stored = kv_cache.prefix_kv if isinstance(kv_cache, PrefixKVCache) else None
        if stored is not None and (image_prefix is not None or bool((positions == 0).any())):
            stored.clear()
        for index, layer in enumerate(self.layers[first_adapted:]):
            prefix_kv = None if stored is None else stored.get(index)
            if prefix_kv is None:
                prefix = self.prefix[index]
                if image_prefix is not None:
                    prefix = prefix + image_prefix.to(prefix.dtype)
                prefix_kv = layer.attention.prefix_keys_values(prefix)
                if stored is not None:
                    stored[index] = prefix_kv
            h = layer(h, positions, self.rotary, kv_cache, causal_from_zero,
                      prefix_kv=prefix_kv, prefix_gate=self.prefix_gate_of(index))
        return h

    def get_trainable_params(self) -> Dict[str, nn.Parameter]:
        """As the original, by ``trainable_mode``: "sg" trains names containing bias, prefix, lora
        (and norm with ``norm_tuning``); the multimodal stages also train the visual branch."""
        mode = self.args.trainable_mode
        norm = ["norm"] if self.args.norm_tuning else []
        if mode == "sg":
            return trainable_by_name(self, ["bias", "prefix", "lora"] + norm, ("clip.", "clip_proj", "visual_"))
        if mode == "mm_stage1":
            return trainable_by_name(self, ["clip_proj", "visual_", "bias", "prefix", "lora"] + norm, ("clip.",))
        if mode == "mm_stage2":
            return trainable_by_name(self, ["bias", "lora"] + norm, ("clip.", "clip_proj", "visual_"))
        raise ConfigError(f"unknown trainable_mode {mode!r}: expected 'sg', 'mm_stage1' or 'mm_stage2'")
