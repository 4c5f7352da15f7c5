"""HF MixtralForCausalLM / FalconForCausalLM <-> Accessory ``mixtral`` / ``falcon`` conversion.

Tiny random HF models are saved with ``save_pretrained`` (safetensors), converted at mp 1 and 2 and
loaded with ``MetaModel.from_pretrained``: logits must equal HF's. Converting back must give HF's
exact tensors; configs ``falcon`` cannot hold must be refused. (InternLM: tests/test_hf_convert_internlm.py.)
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from accessory.checkpoint.hf import accessory_to_hf, hf_to_accessory  # noqa: E402
from accessory.cli import main  # noqa: E402
from accessory.errors import CheckpointError, ConfigError  # noqa: E402
from accessory.model.meta import MetaModel  # noqa: E402

import ckpt_utils  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "Once upon a time, in a land far away,"]


def _tokenizer_dir(name: str) -> Path:
    path = ckpt_utils.shared_dir() / "fixtures" / "tokenizers" / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"tokenizer fixture {path} is missing")
    return path


def _randomise(model, router_scale: float = 3.0) -> None:
    """Weights of unit-ish scale (norms around 1, routers decisive so top-k choices are not near-ties)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name:
                param.copy_((1 + 0.1 * torch.randn(param.shape, generator=gen)) if name.endswith("weight")
                            else 0.1 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            else:
                fan_in = param.shape[-1]
                scale = router_scale if name.endswith("mlp.gate.weight") else 1.0
                param.copy_(torch.randn(param.shape, generator=gen) * scale / math.sqrt(fan_in))


def _save(model, directory: Path, tokenizer: str) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    for file in _tokenizer_dir(tokenizer).iterdir():
        if file.name.startswith("tokenizer"):
            shutil.copyfile(file, directory / file.name)
    return directory


def make_mixtral(directory: Path, **overrides) -> Path:
    kwargs = dict(vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                  rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False, sliding_window=None,
                  router_jitter_noise=0.0, attn_implementation="eager",
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**kwargs)).eval()
    _randomise(model)
    return _save(model, directory, "llama-spm")


FALCON_VARIANTS = {
    # Falcon-7B: old architecture, multi-query, parallel attention and MLP off one LayerNorm
    "7b_multi_query": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
    # Falcon-40B/180B layout with one kv head
    "new_arch_one_kv": dict(new_decoder_architecture=True, num_kv_heads=1, bias=True),
    # new architecture with as many kv heads as query heads, linear RoPE scaling
    "new_arch_mha": dict(new_decoder_architecture=True, num_kv_heads=4,
                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}),
    # old architecture, sequential, multi-head, biases, tied embeddings
    "old_sequential_mha": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True,
                               tie_word_embeddings=True),
}


def make_falcon(directory: Path, **overrides) -> Path:
    kwargs = dict(vocab_size=65024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=False,
                  layer_norm_epsilon=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
                  attn_implementation="eager", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(transformers.FalconConfig(**kwargs)).eval()
    _randomise(model)
    return _save(model, directory, "falcon")


def _hf_class(hf_dir: Path):
    model_type = json.loads((hf_dir / "config.json").read_text())["model_type"]
    return {"mixtral": transformers.MixtralForCausalLM, "falcon": transformers.FalconForCausalLM}[model_type]


def assert_logits_match(hf_dir: Path, acc_dir: Path) -> None:
    ours = MetaModel.from_pretrained(str(acc_dir), max_seq_len=128, dtype=torch.float32, device="cpu")
    hf = _hf_class(hf_dir).from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    for text, logits in zip(TEXTS, ours.compute_logits(TEXTS)):
        ids = ours.tokenizer.encode(text, bos=ours.tokenizer.add_bos, eos=False)
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0]
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def assert_same_hf_tensors(a: Path, b: Path) -> None:
    cls = _hf_class(a)
    sd_a, sd_b = cls.from_pretrained(a).state_dict(), cls.from_pretrained(b).state_dict()
    assert sorted(sd_a) == sorted(sd_b)
    for name in sd_a:
        assert sd_a[name].dtype == sd_b[name].dtype, name
        assert torch.equal(sd_a[name], sd_b[name]), name


# =========================================================================== mixtral

@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return make_mixtral(tmp_path_factory.mktemp("hf_mixtral"))


@pytest.mark.parametrize("mp", [1, 2])
def test_mixtral_hf_to_accessory_logits_match(mixtral_dir, tmp_path, mp):
    out = hf_to_accessory(mixtral_dir, tmp_path / "acc", mp=mp, progress=False)
    assert json.loads((out / "meta.json").read_text()) == {"llama_type": "mixtral"}
    config = json.loads((out / "config.json").read_text())
    assert config["moe"] == {"num_experts": 4, "num_experts_per_tok": 2}
    assert (config["hidden_dim"], config["n_kv_heads"], config["rope_theta"]) == (96, 2, 1000000.0)
    if mp == 2:  # whole experts per rank, by global index; the router replicated
        rank0 = torch.load(out / "consolidated.00-of-02.model.pth", weights_only=True)["model"]
        rank1 = torch.load(out / "consolidated.01-of-02.model.pth", weights_only=True)["model"]
        assert "llma.layers.0.feed_forward.experts.1.w2.weight" in rank0
        assert "llma.layers.0.feed_forward.experts.2.w2.weight" not in rank0
        assert rank1["llma.layers.0.feed_forward.experts.3.w1.weight"].shape == (96, 64)
        assert rank0["llma.layers.0.feed_forward.gate.weight"].shape == (4, 64)
        assert rank0["llma.layers.0.attention.wk.weight"].shape == (16, 64)
    assert_logits_match(mixtral_dir, out)


@pytest.mark.parametrize("mp", [1, 2])
def test_mixtral_round_trip_is_exact(mixtral_dir, tmp_path, mp):
    acc = hf_to_accessory(mixtral_dir, tmp_path / "acc", mp=mp, progress=False)
    back = accessory_to_hf(acc, tmp_path / "back", progress=False)
    config = json.loads((back / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["intermediate_size"]) == ("mixtral", 4, 96)
    assert_same_hf_tensors(mixtral_dir, back)
    # and back again: the written HF directory converts to the same Accessory weights
    again = hf_to_accessory(back, tmp_path / "again", mp=mp, progress=False)
    for rank in range(mp):
        name = f"consolidated.{rank:02d}-of-{mp:02d}.model.pth"
        a = torch.load(acc / name, weights_only=True)["model"]
        b = torch.load(again / name, weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mixtral_cli(mixtral_dir, tmp_path):
    assert main(["convert", "--from", "hf", str(mixtral_dir), str(tmp_path / "acc"), "--mp", "2"]) == 0
    assert main(["convert", "--to", "hf", str(tmp_path / "acc"), str(tmp_path / "back")]) == 0
    assert_same_hf_tensors(mixtral_dir, tmp_path / "back")


def test_mixtral_errors(mixtral_dir, tmp_path):
    with pytest.raises(ConfigError, match="num_local_experts = 4 cannot be split over mp = 8"):
        hf_to_accessory(make_mixtral(tmp_path / "many_heads", num_attention_heads=8, num_key_value_heads=8),
                        tmp_path / "out", mp=8, progress=False)
    src = Path(shutil.copytree(mixtral_dir, tmp_path / "copy"))
    config = json.loads((src / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hidden_act = 'gelu'"):
        hf_to_accessory(src, tmp_path / "out2", progress=False)


# =========================================================================== falcon

@pytest.fixture(scope="module", params=list(FALCON_VARIANTS))
def falcon_dir(request, tmp_path_factory):
    return make_falcon(tmp_path_factory.mktemp(f"hf_falcon_{request.param}"), **FALCON_VARIANTS[request.param])


@pytest.mark.parametrize("mp", [1, 2])
def test_falcon_hf_to_accessory_logits_match(falcon_dir, tmp_path, mp):
    out = hf_to_accessory(falcon_dir, tmp_path / "acc", mp=mp, progress=False)
    assert json.loads((out / "meta.json").read_text()) == {"llama_type": "falcon"}
    hf_config = json.loads((falcon_dir / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    one_kv = hf_config["num_kv_heads"] == 1 if hf_config["new_decoder_architecture"] else hf_config["multi_query"]
    assert config["multi_query"] is one_kv
    if mp == 2:
        rank0 = torch.load(out / "consolidated.00-of-02.model.pth", weights_only=True)["model"]
        assert rank0["llma.layers.0.self_attention.wq.weight"].shape == (32, 64)
        assert rank0["llma.layers.0.self_attention.wk.weight"].shape == ((16, 64) if one_kv else (32, 64))
        assert rank0["llma.word_embeddings.weight"].shape == (65024, 32)
    assert_logits_match(falcon_dir, out)


@pytest.mark.parametrize("mp", [1, 2])
def test_falcon_round_trip_is_exact(falcon_dir, tmp_path, mp):
    acc = hf_to_accessory(falcon_dir, tmp_path / "acc", mp=mp, progress=False)
    back = accessory_to_hf(acc, tmp_path / "back", progress=False)
    original = json.loads((falcon_dir / "config.json").read_text())
    written = json.loads((back / "config.json").read_text())
    assert written["tie_word_embeddings"] == original["tie_word_embeddings"]
    assert_same_hf_tensors(falcon_dir, back)


def test_falcon_grouped_kv_heads_refused(tmp_path):
    src = make_falcon(tmp_path / "hf", new_decoder_architecture=True, num_kv_heads=2)
    with pytest.raises(CheckpointError, match="num_kv_heads = 2 .*cannot be represented"):
        hf_to_accessory(src, tmp_path / "out", progress=False)


@pytest.mark.parametrize("change, message", [
    ({"alibi": True}, "alibi"),
    ({"activation": "relu"}, "activation = 'relu'"),
    ({"ffn_hidden_size": 128}, "ffn_hidden_size = 128"),
    ({"new_decoder_architecture": True, "num_kv_heads": 1, "num_ln_in_parallel_attn": 1}, "num_ln_in_parallel_attn"),
])
def test_falcon_unrepresentable_configs_refused(tmp_path, change, message):
    src = tmp_path / "hf"
    src.mkdir()
    config = dict(model_type="falcon", vocab_size=65024, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, new_decoder_architecture=False, multi_query=True)
    config.update(change)
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        hf_to_accessory(src, tmp_path / "out", progress=False)


def test_falcon_mp_must_divide_heads(tmp_path):
    src = make_falcon(tmp_path / "hf", **FALCON_VARIANTS["7b_multi_query"])
    with pytest.raises(ConfigError, match="num_attention_heads = 4 cannot be split over mp = 3"):
        hf_to_accessory(src, tmp_path / "out", mp=3, progress=False)


def test_unknown_model_type_lists_supported(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(CheckpointError, match="model_type is 'qwen2'.*'mixtral'.*'falcon'.*'internlm'"):
        hf_to_accessory(src, tmp_path / "out", progress=False)


def test_mixtral_fused_experts_layout(mixtral_dir, tmp_path):
    """transformers 5's in-memory layout (mlp.experts.gate_up_proj / down_proj) converts as hub-style does."""
    from safetensors.torch import save_file
    fused = Path(shutil.copytree(mixtral_dir, tmp_path / "fused"))
    state = transformers.MixtralForCausalLM.from_pretrained(mixtral_dir).state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"))
    a = hf_to_accessory(mixtral_dir, tmp_path / "a", progress=False)
    b = hf_to_accessory(fused, tmp_path / "b", progress=False)
    sd_a = torch.load(a / "consolidated.00-of-01.model.pth", weights_only=True)["model"]
    sd_b = torch.load(b / "consolidated.00-of-01.model.pth", weights_only=True)["model"]
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
