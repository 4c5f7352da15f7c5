"""``QuantLinear``: a linear layer whose weight is stored packed (int8 / int4 / nf4).

The packed tensors are parameters (``requires_grad=False``) named ``qweight``, ``scales`` and, for
int4, ``offsets``, so a quantized model's ``state_dict()`` is its pre-quantized checkpoint and the
loader fills them like any other weight. A bias and the original's LoRA path (``lora_a``,
``lora_b``) stay in full precision beside them, under their usual names.

Products: on the CPU, up to ``kernels.quant.max_rows(scheme)`` token rows (decoding; int8 and
int4 also short prompts, up to 64; int4 up to 192 with the AVX512-VNNI library) go through the
native kernels, which read the packed bytes directly; on CPUs with AVX512-BF16, from
``kernels.quant.expand_from(scheme)`` rows on (int8 / int4 32, nf4 8), any number of them, the
matrix's rows are expanded to bf16 16 at a time, in cache, for bf16 dot products instead. Longer
inputs elsewhere, CUDA and CPUs without the kernels expand the matrix once per call, in row blocks,
into the activation dtype and use torch's matmul, a cost shared by all the rows of the call.
"""

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.linear import cpu_has_native_bf16, linear_in_float32_blocks
from ..kernels.quant import dequantize_rows, quant_gemv
from ..model.layers.fused import FusedViews, one_run, side_by_side, tied_parameters
from .cuda import cuda_matmul
from .formats import QuantScheme, dequantize, quantize
from .memory import in_huge_pages, return_freed_heap, zeros_in_huge_pages

_EXPAND_ROWS = 4096  # rows expanded at a time by the fallback, to bound its temporary memory


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = False,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        dtypes = scheme.dtypes()
        for name, shape in scheme.shapes(out_features, in_features).items():
            self.register_parameter(name, _frozen(torch.empty(shape, dtype=dtypes[name], device=device)))
        self.bias = _frozen(torch.zeros(out_features, device=device), keep_dtype=False) if bias else None
        self.lora_a = self.lora_b = None
        self._cuda_cache = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> "QuantLinear":
        """Quantize ``linear``'s weight; its bias and LoRA modules (if any) are kept as they are."""
        weight = linear.weight.detach()
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features, module.scheme = weight.shape[1], weight.shape[0], scheme
        module._cuda_cache = {}
        for name, tensor in quantize(weight, scheme).items():
            module.register_parameter(name, _frozen(tensor.contiguous()))
        module.bias = linear.bias
        module.lora_a = getattr(linear, "lora_a", None)
        module.lora_b = getattr(linear, "lora_b", None)
        return module

    @classmethod
    def shell_of(cls, linear: nn.Linear, scheme: QuantScheme) -> "QuantLinear":
        """An empty (meta-device) quantized layer with ``linear``'s shape, bias and LoRA modules:
        what a pre-quantized checkpoint is loaded into."""
        out_features, in_features = linear.weight.shape
        module = cls(in_features, out_features, scheme, bias=False, device="meta")
        module.bias = linear.bias
        module.lora_a = getattr(linear, "lora_a", None)
        module.lora_b = getattr(linear, "lora_b", None)
        return module

    def reset_parameters(self) -> None:
        """What ``strict=False`` gives parameters a checkpoint lacks: a zero bias (as the original's
        tuned biases start), and a zero weight if the packed tensors themselves are missing."""
        with torch.no_grad():
            for name in self.scheme.tensor_names():
                getattr(self, name).zero_()
            if self.bias is not None:
                self.bias.zero_()

    @property
    def packed(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.scheme.tensor_names()}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.packed, self.scheme, dtype)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.bfloat16()`` and the like move the packed tensors but never
        change their dtypes: the kernels read them by their format (fp16 scales cast to bf16 used to
        be read as fp16 bits, silently wrong). Bias and LoRA follow the cast as any parameter."""
        packed = {id(t) for t in self.packed.values()}

        def keep_format(t):
            applied = fn(t)
            if id(t) in packed and applied.dtype != t.dtype:
                return t.to(device=applied.device)
            return applied
        return super()._apply(keep_format, recurse)

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = quantized_matmul(x, self.packed, self.scheme, self.out_features, self.in_features,
                               self._cuda_cache)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        if self.lora_a is not None:
            out = out + self.lora_b(self.lora_a(x))
        return out

    def extra_repr(self) -> str:
        group = f", group_size={self.scheme.group_size}" if self.scheme.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.name}{group}, bias={self.bias is not None}")


def _frozen(tensor: torch.Tensor, keep_dtype: bool = True) -> nn.Parameter:
    """A parameter the loader fills in its own dtype (packed codes and scales are never cast)."""
    param = nn.Parameter(tensor, requires_grad=False)
    param.keep_dtype = keep_dtype
    return param


def quantized_matmul(x: torch.Tensor, packed: Dict[str, torch.Tensor], scheme: QuantScheme,
                     out_features: int, in_features: int, cuda_cache: Optional[dict] = None) -> torch.Tensor:
    """``x @ W.T`` for the packed W: the native CPU kernel or a CUDA kernel when one applies (see
    quant/cuda.py; ``cuda_cache`` holds its converted weights), else row-block expansion."""
    if x.device.type == "cuda" and cuda_cache is not None:
        out = cuda_matmul(x, packed, scheme, cuda_cache)
        if out is not None:
            return out
    out = quant_gemv(x, packed, scheme, out_features, in_features)
    if out is not None:
        return out
    if x.device.type == "cpu" and x.dtype is torch.bfloat16:
        # prefill: the rows expanded natively a few MB at a time and multiplied in float32 (on CPUs
        # without native bf16, as the bf16 prefill product) or in bf16 (torch's bf16 product is the
        # faster there); expanding the whole matrix with torch's element-wise operations cost 3x
        # the product itself (S int4, 128 tokens: 3.0 s of 3.9 on the Zen 4 machine)
        def rows(start: int, stop: int) -> torch.Tensor:
            block = {name: t[start:stop] for name, t in packed.items()}
            expanded = dequantize_rows(block, scheme, in_features)
            return expanded if expanded is not None else dequantize(block, scheme, torch.float32)
        return linear_in_float32_blocks(x, out_features, rows,
                                        compute_dtype=torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    compute_dtype = x.dtype if x.is_floating_point() else torch.float32
    if out_features <= _EXPAND_ROWS:
        return F.linear(x, dequantize(packed, scheme, compute_dtype))
    pieces = []
    for start in range(0, out_features, _EXPAND_ROWS):
        rows = {name: t[start:start + _EXPAND_ROWS] for name, t in packed.items()}
        pieces.append(F.linear(x, dequantize(rows, scheme, compute_dtype)))
    return torch.cat(pieces, dim=-1)


class FusedQuantLinear(FusedViews):
    """Several QuantLinears sharing one input, concatenated by rows into one packed matrix; each
    original module's tensors become views of its rows (see ``layers.linear.fuse_linears``)."""

    def __init__(self, modules: Sequence[QuantLinear]):
        scheme = modules[0].scheme
        self.scheme, self.in_features = scheme, modules[0].in_features
        self.sizes = [m.out_features for m in modules]
        self.out_features = sum(self.sizes)
        self.packed = {}
        for name in scheme.tensor_names():
            parts = [getattr(m, name).detach() for m in modules]
            run = one_run(parts)  # (laid out one after another by packed_in_huge_pages: a view)
            fused = torch.cat(parts, dim=0) if run is None else run.view(-1, *parts[0].shape[1:])
            self.packed[name] = fused
            start = 0
            for module, rows in zip(modules, self.sizes):
                setattr(module, name, _frozen(fused[start:start + rows]))
                start += rows
        self.watch_views(modules, "qweight")
        self._cuda_cache = {}
        if fused.device.type == "cpu":
            return_freed_heap(0)  # the separate matrices just freed (see quant/memory.py)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_matmul(x, self.packed, self.scheme, self.out_features, self.in_features,
                                self._cuda_cache)


def packed_in_huge_pages(model: nn.Module) -> int:
    """Copy the packed tensors of ``model``'s CPU ``QuantLinear`` layers into allocations in 2 MiB
    pages (``quant.memory.zeros_in_huge_pages``), one per dtype (``torch.save`` refuses tensors
    that view one storage as different types); returns how many tensors moved, 0 where the system
    gives no huge pages (or below one page's worth). Each allocation is laid out tensor name by
    tensor name (every ``qweight``, then every ``scales``, ...), the layers in ``side_by_side``
    order, so the layers a module fuses have each tensor one run that ``FusedQuantLinear`` views
    instead of concatenating. The pages are faulted in as they are written and each old tensor goes
    once copied, so the copy never holds both whole (what a low-memory load needs).

    The native products of every layer's matrices, one row, from memory, in 2 MiB pages against 4
    KiB (benchmarks/README.md, session 17): XS int8 1.18x, int4 1.10x; S int8 1.10x, int4 1.05x."""
    tied = tied_parameters(model)

    def movable(module) -> bool:
        return type(module) is QuantLinear and all(
            t.device.type == "cpu" and t.is_contiguous() and id(t) not in tied for t in module.packed.values())
    order = side_by_side(model, movable, lambda children: len({child.scheme for child in children}) == 1)
    names = list(dict.fromkeys(name for module in order for name in module.scheme.tensor_names()))
    places, sizes = {}, {}  # per dtype: [(module, tensor name, byte offset)], and the bytes so far
    for name in names:
        for module in order:
            tensor = module._parameters.get(name)
            if tensor is None:
                continue
            dtype, at = tensor.dtype, sizes.get(tensor.dtype, 0)
            if not places.get(dtype) or places[dtype][-1][1] != name:
                at = -(-at // 64) * 64  # (each name's run starts on a cache line)
            places.setdefault(dtype, []).append((module, name, at))
            sizes[dtype] = at + tensor.numel() * tensor.element_size()
    moved = 0
    for dtype, size in sizes.items():
        if not in_huge_pages(size):  # (a copy into ordinary memory would gain nothing)
            continue
        # (every offset and size a whole number of this dtype's elements)
        arena = zeros_in_huge_pages(size // dtype.itemsize, dtype, populate=False)
        for module, name, at in places[dtype]:
            tensor = module._parameters[name]
            first = at // dtype.itemsize
            part = arena[first:first + tensor.numel()].view(tensor.shape)
            part.copy_(tensor.detach())
            module._parameters[name] = _frozen(part, keep_dtype=getattr(tensor, "keep_dtype", True))
            del tensor  # (the old tensor's last reference)
            moved += 1
            if moved % 16 == 0:
                return_freed_heap()  # (the old tensors freed so far, back to the system as the copy goes)
    if moved:
        return_freed_heap(0)
    return moved


def fuse_quant_linears(modules: Sequence[nn.Module]) -> Optional[FusedQuantLinear]:
    """A :class:`FusedQuantLinear` over ``modules`` when all are bias- and LoRA-free QuantLinears of
    one scheme and input size on one device; else None."""
    if not all(type(m) is QuantLinear and m.bias is None and m.lora_a is None for m in modules):
        return None
    if len({(m.scheme, m.in_features, m.qweight.device) for m in modules}) != 1 or \
            any(m.qweight.is_meta for m in modules):
        return None
    return FusedQuantLinear(modules)
