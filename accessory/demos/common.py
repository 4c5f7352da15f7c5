"""What the demos share: the original's command-line flags and loading the model they name.

A demo never touches a weight: it calls ``MetaModel.from_pretrained`` and then only the model's
``generate`` / ``stream_generate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence


def add_model_args(parser: argparse.ArgumentParser, max_seq_len: int) -> None:
    """The original demos' model flags, plus --host/--port/--share for the web server."""
    parser.add_argument("--pretrained_path", type=str, nargs="+", default=None,
                        help="checkpoint directory (several: applied in order, e.g. base then delta); "
                             "default: the embedded SmolLM2-135M-Instruct demo model")
    parser.add_argument("--llama_type", type=str, default=None,
                        help="architecture, e.g. llama (default: read from the checkpoint's meta.json)")
    parser.add_argument("--llama_config", type=str, nargs="*", default=None,
                        help="params/config JSON files, merged in order (default: the checkpoint's config.json)")
    parser.add_argument("--tokenizer_path", type=str, default=None,
                        help="tokenizer.model or tokenizer.json (default: found in the checkpoint dir)")
    parser.add_argument("--max_seq_len", type=int, default=max_seq_len,
                        help=f"context length in tokens (default {max_seq_len})")
    parser.add_argument("--dtype", type=str, choices=["fp16", "bf16", "fp32"], default="bf16",
                        help="weight dtype (default bf16)")
    parser.add_argument("--device", type=str, default=None,
                        help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--quant", nargs="?", const=True, default=False, metavar="SCHEME",
                        help="weight-only quantization: bare --quant = 4-bit as the original (int4 on CPU, nf4 "
                             "on CUDA), or int8, int4, int4-g64, nf4")
    parser.add_argument("--host", type=str, default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (off by default)")


def checkpoint_dirs(pretrained_path: Optional[Sequence[str]]) -> List[Path]:
    """The checkpoint directories to load: the given ones, or the embedded demo model (built on first use)."""
    if pretrained_path:
        return [Path(p) for p in pretrained_path]
    from accessory.checkpoint.demo_model import ensure_demo_model
    return [ensure_demo_model()]


def load_model(args: argparse.Namespace, with_visual: bool = False, mp_group=None):
    """``MetaModel.from_pretrained`` with the parsed flags; exits with the reason when loading fails.
    ``mp_group``: this process's model-parallel group (see demos/parallel.py), or None."""
    from accessory.errors import AccessoryError
    from accessory.model.meta import MetaModel

    paths = checkpoint_dirs(args.pretrained_path)
    try:
        return MetaModel.from_pretrained([str(p) for p in paths], llama_type=args.llama_type,
                                         llama_config=args.llama_config, tokenizer_path=args.tokenizer_path,
                                         max_seq_len=args.max_seq_len, dtype=args.dtype, device=args.device,
                                         quant=args.quant, with_visual=with_visual, mp_group=mp_group)
    except NotImplementedError as exc:
        sys.exit(f"error: {exc}")
    except AccessoryError as exc:
        hint = ""
        if mp_group is not None and "model-parallel" in str(exc):
            hint = ("; start fewer processes (--n_gpus N, or torchrun --nproc-per-node N) with an N that "
                    "divides the checkpoint's head counts")
        sys.exit(f"error: cannot load {', '.join(map(str, paths))}: {exc}{hint}")


def load_chat_model(args: argparse.Namespace, with_visual: bool = False, mp_group=None):
    """``load_model`` for the faces that hold a conversation (the multi-turn demo, the server): the
    engine's prompt cache on (each turn prefills only what the last one did not hold; see
    generation/engine.py), unless ``ACCESSORY_PROMPT_CACHE=0``, with ``args.prompt_cache_slots``
    conversations kept (1 when the face has no such flag; 0 turns the cache off) in ``args.prompt_cache_mb`` MiB (the
    most recent one aside; no bound without the flag)."""
    return configure_prompt_cache(load_model(args, with_visual=with_visual, mp_group=mp_group), args)


def prompt_cache_flag_error(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with ``--prompt_cache_slots`` / ``--prompt_cache_mb`` (negative), or None."""
    for flag in ("prompt_cache_slots", "prompt_cache_mb"):
        if getattr(args, flag) < 0:
            return f"--{flag} must be 0 or more, got {getattr(args, flag)}"
    return None


def configure_prompt_cache(model, args: argparse.Namespace):
    """Turn ``model``'s prompt cache on as :func:`load_chat_model` describes; returns ``model``."""
    from accessory.generation.engine import prompt_cache_enabled

    slots = getattr(args, "prompt_cache_slots", 1)
    model.engine.prompt_cache = prompt_cache_enabled(default=True) and slots != 0
    model.engine.prompt_cache_slots = slots
    megabytes = getattr(args, "prompt_cache_mb", None)
    model.engine.prompt_cache_bytes = None if megabytes is None else int(megabytes * 2 ** 20)
    return model


def launch(demo, args: argparse.Namespace, **kwargs):
    """Queue (one generation at a time: the model is shared) and serve ``demo``."""
    demo.queue(default_concurrency_limit=1, api_open=True)
    if kwargs.get("prevent_thread_lock"):
        return demo.launch(server_name=args.host, server_port=args.port, share=args.share, **kwargs)
    try:  # blocks until Ctrl-C (gradio then closes the server) or SIGTERM (SystemExit: closed here)
        return demo.launch(server_name=args.host, server_port=args.port, share=args.share, **kwargs)
    finally:
        demo.close()
