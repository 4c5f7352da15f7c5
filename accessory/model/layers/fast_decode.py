"""A decode step of Meta-llama decoder blocks in native kernels, for the CPU.

One decode step (every batch row adds one token) of a small model spends most of its time between
the matrix products: some 40 torch operations per layer, each a dispatch and many an OpenMP fork.
Here the step is one call into ``kernels/decode_ops.c`` (``accessory_decode_step``), which runs,
per layer, its small operations and the bf16 / quantized matrix-vector kernels on float32 buffers
allocated once per batch size:

    x = rmsnorm(h);  qkv = Wqkv x;  rotate q, k; write k, v to the cache; attend;  h += Wo attn
    x = rmsnorm(h);  gu = W13 x;  h += W2 (silu(gate) * up)

:func:`decode_logits` also does the model's ends in that call: the token embedding before the
layers, the final norm and the output head after them (:func:`decode_layers` only the layers).
A prompt's tokens take the same step too (:func:`prefill_layers`, through ``decode_layers``):
each token a row of the step with its own position in its prompt's cache row, up to 64 tokens a
call, where AVX-512 libraries run the products (bf16 in panels or rows, int8, int4, nf4) and the
prompt is not so long that the torch path's attention would be the faster; a 128-token prompt
1.06-1.34x faster than through the torch path (``PREFILL_KINDS``).
It is one call rather than ten per layer from Python because the products stream megabytes of
weights through the caches: between two of them the interpreter's code and data are evicted, and
each Python-side call cost tens of microseconds instead of one or two.

The residual stream stays in float32 through the step (the torch path rounds it to the model
dtype after every layer), so the two paths agree to bf16 rounding, not bit for bit.

Both return None, and the caller runs its torch modules, whenever anything is not what these
kernels handle: not the CPU, more rows than ``max_step_rows`` allows (16 to ``MAX_ROWS``, by the
products' kinds and the CPU), weights that are not bf16 (in rows or in panels, see
``panel_linear``) or packed int8/int4/nf4, q/k/v or w1/w3 not fused, biases or LoRA, a forward
hook on any module (the model-parallel all-reduce is one), a cache that is not bf16 or float32,
gradients wanted, a token or position out of range (the torch path raises the error), or
``ACCESSORY_FAST_DECODE=0``."""

import ctypes
import math
import operator
import os
import threading
import weakref
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ...kernels.decode import PRODUCT_KINDS, DecodeStep, StepLayer, StepProduct, decode_kernels
from ...kernels.linear import NativeLinear, max_kernel_rows, scratch_floats_needed as bf16_scratch_floats_needed
from ...kernels.panels import float32_product, scratch_floats_needed as panels_scratch_floats_needed
from ...kernels.quant import expand_from, max_rows as quant_max_rows, scratch_floats_needed, takes_scheme
from ...quant.linear import FusedQuantLinear, QuantLinear
from .decoder import hooked, plain_block
from .linear import FusedLinear
from .norm import RMSNorm
from .panel_linear import FusedPanelLinear, PanelLinear

#: The most rows a native step takes; each kind of product may allow fewer (:func:`max_step_rows`).
MAX_ROWS = 64
#: Rows every kind takes (the step's limit before it took more than 16).
MIN_ROWS_LIMIT = 16
_DENSE = (nn.Linear, NativeLinear)


def _kind_rows(kind: str) -> int:
    """The most rows a step's product of this kind runs natively at least as fast as the torch path
    would: bf16 as far as ``kernels.linear`` gives its kernel rows (the torch path multiplies such
    rows with the same kernel, with 40 torch operations a layer around it), the quantized schemes
    as far as ``kernels.quant.max_rows`` (the module path's limit too), or every count where
    ``kernels.quant.expand_from`` says the expansion runs."""
    if kind == "bf16":
        return max_kernel_rows()
    if kind == "panels" or expand_from(kind):  # (panels: faster than the row-major kernel at every
        return MAX_ROWS                        # row count up to MAX_ROWS)
    return quant_max_rows(kind)


def max_step_rows(plans: List[SimpleNamespace], ends: Optional[SimpleNamespace] = None) -> int:
    """The most rows a native step of these layer plans (and ends) takes: ``MAX_ROWS``, or fewer
    where a product's kind allows fewer, never below ``MIN_ROWS_LIMIT``."""
    kinds = {p.kind for plan in plans for p in (plan.qkv, plan.wo, plan.w13, plan.w2)}
    if ends is not None:
        kinds.add(ends.head.kind)
    return max(MIN_ROWS_LIMIT, min([MAX_ROWS] + [_kind_rows(kind) for kind in kinds]))


def fast_decode_enabled() -> bool:
    return os.environ.get("ACCESSORY_FAST_DECODE", "1") not in ("0", "false", "no")


class _Product:
    """One weight matrix as the kernels read it: ``run(x_ptr, y_ptr, rows, scratch_ptr)``."""

    __slots__ = ("kind", "out_features", "in_features", "pointers", "group_size")

    @classmethod
    def of(cls, source) -> Optional["_Product"]:
        """From a FusedLinear / FusedQuantLinear or a bias-free, LoRA-free, hook-free linear."""
        product = cls()
        if isinstance(source, FusedLinear) or type(source) in _DENSE:
            weight = source.weight
            if getattr(source, "bias", None) is not None or weight.dtype is not torch.bfloat16 or \
                    weight.device.type != "cpu" or not weight.is_contiguous():
                return None
            product.kind, product.pointers, product.group_size = "bf16", (weight.data_ptr(),), 0
            product.out_features, product.in_features = weight.shape
            return product
        if isinstance(source, FusedPanelLinear) or type(source) is PanelLinear:
            panels = source.panels
            if getattr(source, "bias", None) is not None or panels.device.type != "cpu" or \
                    not panels.is_contiguous() or float32_product() is None:
                return None
            product.kind, product.pointers, product.group_size = "panels", (panels.data_ptr(),), 0
            product.out_features, product.in_features = source.panel_shape
            return product
        if isinstance(source, FusedQuantLinear) or type(source) is QuantLinear:
            if type(source) is QuantLinear and (source.bias is not None or source.lora_a is not None):
                return None
            packed, scheme = source.packed, source.scheme
            if not takes_scheme(scheme) or any(t.device.type != "cpu" or not t.is_contiguous()
                                               for t in packed.values()):
                return None
            product.out_features, product.in_features = source.out_features, source.in_features
            product.group_size = scheme.group_size or 0
            if scheme.name == "int8":
                product.kind = "int8"
                product.pointers = (packed["qweight"].data_ptr(), packed["scales"].data_ptr())
            elif scheme.name in ("int4", "nf4"):
                product.kind = scheme.name
                offsets = packed.get("offsets")
                product.pointers = (packed["qweight"].data_ptr(), packed["scales"].data_ptr(),
                                    None if offsets is None else offsets.data_ptr())
            else:
                return None
            return product
        return None

    def scratch_floats(self, rows: int) -> int:
        """Float32 scratch the kernel needs for ``rows`` activation rows."""
        if self.kind == "bf16":
            return bf16_scratch_floats_needed(rows, self.in_features)
        if self.kind == "panels":
            return panels_scratch_floats_needed(rows, self.in_features)
        integer = scratch_floats_needed(self.kind, rows, self.in_features, self.group_size)
        return max(integer, panels_scratch_floats_needed(rows, self.in_features)) if expand_from(self.kind) else integer

    def struct(self) -> StepProduct:
        """As decode_ops.c's ``step_product``."""
        weight, scales, offsets = (*self.pointers, None, None)[:3]
        return StepProduct(PRODUCT_KINDS[self.kind], self.out_features, self.in_features, self.group_size,
                           weight, scales, offsets, expand_from(self.kind))


def _norm_weight(norm: nn.Module):
    if type(norm) is not RMSNorm:  # (hooks: _layer_plan checks the whole layer)
        return None
    weight = norm.weight
    if weight.device.type != "cpu" or not weight.is_contiguous() or weight.dtype not in (torch.bfloat16, torch.float32):
        return None
    return weight.data_ptr(), int(weight.dtype is torch.bfloat16), float(norm.eps)


def _weight_key(module) -> str:
    parameters = module._parameters
    return "weight" if "weight" in parameters else ("panels" if "panels" in parameters else "qweight")


def _layer_plan(layer, block_types) -> Optional[SimpleNamespace]:
    """The pointers and shapes one llama block's step needs, or None when it is not a plain one
    (the cheap checks come first: an ineligible model is told so in microseconds)."""
    if not plain_block(layer, block_types):
        return None
    attention, feed_forward = layer.attention, layer.feed_forward
    products = [_Product.of(attention._wqkv), _Product.of(attention.wo), _Product.of(feed_forward._w13),
                _Product.of(feed_forward.w2)]
    norms = [_norm_weight(layer.attention_norm), _norm_weight(layer.ffn_norm)]
    if any(p is None for p in products) or any(n is None for n in norms) or hooked(layer):
        return None
    wq, wo, w1, w2 = attention.wq, attention.wo, feed_forward.w1, feed_forward.w2
    attention_norm, ffn_norm = layer.attention_norm, layer.ffn_norm
    # what the _Watch re-reads each step: plain dictionary lookups, where attribute access through
    # nn.Module costs microseconds per name
    identities = ((layer._modules, "attention", attention), (layer._modules, "feed_forward", feed_forward),
                  (layer._modules, "attention_norm", attention_norm), (layer._modules, "ffn_norm", ffn_norm),
                  (attention._modules, "wq", wq), (attention._modules, "wo", wo),
                  (feed_forward._modules, "w1", w1), (feed_forward._modules, "w2", w2),
                  (attention.__dict__, "_wqkv", attention._wqkv), (feed_forward.__dict__, "_w13", feed_forward._w13),
                  *attention._wqkv.owners, *feed_forward._w13.owners)
    # every module of a fused product (wq, wk, wv; w1, w3): a weight assigned or put back in rows
    # leaves the fused matrix stale
    pointers = (*attention._wqkv.views, *feed_forward._w13.views,
                (wo._parameters, _weight_key(wo), products[1].pointers[0]),
                (w2._parameters, _weight_key(w2), products[3].pointers[0]),
                (attention_norm._parameters, "weight", norms[0][0]), (ffn_norm._parameters, "weight", norms[1][0]))
    return SimpleNamespace(qkv=products[0], wo=products[1], w13=products[2], w2=products[3],
                           attention_norm=norms[0], ffn_norm=norms[1], layer_id=layer.layer_id,
                           n_heads=attention.n_heads, n_kv_heads=attention.n_kv_heads, head_dim=attention.head_dim,
                           dim=layer.attention_norm.weight.shape[0], identities=identities, pointers=pointers,
                           watched=(layer, attention, feed_forward, wo, w2, attention_norm, ffn_norm))


_HOOKS, _PRE_HOOKS = operator.attrgetter("_forward_hooks"), operator.attrgetter("_forward_pre_hooks")


def _hook_epoch() -> Optional[int]:
    """A number that grows whenever torch registers a hook anywhere (the id its RemovableHandle
    hands out), or None where this torch has no such counter."""
    return getattr(RemovableHandle, "next_id", None)


class _Watch:
    """What plans rely on, re-read before each step: ``identities`` (dictionary, key, expected
    object) for the modules and fused products, ``pointers`` (parameter dictionary, name, data
    pointer) for the memory the kernels read, ``modules`` that must stay without forward hooks, and
    ``sizes`` (dictionary, length) for module lists. A cast, a reload or a re-fuse replaces memory;
    model parallelism adds hooks.

    The step's products have just streamed the weights through every cache, so this walk over a
    few hundred objects runs cold (~300 us for 12 layers, against ~40 warm): it is a few passes of
    C-level iteration (``map``) rather than a Python loop, and the hooks, a third of it, are walked
    only after torch has registered a hook somewhere (``_hook_epoch``)."""

    __slots__ = ("owners", "keys", "expected", "tensor_owners", "names", "pointers", "modules", "dicts",
                 "lengths", "hook_epoch")

    def __init__(self, identities, pointers, modules, sizes=()):
        self.owners, self.keys, self.expected = (list(column) for column in zip(*identities))
        self.tensor_owners, self.names, self.pointers = (list(column) for column in zip(*pointers))
        self.modules = list(modules)
        self.dicts, self.lengths = [d for d, _ in sizes], [n for _, n in sizes]
        self.hook_epoch = None  # the plans were made hook-free; the modules are walked again once

    def holds(self) -> bool:
        if not all(map(operator.is_, map(dict.get, self.owners, self.keys), self.expected)) or \
                list(map(len, self.dicts)) != self.lengths:
            return False
        try:
            if list(map(torch.Tensor.data_ptr, map(dict.get, self.tensor_owners, self.names))) != self.pointers:
                return False
        except TypeError:  # a parameter gone (None has no data pointer)
            return False
        # the modules' hooks are walked only when torch has registered a hook anywhere since the
        # last walk (a third of the cold walk's time otherwise)
        epoch = _hook_epoch()
        if epoch is None or epoch != self.hook_epoch:
            if any(map(_HOOKS, self.modules)) or any(map(_PRE_HOOKS, self.modules)):
                return False
            self.hook_epoch = epoch
        return True


# per model, kept outside it (a model can still be deep-copied or pickled): its layer plans and
# its per-thread buffers
_STATES: "weakref.WeakKeyDictionary[nn.Module, SimpleNamespace]" = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _state(model) -> SimpleNamespace:
    with _STATES_LOCK:
        state = _STATES.get(model)
        if state is None:
            state = _STATES[model] = SimpleNamespace(plans=None, watch=None, table=None, ends=None,
                                                     local=threading.local())
        return state


def uses_fast_decode(model) -> bool:
    """Whether ``model``'s layers were found fit for the native step when it last looked (for
    tests and tools; a step can still take the torch path for its own inputs, e.g. > MAX_ROWS)."""
    state = _STATES.get(model)
    return state is not None and state.plans is not None


def _plans(model, block_types) -> Optional[List[SimpleNamespace]]:
    """Every layer's plan (cached on the model and re-checked each step), or None."""
    state = _state(model)
    cached = state.plans
    if cached is not None and state.watch.holds():
        return cached
    layers = model.layers
    plans = []
    for layer in layers:
        plan = _layer_plan(layer, block_types)
        if plan is None:
            state.plans = None
            return None
        plans.append(plan)
    if len({(p.qkv.out_features, p.w13.out_features, p.n_heads, p.n_kv_heads, p.head_dim) for p in plans}) != 1:
        state.plans = None
        return None
    listing = layers._modules
    state.watch = _Watch([(model._modules, "layers", layers), *((listing, key, listing[key]) for key in listing),
                          *(entry for plan in plans for entry in plan.identities)],
                         [entry for plan in plans for entry in plan.pointers],
                         [module for plan in plans for module in plan.watched], sizes=[(listing, len(listing))])
    state.plans = plans
    return plans


def native_step_fits(model, block_types, rows: int) -> bool:
    """Whether decode steps of ``rows`` rows of ``model`` will take the native step (its layers,
    kernels and settings; the cache it gets is then bf16 for a bf16 model, see ``kv_cache``)."""
    if not 0 < rows <= MAX_ROWS or not fast_decode_enabled():
        return False
    # (the plans need every weight on the CPU, so a GPU model is told no before any kernel is built)
    plans = _plans(model, block_types)
    return plans is not None and decode_kernels() is not None and \
        rows <= max_step_rows(plans, _ends(model) if rows > MIN_ROWS_LIMIT else None)


def _buffers(cache: Dict[int, SimpleNamespace], rows: int, plans: List[SimpleNamespace], table,
             ends: Optional[SimpleNamespace], kernels) -> SimpleNamespace:
    """The float32 buffers of a ``rows``-row step and the ``DecodeStep`` that points at them, with
    what does not change from step to step filled in (the layer ``table``, the ``ends`` when given,
    the products' addresses). Made again when the plans or the ends are new."""
    buffers = cache.get(rows)
    if buffers is not None and buffers.plans is plans and buffers.ends is ends:
        return buffers
    first = plans[0]
    widths = dict(h=first.dim, x=first.dim, out=first.dim, qkv=first.qkv.out_features, attn=first.wo.in_features,
                  gate_up=first.w13.out_features, act=first.w2.in_features)
    products = [p for plan in plans for p in (plan.qkv, plan.wo, plan.w13, plan.w2)]
    if ends is not None:
        products.append(ends.head)
    scratch = max(p.scratch_floats(rows) for p in products)
    buffers = SimpleNamespace(plans=plans, ends=ends, cache=None,
                              **{name: torch.empty(rows, width) for name, width in widths.items()})
    buffers.scratch = torch.empty(max(scratch, 1))
    step = buffers.step = DecodeStep(
        rows=rows, dim=first.dim, n_heads=first.n_heads, n_kv_heads=first.n_kv_heads, head_dim=first.head_dim,
        scale=1.0 / math.sqrt(first.head_dim), layers=table, n_layers=len(plans),
        gemv_bf16=_address(kernels.gemv_bf16), gemv_int8=_address(kernels.gemv_int8),
        gemv_q4=_address(kernels.gemv_q4), gemv_panels=_address(kernels.gemv_panels) if kernels.gemv_panels else None,
        quant_panels=_address(kernels.quant_panels) if kernels.quant_panels else None,
        **{name: getattr(buffers, name).data_ptr() for name in (*widths, "scratch")})
    if ends is not None:
        step.embedding, step.embedding_bf16, step.vocab_size = ends.embedding, ends.embedding_bf16, ends.vocab_size
        step.final_norm, step.final_norm_bf16, step.final_norm_eps = ends.final_norm
        step.head = ends.head.struct()
    buffers.table = table  # (kept alive with the step that points at it)
    cache[rows] = buffers
    return buffers


def _layer_table(plans: List[SimpleNamespace]) -> "ctypes.Array[StepLayer]":
    """The plans as decode_ops.c's ``step_layer`` array (built once per set of plans)."""
    table = (StepLayer * len(plans))()
    for entry, plan in zip(table, plans):
        entry.qkv, entry.wo, entry.w13, entry.w2 = (plan.qkv.struct(), plan.wo.struct(), plan.w13.struct(),
                                                   plan.w2.struct())
        entry.attention_norm, entry.attention_norm_bf16, entry.attention_norm_eps = plan.attention_norm
        entry.ffn_norm, entry.ffn_norm_bf16, entry.ffn_norm_eps = plan.ffn_norm
    return table


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


def _ends_plan(model) -> Optional[SimpleNamespace]:
    """The token embedding, final norm and output head as the step reads them, or None when they
    are not plain (a bias, LoRA, a hook, another embedding type, a weight elsewhere than the CPU)."""
    modules = model._modules
    embedding, norm, output = modules.get("tok_embeddings"), modules.get("norm"), modules.get("output")
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        return None
    table = embedding.weight
    if table.dtype not in (torch.bfloat16, torch.float32) or table.device.type != "cpu" or not table.is_contiguous():
        return None
    final_norm, head = _norm_weight(norm), _Product.of(output)
    if final_norm is None or head is None or head.in_features != table.shape[1] or \
            any(hooked(m) for m in (embedding, norm, output)):
        return None
    watch = _Watch(((modules, "tok_embeddings", embedding), (modules, "norm", norm), (modules, "output", output)),
                   ((embedding._parameters, "weight", table.data_ptr()), (norm._parameters, "weight", final_norm[0]),
                    (output._parameters, _weight_key(output), head.pointers[0])),
                   (embedding, norm, output))
    return SimpleNamespace(embedding=table.data_ptr(), embedding_bf16=int(table.dtype is torch.bfloat16),
                           vocab_size=table.shape[0], final_norm=final_norm, head=head, watch=watch)


def _ends(model) -> Optional[SimpleNamespace]:
    """``model``'s ends plan (cached, re-checked each step), or None."""
    state = _state(model)
    ends = state.ends
    if ends is None or not ends.watch.holds():
        ends = state.ends = _ends_plan(model)
    return ends


def _cache_pointers(buffers: SimpleNamespace, kv_cache, plans: List[SimpleNamespace],
                    rows: int) -> Optional[SimpleNamespace]:
    """Layer by layer, the cache's key and value pointers as arrays for the step, or None when
    the cache is not one the kernels read or holds fewer than ``rows`` rows. Checked and made once
    per set of cache tensors (a new cache, or ``select_rows``), then found again by their identity
    (through weak references: a finished generation's cache is not kept alive)."""
    keys, values = kv_cache.keys, kv_cache.values
    known = buffers.cache
    if known is not None and rows <= known.batch and len(keys) == len(known.key_refs) and \
            len(values) == len(known.value_refs) and \
            all(map(operator.is_, keys, map(weakref.ref.__call__, known.key_refs))) and \
            all(map(operator.is_, values, map(weakref.ref.__call__, known.value_refs))):
        return known
    first = plans[0]
    if len(keys) < len(plans) or len(values) != len(keys) or not keys or \
            keys[0].dtype not in (torch.float32, torch.bfloat16) or \
            any(t.dtype is not keys[0].dtype or t.shape != keys[0].shape or not t.is_contiguous()
                for t in (*keys, *values)) or \
            keys[0].shape[0] < rows or keys[0].shape[1:] != (first.n_kv_heads, kv_cache.max_len, first.head_dim):
        return None
    n_layers = len(plans)
    buffers.cache = SimpleNamespace(
        key_refs=[weakref.ref(t) for t in keys], value_refs=[weakref.ref(t) for t in values],
        bf16=int(keys[0].dtype is torch.bfloat16), batch=keys[0].shape[0],
        keys=(ctypes.c_void_p * n_layers)(*[keys[plan.layer_id].data_ptr() for plan in plans]),
        values=(ctypes.c_void_p * n_layers)(*[values[plan.layer_id].data_ptr() for plan in plans]))
    return buffers.cache


def _step(model, rows: int, positions: torch.Tensor, kv_cache, block_types,
          ends: Optional[SimpleNamespace]) -> Optional[SimpleNamespace]:
    """The buffers of a ``rows``-row step with their ``DecodeStep`` filled for ``positions`` and
    ``kv_cache`` (and for the ``ends`` plan when given), or None when the step must take the torch
    path (see the module docstring)."""
    if not 0 < rows <= MAX_ROWS or torch.is_grad_enabled() or kv_cache is None or not fast_decode_enabled():
        return None
    if positions.dtype is not torch.int64 or positions.shape != (rows, 1) or positions.device.type != "cpu":
        return None
    kernels = decode_kernels()
    if kernels is None:
        return None
    plans = _plans(model, block_types)
    if plans is None or (rows > MIN_ROWS_LIMIT and rows > max_step_rows(plans, ends)):
        return None
    buffers = _step_buffers(model, rows, rows, kv_cache, plans, ends, kernels)
    if buffers is not None:
        buffers.positions = positions.contiguous()  # (kept alive through the call)
        buffers.step.positions = buffers.positions.data_ptr()
    return buffers


def _step_buffers(model, rows: int, batch: int, kv_cache, plans: List[SimpleNamespace],
                  ends: Optional[SimpleNamespace], kernels) -> Optional[SimpleNamespace]:
    """The buffers of steps of up to ``rows`` rows over ``kv_cache`` (at least ``batch`` rows),
    their ``DecodeStep`` set for ``rows`` rows, one a cache row (``cache_rows`` NULL), and for the
    cache and the rotary tables; None when the cache is not one the kernels read."""
    state = _state(model)
    if state.table is None or state.table[0] is not plans:
        state.table = (plans, _layer_table(plans))
    # per thread: two threads may decode with one model at once (each with its own cache)
    local = state.local
    if not hasattr(local, "buffers"):
        local.buffers = {}
    buffers = _buffers(local.buffers, rows, plans, state.table[1], ends, kernels)
    cache = _cache_pointers(buffers, kv_cache, plans, batch)
    if cache is None:
        return None
    rotary = model.rotary  # its tables are float32 and its style one the kernel knows (rotary.py)
    step = buffers.step
    step.keys, step.values, step.kv_bf16, step.max_len = cache.keys, cache.values, cache.bf16, kv_cache.max_len
    step.rows, step.cache_rows = rows, None
    step.cos_table, step.sin_table, step.n_rotary = rotary.cos.data_ptr(), rotary.sin.data_ptr(), rotary.n_positions
    step.interleaved = int(rotary.style == "interleaved")
    return buffers


def decode_layers(model, h: torch.Tensor, positions: torch.Tensor, kv_cache, block_types) -> Optional[torch.Tensor]:
    """Run ``model.layers`` for one decode step of ``h`` (rows, 1, dim) at ``positions`` (rows, 1)
    through the native kernels, or for a prompt's tokens (rows, seq, dim) at ``positions`` (rows,
    seq) (:func:`prefill_layers`); the hidden states after the last layer, or None when the step
    must take the torch path (see the module docstring)."""
    if h.dim() != 3 or h.device.type != "cpu":
        return None
    if h.shape[1] != 1:
        return prefill_layers(model, h, positions, kv_cache, block_types)
    rows, dim = h.shape[0], h.shape[2]
    buffers = _step(model, rows, positions, kv_cache, block_types, None)
    if buffers is None or buffers.h.shape[1] != dim:  # (a model whose layers are not its width)
        return None
    buffers.h.copy_(h.view(rows, dim))
    if decode_kernels().decode_step(buffers.step) != 0:
        return None
    return buffers.h.view(rows, 1, dim).to(h.dtype)


#: A native prefill's limit on a query's attention (multiply-adds over every key up to the
#: highest position) as a share of its layer's products: past it the torch path's attention, which
#: reads the cache in blocks shared by many queries (a native query reads its own keys), is the
#: faster. Measured (benchmarks/README.md, session 17), native against torch, one prompt: XS (its
#: attention a third of its products at 1536 positions) 128 tokens 1.34x, 1020 1.10x, 2000 1.03x,
#: 3000 0.88x; S (a third at 3669) 128 1.12x, 1000 1.18x, 2000 1.09x.
PREFILL_ATTENTION_SHARE = 1 / 3
#: The product kinds a native prefill takes, each only where an AVX-512 library runs it and the
#: step takes MAX_ROWS rows, as measured against the torch path (128 tokens, XS / S): panels
#: 1.34x / 1.12x, bf16 rows (AVX512-BF16 kernel) 1.28x / 1.13x, int8 1.11x / 1.15x, int4 1.27x /
#: 1.06x (VNNI); the packed kinds since through the panel library's expansion, against VNNI's
#: products in the same step, int8 1.34x / 1.20x, int4 1.56x / 1.21x, and nf4 (whose 16-row
#: integer-free kernel kept it on the torch path, 0.54x) 1.8-2.5x over that path before (session
#: 18). Not the AVX2 libraries (0.61-0.76x here, where the torch path's 128-row products were
#: oneDNN's AVX512-BF16 ones; not measured on an AVX2-only CPU), nor AMX (the bf16 kernel's 16
#: rows against oneDNN's tiles).
PREFILL_KINDS = frozenset({"panels", "bf16", "int8", "int4", "nf4"})


def prefill_enabled() -> bool:
    return os.environ.get("ACCESSORY_NATIVE_PREFILL", "1") not in ("0", "false", "no")


def prefill_layers(model, h: torch.Tensor, positions: torch.Tensor, kv_cache,
                   block_types) -> Optional[torch.Tensor]:
    """``model.layers`` over a prompt's tokens, ``h`` (rows, seq, dim) at ``positions`` (rows, seq),
    through the native step: the rows * seq tokens go as one flat batch, in chunks of up to
    ``MAX_ROWS`` tokens, each token a row of the step reading and writing its own cache row
    (``cache_rows``) at its position. Each chunk writes all its keys and values before its queries
    attend, and the chunks go in order, so every query sees the keys at its row's earlier positions
    as the torch path's causal attention over the cache does. The hidden states after the last
    layer (the residual stream kept in float32 through them, as in a decode step), or None for
    the torch path: products of a kind not in ``PREFILL_KINDS``, or not run by an AVX-512 library,
    or a step of fewer than MAX_ROWS rows (what was measured), positions that do not increase
    along each row or fall outside the cache or the rotary table, a prompt long enough that its
    last query's attention passes ``PREFILL_ATTENTION_SHARE`` of the products, or
    ``ACCESSORY_NATIVE_PREFILL=0``."""
    batch, seqlen, dim = h.shape
    if seqlen < 2 or torch.is_grad_enabled() or kv_cache is None or not fast_decode_enabled() or \
            not prefill_enabled():
        return None
    if positions.dtype is not torch.int64 or positions.shape != (batch, seqlen) or positions.device.type != "cpu":
        return None
    kernels = decode_kernels()
    if kernels is None:
        return None
    plans = _plans(model, block_types)
    if plans is None or max_step_rows(plans) < MAX_ROWS or \
            any(p.kind not in PREFILL_KINDS or p.kind not in kernels.avx512_kinds
                for plan in plans for p in (plan.qkv, plan.wo, plan.w13, plan.w2)):
        return None
    first = plans[0]
    highest = int(positions.max())
    products = sum(p.out_features * p.in_features for p in (first.qkv, first.wo, first.w13, first.w2))
    if int(positions.min()) < 0 or highest >= min(kv_cache.max_len, model.rotary.n_positions) or \
            not bool((positions[:, 1:] > positions[:, :-1]).all()) or \
            (highest + 1) * first.n_heads * first.head_dim * 2 > PREFILL_ATTENTION_SHARE * products:
        return None
    total, chunk = batch * seqlen, MAX_ROWS  # (what every product takes here, checked above)
    # (the buffers of a full chunk, also for a shorter prompt: one set whatever the prompt's length;
    # every step sets its rows and cache rows on them, so a decode step after this finds its own)
    buffers = _step_buffers(model, chunk, batch, kv_cache, plans, None, kernels)
    if buffers is None or buffers.h.shape[1] != dim:
        return None
    flat_positions = positions.reshape(total).contiguous()
    cache_rows = torch.arange(batch).repeat_interleave(seqlen)
    inputs, out = h.reshape(total, dim), torch.empty(total, dim)
    step = buffers.step
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        step.rows = n
        step.positions = flat_positions[start:].data_ptr()
        step.cache_rows = cache_rows[start:].data_ptr()
        buffers.h[:n].copy_(inputs[start:start + n])
        if kernels.decode_step(step) != 0:  # (the positions were checked above)
            raise RuntimeError(f"the native prefill refused positions {start}..{start + n - 1}")
        out[start:start + n].copy_(buffers.h[:n])
    return out.view(batch, seqlen, dim).to(h.dtype)


def decode_logits(model, tokens: torch.Tensor, positions: torch.Tensor, kv_cache, block_types) -> Optional[torch.Tensor]:
    """One whole decode step of ``tokens`` (rows, 1) at ``positions`` (rows, 1) in one native call:
    embedding, ``model.layers``, final norm and output head. The logits (rows, vocab) in float32
    as the kernels sum them (the torch path rounds them to the model's dtype; the engine widens
    them to float32 either way), or None when the step must take the torch path (see the module
    docstring; also when ``model``'s embedding, norm or output is not plain)."""
    if tokens.dim() != 2 or tokens.shape[1] != 1 or tokens.dtype is not torch.int64 or tokens.device.type != "cpu":
        return None
    ends = _ends(model)
    if ends is None:
        return None
    buffers = _step(model, tokens.shape[0], positions, kv_cache, block_types, ends)
    if buffers is None:
        return None
    logits = torch.empty(tokens.shape[0], ends.head.out_features)
    tokens = tokens.contiguous()
    buffers.step.tokens, buffers.step.logits = tokens.data_ptr(), logits.data_ptr()
    if decode_kernels().decode_step(buffers.step) != 0:
        return None
    return logits
