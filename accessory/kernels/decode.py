"""ctypes bindings of decode_ops.c and of the float32-activation matrix products a decode step uses.

Every function takes raw pointers (``tensor.data_ptr()``) of contiguous float32 CPU buffers;
:mod:`accessory.model.layers.fast_decode` owns the buffers and the checks that make this safe.
"""

import ctypes
import logging
from types import SimpleNamespace
from typing import Optional

from . import bf16_library, load_library
from .panels import float32_product, quant_product
from .quant import _kernels as quant_kernels, library_name as quant_library_name

_P, _I64, _INT, _F, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_double
log = logging.getLogger(__name__)
_functions: Optional[SimpleNamespace] = None
_loaded = False


class StepProduct(ctypes.Structure):
    """decode_ops.c's ``step_product``: one weight matrix. ``kind``: PRODUCT_KINDS."""
    _fields_ = [("kind", _I64), ("out_features", _I64), ("in_features", _I64), ("group_size", _I64),
                ("weight", _P), ("scales", _P), ("offsets", _P), ("expand_from", _I64)]


PRODUCT_KINDS = {"bf16": 0, "int8": 1, "int4": 2, "nf4": 3, "panels": 4}


class StepLayer(ctypes.Structure):
    """decode_ops.c's ``step_layer``: one llama block's products and norms."""
    _fields_ = [("qkv", StepProduct), ("wo", StepProduct), ("w13", StepProduct), ("w2", StepProduct),
                ("attention_norm", _P), ("ffn_norm", _P), ("attention_norm_bf16", _I64), ("ffn_norm_bf16", _I64),
                ("attention_norm_eps", _D), ("ffn_norm_eps", _D)]


class DecodeStep(ctypes.Structure):
    """decode_ops.c's ``decode_step``: what ``accessory_decode_step`` reads and writes."""
    _fields_ = [("layers", ctypes.POINTER(StepLayer)), ("n_layers", _I64), ("keys", ctypes.POINTER(_P)),
                ("values", ctypes.POINTER(_P)), ("kv_bf16", _I64), ("interleaved", _I64), ("positions", _P),
                ("cos_table", _P), ("sin_table", _P), ("n_rotary", _I64),
                *((name, _P) for name in ("h", "x", "qkv", "attn", "out", "gate_up", "act", "scratch")),
                *((name, _I64) for name in ("rows", "dim", "n_heads", "n_kv_heads", "head_dim", "max_len")),
                ("scale", _D), ("gemv_bf16", _P), ("gemv_int8", _P), ("gemv_q4", _P), ("gemv_panels", _P),
                ("embedding", _P), ("embedding_bf16", _I64), ("vocab_size", _I64), ("tokens", _P),
                ("final_norm", _P), ("final_norm_bf16", _I64), ("final_norm_eps", _D), ("head", StepProduct),
                ("logits", _P), ("cache_rows", _P), ("quant_panels", _P)]


def layout_of_mirrors() -> list:
    """What ``accessory_step_layout`` reports, as the ctypes mirrors above lay the structs out."""
    return [ctypes.sizeof(StepProduct), ctypes.sizeof(StepLayer), ctypes.sizeof(DecodeStep),
            StepLayer.ffn_norm_eps.offset, DecodeStep.scale.offset, DecodeStep.head.offset,
            DecodeStep.logits.offset, DecodeStep.cache_rows.offset, DecodeStep.quant_panels.offset,
            StepProduct.expand_from.offset]


def native_layout(library) -> list:
    out = (ctypes.c_int64 * 10)()
    _bind(library, "accessory_step_layout", [_P])(out)
    return list(out)


def _bind(library, name, argtypes, restype=None):
    function = getattr(library, name)
    function.argtypes, function.restype = argtypes, restype
    return function


def decode_kernels() -> Optional[SimpleNamespace]:
    """The kernels as ctypes functions (``decode_step``, ``argmax_rows``, the ``silu_mul`` and
    ``attend_step`` it runs, ``gemv_bf16``, ``gemv_int8``, ``gemv_q4``, and ``gemv_panels`` and
    ``quant_panels`` where the panel library runs, else None), or None when they cannot be built here.
    ``attention_avx512(on)`` sets whether a bf16 cache's attention takes the AVX512-BF16 code
    (-1: only asks; returns the setting in force): on where the bf16 products take the AVX512-BF16
    library (``ACCESSORY_BF16_KERNEL=avx2`` keeps the AVX2 code for both). ``avx512_kinds``: the
    product kinds (``panels``, ``bf16``, ``int8``, ``int4``, ``nf4``) whose products run in an
    AVX-512 library (AVX512-BF16; for the packed kinds VNNI, or the panel library's expansion from
    ``kernels.quant.expand_from`` rows on)."""
    global _functions, _loaded
    if not _loaded:
        (bf16_name, bf16), ops, quant = bf16_library(), load_library("decode_ops"), quant_kernels()
        if ops is not None:
            native, mirrors = native_layout(ops), layout_of_mirrors()
            if native != mirrors:
                log.warning("decode_ops.c's step structs do not match kernels/decode.py's mirrors "
                            "(%s != %s): the native decode step is off", native, mirrors)
                ops = None
        if ops is not None and bf16 is not None and quant is not None:
            _functions = SimpleNamespace(
                silu_mul=_bind(ops, "accessory_silu_mul", [_P, _P, _I64, _I64]),
                attend_step=_bind(ops, "accessory_attend_step",
                                  [_P, _P, _P, _P, _INT, _P, _P, _INT, _P] + [_I64] * 5 + [_F, _P]),
                decode_step=_bind(ops, "accessory_decode_step", [ctypes.POINTER(DecodeStep)], ctypes.c_int),
                argmax_rows=_bind(ops, "accessory_argmax_rows", [_P, _I64, _I64, _P]),
                gemv_bf16=_bind(bf16, "accessory_gemv_bf16_f32", [_P, _P, _P, _P, _I64, _I64, _I64]),
                gemv_int8=quant[0],
                gemv_q4=quant[1],
                gemv_panels=float32_product(),  # None where the panel library cannot run
                quant_panels=quant_product(),  # (the same)
                attention_avx512=_bind(ops, "accessory_attention_avx512", [_INT], _INT),
                # the product kinds the step runs with AVX-512 libraries (AVX512-BF16 / VNNI)
                avx512_kinds=frozenset({"panels"} if float32_product() else set())
                | ({"bf16"} if bf16_name == "gemv_bf16_avx512" else set())
                | ({"int8", "int4", "nf4"} if quant_library_name() == "gemv_quant_avx512" or quant_product() else set()),
            )
            _functions.attention_avx512(int(bf16_name == "gemv_bf16_avx512"))
        _loaded = True
    return _functions
