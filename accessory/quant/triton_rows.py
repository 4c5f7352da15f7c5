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

import os
from typing import Dict, Optional, Tuple

import torch

try:  # (torch's CUDA wheels ship it; CPU-only installs usually do not)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

#: the most activation rows one call takes (a decode step of up to this many streams); longer
#: inputs (prompts) are compute-bound and take the expansion and the GPU's dense product
MAX_ROWS = 16

_KINDS = {"int8": 0, "int4": 1, "nf4": 2}


def available() -> bool:
    """Whether quant/cuda.py sends decode-sized products here: Triton imported and
    ``ACCESSORY_TRITON`` set to 1 (true, yes, on)."""
    return triton is not None and os.environ.get("ACCESSORY_TRITON", "0").strip().lower() in ("1", "true", "yes", "on")


#: (outputs per program, inputs per step, warps) for one activation row and for more (up to
#: MAX_ROWS): first guesses, to be measured with benchmarks/cuda_quant_rows.py --sweep
BLOCKS = {"one": (16, 256, 4), "many": (32, 128, 4)}


if triton is not None:
    @triton.jit
    def _packed_rows_kernel(x_ptr, q_ptr, s_ptr, o_ptr, levels_ptr, y_ptr, M, N, K, G, stride_x, stride_y,
                            KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rm = tl.arange(0, BLOCK_M)
        m_ok = rm < M
        if BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if KIND == 0:  # int8: (N, K) codes; the row's scale multiplies the sums
            rk = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + rk
                k_ok = k < K
                w = tl.load(q_ptr + rn[:, None].to(tl.int64) * K + k[None, :],
                            mask=n_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
                if BLOCK_M == 1:
                    x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                    acc += tl.sum(w * x[None, :], axis=1)
                else:
                    x = tl.load(x_ptr + rm[:, None] * stride_x + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                                other=0.0).to(tl.float32)
                    acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
            scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            if BLOCK_M == 1:
                acc = acc * scale
            else:
                acc = acc * scale[None, :]
        else:  # int4 / nf4: byte i of a step holds inputs (i // 16) * 32 + i % 16 and 16 after it
            ri = tl.arange(0, BLOCK_K // 2)
            block_start = (ri // 16) * 32
            within = ri % 16
            groups = K // G
            for k0 in range(0, K, BLOCK_K):
                k_lo = k0 + block_start + within
                k_ok = k_lo < K
                wmask = n_ok[:, None] & k_ok[None, :]
                codes = tl.load(q_ptr + rn[:, None].to(tl.int64) * (K // 2) + (k0 // 2 + ri)[None, :],
                                mask=wmask, other=0)
                lo = codes & 0x0F
                hi = codes >> 4
                group = (k0 + block_start) // G
                where = rn[:, None].to(tl.int64) * groups + group[None, :]
                scale = tl.load(s_ptr + where, mask=wmask, other=0.0).to(tl.float32)
                if KIND == 1:
                    offset = tl.load(o_ptr + where, mask=wmask, other=0.0).to(tl.float32)
                    w_lo = lo.to(tl.float32) * scale + offset
                    w_hi = hi.to(tl.float32) * scale + offset
                else:
                    w_lo = tl.load(levels_ptr + lo.to(tl.int32)) * scale
                    w_hi = tl.load(levels_ptr + hi.to(tl.int32)) * scale
                if BLOCK_M == 1:
                    x_lo = tl.load(x_ptr + k_lo, mask=k_ok, other=0.0).to(tl.float32)
                    x_hi = tl.load(x_ptr + k_lo + 16, mask=k_ok, other=0.0).to(tl.float32)
                    acc += tl.sum(w_lo * x_lo[None, :] + w_hi * x_hi[None, :], axis=1)
                else:
                    xmask = m_ok[:, None] & k_ok[None, :]
                    x_lo = tl.load(x_ptr + rm[:, None] * stride_x + k_lo[None, :], mask=xmask, other=0.0)
                    x_hi = tl.load(x_ptr + rm[:, None] * stride_x + (k_lo + 16)[None, :], mask=xmask, other=0.0)
                    acc += tl.dot(x_lo.to(tl.float32), tl.trans(w_lo), input_precision=PRECISION)
                    acc += tl.dot(x_hi.to(tl.float32), tl.trans(w_hi), input_precision=PRECISION)
        if BLOCK_M == 1:
            tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
        else:
            tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])


def takes(x: torch.Tensor, scheme_name: str, in_features: int) -> bool:
    """Whether :func:`packed_rows` computes this product (rows, dtype, device, scheme)."""
    rows = x.numel() // in_features if in_features else 0
    return (available() and x.is_cuda and scheme_name in _KINDS and 1 <= rows <= MAX_ROWS
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


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
    _packed_rows_kernel[(triton.cdiv(out_features, n),)](
        flat, q, s, o, levels, y, rows, out_features, in_features, group, flat.stride(0), y.stride(0),
        KIND=kind, BLOCK_M=block_m, BLOCK_N=n, BLOCK_K=k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps)
    return y.view(*x.shape[:-1], out_features)
