"""Multi-turn multimodal chat demo: a picture and a conversation about it, answers streamed.

Run it as::

    python -m accessory.demos.multi_turn_mm --pretrained_path /models/sphinx
    python accessory/demos/multi_turn_mm.py --pretrained_path /models/sphinx --n_gpus 2 --port 7860

The page, top to bottom: "Image Input", the chat window, the message box, buttons "Submit", "Stop",
"Undo", "Clear" (chat, message and picture), sliders "Single-turn max response length"
(1..max_seq_len//2), "Temperature", "Top-p", and the "Image Transform" (padded_resize /
resized_center_crop, at the model's image size) and "Conversation Template" dropdowns. Changing the
picture clears the chat, as in the original. Every turn sends the whole conversation (the text
demo's template) with the picture to ``model.stream_generate``. A checkpoint whose llama_type takes
no images is refused at start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

if not __package__:  # run as a file: make `import accessory` find this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accessory.cli import _chat_template_for  # noqa: E402
from accessory.demos.common import checkpoint_dirs, launch  # noqa: E402
from accessory.demos.common_mm import (IMAGE_TRANSFORMS, check_transform, image_tensor,  # noqa: E402
                                       load_multimodal_chat_model, require_checkpoint)
from accessory.demos.multi_turn import (DEFAULT_TEMPERATURE, DEFAULT_TOP_P, TEMPLATE_CHOICES,  # noqa: E402
                                        add_chat_args, build_conversation_prompt, check_chat_args,
                                        messages_to_qas, show_user_input, undo)
from accessory.demos.parallel import run_with_spawned_followers  # noqa: E402

__all__ = ["stream_reply", "stream_model_output", "show_user_input", "undo", "build_demo", "main"]

DEFAULT_IMAGE_TRANSFORM = IMAGE_TRANSFORMS[0]  # padded_resize, the original multi-turn demo's default


def stream_reply(model, image, qas: Sequence[Sequence[Optional[str]]], template_name: str = "default",
                 max_gen_len: int = 512, temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                 image_transform: str = DEFAULT_IMAGE_TRANSFORM) -> Iterator[str]:
    """Yield the answer to the last question about the PIL ``image`` (or None) as it grows; the
    last item is the whole answer, stripped. It equals ``model.generate([prompt], pixels, ...,
    additional_stop_symbols=[stop])[0].strip()``."""
    prompt, stop = build_conversation_prompt(qas, template_name)
    pixels = image_tensor(model, image, check_transform(image_transform))
    for chunk in model.stream_generate(prompt, pixels, max_gen_len=int(max_gen_len), temperature=float(temperature),
                                       top_p=float(top_p), additional_stop_symbols=[stop]):
        yield chunk["text"].strip() if chunk["end_of_content"] else chunk["text"].lstrip()


def stream_model_output(model, image, messages: list, image_transform: str, template_name: str, max_gen_len: int,
                        temperature: float, top_p: float) -> Iterator[list]:
    """Yield the chat window's messages with the answer to the last question growing at the end."""
    messages = list(messages or [])
    qas = messages_to_qas(messages)
    if not qas or qas[-1][1] is not None:
        yield messages
        return
    for text in stream_reply(model, image, qas, template_name, max_gen_len, temperature, top_p, image_transform):
        yield messages + [{"role": "assistant", "content": text}]


def build_demo(model, template_name: str = "default", max_seq_len: Optional[int] = None):
    """The gradio chat page (a ``gr.Blocks``), not yet launched. API names: ``/show_user_input``
    (message, history) then ``/stream_model_output`` (image, history, image transform, template,
    max length, temperature, top-p), and ``/undo``."""
    import gradio as gr

    if max_seq_len is None:
        max_seq_len = int(model.args.max_seq_len)
    choices = TEMPLATE_CHOICES if template_name in TEMPLATE_CHOICES else TEMPLATE_CHOICES + [template_name]

    def respond(image, messages, transform, template, max_gen_len, temperature, top_p):
        yield from stream_model_output(model, image, messages, transform, template, max_gen_len, temperature, top_p)

    with gr.Blocks(title="LLaMA2-Accessory multi-turn multimodal demo") as demo:
        gr.Markdown("## LLaMA2-Accessory: multi-turn multimodal chat demo")
        image = gr.Image(type="pil", label="Image Input")
        chatbot = gr.Chatbot(label="Chat")
        msg = gr.Textbox(label="Message", placeholder="Ask about the picture and press Enter")
        with gr.Row():
            submit_button = gr.Button("Submit", variant="primary")
            stop_button = gr.Button("Stop", variant="stop")
            undo_button = gr.Button("Undo")
            gr.ClearButton([chatbot, msg, image])
        with gr.Row():
            max_gen_len = gr.Slider(minimum=1, maximum=max_seq_len // 2, value=max_seq_len // 2, step=1,
                                    interactive=True, label="Single-turn max response length")
            temperature = gr.Slider(minimum=0, maximum=1, value=DEFAULT_TEMPERATURE, interactive=True,
                                    label="Temperature")
            top_p = gr.Slider(minimum=0, maximum=1, value=DEFAULT_TOP_P, interactive=True, label="Top-p")
        with gr.Row():
            transform = gr.Dropdown(choices=IMAGE_TRANSFORMS, value=DEFAULT_IMAGE_TRANSFORM, label="Image Transform")
            template = gr.Dropdown(choices=choices, value=template_name, label="Conversation Template")

        events = []
        for trigger, api_name in ((msg.submit, "show_user_input"), (submit_button.click, None)):
            shown = trigger(show_user_input, [msg, chatbot], [msg, chatbot], queue=False,
                            api_name=api_name if api_name else False)
            events.append(shown.then(respond, [image, chatbot, transform, template, max_gen_len, temperature, top_p],
                                     [chatbot], api_name="stream_model_output" if api_name else False))
        stop_button.click(None, None, None, cancels=events, queue=False)
        undo_button.click(undo, [chatbot], [chatbot], queue=False, api_name="undo")
        image.change(lambda: [], None, [chatbot], queue=False, api_name=False)  # a new picture, a new chat
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m accessory.demos.multi_turn_mm", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_chat_args(parser)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    check_chat_args(args)
    require_checkpoint(args)
    args.pretrained_path = [str(p) for p in checkpoint_dirs(args.pretrained_path)]
    template_name = _chat_template_for(Path(args.pretrained_path[-1]), args.template)
    run_with_spawned_followers(args, args.n_gpus, load_multimodal_chat_model,
                               lambda model, args: launch(build_demo(model, template_name, args.max_seq_len), args))


if __name__ == "__main__":
    main()
