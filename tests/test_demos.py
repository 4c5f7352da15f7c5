"""The text demos (accessory/demos): prompt building and generation against MetaModel, the page's
layout and defaults, a real server asked through gradio_client, and the start.sh launcher."""

import json
import os
import subprocess
import sys
import time

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install 'accessory[demo]')")

from accessory.data.conversation import default_conversation  # noqa: E402
from accessory.data.system_prompt import format_prompt  # noqa: E402
from accessory.demos import multi_turn, single_turn  # noqa: E402
from demo_utils import REPO, free_port, start_demo, stop_demo  # noqa: E402

GEN = dict(max_gen_len=12, temperature=0.0, top_p=0.75)  # greedy: the demo and generate must agree exactly


def _components(demo):
    return {getattr(block, "label", None): block for block in demo.blocks.values()
            if getattr(block, "label", None)}


def _buttons(demo):
    return [block.value for block in demo.blocks.values() if isinstance(block, gr.Button)]


# ------------------------------------------------------------------ single turn

def test_single_turn_prompt_is_format_prompt():
    assert single_turn.build_prompt("Name a fruit.") == format_prompt({"instruction": "Name a fruit."}, "alpaca")
    assert single_turn.build_prompt("Sum them.", "1 2", "alpaca").endswith(
        "### Instruction:\nSum them.\n\n### Input:\n1 2\n\n### Response:")
    assert single_turn.build_prompt("Hi", "", "None") == "Hi"


def test_single_turn_answer_equals_generate(tiny_llama_model):
    prompt = format_prompt({"instruction": "Name a fruit.", "input": ""}, "alpaca")
    expected = tiny_llama_model.generate([prompt], **GEN)[0].strip()
    assert expected  # a random model still writes something
    assert single_turn.answer(tiny_llama_model, "Name a fruit.", "", "alpaca", **GEN) == expected


def test_single_turn_page_layout(tiny_llama_model):
    demo = single_turn.build_demo(tiny_llama_model)
    assert isinstance(demo, gr.Blocks)
    parts = _components(demo)
    assert parts["Question"].lines == 4
    assert isinstance(parts["Question Input (Optional)"], gr.Textbox)
    system_prompt = parts["System Prompt"]
    assert system_prompt.value == "alpaca"
    assert [c[1] if isinstance(c, tuple) else c for c in system_prompt.choices][:2] == ["alpaca", "None"]
    assert (parts["Max Length"].minimum, parts["Max Length"].maximum, parts["Max Length"].value) == (1, 512, 128)
    assert (parts["Temperature"].minimum, parts["Temperature"].maximum, parts["Temperature"].value) == (0, 1, 0.1)
    assert (parts["Top p"].minimum, parts["Top p"].maximum, parts["Top p"].value) == (0, 1, 0.75)
    assert parts["Text Out"].lines == 11
    assert "Run" in _buttons(demo)
    labels = list(parts)
    assert labels.index("Question") < labels.index("System Prompt") < labels.index("Max Length") \
        < labels.index("Text Out")


def test_single_turn_served_answer_equals_generate(tiny_llama_model):
    """Launch the page on a free local port, ask it through gradio_client, compare with generate."""
    from gradio_client import Client

    demo = single_turn.build_demo(tiny_llama_model)
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        served = client.predict("Name a fruit.", "", "alpaca", 12, 0.0, 0.75, api_name="/run")
    finally:
        demo.close()
    prompt = format_prompt({"instruction": "Name a fruit."}, "alpaca")
    assert served == tiny_llama_model.generate([prompt], **GEN)[0].strip()


# ------------------------------------------------------------------ multi turn

def test_multi_turn_prompt_is_default_conversation():
    qas = [["Hi", "Hello!"], ["Name a fruit.", None]]
    prompt, stop = multi_turn.build_conversation_prompt(qas)
    conversation = default_conversation()
    conversation.load_qas(qas)
    assert prompt == conversation.get_prompt()
    assert prompt.endswith("### Human: Name a fruit.\n### Assistant:")
    assert stop == "\n###"
    chatml_prompt, chatml_stop = multi_turn.build_conversation_prompt(qas, "chatml")
    assert chatml_prompt.endswith("<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n")
    assert chatml_stop == "<|im_end|>"
    with pytest.raises(ValueError, match="unknown conversation template"):
        multi_turn.build_conversation_prompt(qas, "nope")


def test_multi_turn_template_from_checkpoint(tmp_path):
    assert multi_turn.template_for_checkpoint(tmp_path) == "default"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}"}))
    assert multi_turn.template_for_checkpoint(tmp_path) == "chatml"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "You are a helpful AI assistant named SmolLM <|im_start|>"}))
    assert multi_turn.template_for_checkpoint(tmp_path) == "smollm2"


@pytest.mark.parametrize("template", ["default", "chatml"])
def test_multi_turn_stream_equals_generate(tiny_llama_model, template):
    qas = [["Hi", "Hello!"], ["Name a fruit.", None]]
    prompt, stop = multi_turn.build_conversation_prompt(qas, template)
    expected = tiny_llama_model.generate([prompt], additional_stop_symbols=[stop], **GEN)[0].strip()
    chunks = list(multi_turn.stream_reply(tiny_llama_model, qas, template, **GEN))
    assert chunks[-1] == expected
    assert len(chunks) >= 2  # streamed, not delivered at once
    assert all(expected.startswith(chunk) for chunk in chunks)

    # the chat window's path: question shown, then the answer growing at the end of the history
    box, messages = multi_turn.show_user_input("Name a fruit.", [{"role": "user", "content": "Hi"},
                                                                 {"role": "assistant", "content": "Hello!"}])
    assert box == ""
    updates = list(multi_turn.stream_model_output(tiny_llama_model, messages, template, GEN["max_gen_len"],
                                                  GEN["temperature"], GEN["top_p"]))
    assert updates[-1][-1] == {"role": "assistant", "content": expected}
    assert updates[-1][:-1] == messages
    assert multi_turn.undo(updates[-1]) == messages[:2]


def test_multi_turn_stops_at_response_end_signal(tiny_llama_model, monkeypatch):
    """What the model writes after "\\n###" never reaches the chat window (stream_generate cuts it)."""
    seen = {}

    def fake_stream(prompt, **kwargs):
        seen.update(kwargs)
        yield {"text": " Apple", "end_of_content": False}
        yield {"text": " Apple.\n", "end_of_content": True}

    monkeypatch.setattr(tiny_llama_model, "stream_generate", fake_stream)
    chunks = list(multi_turn.stream_reply(tiny_llama_model, [["Name a fruit.", None]], "default", 7, 0.2, 0.5))
    assert chunks == ["Apple", "Apple."]
    assert seen == dict(max_gen_len=7, temperature=0.2, top_p=0.5, additional_stop_symbols=["\n###"])


def test_multi_turn_messages_to_qas_accepts_content_blocks():
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "More?"}]
    assert multi_turn.messages_to_qas(messages) == [["Hi", "Hello!"], ["More?", None]]


def test_multi_turn_page_layout(tiny_llama_model):
    demo = multi_turn.build_demo(tiny_llama_model, "smollm2", max_seq_len=2048)
    parts = _components(demo)
    assert isinstance(parts["Chat"], gr.Chatbot)
    assert isinstance(parts["Message"], gr.Textbox)
    length = parts["Single-turn max response length"]
    assert (length.minimum, length.maximum, length.value) == (1, 1024, 1024)
    assert (parts["Temperature"].value, parts["Top-p"].value) == (0.1, 0.75)
    assert parts["Conversation Template"].value == "smollm2"
    assert {"Submit", "Stop", "Undo", "Clear"} <= set(_buttons(demo))


# ------------------------------------------------------------------ the Stop button

class CountingStream:
    """Wraps ``model.stream_generate``: slows each chunk and counts the chunks the model produced."""

    def __init__(self, original, delay_s):
        self.original, self.delay_s = original, delay_s
        self.produced = 0
        self.finished = False  # the model's generator ran to its end (not stopped)

    def __call__(self, *args, **kwargs):
        for chunk in self.original(*args, **kwargs):
            self.produced += 1
            self.finished = bool(chunk["end_of_content"])
            time.sleep(self.delay_s)
            yield chunk


def test_multi_turn_stop_button_cancels_both_answer_events(tiny_llama_model):
    """Stop is wired to cancel the answer streams that Enter and Submit start (and nothing else)."""
    config = multi_turn.build_demo(tiny_llama_model, "default", max_seq_len=64).get_config_file()
    buttons = {c["props"].get("value"): c["id"] for c in config["components"] if c.get("type") == "button"}
    dependencies = config["dependencies"]
    answer_events = {d["id"] for d in dependencies if d["targets"] == [(None, "then")]}
    assert len(answer_events) == 2  # Enter -> show_user_input -> answer; Submit -> show_user_input -> answer
    cancelled = [set(d["cancels"]) for d in dependencies if d["cancels"]]
    assert cancelled == [answer_events]
    assert all(list(d["targets"]) == [(buttons["Stop"], "click")] for d in dependencies if d["cancels"])


def test_multi_turn_cancelled_answer_stops_generating(tiny_llama_model, monkeypatch):
    """Cancelling the streaming answer (what Stop does; here through gradio_client) stops the model."""
    from gradio_client import Client

    long_gen_len, delay = 160, 0.05
    counter = CountingStream(tiny_llama_model.stream_generate, delay)
    monkeypatch.setattr(tiny_llama_model, "stream_generate", counter)  # undone after the test
    demo = multi_turn.build_demo(tiny_llama_model, "default", max_seq_len=2 * long_gen_len)
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        _, history = client.predict("Tell me a long story.", [], api_name="/show_user_input")
        job = client.submit(history, "default", long_gen_len, 0.0, 0.75, api_name="/stream_model_output")
        deadline = time.time() + 60
        while counter.produced < 5 and time.time() < deadline:
            time.sleep(0.01)
        assert counter.produced >= 5, "the answer never started streaming"
        assert job.cancel()
        at_cancel = counter.produced
        time.sleep(40 * delay)  # 40 more chunks' time
        after = counter.produced
        # the model is free again: a 2-token answer adds only its own chunks, none of the cancelled one's
        client.predict(history, "default", 2, 0.0, 0.75, api_name="/stream_model_output")
        second = counter.produced - after
    finally:
        demo.close()
    assert after <= at_cancel + 2, (at_cancel, after)  # at most the chunk in flight
    assert 1 <= second <= 3 and counter.finished, second


# ------------------------------------------------------------------ command lines

@pytest.mark.parametrize("prompt_cache", [False, True], ids=["fresh", "prompt_cache"])
def test_multi_turn_served_two_turns_equal_generate(tiny_llama_model, tiny_llama_dir, prompt_cache):
    """Two chat turns through a launched page's API (/show_user_input then /stream_model_output);
    with the prompt cache on (as the demo's command line loads the model) the second turn reuses
    the first's keys and values and still answers as a fresh generate."""
    from gradio_client import Client

    import torch

    from accessory.model.meta import MetaModel

    model = tiny_llama_model
    if prompt_cache:
        model = MetaModel.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, device="cpu", progress=False)
        model.engine.prompt_cache = True
    demo = multi_turn.build_demo(model, "default", max_seq_len=256)
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        history = []
        for question in ("Hi", "Name a fruit."):
            box, history = client.predict(question, history, api_name="/show_user_input")
            assert box == ""
            history = client.predict(history, "default", GEN["max_gen_len"], GEN["temperature"], GEN["top_p"],
                                     api_name="/stream_model_output")
    finally:
        demo.close()
    qas = multi_turn.messages_to_qas(history)
    assert [qa[0] for qa in qas] == ["Hi", "Name a fruit."]
    for turn in range(2):
        prompt, stop = multi_turn.build_conversation_prompt(qas[:turn] + [[qas[turn][0], None]])
        assert qas[turn][1] == tiny_llama_model.generate([prompt], additional_stop_symbols=[stop], **GEN)[0].strip()
    if prompt_cache:  # the second turn's conversation is what the engine keeps now
        [kept] = model.engine._kept
        assert len(kept.tokens) > len(model.tokenizer.encode(prompt, bos=True, eos=False))


def test_demo_flags():
    args = single_turn.build_parser().parse_args(
        ["--pretrained_path", "a", "b", "--llama_config", "c.json", "d.json", "--dtype", "fp32", "--quant"])
    assert (args.pretrained_path, args.llama_config, args.dtype, args.quant) == (["a", "b"], ["c.json", "d.json"],
                                                                                 "fp32", True)
    assert (args.max_seq_len, args.host, args.share) == (4096, "127.0.0.1", False)
    args = multi_turn.build_parser().parse_args([])
    assert (args.pretrained_path, args.max_seq_len, args.n_gpus, args.dtype) == (None, 2048, 1, "bf16")
    assert args.prompt_cache_slots == 4
    with pytest.raises(SystemExit, match="--prompt_cache_slots must be 0 or more"):
        multi_turn.main(["--prompt_cache_slots", "-1"])


def test_quant_flag_loads_quantized(tiny_llama_dir):
    from accessory.demos.common import load_model
    from accessory.quant import QuantLinear
    args = single_turn.build_parser().parse_args(["--pretrained_path", str(tiny_llama_dir), "--quant", "int8",
                                                  "--dtype", "fp32", "--device", "cpu"])
    model = load_model(args)
    assert model.quant_scheme.name == "int8" and isinstance(model.llma.output, QuantLinear)
    args = single_turn.build_parser().parse_args(["--pretrained_path", str(tiny_llama_dir), "--quant", "int3"])
    with pytest.raises(SystemExit, match="int8, int4, nf4"):
        load_model(args)


def test_demo_runs_as_a_file_help():
    """`python accessory/demos/single_turn.py --help` works without the package on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(REPO / "accessory/demos/single_turn.py"), "--help"], cwd="/",
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--pretrained_path" in out.stdout and "--share" in out.stdout


def _start(*flags, **env):
    return subprocess.run(["bash", str(REPO / "accessory/demos/start.sh"), *flags, "--dry-run"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHON": "python", **env})


def test_start_sh_commands(tmp_path):
    assert _start().stdout.strip() == "python -m accessory.demos.multi_turn --n_gpus 1"
    out = _start("--scenario", "1", "--pretrained_path", str(tmp_path), "--quant", "--port", "7861")
    assert out.stdout.strip() == f"python -m accessory.demos.single_turn --pretrained_path {tmp_path} --quant " \
                                 f"--port 7861"
    assert _start(SCENARIO="1").stdout.strip() == "python -m accessory.demos.single_turn"
    missing = _start("--scenario", "3")  # the embedded text model sees no images
    assert missing.returncode == 2 and "needs --pretrained_path" in missing.stderr
    assert _start("--scenario", "4", "--pretrained_path", str(tmp_path), "--quant", "int8").stdout.strip() == \
        f"python -m accessory.demos.multi_turn_mm --pretrained_path {tmp_path} --quant int8"
    assert _start("--scenario", "3", "--pretrained_path", str(tmp_path)).stdout.strip() == \
        f"python -m accessory.demos.single_turn_mm --pretrained_path {tmp_path}"
    assert _start("--scenario", "5").returncode == 2
    assert "does not exist" in _start("--pretrained_path", str(tmp_path / "nope")).stderr
    # several processes: torchrun for the single-turn demos, --n_gpus for the multi-turn ones
    assert _start("--nproc", "2").stdout.strip() == "python -m accessory.demos.multi_turn --n_gpus 2"
    assert _start("--scenario", "1", "--nproc", "3").stdout.strip() == \
        "python -m torch.distributed.run --nproc-per-node 3 -m accessory.demos.single_turn"
    assert _start("--scenario", "3", "--pretrained_path", str(tmp_path), "--nproc", "2").stdout.strip() == \
        f"python -m torch.distributed.run --nproc-per-node 2 -m accessory.demos.single_turn_mm --pretrained_path {tmp_path}"
    assert _start("--scenario", "4", "--pretrained_path", str(tmp_path), "--nproc", "2").stdout.strip() == \
        f"python -m accessory.demos.multi_turn_mm --pretrained_path {tmp_path} --n_gpus 2"
    assert "1 or more" in _start("--nproc", "0").stderr
    assert "runs one process" in _start("--scenario", "6", "--nproc", "2").stderr


def test_multi_turn_subprocess_on_embedded_model(tmp_path):
    """As a user starts it: `python -m accessory.demos.multi_turn` on a free port, the embedded SmolLM2."""
    import torch

    from accessory.checkpoint.demo_model import DEMO_MODEL_NAME, default_cache_dir
    from accessory.model.meta import MetaModel

    model_dir = default_cache_dir() / "models" / DEMO_MODEL_NAME
    if not (model_dir / "config.json").is_file():
        pytest.skip(f"the embedded demo model is not built yet at {model_dir} (run `accessory chat` once)")
    port = free_port()
    server, client = start_demo([sys.executable, "-m", "accessory.demos.multi_turn", "--port", str(port),
                                 "--dtype", "fp32", "--device", "cpu"], port, tmp_path / "demo.log", timeout_s=90)
    try:
        question = "What is the capital of France?"
        _, history = client.predict(question, [], api_name="/show_user_input")
        history = client.predict(history, "smollm2", 24, 0.0, 0.75, api_name="/stream_model_output")
    finally:
        stop_demo(server)
    model = MetaModel.from_pretrained(str(model_dir), dtype=torch.float32, device="cpu", progress=False)
    prompt, stop = multi_turn.build_conversation_prompt([[question, None]], "smollm2")
    expected = model.generate([prompt], max_gen_len=24, temperature=0.0, additional_stop_symbols=[stop])[0].strip()
    assert multi_turn.messages_to_qas(history) == [[question, expected]]
    assert "Paris" in expected
