"""What every causal decoder offers the engine and the original's callers, written once.

An architecture subclasses :class:`CausalDecoder` and provides ``embed_tokens(tokens)``,
``logits(h)`` (final norm + output projection), ``layers`` (blocks called as
``layer(h, positions, rotary, kv_cache, causal_from_zero)``), ``rotary``, and the cache geometry
``n_layers``, ``n_kv_heads`` (as stored: 1 for multi-query) and ``head_dim``.
"""

from typing import Optional

import torch
from torch import nn

from . import multimodal
from .kv_cache import KVCache, cache_dtype
from .linear import still_fused


def plain_block(layer: nn.Module, block_types) -> bool:
    """Whether ``layer`` is exactly a plain llama block of ``block_types`` = (attention class,
    feed-forward class, block class) with its q/k/v and w1/w3 still fused: what the native CPU step
    (``fast_decode``) and the compiled GPU step (``compiled_decode``) run instead of the modules."""
    attention_cls, feed_forward_cls, block_cls = block_types
    if type(layer) is not block_cls or type(layer.attention) is not attention_cls or \
            type(layer.feed_forward) is not feed_forward_cls:
        return False
    attention, feed_forward = layer.attention, layer.feed_forward
    return still_fused(attention._wqkv) and still_fused(feed_forward._w13)


def hooked(module: nn.Module) -> bool:
    """Whether any module in ``module`` has a forward hook (model parallelism's all-reduce is one),
    which a step that bypasses the modules would skip."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


class CausalDecoder(nn.Module):
    """Shared entry points: ``forward_tokens`` (the engine's), ``forward`` and ``forward_inference``
    (the original's), ``new_kv_cache`` and ``run_layers``."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    image_words = 0
    #: "tagged" or "prefix" when the model takes images (see layers/multimodal.py), else None.
    image_layout: Optional[str] = None

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _reference_weight(self) -> torch.Tensor:
        return next(self.parameters())

    def new_kv_cache(self, batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None,
                     device: Optional[torch.device] = None) -> KVCache:
        """A zeroed cache for ``batch_size`` rows of up to ``max_len`` positions."""
        weight = self._reference_weight()
        device = device or weight.device
        if dtype is None:
            dtype = cache_dtype(weight.dtype, device, native=self.decodes_natively(batch_size))
        return KVCache(self.n_layers, batch_size, max_len, self.n_kv_heads, self.head_dim, dtype, device)

    def decodes_natively(self, rows: int) -> bool:
        """Whether decode steps of ``rows`` rows run in the CPU's native kernels (llama blocks)."""
        return False

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, N, dim): every vector one image inserts (multimodal types; see layers/multimodal.py)."""
        self._refuse_image(images)
        raise NotImplementedError(f"{type(self).__name__} sets image_layout but has no encode_images")

    def forward_tokens(self, tokens: Optional[torch.Tensor], positions: Optional[torch.Tensor] = None,
                       kv_cache: Optional[KVCache] = None,
                       output_index: Optional[torch.Tensor] = None, *,
                       input_embeds: Optional[torch.Tensor] = None,
                       image_prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for ``tokens`` (batch, seq).

        ``positions`` (batch, seq): absolute positions, default 0..seq-1 for every row. Layers
        share work derived from this tensor by identity: pass a new tensor for each call rather
        than modifying one in place.
        ``kv_cache``: written at ``positions``, and attended up to each query's position.
        ``output_index`` (batch,): when given, only the logits at that index of each row are
        computed and (batch, vocab) is returned; otherwise (batch, seq, vocab).
        ``input_embeds`` (batch, seq, dim): used instead of embedding ``tokens`` (pass None), e.g.
        text with image vectors inserted (``layers.multimodal.insert_images``).
        ``image_prefix`` (batch, Q, dim): the ``adapter`` layout's per-row image vectors, given with
        the call that starts the sequences (passed on to ``run_layers``).
        """
        h = self.embed_tokens(tokens) if input_embeds is None else input_embeds
        bsz, seqlen = h.shape[:2]
        causal_from_zero = positions is None and kv_cache is None
        if positions is None:
            positions = torch.arange(seqlen, device=h.device).expand(bsz, seqlen)
        if image_prefix is None:
            h = self.run_layers(h, positions, kv_cache, causal_from_zero)
        else:
            h = self.run_layers(h, positions, kv_cache, causal_from_zero, image_prefix=image_prefix)
        if output_index is not None:
            h = h[torch.arange(bsz, device=h.device), output_index]
        return self.logits(h)

    def run_layers(self, h: torch.Tensor, positions: torch.Tensor, kv_cache: Optional[KVCache],
                   causal_from_zero: bool) -> torch.Tensor:
        """The decoder blocks in order over hidden states ``h`` (batch, seq, dim)."""
        for layer in self.layers:
            h = layer(h, positions, self.rotary, kv_cache, causal_from_zero)
        return h

    # The original's two entry points, kept for code written against it.
    def forward(self, examples: torch.Tensor, image=None) -> torch.Tensor:
        """Logits for every position of ``examples`` (batch, seq), no cache. With ``image``
        (batch, 3, H, W; multimodal types) they stay text-aligned: row i predicts token i+1."""
        self._refuse_image(image)
        if image is not None:
            return multimodal.forward_with_images(self, examples, image)
        return self.forward_tokens(examples)

    @torch.inference_mode()
    def forward_inference(self, tokens: torch.Tensor, start_pos: int, image=None) -> torch.Tensor:
        """Last-position logits (batch, vocab) in float32, keeping an internal cache across calls.
        An ``image`` goes with the ``start_pos=0`` call; later calls' positions are shifted by the
        number of vectors it inserted."""
        self._refuse_image(image)
        bsz, seqlen = tokens.shape
        cache = getattr(self, "_inference_cache", None)
        if start_pos == 0 and (cache is None or cache.batch_size != bsz):
            cache = self._inference_cache = self.new_kv_cache(bsz, self.args.max_seq_len)
        if cache is None:
            raise RuntimeError("forward_inference must start at start_pos=0")
        if image is not None:
            return multimodal.prefill_with_images(self, tokens, start_pos, image, cache).float()
        if start_pos == 0:
            self._cache_image_words = 0
        start_pos += getattr(self, "_cache_image_words", 0)
        positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device).expand(bsz, seqlen)
        last = torch.full((bsz,), seqlen - 1, device=tokens.device)
        return self.forward_tokens(tokens, positions, cache, output_index=last).float()

    def get_trainable_params(self):
        """The original's name: every parameter trains unless a variant says otherwise."""
        return dict(self.named_parameters())

    def _refuse_image(self, image) -> None:
        if image is not None and self.image_layout is None:
            raise NotImplementedError(
                f"{type(self).__module__.rsplit('.', 1)[-1]} was built without a visual encoder: it takes no images")
