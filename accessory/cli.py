"""The ``accessory`` command: chat in the terminal, generate from prompt files, serve demos, convert.

Examples::

    accessory chat                                  # the embedded SmolLM2-135M-Instruct demo model
    accessory chat /path/to/checkpoint --template default
    accessory chat --prompt "What is the capital of France?"
    accessory generate --file prompts.txt --batch-size 8 > answers.jsonl
    accessory demo                                  # the multi-turn gradio demo on the embedded model
    accessory serve --port 8000                     # an OpenAI-compatible API on the embedded model
    accessory convert --from gguf model.gguf /path/to/out --dtype bf16
    accessory convert --from hf /path/to/Llama-2-7b-hf /path/to/out --mp 2
    accessory convert --to hf /path/to/accessory-checkpoint /path/to/hf-out
    accessory convert --to gguf /path/to/accessory-checkpoint model.Q8_0.gguf --type q8_0
    accessory quantize /path/to/checkpoint /path/to/out-int4 --quant int4
    accessory chat /path/to/checkpoint --quant int8
    accessory chat /path/to/sphinx-checkpoint --image cat.jpg
    accessory download --model_name alpaca --model_size 7B --down_config --output_path ./ckpts
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from .checkpoint import delta, reshard
from .quant import cli as quant_cli
from .tools import download


def _chat_template_for(model_dir: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        chat_template = json.loads(config_file.read_text()).get("chat_template") or ""
        if "<|im_start|>" in str(chat_template):
            return "smollm2" if "SmolLM" in str(chat_template) else "chatml"
    return "default"


#: Lines that end `accessory chat` (besides an empty line and Ctrl-D).
CHAT_EXIT_COMMANDS = ("/exit", "/quit", "/bye")


def load_picture(model, path: str, transform: str):
    """(3, S, S) pixels of the picture at ``path`` for ``model`` (``get_transform(transform, S)``);
    raises ValueError with what is wrong (no such file, not a picture, a model without images)."""
    from PIL import Image, UnidentifiedImageError

    from .demos.common_mm import image_tensor
    if not model.takes_images:
        raise ValueError(f"llama_type {model.llama_type!r} takes no images; leave --image out for this checkpoint")
    try:
        with Image.open(path) as image:
            picture = image.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"no picture at {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not a picture PIL can read ({exc})") from None
    return image_tensor(model, picture, transform)[0]


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from .data.conversation import conv_templates
    from .errors import AccessoryError
    from .generation.engine import prompt_cache_enabled
    from .model.meta import MetaModel

    if args.path is None:
        from .checkpoint.demo_model import ensure_demo_model
        model_dir = ensure_demo_model()
    else:
        model_dir = Path(args.path)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = MetaModel.from_pretrained(str(model_dir), max_seq_len=args.max_seq_len, dtype=args.dtype,
                                          device=args.device, quant=args.quant, with_visual=args.image is not None)
    except AccessoryError as exc:
        print(f"error: cannot load {model_dir}: {exc}", file=sys.stderr)
        return 1
    picture = None
    if args.image is not None:
        try:
            picture = load_picture(model, args.image, args.image_transform)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    # each turn's prompt is the last one plus its answer: prefill only the new part (generation/engine.py),
    # the picture's positions included
    model.engine.prompt_cache = prompt_cache_enabled(default=True)
    template_name = _chat_template_for(model_dir, args.template)
    if template_name not in conv_templates:
        print(f"unknown template {template_name!r}; known: {', '.join(conv_templates)}", file=sys.stderr)
        return 2
    history: List[List[Optional[str]]] = []
    interactive = args.prompt is None and sys.stdin.isatty()

    def answer(question: str) -> str:
        conversation = conv_templates[template_name]()
        conversation.load_qas(history + [[question, None]])
        stop = conversation.response_end_signal
        printed = ""
        for chunk in model.stream_generate(conversation.get_prompt(), picture, max_gen_len=args.max_gen_len,
                                           temperature=args.temperature, top_p=args.top_p,
                                           additional_stop_symbols=[stop]):
            text = chunk["text"]
            if chunk["end_of_content"]:
                text = text.rstrip()
            if text.startswith(printed):
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
        sys.stdout.write("\n")
        return printed.strip()

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    if interactive:
        about = f" about {args.image}" if args.image is not None else ""
        change = "; /image PATH talks about another picture" if args.image is not None else ""
        print(f"Chatting with {model_dir} ({template_name} template){about}. /exit, an empty line or Ctrl-D "
              f"quits; /reset clears the history{change}.", flush=True)
    while True:
        try:
            question = input(">>> " if interactive else "")
        except EOFError:
            break
        question = question.strip()
        if not question:
            if interactive:
                break
            continue
        if question in CHAT_EXIT_COMMANDS:
            break
        if question == "/reset":
            history.clear()
            continue
        if question.startswith("/image"):
            path = question[len("/image"):].strip()
            if args.image is None or not path:
                print("/image PATH needs a chat started with --image (which loads the visual branch)"
                      if args.image is None else "usage: /image PATH", file=sys.stderr, flush=True)
                continue
            try:
                picture = load_picture(model, path, args.image_transform)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                continue
            history.clear()  # a new picture, a new conversation (as the multimodal demo does)
            continue
        reply = answer(question)
        history.append([question, reply])
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .tools import dtype_option, run_writer
    if (args.source_format is None) == (args.target_format is None):
        print("give exactly one of --from (gguf, hf: into the Accessory layout) or --to (hf, gguf: out of it)",
              file=sys.stderr)
        return 2
    if args.gguf_type is not None and args.target_format != "gguf":
        print("--type applies to --to gguf only", file=sys.stderr)
        return 2
    dtype = dtype_option(args.dtype)
    if args.source_format == "gguf":
        from .checkpoint.gguf import convert_gguf
        return run_writer(lambda: convert_gguf(args.src, args.dst, dtype=dtype or torch.bfloat16))
    if args.source_format == "hf":
        from .checkpoint.hf import hf_to_accessory
        return run_writer(lambda: hf_to_accessory(args.src, args.dst, dtype=dtype, mp=args.mp))
    if args.target_format == "hf":
        from .checkpoint.hf import accessory_to_hf
        return run_writer(lambda: accessory_to_hf(args.src, args.dst, dtype=dtype))
    if args.target_format == "gguf":
        from .checkpoint.gguf_export import export_gguf
        if args.dtype is not None:
            print("--dtype does not apply to --to gguf; pick the weight type with --type", file=sys.stderr)
            return 2
        return run_writer(lambda: export_gguf(args.src, args.dst, out_type=args.gguf_type or "f16"), notes=True)
    print(f"conversion from {args.source_format!r} is not supported", file=sys.stderr)
    return 2


# ------------------------------------------------------------------ generate: prompts in, JSON lines out

#: --template choices of ``accessory generate``: none = the prompt as given, alpaca = the seed's
#: instruction format, chatml / default = one conversation turn (stops at the template's end signal),
#: auto = what ``accessory chat`` would pick for the checkpoint.
GENERATE_TEMPLATES = ("none", "alpaca", "chatml", "default", "auto")


def read_prompts(path: Path) -> List[dict]:
    """Prompts from a file, as ``{"prompt": str, ...}`` records in file order.

    ``.jsonl``: one JSON object per line with a "prompt" key (other keys, e.g. "id", are carried
    into the output; "image", a picture's path relative to the file, is what the prompt is about),
    or a bare JSON string. Anything else: one prompt per non-empty line.
    """
    records: List[dict] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix.lower() != ".jsonl":
            records.append({"prompt": line})
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg}); expected "
                             '{"prompt": "..."} or a JSON string') from None
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f'{path}:{number}: expected {{"prompt": "..."}} or a JSON string, found {line[:80]!r}')
        if "image" in item:
            if not isinstance(item["image"], str):
                raise ValueError(f'{path}:{number}: "image" must be a picture\'s path, found {item["image"]!r}')
            item["image"] = str(path.parent / item["image"])  # (relative to the prompt file)
        records.append(item)
    return records


def templated_prompt(prompt: str, template_name: str) -> Tuple[str, List[str]]:
    """(the text the model sees, stop symbols) for one prompt under a resolved template name."""
    if template_name == "none":
        return prompt, []
    if template_name == "alpaca":
        from .data.system_prompt import format_prompt
        return format_prompt({"instruction": prompt, "input": ""}, "alpaca"), []
    from .data.conversation import conv_templates
    if template_name not in conv_templates:
        raise ValueError(f"unknown template {template_name!r}; known: {', '.join(GENERATE_TEMPLATES)}, "
                         f"{', '.join(conv_templates)}")
    conversation = conv_templates[template_name]()
    conversation.load_qas([[prompt, None]])
    return conversation.get_prompt(), [conversation.response_end_signal]


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .errors import AccessoryError
    from .model.meta import MetaModel

    if args.batch_size < 1:
        print(f"--batch-size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        records = ([{"prompt": args.prompt}] if args.prompt is not None else read_prompts(Path(args.file)))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.path is None:
        from .checkpoint.demo_model import ensure_demo_model
        model_dir = ensure_demo_model()
    else:
        model_dir = Path(args.path)
    template_name = _chat_template_for(model_dir, args.template)
    try:
        rendered = [templated_prompt(record["prompt"], template_name) for record in records]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    image_paths = [record.get("image", args.image) for record in records]  # (a .jsonl record's own "image" first)
    try:
        model = MetaModel.from_pretrained(str(model_dir), max_seq_len=args.max_seq_len, dtype=args.dtype,
                                          device=args.device, quant=args.quant,
                                          with_visual=any(path is not None for path in image_paths))
    except AccessoryError as exc:
        print(f"error: cannot load {model_dir}: {exc}", file=sys.stderr)
        return 1
    pictures = {}
    try:
        for path in image_paths:
            if path is not None and path not in pictures:
                pictures[path] = load_picture(model, path, args.image_transform)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop_symbols = rendered[0][1] if rendered else []  # one template, so the same for every prompt
    for start in range(0, len(records), args.batch_size):
        chunk = range(start, min(start + args.batch_size, len(records)))
        images = None
        if any(image_paths[i] is not None for i in chunk):  # (None for the prompts without one)
            images = [None if image_paths[i] is None else pictures[image_paths[i]] for i in chunk]
        outputs = model.generate([rendered[i][0] for i in chunk], images, max_gen_len=args.max_gen_len,
                                 temperature=args.temperature, top_p=args.top_p,
                                 additional_stop_symbols=stop_symbols, top_k=args.top_k, min_p=args.min_p,
                                 seed=args.seed, repetition_penalty=args.repetition_penalty,
                                 return_logprobs=args.logprobs, top_logprobs=args.top_logprobs)
        for i, output in zip(chunk, outputs):
            line = dict(records[i])
            if isinstance(output, dict):
                line.update(text=output["text"], tokens=output["tokens"], logprobs=output["logprobs"])
                if args.top_logprobs:
                    line["top_logprobs"] = [[list(pair) for pair in step] for step in output["top_logprobs"]]
            else:
                line["text"] = output
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    return 0


def _add_generate_parser(sub) -> None:
    generate = sub.add_parser(
        "generate", help="complete one prompt or a file of prompts, JSON lines out",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Complete prompts with MetaModel.generate and print one JSON line per prompt, in order: "
                    '{"prompt", "text"} (plus "tokens" and "logprobs", nats, with --logprobs). Prompts go '
                    "through the model --batch-size at a time. Temperature 0 (the default) is greedy.",
        epilog="examples:\n"
               "  accessory generate --prompt 'The capital of France is'\n"
               "  accessory generate /models/llama2-7b --file prompts.txt --batch-size 8 > answers.jsonl\n"
               "  accessory generate --file prompts.jsonl --template auto --temperature 0.7 --seed 1\n"
               "  accessory generate --prompt 'Name three fruits.' --template alpaca --logprobs\n"
               "  accessory generate /models/sphinx --prompt 'Describe the picture.' --image cat.jpg\n"
               'prompt files: .txt = one prompt per line; .jsonl = {"prompt": "...", ...} per line '
               '(other keys are copied to the output; "image": a picture\'s path, relative to the file)')
    generate.add_argument("path", nargs="?", help="checkpoint directory (default: the embedded SmolLM2 demo model)")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--file", help="a file of prompts: .txt (one per line) or .jsonl")
    generate.add_argument("--template", default="none",
                          help="none (the prompt as given, default), alpaca, chatml, default (the seed's '###' "
                               "conversation), auto (as `accessory chat` picks it), or any conversation template")
    generate.add_argument("--max-gen-len", type=int, default=256, help="new tokens per prompt (default 256)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--top-k", type=int, default=0, help="0 = off")
    generate.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    generate.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    generate.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    generate.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (default 1)")
    generate.add_argument("--logprobs", action="store_true", help="add the token ids and their log-probabilities")
    generate.add_argument("--top-logprobs", type=int, default=0,
                          help="also the k most likely (token id, logprob) pairs of each step")
    generate.add_argument("--max-seq-len", type=int, default=2048)
    generate.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    generate.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    generate.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    _add_image_flags(generate, "every prompt is about this picture (a .jsonl record's \"image\" path overrides "
                               "it); loads a multimodal checkpoint's visual branch")
    quant_cli.add_quant_flag(generate)
    generate.set_defaults(func=cmd_generate)


# ------------------------------------------------------------------ demo: the gradio pages

#: ``accessory demo NAME`` -> the module whose ``main(argv)`` serves it.
DEMOS = {"single_turn": "accessory.demos.single_turn", "multi_turn": "accessory.demos.multi_turn",
         "single_turn_mm": "accessory.demos.single_turn_mm", "multi_turn_mm": "accessory.demos.multi_turn_mm"}

DEMO_HELP = """\
usage: accessory demo [single_turn|multi_turn|single_turn_mm|multi_turn_mm] [demo flags...]

Serve a gradio demo in the browser. With no name it starts the multi-turn chat demo; with no
--pretrained_path it uses the embedded SmolLM2-135M-Instruct demo model (built on first use).
Everything after the name goes to the demo: `accessory demo multi_turn --help` lists its flags
(--pretrained_path, --llama_type, --llama_config, --tokenizer_path, --dtype, --max_seq_len,
--quant, --host, --port, --share, ...). The multi-turn demos take --n_gpus N: the model cut over N
processes (one GPU each; on the CPU, N processes); the single-turn ones run under torchrun for that.

demos:
  single_turn   one instruction (plus optional input) in, one answer out (alpaca prompt)
  multi_turn    chat with history, answers streamed token by token (default)
  single_turn_mm / multi_turn_mm   the same with an image (a multimodal checkpoint, with_visual)

examples:
  accessory demo
  accessory demo multi_turn --pretrained_path /models/llama2-7b-chat --port 7860
  accessory demo single_turn --pretrained_path /models/llama2-7b --dtype fp16
  accessory demo --port 8000 --host 0.0.0.0
  accessory demo multi_turn --pretrained_path /models/llama2-13b-chat --n_gpus 2
  accessory demo multi_turn_mm --pretrained_path /models/sphinx-tiny
"""


def cmd_demo(args: argparse.Namespace) -> int:
    import importlib

    rest = list(args.demo_args)
    if rest and rest[0] in ("-h", "--help"):
        sys.stdout.write(DEMO_HELP)
        return 0
    name = "multi_turn"
    if rest and not rest[0].startswith("-"):
        name = rest.pop(0)
    if name not in DEMOS:
        print(f"unknown demo {name!r}; one of: {', '.join(DEMOS)} (see `accessory demo --help`)", file=sys.stderr)
        return 2
    module = importlib.import_module(DEMOS[name])
    module.main(rest)
    return 0


def _add_demo_parser(sub) -> None:
    # "+" as the only prefix: every flag after `demo` is passed through to the demo untouched.
    demo = sub.add_parser("demo", help="serve a gradio demo (multi-turn chat by default)", add_help=False,
                          prefix_chars="+", usage="accessory demo [single_turn|multi_turn] [demo flags...]")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.cli import main as serve_main
    return serve_main(list(args.serve_args))


def _add_serve_parser(sub) -> None:
    # like `demo`: every flag after `serve` goes to accessory.serve's own parser (`accessory serve --help`)
    serve = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (chat/completions)", add_help=False,
                           prefix_chars="+", usage="accessory serve [--pretrained_path DIR] [--port 8000] [...]")
    serve.add_argument("serve_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)


def _add_image_flags(parser: argparse.ArgumentParser, image_help: str) -> None:
    from .demos.common_mm import IMAGE_TRANSFORMS

    parser.add_argument("--image", default=None, metavar="PATH", help=image_help)
    parser.add_argument("--image-transform", default=IMAGE_TRANSFORMS[0], choices=IMAGE_TRANSFORMS,
                        help="how the picture is brought to the model's size (default padded_resize: the whole "
                             "picture, padded to a square)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accessory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser(
        "chat", help="chat with a model in the terminal",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Chat with a model in the terminal, streaming its answers. /exit, an empty line or "
                    "Ctrl-D quits; /reset clears the history; with --image, /image PATH changes the picture "
                    "(and starts a new conversation).",
        epilog="examples:\n  accessory chat\n  accessory chat /models/llama2-7b-chat --template default\n"
               "  accessory chat --prompt 'Name three fruits.'\n  echo 'Hi' | accessory chat\n"
               "  accessory chat /models/sphinx --image cat.jpg")
    chat.add_argument("path", nargs="?", help="checkpoint directory (default: the embedded SmolLM2 demo model)")
    chat.add_argument("--prompt", help="ask one question, print the answer and exit")
    chat.add_argument("--template", default="auto",
                      help="conversation template: auto (from the tokenizer's chat template), default "
                           "(the seed's '###' format), chatml, smollm2, ...")
    chat.add_argument("--max-seq-len", type=int, default=2048)
    chat.add_argument("--max-gen-len", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-p", type=float, default=0.95)
    chat.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    chat.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    chat.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    _add_image_flags(chat, "talk about this picture (loads a multimodal checkpoint's visual branch; /image PATH "
                           "changes it)")
    quant_cli.add_quant_flag(chat)
    chat.set_defaults(func=cmd_chat)

    convert = sub.add_parser(
        "convert", help="convert a checkpoint into (or out of) the Accessory layout, or write it as GGUF",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a model into an Accessory checkpoint directory (consolidated.NN-of-MM.model.pth, "
                    "config.json, meta.json, tokenizer files) with --from, or an Accessory `llama`, `mixtral` or "
                    "`falcon` checkpoint (meta.json's llama_type) into an HF LlamaForCausalLM / "
                    "MixtralForCausalLM / FalconForCausalLM directory with --to hf, or an Accessory `llama` "
                    "checkpoint into one llama.cpp GGUF file with --to gguf (--type f16, bf16, f32, q8_0 or q4_0; "
                    "norms stay F32, q4_0 keeps the output head Q8_0). With --from hf the "
                    "architecture is read from config.json's model_type (llama, mixtral, falcon).",
        epilog="examples:\n"
               "  accessory convert --from gguf SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2 --dtype bf16\n"
               "  accessory convert --from hf ./Llama-2-7b-hf ./llama2-7b-accessory\n"
               "  accessory convert --from hf ./Llama-2-13b-hf ./llama2-13b-mp2 --mp 2 --dtype bf16\n"
               "  accessory convert --from hf ./Mixtral-8x7B-v0.1 ./mixtral-mp2 --mp 2 --dtype bf16\n"
               "  accessory convert --to hf ./llama2-7b-accessory ./Llama-2-7b-hf-again\n"
               "  accessory convert --to gguf ./llama2-7b-accessory ./llama2-7b.Q8_0.gguf --type q8_0")
    convert.add_argument("--from", dest="source_format", choices=["gguf", "hf"],
                         help="source format: gguf (a Llama GGUF file) or hf (an HF Llama/Mixtral/Falcon ForCausalLM "
                              "directory with safetensors)")
    convert.add_argument("--to", dest="target_format", choices=["hf", "gguf"],
                         help="target format for an Accessory checkpoint directory: hf (llama / mixtral / falcon) "
                              "or gguf (llama)")
    convert.add_argument("src", help="source file or directory")
    convert.add_argument("dst", help="output directory (a .gguf file with --to gguf)")
    convert.add_argument("--type", dest="gguf_type", default=None, choices=["f16", "bf16", "f32", "q8_0", "q4_0"],
                         help="with --to gguf: type of the weight matrices (default f16)")
    convert.add_argument("--dtype", default=None,
                         help="weight dtype to write: bf16, fp16 or fp32 (default: bf16 for gguf, the "
                              "stored dtype otherwise)")
    convert.add_argument("--mp", type=int, default=1,
                         help="model-parallel shards to write with --from hf (default 1)")
    convert.set_defaults(func=cmd_convert)
    _add_generate_parser(sub)
    _add_demo_parser(sub)
    _add_serve_parser(sub)
    reshard.add_parser(sub)
    delta.add_parser(sub)
    quant_cli.add_parser(sub)
    download.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
