"""Convert a llama.cpp GGUF file of a Llama-architecture model into an Accessory checkpoint directory.

The result is what the original LLaMA2-Accessory writes for ``llama_type = "llama"``::

    consolidated.00-of-01.model.pth   torch.save({"model": state_dict}), keys prefixed ``llma.``
    config.json                       llama ModelArgs fields (dim, n_layers, ..., rope_theta)
    meta.json                         {"llama_type": "llama"}
    tokenizer.json                    for GPT-2-style byte-level BPE vocabularies (tokenizer.ggml.model "gpt2")
    tokenizer.model                   for SentencePiece vocabularies (tokenizer.ggml.model "llama")
    tokenizer_config.json             bos/eos tokens, add_bos_token, chat_template

Facts this relies on (llama.cpp's ``convert_hf_to_gguf.py`` and ``gguf-py``):

* GGUF lists a tensor's dims fastest-first (ggml ``ne``), so ``ne = [in, out]`` is a torch ``(out, in)``
  weight (``GGUFTensor.shape`` is the torch order).
* The HF -> GGUF converter permutes ``attn_q`` / ``attn_k`` rows from HF's rotate-half RoPE layout back to
  Meta's interleaved layout (pairs ``(x[2i], x[2i+1])``), which is what our ``llama`` uses, so the rows are
  copied as they are.
* A GGUF without ``output.weight`` ties the output head to ``token_embd.weight``.
"""
from __future__ import annotations

import json
import mmap
import os
import pathlib
import struct
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from accessory.errors import CheckpointError

__all__ = [
    "SUPPORTED_TENSOR_TYPES",
    "GGUFFile",
    "GGUFTensor",
    "convert_gguf",
    "convert_gguf_tokenizer",
    "ffn_args_for_hidden",
    "ffn_hidden_dim",
]

CHECKPOINT_FILE = "consolidated.00-of-01.model.pth"

# Weight types dequantized through gguf.quants.dequantize: the ones tests/test_gguf.py checks (the types of
# llama.cpp's Q2_K..Q8_0 presets). gguf-py knows more (IQ*, TQ*), but an untested layout is worse than a clear
# error.
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

# llama.cpp token types (the same numbers as sentencepiece's ModelProto.SentencePiece.Type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# GGUF tensor name -> Accessory `llama` parameter name (without the "llma." prefix)
_GLOBAL_TENSORS = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
}
# Present in some older GGUFs, derived from nothing a model needs: skipped.
_IGNORED_LAYER_TENSORS = {"attn_rot_embd"}


# ----------------------------------------------------------------------------------------------------------
# FFN width


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The FFN width the original ``llama`` FeedForward builds from ModelArgs (in channels)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_args_for_hidden(dim: int, hidden: int) -> tuple[int, float | None]:
    """``(multiple_of, ffn_dim_multiplier)`` that make the original ``llama`` build an FFN exactly ``hidden`` wide.

    The original computes ``F0 = int(2*4*dim/3)``, then ``int(ffn_dim_multiplier*F0)`` if a multiplier is
    set, then rounds *up* to a multiple of ``multiple_of``.  With ``multiple_of = hidden`` any pre-rounding
    width in ``(0, hidden]`` lands on ``hidden``; a multiplier is only needed to shrink F0 when it is wider.
    """
    if dim <= 0 or hidden <= 0:
        raise CheckpointError(f"FFN sizes must be positive, got dim={dim}, hidden={hidden}")
    f0 = int(2 * (4 * dim) / 3)
    multiplier = None if f0 <= hidden else hidden / f0
    if ffn_hidden_dim(dim, hidden, multiplier) != hidden:
        raise CheckpointError(
            f"cannot express an FFN width of {hidden} for dim {dim} with multiple_of/ffn_dim_multiplier")
    return hidden, multiplier


# ----------------------------------------------------------------------------------------------------------
# Reading GGUF files
#
# gguf-py's GGUFReader builds a numpy view per metadata item, which takes ~7 s for a 49k-token vocabulary with
# 49k merges; this small reader parses the same layout (GGUF v2/v3, little-endian) with struct in ~0.1 s and
# leaves dequantization to gguf-py.

_GGUF_MAGIC = b"GGUF"
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's header: ``ne`` lists dims fastest-first (GGUF order); ``shape`` is the torch order."""

    name: str
    ne: tuple[int, ...]
    type_name: str
    type_id: int
    offset: int  # bytes from the start of the file

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))


class GGUFFile:
    """A GGUF file's metadata (``self.metadata``, plain Python values) and tensor headers (``self.tensors``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file not found: {self.path}")
        with open(self.path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except CheckpointError:
            raise
        except (struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{self.path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc

    def _parse(self) -> None:
        buf = self._map
        if buf[:4] != _GGUF_MAGIC:
            raise CheckpointError(f"{self.path} is not a GGUF file (it does not start with b'GGUF')")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (only little-endian v2/v3; "
                                  "re-save old or big-endian files with a current llama.cpp)")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        self._pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (value_type,) = self._unpack("<I")
            self.metadata[key] = self._value(value_type)
        self.tensors: list[GGUFTensor] = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            ne = self._unpack(f"<{n_dims}Q")
            type_id, offset = self._unpack("<IQ")
            self.tensors.append(GGUFTensor(name, tuple(int(n) for n in ne), _ggml_type_name(type_id), type_id,
                                           int(offset)))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = (self._pos + alignment - 1) // alignment * alignment
        self.tensors = [replace(t, offset=data_start + t.offset) for t in self.tensors]

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        text = self._map[self._pos:self._pos + length].decode("utf-8")
        self._pos += length
        return text

    def _strings(self, count: int) -> list[str]:
        # the vocabulary's hot loop (50k-250k tokens and merges): locals only
        buf, pos, unpack_length, strings = self._map, self._pos, _U64.unpack_from, []
        append = strings.append
        for _ in range(count):
            (length,) = unpack_length(buf, pos)
            pos += 8
            append(buf[pos:pos + length].decode("utf-8"))
            pos += length
        self._pos = pos
        return strings

    def _value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            item_type, count = self._unpack("<IQ")
            if item_type == _STRING:
                return self._strings(count)
            if item_type == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            dtype = np.dtype(_NUMPY_TYPES[item_type])
            values = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos).tolist()
            self._pos += dtype.itemsize * count
            return values
        (value,) = self._unpack("<" + _SCALAR_FORMATS[value_type])
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(key)
        return default if value is None else value

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise CheckpointError(f"{self.path}: the GGUF has no {key!r} key, which a Llama GGUF must have")
        return self.metadata[key]

    def raw(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's stored values, shaped as gguf-py's GGUFReader shapes them (bytes along the last dim
        for block-quantized types), ready for ``gguf.quants.dequantize``."""
        import gguf

        qtype = gguf.GGMLQuantizationType(tensor.type_id)
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        shape = list(tensor.shape)
        if tensor.type_name in ("F32", "F16"):
            dtype = np.dtype("<f4" if tensor.type_name == "F32" else "<f2")
        else:
            dtype = np.dtype(np.uint8)
            if shape[-1] % block_size:
                raise CheckpointError(f"{self.path}: tensor {tensor.name!r} has rows of {shape[-1]} values, not a "
                                      f"multiple of the {tensor.type_name} block size {block_size}")
            shape[-1] = shape[-1] // block_size * type_size
        count = int(np.prod(shape))
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=tensor.offset).reshape(shape)


def _ggml_type_name(type_id: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return f"ggml type {type_id}"


def _tidy_float(value: float) -> float:
    """GGUF stores float32; print 1e-05 rather than 9.999999747378752e-06 in config.json."""
    return float(str(np.float32(value)))


# ----------------------------------------------------------------------------------------------------------
# Model arguments


def _llama_config(meta: GGUFFile, tensors: dict[str, GGUFTensor]) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{meta.path}: general.architecture is {arch!r}; only 'llama' GGUF files convert to the `llama` type")
    if (meta.get("llama.expert_count") or 0) > 0:
        raise CheckpointError(f"{meta.path}: this is a mixture-of-experts GGUF (llama.expert_count > 0); "
                              "only dense Llama models convert")

    dim = int(meta.require("llama.embedding_length"))
    n_layers = int(meta.require("llama.block_count"))
    n_heads = int(meta.require("llama.attention.head_count"))
    n_kv_heads = meta.get("llama.attention.head_count_kv", n_heads)
    if isinstance(n_kv_heads, list):
        raise CheckpointError(f"{meta.path}: per-layer KV head counts are not supported by the `llama` type")
    n_kv_heads = int(n_kv_heads)
    if dim % n_heads or n_heads % n_kv_heads:
        raise CheckpointError(f"{meta.path}: dim {dim} / {n_heads} heads / {n_kv_heads} KV heads do not divide")
    head_dim = dim // n_heads
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        value = meta.get(key)
        if value is not None and int(value) != head_dim:
            raise CheckpointError(f"{meta.path}: {key} = {value}, but the `llama` type rotates and attends over "
                                  f"the whole head of dim // n_heads = {head_dim} channels")

    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise CheckpointError(f"{meta.path}: the GGUF has no token_embd.weight tensor")
    vocab_size = int(embedding.shape[0])
    gate = tensors.get("blk.0.ffn_gate.weight")
    hidden = int(meta.get("llama.feed_forward_length") or (gate.shape[0] if gate is not None else 0))
    multiple_of, ffn_dim_multiplier = ffn_args_for_hidden(dim, hidden)

    rope_scaling = None
    scaling_type = meta.get("llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        factor = float(meta.get("llama.rope.scaling.factor") or 1.0)
        if scaling_type != "linear":
            raise CheckpointError(f"{meta.path}: RoPE scaling {scaling_type!r} is not supported by the `llama` "
                                  "type (only 'linear')")
        rope_scaling = 1.0 / factor  # the original multiplies positions by rope_scaling; linear divides by factor
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{meta.path}: the GGUF has rope_freqs.weight (Llama 3.1-style RoPE frequency "
                              "factors), which the `llama` type cannot represent")

    return {
        "dim": dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "vocab_size": vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": _tidy_float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _tidy_float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_seq_len": int(meta.get("llama.context_length", 2048)),
        "rope_scaling": rope_scaling,
    }


def _accessory_name(gguf_name: str, n_layers: int, path: pathlib.Path) -> str | None:
    """Accessory parameter name (without ``llma.``) for a GGUF tensor name; None for tensors to skip."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < n_layers:
        if parts[2] in _LAYER_TENSORS:
            return f"layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
        if parts[2].split(".")[0] in _IGNORED_LAYER_TENSORS:
            return None
    raise CheckpointError(f"{path}: tensor {gguf_name!r} has no place in the `llama` type (expected "
                          f"{sorted(_GLOBAL_TENSORS)} and blk.N.{{{', '.join(sorted(_LAYER_TENSORS))}}}); "
                          "biases, fused QKV and other variants are not supported")


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    dim, head_dim = cfg["dim"], cfg["dim"] // cfg["n_heads"]
    kv_dim = cfg["n_kv_heads"] * head_dim
    hidden = ffn_hidden_dim(dim, cfg["multiple_of"], cfg["ffn_dim_multiplier"])
    vocab = cfg["vocab_size"]
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(cfg["n_layers"]):
        shapes.update({
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.attention.wq.weight": (dim, dim),
            f"layers.{i}.attention.wk.weight": (kv_dim, dim),
            f"layers.{i}.attention.wv.weight": (kv_dim, dim),
            f"layers.{i}.attention.wo.weight": (dim, dim),
            f"layers.{i}.ffn_norm.weight": (dim,),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
        })
    return shapes


def _dequantize(gguf_file: GGUFFile, tensor: GGUFTensor) -> np.ndarray:
    """A GGUF tensor as a writable float32 numpy array in torch dim order."""
    import gguf
    import gguf.quants

    if tensor.type_name not in SUPPORTED_TENSOR_TYPES:
        raise CheckpointError(f"{gguf_file.path}: tensor {tensor.name!r} is stored as {tensor.type_name}, which "
                              f"this converter does not dequantize; supported types: "
                              f"{', '.join(SUPPORTED_TENSOR_TYPES)}. Re-quantize the model (llama-quantize) to one "
                              "of them, e.g. Q8_0 or Q4_K_M")
    try:
        values = gguf.quants.dequantize(gguf_file.raw(tensor), gguf.GGMLQuantizationType(tensor.type_id))
    except NotImplementedError as exc:
        raise CheckpointError(f"{gguf_file.path}: the installed gguf package cannot dequantize {tensor.type_name} "
                              f"(tensor {tensor.name!r}); upgrade it: pip install -U gguf") from exc
    values = np.asarray(values, dtype=np.float32).reshape(tensor.shape)
    # F32 comes back as a read-only view of the file; torch wants memory it may own
    return values if values.flags.writeable else values.copy()


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


# Pre-tokenizers, named as llama.cpp names them in tokenizer.ggml.pre.  Each follows the published
# tokenizer.json of the model family llama.cpp's converter recognises by that name.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(add_prefix_space: bool = False, trim_offsets: bool = True, use_regex: bool = True) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets,
            "use_regex": use_regex}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _sequence(*pre_tokenizers: dict) -> dict:
    return {"type": "Sequence", "pretokenizers": list(pre_tokenizers)}


def _digits(individual: bool) -> dict:
    return {"type": "Digits", "individual_digits": individual}


def _pipelines() -> dict[str, dict[str, Any]]:
    """normalizer / pre_tokenizer / BPE options per pre-tokenizer family."""
    return {
        "gpt2": {"normalizer": None, "pre_tokenizer": _byte_level()},  # GPT-2's regex inside ByteLevel
        "gpt-neox": {"normalizer": {"type": "NFC"}, "pre_tokenizer": _byte_level()},
        # llama.cpp: "\p{N}" then GPT-2's regex; the published files: Digits(individual) + ByteLevel
        "starcoder": {"normalizer": None, "pre_tokenizer": _sequence(_digits(True), _byte_level())},
        "llama3": {"normalizer": None,
                   "pre_tokenizer": _sequence(_split(_LLAMA3_REGEX), _byte_level(use_regex=False)),
                   "ignore_merges": True},
        "qwen2": {"normalizer": {"type": "NFC"},
                  "pre_tokenizer": _sequence(_split(_QWEN2_REGEX), _byte_level(trim_offsets=False, use_regex=False))},
        "falcon": {"normalizer": None,
                   "pre_tokenizer": _sequence({"type": "Punctuation", "behavior": "Contiguous"}, _byte_level(),
                                              _digits(False), _split("[0-9][0-9][0-9]"))},
        "deepseek-coder": {"normalizer": None,
                           "pre_tokenizer": _sequence(_split(r"[\r\n]"), _split(r"\s?\p{L}+"), _split(r"\s?\p{P}+"),
                                                      _split("[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"),
                                                      _digits(True), _byte_level(trim_offsets=False, use_regex=False))},
    }


# tokenizer.ggml.pre -> family, as llama.cpp's llama-vocab.cpp groups the names it knows
_PRE_FAMILIES = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "jina-v1-en", "jina-v2-es",
                     "jina-v2-de", "jina-v2-code", "roberta-bpe", "gigachat", "a.x-4.0", "mellum", "exaone4", "jais",
                     "trillion", "granite-docling"), "gpt2"),
    **dict.fromkeys(("mpt", "olmo"), "gpt-neox"),
    **dict.fromkeys(("starcoder", "refact", "smollm", "codeshell", "exaone", "minerva-7b"), "starcoder"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    "llama3"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2"), "qwen2"),
    "falcon": "falcon",
    "deepseek-coder": "deepseek-coder",
}


def _special_token(token_id: int, content: str, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": not special, "special": special}


def _build_bpe_tokenizer_json(meta: GGUFFile, tokens: list[str], types: list[int], add_bos: bool) -> str:
    from tokenizers import Tokenizer

    pre = meta.get("tokenizer.ggml.pre") or "default"
    family = _PRE_FAMILIES.get(pre)
    if family is None:  # llama.cpp also falls back to its default (GPT-2) pre-tokenizer here
        warnings.warn(f"{meta.path}: unknown BPE pre-tokenizer tokenizer.ggml.pre = {pre!r}; using GPT-2's. "
                      f"Text may split differently than with the model's own tokenizer. Known: "
                      f"{', '.join(sorted(_PRE_FAMILIES))}", stacklevel=3)
        family = "gpt2"
    pipeline = _pipelines()[family]

    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        seen: set[str] = set()
        duplicate = next(t for t in tokens if t in seen or seen.add(t))
        raise CheckpointError(f"{meta.path}: token {duplicate!r} appears twice in tokenizer.ggml.tokens, "
                              "which a tokenizer.json vocabulary cannot hold")
    merges = meta.get("tokenizer.ggml.merges") or []
    if any(m.count(" ") != 1 for m in merges):
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.merges must be 'left right' pairs")

    added = [_special_token(i, t, special=True) for i, (t, k) in enumerate(zip(tokens, types)) if k == TOKEN_CONTROL]
    added += [_special_token(i, t, special=False) for i, (t, k) in enumerate(zip(tokens, types))
              if k == TOKEN_USER_DEFINED]
    added.sort(key=lambda token: token["id"])

    post_processor: dict = _byte_level(trim_offsets=False)
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        template = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }
        post_processor = {"type": "Sequence", "processors": [post_processor, template]}

    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": bool(pipeline.get("ignore_merges", False)), "vocab": vocab, "merges": merges}
    document = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": pipeline["normalizer"], "pre_tokenizer": pipeline["pre_tokenizer"],
        "post_processor": post_processor, "decoder": _byte_level(), "model": model,
    }
    text = json.dumps(document, ensure_ascii=False)
    try:
        Tokenizer.from_str(text)
    except Exception as exc:
        raise CheckpointError(f"{meta.path}: the tokenizer.json built from the GGUF vocabulary does not load "
                              f"({exc})") from exc
    return text


# sentencepiece's ModelProto, written by hand (protobuf wire format) so that no protobuf package is needed.
# Field numbers from sentencepiece_model.proto; fields go out in number order, as protobuf itself writes them.
_SPM_BPE = 2  # TrainerSpec.ModelType.BPE


def _pb_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32s are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pb_int(field: int, value: int) -> bytes:
    return _pb_varint(field << 3) + _pb_varint(int(value))


def _pb_bytes(field: int, data: bytes) -> bytes:
    return _pb_varint(field << 3 | 2) + _pb_varint(len(data)) + data


def _pb_float(field: int, value: float) -> bytes:
    return _pb_varint(field << 3 | 5) + struct.pack("<f", value)


def _build_spm_model_proto(meta: GGUFFile, tokens: list[str], types: list[int]) -> bytes:
    """A SentencePiece ``tokenizer.model`` that tokenizes the way llama.cpp treats a "llama" GGUF vocabulary:
    BPE over the pieces by score, byte fallback when byte pieces exist, ``add_space_prefix`` as the dummy
    prefix, spaces escaped to U+2581 and otherwise no normalization."""
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)

    def token_id(key: str, default: int) -> int:
        value = int(meta.get(key, default))
        return value if 0 <= value < len(tokens) else -1

    unk_id = token_id("tokenizer.ggml.unknown_token_id", 0)
    bos_id = token_id("tokenizer.ggml.bos_token_id", -1)
    eos_id = token_id("tokenizer.ggml.eos_token_id", -1)
    pad_id = token_id("tokenizer.ggml.padding_token_id", -1)
    if pad_id in (unk_id, bos_id, eos_id):
        pad_id = -1  # sentencepiece refuses a pad id shared with another role
    if unk_id < 0 or types[unk_id] != TOKEN_UNKNOWN:
        raise CheckpointError(f"{meta.path}: a SentencePiece vocabulary needs an unknown token of type UNKNOWN "
                              f"(tokenizer.ggml.unknown_token_id = {unk_id})")

    model = bytearray()
    for token, score, kind in zip(tokens, scores, types):
        piece = _pb_bytes(1, token.encode("utf-8")) + _pb_float(2, float(score))
        if kind != TOKEN_NORMAL:  # sentencepiece leaves NORMAL implicit
            piece += _pb_int(3, kind)
        model += _pb_bytes(1, piece)

    trainer = (_pb_int(3, _SPM_BPE) + _pb_int(4, len(tokens))
               + _pb_int(26, True)                      # allow_whitespace_only_pieces
               + _pb_int(35, TOKEN_BYTE in types)       # byte_fallback
               + _pb_int(40, unk_id) + _pb_int(41, bos_id) + _pb_int(42, eos_id) + _pb_int(43, pad_id)
               + _pb_bytes(44, " \u2047 ".encode("utf-8")))  # unk_surface, as in Llama's file
    for field, role_id in ((45, unk_id), (46, bos_id), (47, eos_id), (48, pad_id)):  # unk/bos/eos/pad_piece
        if role_id >= 0:
            trainer += _pb_bytes(field, tokens[role_id].encode("utf-8"))
    normalizer = (_pb_bytes(1, b"identity")
                  + _pb_int(3, bool(meta.get("tokenizer.ggml.add_space_prefix", True)))  # add_dummy_prefix
                  + _pb_int(4, False)                    # remove_extra_whitespaces
                  + _pb_int(5, True))                    # escape_whitespaces
    data = bytes(model + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer))
    try:
        import sentencepiece

        sentencepiece.SentencePieceProcessor(model_proto=data)
    except ImportError:
        pass  # the file is still right; only the check needs sentencepiece
    except Exception as exc:
        raise CheckpointError(f"{meta.path}: the tokenizer.model built from the GGUF vocabulary does not load "
                              f"({exc})") from exc
    return data


def _write_tokenizer(meta: GGUFFile, out_dir: pathlib.Path, context_length: int | None) -> list[str]:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise CheckpointError(f"{meta.path}: the GGUF holds no vocabulary (tokenizer.ggml.model/tokens); "
                              "supply tokenizer files by hand")
    types = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    pad_id = meta.get("tokenizer.ggml.padding_token_id")
    pre = meta.get("tokenizer.ggml.pre")
    # llama.cpp's defaults when the key is missing: SentencePiece and Llama-3 BPE add BOS, other BPEs don't
    default_add_bos = kind == "llama" or _PRE_FAMILIES.get(pre) == "llama3"
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos))

    def token_at(token_id: Any) -> str | None:
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    written = []
    if kind == "gpt2":
        (out_dir / "tokenizer.json").write_text(_build_bpe_tokenizer_json(meta, tokens, types, add_bos),
                                                encoding="utf-8")
        written.append("tokenizer.json")
    elif kind == "llama":
        (out_dir / "tokenizer.model").write_bytes(_build_spm_model_proto(meta, tokens, types))
        written.append("tokenizer.model")
    else:
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.model = {kind!r} is not supported; this converter "
                              "writes tokenizer.json for 'gpt2' (byte-level BPE) and tokenizer.model for 'llama' "
                              "(SentencePiece). Put the model's own tokenizer files in the checkpoint by hand")

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast" if kind == "gpt2" else "LlamaTokenizer",
        "bos_token": token_at(bos_id),
        "eos_token": token_at(eos_id),
        "unk_token": token_at(unk_id),
        "pad_token": token_at(pad_id),
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    if context_length:
        config["model_max_length"] = int(context_length)
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    written.append("tokenizer_config.json")
    return written


def convert_gguf_tokenizer(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write only the tokenizer files of a GGUF (any architecture) into ``out_dir``; returns ``out_dir``.

    ``tokenizer.ggml.model`` "gpt2" gives ``tokenizer.json``, "llama" gives a SentencePiece ``tokenizer.model``;
    both come with ``tokenizer_config.json`` (bos/eos tokens, ``add_bos_token``, ``chat_template``).
    """
    meta = GGUFFile(gguf_path)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(meta, out, meta.get(f"{meta.get('general.architecture')}.context_length"))
    return out


# ----------------------------------------------------------------------------------------------------------
# The conversion


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                 progress: bool = True) -> pathlib.Path:
    """Convert a Llama-architecture GGUF file into an Accessory ``llama`` checkpoint directory.

    Quantized weights (see ``SUPPORTED_TENSOR_TYPES``) are dequantized with ``gguf.quants.dequantize`` and
    stored as ``dtype``; tensors are read, converted and released one at a time, so peak memory is the
    converted checkpoint plus one float32 tensor.  Files written into ``out_dir`` (created if missing):
    ``consolidated.00-of-01.model.pth``, ``config.json``, ``meta.json`` and the tokenizer files (see
    ``convert_gguf_tokenizer``).  Returns ``out_dir`` as a path.  Raises ``CheckpointError`` for a GGUF of
    another architecture, an unknown tensor, or an unsupported tensor type.
    """
    from tqdm.auto import tqdm

    meta = GGUFFile(gguf_path)
    path = meta.path
    config = _llama_config(meta, {t.name: t for t in meta.tensors})
    expected = _expected_shapes(config)

    # check every name, type and shape before the slow part
    plan: list[tuple[str, GGUFTensor]] = []
    for tensor in meta.tensors:
        name = _accessory_name(tensor.name, config["n_layers"], path)
        if name is None:
            continue
        if tensor.type_name not in SUPPORTED_TENSOR_TYPES:
            _dequantize(meta, tensor)  # raises the error that names the type
        if tensor.shape != expected[name]:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} has torch shape {tensor.shape}, expected "
                                  f"{expected[name]} for llma.{name} from the GGUF's hyper-parameters")
        plan.append((f"llma.{name}", tensor))
    planned = {key for key, _ in plan}
    if "llma.output.weight" not in planned:
        planned.add("llma.output.weight")  # tied to the embedding, copied below
    missing = sorted(f"llma.{name}" for name in expected if f"llma.{name}" not in planned)
    if missing:
        raise CheckpointError(f"{path}: the GGUF lacks {len(missing)} tensor(s) a `llama` model needs, e.g. "
                              f"{', '.join(missing[:5])}")

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(meta, out, config["max_seq_len"])
    state_dict: dict[str, torch.Tensor] = {}
    for key, tensor in tqdm(plan, desc=f"Converting {path.name}", unit="tensor", disable=not progress):
        state_dict[key] = torch.from_numpy(_dequantize(meta, tensor)).to(dtype)
    if "llma.output.weight" not in state_dict:
        # tied embeddings: a separate copy, as the original's checkpoints always hold both tensors
        state_dict["llma.output.weight"] = state_dict["llma.tok_embeddings.weight"].clone()

    torch.save({"model": state_dict}, out / CHECKPOINT_FILE)
    del state_dict
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "meta.json").write_text(json.dumps({"llama_type": "llama"}) + "\n", encoding="utf-8")
    return out
