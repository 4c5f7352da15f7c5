"""Accessory ``llama`` checkpoint -> GGUF (``accessory.checkpoint.gguf_export``, ``accessory convert --to gguf``).

* Each file type read back through our own GGUF reader (``GGUFFile``, ``convert_gguf``) and run with
  ``MetaModel`` against the source checkpoint's logits: F16 and BF16 must be the source rounded to that
  type, Q8_0 / Q4_0 weights must be within the error their block formula allows (restated here).
* Metadata: hyper-parameters, tensor names, types and torch-order shapes, the SentencePiece vocabulary, and
  for byte-level BPE tokenizer.json files llama.cpp's own test vectors after the round trip.
* When llama-cpp-python is installed (the ``bench`` extra; never in CI), llama.cpp itself loads the F16 file,
  tokenizes as the original tokenizer does and gives our logits.
"""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from accessory.checkpoint.gguf import GGUFFile, convert_gguf, convert_gguf_tokenizer  # noqa: E402
from accessory.checkpoint.gguf_export import GGUF_EXPORT_TYPES, export_gguf  # noqa: E402
from accessory.cli import build_parser, main  # noqa: E402
from accessory.errors import CheckpointError  # noqa: E402
from accessory.model.meta import MetaModel  # noqa: E402

import ckpt_utils  # noqa: E402
from ckpt_utils import TINY_LLAMA, random_llama_state, write_checkpoint  # noqa: E402

VOCAB = ckpt_utils.LLAMA_SPM_VOCAB
# "The quick brown fox jumps over the lazy dog." in the Llama 2 vocabulary, with BOS
IDS = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889]
VECTOR_SEPARATOR = "\n__ggml_vocab_test__\n"

# Our name -> the GGUF name llama.cpp uses, restated from llama.cpp's tensor table
GGUF_LAYER_NAMES = {
    "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight", "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
GGUF_GLOBAL_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                     "output.weight": "output.weight"}


def gguf_name(name):
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(checkpoint dir, fp32 state without llma., reference logits of IDS)."""
    ckpt_utils.llama_spm_tokenizer()  # skip without the fixtures
    state = random_llama_state(TINY_LLAMA, VOCAB, seed=3)
    directory = write_checkpoint(tmp_path_factory.mktemp("src") / "tiny", state, TINY_LLAMA)
    model = MetaModel.from_pretrained(str(directory), dtype=torch.float32, device="cpu", progress=False)
    return directory, state, model.compute_logits([IDS])[0]


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """{type: (gguf path, round-tripped fp32 state, logits of the round-tripped model)}, built on demand."""
    cache, root = {}, tmp_path_factory.mktemp("gguf")

    def get(out_type):
        if out_type not in cache:
            path = export_gguf(source[0], root / f"tiny.{out_type}.gguf", out_type, progress=False)
            back = convert_gguf(path, root / f"back-{out_type}", dtype=torch.float32, progress=False)
            state = torch.load(back / "consolidated.00-of-01.model.pth", weights_only=True)["model"]
            model = MetaModel.from_pretrained(str(back), dtype=torch.float32, device="cpu", progress=False)
            cache[out_type] = (path, {k[len("llma."):]: v for k, v in state.items()},
                               model.compute_logits([IDS])[0])
        return cache[out_type]
    return get


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def blocks(tensor):
    """(n_blocks, 32) float64 view of a matrix's rows in Q8_0/Q4_0 blocks."""
    return tensor.double().reshape(-1, 32)


# ------------------------------------------------------------------------------------------------ values


def test_f16_weights_and_logits(source, exported):
    _, state, reference = source
    path, back, logits = exported("f16")
    assert set(back) == set(state)
    for name, value in state.items():
        expected = value if value.dim() == 1 else value.to(torch.float16).float()  # norms stay F32
        assert torch.equal(back[name], expected), name
    assert relative_error(logits, reference) < 2e-3
    torch.testing.assert_close(logits, reference, rtol=0, atol=2e-2)


def test_bf16_is_bit_exact_for_a_bf16_checkpoint(source, tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in source[1].items()}
    directory = write_checkpoint(tmp_path / "bf16", state, TINY_LLAMA)
    path = export_gguf(directory, tmp_path / "m.gguf", "bf16", progress=False)
    types = {t.name: t.type_name for t in GGUFFile(path).tensors}
    assert types["blk.1.ffn_up.weight"] == "BF16" and types["output_norm.weight"] == "F32"
    back = convert_gguf(path, tmp_path / "back", dtype=torch.bfloat16, progress=False)
    loaded = torch.load(back / "consolidated.00-of-01.model.pth", weights_only=True)["model"]
    for name, value in state.items():
        assert torch.equal(loaded["llma." + name], value), name


def test_q8_0_weights_within_the_block_bound(source, exported):
    """Q8_0: per block of 32, d = max|x| / 127 (stored fp16), q = round(x / d): |error| <= d / 2 (+ fp16 d)."""
    _, state, reference = source
    path, back, logits = exported("q8_0")
    types = {t.name: t.type_name for t in GGUFFile(path).tensors}
    for name, value in state.items():
        assert types[gguf_name(name)] == ("F32" if value.dim() == 1 else "Q8_0"), name
        if value.dim() == 1:
            assert torch.equal(back[name], value)
            continue
        x, y = blocks(value), blocks(back[name])
        d = x.abs().amax(dim=1, keepdim=True) / 127
        assert ((y - x).abs() <= d * (0.5 + 127 * 2 ** -11) + 1e-7).all(), name
        assert ((y - x).abs() > 0).any(), name  # it was quantized
    # a stated tolerance for the whole model: 1.2% relative error on this random model
    assert relative_error(logits, reference) < 0.03


def test_q4_0_weights_within_the_block_bound(source, exported):
    """Q4_0: d = m / -8 where m is the block's value of largest magnitude, q = clip(trunc(x / d + 8.5), 0, 15) - 8:
    |error| <= |d| (the side opposite m clips at 7), and the head stays Q8_0."""
    _, state, reference = source
    path, back, logits = exported("q4_0")
    types = {t.name: t.type_name for t in GGUFFile(path).tensors}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q4_0"
    assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    for name, value in state.items():
        if types[gguf_name(name)] != "Q4_0":
            continue
        x, y = blocks(value), blocks(back[name])
        d = x.abs().amax(dim=1, keepdim=True) / 8
        assert ((y - x).abs() <= d * (1 + 8 * 2 ** -11) + 1e-7).all(), name
    assert relative_error(logits, reference) < 0.35  # 4 bits on a dim-64 model: about 0.2


def test_model_parallel_shards_export_the_same_tensors(source, exported, tmp_path):
    directory = write_checkpoint(tmp_path / "mp2", source[1], TINY_LLAMA, mp=2)
    path = export_gguf(directory, tmp_path / "mp2.gguf", "f16", progress=False)
    one, two = GGUFFile(exported("f16")[0]), GGUFFile(path)
    assert [t.name for t in one.tensors] == [t.name for t in two.tensors]
    for a, b in zip(one.tensors, two.tensors):
        assert a.type_name == b.type_name and np.array_equal(one.raw(a), two.raw(b)), a.name


# ------------------------------------------------------------------------------------------------ metadata


def test_metadata_and_tensor_layout(source, exported):
    path = exported("q8_0")[0]
    meta = GGUFFile(path)
    m = meta.metadata
    head_dim = TINY_LLAMA["dim"] // TINY_LLAMA["n_heads"]
    assert m["general.architecture"] == "llama"
    assert (m["llama.embedding_length"], m["llama.block_count"], m["llama.attention.head_count"],
            m["llama.attention.head_count_kv"], m["llama.feed_forward_length"], m["llama.rope.dimension_count"],
            m["llama.context_length"], m["llama.vocab_size"]) == \
        (64, 2, 4, 2, ckpt_utils.llama_ffn_dim(TINY_LLAMA), head_dim, 2048, VOCAB)
    assert m["llama.rope.freq_base"] == 10000.0
    assert m["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert m["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert m["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert "llama.rope.scaling.type" not in m
    shapes = ckpt_utils.llama_shapes(TINY_LLAMA, VOCAB)
    assert {t.name: t.shape for t in meta.tensors} == {gguf_name(k): v for k, v in shapes.items()}


def test_sentencepiece_vocabulary(exported):
    sentencepiece = pytest.importorskip("sentencepiece")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(ckpt_utils.llama_spm_tokenizer()))
    m = GGUFFile(exported("f16")[0]).metadata
    assert m["tokenizer.ggml.model"] == "llama"
    assert m["tokenizer.ggml.tokens"] == [processor.id_to_piece(i) for i in range(VOCAB)]
    assert m["tokenizer.ggml.scores"] == pytest.approx([processor.get_score(i) for i in range(VOCAB)])
    types = m["tokenizer.ggml.token_type"]
    assert (types[0], types[1], types[2], types[3], types[1000]) == (2, 3, 3, 6, 1)  # unk, <s>, </s>, <0x00>
    assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"],
            m["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert m["tokenizer.ggml.add_bos_token"] is True and m["tokenizer.ggml.add_eos_token"] is False


def test_wider_model_pads_the_vocabulary(tmp_path):
    ckpt_utils.llama_spm_tokenizer()
    directory = write_checkpoint(tmp_path / "wide", random_llama_state(TINY_LLAMA, VOCAB + 3), TINY_LLAMA)
    m = GGUFFile(export_gguf(directory, tmp_path / "m.gguf", progress=False)).metadata
    assert m["tokenizer.ggml.tokens"][VOCAB:] == [f"[PAD{i}]" for i in range(VOCAB, VOCAB + 3)]
    assert m["tokenizer.ggml.token_type"][VOCAB:] == [5, 5, 5]  # UNUSED
    assert m["llama.vocab_size"] == VOCAB + 3


def read_vectors(folder):
    texts = (folder / "vectors.inp").read_text(encoding="utf-8").split(VECTOR_SEPARATOR)[:-1]
    ids = [[int(x) for x in line.split()] for line in (folder / "vectors.out").read_text().split("\n")[:-1]]
    return texts, ids


@pytest.mark.parametrize("family, pre", [("gpt-2", "default")])  # llama-bpe (128k tokens) works, but takes 30 s
def test_bpe_tokenizer_json_survives_the_round_trip(tmp_path, family, pre):
    """A byte-level BPE tokenizer.json is written as a "gpt2" vocabulary with the pre-tokenizer's llama.cpp name;
    read back, it must still give llama.cpp's test vectors."""
    from tokenizers import Tokenizer

    folder = ckpt_utils.tokenizer_fixture(family)
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    cfg = dict(TINY_LLAMA, n_layers=1)
    directory = write_checkpoint(tmp_path / "ckpt", random_llama_state(cfg, vocab), cfg, tokenizer=family)
    path = export_gguf(directory, tmp_path / "m.gguf", "f16", progress=False)
    m = GGUFFile(path).metadata
    assert (m["tokenizer.ggml.model"], m["tokenizer.ggml.pre"]) == ("gpt2", pre)
    assert len(m["tokenizer.ggml.tokens"]) == vocab and m["tokenizer.ggml.merges"]
    convert_gguf_tokenizer(path, tmp_path / "tok")
    tokenizer = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    texts, expected = read_vectors(folder)
    got = [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
    assert got == expected


def test_added_tokens_are_typed_as_llama_cpp_types_them(tmp_path):
    """tokenizer.json's added tokens become CONTROL tokens when marked special (within the
    vocabulary, as GPT-2's <|endoftext|>, or after it) and USER_DEFINED ones when not; the rest stay
    NORMAL. llama.cpp's own converter types them so (and warns at load about control-looking tokens
    typed otherwise: SmolLM2's <|im_end|> was exported NORMAL before)."""
    cfg = dict(TINY_LLAMA, n_layers=1)
    document = json.loads((ckpt_utils.tokenizer_fixture("gpt-2") / "tokenizer.json").read_text(encoding="utf-8"))
    base = len(document["model"]["vocab"])
    assert [(t["id"], t["special"]) for t in document["added_tokens"]] == [(base - 1, True)]  # <|endoftext|>
    template = document["added_tokens"][0]
    document["added_tokens"] += [dict(template, id=base, content="<tool>", special=False),
                                 dict(template, id=base + 1, content="<|call|>", special=True)]
    directory = write_checkpoint(tmp_path / "ckpt", random_llama_state(cfg, base + 2), cfg, tokenizer="gpt-2")
    (directory / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
    types = GGUFFile(export_gguf(directory, tmp_path / "m.gguf", "f16", progress=False)).metadata[
        "tokenizer.ggml.token_type"]
    assert types[base - 1:] == [3, 4, 3]  # CONTROL, USER_DEFINED, CONTROL
    assert set(types[:base - 1]) == {1}  # NORMAL


# ------------------------------------------------------------------------------------------------ errors, CLI


def test_other_llama_types_are_refused(source, tmp_path):
    directory = pathlib.Path(shutil.copytree(source[0], tmp_path / "mixtral"))
    (directory / "meta.json").write_text(json.dumps({"llama_type": "mixtral"}))
    with pytest.raises(CheckpointError, match="llama_type is 'mixtral'.*only 'llama'"):
        export_gguf(directory, tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_type_and_extra_keys_are_refused(source, tmp_path):
    with pytest.raises(CheckpointError, match="'q5_k'.*f16"):
        export_gguf(source[0], tmp_path / "m.gguf", "q5_k", progress=False)
    state = dict(source[1], **{"layers.0.attention.wq.bias": torch.zeros(64)})
    directory = write_checkpoint(tmp_path / "bias", state, TINY_LLAMA)
    with pytest.raises(CheckpointError, match="llma.layers.0.attention.wq.bias has no place"):
        export_gguf(directory, tmp_path / "m.gguf", progress=False)
    assert not list(tmp_path.glob("m.gguf*"))  # nothing half-written left behind


def test_missing_or_misshapen_tensors_are_refused(source, tmp_path):
    state = {k: v for k, v in source[1].items() if k != "layers.1.ffn_norm.weight"}
    directory = write_checkpoint(tmp_path / "missing", state, TINY_LLAMA)
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*llma.layers.1.ffn_norm.weight"):
        export_gguf(directory, tmp_path / "m.gguf", progress=False)
    directory = write_checkpoint(tmp_path / "wrong", source[1], dict(TINY_LLAMA, n_kv_heads=4))
    with pytest.raises(CheckpointError, match="llma.layers.0.attention.wk.weight has shape"):
        export_gguf(directory, tmp_path / "m.gguf", progress=False)


def test_smaller_model_than_vocabulary_is_refused(tmp_path):
    ckpt_utils.llama_spm_tokenizer()
    directory = write_checkpoint(tmp_path / "narrow", random_llama_state(TINY_LLAMA, 1000), TINY_LLAMA)
    with pytest.raises(CheckpointError, match="32000 tokens but the model only 1000"):
        export_gguf(directory, tmp_path / "m.gguf", progress=False)


def test_cli(source, tmp_path, capsys):
    dst = tmp_path / "tiny.Q8_0.gguf"
    assert main(["convert", "--to", "gguf", str(source[0]), str(dst), "--type", "q8_0"]) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    assert GGUFFile(dst).metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert main(["convert", "--to", "gguf", str(source[0]), str(tmp_path / "d.gguf")]) == 0
    assert GGUFFile(tmp_path / "d.gguf").metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert main(["convert", "--to", "hf", str(source[0]), str(tmp_path / "hf"), "--type", "q8_0"]) == 2
    assert "--type applies to --to gguf only" in capsys.readouterr().err
    assert main(["convert", "--to", "gguf", str(tmp_path / "nowhere"), str(tmp_path / "x.gguf")]) == 1
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "--to gguf" in capsys.readouterr().out
    convert = next(a for a in build_parser()._subparsers._group_actions[0].choices["convert"]._actions
                   if a.dest == "gguf_type")
    assert set(convert.choices) == set(GGUF_EXPORT_TYPES)


# ------------------------------------------------------------------------------------------------ llama.cpp


def test_llama_cpp_loads_the_file_and_agrees(source, exported):
    llama_cpp = pytest.importorskip("llama_cpp")
    _, _, reference = source
    path = exported("f16")[0]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=min(2, os.cpu_count() or 1),
                          logits_all=True, verbose=False)
    assert llm.tokenize("The quick brown fox jumps over the lazy dog.".encode()) == IDS
    llm.eval(IDS)
    logits = torch.from_numpy(np.array(llm.scores[:len(IDS)], dtype=np.float32))
    # llama.cpp rounds activations to fp16 for its F16 products
    assert relative_error(logits, reference) < 1e-2
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
