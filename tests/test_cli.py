"""The ``accessory`` command: ``chat`` driven through a pseudo-terminal, ``generate``'s JSON lines,
``demo``'s pass-through, and every subcommand's --help. Each answer is checked against
``MetaModel.generate`` on the same prompt (greedy, fp32, a tiny random llama)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_utils import TINY_LLAMA, random_llama_state, write_checkpoint

from accessory import cli
from accessory.data.conversation import conv_templates
from accessory.model.meta import MetaModel

REPO = Path(__file__).resolve().parents[1]
MAX_GEN_LEN = 8
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    state = random_llama_state(TINY_LLAMA, 32000)
    return write_checkpoint(tmp_path_factory.mktemp("cli") / "ck", state, TINY_LLAMA)


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt) -> MetaModel:
    return MetaModel.from_pretrained(str(tiny_ckpt), dtype=torch.float32, device="cpu")


def _accessory(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accessory", *args], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout)


# ------------------------------------------------------------------ chat through a pty

def test_chat_two_turns_then_exit_in_a_pty(tiny_ckpt, tiny_model):
    pexpect = pytest.importorskip("pexpect", reason="pexpect is not installed (pip install 'accessory[test]')")
    child = pexpect.spawn(sys.executable, ["-m", "accessory", "chat", str(tiny_ckpt), "--dtype", "fp32",
                                           "--device", "cpu", "--max-gen-len", str(MAX_GEN_LEN)],
                          env=ENV, cwd=str(REPO), encoding="utf-8", timeout=90)
    try:
        child.expect_exact("/exit")       # the banner names the way out
        child.expect_exact(">>> ")
        history = []
        for question in ("Hello there", "And what next?"):
            child.sendline(question)
            child.expect_exact(">>> ")
            # the pty echoes the question, then the streamed answer and a newline
            shown = child.before.replace("\r\n", "\n")
            assert shown.startswith(question + "\n"), shown
            answer = shown[len(question) + 1:].strip()

            conversation = conv_templates["default"]()  # no ChatML tokenizer config: "auto" is "default"
            conversation.load_qas(history + [[question, None]])
            expected = tiny_model.generate([conversation.get_prompt()], max_gen_len=MAX_GEN_LEN, temperature=0.0,
                                           additional_stop_symbols=[conversation.response_end_signal])[0]
            assert expected.strip() and answer == expected.strip()
            history.append([question, answer])
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)


# ------------------------------------------------------------------ generate

def _json_lines(stdout: str):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_generate_one_prompt_matches_metamodel(tiny_ckpt, tiny_model):
    result = _accessory("generate", str(tiny_ckpt), "--prompt", "The capital of France is", "--dtype", "fp32",
                        "--device", "cpu", "--max-gen-len", str(MAX_GEN_LEN), "--logprobs")
    assert result.returncode == 0, result.stderr
    lines = _json_lines(result.stdout)
    expected = tiny_model.generate(["The capital of France is"], max_gen_len=MAX_GEN_LEN, temperature=0.0,
                                   return_logprobs=True)[0]
    assert len(lines) == 1
    assert lines[0]["prompt"] == "The capital of France is"
    assert lines[0]["text"] == expected["text"]
    assert lines[0]["tokens"] == expected["tokens"]
    assert lines[0]["logprobs"] == pytest.approx(expected["logprobs"], abs=1e-4)


def test_generate_file_in_batches_matches_metamodel(tiny_ckpt, tiny_model, tmp_path):
    prompts = ["Once upon a time", "def fibonacci(n):", "Paris is the capital of"]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    result = _accessory("generate", str(tiny_ckpt), "--file", str(prompt_file), "--batch-size", "2",
                        "--dtype", "fp32", "--device", "cpu", "--max-gen-len", str(MAX_GEN_LEN))
    assert result.returncode == 0, result.stderr
    lines = _json_lines(result.stdout)
    assert [line["id"] for line in lines] == [0, 1, 2]
    assert [line["prompt"] for line in lines] == prompts
    expected = (tiny_model.generate(prompts[:2], max_gen_len=MAX_GEN_LEN, temperature=0.0)
                + tiny_model.generate(prompts[2:], max_gen_len=MAX_GEN_LEN, temperature=0.0))
    assert [line["text"] for line in lines] == expected


def test_generate_text_file_with_a_template(tiny_ckpt, tiny_model, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("Name three fruits.\n\nWhat is 2 + 2?\n")
    result = _accessory("generate", str(tiny_ckpt), "--file", str(prompt_file), "--template", "default",
                        "--dtype", "fp32", "--device", "cpu", "--max-gen-len", str(MAX_GEN_LEN))
    assert result.returncode == 0, result.stderr
    lines = _json_lines(result.stdout)
    assert [line["prompt"] for line in lines] == ["Name three fruits.", "What is 2 + 2?"]
    for line in lines:
        prompt, stops = cli.templated_prompt(line["prompt"], "default")
        assert stops == [conv_templates["default"]().response_end_signal]
        assert line["text"] == tiny_model.generate([prompt], max_gen_len=MAX_GEN_LEN, temperature=0.0,
                                                   additional_stop_symbols=stops)[0]


def test_generate_rejects_a_bad_prompt_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    assert cli.main(["generate", "--file", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_templated_prompt():
    assert cli.templated_prompt("Hi", "none") == ("Hi", [])
    assert cli.templated_prompt("Hi", "chatml") == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                                                    ["<|im_end|>"])
    alpaca, stops = cli.templated_prompt("Hi", "alpaca")
    assert alpaca.endswith("### Instruction:\nHi\n\n### Response:") and stops == []


# ------------------------------------------------------------------ --help, demo

def _subcommands():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return list(action.choices)


def test_every_subcommand_help_shows_an_example(capsys):
    names = _subcommands()
    assert {"chat", "generate", "convert", "demo"} <= set(names)
    for name in names:
        try:
            code = cli.main([name, "--help"])
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr().out
        assert code in (0, None), name
        assert "example" in out.lower(), f"`accessory {name} --help` shows no example"


def test_demo_help_in_a_subprocess():
    result = _accessory("demo", "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "accessory demo multi_turn" in result.stdout and "example" in result.stdout


def test_demo_passes_flags_to_the_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "single_turn", "--help"])
    assert exc.value.code == 0
    assert "--pretrained_path" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--n_gpus", "0"])  # multi_turn by default, which checks its flags
    assert "--n_gpus=0" in str(exc.value.code)
    assert cli.main(["demo", "nope"]) == 2
    assert "unknown demo" in capsys.readouterr().err


# ------------------------------------------------------------------ pictures (--image)

@pytest.fixture(scope="module")
def mm_ckpt(tmp_path_factory):
    """A checkpoint of the test-only multimodal type (tests/multimodal_tiny.py), and two pictures."""
    import numpy as np
    from PIL import Image

    import multimodal_tiny as mt
    from accessory.model.LLM import unregister_llama_type

    mt.register()
    root = tmp_path_factory.mktemp("cli_mm")
    directory = mt.write_checkpoint(root / "ck", "tagged")
    pictures = []
    for seed in (1, 2):
        path = root / f"picture{seed}.png"
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
        pictures.append(path)
    model = MetaModel.from_pretrained(str(directory), with_visual=True, dtype=torch.float32, device="cpu",
                                      progress=False)
    yield directory, pictures, model
    unregister_llama_type(mt.NAME)


def _on_picture(model, prompts, path, **kwargs):
    from PIL import Image

    from accessory.data.transform import get_transform
    pixels = get_transform("padded_resize", model.image_size)(Image.open(path).convert("RGB"))
    return model.generate(prompts, [pixels] * len(prompts), max_gen_len=MAX_GEN_LEN, temperature=0.0, **kwargs)


def test_chat_about_a_picture_and_then_another(mm_ckpt, monkeypatch, capsys):
    """Piped turns about --image, then /image PATH: a new picture and a new conversation."""
    import io

    directory, (first, second), model = mm_ckpt
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"What is this?\nAnd then?\n/image {second}\nWhat is this?\n"))
    assert cli.main(["chat", str(directory), "--image", str(first), "--dtype", "fp32", "--device", "cpu",
                     "--max-gen-len", str(MAX_GEN_LEN)]) == 0
    answers = capsys.readouterr().out.splitlines()
    assert len(answers) == 3
    # (history, question, picture) of each turn: /image started a new conversation
    turns = [([], "What is this?", first), ([["What is this?", answers[0]]], "And then?", first),
             ([], "What is this?", second)]
    for (history, question, path), answer in zip(turns, answers):
        conversation = conv_templates["default"]()
        conversation.load_qas(history + [[question, None]])
        expected = _on_picture(model, [conversation.get_prompt()], path,
                               additional_stop_symbols=[conversation.response_end_signal])[0]
        assert answer == expected.strip()


def test_generate_about_pictures(mm_ckpt, tmp_path, capsys):
    directory, (first, second), model = mm_ckpt
    common = ["--dtype", "fp32", "--device", "cpu", "--max-gen-len", str(MAX_GEN_LEN)]
    assert cli.main(["generate", str(directory), "--prompt", "Describe it.", "--image", str(first), *common]) == 0
    [line] = _json_lines(capsys.readouterr().out)
    assert line["text"] == _on_picture(model, ["Describe it."], first)[0]
    # a .jsonl file whose records name their own pictures, relative to the file, in one batch
    records = [{"prompt": "Describe it.", "image": first.name}, {"prompt": "Describe it.", "image": second.name}]
    prompt_file = first.parent / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli.main(["generate", str(directory), "--file", str(prompt_file), "--batch-size", "2", *common]) == 0
    lines = _json_lines(capsys.readouterr().out)
    assert [line["text"] for line in lines] == [_on_picture(model, ["Describe it."], path)[0] for path in (first, second)]
    # refusals
    assert cli.main(["generate", str(directory), "--prompt", "Hi", "--image", str(tmp_path / "none.png"), *common]) == 2
    assert "no picture at" in capsys.readouterr().err
    (tmp_path / "text.png").write_text("not a picture")
    assert cli.main(["chat", str(directory), "--prompt", "Hi", "--image", str(tmp_path / "text.png"), *common]) == 2
    assert "not a picture" in capsys.readouterr().err
    # prompts with and without a picture in one batch
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "Describe it.", "image": str(first)}) + "\n"
                     + json.dumps({"prompt": "Describe it."}) + "\n")
    assert cli.main(["generate", str(directory), "--file", str(mixed), "--batch-size", "2", *common]) == 0
    lines = _json_lines(capsys.readouterr().out)
    assert [line["text"] for line in lines] == [_on_picture(model, ["Describe it."], first)[0],
                                                model.generate(["Describe it."], max_gen_len=MAX_GEN_LEN,
                                                               temperature=0.0)[0]]


def test_image_on_a_text_checkpoint_is_refused(tiny_ckpt, capsys):
    assert cli.main(["chat", str(tiny_ckpt), "--prompt", "Hi", "--image", "x.png", "--dtype", "fp32",
                     "--device", "cpu"]) == 1
    assert "with_visual" in capsys.readouterr().err


def test_every_environment_setting_the_package_reads_is_in_the_readme():
    """The README's Settings table names each ACCESSORY_* variable the package reads, and no other."""
    import re
    read = set()
    for path in (REPO / "accessory").rglob("*.py"):
        text = path.read_text()
        read |= set(re.findall(r'"(ACCESSORY_[A-Z0-9_]+)"', text))  # (every such literal names a variable)
    readme = (REPO / "README.md").read_text()
    settings = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(ACCESSORY_[A-Z0-9_]+)` \|", settings, flags=re.M))
    assert len(read) >= 9 and read == listed
