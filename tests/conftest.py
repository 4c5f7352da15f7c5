"""Shared fixtures: tiny random llama weights and checkpoint directories written from them.

The helpers themselves live in ``tests/ckpt_utils.py`` (importable as ``ckpt_utils``).
"""

import sys
from pathlib import Path

import pytest
import torch

# Make ``import ckpt_utils`` work whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ckpt_utils  # noqa: E402


@pytest.fixture(scope="session")
def shared_path() -> Path:
    """The shared/ folder (fixtures), or skip."""
    return ckpt_utils.shared_dir()


@pytest.fixture(scope="session")
def llama_spm_path() -> Path:
    """Path of the Llama 2 SentencePiece ``tokenizer.model`` (32000 pieces)."""
    return ckpt_utils.llama_spm_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_state(llama_spm_path):
    """fp32 random weights of :data:`ckpt_utils.TINY_LLAMA` for the Llama 2 vocabulary (no ``llma.``)."""
    return ckpt_utils.random_llama_state(ckpt_utils.TINY_LLAMA, ckpt_utils.LLAMA_SPM_VOCAB, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_llama_state) -> Path:
    """A complete mp=1 Accessory checkpoint of ``tiny_llama_state`` (shard, config, meta, tokenizer).

    Session-scoped and shared: treat it as read-only.
    """
    return ckpt_utils.write_checkpoint(tmp_path_factory.mktemp("tiny_llama"), tiny_llama_state,
                                       ckpt_utils.TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_llama_model(tiny_llama_dir):
    """``tiny_llama_dir`` loaded in float32 on the CPU (shared: do not modify)."""
    from accessory.model.meta import MetaModel
    return MetaModel.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, device="cpu", progress=False)
