"""What the SPHINX family (``llama_ens*``, ``mixtral_sparse_ens*``) shares: the encoder ensemble,
the connectors, the view builders. Each type's file says which views it cuts and which encoders
see which view; the arithmetic lives here once.

Encoders (keys as the original's, ORIGINAL-mm.md "Visual building blocks"): ``qformer.*`` (BLIP-2
vision + Q-Former, no OPT), ``clip.*`` (open_clip ViT-L/14 built with ``pretrained=None``: exact
GELU, output before ``proj``), ``openclip_convnext_xxl.*`` (ConvNeXt-XXLarge trunk) and
``dinov2_vitg14.*``; the "light" types have only the last two. Connectors: ``qformer_proj`` and
``visual_proj`` (``Sequential(Linear, LayerNorm)``), ``start_img`` / ``end_img`` (1, 1, dim).

One "view" is a ``view_size`` x ``view_size`` image (224 in the real models) that the ViTs cut into
a ``grid`` x ``grid`` patch grid (16 x 16). Its ensemble features (``ensemble_features``) are, per
token (class token first, then the grid in raster order), ``cat[CLIP, ConvNeXt, DINOv2]`` along
channels (1024 + 3072 + 1536 = 5632) or ``cat[ConvNeXt, DINOv2]`` (4608, light types):

* ConvNeXt runs on its own input, whose final map is either the grid itself (a ConvNeXt view of
  ``grid * stride`` px, 512) or half of it (``grid / 2 * stride`` px, 256, then each cell repeated
  2 x 2 with ``repeat_interleave``); the token mean is prepended as a class token ("gap");
* DINOv2 sees the CLIP-normalised pixels re-normalised to its own mean / std.

Every size derives from ``view_size`` and the encoder configs, so a tiny config (``view_size`` 16,
patch 4, a two-stage ConvNeXt) keeps the real arithmetic.

Dtypes: the original resizes in float16 (``F.interpolate(img.half(), ...)``, cast back); here
resizes run in float32 and are cast back to the image's dtype (equal up to fp16 rounding). The
encoders run in the model's dtype, under ``no_grad``.

Model parallelism: encoders and connectors are replicated (no split-plan rule matches them); as in
the original, each rank encodes its slice of an image batch and the slices are all-gathered
(``layers/multimodal.encode_split_by_batch``, shared by every multimodal type). The original
gathers the raw features and projects them on every rank; here the projected vectors are
gathered (the same numbers).
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..visual import BLIP2, CLIP, BLIP2Config, CLIPConfig, ConvNeXt, ConvNeXtConfig, DINOv2, DINOv2Config

#: Parameter-name prefixes of the frozen encoders (the original's ``no_train_prefix``).
ENCODER_PREFIXES = ("qformer.", "openclip_convnext_xxl.", "clip.", "dinov2_vitg14.")
#: Modules --quant leaves in full precision: every encoder and both projections.
QUANT_BLOCKLIST = ("qformer", "clip", "openclip_convnext_xxl", "dinov2_vitg14", "visual_proj", "qformer_proj")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINO_MEAN = (0.485, 0.456, 0.406)
DINO_STD = (0.229, 0.224, 0.225)

ENCODER_CONFIGS = {"qformer": BLIP2Config, "clip": CLIPConfig, "convnext": ConvNeXtConfig, "dinov2": DINOv2Config}


@dataclass
class SphinxArgs:
    """Config fields every SPHINX type adds to its text model's ModelArgs."""
    # The original downloads pretrained encoder weights when set; here the encoder weights always
    # come from the checkpoint, so the flag is accepted and changes nothing.
    load_pretrained_visual_encoder: bool = False
    # Side in pixels of one encoder view (224 in every released model).
    view_size: int = 224
    # Field overrides of the encoder configs, e.g. {"dinov2": {"width": 32, "layers": 1}}; keys
    # "qformer" (BLIP2Config), "clip" (CLIPConfig), "convnext" (ConvNeXtConfig), "dinov2"
    # (DINOv2Config). Empty: the real sizes.
    visual_encoders: Dict[str, Dict[str, Any]] = field(default_factory=dict)


def encoder_config(args: SphinxArgs, name: str, **fixed):
    """The config of encoder ``name``: real defaults, ``fixed`` values, then the overrides in args."""
    cls = ENCODER_CONFIGS[name]
    overrides = dict((args.visual_encoders or {}).get(name, {}))
    unknown = set(args.visual_encoders or {}) - set(ENCODER_CONFIGS)
    if unknown:
        raise ConfigError(f"visual_encoders has unknown encoder(s) {sorted(unknown)}; known: {sorted(ENCODER_CONFIGS)}")
    names = {f.name for f in dataclasses.fields(cls)}
    bad = set(overrides) - names
    if bad:
        raise ConfigError(f"visual_encoders[{name!r}] has field(s) {sorted(bad)} that {cls.__name__} does not take; "
                          f"it takes {sorted(names)}")
    values = dict(fixed, **overrides)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def resize(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """``F.interpolate`` to ``size`` x ``size`` (``"nearest"`` or ``"bicubic"``, align_corners False,
    no antialias) computed in float32, returned in the images' dtype."""
    if tuple(images.shape[-2:]) == (size, size) and mode == "nearest":
        return images
    extra = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(images.float(), size=(size, size), mode=mode, **extra).to(images.dtype)


def crops(images: torch.Tensor, per_side: int, size: int) -> List[torch.Tensor]:
    """The ``per_side`` x ``per_side`` crops of side ``size`` of (B, 3, per_side*size, ...) images,
    in raster order (rows top to bottom, left to right): TL, TR, BL, BR for 2 x 2."""
    if tuple(images.shape[-2:]) != (per_side * size,) * 2:
        raise ValueError(f"expected {per_side * size}x{per_side * size} images to cut into {per_side}x{per_side} "
                         f"views of {size}, got {images.shape[-2]}x{images.shape[-1]}")
    return [images[..., r * size:(r + 1) * size, c * size:(c + 1) * size]
            for r in range(per_side) for c in range(per_side)]


def image_major(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """V tensors (B, ...) -> (B*V, ...) with each image's V views adjacent (the ``*_light`` / ens5
    mixtral order, ``stack(dim=1).view(B*V, ...)``)."""
    stacked = torch.stack(list(views), dim=1)
    return stacked.reshape(-1, *stacked.shape[2:])


def view_major(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """V tensors (B, ...) -> (V*B, ...), view 0 of every image first (``cat(dim=0)``, llama_ens5/10)."""
    return torch.cat(list(views), dim=0)


def dino_renorm(pixels: torch.Tensor, factored: bool = False) -> torch.Tensor:
    """CLIP-normalised pixels re-normalised for DINOv2: ``(x*σc + μc − μd) / σd``; ``factored``
    writes it ``x*(σc/σd) + (μc−μd)/σd`` (the light types), equal up to rounding. The constants are
    cast to the pixels' dtype first, as the original does."""
    def const(values):
        return torch.tensor(values).to(pixels).view(3, 1, 1)
    clip_mean, clip_std, dino_mean, dino_std = const(CLIP_MEAN), const(CLIP_STD), const(DINO_MEAN), const(DINO_STD)
    if factored:
        return pixels * (clip_std / dino_std) + (clip_mean - dino_mean) / dino_std
    return (pixels * clip_std + clip_mean - dino_mean) / dino_std


class SphinxVisual:
    """Mixin for a text decoder (llama / mixtral_sparse ``Transformer``): builds the encoders and
    connectors (:meth:`build_visual`) and offers the pieces each type's ``encode_images`` uses."""

    image_layout: Optional[str] = None

    def build_visual(self, args: SphinxArgs, light: bool) -> None:
        """Encoders (BLIP-2 + CLIP + ConvNeXt + DINOv2, or ConvNeXt + DINOv2 when ``light``),
        ``qformer_proj`` (not light), ``visual_proj``, ``start_img`` / ``end_img``."""
        self.light = light
        self.view_size = args.view_size
        dim = args.dim
        if not light:
            self.qformer = BLIP2(encoder_config(args, "qformer", image_size=args.view_size))
            self.clip = CLIP(encoder_config(args, "clip", image_size=args.view_size, quick_gelu=False,
                                            text_tower=False))
        self.openclip_convnext_xxl = ConvNeXt(encoder_config(args, "convnext"))
        self.dinov2_vitg14 = DINOv2(encoder_config(args, "dinov2"))
        for name in self.encoder_names():
            getattr(self, name).requires_grad_(False)

        dino = self.dinov2_vitg14.config
        if args.view_size % dino.patch_size:
            raise ConfigError(f"view_size {args.view_size} is not a multiple of DINOv2's patch size {dino.patch_size}")
        self.grid = args.view_size // dino.patch_size
        if not light and self.clip.config.grid != self.grid:
            raise ConfigError(f"CLIP's {self.clip.config.grid}x{self.clip.config.grid} patch grid differs from "
                              f"DINOv2's {self.grid}x{self.grid} at view_size {args.view_size}")
        cnx = self.openclip_convnext_xxl.config
        self.convnext_stride = cnx.patch_size * 2 ** (len(cnx.dims) - 1)
        self.tokens_per_view = self.grid * self.grid + 1
        channels = cnx.dims[-1] + dino.width + (0 if light else self.clip.config.width)
        if not light:
            qwidth = self.qformer.config.qformer_width
            self.qformer_proj = nn.Sequential(nn.Linear(qwidth, dim), nn.LayerNorm(dim))
            self.queries = self.qformer.config.num_query_tokens
        else:
            self.queries = 0
        self.visual_proj = nn.Sequential(nn.Linear(channels, dim), nn.LayerNorm(dim))
        self.start_img = nn.Parameter(torch.rand(1, 1, dim))
        self.end_img = nn.Parameter(torch.rand(1, 1, dim))
        self.image_layout = "tagged"
        self.quant_blocklist = [name for name in QUANT_BLOCKLIST if hasattr(self, name)]

    def encoder_names(self) -> Tuple[str, ...]:
        return tuple(p[:-1] for p in ENCODER_PREFIXES if hasattr(self, p[:-1]))

    # ------------------------------------------------------------------ sizes
    @property
    def convnext_size(self) -> int:
        """ConvNeXt input side whose final map is the full grid (512 real): the light / 512+ types."""
        return self.grid * self.convnext_stride

    @property
    def convnext_half_size(self) -> int:
        """ConvNeXt input side whose map is half the grid (256 real), repeated 2 x 2 (224-view types)."""
        if self.grid % 2:
            raise ConfigError(f"the {self.grid}x{self.grid} grid is odd: a half-size ConvNeXt map cannot be repeated "
                              f"2x2 onto it; pick a view_size giving an even grid")
        return self.grid // 2 * self.convnext_stride

    # ------------------------------------------------------------------ encoders
    def convnext_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) ConvNeXt input -> (B, 1 + grid², C): the map (repeated up to the grid when it
        is smaller), raster order, the token mean prepended."""
        feature_map = self.openclip_convnext_xxl(pixels)
        side = feature_map.shape[-1]
        if self.grid % side or feature_map.shape[-2] != side:
            raise ValueError(f"ConvNeXt gave a {feature_map.shape[-2]}x{side} map, which does not tile the "
                             f"{self.grid}x{self.grid} grid (input {pixels.shape[-2]}x{pixels.shape[-1]})")
        factor = self.grid // side
        if factor > 1:
            feature_map = feature_map.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
        tokens = feature_map.flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)

    def dinov2_tokens(self, pixels: torch.Tensor, factored_renorm: bool = False) -> torch.Tensor:
        """(B, 3, view, view) CLIP-normalised -> (B, 1 + grid², width): DINOv2's normed cls + patches."""
        features = self.dinov2_vitg14.forward_features(dino_renorm(pixels, factored_renorm))
        return torch.cat([features["x_norm_clstoken"][:, None], features["x_norm_patchtokens"]], dim=1)

    def ensemble_features(self, views: torch.Tensor, convnext_input: torch.Tensor,
                          factored_renorm: bool = False) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Raw encoder outputs of a batch of views, before the projections.

        ``views`` (V, 3, view, view): what BLIP-2, CLIP and DINOv2 see; ``convnext_input`` (V, 3, S, S):
        what ConvNeXt sees. Returns ``(q, ens)``: Q-Former queries (V, 32, 768) (None when light)
        and the per-token ensemble (V, 257, 5632 or 4608)."""
        with torch.no_grad():
            queries = None if self.light else self.qformer.qformer_features(views)
            parts = [] if self.light else [self.clip.encode_image(views, project=False)]
            parts.append(self.convnext_tokens(convnext_input))
            parts.append(self.dinov2_tokens(views, factored_renorm))
            return queries, torch.cat(parts, dim=-1)

    def project_views(self, queries: Optional[torch.Tensor], ens: torch.Tensor) -> torch.Tensor:
        """(V, queries + tokens, dim): ``cat[qformer_proj(q), visual_proj(ens)]`` (no q when light)."""
        projected = self.visual_proj(ens)
        if queries is None:
            return projected
        return torch.cat([self.qformer_proj(queries), projected], dim=1)

    # ------------------------------------------------------------------ training
    def non_encoder_params(self) -> Dict[str, nn.Parameter]:
        """Every parameter outside the encoders (the original's default trainable set)."""
        return {name: p for name, p in self.named_parameters() if not name.startswith(ENCODER_PREFIXES)}


def check_views(images: torch.Tensor, size: int, what: str) -> None:
    if images.dim() != 4 or tuple(images.shape[-2:]) != (size, size):
        raise ValueError(f"{what} takes (batch, 3, {size}, {size}) images, got {tuple(images.shape)}; resize them "
                         f"with accessory.data.transform.get_transform('padded_resize', {size})")


def reduce_patches(ens: torch.Tensor, grid: int) -> torch.Tensor:
    """llama_ens5p2's local views: (V, 1 + grid², C) -> (V, 1 + (grid/2)², C), the patch grid
    halved by bilinear ``F.interpolate(scale_factor=1/2)`` (align_corners False; float32, cast back),
    the class token kept."""
    patches = ens[:, 1:].reshape(-1, grid, grid, ens.shape[-1]).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), scale_factor=0.5, mode="bilinear", align_corners=False).to(ens.dtype)
    return torch.cat([ens[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)


def trainable_by_mode(model: SphinxVisual, mode: str, stage1_words: Sequence[str]) -> Dict[str, nn.Parameter]:
    """``trainable_mode`` of the light / ens5 MoE types: "mm_stage1" trains names containing one of
    ``stage1_words``; "mm_stage2" everything outside the encoders."""
    if mode == "mm_stage1":
        return {name: p for name, p in model.named_parameters() if any(w in name for w in stage1_words)}
    if mode == "mm_stage2":
        return model.non_encoder_params()
    raise ConfigError(f"unknown trainable_mode {mode!r}: expected 'mm_stage1' or 'mm_stage2'")
