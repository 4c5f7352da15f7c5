"""Pre-quantized checkpoints: quantize once, load many times.

A pre-quantized checkpoint is an ordinary Accessory directory with one shard,
``consolidated.00-of-01.model.pth``, whose quantized layers hold ``qweight`` / ``scales`` /
``offsets`` instead of ``weight`` (see quant/linear.py), and whose ``meta.json`` records the format:
``{"llama_type": "llama", "quantization": {"scheme": "int4", "group_size": 32}}``. config.json and
the tokenizer are copied from the source. ``MetaModel.from_pretrained`` reads the record and loads
the packed tensors as they are.
"""

import json
from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError
from .formats import QuantScheme

QUANT_KEY = "quantization"


def read_quantization(directory) -> Optional[QuantScheme]:
    """The scheme ``directory``'s meta.json records, or None for a full-precision checkpoint."""
    meta_file = Path(directory) / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        record = json.loads(meta_file.read_text(encoding="utf-8")).get(QUANT_KEY)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # read_llama_type reports a malformed meta.json
    if record is None:
        return None
    try:
        return QuantScheme.from_json(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_file}: \"{QUANT_KEY}\" must look like {{\"scheme\": \"int4\", "
                              f"\"group_size\": 32}} (scheme int8, int4 or nf4): {exc}") from exc


def refuse_quantized(directory, what: str) -> None:
    """A CheckpointError when ``directory`` is pre-quantized and ``what`` needs full precision."""
    scheme = read_quantization(directory)
    if scheme is not None:
        raise CheckpointError(
            f"{directory} is a pre-quantized ({scheme.name}) checkpoint: {what} needs the full-precision "
            f"weights. Use the checkpoint it was quantized from")


def save_quantized(model, out_dir, sources=(), progress: bool = True) -> Path:
    """Write the quantized MetaModel ``model`` as a pre-quantized checkpoint in ``out_dir``, with
    config.json and the tokenizer copied from the first of ``sources`` that has them."""
    from ..checkpoint.reshard import copy_side_files, prepare_output, shard_file_name

    scheme = getattr(model, "quant_scheme", None)
    if scheme is None:
        raise ValueError("the model is not quantized: load it with quant='int8' / 'int4' / 'nf4' first")
    if getattr(model, "mp_group", None) is not None:
        raise ValueError("save a quantized model from one process (mp_group=None): a pre-quantized "
                         "checkpoint has one shard")
    out = prepare_output(out_dir, [Path(s) for s in sources])
    copy_side_files([Path(s) for s in sources], out)
    state = {key: tensor.detach().to("cpu").contiguous() for key, tensor in model.state_dict().items()
             if key.startswith("llma.")}
    torch.save({"model": state}, out / shard_file_name(0, 1))
    meta = {"llama_type": model.llama_type, QUANT_KEY: scheme.to_json()}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if not (out / "config.json").is_file():
        import dataclasses
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(model.args), indent=2) + "\n",
                                         encoding="utf-8")
    return out
