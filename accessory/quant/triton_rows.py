"""Products of a few activation rows (decode steps) with packed weights on a CUDA GPU: one Triton
kernel that reads each packed byte once and expands it in registers.

A decode step's products are a read of the weights; what a packed format saves is bytes, and the
kernels it replaces did not turn that into time on the GPU (7B on an H200, one stream, CUDA graphs:
bf16 190.7 tok/s through cuBLAS, int4 through tinygemm 206.8, nf4 through bitsandbytes 166.6, and
int8, which had no kernel, expanded each matrix per call: ~140 us for a 4096 x 4096 product). Here
every scheme is one kernel: int8 codes times the row's scale, int4 ``q * scale + offset`` and nf4
``NF4[q] * scale`` per group, in float32 as ``formats.dequantize`` computes them, then one row
(float32 multiply-adds) or up to ``MAX_ROWS`` rows (``tl.dot`` on float32 operands: exact for a
float32 model, else tf32 tensor cores, whose 10-bit mantissa holds bf16 and fp16 activations
exactly and rounds the expanded weights more finely than a bf16 product of them would).

Layouts are formats.py's: int8 ``(out, in)`` codes and a float32 scale per row; 4-bit codes two per
byte, byte ``j`` of each 32-input block holding input ``j`` (low nibble) and ``j + 16`` (high), fp16
scales (and int4 offsets) per group of ``group_size`` inputs.

Off by default (``ACCESSORY_TRITON=1`` turns it on, where Triton, which ships with torch's CUDA
wheels, can be imported): it was written and checked against the formats' arithmetic in Triton's
interpreter, on the CPU, in a session whose GPU loans had paused; tests/test_cuda.py and
benchmarks/cuda_quant_rows.py are ready for its first run on a GPU, which decides its block sizes
and whether it becomes the default.
"""

from typing import Dict, Optional, Tuple

import torch

from ..kernels import switched_on

#: the most activation rows one call takes (a decode step of up to this many streams); longer
#: inputs (prompts) are compute-bound and take the expansion and the GPU's dense product
MAX_ROWS = 16

_KINDS = {"int8": 0, "int4": 1, "nf4": 2}
_kernel = None
_unavailable = False


def kernel():
    """The jitted kernel (``_triton_rows_kernel``, imported on first use), or None where Triton
    cannot be imported (torch's CUDA wheels ship it; CPU-only installs usually do not)."""
    global _kernel, _unavailable
    if _kernel is None and not _unavailable:
        try:
            from ._triton_rows_kernel import packed_rows_kernel
        except ImportError:
            _unavailable = True
        else:
            _kernel = packed_rows_kernel
    return _kernel


def available() -> bool:
    """Whether quant/cuda.py sends decode-sized products here: ``ACCESSORY_TRITON`` set to 1
    (true, yes, on) and Triton importable."""
    return switched_on("ACCESSORY_TRITON") and kernel() is not None


#: (outputs per program, inputs per step, warps) for one activation row and for more (up to
#: MAX_ROWS): first guesses, to be measured with benchmarks/cuda_quant_rows.py --sweep
BLOCKS = {"one": (16, 256, 4), "many": (32, 128, 4)}


def takes(x: torch.Tensor, scheme_name: str, in_features: int) -> bool:
    """Whether :func:`packed_rows` computes this product (rows, dtype, device, scheme)."""
    rows = x.numel() // in_features if in_features else 0
    return (available() and x.is_cuda and scheme_name in _KINDS and 1 <= rows <= MAX_ROWS
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _precision(x: torch.Tensor) -> str:
    """tl.dot's precision for these activations: exact for float32 (and on GPUs before Ampere,
    which have no tf32), else tf32."""
    if x.dtype == torch.float32 or (x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0)):
        return "ieee"
    return "tf32"


def packed_rows(x: torch.Tensor, packed: Dict[str, torch.Tensor], scheme, out_features: int,
                in_features: int, levels: Optional[torch.Tensor] = None,
                blocks: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """``x @ W.T`` (x: (..., in_features), at most MAX_ROWS rows, on the GPU) for the packed W, in
    x's dtype. ``levels``: nf4's 16 levels (float32) on x's device. ``blocks``: BLOCKS' entry to
    use instead (benchmarks)."""
    flat = x.reshape(-1, in_features)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    kind = _KINDS[scheme.name]
    q, s = packed["qweight"], packed["scales"]
    o = packed.get("offsets", s)
    if levels is None:
        levels = s  # (unused: int8 / int4)
    n, k, warps = blocks or BLOCKS["one" if rows == 1 else "many"]
    block_m = 1 if rows == 1 else 16
    if kind != 0:
        k = max(32, k - k % 32)  # whole blocks of 32 inputs
    group = scheme.group_size or in_features
    kernel()[(-(-out_features // n),)](
        flat, q, s, o, levels, y, rows, out_features, in_features, group, flat.stride(0), y.stride(0),
        KIND=kind, BLOCK_M=block_m, BLOCK_N=n, BLOCK_K=k,
        PRECISION=_precision(x), num_warps=warps)
    return y.view(*x.shape[:-1], out_features)
