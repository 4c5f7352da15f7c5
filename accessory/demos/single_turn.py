"""Single-turn text demo: one instruction (plus optional input) in, one answer out.

Run it as::

    python -m accessory.demos.single_turn                      # the embedded SmolLM2 demo model
    python accessory/demos/single_turn.py --pretrained_path /models/llama2-7b --dtype bf16 --port 7860
    torchrun --nproc-per-node=2 accessory/demos/single_turn.py --pretrained_path /models/llama2-13b

Under torchrun the model is cut over the N processes (one GPU each, or N processes on the CPU);
rank 0 serves the page and the others follow its requests (accessory/demos/parallel.py).

The page, top to bottom, is the original's: "Question", "Question Input (Optional)", "System Prompt"
(alpaca / None / chatml), sliders "Max Length", "Temperature", "Top p", a "Run" button and "Text Out".
The prompt is ``format_prompt({"instruction", "input"}, system_prompt)``; the answer is
``model.generate([prompt], ...)[0].strip()``, exactly as the original did.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file: make `import accessory` find this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accessory.data.system_prompt import format_prompt  # noqa: E402
from accessory.demos.common import add_model_args, launch, load_model  # noqa: E402
from accessory.demos.parallel import run_under_torchrun  # noqa: E402

#: The "System Prompt" dropdown: the original's two, plus chatml for chat-tuned models.
SYSTEM_PROMPTS = ["alpaca", "None", "chatml"]
DEFAULT_SYSTEM_PROMPT = "alpaca"
DEFAULT_MAX_LENGTH = 128    # new tokens
DEFAULT_TEMPERATURE = 0.1
DEFAULT_TOP_P = 0.75


def build_prompt(question: str, question_input: str = "", system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The prompt the model sees: ``format_prompt`` of the instruction and the (optional) input."""
    return format_prompt({"instruction": question, "input": question_input or ""}, system_prompt)


def answer(model, question: str, question_input: str = "", system_prompt: str = DEFAULT_SYSTEM_PROMPT,
           max_gen_len: int = DEFAULT_MAX_LENGTH, temperature: float = DEFAULT_TEMPERATURE,
           top_p: float = DEFAULT_TOP_P) -> str:
    """The demo's answer: ``model.generate`` on the built prompt (no stop symbols), stripped.

    ``max_gen_len`` is in new tokens; ``temperature`` 0 means greedy.
    """
    prompt = build_prompt(question, question_input, system_prompt)
    return model.generate([prompt], max_gen_len=int(max_gen_len), temperature=float(temperature),
                          top_p=float(top_p))[0].strip()


def build_demo(model):
    """The gradio page (a ``gr.Blocks``), not yet launched. The "Run" button's API name is ``/run``."""
    import gradio as gr

    def run(question, question_input, system_prompt, max_gen_len, temperature, top_p):
        return answer(model, question, question_input, system_prompt, max_gen_len, temperature, top_p)

    with gr.Blocks(title="LLaMA2-Accessory single-turn demo") as demo:
        gr.Markdown("## LLaMA2-Accessory: single-turn demo")
        with gr.Row(equal_height=True):
            with gr.Column():
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
        run_button.click(run, inputs=[question, question_input, system_prompt, max_gen_len, temperature, top_p],
                         outputs=[text_out], api_name="run")
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m accessory.demos.single_turn", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, max_seq_len=4096)
    parser.add_argument("--dist_on_itp", action="store_true", help="accepted for compatibility; unused")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run_under_torchrun(args, load_model, serve)


def serve(model, args: argparse.Namespace) -> None:
    """Build the page for ``model`` and serve it (blocks until the server stops)."""
    launch(build_demo(model), args)


if __name__ == "__main__":
    main()
