"""Read one weight file safely: no pickled code ever runs, and tensors are memory-mapped.

``.pth`` files go through ``torch.load(weights_only=True, mmap=True)``: the tensors stay backed by
the file until they are copied or cast, so a checkpoint already in the target dtype is never held
twice in memory. ``.safetensors`` files are read lazily, tensor by tensor.
"""

import pickle
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..errors import CheckpointError

PREFIX = "llma."


class LazySafetensors(Mapping):
    """A read-only mapping over a .safetensors file that loads each tensor on access."""

    def __init__(self, path: Path):
        from safetensors import safe_open
        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            self._keys = list(self._file.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(
                f"cannot read {path}: {exc}. The file is truncated or not a safetensors file; "
                f"re-download or re-save it") from exc

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _torch_load(path: Path):
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            # Files written by torch < 1.6 (not a zip archive) cannot be memory-mapped.
            if "mmap" in str(exc) and not zipfile.is_zipfile(path):
                return torch.load(path, map_location="cpu", weights_only=True)
            raise
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} contains pickled Python objects other than tensors, which Accessory refuses to "
            f"load because unpickling can run arbitrary code ({str(exc).splitlines()[0]}). If you trust "
            f"the file, re-save only its tensors: torch.save({{'model': sd}}, ...) with a plain dict "
            f"of tensors, or convert it to .safetensors") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            f"The file is truncated or corrupt (an interrupted download or copy?); re-download it "
            f"or copy it again") from exc


def read_state_dict(path, add_prefix: bool = False) -> Mapping[str, torch.Tensor]:
    """The tensors of one shard, keyed as the MetaModel names them (``llma.``-prefixed).

    ``add_prefix``: the file is in Meta's layout (no ``llma.`` prefix, no ``{"model": ...}``).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state = LazySafetensors(path)
    else:
        loaded = _torch_load(path)
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{path} holds a {type(loaded).__name__}, expected a dict of tensors")
        state = loaded["model"] if not add_prefix and isinstance(loaded.get("model"), dict) else loaded
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(
                f"{path} holds non-tensor entries {bad[:5]}; expected {{'model': {{name: tensor}}}}")
    if add_prefix:
        return _Prefixed(state, PREFIX)
    return state


class _Prefixed(Mapping):
    """View of a mapping with ``prefix`` added to every key."""

    def __init__(self, inner: Mapping, prefix: str):
        self.inner, self.prefix = inner, prefix

    def __getitem__(self, key):
        if not key.startswith(self.prefix):
            raise KeyError(key)
        return self.inner[key[len(self.prefix):]]

    def __iter__(self):
        return (self.prefix + k for k in self.inner)

    def __len__(self):
        return len(self.inner)

