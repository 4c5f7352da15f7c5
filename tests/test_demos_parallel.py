"""The demos with several model-parallel processes (accessory/demos/parallel.py), on the CPU.

Started as a user starts them: ``python accessory/demos/multi_turn.py --n_gpus 2`` (the demo
spawns its second process) and ``start.sh --scenario 1 --nproc 2`` (single_turn under
``python -m torch.distributed.run``), on the tiny random llama cut in two, asked through
gradio_client and compared with ``MetaModel.generate`` (greedy) of the whole model in this process.
Then Stop: a long streamed answer is cancelled, the follower goes idle, and the next answer is
still right (the ranks stayed in step). Then shutdown: no process is left behind. The protocol
itself (go on / stop per step) is also checked in-process with a fake channel.
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio", reason="gradio is not installed (pip install 'accessory[demo]')")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from accessory.data.system_prompt import format_prompt  # noqa: E402
from accessory.demos import multi_turn, parallel  # noqa: E402
from demo_utils import (REPO, command_line, cpu_ticks, descendants, free_port, start_demo,  # noqa: E402
                        stop_demo, wait_gone)

GEN = dict(max_gen_len=12, temperature=0.0, top_p=0.75)  # greedy: the demo and generate must agree exactly
LONG = 2000  # new tokens: far more than the Stop test waits for


def _expected_chat_answer(model, qas, max_gen_len=GEN["max_gen_len"]):
    prompt, stop = multi_turn.build_conversation_prompt(qas)
    return model.generate([prompt], max_gen_len=max_gen_len, temperature=0.0,
                          additional_stop_symbols=[stop])[0].strip()


# ------------------------------------------------------------------ multi_turn --n_gpus 2

@pytest.fixture(scope="module")
def multi_turn_2(tiny_llama_dir, tmp_path_factory):
    """``python accessory/demos/multi_turn.py --n_gpus 2`` on a free port: (process, client, follower pid)."""
    port = free_port()
    log = tmp_path_factory.mktemp("multi_turn_2") / "demo.log"
    server, client = start_demo([sys.executable, str(REPO / "accessory/demos/multi_turn.py"),
                                 "--pretrained_path", str(tiny_llama_dir), "--n_gpus", "2", "--device", "cpu",
                                 "--dtype", "fp32", "--port", str(port), "--max_seq_len", str(2 * LONG)], port, log)
    followers = [p for p in descendants(server.pid) if "spawn_main" in command_line(p)]
    yield server, client, followers
    stop_demo(server)


def test_multi_turn_two_processes_answer_like_generate(multi_turn_2, tiny_llama_model):
    server, client, followers = multi_turn_2
    assert len(followers) == 1, [command_line(p) for p in descendants(server.pid)]  # rank 1, spawned
    # sampled: each rank has its own random state, the engine makes them take rank 0's tokens
    _, history = client.predict("Hi", [], api_name="/show_user_input")
    sampled = client.predict(history, "default", 16, 1.0, 1.0, api_name="/stream_model_output")
    assert multi_turn.messages_to_qas(sampled)[-1][1] is not None
    history = []
    for question in ("Hi", "Name a fruit."):
        _, history = client.predict(question, history, api_name="/show_user_input")
        history = client.predict(history, "default", GEN["max_gen_len"], GEN["temperature"], GEN["top_p"],
                                 api_name="/stream_model_output")
    qas = multi_turn.messages_to_qas(history)
    assert [qa[0] for qa in qas] == ["Hi", "Name a fruit."]
    for turn in range(2):
        expected = _expected_chat_answer(tiny_llama_model, qas[:turn] + [[qas[turn][0], None]])
        assert expected and qas[turn][1] == expected


def test_multi_turn_two_processes_stop(multi_turn_2, tiny_llama_model):
    """Cancel a long answer (what Stop does): rank 1 stops with rank 0 and the next answer is right."""
    server, client, followers = multi_turn_2
    (follower,) = followers
    _, history = client.predict("Tell me a long story.", [], api_name="/show_user_input")
    job = client.submit(history, "default", LONG, 0.0, 0.75, api_name="/stream_model_output")
    deadline = time.time() + 60
    while len(job.outputs()) < 5 and time.time() < deadline:
        time.sleep(0.01)
    assert len(job.outputs()) >= 5, "the answer never started streaming"
    assert job.cancel()
    time.sleep(1.0)
    idle = cpu_ticks(follower)
    time.sleep(2.0)
    idle = cpu_ticks(follower) - idle
    assert idle <= 20, idle  # at most 0.2 s of CPU in 2 s: rank 1 is not decoding on
    chunks = job.outputs()
    assert 5 <= len(chunks) < LONG // 4  # cut short
    streamed = multi_turn.messages_to_qas(chunks[-1])[-1][1]
    longer = _expected_chat_answer(tiny_llama_model, [["Tell me a long story.", None]], 300)
    assert longer.startswith(streamed) or streamed.startswith(longer)
    # the ranks are still in step: the next answer (a new prompt, a new length) is the whole model's
    _, history = client.predict("Name a fruit.", [], api_name="/show_user_input")
    history = client.predict(history, "default", GEN["max_gen_len"], 0.0, 0.75, api_name="/stream_model_output")
    assert multi_turn.messages_to_qas(history)[-1][1] == _expected_chat_answer(tiny_llama_model,
                                                                               [["Name a fruit.", None]])


def test_multi_turn_two_processes_shut_down_together(multi_turn_2):
    """SIGTERM to the demo (rank 0): it tells rank 1 to exit, and nothing is left running."""
    server, _, followers = multi_turn_2
    below = descendants(server.pid)
    assert followers and set(followers) <= set(below)
    code = stop_demo(server, timeout_s=30)
    assert code is not None and code != -signal.SIGKILL, "the demo did not exit on SIGTERM"
    assert wait_gone(below, 15) == [], [command_line(p) for p in below]


# ------------------------------------------------------------------ single_turn under torchrun (start.sh)

def test_single_turn_under_torchrun_from_start_sh(tiny_llama_dir, tiny_llama_model, tmp_path):
    """``start.sh --scenario 1 --nproc 2``: torchrun starts two single_turn processes; the page's
    answer is the whole model's; killing torchrun (SIGKILL: no chance to clean up) ends both."""
    port = free_port()
    server, client = start_demo(["bash", str(REPO / "accessory/demos/start.sh"), "--scenario", "1", "--nproc", "2",
                                 "--pretrained_path", str(tiny_llama_dir), "--dtype", "fp32", "--port", str(port),
                                 "--", "--device", "cpu"], port, tmp_path / "demo.log",
                                env={"PYTHON": sys.executable})
    try:
        ranks = [p for p in descendants(server.pid) if "accessory.demos.single_turn" in command_line(p)]
        assert len(ranks) == 2, [command_line(p) for p in descendants(server.pid)]
        for question in ("Name a fruit.", "Count to three."):
            served = client.predict(question, "", "alpaca", GEN["max_gen_len"], 0.0, 0.75, api_name="/run")
            prompt = format_prompt({"instruction": question}, "alpaca")
            assert served == tiny_llama_model.generate([prompt], **GEN)[0].strip()
        os.kill(server.pid, signal.SIGKILL)  # torchrun itself (start.sh execs it)
        server.wait(timeout=10)
        assert wait_gone(ranks, 15) == [], [command_line(p) for p in ranks]
    finally:
        stop_demo(server)


# ------------------------------------------------------------------ clear errors

def test_more_processes_than_the_heads_divide(tiny_llama_dir, tmp_path):
    """--n_gpus 3 for a model with 4 query heads: every process exits, with one message that says why."""
    out = subprocess.run([sys.executable, "-m", "accessory.demos.multi_turn", "--pretrained_path", str(tiny_llama_dir),
                          "--n_gpus", "3", "--device", "cpu", "--port", str(free_port())], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert out.returncode != 0
    assert "not divisible by the model-parallel size 3" in out.stderr and "--n_gpus" in out.stderr, out.stderr
    assert out.stderr.count("not divisible") == 1, out.stderr  # rank 0 says it once


def test_process_count_errors(monkeypatch, tiny_llama_dir):
    import torch

    with pytest.raises(SystemExit, match="--n_gpus=0: give 1 or more"):
        multi_turn.main(["--pretrained_path", str(tiny_llama_dir), "--n_gpus", "0"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun, --n_gpus may only repeat its count
    with pytest.raises(SystemExit, match="--n_gpus=3 under torchrun with 2 processes"):
        multi_turn.main(["--pretrained_path", str(tiny_llama_dir), "--n_gpus", "3"])
    monkeypatch.delenv("WORLD_SIZE")
    args = multi_turn.build_parser().parse_args(["--device", "cuda", "--n_gpus", "4"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit, match=r"--n_gpus=4 runs one process per GPU, but CUDA sees 2 GPU\(s\); "
                                         r"use --n_gpus=2 or --device cpu"):
        parallel.plan_backend(args, 4, "--n_gpus")
    assert parallel.plan_backend(args, 2, "--n_gpus") == "nccl"
    args.device = "cpu"
    assert parallel.plan_backend(args, 4, "--n_gpus") == "gloo"  # on the CPU: 4 processes


# ------------------------------------------------------------------ the protocol, in-process

class QueueChannel:
    """Channel's four calls over a queue: rank 0's end sends, the follower's end receives."""

    def __init__(self, box):
        self.box = box

    def send(self, request):
        self.box.put(("request", request))

    def send_flag(self, go_on):
        self.box.put(("flag", go_on))

    def receive(self):
        kind, value = self.box.get(timeout=10)
        assert kind == "request", (kind, value)
        return value

    def receive_flag(self):
        kind, value = self.box.get(timeout=10)
        assert kind == "flag", (kind, value)
        return value


class StepModel:
    """A stand-in model that records each call and each step it takes."""

    def __init__(self):
        self.steps = []
        self.calls = []

    def generate(self, prompts, images=None, **kwargs):
        self.calls.append(("generate", prompts[0], images))
        return [prompts[0].upper()]

    def stream_generate(self, prompt, image=None, max_gen_len=3, **kwargs):
        self.calls.append(("stream_generate", prompt, image))
        if prompt == "bad":
            raise ValueError("prompt too long")
        for step in range(max_gen_len):
            self.steps.append((prompt, step))
            yield {"text": prompt[: step + 1], "end_of_content": step == max_gen_len - 1}


def test_leader_and_follower_step_together():
    import torch

    box = queue.Queue()
    rank0, rank1 = StepModel(), StepModel()
    follower = threading.Thread(target=parallel.follow, args=(rank1, QueueChannel(box)))
    follower.start()
    leader = parallel.Leader(rank0, QueueChannel(box))
    image = torch.ones(1, 3, 2, 2)

    assert [c["text"] for c in leader.stream_generate("abcd", image, max_gen_len=4)] == ["a", "ab", "abc", "abcd"]
    stream = leader.stream_generate("xyz", max_gen_len=3)  # Stop after two chunks: the consumer closes it
    assert next(stream)["text"] == "x" and next(stream)["text"] == "xy"
    stream.close()
    abandoned = leader.stream_generate("pq", max_gen_len=2)  # dropped after one chunk without closing
    assert next(abandoned)["text"] == "p"
    assert leader.generate(["hello"]) == ["HELLO"]  # the next call first stops the abandoned stream
    with pytest.raises(ValueError, match="too long"):
        list(leader.stream_generate("bad"))
    assert leader.generate(["again"]) == ["AGAIN"]
    leader.shutdown()
    follower.join(timeout=10)
    assert not follower.is_alive()
    assert rank1.steps == rank0.steps == [("abcd", 0), ("abcd", 1), ("abcd", 2), ("abcd", 3), ("xyz", 0), ("xyz", 1),
                                          ("pq", 0)]
    assert [c[:2] for c in rank1.calls] == [c[:2] for c in rank0.calls]
    assert torch.equal(rank1.calls[0][2], image)
    with pytest.raises(RuntimeError, match="shutting down"):
        leader.generate(["late"])
