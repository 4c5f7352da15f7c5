"""Rewrite a checkpoint at another model-parallel size, tensor by tensor.

``reshard(src, dst, mp=N)`` reads the M shards of ``src`` (memory-mapped, any layout
:func:`~.discover.find_shards` accepts), and for each parameter name merges its M pieces with the
architecture's :class:`~accessory.model.layers.parallel.SplitPlan` and splits the result into N.
Only the N output state dicts being built (together the size of one model) are ever held; the
source stays on disk behind mmap, and each merged tensor lives only while it is being split.

The split plan comes from the model itself, built on the meta device from the checkpoint's
``config.json`` and ``meta.json`` (mixtral's plan depends on its expert count).
"""

import argparse
import shutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from ..errors import CheckpointError, ConfigError
from ..model.layers.parallel import SplitPlan
from .discover import DIFF, META, ShardSet, find_shards, read_llama_type
from .load import merged_tensor
from .reader import PREFIX, read_state_dict

#: Files copied next to the shards (those present).
SIDE_FILES = ("config.json", "meta.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")

#: Module attributes holding a head count that must divide evenly over the ranks.
_HEAD_COUNTS = ("n_heads", "n_kv_heads")


def shard_file_name(rank: int, mp: int, diff: bool = False) -> str:
    """``consolidated.NN-of-MM.model.pth`` (or ``.model-diff.pth`` for a delta)."""
    return f"consolidated.{rank:02d}-of-{mp:02d}.model{'-diff' if diff else ''}.pth"


def meta_model_for(directory, llama_type: Optional[str] = None) -> Tuple[str, nn.Module]:
    """(llama_type, the language model built on the meta device) from ``directory``'s
    ``meta.json`` and ``config.json``; no weights are read and no memory is allocated."""
    from ..model.LLM import load_llama_type
    from ..model.meta import build_args, merge_config_files

    directory = Path(directory)
    if llama_type is None:
        llama_type = read_llama_type(directory, "Write {\"llama_type\": \"llama\"} (or the right type) into it")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{config_file} does not exist: the split plan (which weight is cut along which "
                          f"dim, how many experts) is read from the model's config; copy the config.json "
                          f"the checkpoint was saved with into {directory}")
    sources: Dict[str, str] = {}
    config = merge_config_files([config_file], sources)
    vocab = config.get("vocab_size")
    vocab = vocab if isinstance(vocab, int) and vocab > 0 else 32000  # rows do not change the plan
    module = load_llama_type(llama_type)
    with torch.device("meta"):
        args = build_args(module, llama_type, config, int(config.get("max_seq_len") or 2048), vocab, sources)
        model = module.Transformer(args)
    return llama_type, model


def check_mp(model: nn.Module, plan: SplitPlan, mp: int, where) -> None:
    """Raise a CheckpointError when ``model`` (meta device) cannot be cut over ``mp`` ranks:
    head counts, experts or split dims that do not divide evenly."""
    if mp < 1:
        raise CheckpointError(f"--mp must be at least 1, got {mp}")
    for module_name, module in model.named_modules():
        for attr in _HEAD_COUNTS:
            count = getattr(module, attr, None)
            if attr == "n_kv_heads" and plan.shard_dim(f"{module_name}.wk.weight") is None:
                continue  # replicated key/value heads (falcon's multi-query): every rank holds them all
            if isinstance(count, int) and not isinstance(count, bool) and count % mp:
                raise CheckpointError(
                    f"{where}: {attr} = {count} (in {module_name or 'the model'}) cannot be split over "
                    f"mp = {mp} model-parallel ranks: every rank holds whole heads. Pick an mp dividing {count}")
    for name, param in model.named_parameters():
        try:
            plan.split(name, param, mp)  # on the meta device: shapes only
        except ValueError as exc:
            raise CheckpointError(f"{where}: cannot cut {name} over mp = {mp} model-parallel ranks: {exc}. "
                                  f"Pick an mp that divides it") from exc


def open_shards(shards: ShardSet) -> List[Mapping[str, torch.Tensor]]:
    """The per-rank state dicts of ``shards``, ``llma.``-keyed, memory-mapped."""
    return [read_state_dict(f, add_prefix=shards.format == META) for f in shards.files]


def ordered_keys(states: Sequence[Mapping], model: Optional[nn.Module] = None) -> List[str]:
    """Every key of ``states``: the model's parameters in the model's order (so shards that hold
    different experts merge back into the original order), then the others in first-seen order."""
    seen: Dict[str, None] = {}
    for state in states:
        for key in state:
            seen.setdefault(key, None)
    if model is None:
        return list(seen)
    order = {PREFIX + name: i for i, (name, _) in enumerate(model.named_parameters())}
    known = sorted((k for k in seen if k in order), key=order.__getitem__)
    return known + [k for k in seen if k not in order]


class ShardWriter:
    """N output state dicts, filled tensor by tensor, saved at the end."""

    def __init__(self, plan: SplitPlan, mp: int):
        self.plan, self.mp = plan, mp
        self.outputs: List[Dict[str, torch.Tensor]] = [{} for _ in range(mp)]

    def put(self, key: str, tensor: torch.Tensor, dtype: Optional[torch.dtype] = None) -> None:
        """Split ``tensor`` (full, ``llma.``-keyed) and give each rank its piece as its own copy."""
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        try:
            pieces = self.plan.split(name, tensor, self.mp)
        except ValueError as exc:
            raise CheckpointError(f"cannot cut {key} {tuple(tensor.shape)} over mp = {self.mp}: {exc}") from exc
        copies: Dict[int, torch.Tensor] = {}  # replicated pieces are one tensor: copy (and save) it once
        for rank, piece in enumerate(pieces):
            if piece is None:
                continue
            if id(piece) not in copies:
                target = dtype if dtype is not None and piece.is_floating_point() else piece.dtype
                # clone: a view of a memory-mapped shard would save (and hold) its whole storage
                copies[id(piece)] = piece.to(dtype=target, copy=True).contiguous()
            self.outputs[rank][key] = copies[id(piece)]

    def save(self, out_dir: Path, diff: bool = False, progress: bool = True) -> List[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for rank in tqdm(range(self.mp), desc=f"writing {out_dir.name}", unit="shard", disable=not progress,
                         leave=False):
            path = out_dir / shard_file_name(rank, self.mp, diff)
            torch.save({"model": self.outputs[rank]}, path)
            self.outputs[rank] = {}
            paths.append(path)
        return paths


def prepare_output(out_dir, inputs: Sequence[Path]) -> Path:
    """Create ``out_dir``; refuse one of the inputs or one already holding shards."""
    out = Path(out_dir)
    for path in inputs:
        if out.resolve() == Path(path).resolve():
            raise CheckpointError(f"the output directory {out} is also an input; write to a new directory")
    if out.is_dir():
        existing = sorted(p.name for p in out.iterdir() if p.name.startswith("consolidated."))
        if existing:
            raise CheckpointError(f"{out} already holds weight shards ({', '.join(existing[:4])}); choose an empty "
                                  f"or new output directory, or remove them")
    out.mkdir(parents=True, exist_ok=True)
    return out


def copy_side_files(sources: Sequence[Path], out: Path) -> List[str]:
    """Copy config.json, meta.json and tokenizer files into ``out``, from the first source that has each."""
    copied = []
    for name in SIDE_FILES:
        for src in sources:
            if (Path(src) / name).is_file():
                shutil.copyfile(Path(src) / name, out / name)
                copied.append(name)
                break
    return copied


def reshard(src_dir, dst_dir, mp: int, dtype: Optional[torch.dtype] = None, progress: bool = True) -> Path:
    """Rewrite the checkpoint in ``src_dir`` as ``mp`` shards ``consolidated.NN-of-MM.model.pth``
    (``{"model": {"llma.…": tensor}}``) in ``dst_dir``; a delta (model-diff) checkpoint stays a delta.

    ``dtype``: cast floating tensors (None keeps the source dtype, bit for bit). config.json,
    meta.json and the tokenizer files are copied. Returns ``dst_dir``.
    """
    src = Path(src_dir)
    shards = find_shards(src)
    _, model = meta_model_for(src)
    plan = model.split_plan
    check_mp(model, plan, mp, src)
    out = prepare_output(dst_dir, [src])
    states = open_shards(shards)
    writer = ShardWriter(plan, mp)
    for key in tqdm(ordered_keys(states, model), desc=f"resharding {src.name} {shards.mp_size} -> {mp}", unit="tensor",
                    disable=not progress, delay=2.0, leave=False):
        writer.put(key, merged_tensor(key, states, shards, plan), dtype)
    del states
    writer.save(out, diff=shards.format == DIFF, progress=progress)
    copy_side_files([src], out)
    return out


# --------------------------------------------------------------------------- command line

EXAMPLES = """examples:
  accessory reshard ./llama2-13b-mp2 ./llama2-13b-mp1 --mp 1
  accessory reshard ./llama2-7b ./llama2-7b-mp4 --mp 4 --dtype bf16
  accessory reshard ./mixtral-mp1 ./mixtral-mp2 --mp 2     # whole experts per rank"""


def cmd_reshard(args: argparse.Namespace) -> int:
    from ..tools import dtype_option, run_writer
    return run_writer(lambda: reshard(args.src, args.dst, args.mp, dtype=dtype_option(args.dtype),
                                      progress=not args.quiet))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``accessory reshard``."""
    parser = subparsers.add_parser(
        "reshard", help="rewrite a checkpoint at another model-parallel size",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge the model-parallel shards of a checkpoint directory (any shard count; Accessory, "
                    "Meta or safetensors layout) and split them into --mp shards "
                    "consolidated.NN-of-MM.model.pth, by the architecture's split plan (meta.json's llama_type, "
                    "config.json). Streams tensor by tensor from memory-mapped shards.",
        epilog=EXAMPLES)
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="output directory (new or empty)")
    parser.add_argument("--mp", type=int, required=True, help="model-parallel size to write")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: keep the source dtype)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_reshard)
    return parser
