"""The ``accessory`` command: chat with a model in the terminal, convert checkpoints.

Examples::

    accessory chat                                  # the embedded SmolLM2-135M-Instruct demo model
    accessory chat /path/to/checkpoint --template default
    accessory chat --prompt "What is the capital of France?"
    accessory convert --from gguf model.gguf /path/to/out --dtype bf16
    accessory convert --from hf /path/to/Llama-2-7b-hf /path/to/out --mp 2
    accessory convert --to hf /path/to/accessory-checkpoint /path/to/hf-out
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def _chat_template_for(model_dir: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        chat_template = json.loads(config_file.read_text()).get("chat_template") or ""
        if "<|im_start|>" in str(chat_template):
            return "smollm2" if "SmolLM" in str(chat_template) else "chatml"
    return "default"


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from .data.conversation import conv_templates
    from .model.meta import MetaModel

    if args.path is None:
        from .checkpoint.demo_model import ensure_demo_model
        model_dir = ensure_demo_model()
    else:
        model_dir = Path(args.path)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = MetaModel.from_pretrained(str(model_dir), max_seq_len=args.max_seq_len, dtype=args.dtype,
                                      device=args.device)
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
        for chunk in model.stream_generate(conversation.get_prompt(), max_gen_len=args.max_gen_len,
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
        print(f"Chatting with {model_dir} ({template_name} template). Empty line or Ctrl-D quits; "
              f"/reset clears the history.")
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
        if question == "/reset":
            history.clear()
            continue
        reply = answer(question)
        history.append([question, reply])
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .errors import AccessoryError
    from .model.meta import resolve_dtype
    if (args.source_format is None) == (args.target_format is None):
        print("give exactly one of --from (gguf, hf: into the Accessory layout) or --to (hf: out of it)",
              file=sys.stderr)
        return 2
    dtype = None if args.dtype in (None, "keep") else resolve_dtype(args.dtype)
    try:
        if args.source_format == "gguf":
            from .checkpoint.gguf import convert_gguf
            out = convert_gguf(args.src, args.dst, dtype=dtype or torch.bfloat16)
        elif args.source_format == "hf":
            from .checkpoint.hf import hf_to_accessory
            out = hf_to_accessory(args.src, args.dst, dtype=dtype, mp=args.mp)
        elif args.target_format == "hf":
            from .checkpoint.hf import accessory_to_hf
            out = accessory_to_hf(args.src, args.dst, dtype=dtype)
        else:
            print(f"conversion from {args.source_format!r} is not supported", file=sys.stderr)
            return 2
    except AccessoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accessory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser(
        "chat", help="chat with a model in the terminal",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Chat with a model in the terminal, streaming its answers.",
        epilog="examples:\n  accessory chat\n  accessory chat /models/llama2-7b-chat --template default\n"
               "  accessory chat --prompt 'Name three fruits.'\n  echo 'Hi' | accessory chat")
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
    chat.set_defaults(func=cmd_chat)

    convert = sub.add_parser(
        "convert", help="convert a checkpoint into (or out of) the Accessory layout",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a model into an Accessory checkpoint directory (consolidated.NN-of-MM.model.pth, "
                    "config.json, meta.json, tokenizer files) with --from, or an Accessory `llama`, `mixtral` or "
                    "`falcon` checkpoint (meta.json's llama_type) into an HF LlamaForCausalLM / "
                    "MixtralForCausalLM / FalconForCausalLM directory with --to hf. With --from hf the "
                    "architecture is read from config.json's model_type (llama, mixtral, falcon).",
        epilog="examples:\n"
               "  accessory convert --from gguf SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2 --dtype bf16\n"
               "  accessory convert --from hf ./Llama-2-7b-hf ./llama2-7b-accessory\n"
               "  accessory convert --from hf ./Llama-2-13b-hf ./llama2-13b-mp2 --mp 2 --dtype bf16\n"
               "  accessory convert --from hf ./Mixtral-8x7B-v0.1 ./mixtral-mp2 --mp 2 --dtype bf16\n"
               "  accessory convert --to hf ./llama2-7b-accessory ./Llama-2-7b-hf-again")
    convert.add_argument("--from", dest="source_format", choices=["gguf", "hf"],
                         help="source format: gguf (a Llama GGUF file) or hf (an HF Llama/Mixtral/Falcon ForCausalLM "
                              "directory with safetensors)")
    convert.add_argument("--to", dest="target_format", choices=["hf"],
                         help="target format for an Accessory llama / mixtral / falcon checkpoint directory: hf")
    convert.add_argument("src", help="source file or directory")
    convert.add_argument("dst", help="output directory")
    convert.add_argument("--dtype", default=None,
                         help="weight dtype to write: bf16, fp16 or fp32 (default: bf16 for gguf, the "
                              "stored dtype otherwise)")
    convert.add_argument("--mp", type=int, default=1,
                         help="model-parallel shards to write with --from hf (default 1)")
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
