"""ctypes bindings of decode_ops.c and of the float32-activation matrix products a decode step uses.

Every function takes raw pointers (``tensor.data_ptr()``) of contiguous float32 CPU buffers;
:mod:`accessory.model.layers.fast_decode` owns the buffers and the checks that make this safe.
"""

import ctypes
from types import SimpleNamespace
from typing import Optional

from . import load_library
from .quant import _kernels as quant_kernels

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_functions: Optional[SimpleNamespace] = None
_loaded = False


def _bind(library, name, argtypes):
    function = getattr(library, name)
    function.argtypes, function.restype = argtypes, None
    return function


def decode_kernels() -> Optional[SimpleNamespace]:
    """The kernels as ctypes functions (``rmsnorm``, ``add``, ``silu_mul``, ``attend_step``,
    ``gemv_bf16``, ``gemv_int8``, ``gemv_q4``), or None when they cannot be built here."""
    global _functions, _loaded
    if not _loaded:
        ops, bf16, quant = load_library("decode_ops"), load_library("gemv_bf16"), quant_kernels()
        if ops is not None and bf16 is not None and quant is not None:
            _functions = SimpleNamespace(
                rmsnorm=_bind(ops, "accessory_rmsnorm", [_P, _P, _INT, _P, _I64, _I64, _F]),
                add=_bind(ops, "accessory_add", [_P, _P, _I64]),
                silu_mul=_bind(ops, "accessory_silu_mul", [_P, _P, _I64, _I64]),
                attend_step=_bind(ops, "accessory_attend_step",
                                  [_P, _P, _P, _P, _INT, _P, _P, _INT, _P] + [_I64] * 5 + [_F]),
                gemv_bf16=_bind(bf16, "accessory_gemv_bf16_f32", [_P, _P, _P, _P, _I64, _I64, _I64]),
                gemv_int8=quant[0],
                gemv_q4=quant[1],
            )
        _loaded = True
    return _functions
