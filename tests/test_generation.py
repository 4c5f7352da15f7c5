"""Generation through the public API: batching, per-row limits, stop strings, streaming."""


import pytest
import torch

from accessory.generation.detokenize import IncrementalDetokenizer
from accessory.generation.sampling import SamplingParams, apply_min_p, apply_top_k, apply_top_p
from accessory.generation.stopping import StopStringMatcher
from accessory.model.meta import MetaModel
from accessory.model.tokenizer import Tokenizer

from ckpt_utils import TINY_LLAMA, random_llama_state, tokenizer_fixture, write_checkpoint

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog and then", "1 2 3"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    state = random_llama_state(TINY_LLAMA, 32000, seed=3)
    directory = write_checkpoint(tmp_path_factory.mktemp("gen"), state, TINY_LLAMA)
    return MetaModel.from_pretrained(str(directory), max_seq_len=96, dtype=torch.float32, device="cpu")


def greedy_reference(model, ids, n):
    """Full forward over the growing sequence, argmax each time: no cache, no batching."""
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = model.llma.forward(torch.tensor([ids]))[0, -1]
        token = int(logits.argmax())
        if token == model.tokenizer.eos_id:
            break
        out.append(token)
        ids.append(token)
    return out


def run_tokens(model, prompts, max_new):
    ids = [model.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    states = None
    for states in model.engine.run(ids, max_new, SamplingParams()):
        pass
    return ids, [s.new_tokens for s in states]


def test_batched_greedy_equals_reference(model):
    ids, got = run_tokens(model, PROMPTS, [10, 10, 10])
    for prompt_ids, tokens in zip(ids, got):
        assert tokens == greedy_reference(model, prompt_ids, 10)


def test_each_row_stops_at_its_own_max_gen_len(model):
    _, got = run_tokens(model, PROMPTS, [3, 7, 1])
    assert [len(t) for t in got] == [3, 7, 1]
    # shorter limits give a prefix of the longer run
    _, longer = run_tokens(model, PROMPTS, [7, 7, 7])
    assert got[0] == longer[0][:3] and got[2] == longer[2][:1]


def test_generate_batch_equals_single(model):
    batch = model.generate(PROMPTS, max_gen_len=9)
    singles = [model.generate([p], max_gen_len=9)[0] for p in PROMPTS]
    assert batch == singles
    assert all(isinstance(t, str) and t for t in batch)


def test_stop_string_cuts_text_and_stream_agrees(model):
    full = model.generate([PROMPTS[1]], max_gen_len=16)[0]
    assert len(full) > 8
    stop = full[4:7]  # may span a token boundary
    expected = full[: full.index(stop)]
    assert model.generate([PROMPTS[1]], max_gen_len=16, additional_stop_symbols=[stop])[0] == expected
    chunks = list(model.stream_generate(PROMPTS[1], max_gen_len=16, additional_stop_symbols=[stop]))
    assert chunks[-1] == {"text": expected, "end_of_content": True}
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "streamed text must only grow"
    assert all(stop not in t for t in texts)
    assert all(not c["end_of_content"] for c in chunks[:-1])


def test_stream_without_stop_ends_with_full_text(model):
    chunks = list(model.stream_generate(PROMPTS[0], max_gen_len=8))
    assert chunks[-1]["end_of_content"] is True
    assert chunks[-1]["text"] == model.generate([PROMPTS[0]], max_gen_len=8)[0]


def test_long_prompt_is_cut_from_the_left_keeping_bos(model):
    long_prompt = " ".join(["word"] * 200)
    ids = model.tokenizer.encode(long_prompt, bos=True, eos=False)
    assert len(ids) > 96
    with pytest.warns(UserWarning, match="does not fit"):
        fitted, gen = model._fit_prompt(ids, 16)
    assert gen == 16 and len(fitted) == 96 - 16
    assert fitted[0] == model.tokenizer.bos_id and fitted[1:] == ids[-(96 - 16 - 1):]
    with pytest.warns(UserWarning):
        out = model.generate([long_prompt], max_gen_len=16)
    assert isinstance(out[0], str)


def test_seeded_sampling_is_reproducible(model):
    a = model.generate(PROMPTS[:2], max_gen_len=10, temperature=0.9, top_p=0.9, seed=1234)
    b = model.generate(PROMPTS[:2], max_gen_len=10, temperature=0.9, top_p=0.9, seed=1234)
    assert a == b


def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # 0.644, 0.237, 0.087, 0.032
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert torch.isinf(apply_top_p(logits, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(apply_top_p(logits, 0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(apply_min_p(logits, 0.2)).tolist() == [[False, False, True, True]]


def test_stop_matcher_holds_back_partial_symbols():
    matcher = StopStringMatcher(["###", "\nUser:"])
    assert matcher.check("Hello #") == (False, len("Hello "))
    assert matcher.check("Hello ##") == (False, len("Hello "))
    assert matcher.check("Hello ###x") == (True, len("Hello "))
    assert matcher.check("a\nUs") == (False, 1)
    assert matcher.check("a # b") == (False, 5)


@pytest.mark.parametrize("fixture", ["llama-spm/tokenizer.model", "llama-spm", "gpt-2", "llama-bpe", "qwen2"])
def test_incremental_detokenizer_is_utf8_safe(fixture):
    """SentencePiece byte fallback and byte-level BPE both split characters over tokens."""
    name, _, file = fixture.partition("/")
    path = tokenizer_fixture(name) / file if file else tokenizer_fixture(name)
    tokenizer = Tokenizer(str(path))
    text = "Grüße 🦙 日本語 — naïve café 👍🏽 end"
    ids = tokenizer.encode(text, bos=False, eos=False)
    assert len(ids) > len(text.split())  # characters really are spread over tokens
    detok = IncrementalDetokenizer(tokenizer)
    seen = []
    for token in ids:
        detok.add(token)
        seen.append(detok.text)
    detok.flush()
    assert detok.text == tokenizer.decode(ids) == text
    assert all("\ufffd" not in s for s in seen)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))


def test_cuda_graphs_are_on_for_a_gpu_unless_turned_off_or_model_parallel(monkeypatch):
    from accessory.generation.cuda_graphs import cuda_graphs_enabled
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("ACCESSORY_CUDA_GRAPHS", raising=False)
    assert cuda_graphs_enabled(gpu) and not cuda_graphs_enabled(cpu)
    assert not cuda_graphs_enabled(gpu, model_parallel=True)
    assert not cuda_graphs_enabled(gpu, wanted=False) and cuda_graphs_enabled(gpu, wanted=True, model_parallel=True)
    assert not cuda_graphs_enabled(cpu, wanted=True)
    for off in ("0", "false", "no", "off"):
        monkeypatch.setenv("ACCESSORY_CUDA_GRAPHS", off)
        assert not cuda_graphs_enabled(gpu)
    monkeypatch.setenv("ACCESSORY_CUDA_GRAPHS", "1")
    assert cuda_graphs_enabled(gpu, model_parallel=True) and not cuda_graphs_enabled(gpu, wanted=False)
