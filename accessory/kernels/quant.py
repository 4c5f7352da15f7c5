"""ctypes bindings of gemv_quant.c (gemv_quant_avx512.c on CPUs with AVX512-VNNI,
``kernels.quant_library``): products of a few activation rows with packed weights; and, on CPUs
with AVX512-BF16, gemv_bf16_panels.c's expansion for many rows.

``quant_gemv(x, tensors, scheme)`` returns ``x @ W.T`` for the quantized ``W`` without ever
expanding it whole in memory, or None when no native kernel applies (not on the CPU, more than
``max_rows(scheme)`` rows where the expansion does not run, kernels disabled or not buildable);
callers then use their fallback. From ``expand_from(scheme)`` rows on (any number of them) the
expansion runs instead of the integer kernels: W's rows expanded to bf16 16 at a time in a
buffer that stays in cache while every activation row meets them through bf16 dot products, so
its cost is shared by all the rows, where the integer kernels scale each block's sums for each row.
"""

import ctypes
from typing import Dict, Optional

import torch

from . import quant_library, scratch_floats
from .panels import quant_product, scratch_floats_needed as panel_scratch_floats_needed

#: The most activation rows a call takes natively, per scheme; more rows (a longer prompt) expand
#: the matrix for torch's float32 product instead (quant/linear.py). int8 and int4 multiply the
#: activations' int8 block codes with integer multiply-adds, so they stay ahead well past decode
#: sizes; nf4 expands its levels to float32 for every activation row. Measured on the 2-core AVX2
#: machine of benchmarks/README.md, five XS and S shapes, native against expansion in one run:
#: int8 1.46-1.84x at 64 rows, 1.23-1.67x at 80, 0.82-1.77x at 128; int4 (groups of 32)
#: 1.33-2.21x at 64, 0.95-1.42x at 128; int4 with groups of 128 1.00-2.22x at 64, 0.85-2.04x at
#: 80; nf4 0.93-3.48x at 24 rows, 0.75-2.56x at 32 (so 16, as for decoding).
MAX_ROWS = {"int8": 64, "int4": 64, "nf4": 16}
#: The same with gemv_quant_avx512.c (AVX512-VNNI), against expansion for torch's bf16 product, on
#: the Zen 4 of benchmarks/README.md. One S layer's four products: int8 2.6x at 64 rows, 1.24x at
#: 128, 1.02-1.08x at 160-192, 0.93x at 256; int4 (groups of 32) 2.2x at 64, 1.44x at 128,
#: 1.25-1.33x at 160-192, 1.04x at 256. Whole 128-token prefills, in one process: int4 S 1.44x,
#: XS 0.97-1.02x; int8 S 1.03x, XS 0.86x (expanding int8 costs little), so int8 keeps 64.
MAX_ROWS_VNNI = {"int8": 64, "int4": 192, "nf4": 16}
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: The fewest activation rows whose product goes through the expansion where it runs (AVX512-BF16).
#: Measured on the Zen 4 of benchmarks/README.md against gemv_quant_avx512.c, every layer's
#: matrices from memory, 2 threads (session 18): int8 XS 1.02x at 16 rows, 1.04x at 24, 1.19x at
#: 32; S 0.80x / 0.81x / 1.05x; int4 XS 1.19x / 1.08x / 1.31x, S 0.91x / 0.98x / 1.21x; nf4 (whose
#: integer-free kernel is slower) S 0.87x at 4 rows, 1.61x at 8.
EXPAND_FROM = {"int8": 32, "int4": 32, "nf4": 8}
#: The formats' codes in the C kernels (accessory_dequantize, accessory_quant_panels).
_KIND_CODES = {"int8": 0, "int4": 1, "nf4": 2}

_functions = None
_loaded = False
_library_name = None


def _kernels():
    global _functions, _loaded, _library_name
    if not _loaded:
        _library_name, library = quant_library()
        if library is not None:
            int8 = library.accessory_gemv_int8
            int8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 3
            int8.restype = None
            q4 = library.accessory_gemv_q4
            q4.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int,
                           ctypes.c_void_p] + [ctypes.c_int64] * 4)
            q4.restype = None
            dequantize = library.accessory_dequantize
            dequantize.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 3
            dequantize.restype = None
            _functions = (int8, q4, dequantize)
        _loaded = True
    return _functions


def native_quant_available() -> bool:
    return _kernels() is not None


def library_name() -> Optional[str]:
    """The name of the int8 / int4 / nf4 products' library in use (``gemv_quant_avx512`` or
    ``gemv_quant``), None where none can be built."""
    return _library_name if _kernels() is not None else None


def expand_from(scheme_name: str) -> int:
    """The fewest activation rows from which ``scheme_name``'s products go through the expansion
    (:data:`EXPAND_FROM`), 0 where it does not run here (no AVX512-BF16 library)."""
    return EXPAND_FROM.get(scheme_name, 0) if quant_product() is not None else 0


def max_rows(scheme_name: str) -> int:
    """The most activation rows the integer kernels of ``scheme_name`` take, with the library in use
    (from :func:`expand_from` rows on, where it is not 0, the expansion takes any number)."""
    if _kernels() is not None and _library_name == "gemv_quant_avx512":
        return MAX_ROWS_VNNI.get(scheme_name, 0)
    return MAX_ROWS.get(scheme_name, 0)


def takes_scheme(scheme) -> bool:
    """Whether the native products handle ``scheme``'s layout: int4 spreads a group's scale over
    its blocks of 32 inputs by a shift, so its groups must be 32 << k inputs (formats.py allows any
    multiple of 32: other sizes take the expansion); nf4 and int8 take any."""
    blocks = (scheme.group_size or 0) // 32
    return scheme.name != "int4" or (blocks > 0 and blocks & (blocks - 1) == 0)


def scratch_floats_needed(scheme_name: str, rows: int, in_features: int, group_size: int = 0) -> int:
    """Float32 scratch ``accessory_gemv_int8`` / ``accessory_gemv_q4`` need for ``rows`` activation
    rows: the float32 activations, one int8 step per block of 32, the int8 codes (a quarter float
    each, plus one for a remainder; gemv_quant_avx512.c pads each row's to a multiple of 128) and,
    for 4-bit, one float per group."""
    n = rows * in_features
    groups = 0 if scheme_name == "int8" else rows * (in_features // group_size)
    return n + groups + n // 32 + n // 4 + 24 * rows + 1


def quant_gemv(x: torch.Tensor, tensors: Dict[str, torch.Tensor], scheme, out_features: int,
               in_features: int) -> Optional[torch.Tensor]:
    """``x (..., in) @ W.T`` for the quantized W in ``tensors``; None when no kernel applies."""
    if x.device.type != "cpu" or x.dtype not in _DTYPE_CODES or x.requires_grad:
        return None
    rows = x.numel() // in_features if x.dim() else 0
    if rows <= 0:
        return None
    if 0 < expand_from(scheme.name) <= rows:
        y = _expanded_product(x, tensors, scheme, rows, out_features, in_features)
        if y is not None:
            return y
    if rows > max_rows(scheme.name) or not takes_scheme(scheme):
        return None
    kernels = _kernels()
    if kernels is None:
        return None
    x2 = x.reshape(rows, in_features).contiguous()
    y = torch.empty((rows, out_features), dtype=x.dtype)
    code = _DTYPE_CODES[x.dtype]
    qweight, scales = tensors["qweight"], tensors["scales"]
    scratch = scratch_floats(scratch_floats_needed(scheme.name, rows, in_features, scheme.group_size)).data_ptr()
    if scheme.name == "int8":
        kernels[0](qweight.data_ptr(), scales.data_ptr(), x2.data_ptr(), y.data_ptr(), code, scratch,
                   rows, out_features, in_features)
    else:
        offsets = tensors.get("offsets")
        kernels[1](qweight.data_ptr(), scales.data_ptr(), None if offsets is None else offsets.data_ptr(),
                   int(scheme.name == "nf4"), x2.data_ptr(), y.data_ptr(), code, scratch,
                   rows, out_features, in_features, scheme.group_size)
    return y.view(*x.shape[:-1], out_features)


def _as_laid_out(tensors: Dict[str, torch.Tensor], scheme, out_features: int, in_features: int) -> bool:
    """Whether ``tensors`` are exactly the packed CPU tensors of an (out_features, in_features)
    matrix in ``scheme``'s format, contiguous, as the C kernels read them."""
    if set(tensors) != set(scheme.tensor_names()):
        return False
    dtypes, shapes = scheme.dtypes(), scheme.shapes(out_features, in_features)
    return all(t.device.type == "cpu" and t.is_contiguous() and t.dtype is dtypes[name] and t.shape == shapes[name]
               for name, t in tensors.items())


def _expanded_product(x: torch.Tensor, tensors: Dict[str, torch.Tensor], scheme, rows: int, out_features: int,
                      in_features: int) -> Optional[torch.Tensor]:
    """``quant_gemv`` through the expansion (float32 sums of the bf16-rounded activations, returned
    in x's dtype), or None where the tensors are not as the format lays them out or memory ran out."""
    if not _as_laid_out(tensors, scheme, out_features, in_features):
        return None
    x2 = x.reshape(rows, in_features)
    x2 = x2.contiguous() if x.dtype in (torch.float32, torch.bfloat16) else x2.float()
    y = torch.empty((rows, out_features), dtype=torch.float32)
    offsets = tensors.get("offsets")
    scratch = scratch_floats(panel_scratch_floats_needed(rows, in_features))
    bf16 = x2.dtype is torch.bfloat16
    status = quant_product()(_KIND_CODES[scheme.name], tensors["qweight"].data_ptr(), tensors["scales"].data_ptr(),
                             None if offsets is None else offsets.data_ptr(), None if bf16 else x2.data_ptr(),
                             x2.data_ptr() if bf16 else None, scratch.data_ptr(), y.data_ptr(), rows, out_features,
                             in_features, scheme.group_size or 0)
    if status != 0:
        return None
    return y.to(x.dtype).view(*x.shape[:-1], out_features)



def dequantize_rows(tensors: Dict[str, torch.Tensor], scheme, in_features: int) -> Optional[torch.Tensor]:
    """The float32 (rows, in_features) weight the packed CPU ``tensors`` (a block of rows) stand
    for, expanded by the native kernel with the arithmetic of quant.formats.dequantize; None when
    the kernel does not apply (callers then use that function)."""
    kernels = _kernels()
    if kernels is None or scheme.name not in _KIND_CODES or "qweight" not in tensors or \
            not _as_laid_out(tensors, scheme, tensors["qweight"].shape[0], in_features):
        return None
    qweight, scales, offsets = tensors["qweight"], tensors["scales"], tensors.get("offsets")
    out = torch.empty((qweight.shape[0], in_features), dtype=torch.float32)
    kernels[2](qweight.data_ptr(), scales.data_ptr(), None if offsets is None else offsets.data_ptr(),
               _KIND_CODES[scheme.name], out.data_ptr(), qweight.shape[0], in_features, scheme.group_size or 0)
    return out
