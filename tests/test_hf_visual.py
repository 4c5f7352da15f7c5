"""accessory.checkpoint.hf_visual on HF directories as save_pretrained writes them (the Hub's on-disk
tensor names), on variants of the layouts, and on wrong input."""

import json

import pytest
import torch
from safetensors.torch import save_file

from accessory.checkpoint import hf_visual
from accessory.errors import CheckpointError, ConfigError
from accessory.model.visual import BLIP2, CLIP, ConvNeXt, DINOv2

transformers = pytest.importorskip("transformers")

from test_visual_encoders import (TOL, hf_blip2, hf_clip_full, hf_convnext, hf_dinov2, images,  # noqa: E402
                                  ours_from)


def saved(model, tmp_path):
    model.save_pretrained(tmp_path)
    return tmp_path


def test_clip_model_dir_converts_every_tensor_including_the_text_tower(tmp_path):
    hf = hf_clip_full()
    directory = saved(hf, tmp_path)
    config = hf_visual.clip_config_from_hf(directory, text_tower=True)
    assert (config.quick_gelu, config.vocab_size, config.context_length, config.text_width) == (True, 99, 12, 16)
    ours = ours_from(CLIP, config, hf_visual.clip_from_hf(directory, text_tower=True))   # strict: every key
    x = images(2, 28)
    with torch.no_grad():
        want = hf.get_image_features(pixel_values=x)
        want = want.pooler_output if hasattr(want, "pooler_output") else want
        torch.testing.assert_close(ours.encode_image(x)[:, 0], want, **TOL)
    torch.testing.assert_close(ours.text_projection, hf.text_projection.weight.t())
    torch.testing.assert_close(ours.logit_scale, hf.logit_scale)
    torch.testing.assert_close(ours.transformer.resblocks[1].attn.in_proj_weight,
                               torch.cat([hf.text_model.encoder.layers[1].self_attn.q_proj.weight,
                                          hf.text_model.encoder.layers[1].self_attn.k_proj.weight,
                                          hf.text_model.encoder.layers[1].self_attn.v_proj.weight]))


def test_clip_without_text_tower_drops_the_text_layers_only(tmp_path):
    state = hf_visual.clip_from_hf(saved(hf_clip_full(), tmp_path))
    assert not any(k.startswith("transformer.") for k in state)
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
            "logit_scale", "visual.proj"} <= set(state)
    ours = CLIP(hf_visual.clip_config_from_hf(tmp_path))
    ours.load_state_dict(state, strict=True)


def test_blip2_dir_drops_the_language_model(tmp_path):
    hf = hf_blip2()
    directory = saved(hf, tmp_path)
    state = hf_visual.blip2_from_hf(directory)
    assert not any(k.startswith("language") for k in state)
    ours = ours_from(BLIP2, hf_visual.blip2_config_from_hf(directory), state)
    x = images(1, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.qformer_features(x), hf.get_qformer_features(pixel_values=x), **TOL)


def test_blip2_for_conditional_generation_layouts_convert_the_same(tmp_path):
    hf = hf_blip2()
    reference = hf_visual.blip2_from_hf(hf.state_dict())
    generation = transformers.Blip2ForConditionalGeneration(hf.config)
    generation.load_state_dict(hf.state_dict(), strict=False)
    for state in (hf_visual.blip2_from_hf(saved(generation, tmp_path)),
                  hf_visual.blip2_from_hf({"model." + k: v for k, v in hf.state_dict().items()})):
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_blip2_split_q_v_biases_are_packed_with_a_zero_k_bias():
    hf = hf_blip2()
    state = dict(hf.state_dict())
    width = hf.config.vision_config.hidden_size
    packed = state.pop("vision_model.encoder.layers.1.self_attn.qkv.bias")
    packed = torch.cat([packed[:width], torch.zeros(width), packed[2 * width:]])   # LAVIS has no k bias
    state["vision_model.encoder.layers.1.self_attn.q_bias"] = packed[:width]
    state["vision_model.encoder.layers.1.self_attn.v_bias"] = packed[2 * width:]
    converted = hf_visual.blip2_from_hf(state)
    torch.testing.assert_close(converted["vision_model.encoder.layers.1.self_attn.qkv.bias"], packed)


def test_convnext_dir_and_head_eps(tmp_path):
    hf = hf_convnext()
    directory = saved(hf, tmp_path)
    config = hf_visual.convnext_config_from_hf(directory)
    assert (config.eps, config.head_eps, config.dims, config.depths) == (1e-6, 1e-12, (8, 16, 24), (1, 2, 1))
    ours = ours_from(ConvNeXt, config, hf_visual.convnext_from_hf(directory))
    x = images(1, 64)
    with torch.no_grad():
        trunk = hf(pixel_values=x).last_hidden_state
        want = hf.layernorm(trunk.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(ours(x), want, **TOL)


def test_convnext_from_open_clip_strips_the_trunk_prefix():
    ours = ConvNeXt(hf_visual.convnext_config_from_hf(hf_convnext().config.to_dict()))
    trunk = ours.state_dict()
    checkpoint = {f"visual.trunk.{k}": v for k, v in trunk.items()}
    checkpoint.update({"visual.head.proj.weight": torch.zeros(4, 24), "text.token_embedding.weight": torch.zeros(3, 2),
                       "logit_scale": torch.zeros(())})
    converted = hf_visual.convnext_from_open_clip(checkpoint)
    assert converted.keys() == trunk.keys()
    with pytest.raises(CheckpointError, match="visual.trunk"):
        hf_visual.convnext_from_open_clip({"visual.conv1.weight": torch.zeros(1)})


def test_dinov2_dir_uses_the_hub_spelling(tmp_path):
    hf = hf_dinov2()
    directory = saved(hf, tmp_path)
    from safetensors import safe_open
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        on_disk = set(handle.keys())
    assert "encoder.layer.0.mlp.weights_in.weight" in on_disk          # not the in-memory gate/up split
    ours = ours_from(DINOv2, hf_visual.dinov2_config_from_hf(directory), hf_visual.dinov2_from_hf(directory))
    x = images(1, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).last_hidden_state, **TOL)


def test_sharded_safetensors_dir_is_read_whole(tmp_path):
    state = {k: v.contiguous() for k, v in hf_dinov2().state_dict().items()}
    names = sorted(state)
    save_file({k: state[k] for k in names[:10]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[10:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    converted = hf_visual.dinov2_from_hf(tmp_path)
    reference = hf_visual.dinov2_from_hf(state)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


# ------------------------------------------------------------------------------------------------------
# Wrong input


def test_a_checkpoint_of_another_encoder_is_refused():
    with pytest.raises(CheckpointError, match="not part of this encoder"):
        hf_visual.clip_from_hf(hf_dinov2().state_dict())
    with pytest.raises(CheckpointError, match="not part of BLIP-2"):
        hf_visual.blip2_from_hf(hf_dinov2().state_dict())
    with pytest.raises(CheckpointError, match="not part of this encoder"):
        hf_visual.convnext_from_hf(hf_dinov2().state_dict())


def test_a_missing_q_k_v_piece_is_named():
    state = dict(hf_dinov2().state_dict())
    del state["encoder.layer.1.attention.k_proj.weight"]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.qkv\.weight needs 3 HF pieces"):
        hf_visual.dinov2_from_hf(state)


def test_plain_mlp_dinov2_is_refused():
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                                       patch_size=4, use_swiglu_ffn=False)
    with pytest.raises(CheckpointError, match="SwiGLU"):
        hf_visual.dinov2_from_hf(transformers.Dinov2Model(config).state_dict())
    with pytest.raises(ConfigError, match="SwiGLU"):
        hf_visual.dinov2_config_from_hf(config.to_dict())


def test_bad_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        hf_visual.dinov2_from_hf(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="holds no weights"):
        hf_visual.dinov2_from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        hf_visual.dinov2_config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"use_swiglu_ffn": True, "hidden_size": 64}))
    assert hf_visual.dinov2_config_from_hf(tmp_path).width == 64
