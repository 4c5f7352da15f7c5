"""``accessory download``: fetch released checkpoints from the LLaMA2-Accessory model repo on the
Hugging Face Hub, non-interactively.

The release repo (``Alpha-VLLM/LLaMA2-Accessory``) is laid out as

* ``finetune/{sg,mm}/<model_name>/...`` and ``convert/sg/<model_name>/...``: a model's weights
  (``consolidated.NN-of-MM.model.pth``, for some models delta weights ``...model-diff.pth``) and,
  for some, its config.json / meta.json / tokenizer;
* ``config/{prefix}tokenizer.model`` and ``config/{prefix}{size}_params.json``: the base configs,
  prefix ``""`` (LLaMA2), ``internLM_`` or ``code_`` (CodeLlama).

Everything is written under ``--output_path`` with the repo's own paths (as the seed's
tools/download.py does), e.g. ``./output/finetune/sg/alpaca/consolidated.00-of-01.model.pth`` and
``./output/config/7B_params.json``. Unlike the seed's tool nothing is asked: a value the download
needs and cannot infer is an error naming the flag.
"""

import argparse
import fnmatch
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import AccessoryError

REPO_ID = "Alpha-VLLM/LLaMA2-Accessory"

#: The seed's catalogue: train type -> input type -> model names on the release page.
CATALOGUE: Dict[str, Dict[str, List[str]]] = {
    "convert": {
        "sg": ["InternLM", "Falcon", "Falcon_180b", "mixtral-8x7b-32kseqlen"],
    },
    "finetune": {
        "mm": ["alpacaLlava_llamaQformerv2", "alpacaLlava_llamaQformerv2_13b", "alpacaLlava_llamaQformerv2Peft_13b",
               "caption_llamaQformerv2", "caption_llamaQformerv2_13b", "SPHINX/SPHINX-1k", "SPHINX/SPHINX",
               "SPHINX/SPHINX-v2-1k"],
        "sg": ["alpaca", "alpaca_internLM_en", "alpaca_internLM_zh", "alpaca_llamaPeft_normBias", "dialog_flan",
               "dialog_lima", "dialog_moss", "dialog_platypus", "dialog_sharegpt", "dialog_sharegpt_70b",
               "dialog_ultra", "dialog_wizardcode", "dialog_wizardcode_codellama", "dialog_wizardcode_loadcode220k",
               "dialog_wizardLM", "gorilla"],
    },
}

MODEL_SIZES = ("7B", "13B", "34B", "70B", "180B")
#: --down_config choices -> the prefix of the base config files in ``config/`` (sphinx: the model's own).
CONFIG_PREFIXES = {"llama2": "", "internlm": "internLM_", "codellama": "code_", "sphinx": None}
#: Delta-weight shards (``--down_diff``) and the small files kept with them.
DIFF_PATTERNS = ("*.model-diff.pth", "*.model-diff.safetensors")
SIDE_FILES = ("*.json", "*.model", "*.txt", "*.md")


class DownloadError(AccessoryError):
    """A download that cannot go ahead or failed; the message names the flag or file to fix."""


def locate(model_name: str, train_type: Optional[str] = None, input_type: Optional[str] = None) -> (str, str):
    """``(train_type, input_type)`` of ``model_name``: given ones are kept, missing ones are read
    off the catalogue (a DownloadError when the model is not in it, or is ambiguous)."""
    if train_type and input_type:
        return train_type, input_type
    places = [(t, i) for t, inputs in CATALOGUE.items() for i, names in inputs.items() if model_name in names
              and (train_type in (None, t)) and (input_type in (None, i))]
    if len(places) == 1:
        return places[0]
    if not places:
        raise DownloadError(
            f"--model_name {model_name!r} is not in the release catalogue{_filters(train_type, input_type)}; "
            f"give both --train_type and --input_type to download it anyway, or pick one of "
            f"`accessory download --list`")
    raise DownloadError(f"--model_name {model_name!r} is in several places {places}: give --train_type and "
                        f"--input_type")


def _filters(train_type, input_type) -> str:
    given = [f"{flag} {value}" for flag, value in (("--train_type", train_type), ("--input_type", input_type)) if value]
    return f" under {', '.join(given)}" if given else ""


def default_config_kind(model_name: str) -> str:
    """The base config a model goes with, guessed from its name (SPHINX, InternLM, CodeLlama, else LLaMA2)."""
    lowered = model_name.lower()
    if lowered.startswith("sphinx/"):
        return "sphinx"
    if "internlm" in lowered:
        return "internlm"
    if "codellama" in lowered:
        return "codellama"
    return "llama2"


def config_files(kind: str, model_size: Optional[str], model_folder: str) -> (str, List[str]):
    """``(subfolder, file names)`` of the config files for ``kind`` (see :data:`CONFIG_PREFIXES`)."""
    if kind == "sphinx":
        return model_folder, ["config.json", "tokenizer.model", "meta.json"]
    if model_size is None:
        raise DownloadError(f"--down_config {kind} needs --model_size (one of {', '.join(MODEL_SIZES)}): the "
                            f"params file is config/{CONFIG_PREFIXES[kind]}<size>_params.json")
    prefix = CONFIG_PREFIXES[kind]
    return "config", [f"{prefix}tokenizer.model", f"{prefix}{model_size}_params.json"]


def download(model_name: str, output_path, *, train_type: Optional[str] = None, input_type: Optional[str] = None,
             model_size: Optional[str] = None, down_config: Optional[str] = None, down_diff: bool = False,
             repo_id: str = REPO_ID, revision: Optional[str] = None) -> List[Path]:
    """Download ``model_name``'s folder (and, with ``down_config``, its base config files) into
    ``output_path``; returns the files written. ``down_config``: "llama2", "internlm", "codellama",
    "sphinx" or "auto" (by the model's name). ``down_diff``: only the folder's delta weights
    (``*model-diff*``) and small side files, not full weights."""
    import huggingface_hub

    train_type, input_type = locate(model_name, train_type, input_type)
    folder = f"{train_type}/{input_type}/{model_name}"
    output = Path(output_path)
    output.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []

    if down_config:
        kind = default_config_kind(model_name) if down_config == "auto" else down_config
        if kind not in CONFIG_PREFIXES:
            raise DownloadError(f"--down_config {down_config!r}: expected one of auto, {', '.join(CONFIG_PREFIXES)}")
        subfolder, names = config_files(kind, model_size, folder)
        for name in names:
            try:
                path = huggingface_hub.hf_hub_download(repo_id, name, subfolder=subfolder, repo_type="model",
                                                       revision=revision, local_dir=str(output))
            except Exception as exc:  # noqa: BLE001 -- any hub/network failure, reported with its cause
                raise DownloadError(f"could not download {subfolder}/{name} from {repo_id}: {exc}. Check "
                                    f"--model_size / --down_config (the release page lists what exists)") from exc
            written.append(Path(path))

    if down_diff:
        patterns = [f"{folder}/{p}" for p in DIFF_PATTERNS + SIDE_FILES]
    else:
        patterns = [f"{folder}/*"]
    try:
        huggingface_hub.snapshot_download(repo_id, repo_type="model", revision=revision, local_dir=str(output),
                                          allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001
        raise DownloadError(f"could not download {folder} from {repo_id}: {exc}") from exc
    target = output / folder
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else []
    weights = [p for p in files if p.suffix in (".pth", ".safetensors")]
    if down_diff and not any(fnmatch.fnmatch(p.name, pattern) for p in weights for pattern in DIFF_PATTERNS):
        raise DownloadError(f"{repo_id} has no delta weights (*model-diff*) under {folder}: download the full "
                            f"weights without --down_diff")
    if not weights:
        raise DownloadError(f"{repo_id} has no weights under {folder}: check --model_name, --train_type and "
                            f"--input_type against the release page (`accessory download --list`)")
    return written + files


def catalogue_lines() -> List[str]:
    return [f"{t}/{i}/{name}" for t, inputs in CATALOGUE.items() for i, names in inputs.items() for name in names]


EXAMPLES = """examples:
  accessory download --list
  accessory download --model_name alpaca --model_size 7B --down_config --output_path ./ckpts
  accessory download --model_name alpaca_llamaPeft_normBias --down_diff --output_path ./ckpts
  accessory download --model_name SPHINX/SPHINX --down_config --output_path ./ckpts
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``accessory download``."""
    parser = subparsers.add_parser(
        "download", help="download released checkpoints from the Hugging Face Hub",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Download a released model folder of {REPO_ID} (and, with --down_config, the base "
                    f"config files) into --output_path, keeping the repo's paths. Non-interactive: the "
                    f"train/input type is read off the catalogue when not given.",
        epilog=EXAMPLES)
    parser.add_argument("--model_name", help="the model's folder name on the release page (see --list)")
    parser.add_argument("--train_type", choices=sorted(CATALOGUE), help="default: from the catalogue")
    parser.add_argument("--input_type", choices=["sg", "mm"], help="default: from the catalogue")
    parser.add_argument("--model_size", choices=MODEL_SIZES, help="picks the base params file (--down_config)")
    parser.add_argument("--down_config", nargs="?", const="auto", default=None,
                        choices=["auto"] + sorted(CONFIG_PREFIXES),
                        help="also download the base config files: llama2, internlm, codellama or sphinx "
                             "(default when the flag is given alone: guessed from --model_name)")
    parser.add_argument("--down_internLM", action="store_true", help="the seed's flag: --down_config internlm")
    parser.add_argument("--down_code", action="store_true", help="the seed's flag: --down_config codellama")
    parser.add_argument("--down_diff", action="store_true",
                        help="download only the delta weights (*model-diff*) and small side files")
    parser.add_argument("--output_path", default="./output", help="directory to write into (default ./output)")
    parser.add_argument("--repo_id", default=REPO_ID, help=f"model repo (default {REPO_ID})")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.set_defaults(func=cmd_download)
    return parser


def cmd_download(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(catalogue_lines()))
        return 0
    if not args.model_name:
        print("error: --model_name is required (see `accessory download --list`)", file=sys.stderr)
        return 2
    down_config = args.down_config
    for flag, kind in (("down_internLM", "internlm"), ("down_code", "codellama")):
        if getattr(args, flag):
            if down_config not in (None, "auto", kind):
                print(f"error: --{flag} contradicts --down_config {down_config}", file=sys.stderr)
                return 2
            down_config = kind
    try:
        files = download(args.model_name, args.output_path, train_type=args.train_type, input_type=args.input_type,
                         model_size=args.model_size, down_config=down_config, down_diff=args.down_diff,
                         repo_id=args.repo_id, revision=args.revision)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in files:
        print(path)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="accessory")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["download", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
