"""Single-turn multimodal demo: a picture and one instruction (plus optional input) in, one answer out.

Run it as::

    python -m accessory.demos.single_turn_mm --pretrained_path /models/sphinx --image_transform padded_resize
    python accessory/demos/single_turn_mm.py --pretrained_path /models/sphinx --port 7860
    torchrun --nproc-per-node=2 accessory/demos/single_turn_mm.py --pretrained_path /models/sphinx

Under torchrun the model is cut over the N processes; rank 0 serves the page and the others follow
its requests (accessory/demos/parallel.py).

The page is the original's: "Image Input" on top, then the text demo's "Question", "Question Input
(Optional)", "System Prompt", sliders "Max Length", "Temperature", "Top p", a "Run" button and "Text
Out". The picture goes through ``get_transform(--image_transform, model.image_size)`` (the original
always used 224, which broke the 448/1024-pixel types) and the answer is
``model.generate([prompt], image, ...)[0].strip()``. Without a picture the question is asked alone.
A checkpoint whose llama_type takes no images is refused at start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file: make `import accessory` find this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accessory.demos.common import add_model_args, launch  # noqa: E402
from accessory.demos.common_mm import (IMAGE_TRANSFORMS, check_transform, image_tensor,  # noqa: E402
                                       load_multimodal_model, require_checkpoint)
from accessory.demos.single_turn import (DEFAULT_MAX_LENGTH, DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPERATURE,  # noqa: E402
                                         DEFAULT_TOP_P, SYSTEM_PROMPTS, build_prompt)
from accessory.demos.parallel import run_under_torchrun  # noqa: E402

DEFAULT_IMAGE_TRANSFORM = "resized_center_crop"  # the original single-turn demo's --image_transform


def answer(model, image, question: str, question_input: str = "", system_prompt: str = DEFAULT_SYSTEM_PROMPT,
           max_gen_len: int = DEFAULT_MAX_LENGTH, temperature: float = DEFAULT_TEMPERATURE,
           top_p: float = DEFAULT_TOP_P, image_transform: str = DEFAULT_IMAGE_TRANSFORM) -> str:
    """The demo's answer for a PIL ``image`` (or None): ``model.generate`` on the built prompt with
    the transformed image (no stop symbols), stripped."""
    prompt = build_prompt(question, question_input, system_prompt)
    pixels = image_tensor(model, image, check_transform(image_transform))
    return model.generate([prompt], pixels, max_gen_len=int(max_gen_len), temperature=float(temperature),
                          top_p=float(top_p))[0].strip()


def build_demo(model, image_transform: str = DEFAULT_IMAGE_TRANSFORM):
    """The gradio page (a ``gr.Blocks``), not yet launched. The "Run" button's API name is ``/run``
    (inputs: image, question, question input, system prompt, max length, temperature, top p)."""
    import gradio as gr

    check_transform(image_transform)

    def run(image, question, question_input, system_prompt, max_gen_len, temperature, top_p):
        return answer(model, image, question, question_input, system_prompt, max_gen_len, temperature, top_p,
                      image_transform)

    with gr.Blocks(title="LLaMA2-Accessory single-turn multimodal demo") as demo:
        gr.Markdown("## LLaMA2-Accessory: single-turn multimodal demo")
        with gr.Row(equal_height=True):
            with gr.Column():
                image = gr.Image(type="pil", label="Image Input")
                question = gr.Textbox(lines=4, label="Question")
                question_input = gr.Textbox(label="Question Input (Optional)")
                system_prompt = gr.Dropdown(choices=SYSTEM_PROMPTS, value=DEFAULT_SYSTEM_PROMPT,
                                            label="System Prompt")
                with gr.Row():
                    max_gen_len = gr.Slider(minimum=1, maximum=512, value=DEFAULT_MAX_LENGTH, step=1,
                                            interactive=True, label="Max Length")
                with gr.Row():
                    temperature = gr.Slider(minimum=0, maximum=1, value=DEFAULT_TEMPERATURE,
                                            interactive=True, label="Temperature")
                    top_p = gr.Slider(minimum=0, maximum=1, value=DEFAULT_TOP_P, interactive=True,
                                      label="Top p")
                run_button = gr.Button("Run", variant="primary")
            with gr.Column():
                text_out = gr.Textbox(lines=11, label="Text Out")
        run_button.click(run, inputs=[image, question, question_input, system_prompt, max_gen_len, temperature,
                                      top_p], outputs=[text_out], api_name="run")
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m accessory.demos.single_turn_mm", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, max_seq_len=4096)
    parser.add_argument("--image_transform", type=str, choices=IMAGE_TRANSFORMS, default=DEFAULT_IMAGE_TRANSFORM,
                        help=f"image preprocessing, at the model's image size (default {DEFAULT_IMAGE_TRANSFORM})")
    parser.add_argument("--dist_on_itp", action="store_true", help="accepted for compatibility; unused")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    require_checkpoint(args)
    run_under_torchrun(args, load_multimodal_model, serve)


def serve(model, args: argparse.Namespace) -> None:
    """Build the page for ``model`` and serve it (blocks until the server stops)."""
    launch(build_demo(model, args.image_transform), args)


if __name__ == "__main__":
    main()
