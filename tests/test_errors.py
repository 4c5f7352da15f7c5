"""Broken checkpoints and configs fail with the package's own error types and messages people can act on.

Each case checks the error class (a CheckpointError / ConfigError / TokenizerError, never a bare
KeyError, AttributeError or RuntimeError) and that the message names the file or key and the fix.
"""

import json
import os
import pickle

import pytest
import torch

from ckpt_utils import TINY_LLAMA, random_llama_state, write_checkpoint
from accessory.checkpoint.discover import find_shards
from accessory.errors import AccessoryError, CheckpointError, ConfigError, TokenizerError
from accessory.model.meta import MetaModel

SHARD = "consolidated.00-of-01.model.pth"


def load(path, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("progress", False)
    return MetaModel.from_pretrained(str(path), **kwargs)


def error_of(error_type, path, **kwargs) -> str:
    """Load ``path`` expecting ``error_type``; return its message."""
    with pytest.raises(error_type) as info:
        load(path, **kwargs)
    assert isinstance(info.value, AccessoryError)
    return str(info.value)


@pytest.fixture
def ckpt(tmp_path, tiny_llama_state):
    """A fresh, complete, loadable mp=1 checkpoint to break."""
    return write_checkpoint(tmp_path / "ckpt", tiny_llama_state, TINY_LLAMA)


def test_the_unbroken_checkpoint_loads(ckpt):
    assert load(ckpt).load_result == {"missing_keys": [], "unexpected_keys": []}


# --------------------------------------------------------------------------- finding the shards

def test_missing_directory(tmp_path):
    message = error_of(CheckpointError, tmp_path / "no_such_ckpt")
    assert "no_such_ckpt" in message and "does not exist" in message and "pretrained_path" in message


def test_file_instead_of_directory(ckpt):
    message = error_of(CheckpointError, ckpt / SHARD)
    assert SHARD in message and "is a file" in message and "directory" in message


def test_file_instead_of_directory_find_shards(ckpt):
    with pytest.raises(CheckpointError) as info:
        find_shards(ckpt / SHARD)
    assert SHARD in str(info.value) and "is a file" in str(info.value) and "pass the directory" in str(info.value)


def test_directory_without_shards(ckpt):
    (ckpt / SHARD).rename(ckpt / "weights.bin")
    message = error_of(CheckpointError, ckpt)
    assert "no weight shards" in message and str(ckpt) in message
    assert "consolidated.00-of-01.model.pth" in message  # the expected name
    assert "weights.bin" in message and "config.json" in message  # what is there


def test_two_formats_in_one_directory(ckpt, tiny_llama_state):
    write_checkpoint(ckpt, tiny_llama_state, TINY_LLAMA, fmt="meta_ori", tokenizer=None)
    message = error_of(CheckpointError, ckpt)
    assert SHARD in message and "consolidated.00.pth" in message
    assert "one format only" in message and "own directory" in message


def test_pth_and_safetensors_for_the_same_rank(ckpt, tiny_llama_state):
    write_checkpoint(ckpt, tiny_llama_state, TINY_LLAMA, fmt="safetensors", tokenizer=None)
    message = error_of(CheckpointError, ckpt)
    assert SHARD in message and "consolidated.00-of-01.model.safetensors" in message and "keep one" in message


@pytest.mark.parametrize("fmt,present,absent", [
    ("consolidated", "consolidated.01-of-02.model.pth", "consolidated.00-of-02.model.pth"),
    ("meta_ori", "consolidated.01.pth", "consolidated.00.pth"),
    ("safetensors", "consolidated.01-of-02.model.safetensors", "consolidated.00-of-02.model.safetensors"),
])
def test_rank_one_without_rank_zero(tmp_path, tiny_llama_state, fmt, present, absent):
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_llama_state, TINY_LLAMA, mp=2, fmt=fmt)
    (ckpt / absent).unlink()
    message = error_of(CheckpointError, ckpt)
    assert f"missing {absent}" in message and present in message and "Copy the missing files in" in message


def test_shards_of_two_mp_sizes(ckpt, tiny_llama_state):
    write_checkpoint(ckpt, tiny_llama_state, TINY_LLAMA, mp=2, tokenizer=None)
    message = error_of(CheckpointError, ckpt)
    assert "model-parallel sizes [1, 2]" in message and "keep one set" in message


def test_empty_and_hub_paths(tmp_path):
    with pytest.raises(CheckpointError, match="pretrained_path is empty"):
        MetaModel.from_pretrained([])
    with pytest.raises(CheckpointError, match="download the repo yourself"):
        MetaModel.from_pretrained("hf://owner/repo")


# --------------------------------------------------------------------------- meta.json / config

def test_no_meta_json_and_no_llama_type(ckpt):
    (ckpt / "meta.json").unlink()
    message = error_of(ConfigError, ckpt)
    assert str(ckpt / "meta.json") in message and "llama_type=" in message and '"llama_type": "llama"' in message


@pytest.mark.parametrize("where", ["argument", "meta.json"])
def test_unknown_llama_type(ckpt, where):
    if where == "argument":
        message = error_of(ConfigError, ckpt, llama_type="llama9")
    else:
        (ckpt / "meta.json").write_text(json.dumps({"llama_type": "llama9"}))
        message = error_of(ConfigError, ckpt)
    assert "'llama9'" in message and "meta.json" in message
    known = message.split("known types:")[1].split(".")[0]
    assert "llama" in [name.strip() for name in known.split(",")]


@pytest.mark.parametrize("content", ["{", "", "[\"llama\"]", '{"type": "llama"}', '"llama"'])
def test_malformed_meta_json(ckpt, content):
    (ckpt / "meta.json").write_text(content)
    message = error_of(ConfigError, ckpt)
    assert str(ckpt / "meta.json") in message and '"llama_type"' in message


@pytest.mark.parametrize("name", ["meta.json", "config.json"])
def test_json_file_that_is_not_text(ckpt, name):
    (ckpt / name).write_bytes(b"\xff\xfe\x00binary")
    message = error_of(ConfigError, ckpt)
    assert str(ckpt / name) in message


def test_config_key_the_architecture_does_not_take(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["use_flash_attention"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    message = error_of(ConfigError, ckpt)
    assert "use_flash_attention" in message and "'llama'" in message and "Remove them" in message


@pytest.mark.parametrize("explicit", [False, True])
def test_config_that_is_not_json(ckpt, tmp_path, explicit):
    bad = tmp_path / "bad_config.json" if explicit else ckpt / "config.json"
    bad.write_text('{"dim": 64, "n_layers": 2,}')
    message = error_of(ConfigError, ckpt, **({"llama_config": [ckpt / "config.json", bad]} if explicit else {}))
    assert str(bad) in message and "not valid JSON" in message and "line 1" in message


def test_config_that_is_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[64, 2]")
    message = error_of(ConfigError, ckpt)
    assert "config.json" in message and "JSON object" in message and "list" in message


def test_llama_config_file_that_does_not_exist(ckpt, tmp_path):
    message = error_of(ConfigError, ckpt, llama_config=[tmp_path / "nope.json"])
    assert "nope.json" in message and "does not exist" in message


@pytest.mark.parametrize("override", [{"n_heads": 5}, {"n_kv_heads": 3}, {"dim": "64"}])
def test_config_values_the_architecture_cannot_build(ckpt, override):
    config = json.loads((ckpt / "config.json").read_text())
    config.update(override)
    (ckpt / "config.json").write_text(json.dumps(config))
    message = error_of(ConfigError, ckpt)
    assert next(iter(override)) in message and "config.json" in message


# --------------------------------------------------------------------------- shapes

def test_shape_mismatch(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["n_kv_heads"] = 4  # the checkpoint has 2 kv heads
    (ckpt / "config.json").write_text(json.dumps(config))
    message = error_of(CheckpointError, ckpt)
    assert "llma.layers.0.attention.wk.weight" in message
    assert "(32, 64)" in message and "(64, 64)" in message
    assert str(ckpt / SHARD) in message and "n_kv_heads" in message


def test_shape_mismatch_in_merged_shards_names_the_files(tmp_path, tiny_llama_state):
    # The weights have FFN width 192 (multiple_of=32); the config says multiple_of=256 -> 256.
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_llama_state, dict(TINY_LLAMA, multiple_of=256), mp=2)
    message = error_of(CheckpointError, ckpt)
    assert "feed_forward.w1.weight" in message and "(192, 64)" in message and "(256, 64)" in message
    assert "consolidated.00-of-02.model.pth" in message and "consolidated.01-of-02.model.pth" in message
    assert "multiple_of" in message


def test_split_key_missing_from_one_rank(tmp_path, tiny_llama_state):
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_llama_state, TINY_LLAMA, mp=2)
    shard = ckpt / "consolidated.01-of-02.model.pth"
    state = torch.load(shard, weights_only=True)
    del state["model"]["llma.layers.1.attention.wq.weight"]
    torch.save(state, shard)
    message = error_of(CheckpointError, ckpt)
    assert "llma.layers.1.attention.wq.weight" in message and "only consolidated.00-of-02.model.pth" in message
    assert "copy all 2 shards again" in message


def test_vocab_mismatch_names_the_tokenizer(tmp_path, llama_spm_path):
    state = random_llama_state(TINY_LLAMA, vocab_size=1000)
    ckpt = write_checkpoint(tmp_path / "ckpt", state, TINY_LLAMA)
    message = error_of(CheckpointError, ckpt)
    assert "llma.tok_embeddings.weight" in message and "(1000, 64)" in message and "(32000, 64)" in message
    assert "tokenizer" in message and "32000 tokens" in message and "tokenizer_path=" in message
    assert str(ckpt / "tokenizer.model") in message


# --------------------------------------------------------------------------- damaged files

def test_truncated_pth(ckpt):
    shard = ckpt / SHARD
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    message = error_of(CheckpointError, ckpt)
    assert str(shard) in message and "truncated or corrupt" in message and "re-download" in message


@pytest.mark.parametrize("content,expected", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "git lfs pull"),
    (b"", "is empty (0 bytes)"),
    (b"these are not weights", "not a PyTorch checkpoint"),
])
@pytest.mark.parametrize("name", [SHARD, "consolidated.00-of-01.model.safetensors"])
def test_shard_that_is_not_a_checkpoint(ckpt, content, expected, name):
    if name != SHARD:
        (ckpt / SHARD).unlink()
    (ckpt / name).write_bytes(content)
    message = error_of(CheckpointError, ckpt)
    assert str(ckpt / name) in message
    assert expected in message or (name.endswith(".safetensors") and "not a safetensors file" in message)


def test_accessory_file_named_like_a_meta_shard(ckpt):
    (ckpt / SHARD).rename(ckpt / "consolidated.00.pth")
    message = error_of(CheckpointError, ckpt)
    assert "consolidated.00.pth" in message and "must be named consolidated.NN-of-MM.model.pth" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad_header"])
def test_corrupt_safetensors(tmp_path, tiny_llama_state, damage):
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_llama_state, TINY_LLAMA, fmt="safetensors")
    shard = ckpt / "consolidated.00-of-01.model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes({"truncated": data[: len(data) // 2],
                       "garbage": b"\x00not a safetensors file" * 4,
                       "bad_header": data[:8] + b"{not json" + data[17:]}[damage])
    message = error_of(CheckpointError, ckpt)
    assert str(shard) in message and "not a safetensors file" in message and "re-download" in message


class _RunsCode:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _PlainObject:
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch_save", "torch_save_meta_layout", "raw_pickle", "raw_pickle_protocol_2",
                                 "custom_class"])
def test_pickle_carrying_code_is_refused_and_never_run(ckpt, tmp_path, how):
    marker = tmp_path / "PWNED"
    shard = ckpt / SHARD
    if how == "torch_save":
        torch.save({"model": {"llma.norm.weight": torch.ones(64), "llma.x": _RunsCode(marker)}}, shard)
    elif how == "torch_save_meta_layout":
        shard.unlink()
        shard = ckpt / "consolidated.00.pth"
        torch.save({"norm.weight": torch.ones(64), "x": _RunsCode(marker)}, shard)
    elif how.startswith("raw_pickle"):  # a plain pickle stream, like the pre-zip torch format
        with open(shard, "wb") as f:
            pickle.dump({"model": _RunsCode(marker)}, f, protocol=2 if how.endswith("2") else 4)
    else:
        torch.save({"model": {"llma.norm.weight": torch.ones(64)}, "args": _PlainObject()}, shard)
    message = error_of(CheckpointError, ckpt)
    assert not marker.exists()
    assert str(shard) in message and "arbitrary code" in message and "safetensors" in message


def test_non_tensor_entries_in_state(ckpt):
    torch.save({"model": {"llma.norm.weight": torch.ones(64), "llma.step": 7}}, ckpt / SHARD)
    message = error_of(CheckpointError, ckpt)
    assert str(ckpt / SHARD) in message and "llma.step" in message and "non-tensor" in message


# --------------------------------------------------------------------------- tokenizer

def test_no_tokenizer_in_directory(ckpt):
    (ckpt / "tokenizer.model").unlink()
    message = error_of(TokenizerError, ckpt)
    assert str(ckpt) in message and "tokenizer.model" in message and "tokenizer.json" in message
    assert "tokenizer_path=" in message


def test_tokenizer_path_that_does_not_exist(ckpt, tmp_path):
    message = error_of(TokenizerError, ckpt, tokenizer_path=tmp_path / "nope" / "tokenizer.model")
    assert "nope" in message and "does not exist" in message


def test_corrupt_tokenizer_model(ckpt):
    (ckpt / "tokenizer.model").write_bytes(b"\x00\x01 not a sentencepiece model")
    message = error_of(TokenizerError, ckpt)
    assert str(ckpt / "tokenizer.model") in message and "SentencePiece" in message
