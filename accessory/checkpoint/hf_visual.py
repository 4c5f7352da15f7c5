"""HF transformers weights -> the key names of :mod:`accessory.model.visual` (the original's names).

Each ``*_from_hf(source)`` takes an HF state dict (any ``Mapping[str, Tensor]``) or an HF model
directory / weight file, and returns ``{our name: tensor}`` for one encoder, relative to it (prefix
it with ``clip.``, ``qformer.``, ``openclip_convnext_xxl.`` or ``dinov2_vitg14.`` to place it in a
multimodal llama_type). Both the on-disk spellings of the Hub checkpoints and the in-memory names of
transformers 5 modules are accepted. Tensors that belong to other parts of the HF model (the OPT
language model of BLIP-2, classifier heads, ``position_ids`` buffers) are dropped; any other
unrecognised tensor is an error, so a wrong checkpoint cannot load half-way.

* :func:`clip_from_hf`: ``CLIPModel`` / ``CLIPVisionModel(WithProjection)`` -> :class:`CLIP`.
* :func:`blip2_from_hf`: ``Blip2Model`` / ``Blip2ForConditionalGeneration`` -> :class:`BLIP2`.
* :func:`convnext_from_hf`: ``ConvNextModel`` -> :class:`ConvNeXt`; :func:`convnext_from_open_clip`
  takes an open_clip ConvNeXt checkpoint (``visual.trunk.*``) instead.
* :func:`dinov2_from_hf`: ``Dinov2Model`` (SwiGLU, i.e. dinov2-giant) -> :class:`DINOv2`.

``*_config_from_hf(config)`` turn the matching HF ``config.json`` (a dict, a file or a directory)
into our config dataclasses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..errors import CheckpointError, ConfigError
from ..model.visual import BLIP2Config, CLIPConfig, ConvNeXtConfig, DINOv2Config
from .reader import LazySafetensors, read_state_dict

__all__ = ["read_hf_weights", "clip_from_hf", "blip2_from_hf", "convnext_from_hf", "convnext_from_open_clip",
           "dinov2_from_hf", "clip_config_from_hf", "blip2_config_from_hf", "convnext_config_from_hf",
           "dinov2_config_from_hf"]

Source = Union[Mapping[str, torch.Tensor], str, Path]


# ----------------------------------------------------------------------------------------------------------
# Reading


class _Union(Mapping):
    """Several mappings seen as one (the shards of an HF directory)."""

    def __init__(self, parts: List[Mapping]):
        self._where = {key: part for part in parts for key in part}

    def __getitem__(self, key):
        return self._where[key][key]

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def read_hf_weights(source: Source) -> Mapping[str, torch.Tensor]:
    """The tensors of ``source``: a mapping (returned as is), a ``.safetensors`` / ``.bin`` / ``.pth``
    file, or an HF model directory (``*.safetensors`` shards, else ``pytorch_model*.bin``)."""
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if path.is_file():
        return read_state_dict(path, add_prefix=False) if path.suffix != ".safetensors" else LazySafetensors(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist; pass an HF model directory, a weight file or a state dict")
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{path} holds no weights (*.safetensors or pytorch_model*.bin); download the "
                              f"model files into it")
    return _Union([LazySafetensors(f) if f.suffix == ".safetensors" else read_state_dict(f) for f in files])


def _read_config(config: Union[Mapping, str, Path]) -> Mapping:
    if isinstance(config, Mapping):
        return config
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the HF config {path}: {exc}; pass the model directory that holds "
                          f"config.json") from exc


# ----------------------------------------------------------------------------------------------------------
# Renaming machinery: rules map an HF name to (our name, slot); slots of one name are concatenated on dim 0


Rule = Tuple[str, Callable[[re.Match], Tuple[str, int]]]


def _convert(weights: Mapping[str, torch.Tensor], rules: List[Rule], ignore: Callable[[str], bool],
             slots: Dict[str, int], what: str, transforms: Optional[Dict[str, Callable]] = None
             ) -> Dict[str, torch.Tensor]:
    """Apply the first matching rule to each name; concatenate multi-slot targets; check completeness.

    ``slots``: for names ending in one of its keys, how many pieces make the tensor (q, k, v -> 3).
    """
    compiled = [(re.compile(pattern), make) for pattern, make in rules]
    pieces: Dict[str, Dict[int, torch.Tensor]] = {}
    unknown = []
    for name in weights:
        if ignore(name):
            continue
        for pattern, make in compiled:
            match = pattern.fullmatch(name)
            if match:
                target, slot = make(match)
                if slot in pieces.setdefault(target, {}):
                    raise CheckpointError(f"{what}: two HF tensors map onto {target}; the checkpoint mixes "
                                          f"two layouts")
                pieces[target][slot] = weights[name]
                break
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{what}: {len(unknown)} tensors are not part of this encoder: "
                              f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}. Check that the "
                              f"checkpoint is the right kind of model")
    if not pieces:
        raise CheckpointError(f"{what}: the checkpoint has none of this encoder's tensors; check that it is "
                              f"the right kind of model")
    out = {}
    for target, parts in pieces.items():
        need = next((count for suffix, count in slots.items() if target.endswith(suffix)), 1)
        if sorted(parts) != list(range(need)):
            raise CheckpointError(f"{what}: {target} needs {need} HF pieces but only {len(parts)} were found; "
                                  f"the checkpoint is incomplete")
        tensor = parts[0] if need == 1 else torch.cat([parts[i] for i in range(need)], dim=0)
        for suffix, transform in (transforms or {}).items():
            if target.endswith(suffix):
                tensor = transform(tensor)
        out[target] = tensor
    return out


def _fixed(target: str, slot: int = 0):
    """A rule target: ``target`` with the pattern's groups filled in, as piece ``slot``."""
    return lambda m: (target.format(*m.groups()), slot)


def _transpose(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t().contiguous()


# ----------------------------------------------------------------------------------------------------------
# CLIP

_CLIP_LAYER = [
    (r"self_attn\.q_proj\.(weight|bias)", "attn.in_proj_{}", 0),
    (r"self_attn\.k_proj\.(weight|bias)", "attn.in_proj_{}", 1),
    (r"self_attn\.v_proj\.(weight|bias)", "attn.in_proj_{}", 2),
    (r"self_attn\.out_proj\.(weight|bias)", "attn.out_proj.{}", 0),
    (r"layer_norm1\.(weight|bias)", "ln_1.{}", 0),
    (r"layer_norm2\.(weight|bias)", "ln_2.{}", 0),
    (r"mlp\.fc1\.(weight|bias)", "mlp.c_fc.{}", 0),
    (r"mlp\.fc2\.(weight|bias)", "mlp.c_proj.{}", 0),
]


def _clip_layer_rules(hf_prefix: str, our_prefix: str) -> List[Rule]:
    rules = []
    for pattern, target, slot in _CLIP_LAYER:
        def make(m, target=target, slot=slot):
            return f"{our_prefix}{m.group(1)}.{target.format(m.group(2))}", slot
        rules.append((re.escape(hf_prefix) + r"encoder\.layers\.(\d+)\." + pattern, make))
    return rules


def clip_from_hf(source: Source, text_tower: bool = False) -> Dict[str, torch.Tensor]:
    """HF CLIP weights -> :class:`~accessory.model.visual.CLIP` names.

    ``CLIPModel`` gives every tensor of our CLIP (the text tower's ``transformer.resblocks.*`` only
    with ``text_tower``); a vision-only checkpoint gives the ``visual.*`` tensors (``visual.proj``
    needs ``visual_projection.weight``, i.e. ``CLIPModel`` or ``CLIPVisionModelWithProjection``).
    """
    weights = read_hf_weights(source)
    vision = "vision_model." if any(k.startswith("vision_model.") for k in weights) else ""
    rules: List[Rule] = [
        (re.escape(vision) + r"embeddings\.class_embedding", _fixed("visual.class_embedding")),
        (re.escape(vision) + r"embeddings\.patch_embedding\.weight", _fixed("visual.conv1.weight")),
        (re.escape(vision) + r"embeddings\.position_embedding\.weight", _fixed("visual.positional_embedding")),
        (re.escape(vision) + r"pre_layrnorm\.(weight|bias)", _fixed("visual.ln_pre.{}")),
        (re.escape(vision) + r"post_layernorm\.(weight|bias)", _fixed("visual.ln_post.{}")),
        (r"visual_projection\.weight", _fixed("visual.proj")),
        (r"text_model\.embeddings\.token_embedding\.weight", _fixed("token_embedding.weight")),
        (r"text_model\.embeddings\.position_embedding\.weight", _fixed("positional_embedding")),
        (r"text_model\.final_layer_norm\.(weight|bias)", _fixed("ln_final.{}")),
        (r"text_projection\.weight", _fixed("text_projection")),
        (r"logit_scale", _fixed("logit_scale")),
    ]
    rules += _clip_layer_rules(vision, "visual.transformer.resblocks.")
    rules += _clip_layer_rules("text_model.", "transformer.resblocks.")

    def ignore(name: str) -> bool:
        return (name.endswith("position_ids")
                or (not text_tower and name.startswith("text_model.encoder.")))

    # HF keeps the projections as Linear weights (out, in); open_clip as matrices applied on the right.
    transposed = {"visual.proj": _transpose, "text_projection": _transpose}
    return _convert(weights, rules, ignore, {"in_proj_weight": 3, "in_proj_bias": 3}, "CLIP from HF", transposed)


def clip_config_from_hf(config, quick_gelu: Optional[bool] = None, text_tower: bool = False) -> CLIPConfig:
    """Our :class:`CLIPConfig` from an HF ``CLIPConfig`` / ``CLIPVisionConfig`` (dict, file or dir).

    ``quick_gelu`` defaults to the HF ``hidden_act`` (``quick_gelu`` for OpenAI's checkpoints)."""
    cfg = _read_config(config)
    vision = cfg.get("vision_config", cfg)
    text = cfg.get("text_config") or {}
    act = vision.get("hidden_act", "quick_gelu")
    width = vision.get("hidden_size", 768)
    fields = dict(image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 32), width=width,
                  layers=vision.get("num_hidden_layers", 12), heads=vision.get("num_attention_heads", 12),
                  mlp_ratio=vision.get("intermediate_size", 3072) / width,
                  embed_dim=cfg.get("projection_dim", vision.get("projection_dim", 512)),
                  quick_gelu=(act == "quick_gelu") if quick_gelu is None else quick_gelu,
                  text_tower=text_tower, eps=vision.get("layer_norm_eps", 1e-5))
    if text:
        fields.update(vocab_size=text.get("vocab_size", 49408),
                      context_length=text.get("max_position_embeddings", 77),
                      text_width=text.get("hidden_size", 512), text_heads=text.get("num_attention_heads", 8),
                      text_layers=text.get("num_hidden_layers", 12))
    return CLIPConfig(**fields)


# ----------------------------------------------------------------------------------------------------------
# BLIP-2


def blip2_from_hf(source: Source) -> Dict[str, torch.Tensor]:
    """HF BLIP-2 weights -> :class:`~accessory.model.visual.BLIP2` names (they are the same; the
    language model and ``language_projection`` are dropped). A checkpoint that stores the vision
    attention bias as ``q_bias`` / ``v_bias`` gets them packed into ``qkv.bias`` (k's bias is 0)."""
    weights = read_hf_weights(source)
    keep = re.compile(r"(?:model\.)?((?:vision_model|qformer)\..+|query_tokens)")
    split_bias = re.compile(r"(vision_model\.encoder\.layers\.\d+\.self_attn\.)(q_bias|v_bias)")
    other_parts = re.compile(r"(?:model\.)?(language_model|language_projection|lm_head)\..*|.*position_ids")

    def ignore(name: str) -> bool:
        return other_parts.fullmatch(name) is not None

    out: Dict[str, torch.Tensor] = {}
    biases: Dict[str, Dict[str, torch.Tensor]] = {}
    unknown = []
    for name in weights:
        if ignore(name):
            continue
        match = keep.fullmatch(name)
        if not match:
            unknown.append(name)
            continue
        ours = match.group(1)
        bias = split_bias.fullmatch(ours)
        if bias:
            biases.setdefault(bias.group(1), {})[bias.group(2)] = weights[name]
        else:
            out[ours] = weights[name]
    if unknown:
        raise CheckpointError(f"BLIP-2 from HF: {len(unknown)} tensors are not part of BLIP-2: "
                              f"{', '.join(unknown[:8])}. Check that the checkpoint is a Blip2Model")
    for prefix, pair in biases.items():
        if set(pair) != {"q_bias", "v_bias"}:
            raise CheckpointError(f"BLIP-2 from HF: {prefix} has {sorted(pair)} but needs both q_bias and v_bias")
        out[prefix + "qkv.bias"] = torch.cat([pair["q_bias"], torch.zeros_like(pair["q_bias"]), pair["v_bias"]])
    if "query_tokens" not in out:
        raise CheckpointError("BLIP-2 from HF: no query_tokens; the checkpoint is not a Blip2Model")
    return out


def blip2_config_from_hf(config) -> BLIP2Config:
    """Our :class:`BLIP2Config` from an HF ``Blip2Config`` (dict, file or dir)."""
    cfg = _read_config(config)
    vision, qformer = cfg.get("vision_config") or {}, cfg.get("qformer_config") or {}
    patch = vision.get("patch_size", 14)
    return BLIP2Config(image_size=vision.get("image_size", 224), patch_size=patch,
                       vision_width=vision.get("hidden_size", 1408), vision_layers=vision.get("num_hidden_layers", 39),
                       vision_heads=vision.get("num_attention_heads", 16),
                       vision_mlp=vision.get("intermediate_size", 6144), vision_eps=vision.get("layer_norm_eps", 1e-6),
                       qformer_width=qformer.get("hidden_size", 768), qformer_layers=qformer.get("num_hidden_layers", 12),
                       qformer_heads=qformer.get("num_attention_heads", 12),
                       qformer_mlp=qformer.get("intermediate_size", 3072),
                       qformer_eps=qformer.get("layer_norm_eps", 1e-12),
                       cross_attention_frequency=qformer.get("cross_attention_frequency", 2),
                       num_query_tokens=cfg.get("num_query_tokens", 32))


# ----------------------------------------------------------------------------------------------------------
# ConvNeXt


def convnext_from_hf(source: Source) -> Dict[str, torch.Tensor]:
    """HF ``ConvNextModel`` (or ``ConvNextForImageClassification``, head dropped) -> :class:`ConvNeXt`.

    HF's ConvNeXt uses LayerNorm eps 1e-6 inside (our default is convnext_xxlarge's 1e-5): build
    the model from :func:`convnext_config_from_hf`. The classifier head is dropped."""
    weights = read_hf_weights(source)
    p = "convnext." if any(k.startswith("convnext.") for k in weights) else ""
    p = re.escape(p)
    layer = p + r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
    rules: List[Rule] = [
        (p + r"embeddings\.patch_embeddings\.(weight|bias)", _fixed("stem.0.{}")),
        (p + r"embeddings\.layernorm\.(weight|bias)", _fixed("stem.1.{}")),
        (p + r"encoder\.stages\.(\d+)\.downsampling_layer\.([01])\.(weight|bias)", _fixed("stages.{}.downsample.{}.{}")),
        (layer + r"dwconv\.(weight|bias)", _fixed("stages.{}.blocks.{}.conv_dw.{}")),
        (layer + r"layernorm\.(weight|bias)", _fixed("stages.{}.blocks.{}.norm.{}")),
        (layer + r"pwconv1\.(weight|bias)", _fixed("stages.{}.blocks.{}.mlp.fc1.{}")),
        (layer + r"pwconv2\.(weight|bias)", _fixed("stages.{}.blocks.{}.mlp.fc2.{}")),
        (layer + r"layer_scale_parameter", _fixed("stages.{}.blocks.{}.gamma")),
        (p + r"layernorm\.(weight|bias)", _fixed("head.norm.{}")),
    ]
    return _convert(weights, rules, lambda name: name.startswith("classifier."), {}, "ConvNeXt from HF")


def convnext_from_open_clip(source: Source) -> Dict[str, torch.Tensor]:
    """An open_clip ConvNeXt CLIP checkpoint (e.g. laion/CLIP-convnext_xxlarge-*'s
    ``open_clip_pytorch_model.bin``) -> :class:`ConvNeXt` names: its ``visual.trunk.*`` tensors
    without the prefix (the text tower and ``visual.head.*`` are dropped)."""
    weights = read_hf_weights(source)
    prefix = "visual.trunk."
    out = {name[len(prefix):]: weights[name] for name in weights
           if name.startswith(prefix) and not name.startswith(prefix + "head.fc.")}
    if not out:
        raise CheckpointError("ConvNeXt from open_clip: no visual.trunk.* tensors; the checkpoint is not an "
                              "open_clip timm-trunk model")
    return out


def convnext_config_from_hf(config) -> ConvNeXtConfig:
    """Our :class:`ConvNeXtConfig` from an HF ``ConvNextConfig`` (dict, file or dir): HF hard-codes
    LayerNorm eps 1e-6 everywhere except the final norm, which uses ``layer_norm_eps``."""
    cfg = _read_config(config)
    return ConvNeXtConfig(depths=tuple(cfg.get("depths", (3, 3, 9, 3))),
                          dims=tuple(cfg.get("hidden_sizes", (96, 192, 384, 768))),
                          patch_size=cfg.get("patch_size", 4), eps=1e-6,
                          head_eps=cfg.get("layer_norm_eps", 1e-12))


# ----------------------------------------------------------------------------------------------------------
# DINOv2


def dinov2_from_hf(source: Source) -> Dict[str, torch.Tensor]:
    """HF ``Dinov2Model`` with SwiGLU (facebook/dinov2-giant) -> :class:`DINOv2` (the hub names).

    Reads the Hub spelling (``attention.attention.query``, ``mlp.weights_in``) and transformers 5's
    (``attention.q_proj``, ``mlp.gate_proj``/``up_proj``); q, k, v pack into ``attn.qkv``."""
    weights = read_hf_weights(source)
    if any(re.search(r"\.mlp\.fc1\.", k) for k in weights):
        raise CheckpointError("DINOv2 from HF: this checkpoint has a plain MLP (mlp.fc1); only the SwiGLU "
                              "variant (dinov2-giant, the one the original uses) is supported")
    p = re.escape("dinov2." if any(k.startswith("dinov2.") for k in weights) else "")
    layer = p + r"encoder\.layer\.(\d+)\."

    def at(target: str, slot: int = 0):
        return lambda m: (f"blocks.{m.group(1)}.{target.format(*m.groups()[1:])}", slot)

    rules: List[Rule] = [
        (p + r"embeddings\.cls_token", _fixed("cls_token")),
        (p + r"embeddings\.mask_token", _fixed("mask_token")),
        (p + r"embeddings\.position_embeddings", _fixed("pos_embed")),
        (p + r"embeddings\.patch_embeddings\.projection\.(weight|bias)", _fixed("patch_embed.proj.{}")),
        (layer + r"norm([12])\.(weight|bias)", at("norm{}.{}")),
        (layer + r"attention\.(?:attention\.query|q_proj)\.(weight|bias)", at("attn.qkv.{}", 0)),
        (layer + r"attention\.(?:attention\.key|k_proj)\.(weight|bias)", at("attn.qkv.{}", 1)),
        (layer + r"attention\.(?:attention\.value|v_proj)\.(weight|bias)", at("attn.qkv.{}", 2)),
        (layer + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", at("attn.proj.{}")),
        (layer + r"layer_scale([12])\.lambda1", at("ls{}.gamma")),
        (layer + r"mlp\.weights_in\.(weight|bias)", at("mlp.w12.{}", 0)),
        (layer + r"mlp\.gate_proj\.(weight|bias)", at("mlp.w12.{}", 0)),
        (layer + r"mlp\.up_proj\.(weight|bias)", at("mlp.w12.{}", 1)),
        (layer + r"mlp\.(?:weights_out|down_proj)\.(weight|bias)", at("mlp.w3.{}")),
        (p + r"layernorm\.(weight|bias)", _fixed("norm.{}")),
    ]
    split_ffn = any(".mlp.gate_proj." in k for k in weights)
    slots = {"qkv.weight": 3, "qkv.bias": 3}
    if split_ffn:
        slots.update({"w12.weight": 2, "w12.bias": 2})
    return _convert(weights, rules, lambda name: name.startswith("classifier."), slots, "DINOv2 from HF")


def dinov2_config_from_hf(config) -> DINOv2Config:
    """Our :class:`DINOv2Config` from an HF ``Dinov2Config`` (dict, file or dir)."""
    cfg = _read_config(config)
    if not cfg.get("use_swiglu_ffn", False):
        raise ConfigError("HF DINOv2 config has use_swiglu_ffn false; only the SwiGLU variant (dinov2-giant) "
                          "is supported")
    return DINOv2Config(image_size=cfg.get("image_size", 518), patch_size=cfg.get("patch_size", 14),
                        width=cfg.get("hidden_size", 1536), layers=cfg.get("num_hidden_layers", 40),
                        heads=cfg.get("num_attention_heads", 24), mlp_ratio=cfg.get("mlp_ratio", 4.0),
                        eps=cfg.get("layer_norm_eps", 1e-6), layer_scale_init=cfg.get("layerscale_value", 1.0))
