"""CUDA products with packed weights.

With ``ACCESSORY_TRITON=1`` (off by default: not yet measured on a GPU), decode-sized products (up
to ``triton_rows.MAX_ROWS`` activation rows) of every scheme go through quant/triton_rows.py's
kernel, which reads the packed bytes once. Longer inputs (prompts), and every product otherwise:

* ``int4``: torch's "tinygemm" kernel (``torch._weight_int4pack_mm``): our codes and fp16
  scale/offset are converted once per layer and device into its layout: it computes
  ``(q - 8) * scale + zero``, so ``zero = offset + 8 * scale`` (kept in bf16).
* ``nf4``: bitsandbytes (as the original's ``--quant``), when installed: our values are expanded
  once and re-packed by ``bitsandbytes.functional.quantize_4bit`` with the same block size; as every
  value already lies on the NF4 grid of its block, the re-packing reproduces them.
* ``int8``, and the others without their kernel: None (the caller expands row blocks instead;
  torch's ``_weight_int8pack_mm`` ran slower than a bf16 product on an H100, so it is unused).

Measured on an H100 (bf16 activations, one token, 11008 x 4096 weight; bf16 ``F.linear`` 36 us):
tinygemm 17 us, bitsandbytes' NF4 ``matmul_4bit`` 30 us, ``_weight_int8pack_mm`` 259 us; the
Triton kernel against them: benchmarks/cuda_quant_rows.py.

The converted weights are cached beside the packed tensors (they are the source of truth, saved in
checkpoints), so a CUDA model that has run a prompt through tinygemm or bitsandbytes holds its
4-bit weights twice; still about half the bf16 size.
"""

import logging
from typing import Dict, Optional

import torch

from . import triton_rows
from .formats import nf4_levels

log = logging.getLogger(__name__)
_warned = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def cuda_matmul(x: torch.Tensor, packed: Dict[str, torch.Tensor], scheme, cache: dict) -> Optional[torch.Tensor]:
    qweight = packed["qweight"]
    if triton_rows.takes(x, scheme.name, x.shape[-1]):  # decode-sized: the packed bytes read once
        return triton_rows.packed_rows(x, packed, scheme, qweight.shape[0], x.shape[-1],
                                       levels=nf4_levels(x.device) if scheme.name == "nf4" else None)
    key = (scheme.name, qweight.device, qweight.data_ptr(), x.dtype)
    if cache.get("key") != key:
        cache.clear()
        cache["key"] = key
        cache["impl"] = _prepare(packed, scheme, x.dtype)
    impl = cache["impl"]
    return None if impl is None else impl(x)


def _prepare(packed, scheme, dtype):
    if scheme.name == "int4" and dtype == torch.bfloat16:
        return _tinygemm(packed, scheme)
    if scheme.name == "nf4":
        return _bitsandbytes(packed, scheme, dtype)
    return None


def _tinygemm(packed, scheme):
    from .formats import _unpack_nibbles
    codes = _unpack_nibbles(packed["qweight"])  # (out, in) in [0, 15]
    out_features, in_features = codes.shape
    inner_tiles = next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)
    # tinygemm takes groups of 32, 64, 128 or 256 inputs (formats.py allows any multiple of 32)
    if inner_tiles is None or scheme.group_size not in (32, 64, 128, 256) or not hasattr(torch, "_weight_int4pack_mm"):
        return None
    try:
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
        weight = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_tiles)
    except RuntimeError as exc:  # e.g. a GPU older than tinygemm supports
        _warn_once("tinygemm", f"int4 on CUDA falls back to expanding weights: {exc}")
        return None
    scale = packed["scales"].float()
    zero = packed["offsets"].float() + 8 * scale
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    group = scheme.group_size

    def run(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, in_features)
        out = torch._weight_int4pack_mm(flat.contiguous(), weight, group, scales_and_zeros)
        return out.view(*x.shape[:-1], out_features)
    return run


def _bitsandbytes(packed, scheme, dtype):
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        _warn_once("bnb", "nf4 on CUDA without bitsandbytes expands each weight per call (slow): "
                          "pip install bitsandbytes")
        return None
    from .formats import dequantize
    weight = dequantize(packed, scheme, torch.float32).to(dtype)
    qweight, state = bnb_functional.quantize_4bit(weight, blocksize=scheme.group_size, quant_type="nf4")
    del weight

    def run(x: torch.Tensor) -> torch.Tensor:
        return bnb.matmul_4bit(x, qweight.t(), quant_state=state)
    return run
