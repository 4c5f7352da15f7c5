"""Multi-turn text chat demo, streaming each answer into the chat window as it is generated.

Run it as::

    python -m accessory.demos.multi_turn                       # the embedded SmolLM2 demo model (ChatML)
    python accessory/demos/multi_turn.py --pretrained_path /models/llama2-7b-chat --n_gpus 1
    python accessory/demos/multi_turn.py --pretrained_path /models/llama2-13b-chat --n_gpus 2

With --n_gpus N > 1 the demo starts N-1 more processes and cuts the model over the N (one GPU each;
with --device cpu, or without CUDA, N processes on the CPU); this process serves the page and the
others follow its requests, Stop included (accessory/demos/parallel.py).

The page, top to bottom: the chat window, the message box, buttons "Submit", "Stop", "Undo", "Clear",
sliders "Single-turn max response length" (1..max_seq_len//2), "Temperature", "Top-p", and the
"Conversation Template" dropdown. The prompt is the conversation template's rendering of the whole
history (``default_conversation()``, the original's "###" format, unless the checkpoint's
tokenizer_config.json carries a ChatML chat template: then ``smollm2``/``chatml``, picked as
``accessory chat`` picks it). Generation stops at the template's ``response_end_signal``;
``stream_generate`` already holds back a partly written stop symbol, so nothing else is held back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

if not __package__:  # run as a file: make `import accessory` find this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accessory.cli import _chat_template_for  # noqa: E402
from accessory.data.conversation import conv_templates  # noqa: E402
from accessory.demos.common import (add_model_args, checkpoint_dirs, launch, load_chat_model,  # noqa: E402
                                    prompt_cache_flag_error)
from accessory.demos.parallel import check_process_count, run_with_spawned_followers  # noqa: E402

DEFAULT_TEMPERATURE = 0.1
DEFAULT_TOP_P = 0.75
#: The dropdown's choices: one name per distinct template (the original's aliases left out).
TEMPLATE_CHOICES = ["default", "chatml", "smollm2", "vicuna_v1_1", "llava_v1", "bair_v1", "multimodal"]

QA = List[Optional[str]]  # [question, answer or None]


def template_for_checkpoint(model_dir) -> str:
    """The conversation template for a checkpoint dir: ChatML ones for ChatML tokenizers, else "default"."""
    return _chat_template_for(Path(model_dir), "auto")


def build_conversation_prompt(qas: Sequence[Sequence[Optional[str]]], template_name: str = "default"
                              ) -> Tuple[str, str]:
    """(prompt, stop symbol) for a history of [question, answer] pairs whose last answer is None."""
    if template_name not in conv_templates:
        raise ValueError(f"unknown conversation template {template_name!r}; known: {', '.join(conv_templates)}")
    conversation = conv_templates[template_name]()
    conversation.load_qas([list(qa) for qa in qas])
    return conversation.get_prompt(), conversation.response_end_signal


def stream_reply(model, qas: Sequence[Sequence[Optional[str]]], template_name: str = "default",
                 max_gen_len: int = 512, temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P
                 ) -> Iterator[str]:
    """Yield the answer to the last question as it grows; the last item is the whole answer, stripped.

    It equals ``model.generate([prompt], ..., additional_stop_symbols=[stop])[0].strip()``.
    ``max_gen_len`` is in new tokens; ``temperature`` 0 means greedy.
    """
    prompt, stop = build_conversation_prompt(qas, template_name)
    for chunk in model.stream_generate(prompt, max_gen_len=int(max_gen_len), temperature=float(temperature),
                                       top_p=float(top_p), additional_stop_symbols=[stop]):
        yield chunk["text"].strip() if chunk["end_of_content"] else chunk["text"].lstrip()


# ---------------------------------------------------------------- the chat window's history (messages)

def _text(content) -> str:
    """A chat message's text, whether gradio gives it as a str or as a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return "" if content is None else str(content)


def messages_to_qas(messages: Sequence) -> List[QA]:
    """[{"role", "content"}, ...] (the Chatbot's value) as [[question, answer or None], ...]."""
    qas: List[QA] = []
    for message in messages or []:
        role = message["role"] if isinstance(message, dict) else message.role
        content = message["content"] if isinstance(message, dict) else message.content
        if role == "user":
            qas.append([_text(content), None])
        elif role == "assistant" and qas and qas[-1][1] is None:
            qas[-1][1] = _text(content)
    return qas


def show_user_input(message: str, messages: Optional[list]) -> Tuple[str, list]:
    """Clear the message box and put the question into the chat window."""
    return "", list(messages or []) + [{"role": "user", "content": message}]


def stream_model_output(model, messages: list, template_name: str, max_gen_len: int, temperature: float,
                        top_p: float) -> Iterator[list]:
    """Yield the chat window's messages with the answer to the last question growing at the end."""
    messages = list(messages or [])
    qas = messages_to_qas(messages)
    if not qas or qas[-1][1] is not None:
        yield messages
        return
    for text in stream_reply(model, qas, template_name, max_gen_len, temperature, top_p):
        yield messages + [{"role": "assistant", "content": text}]


def undo(messages: Optional[list]) -> list:
    """Drop the last question and its answer."""
    messages = list(messages or [])
    while messages and _role(messages[-1]) != "user":
        messages.pop()
    return messages[:-1]


def _role(message) -> str:
    return message["role"] if isinstance(message, dict) else message.role


def build_demo(model, template_name: str = "default", max_seq_len: Optional[int] = None):
    """The gradio chat page (a ``gr.Blocks``), not yet launched.

    ``template_name`` is the dropdown's starting value; ``max_seq_len`` (default: the model's) sets
    the response-length slider to 1..max_seq_len//2, starting at max_seq_len//2. API names:
    ``/show_user_input`` then ``/stream_model_output`` (the pair Enter and Submit run), ``/undo``.
    """
    import gradio as gr

    if max_seq_len is None:
        max_seq_len = int(model.args.max_seq_len)
    choices = TEMPLATE_CHOICES if template_name in TEMPLATE_CHOICES else TEMPLATE_CHOICES + [template_name]

    def respond(messages, template, max_gen_len, temperature, top_p):
        yield from stream_model_output(model, messages, template, max_gen_len, temperature, top_p)

    with gr.Blocks(title="LLaMA2-Accessory multi-turn demo") as demo:
        gr.Markdown("## LLaMA2-Accessory: multi-turn chat demo")
        chatbot = gr.Chatbot(label="Chat")
        msg = gr.Textbox(label="Message", placeholder="Type a message and press Enter")
        with gr.Row():
            submit_button = gr.Button("Submit", variant="primary")
            stop_button = gr.Button("Stop", variant="stop")
            undo_button = gr.Button("Undo")
            gr.ClearButton([chatbot, msg])
        with gr.Row():
            max_gen_len = gr.Slider(minimum=1, maximum=max_seq_len // 2, value=max_seq_len // 2, step=1,
                                    interactive=True, label="Single-turn max response length")
            temperature = gr.Slider(minimum=0, maximum=1, value=DEFAULT_TEMPERATURE, interactive=True,
                                    label="Temperature")
            top_p = gr.Slider(minimum=0, maximum=1, value=DEFAULT_TOP_P, interactive=True, label="Top-p")
        template = gr.Dropdown(choices=choices, value=template_name, label="Conversation Template")

        events = []
        for trigger, api_name in ((msg.submit, "show_user_input"), (submit_button.click, None)):
            shown = trigger(show_user_input, [msg, chatbot], [msg, chatbot], queue=False,
                            api_name=api_name if api_name else False)
            events.append(shown.then(respond, [chatbot, template, max_gen_len, temperature, top_p], [chatbot],
                                     api_name="stream_model_output" if api_name else False))
        stop_button.click(None, None, None, cancels=events, queue=False)
        undo_button.click(undo, [chatbot], [chatbot], queue=False, api_name="undo")
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m accessory.demos.multi_turn", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_chat_args(parser)
    return parser


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    """The multi-turn demos' flags (this demo and multi_turn_mm): model flags plus --n_gpus,
    --template, --master_port / --master_addr (where the --n_gpus processes meet) and the prompt
    cache's --prompt_cache_slots / --prompt_cache_mb."""
    add_model_args(parser, max_seq_len=2048)
    parser.add_argument("--n_gpus", type=int, default=1,
                        help="model-parallel processes, one GPU each (on the CPU: N processes sharing it); "
                             "default 1")
    parser.add_argument("--template", type=str, default="auto",
                        help="starting conversation template: auto (from the tokenizer's chat template), "
                             f"or one of {', '.join(conv_templates)}")
    parser.add_argument("--master_port", type=int, default=None,
                        help="port where the --n_gpus processes meet (default: a free one)")
    parser.add_argument("--master_addr", type=str, default="127.0.0.1",
                        help="address where the --n_gpus processes meet (default 127.0.0.1)")
    parser.add_argument("--prompt_cache_slots", type=int, default=4,
                        help="conversations (browser sessions) whose keys and values are kept for their next "
                             "turn (default 4; 0 turns the prompt cache off)")
    parser.add_argument("--prompt_cache_mb", type=float, default=2048,
                        help="memory the kept conversations may hold together, in MiB, the most recent one "
                             "aside (default 2048)")


def check_chat_args(args: argparse.Namespace) -> None:
    """Exit with the reason when --n_gpus, --template or a prompt cache flag cannot be served."""
    check_process_count(args.n_gpus, "--n_gpus")
    if args.template != "auto" and args.template not in conv_templates:
        sys.exit(f"error: unknown --template {args.template!r}; known: auto, {', '.join(conv_templates)}")
    problem = prompt_cache_flag_error(args)
    if problem:
        sys.exit(f"error: {problem}")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    check_chat_args(args)
    args.pretrained_path = [str(p) for p in checkpoint_dirs(args.pretrained_path)]
    template_name = _chat_template_for(Path(args.pretrained_path[-1]), args.template)
    run_with_spawned_followers(args, args.n_gpus, load_chat_model,
                               lambda model, args: launch(build_demo(model, template_name, args.max_seq_len), args))


if __name__ == "__main__":
    main()
