"""Weight-only quantization formats: quantize a (out, in) weight matrix, and the exact inverse.

Every format keeps whole output rows together (a row of the packed tensors belongs to one output
feature), so row slices of a quantized matrix are the quantized row slices: fusing q/k/v, cutting
column-parallel weights across ranks and concatenating are all plain row operations.

* ``int8``: symmetric, one float32 scale per output row: ``w = q * scale``, ``q`` in [-127, 127].
* ``int4``: asymmetric, groups of ``group_size`` inputs per row, fp16 ``scale`` and ``offset`` per
  group: ``w = q * scale + offset``, ``q`` in [0, 15] (the group's minimum maps to 0, its maximum
  to 15).
* ``nf4``: QLoRA's 4-bit normal-float levels, symmetric, one fp16 absmax ``scale`` per group:
  ``w = NF4[q] * scale``.

4-bit codes are packed two per byte per block of 32 inputs: byte ``j`` of a block holds code ``j``
in its low nibble and code ``j + 16`` in its high nibble (the layout kernels/gemv_quant.c reads).
"""

from dataclasses import dataclass
from typing import Dict

import torch

SCHEMES = ("int8", "int4", "nf4")
DEFAULT_GROUP_SIZE = {"int4": 32, "nf4": 64}

NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


@dataclass(frozen=True)
class QuantScheme:
    """Which format, and for the 4-bit ones the number of inputs sharing a scale."""
    name: str
    group_size: int = 0

    def __post_init__(self):
        if self.name not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.name!r}: use one of {', '.join(SCHEMES)}")
        if self.name == "int8":
            object.__setattr__(self, "group_size", 0)
        else:
            if not self.group_size:
                object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE[self.name])
            if self.group_size % 32 or self.group_size <= 0:
                raise ValueError(f"group_size {self.group_size} for {self.name}: use a positive multiple of "
                                 f"32 (32, 64 or 128)")

    @property
    def bits(self) -> int:
        return 8 if self.name == "int8" else 4

    def supports(self, in_features: int) -> bool:
        """Whether a matrix with this many inputs can be stored in this format."""
        return self.name == "int8" or in_features % self.group_size == 0

    def tensor_names(self):
        return {"int8": ("qweight", "scales"), "int4": ("qweight", "scales", "offsets"),
                "nf4": ("qweight", "scales")}[self.name]

    def shapes(self, out_features: int, in_features: int) -> Dict[str, tuple]:
        if self.name == "int8":
            return {"qweight": (out_features, in_features), "scales": (out_features,)}
        groups = in_features // self.group_size
        shapes = {"qweight": (out_features, in_features // 2), "scales": (out_features, groups)}
        if self.name == "int4":
            shapes["offsets"] = (out_features, groups)
        return shapes

    def dtypes(self) -> Dict[str, torch.dtype]:
        if self.name == "int8":
            return {"qweight": torch.int8, "scales": torch.float32}
        return {"qweight": torch.uint8, "scales": torch.float16, "offsets": torch.float16}

    def to_json(self) -> dict:
        return {"scheme": self.name, **({"group_size": self.group_size} if self.group_size else {})}

    @classmethod
    def from_json(cls, data: dict) -> "QuantScheme":
        return cls(data["scheme"], int(data.get("group_size", 0)))


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes in [0, 15] -> (out, in/2) uint8, per the block-of-32 layout above."""
    out_features, in_features = codes.shape
    blocks = codes.to(torch.uint8).view(out_features, in_features // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out_features, in_features // 2)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    out_features, half = packed.shape
    blocks = packed.view(out_features, half // 16, 16)
    return torch.stack([blocks & 0x0F, blocks >> 4], dim=2).reshape(out_features, half * 2)


def quantize(weight: torch.Tensor, scheme: QuantScheme) -> Dict[str, torch.Tensor]:
    """The packed tensors of ``weight`` (out, in) in ``scheme`` (computed in float32, on the
    weight's device, row block by row block to bound the temporary memory)."""
    if weight.dim() != 2:
        raise ValueError(f"only 2-d weight matrices can be quantized, got shape {tuple(weight.shape)}")
    if not scheme.supports(weight.shape[1]):
        raise ValueError(f"{scheme.name} with group_size {scheme.group_size} needs the input size "
                         f"({weight.shape[1]}) to be a multiple of it")
    pieces = [_quantize_rows(weight[start:start + 1024].float(), scheme)
              for start in range(0, weight.shape[0], 1024)]
    return {name: torch.cat([p[name] for p in pieces]) for name in pieces[0]}


def _quantize_rows(w: torch.Tensor, scheme: QuantScheme) -> Dict[str, torch.Tensor]:
    if scheme.name == "int8":
        scale = w.abs().amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": scale}
    rows, cols = w.shape
    groups = w.view(rows, cols // scheme.group_size, scheme.group_size)
    if scheme.name == "int4":
        low, high = groups.amin(dim=2), groups.amax(dim=2)
        scale = ((high - low) / 15).to(torch.float16)
        offset = low.to(torch.float16)
        # codes from the stored (fp16-rounded) scale and offset, so dequantization is consistent
        s, z = scale.float(), offset.float()
        safe = torch.where(s > 0, s, torch.ones_like(s))
        codes = torch.round((groups - z[..., None]) / safe[..., None]).clamp_(0, 15)
        return {"qweight": _pack_nibbles(codes.view(rows, cols)), "scales": scale, "offsets": offset}
    absmax = groups.abs().amax(dim=2).to(torch.float16)
    s = absmax.float()
    normalised = groups / torch.where(s > 0, s, torch.ones_like(s))[..., None]
    levels = nf4_levels(w.device)
    # nearest level: the levels are sorted, so compare with the midpoints between neighbours
    codes = torch.bucketize(normalised, (levels[1:] + levels[:-1]) / 2)
    return {"qweight": _pack_nibbles(codes.view(rows, cols)), "scales": absmax}


_NF4_ON_DEVICE: Dict[torch.device, torch.Tensor] = {}


def nf4_levels(device: torch.device) -> torch.Tensor:
    """``NF4_LEVELS`` on ``device``, copied there once: a copy from the CPU each call would cost a
    transfer per product, and is not allowed while a CUDA graph is being captured."""
    levels = _NF4_ON_DEVICE.get(device)
    if levels is None:
        levels = _NF4_ON_DEVICE[device] = NF4_LEVELS.to(device)
    return levels


def dequantize(tensors: Dict[str, torch.Tensor], scheme: QuantScheme,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight the packed ``tensors`` stand for, in ``dtype``."""
    if scheme.name == "int8":
        return (tensors["qweight"].float() * tensors["scales"].float()[:, None]).to(dtype)
    codes = _unpack_nibbles(tensors["qweight"])
    rows, cols = codes.shape
    groups = codes.view(rows, cols // scheme.group_size, scheme.group_size)
    scale = tensors["scales"].float()[..., None]
    if scheme.name == "int4":
        values = groups.float() * scale + tensors["offsets"].float()[..., None]
    else:
        values = nf4_levels(codes.device)[groups.long()] * scale
    return values.view(rows, cols).to(dtype)
