"""The OpenAI-compatible server (accessory/serve): a real HTTP server on a free port over a tiny random
llama with the Llama 2 tokenizer, asked with urllib / http.client (and the ``openai`` client when it
is installed). Every answer is checked against ``MetaModel.generate`` on the prompt the request
implies; the last test starts ``python -m accessory serve`` on the embedded demo model."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from accessory.data.conversation import conv_templates
from accessory.serve import OpenAIService, start_in_thread

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-llama"
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def server(tiny_llama_model):
    srv, thread = start_in_thread(OpenAIService(tiny_llama_model, NAME, "default"), port=0)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


# ------------------------------------------------------------------ helpers

def _request(server, method, path, body=None, raw=None, timeout=60):
    """(status, parsed JSON body) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _post(server, path, body):
    status, result = _request(server, "POST", path, body)
    assert status == 200, result
    return result


def _stream(server, path, body):
    """The parsed ``data:`` events of a streamed response (checks the SSE framing and [DONE])."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("POST", path, json.dumps(dict(body, stream=True)), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    text = response.read().decode()
    connection.close()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events), text
    assert events[-1] == "data: [DONE]"
    return [json.loads(event[len("data: "):]) for event in events[:-1]]


def _chat_prompt(qas, system=None, template="default"):
    conversation = conv_templates[template]()
    if system is not None:
        conversation.system = system
    conversation.load_qas(qas)
    return conversation.get_prompt(), conversation.response_end_signal


def _prompt_tokens(model, prompt):
    return len(model.tokenizer.encode(prompt, bos=model.tokenizer.add_bos, eos=False))


def _generate(model, prompt, **kwargs):
    """generate's dict (text, tokens, logprobs, top_logprobs) for one prompt."""
    return model.generate([prompt], return_logprobs=True, **kwargs)[0]


def _finish(result, max_tokens):
    return "length" if len(result["tokens"]) == max_tokens else "stop"


def _error(status_and_body, status, param=None, code=None):
    got_status, body = status_and_body
    assert got_status == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], body
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error["message"]


# ------------------------------------------------------------------ models and chat

def test_models(server):
    status, body = _request(server, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [NAME] and body["data"][0]["object"] == "model"
    assert _request(server, "GET", f"/v1/models/{NAME}")[1]["id"] == NAME
    _error(_request(server, "GET", "/v1/models/gpt-4"), 404, "model", "model_not_found")


def test_chat_equals_generate(server, tiny_llama_model):
    question = "Name three fruits."
    body = _post(server, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": question}],
                                                   "max_tokens": 12, **GREEDY})
    prompt, stop = _chat_prompt([[question, None]])
    expected = _generate(tiny_llama_model, prompt, max_gen_len=12, additional_stop_symbols=[stop], **GREEDY)
    assert expected["text"].strip()
    assert body["object"] == "chat.completion" and body["model"] == NAME and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == expected["text"].lstrip()
    assert choice["finish_reason"] == _finish(expected, 12) and choice["logprobs"] is None
    prompt_tokens = _prompt_tokens(tiny_llama_model, prompt)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(expected["tokens"]),
                             "total_tokens": prompt_tokens + len(expected["tokens"]),
                             "prompt_tokens_details": {"cached_tokens": 0}}  # this model's prompt cache is off


def test_chat_history_and_system_message_follow_the_template(server, tiny_llama_model):
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]}]
    body = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 10, **GREEDY})
    prompt, stop = _chat_prompt([["Hi", "Hello!"], ["What is 2+2?", None]], system="You answer briefly.")
    expected = _generate(tiny_llama_model, prompt, max_gen_len=10, additional_stop_symbols=[stop], **GREEDY)
    assert body["choices"][0]["message"]["content"] == expected["text"].lstrip()
    assert body["usage"]["prompt_tokens"] == _prompt_tokens(tiny_llama_model, prompt)


def test_next_chat_turn_reuses_the_prompt_cache(tiny_llama_dir, tiny_llama_model):
    """With the prompt cache on (as ``accessory serve`` has it), the second turn of a conversation
    prefills only what the first left out, says so in its usage, and answers as a fresh run."""
    from accessory.model.meta import MetaModel
    model = MetaModel.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, device="cpu", progress=False)
    model.engine.prompt_cache = True
    srv, thread = start_in_thread(OpenAIService(model, NAME, "default"), port=0)
    try:
        first = [{"role": "user", "content": "Tell me a story."}]
        body = _post(srv, "/v1/chat/completions", {"messages": first, "max_tokens": 12, **GREEDY})
        answer = body["choices"][0]["message"]["content"]
        assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
        body = _post(srv, "/v1/chat/completions", {"messages": second, "max_tokens": 12, **GREEDY})
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
    prompt, stop = _chat_prompt([["Tell me a story.", answer], ["And then?", None]])
    first_prompt_tokens = _prompt_tokens(model, _chat_prompt([["Tell me a story.", None]])[0])
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= first_prompt_tokens
    expected = _generate(tiny_llama_model, prompt, max_gen_len=12, additional_stop_symbols=[stop], **GREEDY)
    assert body["choices"][0]["message"]["content"] == expected["text"].lstrip()


def test_chat_stream_concatenates_to_the_same_text(server):
    request = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 14, **GREEDY}
    whole = _post(server, "/v1/chat/completions", request)
    chunks = _stream(server, "/v1/chat/completions", dict(request, stream_options={"include_usage": True}))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    *content_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in content_chunks)
    deltas = [c["choices"][0]["delta"] for c in content_chunks]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert len(deltas) > 2  # really streamed, not one block
    assert "".join(d.get("content", "") for d in deltas) == whole["choices"][0]["message"]["content"]
    reasons = [c["choices"][0]["finish_reason"] for c in content_chunks]
    assert reasons[-1] == whole["choices"][0]["finish_reason"] and set(reasons[:-1]) == {None}


# ------------------------------------------------------------------ completions

def test_completion_equals_generate_and_streams_the_same(server, tiny_llama_model):
    prompt = "The capital of France is"
    body = _post(server, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 10, **GREEDY})
    expected = _generate(tiny_llama_model, prompt, max_gen_len=10, **GREEDY)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice["text"] == expected["text"] and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 10
    assert body["usage"]["prompt_tokens"] == _prompt_tokens(tiny_llama_model, prompt)
    chunks = _stream(server, "/v1/completions", {"prompt": prompt, "max_tokens": 10, **GREEDY})
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # token ids as the prompt give the same answer
    ids = tiny_llama_model.tokenizer.encode(prompt, bos=True, eos=False)
    assert _post(server, "/v1/completions", {"prompt": ids, "max_tokens": 10, **GREEDY})["choices"][0]["text"] \
        == expected["text"]


def test_stop_strings(server, tiny_llama_model):
    prompt = "Once upon a time"
    full = _generate(tiny_llama_model, prompt, max_gen_len=16, **GREEDY)["text"]
    assert len(full) > 12, full
    stop = full[6:9]
    cut = full[:full.index(stop)]
    for stops in (stop, ["never written \u2603", stop]):
        body = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 16, "stop": stops, **GREEDY})
        assert body["choices"][0]["text"] == cut
        assert body["choices"][0]["finish_reason"] == "stop"
        chunks = _stream(server, "/v1/completions", {"prompt": prompt, "max_tokens": 16, "stop": stops, **GREEDY})
        assert "".join(c["choices"][0]["text"] for c in chunks) == cut
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert cut == tiny_llama_model.generate([prompt], max_gen_len=16, additional_stop_symbols=[stop], **GREEDY)[0]


def test_max_tokens_gives_finish_reason_length(server):
    for max_tokens in (1, 5):
        body = _post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": max_tokens, **GREEDY})
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == max_tokens


def test_sampling_settings_reach_the_engine(server, tiny_llama_model):
    prompt = "A list of colours:"
    settings = dict(temperature=0.9, top_p=0.9, seed=7)
    extras = dict(top_k=40, min_p=0.02, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2)
    body = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, **settings, **extras})
    expected = tiny_llama_model.generate([prompt], max_gen_len=12, **settings, **extras)[0]
    assert body["choices"][0]["text"] == expected
    # n > 1 runs as one batch: choice r samples with seed + r, as generate's batch row r does
    body = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "n": 3, **settings})
    expected = tiny_llama_model.generate([prompt] * 3, max_gen_len=12, **settings)
    assert [c["text"] for c in body["choices"]] == expected
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len(set(expected)) > 1
    assert body["usage"]["prompt_tokens"] == _prompt_tokens(tiny_llama_model, prompt)


def test_n_and_several_prompts_stream_by_index(server, tiny_llama_model):
    prompts = ["First prompt", "Second one"]
    chunks = _stream(server, "/v1/completions", {"prompt": prompts, "max_tokens": 6, "n": 2, "seed": 3,
                                                 "temperature": 0.8})
    texts = ["", "", "", ""]
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["text"]
    expected = tiny_llama_model.generate([prompts[0]] * 2 + [prompts[1]] * 2, max_gen_len=6, temperature=0.8,
                                         top_p=1.0, seed=3)
    assert texts == expected


# ------------------------------------------------------------------ logprobs

def test_completion_logprobs(server, tiny_llama_model):
    prompt = "The weather today"
    body = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "logprobs": 3, **GREEDY})
    expected = _generate(tiny_llama_model, prompt, max_gen_len=8, top_logprobs=3, **GREEDY)
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 8
    assert logprobs["token_logprobs"] == pytest.approx(expected["logprobs"], abs=1e-6)
    assert "".join(logprobs["tokens"]) == body["choices"][0]["text"]
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(8)]
    for token, value, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(value)  # greedy: the best token
        assert top[token] == pytest.approx(value)
    streamed = _stream(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "logprobs": 3, **GREEDY})
    assert [lp for c in streamed if c["choices"][0]["logprobs"]
            for lp in c["choices"][0]["logprobs"]["token_logprobs"]] == pytest.approx(expected["logprobs"], abs=1e-6)


def test_chat_logprobs(server, tiny_llama_model):
    request = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "logprobs": True,
               "top_logprobs": 2, **GREEDY}
    body = _post(server, "/v1/chat/completions", request)
    prompt, stop = _chat_prompt([["Hi", None]])
    expected = _generate(tiny_llama_model, prompt, max_gen_len=6, additional_stop_symbols=[stop], top_logprobs=2,
                         **GREEDY)
    content = body["choices"][0]["logprobs"]["content"]
    assert [entry["logprob"] for entry in content] == pytest.approx(expected["logprobs"], abs=1e-6)
    for entry, pairs in zip(content, expected["top_logprobs"]):
        assert entry["bytes"] == list(entry["token"].encode())
        assert [alt["logprob"] for alt in entry["top_logprobs"]] == pytest.approx([lp for _, lp in pairs], abs=1e-6)
        assert entry["top_logprobs"][0]["token"] == entry["token"]
    assert "".join(entry["token"] for entry in content).lstrip() == body["choices"][0]["message"]["content"]
    assert _post(server, "/v1/chat/completions", dict(request, logprobs=False, top_logprobs=None))["choices"][0][
        "logprobs"] is None


# ------------------------------------------------------------------ errors

def test_bad_requests_get_openai_errors(server):
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    post = lambda path, body: _request(server, "POST", path, body)  # noqa: E731
    assert "gpt-4" in _error(post("/v1/chat/completions", dict(chat, model="gpt-4")), 400, "model", "model_not_found")
    _error(post("/v1/chat/completions", dict(chat, temperature="hot")), 400, "temperature", "invalid_type")
    _error(post("/v1/chat/completions", dict(chat, temperature=3)), 400, "temperature", "invalid_value")
    _error(post("/v1/chat/completions", dict(chat, max_tokens=True)), 400, "max_tokens", "invalid_type")
    _error(post("/v1/chat/completions", dict(chat, max_tokens=0)), 400, "max_tokens")
    _error(post("/v1/chat/completions", dict(chat, stream="yes")), 400, "stream")
    _error(post("/v1/chat/completions", dict(chat, stop=[1])), 400, "stop")
    _error(post("/v1/chat/completions", dict(chat, n=0)), 400, "n")
    _error(post("/v1/chat/completions", dict(chat, n=100)), 400, "n")
    _error(post("/v1/chat/completions", dict(chat, logit_bias={"50": 5})), 400, "logit_bias", "unsupported_parameter")
    _error(post("/v1/chat/completions", {"max_tokens": 4}), 400, "messages", "missing_required_parameter")
    _error(post("/v1/chat/completions", dict(chat, messages=[])), 400, "messages")
    _error(post("/v1/chat/completions", dict(chat, messages=[{"role": "assistant", "content": "x"}])), 400,
           "messages[0].role")
    _error(post("/v1/chat/completions", dict(chat, messages=[{"role": "user", "content": "a"},
                                                              {"role": "assistant", "content": "b"}])), 400,
           "messages")
    _error(post("/v1/chat/completions", dict(chat, messages=[{"role": "user", "content": 5}])), 400,
           "messages[0].content")
    _error(post("/v1/chat/completions", dict(chat, top_logprobs=2)), 400, "top_logprobs")
    _error(post("/v1/completions", {"prompt": 5}), 400, "prompt")
    _error(post("/v1/completions", {"prompt": "x", "logprobs": 9}), 400, "logprobs")
    _error(post("/v1/completions", {"prompt": "x", "echo": True}), 400, "echo")
    _error(post("/v1/completions", ["not", "an", "object"]), 400)
    _error(_request(server, "POST", "/v1/completions", raw=b"{not json"), 400, None, "invalid_json")
    _error(_request(server, "POST", "/v1/completions", raw=b""), 400, None, "invalid_json")
    _error(_request(server, "POST", "/v1/embeddings", {"input": "x"}), 404, None, "unknown_url")
    _error(_request(server, "GET", "/nowhere"), 404)
    _error(_request(server, "GET", "/v1/chat/completions"), 405)


def test_prompt_longer_than_the_context_is_refused(server, tiny_llama_model):
    context = tiny_llama_model.args.max_seq_len
    message = _error(_request(server, "POST", "/v1/completions", {"prompt": "hello " * (context + 10)}), 400,
                     "prompt", "context_length_exceeded")
    assert str(context) in message
    _error(_request(server, "POST", "/v1/completions", {"prompt": "hello", "max_tokens": context}), 400, "prompt",
           "context_length_exceeded")
    _error(_request(server, "POST", "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "hi " * (context + 10)}]}), 400, "messages",
           "context_length_exceeded")


# ------------------------------------------------------------------ concurrency and disconnects

def test_requests_waiting_together_run_as_one_batch(server, tiny_llama_model):
    """While one long answer runs, five requests arrive: the four with equal settings run as one batch
    after it, the one with other settings on its own; every answer equals generate's for its prompt."""
    sizes = server.service.scheduler.batch_sizes
    before = len(sizes)
    results = {}

    def ask(key, body):
        results[key] = _post(server, "/v1/completions", dict(body, **GREEDY))

    long_one = threading.Thread(target=ask, args=("long", {"prompt": "Long", "max_tokens": 150}))
    long_one.start()
    while len(sizes) == before:  # the long answer is running
        time.sleep(0.005)
    prompts = [f"Question number {i}:" for i in range(4)] + ["With a stop string:"]
    threads = [threading.Thread(target=ask, args=(p, {"prompt": p, "max_tokens": 8, **({"stop": "zz"} if "stop" in p
                                                                                          else {})}))
               for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads + [long_one]:
        thread.join(timeout=300)
    assert sorted(sizes[before:]) == [1, 1, 4], sizes[before:]
    for prompt in prompts:
        stops = ["zz"] if "stop" in prompt else []
        expected = tiny_llama_model.generate([prompt], max_gen_len=8, additional_stop_symbols=stops, **GREEDY)[0]
        assert results[prompt]["choices"][0]["text"] == expected
    assert results["long"]["usage"]["completion_tokens"] == 150


def test_a_client_leaving_a_stream_frees_the_model(server):
    host, port = server.server_address[:2]
    sock = socket.create_connection((host, port), timeout=30)
    body = json.dumps({"prompt": "Go on forever", "max_tokens": 3000, "stream": True, **GREEDY}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while b"data: " not in received:  # the headers, then the first event: generation is under way
        received += sock.recv(4096)
    sock.close()
    started = time.time()
    body = _post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, **GREEDY})
    assert body["usage"]["completion_tokens"] == 2
    assert time.time() - started < 30  # not after the abandoned 3000 tokens


# ------------------------------------------------------------------ the openai client

def test_openai_client(server, tiny_llama_model):
    openai = pytest.importorskip("openai", reason="the openai package is not installed (optional)")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                           temperature=0)
    prompt, stop = _chat_prompt([["Hi", None]])
    expected = tiny_llama_model.generate([prompt], max_gen_len=8, additional_stop_symbols=[stop], **GREEDY)[0]
    assert reply.choices[0].message.content == expected.lstrip()
    streamed = client.completions.create(model=NAME, prompt="Hi", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == tiny_llama_model.generate(["Hi"], max_gen_len=8,
                                                                                     **GREEDY)[0]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])


# ------------------------------------------------------------------ the command line

def test_serve_help():
    out = subprocess.run([sys.executable, "-m", "accessory.serve", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "/v1/chat/completions" in out.stdout and "--model-name" in out.stdout


@pytest.mark.parametrize("flag", ["--prompt_cache_slots", "--prompt_cache_mb"])
def test_serve_refuses_a_negative_prompt_cache_bound(capsys, flag):
    from accessory.serve.cli import main
    assert main([flag, "-1"]) == 2
    assert f"{flag} must be 0 or more" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accessory_serve_subprocess_on_embedded_model():
    """As a user starts it: `python -m accessory serve` (no path: the embedded SmolLM2), one chat question."""
    import torch

    from accessory.checkpoint.demo_model import DEMO_MODEL_NAME, default_cache_dir
    from accessory.model.meta import MetaModel

    model_dir = default_cache_dir() / "models" / DEMO_MODEL_NAME
    if not (model_dir / "config.json").is_file():
        pytest.skip(f"the embedded demo model is not built yet at {model_dir} (run `accessory chat` once)")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "accessory", "serve", "--port", str(port), "--dtype", "fp32",
                               "--device", "cpu", "--quiet"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    question = "What is the capital of France?"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=5) as response:
                    models = json.loads(response.read())
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    output = server.stdout.read() if server.poll() is not None else ""
                    pytest.fail(f"the server did not start: {output}")
                time.sleep(1)
        assert [m["id"] for m in models["data"]] == [DEMO_MODEL_NAME]
        request = urllib.request.Request(url + "/v1/chat/completions", method="POST", data=json.dumps(
            {"model": DEMO_MODEL_NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 24,
             "temperature": 0}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
        answer = reply["choices"][0]["message"]["content"]
        follow_up = urllib.request.Request(url + "/v1/chat/completions", method="POST", data=json.dumps(
            {"model": DEMO_MODEL_NAME, "max_tokens": 8, "temperature": 0, "messages": [
                {"role": "user", "content": question}, {"role": "assistant", "content": answer},
                {"role": "user", "content": "And of Italy?"}]}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(follow_up, timeout=120) as response:
            second = json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    # the served model keeps the first turn's keys and values: the second turn prefills only its new part
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= reply["usage"]["prompt_tokens"] - 1
    assert second["choices"][0]["message"]["content"]
    model = MetaModel.from_pretrained(str(model_dir), dtype=torch.float32, device="cpu", progress=False)
    prompt, stop = _chat_prompt([[question, None]], template="smollm2")
    expected = model.generate([prompt], max_gen_len=24, additional_stop_symbols=[stop], **GREEDY)[0]
    assert reply["choices"][0]["message"]["content"] == expected.lstrip()
    assert "Paris" in expected
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_a_cancelled_job_leaves_its_batch_and_the_others_go_on(tiny_llama_model):
    """Two jobs in one batch: cancelling the first stops its row; the second still gets generate's text."""
    from accessory.generation.sampling import SamplingParams
    from accessory.serve.batching import BatchScheduler, Job

    first_row_tokens = []

    def run(*args, **kwargs):
        for states in tiny_llama_model.engine.run(*args, **kwargs):
            if len(states) == 2:
                first_row_tokens.append(len(states[0].new_tokens))
            yield states

    scheduler = BatchScheduler(run)
    encode = lambda text: tiny_llama_model.tokenizer.encode(text, bos=True, eos=False)  # noqa: E731
    greedy = SamplingParams()
    # other stop strings: it runs alone, while a and b queue up behind it
    blocker = scheduler.submit(Job([encode("Wait")], [60], greedy, ["zz"], False, 0))
    a = scheduler.submit(Job([encode("First")], [100], greedy, [], False, 0))
    b = scheduler.submit(Job([encode("Second")], [40], greedy, [], False, 0))
    list(blocker)
    steps_a = iter(a)
    seen_a = [next(steps_a) for _ in range(5)]
    a.cancel()
    states_b = list(b)
    seen_a += list(steps_a)  # what the worker sent before it saw the cancel, then the end
    assert scheduler.batch_sizes == [1, 2]
    assert states_b[-1][0].visible == tiny_llama_model.generate(["Second"], max_gen_len=40, **GREEDY)[0]
    assert len(states_b) == len(first_row_tokens) == 40  # the batch went on for b
    tokens_a = max(first_row_tokens)
    assert tokens_a < 100 and not seen_a[-1][0].finished
    assert tokens_a - len(seen_a) in (0, 1)  # a's row stopped at the step the worker saw the cancel
    assert first_row_tokens[-1] == tokens_a


# ------------------------------------------------------------------ pictures (--with_visual)

def _data_url(seed, size=(40, 30), fmt="PNG"):
    import base64
    import io

    import numpy as np
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")  # (a JPEG's pixels are not the array's)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode(), decoded


def _asking(text, url):
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}


@pytest.fixture(scope="module")
def mm_server(tmp_path_factory):
    """A server over the test-only multimodal type (tests/multimodal_tiny.py), prompt cache on."""
    import multimodal_tiny as mt
    from accessory.model.LLM import unregister_llama_type
    from accessory.model.meta import MetaModel

    mt.register()
    directory = mt.write_checkpoint(tmp_path_factory.mktemp("serve_mm"), "tagged")
    model = MetaModel.from_pretrained(str(directory), with_visual=True, max_seq_len=256, dtype=torch.float32,
                                      device="cpu", progress=False)
    model.engine.prompt_cache = True
    srv, thread = start_in_thread(OpenAIService(model, NAME, "default"), port=0)
    yield srv, model
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)
    unregister_llama_type(mt.NAME)


def _fresh(model, prompt, picture, **kwargs):
    """generate on the picture as the server prepares it, the prompt cache off."""
    from accessory.data.transform import get_transform
    model.engine.prompt_cache = False
    try:
        return _generate(model, prompt, images=get_transform("padded_resize", model.image_size)(picture)[None],
                         **kwargs)
    finally:
        model.engine.prompt_cache = True


def test_a_chat_about_a_picture(mm_server):
    """A picture sent as OpenAI's vision API sends it (an image_url part, data URL): the answer is
    generate's on that picture; the picture's positions count as prompt tokens; the next turn,
    sending it again, reuses the picture and the first turn from the prompt cache."""
    srv, model = mm_server
    url, picture = _data_url(1)
    first = [_asking("What is in the picture?", url)]
    body = _post(srv, "/v1/chat/completions", {"messages": first, "max_tokens": 10, **GREEDY})
    answer = body["choices"][0]["message"]["content"]
    prompt, stop = _chat_prompt([["What is in the picture?", None]])
    expected = _fresh(model, prompt, picture, max_gen_len=10, additional_stop_symbols=[stop], **GREEDY)
    assert answer == expected["text"].lstrip()
    words = model.get_image_words()
    assert body["usage"]["prompt_tokens"] == _prompt_tokens(model, prompt) + words
    second = first + [{"role": "assistant", "content": answer}, _asking("And its colours?", url)]
    body = _post(srv, "/v1/chat/completions", {"messages": second, "max_tokens": 10, **GREEDY})
    prompt, stop = _chat_prompt([["What is in the picture?", answer], ["And its colours?", None]])
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= words + _prompt_tokens(
        model, _chat_prompt([["What is in the picture?", None]])[0])
    expected = _fresh(model, prompt, picture, max_gen_len=10, additional_stop_symbols=[stop], **GREEDY)
    assert body["choices"][0]["message"]["content"] == expected["text"].lstrip()
    # another picture, the same words: its own answer, nothing reused past BOS
    other_url, other = _data_url(2, fmt="JPEG")
    body = _post(srv, "/v1/chat/completions", {"messages": [_asking("What is in the picture?", other_url)],
                                               "max_tokens": 10, **GREEDY})
    prompt, stop = _chat_prompt([["What is in the picture?", None]])
    assert body["choices"][0]["message"]["content"] == _fresh(model, prompt, other, max_gen_len=10,
                                                              additional_stop_symbols=[stop], **GREEDY)["text"].lstrip()
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] <= 1


def test_pictures_the_server_cannot_take(mm_server, server):
    srv, model = mm_server
    url, _ = _data_url(3)
    other, _ = _data_url(4)

    def ask(target, messages):
        return _request(target, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 2})

    message = _error(ask(srv, [_asking("Hi", "https://example.com/cat.png")]), 400, "messages", "invalid_value")
    assert "data URL" in message
    assert "base64" in _error(ask(srv, [_asking("Hi", "data:image/png;base64,@@@")]), 400, "messages")
    assert "no picture" in _error(ask(srv, [_asking("Hi", "data:image/png;base64,aGVsbG8=")]), 400, "messages")
    two = [_asking("Hi", url), {"role": "assistant", "content": "Hello"}, _asking("And this?", other)]
    assert "one picture per conversation" in _error(ask(srv, two), 400, "messages")
    assert "--with_visual" in _error(ask(server, [_asking("Hi", url)]), 400, "messages")  # a text-only model
    room = model.args.max_seq_len - model.get_image_words()
    status, body = _request(srv, "POST", "/v1/chat/completions",
                            {"messages": [_asking("Hi", url)], "max_tokens": room})
    assert status == 400 and "for the picture" in body["error"]["message"]


def test_serve_flags_for_pictures():
    from accessory.serve.cli import build_parser
    args = build_parser().parse_args([])
    assert (args.with_visual, args.image_transform) == (False, "padded_resize")
    args = build_parser().parse_args(["--with_visual", "--image_transform", "resized_center_crop"])
    assert (args.with_visual, args.image_transform) == (True, "resized_center_crop")


def test_requests_with_different_pictures_share_a_batch(mm_server):
    """Waiting requests with their own pictures (and one without) run as one batch, each row with
    its own picture, and each answers as generate does alone."""
    srv, model = mm_server
    sizes = srv.service.scheduler.batch_sizes
    before = len(sizes)
    results = {}

    def ask(key, messages, max_tokens=8):
        results[key] = _post(srv, "/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens, **GREEDY})

    long_one = threading.Thread(target=ask, args=("long", [{"role": "user", "content": "Long"}], 200))
    long_one.start()
    while len(sizes) == before:  # the long answer is running
        time.sleep(0.005)
    pictures = {seed: _data_url(seed) for seed in (5, 6)}
    asks = {5: [_asking("Describe it.", pictures[5][0])], 6: [_asking("Describe it.", pictures[6][0])],
            "text": [{"role": "user", "content": "Describe it."}]}
    threads = [threading.Thread(target=ask, args=(key, messages)) for key, messages in asks.items()]
    for thread in threads:
        thread.start()
    for thread in threads + [long_one]:
        thread.join(timeout=120)
    assert sizes[before:] == [1, 3]
    prompt, stop = _chat_prompt([["Describe it.", None]])
    for seed in (5, 6):
        expected = _fresh(model, prompt, pictures[seed][1], max_gen_len=8, additional_stop_symbols=[stop], **GREEDY)
        assert results[seed]["choices"][0]["message"]["content"] == expected["text"].lstrip()
    model.engine.prompt_cache = False
    try:
        expected = _generate(model, prompt, max_gen_len=8, additional_stop_symbols=[stop], **GREEDY)
    finally:
        model.engine.prompt_cache = True
    assert results["text"]["choices"][0]["message"]["content"] == expected["text"].lstrip()
    assert results[5]["choices"][0]["message"]["content"] != results[6]["choices"][0]["message"]["content"]


def test_a_picture_streamed_with_two_choices(mm_server):
    """Streaming and n=2 take the picture too: both greedy choices stream the unstreamed answer."""
    srv, model = mm_server
    url, _ = _data_url(7)
    request = {"messages": [_asking("What is in the picture?", url)], "max_tokens": 8, **GREEDY}
    whole = _post(srv, "/v1/chat/completions", request)["choices"][0]["message"]["content"]
    chunks = _stream(srv, "/v1/chat/completions", dict(request, n=2))
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
    assert texts == [whole, whole] and whole
