"""Write an Accessory ``llama`` checkpoint directory as a llama.cpp GGUF file (F32, F16, BF16, Q8_0, Q4_0).

The inverse of :mod:`accessory.checkpoint.gguf` (which reads GGUF into our layout) and uses its tensor-name
tables.  Facts this relies on (llama.cpp's ``convert_hf_to_gguf.py``, ``llama-quantize`` and ``gguf-py``):

* ``attn_q`` / ``attn_k`` rows in GGUF are in Meta's interleaved RoPE layout (pairs ``(x[2i], x[2i+1])``),
  which is what our ``llama`` stores, so they are written as they are (no permutation, unlike HF weights).
* GGUFWriter takes numpy arrays in torch dim order and writes ``ne`` fastest-first.
* 1-D tensors (the RMSNorm weights) stay F32 in every file type, as llama.cpp writes them.
* Q8_0 and Q4_0 quantize blocks of 32 values along a row; a matrix whose rows are not a multiple of 32 is
  written as F16 instead (llama.cpp's converter does the same).
* ``--type q4_0`` keeps ``output.weight`` in Q8_0: ``llama-quantize``'s Q4_0 preset keeps the output head at
  Q6_K (more bits than Q4_0), which gguf-py cannot write; Q8_0 is the nearest it can, and matches our own int4
  scheme, which keeps the head 8-bit.

Tokenizer: a SentencePiece ``tokenizer.model`` becomes ``tokenizer.ggml.model = "llama"`` (pieces, scores,
types); an HF byte-level BPE ``tokenizer.json`` becomes ``"gpt2"`` (vocabulary, merges) with the
``tokenizer.ggml.pre`` name whose pre-tokenizer our GGUF reader rebuilds identically.  Special-token ids,
``add_bos_token`` and the chat template come from ``tokenizer_config.json`` when present.  A model wider
than its vocabulary gets ``[PAD{i}]`` pieces of type UNUSED, as llama.cpp's converter pads.
"""
from __future__ import annotations

import json
import os
import pathlib
import warnings
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..errors import CheckpointError
from .gguf import _GLOBAL_TENSORS, _LAYER_TENSORS, _expected_shapes, ffn_hidden_dim

__all__ = ["GGUF_EXPORT_TYPES", "export_gguf"]

#: ``--type`` name -> (ggml type of the matrices, llama.cpp's general.file_type name)
GGUF_EXPORT_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}

# Accessory name (without "llma.") -> GGUF name, the inverse of gguf.py's tables
_TO_GGUF_GLOBAL = {ours: theirs for theirs, ours in _GLOBAL_TENSORS.items()}
_TO_GGUF_LAYER = {ours: theirs for theirs, ours in _LAYER_TENSORS.items()}

_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


def _gguf_name(name: str) -> Optional[str]:
    if name in _TO_GGUF_GLOBAL:
        return _TO_GGUF_GLOBAL[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _TO_GGUF_LAYER:
        return f"blk.{parts[1]}.{_TO_GGUF_LAYER[parts[2]]}"
    return None


def _read_json(path: pathlib.Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read it as JSON ({exc})") from exc


def _llama_args(src: pathlib.Path, vocab_size: int) -> Dict[str, Any]:
    """config.json over the llama ModelArgs defaults (missing fields take the original's defaults)."""
    import dataclasses

    from ..model.LLM.llama import ModelArgs

    config_file = src / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{src}: no config.json; an Accessory checkpoint holds its ModelArgs fields there")
    given = _read_json(config_file)
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise CheckpointError(f"{config_file}: {', '.join(map(repr, unknown))} is not a field of the llama type")
    if given.get("clip_config") is not None:
        raise CheckpointError(f"{config_file}: a multimodal llama (clip_config) has no GGUF text-model layout; "
                              "only the text model of llama_type 'llama' exports")
    args = dataclasses.asdict(ModelArgs(**given))
    args["vocab_size"] = vocab_size
    args["n_kv_heads"] = args["n_kv_heads"] or args["n_heads"]
    return args


def _tensor_type(name: str, shape: tuple, matrix_type: str) -> str:
    if len(shape) == 1:
        return "F32"
    if matrix_type == "Q4_0" and name == "output.weight":
        return "Q8_0"
    if matrix_type in ("Q8_0", "Q4_0") and shape[-1] % 32:
        warnings.warn(f"{name}: rows of {shape[-1]} values are not a multiple of 32, the {matrix_type} block; "
                      "written as F16", stacklevel=3)
        return "F16"
    return matrix_type


def _encode(tensor: torch.Tensor, type_name: str) -> np.ndarray:
    """The tensor's GGUF bytes as gguf-py wants them: a float array for F32/F16, uint8 rows otherwise."""
    import gguf
    import gguf.quants

    if type_name == "F32":
        return tensor.to(torch.float32).numpy()
    if type_name == "F16":
        return tensor.to(torch.float16).numpy()
    if type_name == "BF16":  # the raw bits, no rounding when the checkpoint is bf16 already
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(tensor.to(torch.float32).numpy(), gguf.GGMLQuantizationType[type_name])


# ------------------------------------------------------------------------------------------------ tokenizer


def _add_tokenizer(writer, src: pathlib.Path, vocab_size: int) -> Optional[str]:
    """Write the tokenizer keys; returns what was written ("llama", "gpt2") or None when there is none."""
    import gguf

    if (src / "tokenizer.model").is_file():
        vocab = gguf.SentencePieceVocab(src)
        kind = "llama"
        pre = None
        entries = list(vocab.all_tokens())
        merges = False
    elif (src / "tokenizer.json").is_file():
        document = _read_json(src / "tokenizer.json")
        model_type = (document.get("model") or {}).get("type")
        if model_type != "BPE" or (document.get("model") or {}).get("byte_fallback"):
            raise CheckpointError(f"{src / 'tokenizer.json'}: only byte-level BPE tokenizer.json files export "
                                  f"(this is {model_type!r}{' with byte_fallback' if model_type == 'BPE' else ''}); "
                                  "put a SentencePiece tokenizer.model in the checkpoint instead")
        vocab = gguf.BpeVocab(src)
        kind = "gpt2"
        pre = _bpe_pre_name(document, src)
        entries = list(vocab.all_tokens())
        merges = True
    else:
        warnings.warn(f"{src}: no tokenizer.model or tokenizer.json; the GGUF gets no vocabulary and llama.cpp "
                      "will not load it without one", stacklevel=3)
        return None

    if len(entries) > vocab_size:
        raise CheckpointError(f"{src}: the tokenizer has {len(entries)} tokens but the model only {vocab_size} "
                              "embedding rows")
    tokens = [text for text, _, _ in entries]
    scores = [float(score) for _, score, _ in entries]
    types = [int(kind_) for _, _, kind_ in entries]
    if kind == "gpt2":
        # tokenizer.json's added tokens as llama.cpp's own converter types them: CONTROL when marked
        # special (a chat template's <|im_end|>, which llama.cpp must not print as text), else
        # USER_DEFINED; gguf-py's BpeVocab left those within the vocabulary NORMAL and made every
        # other one CONTROL
        for added in document.get("added_tokens") or []:
            token_id = added.get("id")
            if isinstance(token_id, int) and 0 <= token_id < len(types):
                types[token_id] = _TOKEN_CONTROL if added.get("special") else _TOKEN_USER_DEFINED
    for i in range(len(entries), vocab_size):  # llama.cpp's converter pads the same way
        tokens.append(f"[PAD{i}]".encode("utf-8"))
        scores.append(-1000.0)
        types.append(_TOKEN_UNUSED)

    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(src, load_merges=merges, n_vocab=vocab_size)
    if kind == "llama":
        processor = vocab.sentencepiece_tokenizer
        defaults = {"bos": processor.bos_id(), "eos": processor.eos_id(), "unk": processor.unk_id(),
                    "pad": processor.pad_id()}
        for role, token_id in defaults.items():
            if token_id >= 0:
                special.special_token_ids.setdefault(role, token_id)
        special.add_special_token.setdefault("bos", True)
        special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)
    return kind


def _bpe_pre_name(document: Dict[str, Any], src: pathlib.Path) -> str:
    """The ``tokenizer.ggml.pre`` name whose pipeline (as our GGUF reader rebuilds it) equals this file's."""
    from .gguf import _PRE_FAMILIES, _pipelines

    def canonical(value):
        if isinstance(value, dict) and value.get("type") == "Sequence" and not value.get("normalizers", True):
            value = None  # an empty normalizer sequence is no normalizer
        return json.dumps(value, sort_keys=True)

    wanted = (canonical(document.get("normalizer")), canonical(document.get("pre_tokenizer")))
    for family, pipeline in _pipelines().items():
        if (canonical(pipeline["normalizer"]), canonical(pipeline["pre_tokenizer"])) == wanted:
            return next(name for name, fam in _PRE_FAMILIES.items() if fam == family)
    warnings.warn(f"{src / 'tokenizer.json'}: its pre-tokenizer is none llama.cpp is known (here) to name; "
                  "writing tokenizer.ggml.pre = 'default' (GPT-2's), which may split text differently", stacklevel=4)
    return "default"


# ------------------------------------------------------------------------------------------------ export


def export_gguf(src_dir: str | os.PathLike, dst: str | os.PathLike, out_type: str = "f16",
                progress: bool = True) -> pathlib.Path:
    """Write the Accessory ``llama`` checkpoint in ``src_dir`` as the GGUF file ``dst``; returns ``dst``.

    ``out_type``: one of ``GGUF_EXPORT_TYPES`` (f32, f16, bf16, q8_0, q4_0): the type of the weight matrices;
    norm weights stay F32 and ``q4_0`` keeps the output head in Q8_0 (see the module notes).  Model-parallel
    shards are merged first.  Tensors are converted and written one at a time, so memory stays near one copy
    of the checkpoint (memory-mapped) plus one float32 matrix.  Raises ``CheckpointError`` for another
    ``llama_type``, an unknown key or a tokenizer that cannot be described in GGUF.
    """
    import gguf
    from tqdm.auto import tqdm

    from .discover import find_shards
    from .hf import _merged_state, architecture_for_llama_type

    src, dst = pathlib.Path(src_dir), pathlib.Path(dst)
    if out_type not in GGUF_EXPORT_TYPES:
        raise CheckpointError(f"GGUF type {out_type!r} is not one this exporter writes; choose one of "
                              f"{', '.join(GGUF_EXPORT_TYPES)}")
    matrix_type, file_type = GGUF_EXPORT_TYPES[out_type]
    find_shards(src)  # a clear error for a directory without shards
    meta_file = src / "meta.json"
    llama_type = _read_json(meta_file).get("llama_type", "llama") if meta_file.is_file() else "llama"
    if llama_type != "llama":
        raise CheckpointError(f"{meta_file}: llama_type is {llama_type!r}; only 'llama' checkpoints (the Llama "
                              "text architecture) export to GGUF. Other types have layers llama.cpp's 'llama' "
                              "architecture does not describe")

    state = _merged_state(src, architecture_for_llama_type("llama", meta_file).split_plan({}))
    if "tok_embeddings.weight" not in state:
        raise CheckpointError(f"{src}: the checkpoint has no llma.tok_embeddings.weight")
    args = _llama_args(src, int(state["tok_embeddings.weight"].shape[0]))
    head_dim = args["dim"] // args["n_heads"]
    hidden = ffn_hidden_dim(args["dim"], args["multiple_of"], args["ffn_dim_multiplier"])
    expected = _expected_shapes(args)

    plan = []
    for name, tensor in state.items():
        gguf_name = _gguf_name(name)
        if gguf_name is None:
            if name == "rope.freqs":  # Meta's inverse-frequency buffer: llama.cpp derives it from rope_theta
                continue
            raise CheckpointError(f"{src}: llma.{name} has no place in a llama GGUF (expected the `llama` keys "
                                  f"{sorted(_TO_GGUF_GLOBAL)} and layers.N.{{{', '.join(sorted(_TO_GGUF_LAYER))}}}); "
                                  "adapters (LoRA, bias, prefix) must be merged or dropped first")
        if name not in expected:
            raise CheckpointError(f"{src}: llma.{name} is past n_layers = {args['n_layers']} in config.json")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"{src}: llma.{name} has shape {tuple(tensor.shape)}, but config.json's "
                                  f"hyper-parameters make it {expected[name]}")
        plan.append((gguf_name, name, tuple(tensor.shape), _tensor_type(name, tuple(tensor.shape), matrix_type)))
    missing = sorted(f"llma.{name}" for name in expected if name not in state)
    if missing:
        raise CheckpointError(f"{src}: the checkpoint lacks {len(missing)} tensor(s) a llama GGUF needs, e.g. "
                              f"{', '.join(missing[:5])}")

    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(partial, "llama")
    try:
        writer.add_name(src.resolve().name)
        writer.add_context_length(int(args["max_seq_len"]))
        writer.add_embedding_length(args["dim"])
        writer.add_block_count(args["n_layers"])
        writer.add_feed_forward_length(hidden)
        writer.add_head_count(args["n_heads"])
        writer.add_head_count_kv(args["n_kv_heads"])
        writer.add_rope_dimension_count(head_dim)
        writer.add_layer_norm_rms_eps(float(args["norm_eps"]))
        writer.add_rope_freq_base(float(args["rope_theta"]))
        if args["rope_scaling"] not in (None, 1, 1.0):
            # the original multiplies positions by rope_scaling; llama.cpp's linear scaling divides by factor
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(1.0 / float(args["rope_scaling"]))
        writer.add_vocab_size(args["vocab_size"])
        writer.add_file_type(int(gguf.LlamaFileType[file_type]))
        if matrix_type in ("Q8_0", "Q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, src, args["vocab_size"])

        for gguf_name, name, shape, type_name in plan:
            qtype = gguf.GGMLQuantizationType[type_name]
            if type_name in ("F32", "F16"):
                nbytes = int(np.prod(shape)) * (4 if type_name == "F32" else 2)
                writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32 if type_name == "F32" else np.float16),
                                       nbytes)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                       raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, name, shape, type_name in tqdm(plan, desc=f"Writing {dst.name}", unit="tensor",
                                                      disable=not progress):
            writer.write_tensor_data(_encode(state[name], type_name))
            state[name] = None  # release the converted source tensor
        writer.close()
        os.replace(partial, dst)
    finally:
        writer.close()
        if partial.exists():
            partial.unlink()
    return dst
