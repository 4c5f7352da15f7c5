"""Convert between HF transformers' Llama layout and the Accessory ``llama`` checkpoint layout.

Covers ``LlamaForCausalLM`` checkpoints (Llama-2/3, Code Llama, TinyLlama and other GQA variants):

* :func:`hf_to_accessory` reads an HF directory (``config.json`` + ``model.safetensors`` or shards
  listed in ``model.safetensors.index.json``) one tensor at a time and writes
  ``consolidated.NN-of-MM.model.pth`` (``torch.save({"model": {"llma." + name: tensor}})``, cut for
  ``mp`` ranks by ``llama.Transformer.split_plan``), ``config.json`` (the original's ``ModelArgs``
  field names), ``meta.json`` (``{"llama_type": "llama"}``) and the tokenizer files.
* :func:`accessory_to_hf` merges the shards of an Accessory ``llama`` checkpoint and writes
  ``model.safetensors`` + an HF ``config.json`` that ``LlamaForCausalLM.from_pretrained`` loads.

HF orders each head's q/k rows for "rotate-half" RoPE (the first half of a head's dims pairs with
the second half); Meta's original, and the ``llama`` type here, pairs adjacent dims (interleaved).
The converters permute those rows; every other weight is copied as it is.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from ..errors import CheckpointError, ConfigError
from .gguf import ffn_args_for_hidden, ffn_hidden_dim

__all__ = ["hf_to_accessory", "accessory_to_hf", "TOKENIZER_FILES"]

#: Tokenizer files copied across in both directions (those present).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_PREFIX = "llma."

# HF name (after "model.layers.{i}.") -> Accessory name (after "layers.{i}.")
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES_BACK = {v: k for k, v in _LAYER_NAMES.items()}
_GLOBAL_NAMES_BACK = {v: k for k, v in _GLOBAL_NAMES.items()}


# ----------------------------------------------------------------------------------------------------------
# q/k row order


def rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> Meta's interleaved rows (``weight``: (n_heads*head_dim, dim))."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k rows -> HF's rotate-half rows (inverse of ``rotate_half_to_interleaved``)."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


# ----------------------------------------------------------------------------------------------------------
# HF -> Accessory


def _read_json(path: pathlib.Path, what: str) -> Dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-download it") from exc


def _hf_rope(hf: Dict[str, Any], path: pathlib.Path) -> Tuple[float, Optional[float]]:
    """(rope_theta, the original's rope_scaling) from an HF config (transformers 4 or 5 spelling)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", scaling.get("rope_theta", 10000.0)))
    spec = params if params.get("rope_type", params.get("type")) not in (None, "default") else scaling
    rope_type = spec.get("rope_type", spec.get("type", "default")) if spec else "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        factor = float(spec["factor"])
        return float(theta), (None if factor == 1.0 else 1.0 / factor)
    raise ConfigError(f"{path}: RoPE scaling type {rope_type!r} is not supported by the `llama` type, which "
                      f"only has linear position interpolation (rope_scaling). Llama 3.1-style 'llama3', "
                      f"'dynamic' and 'yarn' scaling would give different outputs; convert a model without it")


def _accessory_config(hf: Dict[str, Any], path: pathlib.Path) -> Dict[str, Any]:
    """The ``llama`` ModelArgs fields for an HF LlamaConfig dict (checks what ``llama`` cannot express)."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise CheckpointError(f"{path}: model_type is {model_type!r}; this converter handles 'llama' "
                              f"(LlamaForCausalLM) checkpoints only")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{path}: {flag} = true, but the `llama` type has no biases in its "
                                  f"attention / feed-forward linears")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{path}: hidden_act = {act!r}; the `llama` type's feed-forward uses silu")
    try:
        dim, n_layers, n_heads = int(hf["hidden_size"]), int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
        hidden = int(hf["intermediate_size"])
    except KeyError as exc:
        raise CheckpointError(f"{path}: the config has no {exc.args[0]!r}, which a Llama config must have") from exc
    n_kv = int(hf.get("num_key_value_heads") or n_heads)
    if dim % n_heads or n_heads % n_kv:
        raise CheckpointError(f"{path}: hidden_size {dim} / {n_heads} heads / {n_kv} KV heads do not divide")
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != dim // n_heads:
        raise CheckpointError(f"{path}: head_dim = {head_dim} differs from hidden_size / num_attention_heads = "
                              f"{dim // n_heads}, which the `llama` type assumes")
    theta, rope_scaling = _hf_rope(hf, path)
    multiple_of, ffn_dim_multiplier = ffn_args_for_hidden(dim, hidden)
    config: Dict[str, Any] = {
        "dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv,
        "multiple_of": multiple_of, "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-5)), "rope_theta": theta, "rope_scaling": rope_scaling,
    }
    if hf.get("max_position_embeddings"):
        config["max_seq_len"] = int(hf["max_position_embeddings"])
    return config


def _hf_weight_files(src: pathlib.Path) -> List[Tuple[pathlib.Path, List[str]]]:
    """[(safetensors file, [tensor names])] of an HF directory, sharded or single."""
    from safetensors import safe_open

    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "").get("weight_map") or {}
        by_file: Dict[str, List[str]] = {}
        for name, file_name in weight_map.items():
            by_file.setdefault(file_name, []).append(name)
        missing = sorted(f for f in by_file if not (src / f).is_file())
        if missing:
            raise CheckpointError(f"{src}: model.safetensors.index.json lists {', '.join(missing[:5])}, which "
                                  f"is not in the directory; download every shard")
        return [(src / f, names) for f, names in sorted(by_file.items())]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in src.glob("*.bin"))
        hint = (f" It has {', '.join(others[:3])}: re-save it with save_pretrained(..., safe_serialization=True)"
                if others else "")
        raise CheckpointError(f"{src}: no *.safetensors weights (model.safetensors or shards with "
                              f"model.safetensors.index.json).{hint}")
    result = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            result.append((file, list(handle.keys())))
    return result


def _accessory_name(hf_name: str, n_layers: int, path: pathlib.Path) -> Optional[str]:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    if hf_name.startswith("model.layers."):
        layer, _, rest = hf_name[len("model.layers."):].partition(".")
        if layer.isdigit() and int(layer) < n_layers and rest in _LAYER_NAMES:
            return f"layers.{layer}.{_LAYER_NAMES[rest]}"
    if "rotary_emb" in hf_name:
        return None  # a cached table some old checkpoints store; rebuilt from the config
    raise CheckpointError(f"{path}: tensor {hf_name!r} has no place in the `llama` type (biases or extra "
                          f"modules are not supported)")


def _expected_shapes(cfg: Dict[str, Any], vocab: int) -> Dict[str, Tuple[int, ...]]:
    dim, head_dim = cfg["dim"], cfg["dim"] // cfg["n_heads"]
    kv, hidden = cfg["n_kv_heads"] * head_dim, ffn_hidden_dim(dim, cfg["multiple_of"], cfg["ffn_dim_multiplier"])
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(cfg["n_layers"]):
        for name, shape in {"attention.wq.weight": (dim, dim), "attention.wk.weight": (kv, dim),
                            "attention.wv.weight": (kv, dim), "attention.wo.weight": (dim, dim),
                            "feed_forward.w1.weight": (hidden, dim), "feed_forward.w2.weight": (dim, hidden),
                            "feed_forward.w3.weight": (hidden, dim), "attention_norm.weight": (dim,),
                            "ffn_norm.weight": (dim,)}.items():
            shapes[f"layers.{i}.{name}"] = shape
    return shapes


def _copy_tokenizer(src: pathlib.Path, out: pathlib.Path) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def _shard_file(rank: int, mp: int) -> str:
    return f"consolidated.{rank:02d}-of-{mp:02d}.model.pth"


def hf_to_accessory(src_dir, out_dir, dtype: Optional[torch.dtype] = None, mp: int = 1,
                    progress: bool = True) -> pathlib.Path:
    """Convert an HF ``LlamaForCausalLM`` directory into an Accessory ``llama`` checkpoint directory.

    ``dtype``: weight dtype to write (None keeps the stored dtype). ``mp``: model-parallel size; rank
    ``r``'s tensors go to ``consolidated.{r:02d}-of-{mp:02d}.model.pth``, cut as the original cuts
    them. Tensors are read one at a time from memory-mapped safetensors, so peak memory is about one
    copy of the converted weights. Tokenizer files present in ``src_dir`` are copied. Returns
    ``out_dir``. Raises ``CheckpointError`` / ``ConfigError`` for what the ``llama`` type cannot hold
    (another model_type, biases, non-linear RoPE scaling, head_dim != dim/heads) or missing files.
    """
    from safetensors import safe_open
    from tqdm.auto import tqdm

    from ..model.LLM.llama import Transformer

    src, out = pathlib.Path(src_dir), pathlib.Path(out_dir)
    if not src.is_dir():
        raise CheckpointError(f"HF model directory {src} does not exist or is not a directory")
    if mp < 1:
        raise ConfigError(f"mp (model-parallel size) must be >= 1, got {mp}")
    hf = _read_json(src / "config.json", "an HF model directory holds config.json next to its weights")
    config = _accessory_config(hf, src / "config.json")
    n_heads, n_kv = config["n_heads"], config["n_kv_heads"]
    for name, count in (("num_attention_heads", n_heads), ("num_key_value_heads", n_kv)):
        if count % mp:
            raise ConfigError(f"{src}: {name} = {count} cannot be split over mp = {mp} model-parallel ranks")
    files = _hf_weight_files(src)

    # map and check every name before the slow part
    plan: List[Tuple[pathlib.Path, str, str]] = []
    for file, names in files:
        for hf_name in names:
            name = _accessory_name(hf_name, config["n_layers"], file)
            if name is not None:
                plan.append((file, hf_name, name))
    planned = {name for _, _, name in plan}
    tied = "output.weight" not in planned
    if tied and not hf.get("tie_word_embeddings", False):
        raise CheckpointError(f"{src}: the weights have no lm_head.weight and tie_word_embeddings is not set; "
                              f"the checkpoint is incomplete")
    vocab = int(hf.get("vocab_size") or 0)
    expected = _expected_shapes(config, vocab)
    missing = sorted(n for n in expected if n not in planned and not (tied and n == "output.weight"))
    if missing:
        raise CheckpointError(f"{src}: the weights lack {len(missing)} tensor(s) a `llama` model needs, e.g. "
                              f"{', '.join(missing[:5])}")

    out.mkdir(parents=True, exist_ok=True)
    plan_split = Transformer.split_plan
    shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(mp)]

    def put(name: str, tensor: torch.Tensor) -> None:
        for rank, piece in enumerate(plan_split.split(name, tensor, mp)):
            shards[rank][_PREFIX + name] = piece.clone() if mp > 1 else piece

    by_file: Dict[pathlib.Path, List[Tuple[str, str]]] = {}
    for file, hf_name, name in plan:
        by_file.setdefault(file, []).append((hf_name, name))
    bar = tqdm(total=len(plan), desc=f"Converting {src.name}", unit="tensor", disable=not progress)
    for file, entries in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for hf_name, name in entries:
                tensor = handle.get_tensor(hf_name)
                if tuple(tensor.shape) != expected[name]:
                    raise CheckpointError(f"{file}: {hf_name} has shape {tuple(tensor.shape)}, expected "
                                          f"{expected[name]} from config.json")
                if dtype is not None:
                    tensor = tensor.to(dtype)
                if name.endswith("attention.wq.weight"):
                    tensor = rotate_half_to_interleaved(tensor, n_heads)
                elif name.endswith("attention.wk.weight"):
                    tensor = rotate_half_to_interleaved(tensor, n_kv)
                put(name, tensor)
                if tied and name == "tok_embeddings.weight":
                    put("output.weight", tensor.clone())  # the original's checkpoints hold both
                del tensor
                bar.update(1)
    bar.close()

    for rank in range(mp):
        torch.save({"model": shards[rank]}, out / _shard_file(rank, mp))
        shards[rank] = {}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "meta.json").write_text(json.dumps({"llama_type": "llama"}) + "\n", encoding="utf-8")
    _copy_tokenizer(src, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Accessory -> HF


def _hf_config(cfg: Dict[str, Any], vocab: int, hidden: int, dtype: torch.dtype, tied: bool) -> Dict[str, Any]:
    """HF LlamaConfig fields for the ``llama`` ModelArgs ``cfg`` (``hidden``: FFN width, in channels)."""
    dtype_name = str(dtype).replace("torch.", "")
    n_heads = int(cfg["n_heads"])
    hf: Dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": int(cfg["dim"]), "intermediate_size": hidden,
        "num_hidden_layers": int(cfg["n_layers"]), "num_attention_heads": n_heads,
        "num_key_value_heads": int(cfg.get("n_kv_heads") or n_heads),
        "head_dim": int(cfg["dim"]) // n_heads,
        "hidden_act": "silu", "rms_norm_eps": float(cfg.get("norm_eps", 1e-5)),
        "max_position_embeddings": int(cfg.get("max_seq_len") or 4096),
        "rope_theta": float(cfg.get("rope_theta", 10000.0)),
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "pretraining_tp": 1,
        "tie_word_embeddings": tied, "torch_dtype": dtype_name, "dtype": dtype_name,
    }
    hf["rope_scaling"] = None
    if cfg.get("rope_scaling"):
        # the original multiplies positions by rope_scaling; HF's linear factor divides them
        hf["rope_scaling"] = {"rope_type": "linear", "factor": 1.0 / float(cfg["rope_scaling"])}
    return hf


def _load_accessory_config(src: pathlib.Path) -> Dict[str, Any]:
    meta_file = src / "meta.json"
    if meta_file.is_file():
        llama_type = _read_json(meta_file, "").get("llama_type", "llama")
        if llama_type != "llama":
            raise CheckpointError(f"{meta_file}: llama_type is {llama_type!r}; converting to HF handles "
                                  f"'llama' checkpoints only")
    config = _read_json(src / "config.json", "an Accessory checkpoint holds config.json (the ModelArgs "
                                             "fields dim, n_layers, n_heads, ...) next to its shards")
    for key in ("dim", "n_layers", "n_heads"):
        if key not in config:
            raise ConfigError(f"{src / 'config.json'} has no {key!r}, which a `llama` config must have")
    return config


def _merged_tensors(src: pathlib.Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name without ``llma.``, full tensor) for each weight of the checkpoint in ``src``."""
    from ..model.LLM.llama import Transformer
    from .discover import META, find_shards
    from .reader import read_state_dict

    shard_set = find_shards(src)
    if shard_set.is_diff:
        raise CheckpointError(f"{src} holds delta weights (model-diff); apply them to their base model first")
    states = [read_state_dict(f, add_prefix=shard_set.format == META) for f in shard_set.files]
    for key in states[0]:
        if not key.startswith(_PREFIX):
            raise CheckpointError(f"{shard_set.files[0]}: key {key!r} does not start with {_PREFIX!r}")
        missing = [f.name for f, s in zip(shard_set.files, states) if key not in s]
        if missing:
            raise CheckpointError(f"{key} is in {shard_set.files[0].name} but not in {', '.join(missing)}")
        name = key[len(_PREFIX):]
        yield name, Transformer.split_plan.merge(name, [s[key] for s in states])


def accessory_to_hf(src_dir, out_dir, dtype: Optional[torch.dtype] = None, progress: bool = True) -> pathlib.Path:
    """Convert an Accessory ``llama`` checkpoint directory into an HF ``LlamaForCausalLM`` directory.

    Model-parallel shards are merged with ``llama.Transformer.split_plan``. Writes ``model.safetensors``,
    ``config.json`` (LlamaConfig fields; ``tie_word_embeddings`` when output equals the embedding) and
    copies the tokenizer files. ``dtype``: weight dtype to write (None keeps the stored dtype).
    Returns ``out_dir``.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .discover import find_shards

    src, out = pathlib.Path(src_dir), pathlib.Path(out_dir)
    if (src / "config.json").is_file() and "model_type" in _read_json(src / "config.json", ""):
        raise CheckpointError(f"{src} is an HF model directory (its config.json has model_type), not an "
                              f"Accessory checkpoint; convert it the other way (--from hf)")
    find_shards(src)  # a clear error for a directory without shards, before anything else
    config = _load_accessory_config(src)
    n_layers, n_heads = int(config["n_layers"]), int(config["n_heads"])
    n_kv = int(config.get("n_kv_heads") or n_heads)
    hf_state: Dict[str, torch.Tensor] = {}
    for name, tensor in tqdm(_merged_tensors(src), desc=f"Converting {src.name}", unit="tensor",
                             disable=not progress):
        if dtype is not None:
            tensor = tensor.to(dtype)
        if name in _GLOBAL_NAMES_BACK:
            hf_name = _GLOBAL_NAMES_BACK[name]
        else:
            layer, _, rest = name[len("layers."):].partition(".") if name.startswith("layers.") else ("", "", "")
            if not layer.isdigit() or int(layer) >= n_layers or rest not in _LAYER_NAMES_BACK:
                raise CheckpointError(f"{src}: weight {name!r} has no place in HF's LlamaForCausalLM (a PEFT, "
                                      f"adapter or other llama_type checkpoint?)")
            hf_name = f"model.layers.{layer}.{_LAYER_NAMES_BACK[rest]}"
            if rest == "attention.wq.weight":
                tensor = interleaved_to_rotate_half(tensor, n_heads)
            elif rest == "attention.wk.weight":
                tensor = interleaved_to_rotate_half(tensor, n_kv)
        hf_state[hf_name] = tensor.contiguous().clone()  # own memory: the shards are memory-mapped
    if "model.embed_tokens.weight" not in hf_state:
        raise CheckpointError(f"{src}: the checkpoint has no tok_embeddings.weight")
    embedding = hf_state["model.embed_tokens.weight"]
    tied = "lm_head.weight" in hf_state and torch.equal(hf_state["lm_head.weight"], embedding)
    if tied:
        del hf_state["lm_head.weight"]
    hidden = hf_state["model.layers.0.mlp.gate_proj.weight"].shape[0] if n_layers else 0
    if n_layers and hidden != ffn_hidden_dim(int(config["dim"]), int(config.get("multiple_of", 256)),
                                             config.get("ffn_dim_multiplier")):
        raise ConfigError(f"{src / 'config.json'}: multiple_of / ffn_dim_multiplier give another FFN width than "
                          f"the weights' {hidden}")
    hf_config = _hf_config(config, embedding.shape[0], hidden, embedding.dtype, tied)

    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    del hf_state
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    _copy_tokenizer(src, out)
    return out
