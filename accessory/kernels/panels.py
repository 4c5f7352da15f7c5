"""bf16 weights in 16-row panels, and their products (gemv_bf16_panels.c, CPUs with AVX512-BF16).

A panel holds 16 consecutive output rows of a (out_features, in_features) weight as pairs of
inputs: pair p is the 16 rows' inputs 2p and 2p + 1, 64 bytes, so the panel is one sequential
stream that a single instruction multiplies 16 rows at a time. Over this layout the products of
2-16 token rows (batched decoding) run 1.1-1.5x faster than the row-major kernel's, weights read
from memory (``benchmarks/panels.py``, numbers in ``benchmarks/README.md``); a weight is meant to
be either row-major or in panels, never both, so no memory is spent twice.

Where the kernels cannot run (no AVX512-BF16, no compiler, ``ACCESSORY_NATIVE_KERNELS=0``) the
same functions work in torch: the layout is a reshape and a permute away from row-major.

The model's bf16 linear layers hold their weights this way on such CPUs
(``model.layers.panel_linear``), and the native decode step reads them so.
"""

import ctypes
from typing import Optional

import torch

from . import cpu_supports_avx512_bf16, load_library, scratch_floats

PANEL_ROWS = 16
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_library: Optional[ctypes.CDLL] = None
_loaded = False


def _kernels() -> Optional[ctypes.CDLL]:
    global _library, _loaded
    if not _loaded:
        library = load_library("gemv_bf16_panels") if cpu_supports_avx512_bf16() else None
        if library is not None:
            for name, argtypes, restype in (
                    ("accessory_packed_bf16_scratch_floats", [_I64, _I64], _I64),
                    ("accessory_pack_bf16", [_P, _P, _I64, _I64], None),
                    ("accessory_unpack_bf16", [_P, _P, _I64, _I64], None),
                    ("accessory_packed_bf16", [_P] * 4 + [_I64] * 3, None),
                    ("accessory_packed_bf16_f32", [_P] * 4 + [_I64] * 3, None),
                    ("accessory_quant_panels", [ctypes.c_int] + [_P] * 7 + [_I64] * 4, ctypes.c_int)):
                function = getattr(library, name)
                function.argtypes, function.restype = argtypes, restype
        _library, _loaded = library, True
    return _library


def panels_available() -> bool:
    """Whether this machine can build and run the panel kernels (AVX512-BF16 and a C compiler)."""
    return _kernels() is not None


def _check_weight(weight: torch.Tensor, name: str) -> None:
    if weight.dtype is not torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError(f"{name}: a 2-D bf16 CPU tensor is needed, got {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")


def _padded_shape(out_features: int, in_features: int) -> tuple:
    """The weight's shape as its panels hold it: rows rounded up to 16, inputs to an even count."""
    return -(-out_features // PANEL_ROWS) * PANEL_ROWS, -(-in_features // 2) * 2


def panel_elements(out_features: int, in_features: int) -> int:
    """bf16 elements the panels of an (out_features, in_features) weight take (the padding zeros)."""
    rows, inputs = _padded_shape(out_features, in_features)
    return rows * inputs


def _panel_view(padded: torch.Tensor) -> torch.Tensor:
    """(rows16, inputs2) row-major -> (panels, pairs, 16, 2): the panel order, as a view."""
    rows, inputs = padded.shape
    return padded.view(rows // PANEL_ROWS, PANEL_ROWS, inputs // 2, 2).permute(0, 2, 1, 3)


def pack(weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The panels (1-D bf16) of a row-major (out_features, in_features) bf16 weight, written into
    ``out`` when given (``panel_elements`` contiguous bf16 CPU elements, e.g. a slice of a larger
    run) and returned."""
    _check_weight(weight, "pack")
    library, weight = _kernels(), weight.contiguous()
    out_features, in_features = weight.shape
    if out is not None:
        _check_panels(out, out_features, in_features)
    if library is None:
        padded = torch.zeros(_padded_shape(out_features, in_features), dtype=torch.bfloat16)
        padded[:out_features, :in_features] = weight
        panels = _panel_view(padded).contiguous().view(-1)
        return panels if out is None else out.copy_(panels)
    panels = torch.empty(panel_elements(out_features, in_features), dtype=torch.bfloat16) if out is None else out
    library.accessory_pack_bf16(weight.data_ptr(), panels.data_ptr(), out_features, in_features)
    return panels


def _check_panels(panels: torch.Tensor, out_features: int, in_features: int) -> None:
    expected = panel_elements(out_features, in_features)
    if panels.dtype is not torch.bfloat16 or panels.device.type != "cpu" or not panels.is_contiguous() \
            or panels.numel() != expected:
        raise ValueError(f"panels of a ({out_features}, {in_features}) weight are {expected} contiguous bf16 "
                         f"CPU elements (kernels.panels.pack), got {panels.numel()} {panels.dtype} on "
                         f"{panels.device}")


def unpack(panels: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The row-major (out_features, in_features) weight back from its panels (bit-identical)."""
    _check_panels(panels, out_features, in_features)
    library = _kernels()
    if library is None:
        rows, inputs = _padded_shape(out_features, in_features)
        padded = panels.view(rows // PANEL_ROWS, inputs // 2, PANEL_ROWS, 2).permute(0, 2, 1, 3).reshape(rows, inputs)
        return padded[:out_features, :in_features].contiguous()
    weight = torch.empty((out_features, in_features), dtype=torch.bfloat16)
    library.accessory_unpack_bf16(panels.data_ptr(), weight.data_ptr(), out_features, in_features)
    return weight


def panel_linear(x: torch.Tensor, panels: torch.Tensor, out_features: int,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T + bias`` for W given as panels: x (..., in_features) bf16 or float32 on the CPU,
    the result in x's dtype. The activations are rounded to bf16 and the sums kept in float32, as
    torch's bf16 product does; the bias is added to the float32 sums, which are rounded once."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32) or x.dim() == 0:
        raise ValueError(f"panel_linear: x must be a bf16 or float32 CPU tensor, got {x.dtype} on {x.device}")
    library, in_features = _kernels(), x.shape[-1]
    _check_panels(panels, out_features, in_features)
    if library is None:  # the bf16-rounded rows in float32 against the weight: the kernel's arithmetic
        weight = unpack(panels, out_features, in_features).float()
        y = x.bfloat16().float() @ weight.T
        return (y if bias is None else y + bias.float()).to(x.dtype)
    rows = x.numel() // in_features if in_features else 0
    y = torch.empty((rows, out_features), dtype=torch.float32)
    if rows and out_features:
        x2 = x.reshape(rows, in_features).contiguous()
        scratch = scratch_floats(scratch_floats_needed(rows, in_features))
        function = library.accessory_packed_bf16 if x.dtype is torch.bfloat16 else library.accessory_packed_bf16_f32
        function(panels.data_ptr(), x2.data_ptr(), scratch.data_ptr(), y.data_ptr(), rows, out_features, in_features)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def scratch_floats_needed(rows: int, in_features: int) -> int:
    """Float32 scratch a product of ``rows`` activation rows needs (0 where the library cannot run)."""
    library = _kernels()
    return library.accessory_packed_bf16_scratch_floats(rows, in_features) if library is not None else 0


def float32_product():
    """The library's ``accessory_packed_bf16_f32`` (panels, float32 x, scratch, float32 y, rows,
    out_features, in_features), as the native decode step calls it, or None."""
    library = _kernels()
    return library.accessory_packed_bf16_f32 if library is not None else None


def quant_product():
    """The library's ``accessory_quant_panels`` (kind: 0 int8, 1 int4, 2 nf4; codes, scales,
    offsets, float32 x or bf16 x (the other None), scratch as for ``scratch_floats_needed``,
    float32 y, rows, out_features, in_features, group size; 0, or -1 with y unwritten when out of
    memory): packed weights expanded to bf16 16 rows at a time, or None."""
    library = _kernels()
    return library.accessory_quant_panels if library is not None else None
