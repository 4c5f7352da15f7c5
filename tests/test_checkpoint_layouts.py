"""Every checkpoint layout the original (and Meta) write loads to the same model.

Checkpoints are written by ``ckpt_utils`` (an independent statement of ORIGINAL.md's formats and
split rules) and loaded with ``MetaModel.from_pretrained``; the loaded parameters, fp32 logits and
greedy text must match the mp=1 reference exactly.
"""

import json
import sys
import warnings

import pytest
import torch

import ckpt_utils
from ckpt_utils import TINY_LLAMA, prefixed, split_for_mp, write_checkpoint
from accessory.errors import CheckpointError
from accessory.model.meta import MetaModel

PROMPTS = ["Hello world", "The capital of France is", "a"]
GEN_LEN = 6


def load(path, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("progress", False)
    return MetaModel.from_pretrained(path if isinstance(path, list) else str(path), **kwargs)


def assert_params_equal(model, expected):
    """Every parameter of ``model`` equals ``expected`` (keys without ``llma.``) bit for bit."""
    params = model.state_dict()
    assert set(params) == set(prefixed(expected))
    for key, value in expected.items():
        got = params["llma." + key]
        assert got.dtype == value.dtype, key
        assert torch.equal(got, value), key


@pytest.fixture(scope="module")
def reference(tiny_llama_model):
    """Logits and greedy text of the mp=1 consolidated checkpoint."""
    logits = tiny_llama_model.compute_logits(PROMPTS)
    text = tiny_llama_model.generate(PROMPTS, max_gen_len=GEN_LEN)
    return logits, text


def test_split_helper_round_trips_and_cuts_the_documented_dims(tiny_llama_state):
    shards = split_for_mp(tiny_llama_state, 2)
    assert shards[0]["tok_embeddings.weight"].shape == (32000, 32)  # ParallelEmbedding: dim 1
    assert shards[1]["output.weight"].shape == (16000, 64)  # column-parallel head: vocab rows
    assert shards[0]["layers.0.attention.wk.weight"].shape == (16, 64)  # 1 of 2 kv heads
    assert shards[0]["layers.0.attention.wo.weight"].shape == (64, 32)
    assert shards[0]["layers.1.feed_forward.w1.weight"].shape == (96, 64)  # FFN 192 / 2
    assert shards[0]["layers.1.feed_forward.w2.weight"].shape == (64, 96)
    assert torch.equal(shards[1]["norm.weight"], tiny_llama_state["norm.weight"])
    merged = ckpt_utils.merge_from_mp(shards)
    assert all(torch.equal(merged[k], v) for k, v in tiny_llama_state.items())


def test_reference_logits_are_not_degenerate(reference, tiny_llama_model, tiny_llama_state):
    logits, text = reference
    assert [tuple(x.shape) for x in logits] == [(3, 32000), (6, 32000), (2, 32000)]
    assert all(torch.isfinite(x).all() for x in logits)
    assert 0.5 < float(logits[0].std()) < 10.0
    assert all(len(t) > 0 for t in text)
    assert tiny_llama_model.load_result == {"missing_keys": [], "unexpected_keys": []}
    assert_params_equal(tiny_llama_model, tiny_llama_state)


@pytest.mark.filterwarnings("ignore:dropped 1 checkpoint entries.*rope.freqs")
@pytest.mark.parametrize("fmt,mp", [
    ("consolidated", 2),
    ("meta_ori", 1),
    ("meta_ori", 2),
    ("safetensors", 1),
    ("safetensors", 2),
    ("meta_safetensors", 2),
])
def test_layout_gives_identical_weights_logits_and_text(tmp_path, tiny_llama_state, reference, fmt, mp):
    ckpt = write_checkpoint(tmp_path / f"{fmt}_mp{mp}", tiny_llama_state, TINY_LLAMA, mp=mp, fmt=fmt)
    model = load(ckpt)
    assert_params_equal(model, tiny_llama_state)
    ref_logits, ref_text = reference
    for got, want in zip(model.compute_logits(PROMPTS), ref_logits):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert model.generate(PROMPTS, max_gen_len=GEN_LEN) == ref_text


@pytest.mark.parametrize("mp", [1, 2])
def test_meta_layout_reports_rope_freqs_once(tmp_path, tiny_llama_state, mp):
    ckpt = write_checkpoint(tmp_path / "meta", tiny_llama_state, TINY_LLAMA, mp=mp, fmt="meta_ori")
    assert sorted(p.name for p in ckpt.glob("*.pth")) == [f"consolidated.{r:02d}.pth" for r in range(mp)]
    raw = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    assert "rope.freqs" in raw and "model" not in raw and not any(k.startswith("llma.") for k in raw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(ckpt)
    assert model.load_result["unexpected_keys"] == ["llma.rope.freqs"]
    assert model.load_result["missing_keys"] == []
    rope_warnings = [w for w in caught if "rope.freqs" in str(w.message)]
    assert len(rope_warnings) == 1


def test_original_full_config_json_is_accepted(tiny_llama_dir):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    # asdict(ModelArgs) as the original writes it, fields the loader overrides included.
    assert config["vocab_size"] == 32000 and config["max_batch_size"] == 32 and config["rope_scaling"] is None
    model = load(tiny_llama_dir, max_seq_len=64)
    assert model.args.max_seq_len == 64
    assert model.args.vocab_size == 32000
    assert (model.args.dim, model.args.n_layers, model.args.n_kv_heads) == (64, 2, 2)


def test_legacy_dir_with_explicit_type_merged_configs_and_tokenizer(tmp_path, tiny_llama_state, reference,
                                                                   llama_spm_path):
    ckpt = write_checkpoint(tmp_path / "legacy", tiny_llama_state, TINY_LLAMA, mp=2, tokenizer=None,
                            write_meta=False, write_config=False)
    assert sorted(p.name for p in ckpt.iterdir()) == ["consolidated.00-of-02.model.pth",
                                                      "consolidated.01-of-02.model.pth"]
    base = tmp_path / "base.json"
    base.write_text(json.dumps(dict(TINY_LLAMA, n_layers=7, rope_theta=500000.0)))
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"n_layers": 2, "rope_theta": 10000.0}))
    model = load(ckpt, llama_type="llama", llama_config=[base, str(override)], tokenizer_path=llama_spm_path)
    assert model.args.n_layers == 2 and model.args.rope_theta == 10000.0
    assert model.load_result == {"missing_keys": [], "unexpected_keys": []}
    for got, want in zip(model.compute_logits(PROMPTS), reference[0]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

    # The wrong n_layers alone is caught: layers 2..6 have no weights.
    with pytest.raises(CheckpointError, match=r"Layers 2\.\.6 are missing entirely: the checkpoint has 2 layers but the config asks for 7; check n_layers"):
        load(ckpt, llama_type="llama", llama_config=[base], tokenizer_path=llama_spm_path)


def test_finetune_after_base_overrides_exactly_its_keys(tmp_path, tiny_llama_state, tiny_llama_dir):
    # A fine-tune saved with only_save_trainable: just the norms (mp=2, replicated on both ranks).
    tuned = {k: v * 3.0 + 0.5 for k, v in tiny_llama_state.items() if k.endswith("norm.weight")}
    assert len(tuned) == 2 * TINY_LLAMA["n_layers"] + 1
    finetune = write_checkpoint(tmp_path / "finetune", tuned, TINY_LLAMA, mp=2, vocab_size=32000)
    model = load([tiny_llama_dir, finetune])
    assert model.load_result == {"missing_keys": [], "unexpected_keys": []}
    assert_params_equal(model, {**tiny_llama_state, **tuned})
    # The norms changed the numbers.
    base_logits = load(tiny_llama_dir).compute_logits(PROMPTS[:1])[0]
    assert (model.compute_logits(PROMPTS[:1])[0] - base_logits).abs().max() > 1e-2


@pytest.mark.parametrize("fmt", ["diff", "diff_safetensors"])
def test_diff_checkpoint_is_added_onto_the_base(tmp_path, tiny_llama_state, tiny_llama_dir, fmt):
    delta_keys = ["tok_embeddings.weight", "layers.1.attention.wk.weight", "layers.0.feed_forward.w2.weight",
                  "layers.0.ffn_norm.weight", "output.weight"]
    gen = torch.Generator().manual_seed(7)
    delta = {k: 0.01 * torch.randn(tiny_llama_state[k].shape, generator=gen) for k in delta_keys}
    diff = write_checkpoint(tmp_path / "diff", delta, TINY_LLAMA, mp=2, fmt=fmt, vocab_size=32000)
    assert (diff / ckpt_utils.shard_name(fmt, 1, 2)).is_file()
    model = load([tiny_llama_dir, diff])
    expected = dict(tiny_llama_state)
    for key, d in delta.items():
        expected[key] = tiny_llama_state[key] + d
    assert_params_equal(model, expected)
    wk = model.llma.layers[1].attention.wk.weight
    assert torch.equal(wk, tiny_llama_state["layers.1.attention.wk.weight"] + delta["layers.1.attention.wk.weight"])


def test_diff_without_base_is_an_error(tmp_path, tiny_llama_state):
    diff = write_checkpoint(tmp_path / "diff", tiny_llama_state, TINY_LLAMA, fmt="diff")
    with pytest.raises(CheckpointError, match="base checkpoint before the delta"):
        load(diff)


@pytest.mark.parametrize("missing_key,check", [
    ("layers.1.ffn_norm.weight", lambda p: torch.equal(p, torch.ones(64))),
    ("layers.0.attention.wq.weight",  # nn.Linear init: kaiming_uniform(a=sqrt 5) => |w| <= 1/sqrt(in)
     lambda p: 0 < float(p.abs().max()) <= 1 / 64 ** 0.5 and float(p.std()) > 0.01),
])
def test_missing_key_strict_and_not_strict(tmp_path, tiny_llama_state, missing_key, check):
    state = {k: v for k, v in tiny_llama_state.items() if k != missing_key}
    ckpt = write_checkpoint(tmp_path / "partial", state, TINY_LLAMA, mp=2, vocab_size=32000)
    with pytest.raises(CheckpointError) as err:
        load(ckpt)
    assert "llma." + missing_key in str(err.value) and "strict=False" in str(err.value)

    with pytest.warns(UserWarning, match="freshly initialised"):
        model = load(ckpt, strict=False)
    assert model.load_result == {"missing_keys": ["llma." + missing_key], "unexpected_keys": []}
    fresh = model.state_dict()["llma." + missing_key]
    assert not fresh.is_meta and fresh.dtype == torch.float32 and fresh.device.type == "cpu"
    assert fresh.shape == tiny_llama_state[missing_key].shape
    assert check(fresh)
    # Everything else is the checkpoint's, and the model runs.
    assert_params_equal(model, {**state, missing_key: fresh})
    assert all(torch.isfinite(x).all() for x in model.compute_logits(PROMPTS))


@pytest.mark.parametrize("mp,fmt", [(1, "consolidated"), (2, "consolidated"), (2, "safetensors")])
def test_bf16_checkpoint_loads_bit_exact(tmp_path, tiny_llama_state, mp, fmt):
    ckpt = write_checkpoint(tmp_path / "bf16", tiny_llama_state, TINY_LLAMA, mp=mp, fmt=fmt, dtype=torch.bfloat16)
    model = load(ckpt, dtype=torch.bfloat16)
    expected = {k: v.to(torch.bfloat16) for k, v in tiny_llama_state.items()}
    assert_params_equal(model, expected)
    logits = model.compute_logits(PROMPTS[:1])[0]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_bf16_checkpoint_upcast_to_fp32_is_exact(tmp_path, tiny_llama_state):
    ckpt = write_checkpoint(tmp_path / "bf16", tiny_llama_state, TINY_LLAMA, mp=2, dtype=torch.bfloat16)
    model = load(ckpt, dtype=torch.float32)
    assert_params_equal(model, {k: v.to(torch.bfloat16).float() for k, v in tiny_llama_state.items()})


@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("float32", torch.float32),
                                        ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_given_as_a_string(tiny_llama_dir, tiny_llama_state, name, dtype):
    model = load(tiny_llama_dir, dtype=name)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert torch.equal(model.llma.norm.weight, tiny_llama_state["norm.weight"].to(dtype))


def _resident_bytes_of(path) -> int:
    """This process's resident bytes of its mappings of the file ``path`` (/proc/self/smaps)."""
    total, ours = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                ours = len(fields) >= 6 and fields[-1] == str(path)
            elif ours and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
@pytest.mark.parametrize("mp", [1, 2])
def test_a_cast_on_load_leaves_the_read_pages_to_the_file(tmp_path, tiny_llama_state, monkeypatch, mp):
    """An fp16 checkpoint read into bf16: each tensor is read from the memory-mapped shard and
    converted, and the shard's pages it was read from are dropped from this process (the file
    keeps them), so the load never holds the checkpoint and the converted model both whole (an
    fp16 1.1B model read into bf16 peaked at 2.05x its size, 1.15x with this). Where a tensor is
    used in place (a bf16 checkpoint read into bf16) its pages stay: they are the parameter."""
    import accessory.checkpoint.load as load_module
    opened = []
    read = load_module.read_state_dict
    monkeypatch.setattr(load_module, "read_state_dict", lambda path, **kw: opened.append((path, read(path, **kw))) or
                        opened[-1][1])  # (kept alive here: the mappings outlive the load)
    state = {k: v * 3 for k, v in tiny_llama_state.items()}
    ckpt = write_checkpoint(tmp_path / "fp16", state, TINY_LLAMA, mp=mp, dtype=torch.float16)
    model = load(ckpt, dtype=torch.bfloat16)
    assert_params_equal(model, {k: v.to(torch.float16).to(torch.bfloat16) for k, v in state.items()})
    assert len(opened) == mp
    for path, tensors in opened:
        size = path.stat().st_size
        assert _resident_bytes_of(path) < size // 8, path
        for tensor in tensors.values():
            tensor.float().sum()  # (every page read once more: resident again, as the load left them before)
        assert _resident_bytes_of(path) > size // 2  # (the check above read the file's mapping)

    opened.clear()
    in_place = load(write_checkpoint(tmp_path / "bf16", state, TINY_LLAMA, dtype=torch.bfloat16), dtype=torch.bfloat16)
    (path, tensors), = opened
    embedding = in_place.llma.tok_embeddings.weight
    assert embedding.data_ptr() == tensors["llma.tok_embeddings.weight"].data_ptr()  # (the file's pages)
    assert torch.equal(embedding, state["tok_embeddings.weight"].to(torch.bfloat16))
