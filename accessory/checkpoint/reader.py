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
        _check_real_file(path)
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


def _check_real_file(path: Path) -> None:
    """Reject the two placeholders people most often end up with instead of weights."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise CheckpointError(f"cannot open {path}: {exc}; check that it is a readable file") from exc
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or copy; "
                              f"re-download it or copy it again")
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{path} is a Git LFS pointer, not the weights themselves; run "
                              f"`git lfs pull` in that repository (or download the real file)")


def _pickle_reason(exc: Exception) -> str:
    """The line of a weights-only refusal that names what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "allowed global" in line or "Unsupported operand" in line:
            return line
    return lines[0] if lines else type(exc).__name__


def _torch_load(path: Path):
    _check_real_file(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            # Files written by torch < 1.6 (not a zip archive) cannot be memory-mapped.
            if "mmap" in str(exc) and not zipfile.is_zipfile(path):
                return torch.load(path, map_location="cpu", weights_only=True)
            raise
    except pickle.UnpicklingError as exc:
        reason = _pickle_reason(exc)
        if "GLOBAL" in reason or "allowed global" in reason:
            raise CheckpointError(
                f"{path} contains pickled Python objects other than tensors, which Accessory refuses to "
                f"load because unpickling can run arbitrary code ({reason}). If you trust the file, "
                f"re-save only its tensors: torch.save({{'model': sd}}, ...) with a plain dict of "
                f"tensors, or convert it to .safetensors") from exc
        raise CheckpointError(
            f"cannot read {path} safely ({reason}): it is corrupt, not a PyTorch checkpoint, or a "
            f"pickle that a weights-only load refuses (which could run arbitrary code). Re-download "
            f"it, or re-save its tensors with torch.save / as .safetensors") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            f"The file is truncated or corrupt (an interrupted download or copy?); re-download it "
            f"or copy it again") from exc
    except Exception as exc:  # torch.load on arbitrary bytes raises KeyError, ValueError, ...
        raise CheckpointError(
            f"cannot read {path}: {type(exc).__name__}: {exc}. It is not a PyTorch checkpoint or it "
            f"is corrupt; re-download it or copy it again") from exc


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
            expected = ("a bare {name: tensor} dict, as Meta's consolidated.NN.pth files are (an "
                        "Accessory {'model': ...} file must be named consolidated.NN-of-MM.model.pth)"
                        if add_prefix else "{'model': {name: tensor}}")
            raise CheckpointError(
                f"{path} holds non-tensor entries {bad[:5]}; expected {expected}")
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

