"""Load checkpoint directories into a model built on the meta device.

The model's parameters start as shapes without storage; each tensor read from a shard is cast
once, straight into the target dtype and device, and becomes the parameter. Nothing is ever held
in float32 "just in case", and a shard already in the target dtype is used in place (mmap).
"""

import logging
import re
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from ..errors import CheckpointError
from ..model.layers.parallel import SplitPlan
from ..quant.memory import release_file_pages
from .discover import META, ShardSet, find_shards
from .reader import PREFIX, read_state_dict

log = logging.getLogger(__name__)


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def _ordered_union(states: Sequence[Mapping]) -> List[str]:
    seen, keys = set(), []
    for state in states:
        for key in state:
            if key not in seen:
                seen.add(key)
                keys.append(key)
    return keys


def _cast(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def model_parallel_pieces(key: str, states: Sequence[Mapping[str, torch.Tensor]], shards: ShardSet,
                          split_plan: SplitPlan) -> List[torch.Tensor]:
    """The per-rank pieces of ``key`` (``llma.``-prefixed) in ``states``; a CheckpointError when
    a split parameter is missing from some shards."""
    pieces = [state[key] for state in states if key in state]
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if len(pieces) != len(states) and split_plan.shard_dim(name) is not None:
        having = [f.name for f, state in zip(shards.files, states) if key in state]
        raise CheckpointError(
            f"{key} is split across model-parallel ranks but only {', '.join(having)} of the "
            f"{shards.mp_size} shards in {shards.directory} hold it: the shard set is incomplete or "
            f"mixed from different saves; copy all {shards.mp_size} shards again from one save")
    return pieces


def merged_tensor(key: str, states: Sequence[Mapping[str, torch.Tensor]], shards: ShardSet,
                  split_plan: SplitPlan) -> torch.Tensor:
    """The full tensor of ``key`` (``llma.``-prefixed) joined from its model-parallel pieces."""
    pieces = model_parallel_pieces(key, states, shards, split_plan)
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    try:
        return split_plan.merge(name, pieces)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot merge the {len(pieces)} model-parallel pieces of {key} in "
                              f"{shards.directory} (shapes {[tuple(p.shape) for p in pieces]}): {exc}") from exc


def load_shard_set(model: nn.Module, shards: ShardSet, split_plan: SplitPlan, dtype: torch.dtype,
                   device: torch.device, loaded: Dict[str, str], unexpected: Dict[str, str],
                   progress: bool = True, shard: Optional[Tuple[int, int]] = None,
                   after_load: Optional[Callable[[str], List[str]]] = None) -> None:
    """Load one directory's shards into ``model`` (merging model-parallel pieces).

    ``loaded`` maps each parameter set so far to the file it came from; ``unexpected`` collects
    checkpoint keys the model has no parameter for. Delta shards are added onto loaded values.
    ``shard=(rank, size)``: ``model`` holds only rank ``rank``'s slice of each split parameter
    (see layers/tensor_parallel.py); a checkpoint of ``size`` shards gives it its own shard, a
    1-shard one is sliced (memory-mapped: only the slice's bytes are read), any other count is
    merged, then sliced.
    ``after_load(name)`` is called after each parameter is set (not for deltas); it may replace
    the module (quantization) and returns the names of the parameters that now stand for it.
    """
    params = dict(model.named_parameters())
    states = [read_state_dict(f, add_prefix=shards.format == META) for f in shards.files]
    keys = _ordered_union(states)
    source = (str(shards.files[0]) if shards.mp_size == 1 else
              f"{shards.directory} ({', '.join(f.name for f in shards.files)}, merged)")
    bar = tqdm(keys, desc=f"loading {shards.directory.name}", unit="tensor", delay=2.0,
               disable=not progress, leave=False)
    for key in bar:
        local_name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if key not in params:
            if shard is None or split_plan.holds(local_name, *shard):  # else: another rank's (experts)
                unexpected.setdefault(key, source)
            continue
        pieces = model_parallel_pieces(key, states, shards, split_plan)
        try:
            if shard is None:
                tensor = split_plan.merge(local_name, pieces)
            else:
                tensor = split_plan.local_piece(local_name, pieces, *shard)
                if tensor is None:
                    raise RuntimeError(f"rank {shard[0]} of {shard[1]} holds no piece of it")
                tensor = tensor.contiguous()  # a column slice: copy it out of the full tensor
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"cannot merge{'' if shard is None else ' and slice'} the {len(pieces)} model-parallel pieces of {key} in {shards.directory} "
                f"(shapes {[tuple(p.shape) for p in pieces]}): {exc}") from exc
        expected = tuple(params[key].shape)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"shape mismatch for {key}: checkpoint {source} has {tuple(tensor.shape)}"
                f"{'' if shard is None else f' for model-parallel rank {shard[0]} of {shard[1]}'}, the model "
                f"expects {expected}. " + _mismatch_advice(model, key, tuple(tensor.shape), expected))
        if shards.is_diff:
            if key not in loaded:
                raise CheckpointError(
                    f"{source} is a delta (model-diff) checkpoint, but {key} has no base value to add "
                    f"it to; list the base checkpoint before the delta in pretrained_path")
            base = params[key]
            value = (base.float() + tensor.to(device=base.device).float()).to(base.dtype)
        else:
            # packed (quantized) tensors keep their storage dtype; everything else gets ``dtype``
            value = _cast(tensor, params[key].dtype if getattr(params[key], "keep_dtype", False) else dtype,
                          device)
        _set_parameter(model, key, value)
        params[key] = value
        loaded[key] = source
        if all(value.data_ptr() != t.data_ptr() for t in (tensor, *pieces)):
            # a copy (cast, merged, sliced, added): the mapped checkpoint pages it was read from are
            # not needed again (an fp16 S checkpoint read into bf16 held both: 2.05x the model's size)
            for read in (tensor, *pieces):
                release_file_pages(read)
        if after_load is not None and not shards.is_diff:
            for name in after_load(key):
                loaded[name] = source
    bar.close()


def _mismatch_advice(model: nn.Module, key: str, found: tuple, expected: tuple) -> str:
    """What to fix when a checkpoint tensor's shape differs from the model's."""
    tokenizer = getattr(model, "tokenizer", None)
    vocab_size = getattr(tokenizer, "n_words", None)
    # Embedding / output rows are the vocabulary: the config cannot change them, the tokenizer does.
    if (vocab_size is not None and len(found) == len(expected) == 2 and found[1:] == expected[1:]
            and expected[0] == vocab_size and found[0] != vocab_size):
        return (f"The checkpoint has a vocabulary of {found[0]} rows but the tokenizer "
                f"{getattr(tokenizer, 'model_path', '')} has {vocab_size} tokens: the tokenizer does not "
                f"belong to this model. Pass tokenizer_path= the tokenizer it was trained with (or copy "
                f"that tokenizer.model / tokenizer.json into the checkpoint directory)")
    return ("The config (config.json / llama_config) does not describe this checkpoint: check dim, "
            "n_layers, n_heads, n_kv_heads, multiple_of and ffn_dim_multiplier"
            + (", and that the tokenizer is the one the model was trained with"
               if "tok_embeddings" in key or "output" in key else ""))


def load_pretrained(model: nn.Module, paths: Sequence, split_plan: SplitPlan, dtype: torch.dtype,
                    device: torch.device, strict: bool = True, progress: bool = True,
                    shard: Optional[Tuple[int, int]] = None,
                    after_load: Optional[Callable[[str], List[str]]] = None) -> Dict[str, List[str]]:
    """Load every checkpoint dir of ``paths`` in order into ``model`` (a meta-device MetaModel).

    Later full checkpoints override earlier keys; delta checkpoints add to them. Unexpected keys
    are reported once and dropped. Parameters no checkpoint provided are an error unless
    ``strict=False``, in which case they are initialised by their module (with a warning).
    ``shard=(rank, size)``: fill only this model-parallel rank's slices (see load_shard_set).
    ``after_load``: see load_shard_set (quantization while loading).
    Returns ``{"missing_keys": [...], "unexpected_keys": [...]}``.
    """
    loaded: Dict[str, str] = {}
    unexpected: Dict[str, str] = {}
    for path in paths:
        load_shard_set(model, find_shards(path), split_plan, dtype, device, loaded, unexpected, progress, shard,
                       after_load)
    if unexpected:
        names = list(unexpected)
        shown = ", ".join(names[:10]) + (f" ... and {len(names) - 10} more" if len(names) > 10 else "")
        warnings.warn(f"dropped {len(names)} checkpoint entries the model has no parameter for: {shown}",
                      stacklevel=3)
    missing = [name for name, _ in model.named_parameters() if name not in loaded]
    if missing and strict:
        shown = ", ".join(missing[:10]) + (f" ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise CheckpointError(
            f"the checkpoint(s) {[str(p) for p in paths]} do not provide {len(missing)} parameters of "
            f"the model: {shown}. {_missing_visual_hint(model, missing)}{_missing_layers_hint(missing, loaded)}"
            f"If this is a fine-tune that "
            f"only saved its trainable weights, list the base checkpoint first in pretrained_path; to "
            f"initialise the missing parameters from scratch on purpose, pass strict=False")
    if missing:
        warnings.warn(f"{len(missing)} parameters were not in the checkpoint and are freshly "
                      f"initialised (strict=False): {', '.join(missing[:10])}", stacklevel=3)
        _initialise_missing(model, missing, dtype, device)
    return {"missing_keys": missing, "unexpected_keys": list(unexpected)}


_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def _missing_visual_hint(model: nn.Module, missing: Sequence[str]) -> str:
    """A sentence when only the image side (``with_visual=True``) is missing, or ''."""
    blocklist = getattr(model, "get_quant_blocklist", lambda: [])()
    visual = tuple(blocklist) + ("llma.start_img", "llma.end_img", "llma.visual_query")
    if not blocklist or not all(name.startswith(visual) for name in missing):
        return ""
    return ("They are the image encoder and connectors that with_visual=True builds, and the checkpoint "
            "has none: it looks like a text-only checkpoint; load it with with_visual=False. ")


def _missing_layers_hint(missing: Sequence[str], loaded: Mapping[str, str]) -> str:
    """A sentence naming whole layers the checkpoint lacks (a wrong n_layers), or ''."""
    def layer_ids(names):
        return {int(m.group(2)) for m in map(_LAYER.search, names) if m}
    absent = layer_ids(missing) - layer_ids(loaded)
    if not absent or not loaded:
        return ""
    have, total = len(layer_ids(loaded)), len(layer_ids(loaded) | absent)
    return (f"Layers {min(absent)}..{max(absent)} are missing entirely: the checkpoint has {have} layers "
            f"but the config asks for {total}; check n_layers in config.json / llama_config. ")


def _initialise_missing(model: nn.Module, missing: Sequence[str], dtype, device) -> None:
    modules = {name.rpartition(".")[0] for name in missing}
    for module_name in sorted(modules):
        module = model.get_submodule(module_name) if module_name else model
        own = [n for n, p in module.named_parameters(recurse=False) if p.is_meta]
        for attr in own:
            meta = module._parameters[attr]
            module._parameters[attr] = nn.Parameter(torch.empty(meta.shape, dtype=dtype, device=device),
                                                    requires_grad=False)
        if hasattr(module, "reset_parameters"):
            # reset_parameters re-initialises every parameter of the module: keep the loaded ones.
            kept = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False) if n not in own}
            with torch.no_grad():
                module.reset_parameters()
                for n, value in kept.items():
                    module._parameters[n].copy_(value)
        else:
            for attr in own:
                nn.init.normal_(module._parameters[attr], std=0.02)
