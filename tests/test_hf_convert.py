"""HF LlamaForCausalLM <-> Accessory ``llama`` checkpoint conversion (accessory.checkpoint.hf).

A tiny random HF model is saved with ``save_pretrained`` (safetensors), converted, and loaded
through the public faces on both sides: ``MetaModel.from_pretrained`` must give HF's logits, and
``LlamaForCausalLM.from_pretrained`` of the converted-back directory must hold HF's exact tensors.
"""

import json
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
VOCAB = 32000


def _tokenizer_dir() -> Path:
    path = ckpt_utils.shared_dir() / "fixtures" / "tokenizers" / "llama-spm"
    if not (path / "tokenizer.model").is_file():
        pytest.skip(f"tokenizer fixture {path} is missing")
    return path


def make_hf_dir(directory: Path, rope=None, tied=False, seed=0, **overrides) -> Path:
    """save_pretrained a random tiny LlamaForCausalLM (dim 64, 2 layers, 4 heads, 2 KV heads) + tokenizer."""
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=160, rms_norm_eps=1e-5, max_position_embeddings=256,
                  tie_word_embeddings=tied, attn_implementation="eager",
                  rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0})
    kwargs.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    with torch.no_grad():  # norms start at 1.0; random ones catch a swapped norm
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(_tokenizer_dir() / name, directory / name)
    return directory


def hf_logits(hf_dir: Path, ids) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def assert_logits_match(hf_dir: Path, acc_dir: Path) -> None:
    ours = MetaModel.from_pretrained(str(acc_dir), max_seq_len=128, dtype=torch.float32, device="cpu")
    for text, logits in zip(TEXTS, ours.compute_logits(TEXTS)):
        ids = ours.tokenizer.encode(text, bos=True, eos=False)
        expected = hf_logits(hf_dir, ids)
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def assert_same_hf_tensors(a: Path, b: Path) -> None:
    sd_a = transformers.LlamaForCausalLM.from_pretrained(a).state_dict()
    sd_b = transformers.LlamaForCausalLM.from_pretrained(b).state_dict()
    assert sorted(sd_a) == sorted(sd_b)
    for name in sd_a:
        assert sd_a[name].dtype == sd_b[name].dtype, name
        assert torch.equal(sd_a[name], sd_b[name]), name


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("hf"))


@pytest.mark.parametrize("mp", [1, 2])
def test_hf_to_accessory_logits_match(hf_dir, tmp_path, mp):
    out = hf_to_accessory(hf_dir, tmp_path / "acc", mp=mp, progress=False)
    shards = sorted(p.name for p in out.glob("consolidated.*"))
    assert shards == [f"consolidated.{r:02d}-of-{mp:02d}.model.pth" for r in range(mp)]
    config = json.loads((out / "config.json").read_text())
    assert (config["dim"], config["n_layers"], config["n_heads"], config["n_kv_heads"]) == (64, 2, 4, 2)
    assert json.loads((out / "meta.json").read_text()) == {"llama_type": "llama"}
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()
    if mp == 2:  # cut by the original's rules
        rank0 = torch.load(out / shards[0], weights_only=True)["model"]
        assert rank0["llma.tok_embeddings.weight"].shape == (VOCAB, 32)
        assert rank0["llma.layers.0.attention.wk.weight"].shape == (16, 64)
        assert rank0["llma.layers.0.attention.wo.weight"].shape == (64, 32)
        assert rank0["llma.layers.0.feed_forward.w2.weight"].shape == (64, 80)
        assert rank0["llma.norm.weight"].shape == (64,)
    assert_logits_match(hf_dir, out)


@pytest.mark.parametrize("mp", [1, 2])
def test_round_trip_is_exact(hf_dir, tmp_path, mp):
    acc = hf_to_accessory(hf_dir, tmp_path / "acc", mp=mp, progress=False)
    back = accessory_to_hf(acc, tmp_path / "back", progress=False)
    assert (back / "tokenizer.model").is_file()
    config = json.loads((back / "config.json").read_text())
    assert config["intermediate_size"] == 160 and config["torch_dtype"] == "float32"
    assert_same_hf_tensors(hf_dir, back)


def test_bf16_dtype(hf_dir, tmp_path):
    acc = hf_to_accessory(hf_dir, tmp_path / "acc", dtype=torch.bfloat16, progress=False)
    sd = torch.load(acc / "consolidated.00-of-01.model.pth", weights_only=True)["model"]
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    back = accessory_to_hf(acc, tmp_path / "back", progress=False)
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_linear_rope_scaling(tmp_path):
    src = make_hf_dir(tmp_path / "hf", rope={"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0}, seed=1)
    acc = hf_to_accessory(src, tmp_path / "acc", progress=False)
    config = json.loads((acc / "config.json").read_text())
    assert config["rope_scaling"] == 0.25 and config["rope_theta"] == 50000.0
    assert_logits_match(src, acc)
    back = accessory_to_hf(acc, tmp_path / "back", progress=False)
    reloaded = transformers.AutoConfig.from_pretrained(back)
    assert reloaded.rope_parameters["rope_type"] == "linear" and reloaded.rope_parameters["factor"] == 4.0
    assert_same_hf_tensors(src, back)
    ids = [1, 450, 4996, 17354, 1701, 29916]
    torch.testing.assert_close(hf_logits(back, ids), hf_logits(src, ids), atol=0, rtol=0)


def test_tied_embeddings(tmp_path):
    src = make_hf_dir(tmp_path / "hf", tied=True, seed=2)
    acc = hf_to_accessory(src, tmp_path / "acc", progress=False)
    sd = torch.load(acc / "consolidated.00-of-01.model.pth", weights_only=True)["model"]
    assert torch.equal(sd["llma.output.weight"], sd["llma.tok_embeddings.weight"])
    assert_logits_match(src, acc)
    back = accessory_to_hf(acc, tmp_path / "back", progress=False)
    assert json.loads((back / "config.json").read_text())["tie_word_embeddings"] is True
    assert_same_hf_tensors(src, back)


def test_sharded_safetensors(hf_dir, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(hf_dir / name, sharded / name)
    acc = hf_to_accessory(sharded, tmp_path / "acc", progress=False)
    back = accessory_to_hf(acc, tmp_path / "back", progress=False)
    assert_same_hf_tensors(hf_dir, back)


def test_cli(hf_dir, tmp_path, capsys):
    assert main(["convert", "--from", "hf", str(hf_dir), str(tmp_path / "acc"), "--mp", "2"]) == 0
    assert (tmp_path / "acc" / "consolidated.01-of-02.model.pth").is_file()
    assert main(["convert", "--to", "hf", str(tmp_path / "acc"), str(tmp_path / "back")]) == 0
    assert_same_hf_tensors(hf_dir, tmp_path / "back")
    assert main(["convert", "--from", "hf", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", str(hf_dir), str(tmp_path / "y")]) == 2
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "--from hf" in capsys.readouterr().out


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _copy(hf_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(hf_dir, tmp_path / "copy"))


def test_error_non_llama_model_type(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    _edit_config(src, model_type="mistral")
    with pytest.raises(CheckpointError, match="model_type is 'mistral'"):
        hf_to_accessory(src, tmp_path / "out", progress=False)


def test_error_biases(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    _edit_config(src, attention_bias=True)
    with pytest.raises(CheckpointError, match="attention_bias"):
        hf_to_accessory(src, tmp_path / "out", progress=False)


def test_error_unsupported_rope(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    _edit_config(src, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    with pytest.raises(ConfigError, match="'llama3'"):
        hf_to_accessory(src, tmp_path / "out", progress=False)


def test_error_missing_files(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        hf_to_accessory(src, tmp_path / "out", progress=False)
    (src / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        hf_to_accessory(src, tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="is an HF model directory"):
        accessory_to_hf(hf_dir, tmp_path / "out2", progress=False)
    with pytest.raises(CheckpointError, match="no weight shards"):
        accessory_to_hf(src, tmp_path / "out3", progress=False)


def test_error_mp_does_not_divide_kv_heads(hf_dir, tmp_path):
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        hf_to_accessory(hf_dir, tmp_path / "out", mp=4, progress=False)


def test_error_accessory_to_hf_other_llama_type(hf_dir, tmp_path):
    acc = hf_to_accessory(hf_dir, tmp_path / "acc", progress=False)
    (acc / "meta.json").write_text(json.dumps({"llama_type": "mixtral"}))
    with pytest.raises(CheckpointError, match="'mixtral'"):
        accessory_to_hf(acc, tmp_path / "back", progress=False)
