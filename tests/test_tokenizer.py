"""Tokenizer: llama.cpp's test vectors on eight real tokenizers, plus parity with transformers.AutoTokenizer."""

import functools
import os
import shutil
from pathlib import Path

import pytest

from accessory.errors import TokenizerError
from accessory.model.tokenizer import Tokenizer, probe_tokenizer_path

SHARED = Path(os.environ.get("ACCESSORY_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
FIXTURES = SHARED / "fixtures" / "tokenizers"
pytestmark = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"tokenizer fixtures not found at {FIXTURES} (set ACCESSORY_SHARED to the shared/ folder)",
)

SEPARATOR = "\n__ggml_vocab_test__\n"

# Facts from fixtures/tokenizers/README.md. bos is what `bos_id` reports: EOS where there is no BOS token.
# (type, bos_id, eos_id, n_words, add_bos, need_space_before_segment)
EXPECTED = {
    "llama-spm/tokenizer.model": ("spm", 1, 2, 32000, True, False),
    "llama-spm": ("transformers", 1, 2, 32000, True, False),
    "falcon": ("transformers", 11, 11, 65024, False, True),
    "llama-bpe": ("transformers", 128000, 128001, 128256, True, True),
    "gpt-2": ("transformers", 50256, 50256, 50257, True, True),
    "qwen2": ("transformers", 151643, 151643, 151646, False, True),
    "mpt": ("transformers", 0, 0, 50277, True, True),
    "starcoder": ("transformers", 0, 0, 49152, True, True),
    "deepseek-coder": ("transformers", 32013, 32014, 32022, True, True),
}
NAMES = list(EXPECTED)


@functools.lru_cache(maxsize=None)
def load(name: str) -> Tokenizer:
    return Tokenizer(str(FIXTURES / name))


def vectors(name: str):
    folder = FIXTURES / name.split("/")[0]
    texts = (folder / "vectors.inp").read_text(encoding="utf-8").split(SEPARATOR)[:-1]
    lines = (folder / "vectors.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(texts) == len(lines) == 46
    return [(text, [int(x) for x in line.split()]) for text, line in zip(texts, lines)]


def test_every_fixture_folder_is_covered():
    folders = sorted(p.name for p in FIXTURES.iterdir() if (p / "vectors.inp").is_file())
    assert folders == sorted({name.split("/")[0] for name in NAMES})


@pytest.mark.parametrize("name", NAMES)
def test_encode_matches_llama_cpp_vectors(name):
    tokenizer = load(name)
    failures = [(text, tokenizer.encode(text, bos=False, eos=False), ids) for text, ids in vectors(name)
                if tokenizer.encode(text, bos=False, eos=False) != ids]
    assert failures == []


@pytest.mark.parametrize("name", NAMES)
def test_decode_round_trips_every_vector(name):
    # All eight are lossless on these strings, the SentencePiece path included.
    tokenizer = load(name)
    assert [tokenizer.decode(ids) for _, ids in vectors(name)] == [text for text, _ in vectors(name)]


@pytest.mark.parametrize("name", NAMES)
def test_special_ids_and_sizes(name):
    tokenizer = load(name)
    kind, bos_id, eos_id, n_words, add_bos, need_space = EXPECTED[name]
    assert tokenizer.tokenizer_type == kind
    assert (tokenizer.bos_id, tokenizer.eos_id) == (bos_id, eos_id)
    assert tokenizer.n_words == n_words
    assert tokenizer.add_bos is add_bos
    assert tokenizer.need_space_before_segment is need_space


@pytest.mark.parametrize("name", ["llama-spm/tokenizer.model", "llama-spm"])
def test_llama_flags_segments_and_pieces(name):
    tokenizer = load(name)
    assert tokenizer.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert tokenizer.encode("Hello world", bos=True, eos=False) == [1, 15043, 3186]
    assert tokenizer.encode("", bos=False, eos=True) == [2]
    assert tokenizer.unk_id == 0
    assert tokenizer.id_to_piece(15043) == "▁Hello"
    assert tokenizer.encode("\n###", bos=False, eos=False) == [29871, 13, 2277, 29937]
    # A stop word as it appears after a space, and glued to the text before it.
    assert tokenizer.encode_segment("###") == [835]
    assert tokenizer.encode_segment("  ###") == [835]
    assert tokenizer.encode_wo_prefix_space("###") == [2277, 29937]
    assert tokenizer.encode_wo_prefix_space("\n###") == [13, 2277, 29937]


def test_llama_special_token_decoding_differs_by_backend():
    # SentencePiece drops control tokens and shows unk as " ⁇ "; tokenizer.json keeps them, like AutoTokenizer.
    spm, hf = load("llama-spm/tokenizer.model"), load("llama-spm")
    assert spm.decode([1, 15043, 3186, 2]) == "Hello world"
    assert hf.decode([1, 15043, 3186, 2]) == "<s> Hello world</s>"
    assert spm.decode([0]) == " ⁇ "
    assert hf.decode([0]) == "<unk>"


def test_byte_level_segments_and_flags():
    gpt2 = load("gpt-2")
    assert gpt2.encode("Hello world", bos=True, eos=True) == [50256, 15496, 995, 50256]
    assert gpt2.id_to_piece(995) == "Ġworld"
    assert gpt2.encode_segment("###") == [44386]  # "Ġ###"
    assert gpt2.encode_segment("  ###") == [44386]
    assert gpt2.encode_wo_prefix_space("###") == [21017]
    assert gpt2.encode_wo_prefix_space("\n###") == [198, 21017]
    falcon = load("falcon")
    # No BOS token: bos_id stands in with EOS (as the original did), and add_bos says not to use it.
    assert falcon.encode("Hello world", bos=True, eos=False) == [11, 9856, 1079]
    assert falcon.encode_segment("###") == [204, 19468]
    assert falcon.encode_wo_prefix_space("###") == [19468]
    assert falcon.unk_id is None
    assert load("mpt").unk_id == 0


def test_decode_accepts_tensors():
    torch = pytest.importorskip("torch")
    assert load("llama-spm/tokenizer.model").decode(torch.tensor([15043, 3186])) == "Hello world"


def test_encode_rejects_non_strings():
    with pytest.raises(TypeError, match="expects a str"):
        load("gpt-2").encode(b"bytes", bos=False, eos=False)


@pytest.mark.parametrize("name", ["llama-spm/tokenizer.model", "llama-spm", "falcon", "qwen2", "deepseek-coder"])
def test_save_then_reload_gives_identical_tokenizer(name, tmp_path):
    original = load(name)
    original.save(tmp_path / "saved")
    files = sorted(p.name for p in (tmp_path / "saved").iterdir())
    if original.tokenizer_type == "spm":
        assert files == ["tokenizer.model"]
        assert (tmp_path / "saved" / "tokenizer.model").read_bytes() == (FIXTURES / name).read_bytes()
    else:
        assert files == ["tokenizer.json", "tokenizer_config.json"]
    reloaded = Tokenizer(str(tmp_path / "saved"))
    assert reloaded.tokenizer_type == original.tokenizer_type
    texts = [text for text, _ in vectors(name)]
    assert [reloaded.encode(t, bos=False, eos=False) for t in texts] == [ids for _, ids in vectors(name)]
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.n_words, reloaded.add_bos) == (
        original.bos_id, original.eos_id, original.n_words, original.add_bos)


def test_tokenizer_json_path_reads_sibling_config():
    tokenizer = Tokenizer(FIXTURES / "llama-spm" / "tokenizer.json")
    assert (tokenizer.tokenizer_type, tokenizer.bos_id, tokenizer.eos_id) == ("transformers", 1, 2)


def test_tokenizer_json_without_config_guesses_special_tokens(tmp_path):
    shutil.copy(FIXTURES / "gpt-2" / "tokenizer.json", tmp_path / "tokenizer.json")
    tokenizer = Tokenizer(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (50256, 50256, False)
    tokenizer.save(tmp_path / "saved")  # writes a minimal config naming the guessed tokens
    reloaded = Tokenizer(tmp_path / "saved")
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.add_bos) == (50256, 50256, False)


def test_probe_tokenizer_path(tmp_path):
    assert probe_tokenizer_path(FIXTURES / "llama-spm") == str(FIXTURES / "llama-spm" / "tokenizer.model")
    assert probe_tokenizer_path(FIXTURES / "gpt-2") == str(FIXTURES / "gpt-2")
    assert probe_tokenizer_path(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{}")
    assert probe_tokenizer_path(tmp_path) is None  # tokenizer.json alone is not enough, as in the original


def test_error_for_missing_path(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(TokenizerError, match="does not exist") as info:
        Tokenizer(str(missing))
    message = str(info.value)
    assert str(missing) in message and "tokenizer.model" in message and "tokenizer.json" in message
    assert "tokenizer_config.json" in message and "Fix:" in message
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer(str(tmp_path / "tokenizer.model"))


def test_error_for_empty_dir(tmp_path):
    with pytest.raises(TokenizerError, match="No tokenizer in directory") as info:
        Tokenizer(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "tokenizer.model" in str(info.value) and "Fix:" in str(info.value)


def test_error_for_corrupt_files(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a protobuf")
    with pytest.raises(TokenizerError, match="Could not read the SentencePiece model") as info:
        Tokenizer(str(tmp_path / "tokenizer.model"))
    assert str(tmp_path / "tokenizer.model") in str(info.value)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(TokenizerError, match="Could not read the Hugging Face tokenizer") as info:
        Tokenizer(str(tmp_path))
    assert str(tmp_path / "tokenizer.json") in str(info.value)
    lfs = tmp_path / "lfs.model"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 499723\n")
    with pytest.raises(TokenizerError, match="Git LFS pointer"):
        Tokenizer(str(lfs))


def test_error_for_config_naming_unknown_token(tmp_path):
    shutil.copy(FIXTURES / "gpt-2" / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": {"content": "</s>", "special": true}}')
    with pytest.raises(TokenizerError, match="sets eos_token to '</s>'"):
        Tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<|endoftext|>"}')
    with pytest.raises(TokenizerError, match="names no EOS token"):
        Tokenizer(str(tmp_path))


# Parity with the original's HF path, transformers.AutoTokenizer (a test-only dependency).
PARITY_TEXTS = [
    "Hello world", " Hello world", "\n###", "ied 4 ½ months", "🚀 (normal) 😶‍🌫️", "3333333", "<|endoftext|> tail",
]


@pytest.mark.parametrize("name", ["llama-spm", "falcon", "gpt-2", "qwen2", "deepseek-coder"])
def test_parity_with_transformers(name):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    reference = transformers.AutoTokenizer.from_pretrained(str(FIXTURES / name))
    tokenizer = load(name)
    for text in PARITY_TEXTS:
        ids = reference.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text, bos=False, eos=False) == ids, text
        with_specials = [tokenizer.bos_id] + ids + [tokenizer.eos_id]
        expected_text = reference.decode(with_specials, clean_up_tokenization_spaces=False)
        assert tokenizer.decode(with_specials) == expected_text, text
    assert tokenizer.n_words == len(reference)
    assert tokenizer.eos_id == reference.eos_token_id
    reference_bos = reference.bos_token_id
    assert tokenizer.bos_id == (reference_bos if reference_bos is not None else reference.eos_token_id)
    assert tokenizer.add_bos is (reference_bos is not None)
