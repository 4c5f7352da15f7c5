"""HF ``InternLMForCausalLM`` (remote code, ``model_type: "internlm"``) <-> Accessory ``internlm``.

The driver is :mod:`.hf`. Names: ``model.embed_tokens`` / ``model.layers.{i}.*`` / ``model.norm`` /
``lm_head`` against ``embedding`` / ``layers.{i}.*`` / ``norm`` / ``head``. Both sides use rotate-half
RoPE, so no rows are permuted. The differences:

* HF keeps q, k, v apart (``self_attn.{q,k,v}_proj``, with biases when config ``bias`` is true);
  ``internlm`` fuses them into ``mixer.Wqkv`` laid out ``(three, heads, head_dim)``: the rows are
  ``cat(q, k, v)``. HF's ``o_proj`` is ``mixer.out_proj``. A model without biases (``bias: false``)
  gets zero biases, which compute the same thing; converting back always writes biases.
* the MLP: ``internlm`` computes ``w3(silu(w1 x) * w2 x)``, so ``w1 = gate_proj``, ``w2 = up_proj``
  and ``w3 = down_proj`` (llama's w2 / w3 are the other way round);
* ``input_layernorm`` / ``post_attention_layernorm`` are ``norm1`` / ``norm2`` (RMSNorm).

The FFN width: ``internlm`` builds ``multiple_of * ceil(int(hidden_size * mlp_ratio) / multiple_of)``;
:func:`ffn_args_for_intermediate` picks ``(mlp_ratio, multiple_of)`` giving ``intermediate_size``
exactly (the original's 8/3 and 256 when they do, as for InternLM-7B's 11008).

Three HF tensors make one ``Wqkv``: each of q/k/v's rules yields its row block
(``TensorRule.part``) and the shared driver joins them; missing biases come from
``default_tensor`` as zeros.

Refused: InternLM2 (``model_type: "internlm2"``, its packed ``attention.wqkv`` / ``feed_forward``
names), grouped key/value heads, an activation other than silu, RoPE scaling other than InternLM's
dynamic NTK (which changes nothing within ``max_position_embeddings``, the converted model's
``max_seq_len``); and, converting back, LayerNorm (``norm_type`` other than ``"rmsnorm"``) and
``rope_scaling``, which HF InternLM does not have.
"""

from __future__ import annotations

import pathlib
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import CheckpointError, ConfigError
from .hf import HFArchitecture, TensorRule, check_heads_divide, renamed, split_layer_name

__all__ = ["INTERNLM", "ffn_args_for_intermediate"]

_GLOBAL = {"model.embed_tokens.weight": "embedding.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "head.weight"}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}
# HF name (after "model.layers.{i}.") -> Accessory name (after "layers.{i}."), one to one
_LAYER = {
    "mlp.gate_proj.weight": "mlp.w1.weight", "mlp.up_proj.weight": "mlp.w2.weight",
    "mlp.down_proj.weight": "mlp.w3.weight",
    "input_layernorm.weight": "norm1.weight", "post_attention_layernorm.weight": "norm2.weight",
}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_LAYER_BACK.update({"mixer.out_proj.weight": "self_attn.o_proj.weight", "mixer.out_proj.bias": "self_attn.o_proj.bias"})
_QKV = ("q_proj", "k_proj", "v_proj")
# names only InternLM2 checkpoints have
_INTERNLM2_MARKERS = ("model.tok_embeddings.", ".attention.wqkv.", ".attention.wo.", ".feed_forward.",
                      ".attention_norm.", ".ffn_norm.")


def ffn_args_for_intermediate(dim: int, hidden: int) -> Tuple[float, int]:
    """``(mlp_ratio, multiple_of)`` that make ``internlm`` build an FFN exactly ``hidden`` wide.

    ``internlm`` computes ``multiple_of * ceil(int(dim * mlp_ratio) / multiple_of)``. The original's
    defaults (8/3, 256) are kept when they give ``hidden``; otherwise ``multiple_of = hidden`` and
    ``mlp_ratio = hidden / dim``, whose ``int(dim * mlp_ratio)`` lies in ``(0, hidden]`` and so rounds
    up to ``hidden``.
    """
    from ..model.LLM.internlm import ffn_hidden_dim

    if dim <= 0 or hidden <= 0:
        raise CheckpointError(f"FFN sizes must be positive, got hidden_size={dim}, intermediate_size={hidden}")
    for mlp_ratio, multiple_of in ((8 / 3, 256), (hidden / dim, hidden)):
        if ffn_hidden_dim(dim, mlp_ratio, multiple_of) == hidden:
            return mlp_ratio, multiple_of
    raise CheckpointError(f"cannot express an FFN width of {hidden} for hidden_size {dim} with "
                          f"mlp_ratio / multiple_of")


def _refuse_internlm2(hf: Dict[str, Any], path: pathlib.Path) -> None:
    archs = hf.get("architectures") or []
    if hf.get("model_type") == "internlm2" or any("InternLM2" in str(a) for a in archs):
        raise CheckpointError(f"{path}: an InternLM2 model ({archs or hf.get('model_type')}); the `internlm` type "
                              f"is the first generation (InternLMForCausalLM), and InternLM2's packed "
                              f"attention.wqkv layout and grouped key/value heads are not supported")


def _accessory_config(hf: Dict[str, Any], path: pathlib.Path) -> Dict[str, Any]:
    """The ``internlm`` ModelArgs fields for an HF InternLMConfig dict (refuses what ``internlm`` cannot build)."""
    _refuse_internlm2(hf, path)
    try:
        dim, n_layers, n_heads = int(hf["hidden_size"]), int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
        hidden = int(hf["intermediate_size"])
    except KeyError as exc:
        raise CheckpointError(f"{path}: the config has no {exc.args[0]!r}, which an InternLM config must have") from exc
    if dim % n_heads:
        raise CheckpointError(f"{path}: hidden_size {dim} is not divisible by num_attention_heads {n_heads}")
    n_kv = hf.get("num_key_value_heads")
    if n_kv is not None and int(n_kv) != n_heads:
        raise CheckpointError(f"{path}: num_key_value_heads = {n_kv} differs from num_attention_heads = {n_heads}; "
                              f"the `internlm` type has one key/value head per query head")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{path}: hidden_act = {act!r}; the `internlm` type's MLP uses silu")
    rotary = hf.get("rotary") or {}
    rotary_type = rotary.get("type", "origin")
    if rotary_type not in ("origin", "dynamic"):
        raise CheckpointError(f"{path}: rotary type {rotary_type!r}; the `internlm` type has plain RoPE "
                              f"(InternLM's 'origin', or 'dynamic' NTK within max_position_embeddings)")
    scaling = hf.get("rope_scaling")
    if scaling and (scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise CheckpointError(f"{path}: rope_scaling = {scaling!r}; InternLMForCausalLM has no such scaling and "
                              f"the `internlm` type does not take it from HF")
    theta = float(hf.get("rope_theta", rotary.get("base", 10000.0)))
    mlp_ratio, multiple_of = ffn_args_for_intermediate(dim, hidden)
    eps = float(hf.get("rms_norm_eps", 1e-6))
    config: Dict[str, Any] = {
        "num_layers": n_layers, "hidden_size": dim, "num_attention_heads": n_heads, "mlp_ratio": mlp_ratio,
        "layer_norm_epsilon": eps, "norm_type": "rmsnorm", "norm_eps": eps, "multiple_of": multiple_of,
        "rope_theta": theta, "rope_scaling": None,
    }
    if hf.get("max_position_embeddings"):
        config["max_seq_len"] = int(hf["max_position_embeddings"])
    return config


def _ffn(config: Dict[str, Any]) -> int:
    from ..model.LLM.internlm import ffn_hidden_dim
    return ffn_hidden_dim(int(config["hidden_size"]), float(config["mlp_ratio"]), int(config["multiple_of"]))


def _check_mp(config: Dict[str, Any], mp: int, path: pathlib.Path) -> None:
    check_heads_divide(config, mp, path, (("num_attention_heads", config["num_attention_heads"]),
                                          ("intermediate_size", _ffn(config))))


def _split_plan(config: Dict[str, Any]):
    from ..model.LLM.internlm import Transformer
    return Transformer.split_plan


def _tensor_rule(hf_name: str, config: Dict[str, Any]) -> Optional[TensorRule]:
    if any(marker in hf_name for marker in _INTERNLM2_MARKERS):
        raise CheckpointError(f"tensor {hf_name!r} is InternLM2's layout (packed attention.wqkv, feed_forward, "
                              f"attention_norm); the `internlm` type converts first-generation InternLM only")
    if hf_name in _GLOBAL:
        return renamed(_GLOBAL[hf_name])
    where = split_layer_name(hf_name, "model.layers.", config["num_layers"])
    if where is None:
        return None
    layer, rest = where
    p = f"layers.{layer}.mixer."
    if rest.startswith("self_attn.o_proj."):
        return renamed(p + "out_proj." + rest.rpartition(".")[2])
    if rest in _LAYER:
        return renamed(f"layers.{layer}.{_LAYER[rest]}")
    module, _, kind = rest.rpartition(".")
    proj = module[len("self_attn."):] if module.startswith("self_attn.") else ""
    if proj in _QKV and kind in ("weight", "bias"):
        return TensorRule((p + f"Wqkv.{kind}",), lambda t: [t], part=(_QKV.index(proj), 3))
    return None


def _default_tensor(name: str, shape: Tuple[int, ...], config: Dict[str, Any]) -> Optional[torch.Tensor]:
    """Zero q/k/v/o biases for an HF model trained without them (``bias: false``): the same function."""
    if name.endswith(("mixer.Wqkv.bias", "mixer.out_proj.bias")):
        return torch.zeros(shape)
    return None


def _expected_shapes(cfg: Dict[str, Any], vocab: int) -> Dict[str, Tuple[int, ...]]:
    dim, ffn = int(cfg["hidden_size"]), _ffn(cfg)
    shapes = {"embedding.weight": (vocab, dim), "norm.weight": (dim,), "head.weight": (vocab, dim)}
    for i in range(int(cfg["num_layers"])):
        p = f"layers.{i}."
        shapes.update({
            p + "mixer.Wqkv.weight": (3 * dim, dim), p + "mixer.Wqkv.bias": (3 * dim,),
            p + "mixer.out_proj.weight": (dim, dim), p + "mixer.out_proj.bias": (dim,),
            p + "mlp.w1.weight": (ffn, dim), p + "mlp.w2.weight": (ffn, dim), p + "mlp.w3.weight": (dim, ffn),
            p + "norm1.weight": (dim,), p + "norm2.weight": (dim,),
        })
    return shapes


def _to_hf(state: Dict[str, torch.Tensor], config: Dict[str, Any], src: pathlib.Path):
    from dataclasses import asdict

    from ..model.LLM.internlm import ModelArgs

    unknown = sorted(set(config) - set(asdict(ModelArgs())))
    if unknown:
        raise ConfigError(f"{src / 'config.json'}: {unknown} are not internlm ModelArgs fields")
    config = asdict(ModelArgs(**{k: v for k, v in config.items() if k != "vocab_size"}))  # the defaults filled in
    if config["norm_type"] != "rmsnorm":
        raise CheckpointError(f"{src}: norm_type = {config['norm_type']!r} (LayerNorm); HF's InternLMForCausalLM "
                              f"has RMSNorm only")
    if config["rope_scaling"]:
        raise CheckpointError(f"{src}: rope_scaling = {config['rope_scaling']}; HF's InternLMForCausalLM has no "
                              f"linear RoPE scaling")
    dim, n_layers = int(config["hidden_size"]), int(config["num_layers"])
    hf_state: Dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in _GLOBAL_BACK:
            hf_state[_GLOBAL_BACK[name]] = tensor
            continue
        where = split_layer_name(name, "layers.", n_layers)
        rest = where[1] if where else ""
        if rest in ("mixer.Wqkv.weight", "mixer.Wqkv.bias"):
            kind = rest.rpartition(".")[2]
            if tensor.shape[0] != 3 * dim:
                raise CheckpointError(f"{src}: {name} has shape {tuple(tensor.shape)}; hidden_size {dim} needs "
                                      f"{3 * dim} rows")
            for proj, piece in zip(_QKV, tensor.split(dim, dim=0)):
                hf_state[f"model.layers.{where[0]}.self_attn.{proj}.{kind}"] = piece.clone()
        elif rest in _LAYER_BACK:
            hf_state[f"model.layers.{where[0]}.{_LAYER_BACK[rest]}"] = tensor
        else:
            raise CheckpointError(f"{src}: weight {name!r} has no place in HF's InternLMForCausalLM (a PEFT, "
                                  f"adapter or LayerNorm checkpoint?)")
    ffn = _ffn(config)
    if n_layers and hf_state["model.layers.0.mlp.gate_proj.weight"].shape[0] != ffn:
        raise ConfigError(f"{src / 'config.json'}: mlp_ratio / multiple_of give an FFN width of {ffn}, not the "
                          f"weights' {hf_state['model.layers.0.mlp.gate_proj.weight'].shape[0]}")
    hf_config: Dict[str, Any] = {
        "architectures": ["InternLMForCausalLM"], "model_type": "internlm",
        "auto_map": {"AutoConfig": "configuration_internlm.InternLMConfig",
                     "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
        "vocab_size": state["embedding.weight"].shape[0], "hidden_size": dim, "intermediate_size": ffn,
        "num_hidden_layers": n_layers, "num_attention_heads": int(config["num_attention_heads"]),
        "hidden_act": "silu", "rms_norm_eps": float(config["layer_norm_epsilon"]),
        "max_position_embeddings": int(config["max_seq_len"]), "bias": True,
        "rope_theta": float(config["rope_theta"]),
        "rotary": {"base": float(config["rope_theta"]), "type": "origin"},
        "initializer_range": 0.02, "use_cache": True,
    }
    return hf_state, hf_config


INTERNLM = HFArchitecture(
    llama_type="internlm", model_type="internlm", hf_class="InternLMForCausalLM",
    accessory_config=_accessory_config, check_mp=_check_mp, split_plan=_split_plan,
    tensor_rule=_tensor_rule, expected_shapes=_expected_shapes, to_hf=_to_hf,
    embedding="embedding.weight", output="head.weight", default_tensor=_default_tensor)
