"""A decode step of Meta-llama decoder blocks on a GPU, each layer's element-wise work fused by
``torch.compile``.

Run through the modules, one layer of a one-token step is some 20 kernels: the matrix products
and, between them, a norm, its weight, the rotation of q and k, two cache writes, the residual
adds and the gate (each a launch reading and writing a few kilobytes). In a replayed CUDA graph
those small kernels and the gaps between them were ~30% of a 7B bf16 step on an H200 (measured:
5.0-5.2 ms a step, of which 3.6 ms are its matrix products). Compiled, a layer is its four
products (cuBLAS, as before), attention, and a handful of fused kernels; the same step took
4.3-4.4 ms, 70% of the GPU's measured copy bandwidth (benchmarks/cuda_decode.py).

One compiled function serves every layer (the weights and the layer's cache are its arguments,
so the layers share one compilation; a new batch size or cache length recompiles it once with
that size symbolic). The step is what the modules compute, in the same order and precision, with
two differences of bf16 rounding only: the norm's weight is applied before rounding (the modules
round the normalised vector first), and attention covers the whole cache under the position mask
(no read of the highest position from the device, which a CUDA graph cannot hold).

:func:`compiled_decode_layers` returns None, and the caller runs its modules, whenever a layer is
not a plain block (types, fused dense q/k/v and w1/w3, no biases, hooks, LoRA or quantized
weights), the step is not one token per row on a GPU, ``ACCESSORY_COMPILE=0`` is set, or compiling
failed once (said in a warning; the process then keeps to the modules).
"""

import logging
import types
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import switched_off
from .attention import visibility_mask
from .decoder import hooked, plain_block
from .linear import FusedLinear
from .norm import RMSNorm

log = logging.getLogger(__name__)

#: devices the compiled step runs on (tests add "cpu", where the native kernels are the fast path)
DEVICES = ("cuda",)

_compiled: Dict[Tuple[int, int, int, float], Callable] = {}
_failed = False


def compile_enabled() -> bool:
    return not _failed and not switched_off("ACCESSORY_COMPILE")


def _layer_step(n_q: int, n_kv: int, head_dim: int, eps: float) -> Callable:
    """One block's decode step for these head counts: ``(h, weights..., cache, where) -> h``."""
    split = (n_q + n_kv) * head_dim
    gqa = n_q != n_kv

    def step(h, wqkv, wo, w13, w2, attention_norm, ffn_norm, keys, values, rows, cols, cos, sin, mask):
        x = F.rms_norm(h, (h.shape[-1],), eps=eps) * attention_norm
        qkv = F.linear(x, wqkv)
        # the interleaved rotation of q and k (pairs 2i, 2i+1 as complex numbers), in float32
        qk = qkv[..., :split].unflatten(-1, (n_q + n_kv, head_dim // 2, 2)).float()
        even, odd = qk[..., 0], qk[..., 1]
        qk = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(h.dtype)
        q, k = qk.split((n_q, n_kv), dim=2)
        v = qkv[..., split:].unflatten(-1, (n_kv, head_dim))
        keys[rows, :, cols] = k[:, 0].to(keys.dtype)
        values[rows, :, cols] = v[:, 0].to(values.dtype)
        out = F.scaled_dot_product_attention(q.transpose(1, 2).to(keys.dtype), keys, values, attn_mask=mask,
                                             enable_gqa=gqa)
        h = h + F.linear(out.to(h.dtype).transpose(1, 2).flatten(2), wo)
        x = F.rms_norm(h, (h.shape[-1],), eps=eps) * ffn_norm
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, w2)

    # torch keeps one cache of compilations per code object: a second head layout compiled from the
    # same code would be taken for a change of those numbers and traced with them symbolic (slower
    # kernels, and SDPA refuses a symbolic ``enable_gqa``). Each layout gets its own code object.
    code = step.__code__.replace(co_name=f"decode_step_{n_q}q_{n_kv}kv_{head_dim}")
    return types.FunctionType(code, step.__globals__, code.co_name, step.__defaults__, step.__closure__)


def _compiled_step(n_q: int, n_kv: int, head_dim: int, eps: float) -> Callable:
    key = (n_q, n_kv, head_dim, eps)
    if key not in _compiled:
        log.info("compiling the GPU decode step (%d query heads, %d kv heads): seconds, once per process "
                 "and model shape (ACCESSORY_COMPILE=0 skips it)", n_q, n_kv)
        _compiled[key] = torch.compile(_layer_step(*key), fullgraph=True)
    return _compiled[key]


def _dense_weight(module, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """The weight of a bias-free plain linear (or fused product) in ``dtype`` on ``device``."""
    if not (isinstance(module, FusedLinear) or type(module) is nn.Linear) or getattr(module, "bias", None) is not None:
        return None
    weight = module.weight
    return weight if weight.dtype == dtype and weight.device == device else None


def _layer_weights(layer, block_types, dtype, device) -> Optional[tuple]:
    if not plain_block(layer, block_types) or type(layer.attention_norm) is not RMSNorm or \
            type(layer.ffn_norm) is not RMSNorm or hooked(layer):
        return None
    attention, feed_forward = layer.attention, layer.feed_forward
    weights = (_dense_weight(attention._wqkv, dtype, device), _dense_weight(attention.wo, dtype, device),
               _dense_weight(feed_forward._w13, dtype, device), _dense_weight(feed_forward.w2, dtype, device),
               layer.attention_norm.weight, layer.ffn_norm.weight)
    if any(w is None or w.device != device for w in weights):
        return None
    return weights, (attention.n_heads, attention.n_kv_heads, attention.head_dim, float(layer.attention_norm.eps),
                     float(layer.ffn_norm.eps))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def compiled_decode_layers(model, h: torch.Tensor, positions: torch.Tensor, kv_cache,
                           block_types) -> Optional[torch.Tensor]:
    """Run ``model.layers`` for one decode step of ``h`` (rows, 1, dim) at ``positions`` (rows, 1)
    with compiled layer steps; the hidden states after the last layer, or None when the step must
    take the modules (see the module docstring)."""
    global _failed
    if h.device.type not in DEVICES or h.dim() != 3 or h.shape[1] != 1 or kv_cache is None or \
            torch.is_grad_enabled() or not compile_enabled() or model.rotary.style != "interleaved":
        return None
    keys, values = kv_cache.keys, kv_cache.values
    rows = h.shape[0]
    if len(keys) != len(model.layers) or keys[0].shape[0] != rows or keys[0].device != h.device:
        return None
    plans = [_layer_weights(layer, block_types, h.dtype, h.device) for layer in model.layers]
    if any(p is None for p in plans) or len({shape for _, shape in plans}) != 1:
        return None
    n_q, n_kv, head_dim, eps, ffn_eps = plans[0][1]
    if eps != ffn_eps or keys[0].shape[1:] != (n_kv, kv_cache.max_len, head_dim):
        return None
    cols = positions[:, 0]
    if not _capturing():  # (inside a CUDA graph no value can be read back; the engine checks them)
        highest = int(cols.max())
        if highest >= kv_cache.max_len or highest >= model.rotary.n_positions or int(cols.min()) < 0:
            return None  # the modules raise the error that explains it
    cos_table, sin_table, _ = model.rotary._tables(h.device)
    cos, sin = cos_table[cols][:, None, None, :], sin_table[cols][:, None, None, :]
    mask = visibility_mask(positions, kv_cache.max_len, keys[0].dtype)
    where = torch.arange(rows, device=h.device)
    step = _compiled_step(n_q, n_kv, head_dim, eps)
    try:
        for layer_id, (weights, _) in enumerate(plans):
            h = step(h, *weights, keys[layer_id], values[layer_id], where, cols, cos, sin, mask)
    except Exception as exc:  # no compiler (triton), an unsupported operation on this torch, ...
        if _capturing() or layer_id > 0:
            raise  # (the first layer would have failed: this is not a compilation problem)
        _failed = True
        log.warning("decode steps run without torch.compile: compiling the layer step failed (%s: %s)",
                    type(exc).__name__, exc)
        return None
    return h
