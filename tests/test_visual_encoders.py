"""The image encoders of accessory.model.visual against HF transformers on the same random weights.

Tiny sizes, float32, 1e-4. The HF weights reach our modules through accessory.checkpoint.hf_visual,
so every parity test also checks the converter. Real sizes are only built on the meta device, where
they cost nothing, to check the parameter counts ORIGINAL-mm.md gives.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accessory.checkpoint import hf_visual
from accessory.model.visual import (BLIP2, CLIP, BLIP2Config, CLIPConfig, ConvNeXt, ConvNeXtConfig, DINOv2,
                                    DINOv2Config, ViTBlock, resize_pos_embed)

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-4, rtol=1e-4)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter with seeded noise (norm weights around 1) so no weight is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype)
            is_norm_weight = name.endswith("weight") and param.dim() == 1
            param.copy_(1 + 0.1 * noise if is_norm_weight else 0.2 * noise)
    return model.eval()


def images(batch: int, size: int, seed: int = 1, width: int = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, width or size, generator=gen)


# ------------------------------------------------------------------------------------------------------
# Tiny HF models (shared with test_hf_visual.py)


def hf_clip_vision(quick_gelu: bool):
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=28, patch_size=4, projection_dim=24,
                                           hidden_act="quick_gelu" if quick_gelu else "gelu", layer_norm_eps=1e-5)
    return randomize(transformers.CLIPVisionModelWithProjection(config))


def hf_clip_full():
    config = transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=4, hidden_act="quick_gelu"),
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, hidden_act="quick_gelu"),
        projection_dim=24)
    return randomize(transformers.CLIPModel(config))


def hf_blip2():
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=40, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=4, layer_norm_eps=1e-6, qkv_bias=True),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            cross_attention_frequency=2, layer_norm_eps=1e-12, vocab_size=50),
        text_config=dict(model_type="opt", hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, word_embed_proj_dim=16, max_position_embeddings=32),
        num_query_tokens=5)
    return randomize(transformers.Blip2Model(config))


def hf_convnext():
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24], depths=[1, 2, 1], num_stages=3,
                                         layer_norm_eps=1e-12, hidden_act="gelu")
    return randomize(transformers.ConvNextModel(config))


def hf_dinov2(image_size: int = 28):
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                                       image_size=image_size, patch_size=4, use_swiglu_ffn=True,
                                       layer_norm_eps=1e-6, layerscale_value=1.0)
    return randomize(transformers.Dinov2Model(config))


def ours_from(model_class, config, state) -> nn.Module:
    model = model_class(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------------
# Real sizes on the meta device


REAL = {
    # name: (builder, total parameters, {submodule: parameters})
    "blip2": (lambda: BLIP2(), 1_091_114_496, {"vision_model": 985_952_256, "qformer": 105_137_664}),
    "clip": (lambda: CLIP(), 342_562_049, {"visual": 303_966_208}),
    "clip_text_tower": (lambda: CLIP(CLIPConfig(text_tower=True)), 427_616_513, {"visual": 303_966_208}),
    "convnext": (lambda: ConvNeXt(), 843_398_016, {}),
    "dinov2": (lambda: DINOv2(), 1_136_480_768, {}),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_size_builds_on_meta_with_the_original_parameter_count(name):
    build, total, parts = REAL[name]
    with torch.device("meta"):
        model = build()
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == total
    for part, count in parts.items():
        assert sum(p.numel() for p in model.get_submodule(part).parameters()) == count


def test_real_size_key_shapes_follow_the_original():
    with torch.device("meta"):
        shapes = {"blip2": {k: tuple(v.shape) for k, v in BLIP2().state_dict().items()},
                  "clip": {k: tuple(v.shape) for k, v in CLIP().state_dict().items()},
                  "convnext": {k: tuple(v.shape) for k, v in ConvNeXt().state_dict().items()},
                  "dinov2": {k: tuple(v.shape) for k, v in DINOv2().state_dict().items()}}
    expected = {
        "blip2": {"query_tokens": (1, 32, 768), "vision_model.embeddings.class_embedding": (1, 1, 1408),
                  "vision_model.embeddings.position_embedding": (1, 257, 1408),
                  "vision_model.embeddings.patch_embedding.weight": (1408, 3, 14, 14),
                  "vision_model.encoder.layers.38.self_attn.qkv.weight": (4224, 1408),
                  "vision_model.encoder.layers.38.self_attn.qkv.bias": (4224,),
                  "vision_model.encoder.layers.0.mlp.fc1.weight": (6144, 1408),
                  "vision_model.post_layernorm.weight": (1408,),
                  "qformer.layernorm.weight": (768,),
                  "qformer.encoder.layer.10.crossattention.attention.key.weight": (768, 1408),
                  "qformer.encoder.layer.11.intermediate_query.dense.weight": (3072, 768),
                  "qformer.encoder.layer.11.output_query.LayerNorm.bias": (768,)},
        "clip": {"visual.conv1.weight": (1024, 3, 14, 14), "visual.class_embedding": (1024,),
                 "visual.positional_embedding": (257, 1024), "visual.proj": (1024, 768),
                 "visual.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
                 "visual.transformer.resblocks.23.mlp.c_proj.weight": (1024, 4096),
                 "token_embedding.weight": (49408, 768), "positional_embedding": (77, 768),
                 "text_projection": (768, 768), "logit_scale": (), "ln_final.bias": (768,)},
        "convnext": {"stem.0.weight": (384, 3, 4, 4), "stem.1.weight": (384,),
                     "stages.1.downsample.0.weight": (384,), "stages.1.downsample.1.weight": (768, 384, 2, 2),
                     "stages.2.blocks.29.conv_dw.weight": (1536, 1, 7, 7), "stages.3.blocks.2.gamma": (3072,),
                     "stages.3.blocks.2.mlp.fc1.weight": (12288, 3072), "head.norm.weight": (3072,)},
        "dinov2": {"cls_token": (1, 1, 1536), "pos_embed": (1, 1370, 1536), "mask_token": (1, 1536),
                   "patch_embed.proj.weight": (1536, 3, 14, 14), "blocks.39.attn.qkv.weight": (4608, 1536),
                   "blocks.39.mlp.w12.weight": (8192, 1536), "blocks.39.mlp.w3.weight": (1536, 4096),
                   "blocks.39.ls2.gamma": (1536,), "norm.bias": (1536,)},
    }
    for name, keys in expected.items():
        for key, shape in keys.items():
            assert shapes[name][key] == shape, (name, key)
    assert not any(k.startswith("stages.0.downsample") for k in shapes["convnext"])
    assert not any(".layer.1.crossattention" in k for k in shapes["blip2"])
    assert not any(k.startswith("transformer.") for k in shapes["clip"])


TINY = {
    "clip": lambda: CLIP(CLIPConfig(image_size=28, patch_size=4, width=32, layers=2, heads=4, embed_dim=24,
                                    vocab_size=99, context_length=12, text_width=16, text_heads=2, text_layers=1,
                                    text_tower=True)),
    "blip2": lambda: BLIP2(BLIP2Config(image_size=28, patch_size=4, vision_width=40, vision_layers=2,
                                       vision_heads=4, vision_mlp=96, qformer_width=32, qformer_layers=3,
                                       qformer_heads=4, qformer_mlp=64, num_query_tokens=5)),
    "convnext": lambda: ConvNeXt(ConvNeXtConfig(depths=(1, 2, 1), dims=(8, 16, 24))),
    "dinov2": lambda: DINOv2(DINOv2Config(image_size=28, patch_size=4, width=32, layers=2, heads=4)),
    "vit_block": lambda: ViTBlock(32, 4),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_meta_model_materialises_through_reset_parameters(name):
    """What the loader does for parameters a checkpoint lacks (strict=False): allocate, then call the
    owning module's reset_parameters. Every module owning parameters must have one."""
    with torch.device("meta"):
        model = TINY[name]()
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    assert owners and all(hasattr(m, "reset_parameters") for m in owners), \
        [type(m).__name__ for m in owners if not hasattr(m, "reset_parameters")]
    model.to_empty(device="cpu")
    with torch.no_grad():
        for module in owners:
            module.reset_parameters()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------
# CLIP


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_clip_encode_image_matches_hf(quick_gelu):
    hf = hf_clip_vision(quick_gelu)
    config = hf_visual.clip_config_from_hf(hf.config.to_dict())
    assert config.quick_gelu is quick_gelu
    state = hf_visual.clip_from_hf(hf.state_dict())
    ours = CLIP(config).eval()
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all(not k.startswith("visual.") for k in missing)
    x = images(2, 28)
    with torch.no_grad():
        hidden = hf.vision_model(pixel_values=x).last_hidden_state
        want = hf.vision_model.post_layernorm(hidden)            # the original's ln_post on every token
        got = ours.encode_image(x, project=False)
        got_projected = ours.encode_image(x)
        want_projected = hf.visual_projection(want)
    assert got.shape == (2, 50, 32) and got_projected.shape == (2, 50, 24)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_projected, want_projected, **TOL)
    # Token 0 is what HF pools and projects.
    torch.testing.assert_close(got_projected[:, 0], hf(pixel_values=x).image_embeds.detach(), **TOL)


def test_clip_activation_choice_matters():
    """QuickGELU and exact GELU builds of the same weights give different features (the ens types
    run SPHINX's CLIP with exact GELU; the CLIP-prefix types with QuickGELU)."""
    hf = hf_clip_vision(True)
    state = hf_visual.clip_from_hf(hf.state_dict())
    quick = hf_visual.clip_config_from_hf(hf.config.to_dict())
    exact = hf_visual.clip_config_from_hf(hf.config.to_dict(), quick_gelu=False)
    x = images(1, 28)
    with torch.no_grad():
        a = CLIP(quick).eval()
        a.load_state_dict(state, strict=False)
        b = CLIP(exact).eval()
        b.load_state_dict(state, strict=False)
        assert (a.encode_image(x) - b.encode_image(x)).abs().max() > 1e-3


def test_clip_rejects_a_wrong_image_size():
    model = TINY["clip"]()
    with pytest.raises(ValueError, match="28x28"):
        model.encode_image(images(1, 32))


# ------------------------------------------------------------------------------------------------------
# BLIP-2


def test_blip2_qformer_features_match_hf():
    hf = hf_blip2()
    ours = ours_from(BLIP2, hf_visual.blip2_config_from_hf(hf.config.to_dict()), hf_visual.blip2_from_hf(hf.state_dict()))
    x = images(2, 28)
    with torch.no_grad():
        want_embeds = hf.vision_model(pixel_values=x).last_hidden_state
        want = hf.get_qformer_features(pixel_values=x)
        got_embeds = ours.image_embeds(x)
        got = ours.qformer_features(x)
    assert got_embeds.shape == (2, 50, 40) and got.shape == (2, 5, 32)
    torch.testing.assert_close(got_embeds, want_embeds, **TOL)
    torch.testing.assert_close(got, want, **TOL)


def test_blip2_cross_attention_only_on_every_other_layer():
    model = TINY["blip2"]()
    assert [layer.has_cross_attention for layer in model.qformer.encoder.layer] == [True, False, True]


# ------------------------------------------------------------------------------------------------------
# ConvNeXt


def test_convnext_trunk_matches_hf_plus_head_norm():
    hf = hf_convnext()
    config = hf_visual.convnext_config_from_hf(hf.config.to_dict())
    ours = ours_from(ConvNeXt, config, hf_visual.convnext_from_hf(hf.state_dict()))
    x = images(2, 64)
    with torch.no_grad():
        trunk = hf(pixel_values=x).last_hidden_state                    # (B, C, H/32, W/32), not normed
        want = hf.layernorm(trunk.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # head.norm per position
        got = ours(x)
    assert got.shape == (2, 24, 4, 4)
    torch.testing.assert_close(got, want, **TOL)


def test_convnext_eps_is_honoured():
    """The real trunk uses eps 1e-5 everywhere, HF 1e-6: both follow the config."""
    hf = hf_convnext()
    state = hf_visual.convnext_from_hf(hf.state_dict())
    config = hf_visual.convnext_config_from_hf(hf.config.to_dict())
    other = ConvNeXtConfig(depths=config.depths, dims=config.dims, eps=1e-1)
    with torch.no_grad():
        a, b = ours_from(ConvNeXt, config, state), ours_from(ConvNeXt, other, state)
        assert [m.eps for m in b.modules() if isinstance(m, nn.LayerNorm)] == [1e-1] * 8   # stem, 2 downsamples, 4 blocks, head
        assert (a(images(1, 64)) - b(images(1, 64))).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------
# DINOv2


def test_dinov2_at_the_native_grid_matches_hf():
    hf = hf_dinov2()
    ours = ours_from(DINOv2, hf_visual.dinov2_config_from_hf(hf.config.to_dict()), hf_visual.dinov2_from_hf(hf.state_dict()))
    x = images(2, 28)
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state
        got = ours.forward_features(x)
    assert got["x_norm_clstoken"].shape == (2, 32) and got["x_norm_patchtokens"].shape == (2, 49, 32)
    torch.testing.assert_close(got["x_norm_clstoken"], want[:, 0], **TOL)
    torch.testing.assert_close(got["x_norm_patchtokens"], want[:, 1:], **TOL)
    torch.testing.assert_close(ours(x), want, **TOL)


def bicubic_reference(grid: torch.Tensor, out_h: int, out_w: int, offset: float = 0.1) -> torch.Tensor:
    """float64 bicubic resize of ``grid`` (G, G, C) as ORIGINAL-mm.md describes DINOv2's: per axis,
    scale s = (out + offset) / G, source coordinate (i + 0.5) / s - 0.5, Keys' cubic with a = -0.75,
    neighbours clamped at the border, no antialiasing."""
    g = grid.shape[0]
    a = -0.75

    def kernel(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        if t < 2:
            return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
        return 0.0

    def weights(out: int) -> torch.Tensor:
        scale = (out + offset) / g
        matrix = torch.zeros(out, g, dtype=torch.float64)
        for i in range(out):
            src = (i + 0.5) / scale - 0.5
            base = math.floor(src)
            for j in range(base - 1, base + 3):
                matrix[i, min(max(j, 0), g - 1)] += kernel(src - j)
        return matrix

    rows, cols = weights(out_h), weights(out_w)
    return torch.einsum("ig,jh,ghc->ijc", rows, cols, grid.double())


@pytest.mark.parametrize("out_h,out_w", [(16, 16), (4, 4), (6, 3), (20, 9)])
def test_dinov2_pos_embed_resize_matches_the_formula(out_h, out_w):
    gen = torch.Generator().manual_seed(3)
    stored = 37
    pos_embed = torch.randn(1, 1 + stored * stored, 8, generator=gen)
    got = resize_pos_embed(pos_embed, out_h, out_w)
    want = bicubic_reference(pos_embed[0, 1:].reshape(stored, stored, 8), out_h, out_w)
    assert got.shape == (1, 1 + out_h * out_w, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got[0, 0], pos_embed[0, 0])
    torch.testing.assert_close(got[0, 1:].double(), want.reshape(-1, 8), atol=1e-5, rtol=1e-5)
    # Mapping by size= (HF's way) or with antialias would give other numbers: the test can tell.
    by_size = F.interpolate(pos_embed[:, 1:].reshape(1, stored, stored, 8).permute(0, 3, 1, 2),
                            size=(out_h, out_w), mode="bicubic", antialias=True)
    assert (by_size.permute(0, 2, 3, 1).reshape(-1, 8) - got[0, 1:]).abs().max() > 1e-2


def test_dinov2_resize_runs_in_float32_and_returns_the_table_dtype():
    pos_embed = torch.randn(1, 1 + 37 * 37, 8)
    got = resize_pos_embed(pos_embed.bfloat16(), 16, 16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, resize_pos_embed(pos_embed.bfloat16().float(), 16, 16).bfloat16())


def test_dinov2_off_grid_forward_uses_the_resized_table():
    """At 16 px (4x4 patches) the model must equal an HF model whose native 4x4 table is our resize."""
    hf = hf_dinov2()
    state = hf_visual.dinov2_from_hf(hf.state_dict())
    ours = ours_from(DINOv2, hf_visual.dinov2_config_from_hf(hf.config.to_dict()), state)
    hf_small = hf_dinov2(image_size=16)
    small_state = dict(hf.state_dict())
    small_state["embeddings.position_embeddings"] = resize_pos_embed(state["pos_embed"], 4, 4)
    hf_small.load_state_dict(small_state)
    x = images(2, 16)
    with torch.no_grad():
        got = ours.forward_features(x)
        want = hf_small(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got["x_norm_patchtokens"], want[:, 1:], **TOL)
    torch.testing.assert_close(got["x_norm_clstoken"], want[:, 0], **TOL)


def test_dinov2_rejects_sizes_not_divisible_by_the_patch():
    with pytest.raises(ValueError, match="multiples of 4"):
        TINY["dinov2"]().forward_features(images(1, 30))


# ------------------------------------------------------------------------------------------------------
# timm ViT block (llama_adapter's visual_blocks)


def test_vit_block_matches_hf_vit_layer():
    config = transformers.ViTConfig(hidden_size=32, num_attention_heads=4, intermediate_size=128,
                                    layer_norm_eps=1e-5, hidden_act="gelu", qkv_bias=True)
    hf = randomize(transformers.models.vit.modeling_vit.ViTLayer(config))
    sd = hf.state_dict()   # transformers 5 names
    state = {"norm1.weight": sd["layernorm_before.weight"], "norm1.bias": sd["layernorm_before.bias"],
             "attn.qkv.weight": torch.cat([sd[f"attention.{n}_proj.weight"] for n in "qkv"]),
             "attn.qkv.bias": torch.cat([sd[f"attention.{n}_proj.bias"] for n in "qkv"]),
             "attn.proj.weight": sd["attention.o_proj.weight"], "attn.proj.bias": sd["attention.o_proj.bias"],
             "norm2.weight": sd["layernorm_after.weight"], "norm2.bias": sd["layernorm_after.bias"],
             "mlp.fc1.weight": sd["mlp.fc1.weight"], "mlp.fc1.bias": sd["mlp.fc1.bias"],
             "mlp.fc2.weight": sd["mlp.fc2.weight"], "mlp.fc2.bias": sd["mlp.fc2.bias"]}
    ours = ViTBlock(32, 4)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = hf(x)
        want = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(ours(x), want, **TOL)


# ------------------------------------------------------------------------------------------------------
# Model dtype (the ens types cast every encoder to the model dtype, bf16 in practice)


@pytest.mark.parametrize("name", ["clip", "blip2", "convnext", "dinov2"])
def test_encoders_run_in_bfloat16_close_to_float32(name):
    torch.manual_seed(0)
    model = randomize(TINY[name]())
    size = 64 if name == "convnext" else 28
    x = images(1, size)
    run = {"clip": lambda m, t: m.encode_image(t), "blip2": lambda m, t: m.qformer_features(t),
           "convnext": lambda m, t: m(t), "dinov2": lambda m, t: m.forward_features(t)["x_norm_patchtokens"]}[name]
    with torch.no_grad():
        want = run(model, x)
        # BLIP-2 casts images to its own dtype like HF; the others expect images in the model dtype.
        got = run(model.to(torch.bfloat16), x if name == "blip2" else x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()
