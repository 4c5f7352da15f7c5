"""Find the weight shards in a checkpoint directory and tell which format they are in.

Recognised names (``NN`` = rank, ``MM`` = model-parallel size, both two digits):

* ``consolidated.NN-of-MM.model.pth``       Accessory full weights, ``{"model": state_dict}``, keys ``llma.*``
* ``consolidated.NN-of-MM.model-diff.pth``  Accessory delta weights, added onto what is already loaded
* ``consolidated.NN.pth``                   Meta's own release layout: a bare state dict without ``llma.``
* the same names ending in ``.safetensors`` instead of ``.pth`` (a flat state dict)
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from ..errors import CheckpointError, ConfigError

FULL = "consolidated"
DIFF = "consolidated_diff"
META = "meta_ori"

_PATTERNS = {
    FULL: re.compile(r"^consolidated\.(\d{2})-of-(\d{2})\.model\.(pth|safetensors)$"),
    DIFF: re.compile(r"^consolidated\.(\d{2})-of-(\d{2})\.model-diff\.(pth|safetensors)$"),
    META: re.compile(r"^consolidated\.(\d{2})\.(pth|safetensors)$"),
}


@dataclass
class ShardSet:
    """The shards of one checkpoint directory, ordered by rank."""
    directory: Path
    format: str  # FULL, DIFF or META
    files: List[Path]

    @property
    def mp_size(self) -> int:
        return len(self.files)

    @property
    def is_diff(self) -> bool:
        return self.format == DIFF


def find_shards(directory) -> ShardSet:
    """Return the shards in ``directory``, or raise a CheckpointError that says what is wrong."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory {directory} does not exist; check pretrained_path")
    if not directory.is_dir():
        raise CheckpointError(
            f"pretrained_path {directory} is a file; pass the directory that holds the "
            f"consolidated.*.pth shards instead")
    matches: Dict[str, List] = {}  # format -> [(rank, declared mp size or None, path)]
    for entry in sorted(directory.iterdir()):
        for fmt, pattern in _PATTERNS.items():
            match = pattern.match(entry.name)
            if match:
                declared = int(match.group(2)) if fmt != META else None
                matches.setdefault(fmt, []).append((int(match.group(1)), declared, entry))
    found: Dict[str, Dict[int, Path]] = {}
    for fmt, entries in matches.items():
        sizes = sorted({declared for _, declared, _ in entries if declared is not None})
        if len(sizes) > 1:
            raise CheckpointError(
                f"{directory} mixes shards of model-parallel sizes {sizes} "
                f"({', '.join(p.name for _, _, p in entries)}); keep one set")
        for rank, _, entry in entries:
            if rank in found.setdefault(fmt, {}):
                raise CheckpointError(
                    f"{directory} holds two files for rank {rank} ({found[fmt][rank].name} and {entry.name}); "
                    f"keep one of them")
            found[fmt][rank] = entry
    if not found:
        raise CheckpointError(
            f"no weight shards in {directory}: expected files named consolidated.00-of-01.model.pth "
            f"(or .safetensors, or Meta's consolidated.00.pth). Found: "
            f"{', '.join(sorted(p.name for p in directory.iterdir())[:20]) or 'nothing'}")
    if len(found) > 1:
        listing = "; ".join(f"{fmt}: {', '.join(p.name for p in files.values())}" for fmt, files in found.items())
        raise CheckpointError(
            f"{directory} mixes shards of different formats ({listing}); a directory must hold one "
            f"format only: move the others into their own directory and pass both paths in order")
    fmt, by_rank = next(iter(found.items()))
    if fmt != META:
        mp_size = matches[fmt][0][1]
    else:
        mp_size = max(by_rank) + 1
    missing = [r for r in range(mp_size) if r not in by_rank]
    extra = [r for r in by_rank if r >= mp_size]
    if missing or extra:
        suffix = next(iter(by_rank.values())).suffix
        problems = []
        if missing:
            problems.append("missing " + ", ".join(_shard_name(fmt, r, mp_size, suffix) for r in missing))
        if extra:
            problems.append("not part of the set: " + ", ".join(by_rank[r].name for r in extra))
        raise CheckpointError(
            f"{directory} has an incomplete shard set: model-parallel size {mp_size} needs ranks "
            f"0..{mp_size - 1}; {'; '.join(problems)} (found {', '.join(p.name for p in by_rank.values())}). "
            f"Copy the missing files in (or remove the stray ones)")
    return ShardSet(directory, fmt, [by_rank[r] for r in range(mp_size)])


def _shard_name(fmt: str, rank: int, mp_size: int, suffix: str) -> str:
    """The file name of rank ``rank`` of ``mp_size`` in format ``fmt`` (suffix '.pth' or '.safetensors')."""
    if fmt == META:
        return f"consolidated.{rank:02d}{suffix}"
    kind = "model-diff" if fmt == DIFF else "model"
    return f"consolidated.{rank:02d}-of-{mp_size:02d}.{kind}{suffix}"


def read_llama_type(directory, how_to_fix: str) -> str:
    """``llama_type`` from ``directory``'s meta.json; a ConfigError (ending with ``how_to_fix``
    when the file is missing) otherwise."""
    meta_file = Path(directory) / "meta.json"
    if not meta_file.is_file():
        raise ConfigError(f"cannot tell the architecture: {meta_file} does not exist. {how_to_fix}")
    try:
        return json.loads(meta_file.read_text(encoding="utf-8"))["llama_type"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{meta_file} must be a JSON object with a \"llama_type\" key") from exc
