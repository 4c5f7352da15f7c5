"""The multimodal demos (accessory/demos/*_mm.py) on the test-only ``tiny_mm`` llama_type
(tests/multimodal_tiny.py): answers equal ``generate`` with the transformed picture, the page's
layout, a page served in this process and one started as a subprocess, asked through gradio_client
with an uploaded image, and the refusals."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install 'accessory[demo]')")

from accessory.data.system_prompt import format_prompt  # noqa: E402
from accessory.data.transform import get_transform  # noqa: E402
from accessory.demos import multi_turn, multi_turn_mm, single_turn_mm  # noqa: E402
from accessory.model.LLM import unregister_llama_type  # noqa: E402
from accessory.model.meta import MetaModel  # noqa: E402

import multimodal_tiny as mt  # noqa: E402
from demo_utils import REPO, free_port, start_demo, stop_demo  # noqa: E402

GEN = dict(max_gen_len=12, temperature=0.0, top_p=0.75)


def _components(demo):
    return {getattr(block, "label", None): block for block in demo.blocks.values()
            if getattr(block, "label", None)}


def picture(seed, size=(48, 40)):
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pixels_of(image, transform):
    return get_transform(transform, 32)(image)[None]


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory):
    mt.register()
    yield mt.write_checkpoint(tmp_path_factory.mktemp("mm_demo"), "tagged")
    unregister_llama_type(mt.NAME)


@pytest.fixture(scope="module")
def mm_model(mm_dir):
    return MetaModel.from_pretrained(str(mm_dir), with_visual=True, max_seq_len=256, dtype=torch.float32,
                                     device="cpu", progress=False)


# ------------------------------------------------------------------ single turn

def test_single_turn_mm_answer_equals_generate(mm_model):
    image = picture(0)
    prompt = format_prompt({"instruction": "What is in the picture?", "input": ""}, "alpaca")
    for transform in ("resized_center_crop", "padded_resize"):
        expected = mm_model.generate([prompt], pixels_of(image, transform), **GEN)[0].strip()
        assert expected
        got = single_turn_mm.answer(mm_model, image, "What is in the picture?", "", "alpaca", **GEN,
                                    image_transform=transform)
        assert got == expected
    other = single_turn_mm.answer(mm_model, picture(1), "What is in the picture?", "", "alpaca", **GEN)
    assert other != got  # the picture matters
    # no picture: the question alone
    assert single_turn_mm.answer(mm_model, None, "Hi", "", "None", **GEN) == \
        mm_model.generate(["Hi"], **GEN)[0].strip()
    with pytest.raises(ValueError, match="unknown image transform 'nope'"):
        single_turn_mm.answer(mm_model, image, "Hi", image_transform="nope")


def test_single_turn_mm_page_layout(mm_model):
    demo = single_turn_mm.build_demo(mm_model)
    parts = _components(demo)
    assert isinstance(parts["Image Input"], gr.Image) and parts["Image Input"].type == "pil"
    labels = list(parts)
    assert labels.index("Image Input") < labels.index("Question") < labels.index("System Prompt") \
        < labels.index("Max Length") < labels.index("Text Out")
    assert (parts["Max Length"].value, parts["Temperature"].value, parts["Top p"].value) == (128, 0.1, 0.75)


def test_single_turn_mm_served_with_an_uploaded_image(mm_model, tmp_path):
    from gradio_client import Client, handle_file

    path = tmp_path / "picture.png"
    picture(2).save(path)
    demo = single_turn_mm.build_demo(mm_model, "padded_resize")
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        served = client.predict(handle_file(str(path)), "Describe it.", "", "alpaca", 12, 0.0, 0.75,
                                api_name="/run")
    finally:
        demo.close()
    from PIL import Image
    prompt = format_prompt({"instruction": "Describe it."}, "alpaca")
    expected = mm_model.generate([prompt], pixels_of(Image.open(path), "padded_resize"), **GEN)[0].strip()
    assert served == expected


# ------------------------------------------------------------------ multi turn

def test_multi_turn_mm_stream_equals_generate(mm_model):
    image = picture(3)
    qas = [["What is this?", "A pattern."], ["Which colours?", None]]
    prompt, stop = multi_turn.build_conversation_prompt(qas, "default")
    expected = mm_model.generate([prompt], pixels_of(image, "padded_resize"), additional_stop_symbols=[stop],
                                 **GEN)[0].strip()
    chunks = list(multi_turn_mm.stream_reply(mm_model, image, qas, "default", **GEN))
    assert chunks[-1] == expected and len(chunks) >= 2
    assert all(expected.startswith(chunk) for chunk in chunks)

    _, messages = multi_turn_mm.show_user_input("Which colours?", [{"role": "user", "content": "What is this?"},
                                                                   {"role": "assistant", "content": "A pattern."}])
    updates = list(multi_turn_mm.stream_model_output(mm_model, image, messages, "padded_resize", "default",
                                                     GEN["max_gen_len"], GEN["temperature"], GEN["top_p"]))
    assert updates[-1] == messages + [{"role": "assistant", "content": expected}]


def test_multi_turn_mm_page_layout(mm_model):
    demo = multi_turn_mm.build_demo(mm_model, "default", max_seq_len=512)
    parts = _components(demo)
    assert isinstance(parts["Image Input"], gr.Image) and isinstance(parts["Chat"], gr.Chatbot)
    assert parts["Image Transform"].value == "padded_resize"
    length = parts["Single-turn max response length"]
    assert (length.minimum, length.maximum, length.value) == (1, 256, 256)
    labels = list(parts)
    assert labels.index("Image Input") < labels.index("Chat") < labels.index("Message")
    # changing the picture clears the chat: an image "change" event whose only output is the chat
    image_id, chat_id = parts["Image Input"]._id, parts["Chat"]._id
    clears = [dep for dep in demo.config["dependencies"]
              if [image_id, "change"] in [list(t) for t in dep["targets"]]]
    assert len(clears) == 1 and clears[0]["outputs"] == [chat_id]
    fn = demo.fns[clears[0]["id"]].fn
    assert fn() == []


def test_multi_turn_mm_subprocess_with_an_uploaded_image(mm_dir, mm_model, tmp_path):
    """As a user starts it (``python -m accessory.demos.multi_turn_mm``), with the test type
    registered by a two-line bootstrap, on a free port; two turns about one uploaded picture."""
    from gradio_client import handle_file

    path = tmp_path / "picture.png"
    picture(4).save(path)
    bootstrap = ("import sys, runpy; sys.path.insert(0, 'tests'); import multimodal_tiny; multimodal_tiny.register(); "
                 "runpy.run_module('accessory.demos.multi_turn_mm', run_name='__main__')")
    port = free_port()
    server, client = start_demo([sys.executable, "-c", bootstrap, "--pretrained_path", str(mm_dir), "--port",
                                 str(port), "--dtype", "fp32", "--device", "cpu", "--max_seq_len", "256"], port,
                                tmp_path / "demo.log")
    try:
        history = []
        for question in ("What is this?", "Which colours?"):
            _, history = client.predict(question, history, api_name="/show_user_input")
            history = client.predict(handle_file(str(path)), history, "padded_resize", "default", 12, 0.0, 0.75,
                                     api_name="/stream_model_output")
    finally:
        stop_demo(server)
    from PIL import Image
    pixels = pixels_of(Image.open(path), "padded_resize")
    qas = multi_turn.messages_to_qas(history)
    assert [qa[0] for qa in qas] == ["What is this?", "Which colours?"]
    for turn in range(2):
        prompt, stop = multi_turn.build_conversation_prompt(qas[:turn] + [[qas[turn][0], None]])
        assert qas[turn][1] == mm_model.generate([prompt], pixels, additional_stop_symbols=[stop], **GEN)[0].strip()


# ------------------------------------------------------------------ command lines and refusals

def test_mm_demo_flags():
    args = single_turn_mm.build_parser().parse_args(["--pretrained_path", "a", "--image_transform", "padded_resize"])
    assert (args.pretrained_path, args.image_transform, args.max_seq_len) == (["a"], "padded_resize", 4096)
    assert single_turn_mm.build_parser().parse_args([]).image_transform == "resized_center_crop"
    args = multi_turn_mm.build_parser().parse_args([])
    assert (args.max_seq_len, args.n_gpus, args.template) == (2048, 1, "auto")
    assert (args.prompt_cache_slots, args.prompt_cache_mb) == (4, 2048)
    with pytest.raises(SystemExit, match="--prompt_cache_mb must be 0 or more"):
        multi_turn_mm.main(["--pretrained_path", "a", "--prompt_cache_mb", "-1"])


def test_multi_turn_mm_keeps_a_pictures_positions_for_the_next_turn(mm_dir, monkeypatch):
    """The multi-turn mm demo loads with the prompt cache on: the second turn about the picture
    prefills only its new positions, and answers as a fresh generate does."""
    from accessory.demos.common_mm import load_multimodal_chat_model

    monkeypatch.delenv("ACCESSORY_PROMPT_CACHE", raising=False)
    args = multi_turn_mm.build_parser().parse_args(["--pretrained_path", str(mm_dir), "--dtype", "fp32", "--device",
                                                    "cpu", "--max_seq_len", "256", "--prompt_cache_slots", "2"])
    model = load_multimodal_chat_model(args)
    assert model.engine.prompt_cache and model.engine.prompt_cache_slots == 2
    image, qas = picture(5), [["What is this?", None]]
    qas[0][1] = list(multi_turn_mm.stream_reply(model, image, qas, "default", **GEN))[-1]
    qas.append(["Which colours?", None])
    prefills, forward = [], model.llma.forward_tokens

    def counting(tokens, positions, *rest, **kwargs):
        if positions.shape[1] > 1:
            prefills.append(int(positions[0, 0]))
        return forward(tokens, positions, *rest, **kwargs)
    monkeypatch.setattr(model.llma, "forward_tokens", counting)
    answer = list(multi_turn_mm.stream_reply(model, image, qas, "default", **GEN))[-1]
    assert prefills and prefills[0] > model.get_image_words()  # the picture and the first turn reused
    prompt, stop = multi_turn.build_conversation_prompt(qas, "default")
    model.engine.prompt_cache = False
    assert answer == model.generate([prompt], pixels_of(image, "padded_resize"), additional_stop_symbols=[stop],
                                    **GEN)[0].strip()


def test_mm_demos_refuse_models_without_images(tiny_llama_dir, tiny_llama_model, monkeypatch):
    for demo in (single_turn_mm, multi_turn_mm):
        with pytest.raises(SystemExit, match="need --pretrained_path"):
            demo.main(["--dtype", "fp32", "--device", "cpu"])
        # a text-only llama checkpoint has no CLIP weights for llama's with_visual branch: the loader says so
        with pytest.raises(SystemExit, match="with_visual=True builds.*text-only checkpoint.*with_visual=False"):
            demo.main(["--pretrained_path", str(tiny_llama_dir), "--dtype", "fp32", "--device", "cpu"])
    # a model that loads but takes no images
    monkeypatch.setattr("accessory.demos.common.load_model", lambda args, with_visual=False, mp_group=None: tiny_llama_model)
    for demo in (single_turn_mm, multi_turn_mm):
        with pytest.raises(SystemExit, match="llama_type 'llama' takes no images.*text demos"):
            demo.main(["--pretrained_path", str(tiny_llama_dir)])
    assert not tiny_llama_model.engine.prompt_cache  # refused before the chat demo set its engine up


def test_mm_demo_runs_as_a_file_help():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name in ("single_turn_mm", "multi_turn_mm"):
        out = subprocess.run([sys.executable, str(REPO / f"accessory/demos/{name}.py"), "--help"], cwd="/",
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "--pretrained_path" in out.stdout
