"""Convert between HF transformers' layouts and Accessory checkpoint layouts.

The driver here is shared by every architecture; each one is an :class:`HFArchitecture` (which HF
tensor becomes which Accessory tensors, the two configs, the model-parallel split plan):

* ``llama`` <-> ``LlamaForCausalLM`` (this file: Llama-2/3, Code Llama, TinyLlama, GQA variants);
* ``mixtral`` <-> ``MixtralForCausalLM`` (:mod:`.hf_mixtral`);
* ``falcon`` <-> ``FalconForCausalLM`` (:mod:`.hf_falcon`);
* ``internlm`` <-> ``InternLMForCausalLM`` (:mod:`.hf_internlm`; remote code on the HF side, so its
  layout is written out there rather than checked against a transformers class).

The architecture is read from config.json's ``model_type`` (HF side) or meta.json's ``llama_type``
(Accessory side). For llama:

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
import os
import pathlib
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import CheckpointError, ConfigError
from .gguf import ffn_args_for_hidden, ffn_hidden_dim

__all__ = ["hf_to_accessory", "accessory_to_hf", "HFArchitecture", "TensorRule", "TOKENIZER_FILES"]

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


def _hf_rope(hf: Dict[str, Any], path: pathlib.Path, llama_type: str = "llama") -> Tuple[float, Optional[float]]:
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
    raise ConfigError(f"{path}: RoPE scaling type {rope_type!r} is not supported by the `{llama_type}` type, which "
                      f"only has linear position interpolation (rope_scaling). Llama 3.1-style 'llama3', "
                      f"'dynamic' and 'yarn' scaling would give different outputs; convert a model without it")


def hf_int(hf: Dict[str, Any], key: str, path: pathlib.Path, llama_type: str) -> int:
    """``int(hf[key])``, or a CheckpointError naming the missing field."""
    if key not in hf:
        raise CheckpointError(f"{path}: the config has no {key!r}, which an HF config for `{llama_type}` must have")
    return int(hf[key])


def hf_attention_sizes(hf: Dict[str, Any], path: pathlib.Path, llama_type: str) -> Tuple[int, int, int, int]:
    """(hidden_size, layers, heads, kv heads) of a llama-style HF config; refuses head sizes that
    ``dim // n_heads`` (what the original's attention assumes) does not give."""
    dim, n_layers, n_heads = (hf_int(hf, key, path, llama_type)
                              for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    n_kv = int(hf.get("num_key_value_heads") or n_heads)
    if dim % n_heads or n_heads % n_kv:
        raise CheckpointError(f"{path}: hidden_size {dim} / {n_heads} heads / {n_kv} KV heads do not divide")
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != dim // n_heads:
        raise CheckpointError(f"{path}: head_dim = {head_dim} differs from hidden_size / num_attention_heads = "
                              f"{dim // n_heads}, which the `{llama_type}` type assumes")
    return dim, n_layers, n_heads, n_kv


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
    dim, n_layers, n_heads, n_kv = hf_attention_sizes(hf, path, "llama")
    hidden = hf_int(hf, "intermediate_size", path, "llama")
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


# ----------------------------------------------------------------------------------------------------------
# What an architecture declares


@dataclass(frozen=True)
class TensorRule:
    """How one HF tensor becomes Accessory tensors: ``convert(hf_tensor)`` returns one tensor per
    name in ``names`` (a fused HF projection yields several).

    ``part = (index, count)``: the single output is row block ``index`` of ``count`` of ``names[0]``
    (several HF tensors make one Accessory tensor, e.g. q, k, v -> Wqkv); the driver joins the
    blocks along dim 0 once all have arrived.
    """
    names: Tuple[str, ...]
    convert: Callable[[torch.Tensor], Sequence[torch.Tensor]]
    part: Optional[Tuple[int, int]] = None


def renamed(name: str, convert: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> TensorRule:
    """A rule for a tensor that keeps its values (or gets ``convert``) under a new name."""
    return TensorRule((name,), lambda tensor: [convert(tensor) if convert else tensor])


@dataclass(frozen=True)
class HFArchitecture:
    """One Accessory ``llama_type`` <-> one HF ``model_type``, as the shared driver needs it.

    ``accessory_config(hf_config, path)``: the ModelArgs fields (raises for what the type cannot hold).
    ``check_mp(config, mp, path)``: raises when ``mp`` ranks cannot split the model.
    ``split_plan(config)``: the model's own :class:`SplitPlan` for that config.
    ``tensor_rule(hf_name, config)``: a :class:`TensorRule`, or None when the name has no place.
    ``expected_shapes(config, vocab)``: every Accessory tensor the model needs, with its full shape.
    ``to_hf(state, config, path)``: (HF state dict, HF config dict) from the merged Accessory state.
    ``embedding`` / ``output``: the Accessory names of the input embedding and the output head
    (HF may tie them; the original's checkpoints always hold both).
    """
    llama_type: str
    model_type: str
    hf_class: str
    accessory_config: Callable[[Dict[str, Any], pathlib.Path], Dict[str, Any]]
    check_mp: Callable[[Dict[str, Any], int, pathlib.Path], None]
    split_plan: Callable[[Dict[str, Any]], Any]
    tensor_rule: Callable[[str, Dict[str, Any]], Optional[TensorRule]]
    expected_shapes: Callable[[Dict[str, Any], int], Dict[str, Tuple[int, ...]]]
    to_hf: Callable[[Dict[str, torch.Tensor], Dict[str, Any], pathlib.Path],
                    Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]
    embedding: str = "tok_embeddings.weight"
    output: str = "output.weight"
    # Accessory tensors the HF checkpoint may lack, made from the config and the expected shape
    # (e.g. zero biases for a model trained without them): (name, shape, config) -> tensor or None.
    default_tensor: Callable[[str, Tuple[int, ...], Dict[str, Any]], Optional[torch.Tensor]] = \
        lambda name, shape, config: None


def _architectures() -> Dict[str, HFArchitecture]:
    """Every architecture with an HF converter, by ``llama_type``."""
    from .hf_falcon import FALCON
    from .hf_internlm import INTERNLM
    from .hf_mixtral import MIXTRAL
    return {arch.llama_type: arch for arch in (LLAMA, MIXTRAL, FALCON, INTERNLM)}


def _supported() -> str:
    return ", ".join(f"{a.model_type!r} ({a.hf_class})" for a in _architectures().values())


def architecture_for_model_type(model_type: Optional[str], path: pathlib.Path) -> HFArchitecture:
    """The architecture converting HF checkpoints of ``model_type`` (raises for the others)."""
    for arch in _architectures().values():
        if arch.model_type == model_type:
            return arch
    raise CheckpointError(f"{path}: model_type is {model_type!r}; converting from HF handles {_supported()}")


def architecture_for_llama_type(llama_type: str, path: pathlib.Path) -> HFArchitecture:
    """The architecture converting Accessory checkpoints of ``llama_type`` (raises for the others)."""
    archs = _architectures()
    if llama_type not in archs:
        raise CheckpointError(f"{path}: llama_type is {llama_type!r}; converting to HF handles "
                              f"{', '.join(repr(t) for t in archs)} checkpoints only")
    return archs[llama_type]


# ----------------------------------------------------------------------------------------------------------
# llama


def split_layer_name(name: str, prefix: str, n_layers: int) -> Optional[Tuple[str, str]]:
    """``(layer index, rest)`` of ``prefix + "{i}." + rest`` with ``i < n_layers``, else None."""
    if not name.startswith(prefix):
        return None
    layer, _, rest = name[len(prefix):].partition(".")
    if layer.isdigit() and int(layer) < n_layers:
        return layer, rest
    return None


def llama_attention_rule(rest: str, layer: str, config: Dict[str, Any]) -> Optional[TensorRule]:
    """llama's attention and norm tensors of HF layer ``layer`` (shared by llama and mixtral)."""
    if rest not in _LAYER_NAMES:
        return None
    name = f"layers.{layer}.{_LAYER_NAMES[rest]}"
    if rest == "self_attn.q_proj.weight":
        return renamed(name, lambda t: rotate_half_to_interleaved(t, config["n_heads"]))
    if rest == "self_attn.k_proj.weight":
        return renamed(name, lambda t: rotate_half_to_interleaved(t, config["n_kv_heads"]))
    return renamed(name)


def llama_global_rule(hf_name: str) -> Optional[TensorRule]:
    """llama's embedding, final norm and head (shared by llama and mixtral); None for other names."""
    return renamed(_GLOBAL_NAMES[hf_name]) if hf_name in _GLOBAL_NAMES else None


def _llama_tensor_rule(hf_name: str, config: Dict[str, Any]) -> Optional[TensorRule]:
    if hf_name in _GLOBAL_NAMES:
        return llama_global_rule(hf_name)
    where = split_layer_name(hf_name, "model.layers.", config["n_layers"])
    return llama_attention_rule(where[1], where[0], config) if where else None


def llama_attention_shapes(cfg: Dict[str, Any], vocab: int) -> Dict[str, Tuple[int, ...]]:
    """Shapes of llama's embedding, head, norms and attention (everything but the feed-forward)."""
    dim, head_dim = cfg["dim"], cfg["dim"] // cfg["n_heads"]
    kv = cfg["n_kv_heads"] * head_dim
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(cfg["n_layers"]):
        for name, shape in {"attention.wq.weight": (dim, dim), "attention.wk.weight": (kv, dim),
                            "attention.wv.weight": (kv, dim), "attention.wo.weight": (dim, dim),
                            "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,)}.items():
            shapes[f"layers.{i}.{name}"] = shape
    return shapes


def _expected_shapes(cfg: Dict[str, Any], vocab: int) -> Dict[str, Tuple[int, ...]]:
    dim = cfg["dim"]
    hidden = ffn_hidden_dim(dim, cfg["multiple_of"], cfg["ffn_dim_multiplier"])
    shapes = llama_attention_shapes(cfg, vocab)
    for i in range(cfg["n_layers"]):
        for name, shape in {"feed_forward.w1.weight": (hidden, dim), "feed_forward.w2.weight": (dim, hidden),
                            "feed_forward.w3.weight": (hidden, dim)}.items():
            shapes[f"layers.{i}.{name}"] = shape
    return shapes


def check_heads_divide(config: Dict[str, Any], mp: int, path: pathlib.Path,
                       counts: Sequence[Tuple[str, int]]) -> None:
    """Raise ConfigError when one of ``counts`` ((HF field name, count)) is not divisible by ``mp``."""
    for name, count in counts:
        if count % mp:
            raise ConfigError(f"{path}: {name} = {count} cannot be split over mp = {mp} model-parallel ranks")


def _llama_check_mp(config: Dict[str, Any], mp: int, path: pathlib.Path) -> None:
    check_heads_divide(config, mp, path, (("num_attention_heads", config["n_heads"]),
                                          ("num_key_value_heads", config["n_kv_heads"])))


def _llama_split_plan(config: Dict[str, Any]):
    from ..model.LLM.llama import Transformer
    return Transformer.split_plan


def llama_attention_to_hf(name: str, tensor: torch.Tensor,
                          config: Dict[str, Any]) -> Optional[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) for llama's global, attention and norm tensors (None for any other name)."""
    if name in _GLOBAL_NAMES_BACK:
        return _GLOBAL_NAMES_BACK[name], tensor
    where = split_layer_name(name, "layers.", int(config["n_layers"]))
    if where is None or where[1] not in _LAYER_NAMES_BACK:
        return None
    layer, rest = where
    n_heads = int(config["n_heads"])
    if rest == "attention.wq.weight":
        tensor = interleaved_to_rotate_half(tensor, n_heads)
    elif rest == "attention.wk.weight":
        tensor = interleaved_to_rotate_half(tensor, int(config.get("n_kv_heads") or n_heads))
    return f"model.layers.{layer}.{_LAYER_NAMES_BACK[rest]}", tensor


def no_place_in_hf(src: pathlib.Path, name: str, hf_class: str) -> CheckpointError:
    return CheckpointError(f"{src}: weight {name!r} has no place in HF's {hf_class} (a PEFT, adapter or "
                           f"other llama_type checkpoint?)")


def _llama_to_hf(state: Dict[str, torch.Tensor], config: Dict[str, Any], src: pathlib.Path):
    for key in ("dim", "n_layers", "n_heads"):
        if key not in config:
            raise ConfigError(f"{src / 'config.json'} has no {key!r}, which a `llama` config must have")
    hf_state: Dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        mapped = llama_attention_to_hf(name, tensor, config)
        if mapped is None:
            raise no_place_in_hf(src, name, "LlamaForCausalLM")
        hf_state[mapped[0]] = mapped[1]
    n_layers = int(config["n_layers"])
    hidden = hf_state["model.layers.0.mlp.gate_proj.weight"].shape[0] if n_layers else 0
    if n_layers and hidden != ffn_hidden_dim(int(config["dim"]), int(config.get("multiple_of", 256)),
                                             config.get("ffn_dim_multiplier")):
        raise ConfigError(f"{src / 'config.json'}: multiple_of / ffn_dim_multiplier give another FFN width than "
                          f"the weights' {hidden}")
    vocab = state["tok_embeddings.weight"].shape[0]
    return hf_state, _hf_config(config, vocab, hidden)


def _hf_config(cfg: Dict[str, Any], vocab: int, hidden: int) -> Dict[str, Any]:
    """HF LlamaConfig fields for the ``llama`` ModelArgs ``cfg`` (``hidden``: FFN width, in channels)."""
    n_heads = int(cfg["n_heads"])
    hf: Dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": int(cfg["dim"]), "intermediate_size": hidden,
        "num_hidden_layers": int(cfg["n_layers"]), "num_attention_heads": n_heads,
        "num_key_value_heads": int(cfg.get("n_kv_heads") or n_heads),
        "head_dim": int(cfg["dim"]) // n_heads,
        "hidden_act": "silu", "rms_norm_eps": float(cfg.get("norm_eps", 1e-5)),
        "max_position_embeddings": int(cfg.get("max_seq_len") or 4096),
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "pretraining_tp": 1,
    }
    hf.update(hf_rope_fields(cfg))
    return hf


def hf_rope_fields(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """HF ``rope_theta`` / ``rope_scaling`` for the original's ``rope_theta`` / ``rope_scaling`` fields."""
    fields: Dict[str, Any] = {"rope_theta": float(cfg.get("rope_theta", 10000.0)), "rope_scaling": None}
    if cfg.get("rope_scaling"):
        # the original multiplies positions by rope_scaling; HF's linear factor divides them
        fields["rope_scaling"] = {"rope_type": "linear", "factor": 1.0 / float(cfg["rope_scaling"])}
    return fields


LLAMA = HFArchitecture(
    llama_type="llama", model_type="llama", hf_class="LlamaForCausalLM",
    accessory_config=_accessory_config, check_mp=_llama_check_mp, split_plan=_llama_split_plan,
    tensor_rule=_llama_tensor_rule, expected_shapes=_expected_shapes, to_hf=_llama_to_hf)


# ----------------------------------------------------------------------------------------------------------
# HF -> Accessory (every architecture)


def _copy_tokenizer(src: pathlib.Path, out: pathlib.Path) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def _shard_file(rank: int, mp: int) -> str:
    return f"consolidated.{rank:02d}-of-{mp:02d}.model.pth"


def _is_cached_table(hf_name: str) -> bool:
    return "rotary_emb" in hf_name or hf_name.endswith(".inv_freq")


def hf_to_accessory(src_dir, out_dir, dtype: Optional[torch.dtype] = None, mp: int = 1,
                    progress: bool = True) -> pathlib.Path:
    """Convert an HF directory (``LlamaForCausalLM``, ``MixtralForCausalLM``, ``FalconForCausalLM`` or
    ``InternLMForCausalLM``, told apart by config.json's ``model_type``) into an Accessory checkpoint
    directory.

    ``dtype``: weight dtype to write (None keeps the stored dtype). ``mp``: model-parallel size; rank
    ``r``'s tensors go to ``consolidated.{r:02d}-of-{mp:02d}.model.pth``, cut as the original cuts
    them (the model's own split plan). Tensors are read one at a time from memory-mapped
    safetensors, so peak memory is about one copy of the converted weights. Writes config.json (the
    original's ModelArgs fields), meta.json (``llama_type``) and copies the tokenizer files present.
    Returns ``out_dir``. Raises ``CheckpointError`` / ``ConfigError`` for what the target type
    cannot hold (another model_type, biases, non-linear RoPE scaling, ...) or missing files.
    """
    from safetensors import safe_open
    from tqdm.auto import tqdm

    src, out = pathlib.Path(src_dir), pathlib.Path(out_dir)
    if not src.is_dir():
        raise CheckpointError(f"HF model directory {src} does not exist or is not a directory")
    if mp < 1:
        raise ConfigError(f"mp (model-parallel size) must be >= 1, got {mp}")
    hf = _read_json(src / "config.json", "an HF model directory holds config.json next to its weights")
    arch = architecture_for_model_type(hf.get("model_type"), src / "config.json")
    config = arch.accessory_config(hf, src / "config.json")
    arch.check_mp(config, mp, src / "config.json")
    files = _hf_weight_files(src)

    # map and check every name before the slow part
    plan: List[Tuple[pathlib.Path, str, TensorRule]] = []
    for file, names in files:
        for hf_name in names:
            rule = arch.tensor_rule(hf_name, config)
            if rule is None:
                if _is_cached_table(hf_name):
                    continue  # a cached table some old checkpoints store; rebuilt from the config
                raise CheckpointError(f"{file}: tensor {hf_name!r} has no place in the `{arch.llama_type}` "
                                      f"type (biases or extra modules are not supported)")
            plan.append((file, hf_name, rule))
    planned = {name for _, _, rule in plan for name in rule.names}
    tied = arch.output not in planned
    if tied and not hf.get("tie_word_embeddings", False):
        raise CheckpointError(f"{src}: the weights have no lm_head.weight and tie_word_embeddings is not set; "
                              f"the checkpoint is incomplete")
    vocab = int(hf.get("vocab_size") or 0)
    expected = arch.expected_shapes(config, vocab)
    parts_planned: Dict[str, set] = {}
    for _, _, rule in plan:
        if rule.part is not None:
            parts_planned.setdefault(rule.names[0], set()).add(rule.part)
    for name, parts in parts_planned.items():
        count = next(iter(parts))[1]
        if len(parts) != count:
            raise CheckpointError(f"{src}: {name} is built from {count} HF tensors but the checkpoint has "
                                  f"{len(parts)} of them; it is incomplete")
    missing = sorted(n for n in expected if n not in planned and not (tied and n == arch.output))
    defaults: Dict[str, torch.Tensor] = {}
    for name in missing:
        value = arch.default_tensor(name, expected[name], config)
        if value is not None:
            defaults[name] = value
    missing = [n for n in missing if n not in defaults]
    if missing:
        raise CheckpointError(f"{src}: the weights lack {len(missing)} tensor(s) a `{arch.llama_type}` model "
                              f"needs, e.g. {', '.join(missing[:5])}")
    extra = sorted(planned - set(expected))
    if extra:
        raise CheckpointError(f"{src}: tensors such as {', '.join(extra[:3])} have no place in a "
                              f"`{arch.llama_type}` model with this config.json")

    out.mkdir(parents=True, exist_ok=True)
    split_plan = arch.split_plan(config)
    shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(mp)]

    def put(name: str, tensor: torch.Tensor) -> None:
        for rank, piece in enumerate(split_plan.split(name, tensor, mp)):
            if piece is not None:  # None: that rank holds none of it (whole experts)
                shards[rank][_PREFIX + name] = piece.clone() if mp > 1 else piece

    pending: Dict[str, Dict[int, torch.Tensor]] = {}  # row blocks of names made from several HF tensors
    written_dtype = dtype or torch.float32

    def put_checked(name: str, piece: torch.Tensor, source: str) -> None:
        if tuple(piece.shape) != expected[name]:
            raise CheckpointError(f"{source} gives {name} of shape {tuple(piece.shape)}; config.json expects "
                                  f"{expected[name]}")
        put(name, piece.contiguous())
        if tied and name == arch.embedding:
            put(arch.output, piece.clone())  # the original's checkpoints hold both

    by_file: Dict[pathlib.Path, List[Tuple[str, TensorRule]]] = {}
    for file, hf_name, rule in plan:
        by_file.setdefault(file, []).append((hf_name, rule))
    bar = tqdm(total=len(plan), desc=f"Converting {src.name}", unit="tensor", disable=not progress)
    for file, entries in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for hf_name, rule in entries:
                tensor = handle.get_tensor(hf_name)
                if dtype is not None:
                    tensor = tensor.to(dtype)
                try:
                    pieces = list(rule.convert(tensor))
                except RuntimeError as exc:  # a view / split that does not fit: a shape off the config
                    raise CheckpointError(f"{file}: {hf_name} has shape {tuple(tensor.shape)}, which does not "
                                          f"fit config.json ({exc})") from exc
                if rule.part is not None:
                    index, count = rule.part
                    blocks = pending.setdefault(rule.names[0], {})
                    blocks[index] = pieces[0]
                    if len(blocks) == count:
                        joined = torch.cat([blocks[i] for i in range(count)], dim=0)
                        put_checked(rule.names[0], joined, f"{file}: {hf_name} (block {index + 1} of {count})")
                        del pending[rule.names[0]]
                else:
                    for name, piece in zip(rule.names, pieces):
                        put_checked(name, piece, f"{file}: {hf_name} of shape {tuple(tensor.shape)}")
                written_dtype = pieces[0].dtype
                del tensor, pieces
                bar.update(1)
    bar.close()
    for name, value in defaults.items():  # in the dtype the converted weights have
        put_checked(name, value.to(written_dtype), "the config")

    for rank in range(mp):
        torch.save({"model": shards[rank]}, out / _shard_file(rank, mp))
        shards[rank] = {}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "meta.json").write_text(json.dumps({"llama_type": arch.llama_type}) + "\n", encoding="utf-8")
    _copy_tokenizer(src, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Accessory -> HF (every architecture)


def _load_accessory_config(src: pathlib.Path) -> Tuple[HFArchitecture, Dict[str, Any]]:
    meta_file = src / "meta.json"
    llama_type = _read_json(meta_file, "").get("llama_type", "llama") if meta_file.is_file() else "llama"
    arch = architecture_for_llama_type(llama_type, meta_file)
    config = _read_json(src / "config.json", "an Accessory checkpoint holds config.json (the ModelArgs "
                                             "fields) next to its shards")
    _check_fields(config, llama_type, src / "config.json")
    return arch, config


def _check_fields(config: Dict[str, Any], llama_type: str, path: pathlib.Path) -> None:
    """Raise when config.json has a field ``llama_type``'s ModelArgs does not take (another type's config)."""
    import dataclasses

    from ..model.LLM import load_llama_type
    fields = {f.name for f in dataclasses.fields(load_llama_type(llama_type).ModelArgs)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise CheckpointError(f"{path}: {', '.join(repr(u) for u in unknown)} is not a field of llama_type "
                              f"{llama_type!r} (from meta.json); is meta.json's llama_type right?")


def _merged_state(src: pathlib.Path, split_plan) -> Dict[str, torch.Tensor]:
    """{name without ``llma.``: full tensor} of the checkpoint in ``src``, shards merged by ``split_plan``."""
    from .discover import META, find_shards
    from .load import _ordered_union, merged_tensor
    from .reader import read_state_dict

    shard_set = find_shards(src)
    if shard_set.is_diff:
        raise CheckpointError(f"{src} holds delta weights (model-diff); apply them to their base model first")
    states = [read_state_dict(f, add_prefix=shard_set.format == META) for f in shard_set.files]
    merged: Dict[str, torch.Tensor] = {}
    for key in _ordered_union(states):
        if not key.startswith(_PREFIX):
            raise CheckpointError(f"{shard_set.files[0]}: key {key!r} does not start with {_PREFIX!r}")
        # a single piece stays a memory-mapped view of its shard: no second copy of the model
        merged[key[len(_PREFIX):]] = merged_tensor(key, states, shard_set, split_plan).contiguous()
    return merged


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: pathlib.Path, tensors: Dict[str, torch.Tensor],
                      metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a .safetensors file one tensor at a time.

    ``safetensors.torch.save_file`` turns every tensor into bytes before writing, holding a second
    copy of the whole model; here only one tensor's bytes exist at a time (tensors that are
    memory-mapped views of a checkpoint are read straight from it).
    """
    header: Dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: dtype {tensor.dtype} cannot be written to safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for tensor in tensors.values():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                f.write(memoryview(flat.view(torch.uint8).numpy()))
    os.replace(tmp, path)


def accessory_to_hf(src_dir, out_dir, dtype: Optional[torch.dtype] = None, progress: bool = True) -> pathlib.Path:
    """Convert an Accessory ``llama``, ``mixtral`` or ``falcon`` checkpoint directory (meta.json's
    ``llama_type``) into an HF ``LlamaForCausalLM`` / ``MixtralForCausalLM`` / ``FalconForCausalLM``
    directory.

    Model-parallel shards are merged with the model's split plan. Writes ``model.safetensors``,
    ``config.json`` (``tie_word_embeddings`` when output equals the embedding) and copies the
    tokenizer files. ``dtype``: weight dtype to write (None keeps the stored dtype). Returns ``out_dir``.
    """
    from tqdm.auto import tqdm

    from .discover import find_shards

    src, out = pathlib.Path(src_dir), pathlib.Path(out_dir)
    if (src / "config.json").is_file() and "model_type" in _read_json(src / "config.json", ""):
        raise CheckpointError(f"{src} is an HF model directory (its config.json has model_type), not an "
                              f"Accessory checkpoint; convert it the other way (--from hf)")
    find_shards(src)  # a clear error for a directory without shards, before anything else
    arch, config = _load_accessory_config(src)
    state = _merged_state(src, arch.split_plan(config))
    for name in tqdm(list(state), desc=f"Converting {src.name}", unit="tensor", disable=not progress):
        if dtype is not None:
            state[name] = state[name].to(dtype)
    if arch.embedding not in state:
        raise CheckpointError(f"{src}: the checkpoint has no {arch.embedding}")
    embedding = state[arch.embedding]
    tied = arch.output in state and torch.equal(state[arch.output], embedding)
    hf_state, hf_config = arch.to_hf(state, config, src)
    del state
    if tied:
        del hf_state["lm_head.weight"]
    dtype_name = str(embedding.dtype).replace("torch.", "")
    hf_config.update(tie_word_embeddings=tied, torch_dtype=dtype_name, dtype=dtype_name)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", hf_state, metadata={"format": "pt"})
    del hf_state
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    _copy_tokenizer(src, out)
    return out
