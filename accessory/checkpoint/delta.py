"""Delta weights, as the original's ``tools/weight_operate.py``: publish a fine-tune as its
difference from a base model, and rebuild it.

* ``extract_delta(base, finetuned, out)``: ``delta = finetuned - base`` for every finetuned key,
  written as ``consolidated.NN-of-MM.model-diff.pth`` (which ``MetaModel.from_pretrained([base,
  delta])`` adds onto the base on load).
* ``apply_delta(base, delta, out)``: ``finetuned = base + delta``, written as
  ``consolidated.NN-of-MM.model.pth``.

Bases may be in Meta's release layout (``consolidated.NN.pth``, no ``llma.`` prefix) or Accessory's;
base, delta and output may have different model-parallel sizes (pieces are merged and re-split by the
architecture's split plan). Arithmetic is in float32; the output keeps the dtype of the finetuned
weights / the delta unless ``dtype`` is given (unlike the original, which always wrote fp16).
config.json, meta.json and the tokenizer files are copied into the output.
"""

import argparse
import warnings
from pathlib import Path
from typing import List, Optional

import torch
from tqdm import tqdm

from ..errors import CheckpointError, ConfigError
from .discover import DIFF, FULL, META, ShardSet, find_shards
from .load import merged_tensor
from .reader import PREFIX
from .reshard import (ShardWriter, check_mp, copy_side_files, meta_model_for, open_shards,
                      ordered_keys, prepare_output)


def _model_for(dirs: List[Path]):
    """The meta-device model of the first of ``dirs`` that has config.json and meta.json."""
    for directory in dirs:
        if (directory / "config.json").is_file() and (directory / "meta.json").is_file():
            return meta_model_for(directory)[1]
    raise ConfigError(f"none of {', '.join(str(d) for d in dirs)} holds both config.json and meta.json, "
                      f"which tell the architecture and how its weights are split; copy them from the "
                      f"fine-tuned checkpoint")


def _combine(first: torch.Tensor, second: torch.Tensor, sign: float, dtype: torch.dtype, key: str) -> torch.Tensor:
    """``first + sign * second`` in float32, cast to ``dtype``."""
    if first.shape != second.shape:
        raise CheckpointError(f"{key}: shapes {tuple(first.shape)} and {tuple(second.shape)} differ between the "
                              f"base and the other checkpoint: they are not the same architecture/size (or "
                              f"the vocabularies differ)")
    if not (first.is_floating_point() and second.is_floating_point()):
        return first.clone() if sign < 0 else second.clone()
    result = first.float() + second.float() if sign > 0 else first.float() - second.float()
    return result.to(dtype)


def _note(notes: List[str], what: str, keys: List[str]) -> None:
    if keys:
        shown = ", ".join(keys[:8]) + (f" ... and {len(keys) - 8} more" if len(keys) > 8 else "")
        notes.append(f"{len(keys)} {what}: {shown}")


def _open(directory, role: str, allowed) -> ShardSet:
    shards = find_shards(directory)
    if shards.format not in allowed:
        kinds = {META: "a Meta-format (consolidated.NN.pth)", DIFF: "a delta (model-diff)"}
        raise CheckpointError(f"the {role} {directory} is {kinds.get(shards.format, 'a full')} checkpoint, "
                              f"which cannot be a {role}")
    return shards


def apply_delta(base_dir, delta_dir, out_dir, mp: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                progress: bool = True) -> Path:
    """Write ``base + delta`` into ``out_dir`` as ``mp`` shards (default: the delta's shard count).

    ``base_dir``: Meta-format or Accessory full weights. ``delta_dir``: Accessory weights holding
    differences (``.model-diff.pth``, or ``.model.pth`` as the original's releases name them).
    Base keys the delta lacks are kept, delta keys the base lacks (new trainable parameters) are
    copied as they are, base keys the model has no parameter for (Meta's ``rope.freqs``) are dropped;
    each case is reported in one warning. Output dtype: the delta's, unless ``dtype``.
    """
    base_path, delta_path = Path(base_dir), Path(delta_dir)
    base = _open(base_path, "base", (META, FULL))
    delta = _open(delta_path, "delta", (FULL, DIFF))
    model = _model_for([delta_path, base_path])
    plan = model.split_plan
    mp = delta.mp_size if mp is None else mp
    check_mp(model, plan, mp, delta_path)
    out = prepare_output(out_dir, [base_path, delta_path])
    params = {PREFIX + name for name, _ in model.named_parameters()}
    base_states, delta_states = open_shards(base), open_shards(delta)
    base_keys, delta_keys = ordered_keys(base_states, model), ordered_keys(delta_states, model)
    delta_set, base_set = set(delta_keys), set(base_keys)
    writer = ShardWriter(plan, mp)
    kept, copied, dropped = [], [], []
    keys = base_keys + [k for k in delta_keys if k not in base_set]
    for key in tqdm(keys, desc=f"applying {delta_path.name}", unit="tensor", disable=not progress, delay=2.0,
                    leave=False):
        if key in base_set and key in delta_set:
            d = merged_tensor(key, delta_states, delta, plan)
            value = _combine(merged_tensor(key, base_states, base, plan), d, +1, dtype or d.dtype, key)
            writer.put(key, value)
        elif key in delta_set:
            copied.append(key)
            writer.put(key, merged_tensor(key, delta_states, delta, plan), dtype)
        elif key in params:
            kept.append(key)
            writer.put(key, merged_tensor(key, base_states, base, plan), dtype)
        else:
            dropped.append(key)
    del base_states, delta_states
    writer.save(out, diff=False, progress=progress)
    copy_side_files([delta_path, base_path], out)
    notes: List[str] = []
    _note(notes, "base weights the delta does not change, kept as they are", kept)
    _note(notes, "delta entries with no base weight (new parameters), copied whole", copied)
    _note(notes, "base entries the model has no parameter for, dropped", dropped)
    if notes:
        warnings.warn("apply_delta: " + "; ".join(notes), stacklevel=2)
    return out


def extract_delta(base_dir, finetuned_dir, out_dir, mp: Optional[int] = None,
                  dtype: Optional[torch.dtype] = None, progress: bool = True) -> Path:
    """Write ``finetuned - base`` into ``out_dir`` as ``mp`` delta shards
    ``consolidated.NN-of-MM.model-diff.pth`` (default: the finetuned's shard count).

    Finetuned keys the base lacks (visual encoders, LoRA, other new trainable parameters) are stored
    whole, base-only keys are left out; both are reported in one warning. Output dtype: the
    finetuned's, unless ``dtype``.
    """
    base_path, ft_path = Path(base_dir), Path(finetuned_dir)
    base = _open(base_path, "base", (META, FULL))
    finetuned = _open(ft_path, "fine-tuned checkpoint", (FULL,))
    model = _model_for([ft_path, base_path])
    plan = model.split_plan
    mp = finetuned.mp_size if mp is None else mp
    check_mp(model, plan, mp, ft_path)
    out = prepare_output(out_dir, [base_path, ft_path])
    base_states, ft_states = open_shards(base), open_shards(finetuned)
    base_keys, ft_keys = ordered_keys(base_states, model), ordered_keys(ft_states, model)
    base_set, ft_set = set(base_keys), set(ft_keys)
    writer = ShardWriter(plan, mp)
    whole = []
    for key in tqdm(ft_keys, desc=f"extracting {ft_path.name}", unit="tensor", disable=not progress, delay=2.0,
                    leave=False):
        f = merged_tensor(key, ft_states, finetuned, plan)
        if key in base_set:
            writer.put(key, _combine(f, merged_tensor(key, base_states, base, plan), -1, dtype or f.dtype, key))
        else:
            whole.append(key)
            writer.put(key, f, dtype)
    del base_states, ft_states
    writer.save(out, diff=True, progress=progress)
    copy_side_files([ft_path, base_path], out)
    notes: List[str] = []
    _note(notes, "fine-tuned entries with no base weight, stored whole in the delta", whole)
    _note(notes, "base entries not in the fine-tuned checkpoint, left out",
          [k for k in base_keys if k not in ft_set])
    if notes:
        warnings.warn("extract_delta: " + "; ".join(notes), stacklevel=2)
    return out


# --------------------------------------------------------------------------- command line

EXAMPLES = """examples:
  accessory delta extract ./llama2-7b-meta ./my-finetune ./my-finetune-delta
  accessory delta apply ./llama2-7b-meta ./my-finetune-delta ./my-finetune-again
  accessory delta apply ./llama2-13b ./finetune-13b-delta ./finetune-13b --mp 1 --dtype bf16

BASE may be Meta's release (consolidated.00.pth ...) or an Accessory checkpoint; the shard counts of
BASE, DELTA/FINETUNED and the output may all differ. The output gets config.json, meta.json and the
tokenizer of the delta / fine-tuned directory (else of the base)."""


def cmd_delta(args: argparse.Namespace) -> int:
    from ..tools import dtype_option, run_writer
    function = apply_delta if args.operation == "apply" else extract_delta
    return run_writer(lambda: function(args.base, args.other, args.out, mp=args.mp,
                                       dtype=dtype_option(args.dtype), progress=not args.quiet), notes=True)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``accessory delta {apply,extract}``."""
    parser = subparsers.add_parser(
        "delta", help="apply or extract delta weights (finetuned = base + delta)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="apply: BASE + DELTA -> full fine-tuned weights (consolidated.NN-of-MM.model.pth). "
                    "extract: FINETUNED - BASE -> delta weights (consolidated.NN-of-MM.model-diff.pth, which "
                    "MetaModel.from_pretrained([BASE, DELTA]) also loads directly). Computed in float32; the "
                    "output keeps the source dtype unless --dtype.",
        epilog=EXAMPLES)
    parser.add_argument("operation", choices=["apply", "extract"])
    parser.add_argument("base", help="base checkpoint directory (Meta or Accessory layout)")
    parser.add_argument("other", metavar="DELTA_OR_FINETUNED",
                        help="apply: the delta directory; extract: the fine-tuned directory")
    parser.add_argument("out", help="output directory (new or empty)")
    parser.add_argument("--mp", type=int, default=None,
                        help="model-parallel shards to write (default: as DELTA_OR_FINETUNED)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: keep the source dtype)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_delta)
    return parser
