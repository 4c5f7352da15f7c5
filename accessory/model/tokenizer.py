"""One `Tokenizer` over SentencePiece (`tokenizer.model`) and Hugging Face `tokenizers` (`tokenizer.json`).

The interface is the original LLaMA2-Accessory one: `encode(s, bos, eos)`, `decode(ids)`, `bos_id`,
`eos_id`, `n_words`, `encode_segment`, `encode_wo_prefix_space`, `need_space_before_segment`, `save`.
The Hugging Face side reads `tokenizer.json` with the `tokenizers` package directly (no transformers);
on the test vectors it gives the same ids and text as `transformers.AutoTokenizer`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, List, Optional, Union

from accessory.errors import TokenizerError

__all__ = ["Tokenizer", "probe_tokenizer_path", "probe_tokenizer_path_from_pretrained"]

logger = logging.getLogger(__name__)

SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"

_EXPECTED = (
    f"expected a SentencePiece `{SPM_FILE}` file, or a directory holding `{HF_FILE}` + "
    f"`{HF_CONFIG_FILE}` (Hugging Face)"
)
_FIX = (
    "Fix: point tokenizer_path at the base model's tokenizer (its `tokenizer.model`, or the folder with "
    "its `tokenizer.json` and `tokenizer_config.json`), or copy those files into the checkpoint folder."
)
# Used only when a tokenizer.json comes without tokenizer_config.json to name its special tokens.
_USUAL_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_USUAL_EOS = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>")
# Characters that rarely merge with what follows them; see `Tokenizer.encode_wo_prefix_space`.
_DETACHED_PREFIXES = ("@", "\n", "\\", "=", ">", "`")

PathLike = Union[str, "os.PathLike[str]"]


class _SentencePieceBackend:
    """`tokenizer.model` read by the `sentencepiece` package."""

    tokenizer_type = "spm"

    def __init__(self, path: Path):
        from sentencepiece import SentencePieceProcessor

        _reject_lfs_pointer(path)
        try:
            self.processor = SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise TokenizerError(
                f"Could not read the SentencePiece model {path}: {err}. Expected a SentencePiece `{SPM_FILE}` "
                f"(a serialized ModelProto); this file is truncated, corrupt or of another kind. {_FIX}"
            ) from err
        self.bos_id: int = self.processor.bos_id()
        self.eos_id: int = self.processor.eos_id()
        self.unk_id: Optional[int] = _none_if_negative(self.processor.unk_id())
        # SentencePiece says -1 when the model has no BOS piece (bos_id=-1 at training time).
        self.add_bos = self.bos_id >= 0
        self.n_words: int = self.processor.vocab_size()

    def encode(self, text: str) -> List[int]:
        return self.processor.encode(text)

    def decode(self, ids: List[int]) -> str:
        return self.processor.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self.processor.id_to_piece(token_id)

    def save(self, save_dir: Path) -> None:
        (save_dir / SPM_FILE).write_bytes(self.processor.serialized_model_proto())


class _HuggingFaceBackend:
    """`tokenizer.json` read by the `tokenizers` package, with its special tokens named by `tokenizer_config.json`."""

    tokenizer_type = "transformers"  # the original's name for this path

    def __init__(self, json_path: Path):
        from tokenizers import Tokenizer as RustTokenizer

        _reject_lfs_pointer(json_path)
        try:
            self.tokenizer = RustTokenizer.from_file(str(json_path))
        except Exception as err:  # `tokenizers` raises a bare Exception on parse errors
            raise TokenizerError(
                f"Could not read the Hugging Face tokenizer {json_path}: {err}. Expected a `{HF_FILE}` written by "
                f"the `tokenizers` library (truncated or corrupt file?). {_FIX}"
            ) from err

        config_path = json_path.parent / HF_CONFIG_FILE
        self.config: Optional[dict] = _read_json(config_path) if config_path.is_file() else None
        if self.config is None:
            logger.warning("%s has no %s beside it; guessing BOS/EOS from usual token names", json_path, HF_CONFIG_FILE)
            bos_name = self._first_known(_USUAL_BOS)
            eos_name = self._first_known(_USUAL_EOS)
            unk_name = self._first_known(("<unk>",))
            add_bos_setting: Optional[bool] = None
        else:
            bos_name = _token_content(self.config.get("bos_token"))
            eos_name = _token_content(self.config.get("eos_token"))
            unk_name = _token_content(self.config.get("unk_token"))
            add_bos_setting = self.config.get("add_bos_token")

        self.real_bos_id = self._id_of(bos_name, "bos_token", config_path)
        eos_id = self._id_of(eos_name, "eos_token", config_path)
        if eos_id is None:
            raise TokenizerError(
                f"The Hugging Face tokenizer at {json_path.parent} names no EOS token: expected an `eos_token` entry "
                f"in {config_path} (e.g. \"eos_token\": \"</s>\"). Fix: add it, or copy the base model's "
                f"{HF_CONFIG_FILE} into that folder."
            )
        self.eos_id: int = eos_id
        # Like the original, bos_id falls back to EOS when there is no BOS token (Falcon, Qwen), so that
        # code which always prepends bos_id still works; add_bos says whether prepending is meant at all.
        self.bos_id: int = self.real_bos_id if self.real_bos_id is not None else eos_id
        self.add_bos = self.real_bos_id is not None and (add_bos_setting is None or bool(add_bos_setting))
        self.unk_id: Optional[int] = self._id_of(unk_name, "unk_token", config_path)
        # Same count as len(transformers.AutoTokenizer): base vocabulary plus added tokens.
        self.n_words: int = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _first_known(self, names: Iterable[str]) -> Optional[str]:
        return next((name for name in names if self.tokenizer.token_to_id(name) is not None), None)

    def _id_of(self, token: Optional[str], key: str, config_path: Path) -> Optional[int]:
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(
                f"{config_path} sets {key} to {token!r}, but {config_path.parent / HF_FILE} has no such token. "
                f"Expected the two files to come from the same model. Fix: copy both from the base model."
            )
        return token_id

    def encode(self, text: str) -> List[int]:
        # add_special_tokens=False: BOS/EOS come only from Tokenizer.encode's flags, never the post-processor.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: List[int]) -> str:
        # Special tokens are kept, as AutoTokenizer.decode does by default. No clean_up_tokenization:
        # transformers 5 skips it for BPE tokenizers because it deletes real spaces before punctuation.
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            raise IndexError(f"token id {token_id} is out of range for a vocabulary of {self.n_words}")
        return piece

    def save(self, save_dir: Path) -> None:
        self.tokenizer.save(str(save_dir / HF_FILE))
        config = self.config
        if config is None:
            config = {
                "bos_token": None if self.real_bos_id is None else self.tokenizer.id_to_token(self.real_bos_id),
                "eos_token": self.tokenizer.id_to_token(self.eos_id),
                "unk_token": None if self.unk_id is None else self.tokenizer.id_to_token(self.unk_id),
                "add_bos_token": self.add_bos,
            }
        config_text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (save_dir / HF_CONFIG_FILE).write_text(config_text, encoding="utf-8")


class Tokenizer:
    """Text <-> token ids for a model, over SentencePiece or Hugging Face `tokenizers`.

    Attributes:
        tokenizer_type: "spm" (SentencePiece) or "transformers" (Hugging Face tokenizer.json).
        bos_id / eos_id: begin/end-of-sequence ids. A Hugging Face tokenizer without a BOS token
            (Falcon, Qwen) reports its EOS id as bos_id, as the original did; `add_bos` is then False.
        unk_id: the unknown-token id, or None when the tokenizer has none.
        add_bos: whether prompts should start with BOS: `add_bos_token` from tokenizer_config.json when
            set, else True whenever a BOS token exists.
        n_words: vocabulary size, added tokens included (the model's vocab_size).
        need_space_before_segment: whether a segment cut from the middle of a text must be encoded with
            a leading space to get the same ids it has inside the text (True for byte-level BPE, False
            for Llama-style SentencePiece).
    """

    def __init__(self, model_path: PathLike):
        """Load a tokenizer.

        Args:
            model_path: a SentencePiece file ending in `.model`; a directory holding `tokenizer.json`
                (and usually `tokenizer_config.json`) or, failing that, `tokenizer.model`; or a path to a
                `tokenizer.json` file (its sibling `tokenizer_config.json` is read when present).

        Raises:
            TokenizerError: the path is missing, holds no tokenizer, or a tokenizer file is unreadable.
        """
        path = Path(os.fspath(model_path))
        if path.suffix == ".model":
            if not path.is_file():
                raise TokenizerError(f"Tokenizer file {path} does not exist: {_EXPECTED}. {_FIX}")
            self._backend = _SentencePieceBackend(path)
        elif path.is_dir():
            if (path / HF_FILE).is_file():
                self._backend = _HuggingFaceBackend(path / HF_FILE)
            elif (path / SPM_FILE).is_file():
                self._backend = _SentencePieceBackend(path / SPM_FILE)
            else:
                raise TokenizerError(
                    f"No tokenizer in directory {path}: found neither `{SPM_FILE}` nor `{HF_FILE}`; {_EXPECTED}. {_FIX}"
                )
        elif path.is_file() and path.suffix == ".json":
            self._backend = _HuggingFaceBackend(path)
        elif path.exists():
            raise TokenizerError(f"{path} is not a tokenizer: {_EXPECTED}. {_FIX}")
        else:
            raise TokenizerError(f"Tokenizer path {path} does not exist: {_EXPECTED}. {_FIX}")

        self.model_path = str(path)
        self.tokenizer_type: str = self._backend.tokenizer_type
        self.bos_id: int = self._backend.bos_id
        self.eos_id: int = self._backend.eos_id
        self.unk_id: Optional[int] = self._backend.unk_id
        self.add_bos: bool = self._backend.add_bos
        self.need_space_before_segment: bool = self._probe_segment_style()
        logger.info(
            "Loaded %s tokenizer from %s: %d words, BOS %d (add_bos=%s), EOS %d",
            self.tokenizer_type, path, self.n_words, self.bos_id, self.add_bos, self.eos_id,
        )

    @property
    def tokenizer(self):
        """The underlying `sentencepiece.SentencePieceProcessor` or `tokenizers.Tokenizer`."""
        backend = self._backend
        return backend.processor if isinstance(backend, _SentencePieceBackend) else backend.tokenizer

    @property
    def n_words(self) -> int:
        """Vocabulary size, added tokens included."""
        return self._backend.n_words

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Token ids of `s`, with BOS prepended if `bos` and EOS appended if `eos` (nothing else added)."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        ids = list(self._backend.encode(s))
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of token ids (a list, or a 1-D tensor/array).

        SentencePiece: unknown id 0 reads " ⁇ " and invalid byte sequences U+FFFD. Hugging Face:
        special tokens are kept in the text.
        """
        return self._backend.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary string of one token id (e.g. "▁Hello", "Ġworld", "<s>")."""
        return self._backend.id_to_piece(int(token_id))

    def encode_segment(self, s: str) -> List[int]:
        """Ids `s` gets when it follows other text after a space, e.g. a stop word in generated text.

        Leading spaces of `s` are dropped; one is added back where the tokenizer needs it.
        """
        s = s.lstrip(" ")
        return self.encode(" " + s if self.need_space_before_segment else s, bos=False, eos=False)

    def encode_wo_prefix_space(self, s: str) -> List[int]:
        """Ids `s` gets when it directly follows other text with no space in between.

        For Llama-style SentencePiece, encoding `s` alone would add a dummy "▁" prefix, so `s` is
        encoded after a prefix character that stays its own token, and that prefix is cut off.
        """
        if self.need_space_before_segment:
            return self.encode(s, bos=False, eos=False)
        for prefix in _DETACHED_PREFIXES:
            prefix_ids = self.encode(prefix, bos=False, eos=False)
            joined_ids = self.encode(prefix + s, bos=False, eos=False)
            if joined_ids[: len(prefix_ids)] == prefix_ids:
                return joined_ids[len(prefix_ids):]
        raise TokenizerError(
            f"Cannot encode {s!r} without a prefix space: every probe prefix {list(_DETACHED_PREFIXES)!r} merges "
            f"into it with the tokenizer from {self.model_path}. Expected at least one to stay a separate token; "
            f"please report this tokenizer."
        )

    def _probe_segment_style(self) -> bool:
        """Whether a mid-text segment needs a leading space, judged on "Hi my darling" like the original.

        Llama's SentencePiece encodes "my darling" alone with the same ids it has inside "Hi my darling"
        (the dummy prefix supplies the space); byte-level BPE needs " my darling" for that.
        """
        whole = self.encode("Hi my darling", bos=False, eos=False)
        bare = self.encode("my darling", bos=False, eos=False)
        if whole[-len(bare):] == bare:
            return False
        spaced = self.encode(" my darling", bos=False, eos=False)
        if whole[-len(spaced):] != spaced:
            logger.warning(
                "Tokenizer from %s splits 'Hi my darling' unlike either 'my darling' or ' my darling'; "
                "assuming segments need a leading space", self.model_path,
            )
        return True

    def save(self, save_dir: PathLike) -> None:
        """Write the tokenizer into `save_dir` (created if missing).

        SentencePiece: `tokenizer.model`. Hugging Face: `tokenizer.json` + `tokenizer_config.json`
        (the config that was loaded, or a minimal one naming BOS/EOS/UNK).
        """
        directory = Path(os.fspath(save_dir))
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(directory)

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, type={self.tokenizer_type}, n_words={self.n_words})"


def probe_tokenizer_path(pretrained_path: PathLike) -> Optional[str]:
    """Find a tokenizer inside a checkpoint directory, in the original's order.

    Returns the path of `tokenizer.model` if present, else the directory itself if it holds both
    `tokenizer.json` and `tokenizer_config.json`, else None. Either result can be passed to `Tokenizer`.
    """
    directory = Path(os.fspath(pretrained_path))
    if (directory / SPM_FILE).is_file():
        logger.info("Found SentencePiece tokenizer %s", directory / SPM_FILE)
        return str(directory / SPM_FILE)
    if (directory / HF_FILE).is_file() and (directory / HF_CONFIG_FILE).is_file():
        logger.info("Found Hugging Face tokenizer (%s + %s) in %s", HF_FILE, HF_CONFIG_FILE, directory)
        return str(directory)
    logger.info("No tokenizer in %s (looked for %s, then %s + %s)", directory, SPM_FILE, HF_FILE, HF_CONFIG_FILE)
    return None


# The original's name, kept so seed code importing it still works.
probe_tokenizer_path_from_pretrained = probe_tokenizer_path


def _token_content(entry) -> Optional[str]:
    """A special-token entry of tokenizer_config.json: a string, an AddedToken dict, or null."""
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    raise TokenizerError(
        f"Unexpected special-token entry {entry!r} in {HF_CONFIG_FILE}: expected a string or {{\"content\": ...}}"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(
            f"Could not read {path}: {err}. Expected a JSON object (tokenizer settings). {_FIX}"
        ) from err
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} holds a {type(data).__name__}, expected a JSON object. {_FIX}")
    return data


def _reject_lfs_pointer(path: Path) -> None:
    """Name the usual cause of an unreadable tokenizer file: a Git LFS pointer in place of the real file."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise TokenizerError(
            f"{path} is a Git LFS pointer, not the tokenizer itself. Fix: run `git lfs pull` in that "
            f"repository, or download the file directly."
        )


def _none_if_negative(token_id: int) -> Optional[int]:
    return token_id if token_id >= 0 else None
