"""HF ``MixtralForCausalLM`` <-> Accessory ``mixtral`` (the driver is :mod:`.hf`).

Attention, norms, embedding and head are llama's (q/k rows permuted between HF's rotate-half and
Meta's interleaved order). The feed-forward is a mixture of experts: HF's router
``mlp.gate`` (``block_sparse_moe.gate`` in hub checkpoints) is the original's ``feed_forward.gate``;
expert ``e``'s ``w1`` (gate), ``w2`` (down), ``w3`` (up) are read either from hub-style
``block_sparse_moe.experts.{e}.w{1,2,3}.weight`` or from transformers 5's fused
``mlp.experts.gate_up_proj`` (E, 2*hidden, dim: w1 rows then w3 rows) and ``mlp.experts.down_proj``
(E, dim, hidden). The HF side is written hub-style, which transformers 4 and 5 both load.
"""

from __future__ import annotations

import pathlib
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import CheckpointError
from .hf import (HFArchitecture, TensorRule, _hf_rope, check_heads_divide, hf_attention_sizes, hf_int,
                 hf_rope_fields, llama_global_rule,
                 llama_attention_rule, llama_attention_shapes, llama_attention_to_hf, no_place_in_hf,
                 renamed, split_layer_name)

__all__ = ["MIXTRAL"]


def _accessory_config(hf: Dict[str, Any], path: pathlib.Path) -> Dict[str, Any]:
    """The ``mixtral`` ModelArgs fields for an HF MixtralConfig dict (checks what ``mixtral`` cannot express)."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{path}: hidden_act = {act!r}; the `mixtral` type's experts use silu")
    dim, n_layers, n_heads, n_kv = hf_attention_sizes(hf, path, "mixtral")
    hidden, num_experts, top_k = (hf_int(hf, key, path, "mixtral")
                                  for key in ("intermediate_size", "num_local_experts", "num_experts_per_tok"))
    theta, rope_scaling = _hf_rope(hf, path, "mixtral")
    config: Dict[str, Any] = {
        "dim": dim, "hidden_dim": hidden, "head_dim": dim // n_heads, "n_layers": n_layers, "n_heads": n_heads,
        "n_kv_heads": n_kv, "norm_eps": float(hf.get("rms_norm_eps", 1e-5)), "rope_theta": theta,
        "moe": {"num_experts": num_experts, "num_experts_per_tok": top_k}, "rope_scaling": rope_scaling,
    }
    max_len = hf.get("max_position_embeddings")
    window = hf.get("sliding_window")
    if window and (not max_len or int(window) < int(max_len)):
        # `mixtral` attends to the whole context: exact only up to the window
        max_len = int(window)
    if max_len:
        config["max_seq_len"] = int(max_len)
    return config


def _check_mp(config: Dict[str, Any], mp: int, path: pathlib.Path) -> None:
    check_heads_divide(config, mp, path, (("num_attention_heads", config["n_heads"]),
                                          ("num_key_value_heads", config["n_kv_heads"]),
                                          ("num_local_experts", config["moe"]["num_experts"])))


def _split_plan(config: Dict[str, Any]):
    from ..model.LLM.mixtral import Transformer
    return Transformer.plan_for(int(config["moe"]["num_experts"]))  # the plan a built model holds


_HUB_EXPERT = "block_sparse_moe.experts."


def _tensor_rule(hf_name: str, config: Dict[str, Any]) -> Optional[TensorRule]:
    where = split_layer_name(hf_name, "model.layers.", config["n_layers"])
    if where is None:
        return llama_global_rule(hf_name)
    layer, rest = where
    ff = f"layers.{layer}.feed_forward."
    num_experts = int(config["moe"]["num_experts"])
    if rest in ("mlp.gate.weight", "block_sparse_moe.gate.weight"):
        return renamed(ff + "gate.weight")
    if rest.startswith(_HUB_EXPERT):
        expert, _, proj = rest[len(_HUB_EXPERT):].partition(".")
        if expert.isdigit() and int(expert) < num_experts and proj in ("w1.weight", "w2.weight", "w3.weight"):
            return renamed(f"{ff}experts.{expert}.{proj}")
        return None
    if rest == "mlp.experts.gate_up_proj":
        names = tuple(f"{ff}experts.{e}.{w}.weight" for w in ("w1", "w3") for e in range(num_experts))
        return TensorRule(names, lambda t: [m for half in t.chunk(2, dim=1) for m in half.unbind(0)])
    if rest == "mlp.experts.down_proj":
        names = tuple(f"{ff}experts.{e}.w2.weight" for e in range(num_experts))
        return TensorRule(names, lambda t: list(t.unbind(0)))
    return llama_attention_rule(rest, layer, config)


def _expected_shapes(cfg: Dict[str, Any], vocab: int) -> Dict[str, Tuple[int, ...]]:
    dim, hidden = cfg["dim"], cfg["hidden_dim"]
    shapes = llama_attention_shapes(cfg, vocab)
    num_experts = int(cfg["moe"]["num_experts"])
    for i in range(cfg["n_layers"]):
        ff = f"layers.{i}.feed_forward."
        shapes[ff + "gate.weight"] = (num_experts, dim)
        for e in range(num_experts):
            shapes.update({f"{ff}experts.{e}.w1.weight": (hidden, dim), f"{ff}experts.{e}.w2.weight": (dim, hidden),
                           f"{ff}experts.{e}.w3.weight": (hidden, dim)})
    return shapes


def _to_hf(state: Dict[str, torch.Tensor], config: Dict[str, Any], src: pathlib.Path):
    from ..model.LLM.mixtral import ModelArgs, moe_sizes

    args = ModelArgs(**{k: v for k, v in config.items() if k != "vocab_size"})
    num_experts, top_k = moe_sizes(args)
    hf_state: Dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        mapped = llama_attention_to_hf(name, tensor, config)
        if mapped is None:
            where = split_layer_name(name, "layers.", args.n_layers)
            rest = where[1] if where else ""
            if rest == "feed_forward.gate.weight":
                mapped = f"model.layers.{where[0]}.block_sparse_moe.gate.weight", tensor
            elif rest.startswith("feed_forward.experts.") and rest.endswith((".w1.weight", ".w2.weight", ".w3.weight")):
                mapped = f"model.layers.{where[0]}.block_sparse_moe.{rest[len('feed_forward.'):]}", tensor
            else:
                raise no_place_in_hf(src, name, "MixtralForCausalLM")
        hf_state[mapped[0]] = mapped[1]
    n_heads = args.n_heads
    hf_config: Dict[str, Any] = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": state["tok_embeddings.weight"].shape[0], "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": args.n_kv_heads or n_heads,
        "head_dim": args.dim // n_heads, "hidden_act": "silu", "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len, "num_local_experts": num_experts,
        "num_experts_per_tok": top_k, "sliding_window": None, "router_jitter_noise": 0.0,
        "router_aux_loss_coef": args.load_balancing_weight, "output_router_logits": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }
    hf_config.update(hf_rope_fields(config))
    return hf_state, hf_config


MIXTRAL = HFArchitecture(
    llama_type="mixtral", model_type="mixtral", hf_class="MixtralForCausalLM",
    accessory_config=_accessory_config, check_mp=_check_mp, split_plan=_split_plan,
    tensor_rule=_tensor_rule, expected_shapes=_expected_shapes, to_hf=_to_hf)
