"""``linear(x, weight, bias)``: ``F.linear`` with a faster CPU path for decode-sized bf16 inputs.

Decoding multiplies one (or a few) token vectors by every weight matrix, so its speed is the speed
of reading the weights. torch's bf16 matrix-vector product on CPU reads them well below the memory
bandwidth; the native kernels stream each row once: gemv_bf16.c (AVX2, the weights widened to
float32) everywhere, gemv_bf16_avx512.c (AVX512-BF16 dot products) where the CPU has them (see
``kernels.bf16_library``). Used when the input is on the CPU, both tensors are bf16 and
contiguous, and at most :func:`max_kernel_rows` token vectors come in: ``MAX_ROWS`` on CPUs with
AMX, ``MAX_ROWS_AVX512_BF16`` with the AVX512-BF16 kernel and no AMX, and
``MAX_ROWS_WITHOUT_NATIVE_BF16`` on CPUs without native bf16 arithmetic, where the AVX2 kernel's
batched form is the faster way to multiply prompt-sized inputs too.

Longer inputs (long prompts) on CPUs without native bf16 arithmetic (no AVX512-BF16 or AMX)
widen the weight to float32 a block of rows at a time and use torch's float32 product: torch's
bf16 matrix product there runs about 4x slower than float32 (measured 0.32 s vs 0.08 s for 128 x
2048 @ 2048 x 5632 on one AVX2 core), and a block of a few MB stays in cache while it is used.
"""

import ctypes
import functools
from typing import Callable

import torch
import torch.nn.functional as F

from . import bf16_library, cpu_flags, scratch_floats

MAX_ROWS = 16
# Without native bf16 arithmetic the kernel's batched form also beats widening the weight for
# torch's float32 product up to this many rows (measured on the 2-core AVX2 machine of
# benchmarks/README.md, S-shaped products: 2x at 32 rows, 1.15-1.2x at 128, even at 256, 8% slower
# at 512 rows). Its per-thread scratch then holds up to 256 x in_features floats (11 MB for a 7B
# model's down projection).
MAX_ROWS_WITHOUT_NATIVE_BF16 = 256
# With AVX512-BF16 (gemv_bf16_avx512.c) and no AMX, the kernel beats torch's bf16 product (oneDNN)
# up to this many rows (measured on the 2-core Zen 4 machine of benchmarks/README.md, XS and S
# shapes: 1.3-1.7x at 32 rows, 1.0-1.3x at 64, 0.9-1.05x at 128). Where the CPU has AMX, torch's
# product takes over from MAX_ROWS rows, as before (AMX tiles were not measured here).
MAX_ROWS_AVX512_BF16 = 64

_function = None
_scratch_function = None
_kernel_name = None
_loaded = False


def _kernel():
    global _function, _scratch_function, _kernel_name, _loaded
    if not _loaded:
        _kernel_name, library = bf16_library()
        if library is not None:
            _function = library.accessory_gemv_bf16
            _function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
            _function.restype = None
            _scratch_function = library.accessory_gemv_bf16_scratch_floats
            _scratch_function.argtypes = [ctypes.c_int64] * 2
            _scratch_function.restype = ctypes.c_int64
        _loaded = True
    return _function


def scratch_floats_needed(rows: int, in_features: int) -> int:
    """Float32 scratch the bf16 kernels (``accessory_gemv_bf16`` and ``_f32``) need for ``rows``
    activation rows, as the kernel states it (0 when the kernel is unavailable)."""
    return _scratch_function(rows, in_features) if _kernel() is not None else 0


def native_linear_available() -> bool:
    """Whether the native bf16 kernel could be built and loaded on this machine."""
    return _kernel() is not None


def max_kernel_rows() -> int:
    """The most token rows :func:`linear` gives the native kernel (0 when there is none): beyond,
    torch's product, or on CPUs without native bf16 the weight widened to float32 for torch."""
    if _kernel() is None:
        return 0
    if not cpu_has_native_bf16():
        return MAX_ROWS_WITHOUT_NATIVE_BF16
    if _kernel_name == "gemv_bf16_avx512" and "amx_bf16" not in (cpu_flags() or ()):
        return MAX_ROWS_AVX512_BF16
    return MAX_ROWS


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo;
    True where that cannot be told, so torch's own product is kept."""
    flags = cpu_flags()
    return flags is None or "avx512_bf16" in flags or "amx_bf16" in flags


WIDEN_BLOCK_FLOATS = 1 << 20  # float32 elements of weight widened at a time (4 MB)


def linear_in_float32_blocks(x: torch.Tensor, out_features: int, weight_rows: Callable[[int, int], torch.Tensor],
                             bias=None, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x @ W.T + bias`` computed a block of W's rows at a time, where ``weight_rows(start, stop)``
    gives rows start..stop-1 of W in float32 (a few MB each, so a block stays in cache while it is
    used); the products in ``compute_dtype`` (float32, or bf16 on CPUs whose torch product is
    faster in bf16: the block is rounded to it), the result in ``x``'s dtype."""
    in_features = x.shape[-1]
    xc = x.reshape(-1, in_features).to(compute_dtype)
    out = torch.empty((xc.shape[0], out_features), dtype=x.dtype, device=x.device)
    block = max(64, WIDEN_BLOCK_FLOATS // in_features)
    for start in range(0, out_features, block):
        stop = min(start + block, out_features)
        out[:, start:stop] = F.linear(xc, weight_rows(start, stop).to(compute_dtype),
                                      None if bias is None else bias[start:stop].to(compute_dtype))
    return out.view(*x.shape[:-1], out_features)


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``x @ weight.T + bias`` with the weight widened to float32 a block of rows at a time."""
    return linear_in_float32_blocks(x, weight.shape[0], lambda start, stop: weight[start:stop].float(), bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None, float32_out: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias``, through the native kernel when it applies. ``float32_out``: bf16
    inputs give their float32 sums unrounded (the kernel sums in float32 anyway; elsewhere torch's
    bf16 result widened)."""
    if (x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and x.device.type == "cpu"
            and weight.device.type == "cpu" and weight.is_contiguous() and not x.requires_grad
            and not weight.requires_grad):
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        kernel = _kernel() if 0 < rows <= max_kernel_rows() else None
        if kernel is not None:
            x2 = x.reshape(rows, x.shape[-1]).contiguous()
            out_features, in_features = weight.shape
            scratch = scratch_floats(scratch_floats_needed(rows, in_features))
            if bias is None and not float32_out:
                y = torch.empty((rows, out_features), dtype=torch.bfloat16)
                kernel(weight.data_ptr(), x2.data_ptr(), scratch.data_ptr(), y.data_ptr(), None, rows, out_features,
                       in_features)
            else:  # the bias added in float32, the sum rounded once (or not at all)
                y = torch.empty((rows, out_features), dtype=torch.float32)
                kernel(weight.data_ptr(), x2.data_ptr(), scratch.data_ptr(), None, y.data_ptr(), rows, out_features,
                       in_features)
                if bias is not None:
                    y = y.add_(bias)
                if not float32_out:
                    y = y.bfloat16()
            return y.view(*x.shape[:-1], out_features)
        if rows > MAX_ROWS and not cpu_has_native_bf16():
            y = widened_linear(x, weight, bias)
            return y.float() if float32_out else y
    y = F.linear(x, weight, bias)
    return y.float() if float32_out else y


class NativeLinear(torch.nn.Linear):
    """``nn.Linear`` whose forward goes through :func:`linear` (same parameters, same names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_native_linear(model: torch.nn.Module) -> int:
    """Route every plain ``nn.Linear`` of ``model`` through :func:`linear`; returns how many.

    Only the class of each module changes, so parameters, names and checkpoints are untouched.
    Does nothing (returns 0) when the native kernel is unavailable.
    """
    if not native_linear_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = NativeLinear
            count += 1
    return count
