"""``accessory serve`` / ``python -m accessory.serve``: load a model and serve the OpenAI API over it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ..data.conversation import conv_templates

EPILOG = """\
endpoints:
  GET  /v1/models                the one model served (its id: --model-name)
  POST /v1/chat/completions      messages -> the conversation template's prompt -> the answer
  POST /v1/completions           the raw prompt continued
  both take stream, max_tokens, temperature, top_p, top_k, min_p, seed, stop, presence_penalty,
  frequency_penalty, repetition_penalty, n, logprobs (top_logprobs). Requests that wait for the model
  together with equal sampling settings run as one batch (up to --max_batch rows). With --with_visual
  (a multimodal checkpoint) a chat's user messages may carry one picture, as OpenAI's vision API
  sends it: {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}.

examples:
  accessory serve                                          # the embedded SmolLM2 demo model on :8000
  accessory serve --pretrained_path /models/llama2-7b-chat --template default --port 8080
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'
"""


def build_parser() -> argparse.ArgumentParser:
    from ..demos.common import add_model_args
    from ..demos.common_mm import IMAGE_TRANSFORMS

    parser = argparse.ArgumentParser(
        prog="accessory serve", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Serve a model over an OpenAI-compatible HTTP API (chat and text completions, streaming).")
    add_model_args(parser, max_seq_len=2048)
    parser.set_defaults(port=8000)
    parser._option_string_actions["--port"].help = "port (default 8000)"
    parser.add_argument("--model-name", "--model_name", dest="model_name", default=None,
                        help="the model id clients send as 'model' (default: the checkpoint directory's name)")
    parser.add_argument("--template", default="auto",
                        help="conversation template for /v1/chat/completions: auto (from the tokenizer's chat "
                             f"template, as `accessory chat` picks it), or one of {', '.join(conv_templates)}")
    parser.add_argument("--max_batch", "--max-batch", dest="max_batch", type=int, default=16,
                        help="most rows (choices of waiting requests) generated together (default 16)")
    parser.add_argument("--prompt_cache_slots", "--prompt-cache-slots", dest="prompt_cache_slots", type=int,
                        default=4, help="conversations whose keys and values are kept for their next turn "
                                        "(default 4; 0 turns the prompt cache off)")
    parser.add_argument("--prompt_cache_mb", "--prompt-cache-mb", dest="prompt_cache_mb", type=float,
                        default=2048, help="memory the kept conversations may hold together, in MiB, the most "
                                           "recent one aside (default 2048; a 7B llama-2 in bf16 keeps 0.5 MiB "
                                           "a token)")
    parser.add_argument("--with_visual", "--with-visual", dest="with_visual", action="store_true",
                        help="load a multimodal checkpoint's visual branch: chat messages may then carry a "
                             "picture as an image_url part holding a data URL (data:image/png;base64,...)")
    parser.add_argument("--image_transform", "--image-transform", dest="image_transform",
                        choices=IMAGE_TRANSFORMS, default=IMAGE_TRANSFORMS[0],
                        help="how a picture is brought to the model's size (default padded_resize: the whole "
                             "picture, padded to a square)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.share:
        print("error: --share is a gradio option; `accessory serve` listens on --host/--port only", file=sys.stderr)
        return 2
    if args.max_batch < 1:
        print(f"error: --max_batch must be at least 1, got {args.max_batch}", file=sys.stderr)
        return 2
    from ..demos.common import prompt_cache_flag_error

    problem = prompt_cache_flag_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.template != "auto" and args.template not in conv_templates:
        print(f"error: unknown --template {args.template!r}; known: auto, {', '.join(conv_templates)}",
              file=sys.stderr)
        return 2

    import torch

    from ..cli import _chat_template_for
    from ..demos.common import checkpoint_dirs, load_chat_model
    from .api import OpenAIService
    from .server import OpenAIServer

    if args.threads:
        torch.set_num_threads(args.threads)
    args.pretrained_path = [str(p) for p in checkpoint_dirs(args.pretrained_path)]
    last = Path(args.pretrained_path[-1])
    template_name = _chat_template_for(last, args.template)
    model = load_chat_model(args, with_visual=args.with_visual)
    if args.with_visual and not model.takes_images:
        print(f"error: --with_visual, but llama_type {model.llama_type!r} takes no images; leave the flag out "
              f"for this checkpoint", file=sys.stderr)
        return 2
    name = args.model_name or last.resolve().name
    try:
        service = OpenAIService(model, name, template_name, max_batch=args.max_batch,
                                image_transform=args.image_transform)
        server = OpenAIServer(service, args.host, args.port, quiet=args.quiet)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}; pick another --port", file=sys.stderr)
        return 1
    print(f"Serving {name!r} ({template_name} chat template, context {model.args.max_seq_len}) at "
          f"{server.url}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
