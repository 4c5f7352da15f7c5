"""HF ``FalconForCausalLM`` <-> Accessory ``falcon`` (the driver is :mod:`.hf`).

Names: ``transformer.word_embeddings`` / ``transformer.h.{i}.*`` / ``transformer.ln_f`` / ``lm_head``
against ``word_embeddings`` / ``layers.{i}.*`` / ``ln_f`` / ``output``. Both sides use rotate-half
RoPE, so no rows are permuted; HF fuses q, k and v into ``query_key_value``, laid out per variant:

* new decoder architecture: ``(kv_heads, heads/kv_heads + 2, head_dim)`` groups (q heads, k, v);
* old architecture, multi-query: all q heads, then the one k head, then the one v head;
* old architecture, multi-head: ``(heads, 3, head_dim)``.

Which HF models ``falcon`` can hold: the original builds ONE key/value head (``multi_query``) or
one per query head, so a new-architecture model maps only when ``num_kv_heads`` is 1 or equal to
``num_attention_heads``; ALiBi, another activation or FFN width, and one shared LayerNorm in the new
architecture are refused too.
"""

from __future__ import annotations

import pathlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import CheckpointError
from .hf import HFArchitecture, TensorRule, _hf_rope, check_heads_divide, hf_rope_fields, renamed, split_layer_name

__all__ = ["FALCON"]

_GLOBAL = {"transformer.word_embeddings.weight": "word_embeddings.weight",
           "transformer.ln_f.weight": "ln_f.weight", "transformer.ln_f.bias": "ln_f.bias",
           "lm_head.weight": "output.weight"}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}
_LINEARS = ("self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_NORMS = ("ln_attn", "ln_mlp", "input_layernorm", "post_attention_layernorm")


def _accessory_config(hf: Dict[str, Any], path: pathlib.Path) -> Dict[str, Any]:
    """The ``falcon`` ModelArgs fields for an HF FalconConfig dict (refuses what ``falcon`` cannot build)."""
    try:
        dim, n_layers, n_heads = int(hf["hidden_size"]), int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
    except KeyError as exc:
        raise CheckpointError(f"{path}: the config has no {exc.args[0]!r}, which a Falcon config must have") from exc
    if dim % n_heads:
        raise CheckpointError(f"{path}: hidden_size {dim} is not divisible by num_attention_heads {n_heads}")
    if hf.get("alibi"):
        raise CheckpointError(f"{path}: alibi = true (Falcon-RW); the `falcon` type has rotary embeddings only")
    if hf.get("activation", "gelu") != "gelu":
        raise CheckpointError(f"{path}: activation = {hf['activation']!r}; the `falcon` type's MLP uses exact gelu")
    ffn = hf.get("ffn_hidden_size")
    if ffn is not None and int(ffn) != 4 * dim:
        raise CheckpointError(f"{path}: ffn_hidden_size = {ffn}; the `falcon` type's MLP is 4 * hidden_size = "
                              f"{4 * dim} wide")
    new_arch = bool(hf.get("new_decoder_architecture", False))
    parallel = bool(hf.get("parallel_attn", True))
    n_ln = hf.get("num_ln_in_parallel_attn")
    if new_arch:
        if not parallel or n_ln not in (None, 2):
            raise CheckpointError(f"{path}: a new-decoder-architecture model with parallel_attn = {parallel} and "
                                  f"num_ln_in_parallel_attn = {n_ln}; the `falcon` type's new architecture has "
                                  f"parallel attention and MLP with two LayerNorms (ln_attn, ln_mlp)")
        n_kv = int(hf.get("num_kv_heads") or n_heads)
        if n_kv not in (1, n_heads):
            raise CheckpointError(
                f"{path}: num_kv_heads = {n_kv} with new_decoder_architecture; the `falcon` type builds, as the "
                f"original does, either ONE key/value head (multi_query) or one per query head "
                f"({n_heads}), so a model with {n_kv} grouped key/value heads cannot be represented")
        multi_query = n_kv == 1
    else:
        if n_ln not in (None, 1):
            raise CheckpointError(f"{path}: num_ln_in_parallel_attn = {n_ln} needs new_decoder_architecture")
        multi_query = bool(hf.get("multi_query", True))
        n_kv = 1 if multi_query else n_heads
    theta, rope_scaling = _hf_rope(hf, path, "falcon")
    config: Dict[str, Any] = {
        "num_layers": n_layers, "hidden_size": dim, "num_attention_heads": n_heads,
        "bias": bool(hf.get("bias", False)), "multi_query": multi_query, "new_decoder_architecture": new_arch,
        "parallel_attn": parallel, "num_kv_heads": n_kv,
        "layer_norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)), "rope_theta": theta,
        "rope_scaling": rope_scaling,
    }
    if hf.get("max_position_embeddings"):
        config["max_seq_len"] = int(hf["max_position_embeddings"])
    return config


def _n_kv(config: Dict[str, Any]) -> int:
    return 1 if config["multi_query"] else int(config["num_attention_heads"])


def _check_mp(config: Dict[str, Any], mp: int, path: pathlib.Path) -> None:
    check_heads_divide(config, mp, path, (("num_attention_heads", config["num_attention_heads"]),))


def _split_plan(config: Dict[str, Any]):
    from ..model.LLM.falcon import FalconSplitPlan
    return FalconSplitPlan(bool(config.get("multi_query", True)))  # what Transformer(ModelArgs(...)) holds


def split_qkv(fused: torch.Tensor, config: Dict[str, Any]) -> List[torch.Tensor]:
    """[wq, wk, wv] rows (or bias entries) from HF's ``query_key_value``, per the config's variant."""
    n_heads, n_kv = int(config["num_attention_heads"]), _n_kv(config)
    hd, tail = int(config["hidden_size"]) // n_heads, fused.shape[1:]
    if config["new_decoder_architecture"]:
        groups = fused.reshape(n_kv, n_heads // n_kv + 2, hd, *tail)
        return [groups[:, :-2].reshape(-1, *tail), groups[:, -2].reshape(-1, *tail), groups[:, -1].reshape(-1, *tail)]
    if config["multi_query"]:
        heads = fused.reshape(n_heads + 2, hd, *tail)
        return [heads[:n_heads].reshape(-1, *tail), heads[n_heads], heads[n_heads + 1]]
    heads = fused.reshape(n_heads, 3, hd, *tail)
    return [heads[:, i].reshape(-1, *tail) for i in range(3)]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Dict[str, Any]) -> torch.Tensor:
    """HF's ``query_key_value`` from wq, wk, wv (inverse of :func:`split_qkv`)."""
    n_heads, n_kv = int(config["num_attention_heads"]), _n_kv(config)
    hd, tail = int(config["hidden_size"]) // n_heads, q.shape[1:]
    q, k, v = q.reshape(n_heads, hd, *tail), k.reshape(n_kv, hd, *tail), v.reshape(n_kv, hd, *tail)
    if config["new_decoder_architecture"]:
        groups = q.reshape(n_kv, n_heads // n_kv, hd, *tail)
        return torch.cat((groups, k[:, None], v[:, None]), dim=1).reshape(-1, *tail)
    if config["multi_query"]:
        return torch.cat((q, k, v), dim=0).reshape(-1, *tail)
    return torch.stack((q, k, v), dim=1).reshape(-1, *tail)


def _tensor_rule(hf_name: str, config: Dict[str, Any]) -> Optional[TensorRule]:
    if hf_name in _GLOBAL:
        return renamed(_GLOBAL[hf_name])
    where = split_layer_name(hf_name, "transformer.h.", config["num_layers"])
    if where is None:
        return None
    layer, rest = where
    module, _, kind = rest.rpartition(".")
    if module == "self_attention.query_key_value" and kind in ("weight", "bias"):
        names = tuple(f"layers.{layer}.self_attention.{w}.{kind}" for w in ("wq", "wk", "wv"))
        return TensorRule(names, lambda t: split_qkv(t, config))
    if module in _LINEARS + _NORMS and kind in ("weight", "bias"):
        return renamed(f"layers.{layer}.{rest}")
    return None


def _expected_shapes(cfg: Dict[str, Any], vocab: int) -> Dict[str, Tuple[int, ...]]:
    dim = cfg["hidden_size"]
    kv_dim = _n_kv(cfg) * (dim // cfg["num_attention_heads"])
    shapes = {"word_embeddings.weight": (vocab, dim), "ln_f.weight": (dim,), "ln_f.bias": (dim,),
              "output.weight": (vocab, dim)}
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        linears = {"self_attention.wq": (dim, dim), "self_attention.wk": (kv_dim, dim),
                   "self_attention.wv": (kv_dim, dim), "self_attention.dense": (dim, dim),
                   "mlp.dense_h_to_4h": (4 * dim, dim), "mlp.dense_4h_to_h": (dim, 4 * dim)}
        for name, shape in linears.items():
            shapes[p + name + ".weight"] = shape
            if cfg["bias"]:
                shapes[p + name + ".bias"] = shape[:1]
        if cfg["new_decoder_architecture"]:
            norms = ["ln_attn", "ln_mlp"]
        else:
            norms = ["input_layernorm"] + ([] if cfg["parallel_attn"] else ["post_attention_layernorm"])
        for norm in norms:
            shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (dim,)
    return shapes


def _to_hf(state: Dict[str, torch.Tensor], config: Dict[str, Any], src: pathlib.Path):
    from dataclasses import asdict

    from ..model.LLM.falcon import ModelArgs

    config = asdict(ModelArgs(**{k: v for k, v in config.items() if k != "vocab_size"}))  # the defaults filled in
    hf_state: Dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in _GLOBAL_BACK:
            hf_state[_GLOBAL_BACK[name]] = tensor
            continue
        where = split_layer_name(name, "layers.", config["num_layers"])
        module, _, kind = where[1].rpartition(".") if where else ("", "", "")
        if module in ("self_attention.wk", "self_attention.wv"):
            continue  # fused with wq below
        if module == "self_attention.wq":
            attn = f"layers.{where[0]}.self_attention."
            try:
                k, v = state[attn + "wk." + kind], state[attn + "wv." + kind]
            except KeyError as exc:
                raise CheckpointError(f"{src}: {name} has no {exc.args[0]} to fuse with") from exc
            fused = fuse_qkv(tensor, k, v, config)
            hf_state[f"transformer.h.{where[0]}.self_attention.query_key_value.{kind}"] = fused
        elif module in _LINEARS + _NORMS and kind in ("weight", "bias"):
            hf_state[f"transformer.h.{where[0]}.{where[1]}"] = tensor
        else:
            raise CheckpointError(f"{src}: weight {name!r} has no place in HF's FalconForCausalLM")
    new_arch = bool(config["new_decoder_architecture"])
    hf_config: Dict[str, Any] = {
        "architectures": ["FalconForCausalLM"], "model_type": "falcon",
        "vocab_size": state["word_embeddings.weight"].shape[0], "hidden_size": config["hidden_size"],
        "num_hidden_layers": config["num_layers"], "num_attention_heads": config["num_attention_heads"],
        # the kv heads the original builds (its num_kv_heads field is not what it runs with)
        "num_kv_heads": _n_kv(config), "new_decoder_architecture": new_arch,
        "multi_query": bool(config["multi_query"]),
        "parallel_attn": True if new_arch else bool(config["parallel_attn"]),
        "num_ln_in_parallel_attn": 2 if new_arch else None, "bias": bool(config["bias"]), "alibi": False,
        "layer_norm_epsilon": float(config["layer_norm_epsilon"]), "activation": "gelu",
        "ffn_hidden_size": 4 * config["hidden_size"], "max_position_embeddings": int(config["max_seq_len"]),
        "attention_dropout": 0.0, "hidden_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }
    hf_config.update(hf_rope_fields(config))
    return hf_state, hf_config


FALCON = HFArchitecture(
    llama_type="falcon", model_type="falcon", hf_class="FalconForCausalLM",
    accessory_config=_accessory_config, check_mp=_check_mp, split_plan=_split_plan,
    tensor_rule=_tensor_rule, expected_shapes=_expected_shapes, to_hf=_to_hf,
    embedding="word_embeddings.weight")
