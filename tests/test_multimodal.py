"""Images through MetaModel (generate, stream_generate, compute_logits, evaluate_examples), the
engine and the original's forward / forward_inference, on the test-only ``tiny_mm`` llama_type
(tests/multimodal_tiny.py) in both layouts.

The reference is HF transformers' LlamaForCausalLM on the same weights, fed ``inputs_embeds``
that the test builds itself from ORIGINAL-mm.md's layout rules (image vectors computed from the
raw encoder weights in float64), one full forward per token, no cache.
"""

import warnings

import pytest
import torch

from accessory.errors import ConfigError
from accessory.generation.sampling import SamplingParams
from accessory.model.layers.multimodal import insert_images, tag_views
from accessory.model.LLM import known_llama_types, load_llama_type, register_llama_type, unregister_llama_type
from accessory.model.meta import MetaModel

import multimodal_tiny as mt
from ckpt_utils import LLAMA_SPM_VOCAB, TINY_LLAMA, expected_evaluation

transformers = pytest.importorskip("transformers")
from test_llama_hf_parity import hf_model  # noqa: E402

PROMPTS = ["Describe the picture.", "What colour is the large object on the left?"]
GEN = dict(max_gen_len=10, temperature=0.0)


@pytest.fixture(scope="module", autouse=True)
def registered():
    mt.register()
    yield
    unregister_llama_type(mt.NAME)


def images(seed, n=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["tagged", "prefix"])
def case(request, tmp_path_factory, registered):
    layout = request.param
    state = mt.full_state(layout)
    directory = mt.write_checkpoint(tmp_path_factory.mktemp(f"mm_{layout}"), layout)
    model = MetaModel.from_pretrained(str(directory), with_visual=True, max_seq_len=64, dtype=torch.float32,
                                      device="cpu", progress=False)
    reference = hf_model(state, TINY_LLAMA, LLAMA_SPM_VOCAB, max_pos=128)
    return layout, state, model, reference, directory


def reference_embeds(state, layout, ids, image):
    """The sequence ORIGINAL-mm.md describes: tagged [t0, V.., t1..], prefix [V.., t0, t1..]."""
    text = state["tok_embeddings.weight"][torch.tensor(ids)].double()
    vectors = mt.image_vectors(state, image[None], layout)[0]
    parts = [text[:1], vectors, text[1:]] if layout == "tagged" else [vectors, text]
    return torch.cat(parts).float()


@torch.no_grad()
def reference_greedy(case, ids, image, n):
    layout, state, model, reference, _ = case
    embeds = reference_embeds(state, layout, ids, image)
    out = []
    for _ in range(n):
        token = int(reference(inputs_embeds=embeds[None]).logits[0, -1].argmax())
        if token == model.tokenizer.eos_id:
            break
        out.append(token)
        embeds = torch.cat([embeds, state["tok_embeddings.weight"][token][None]])
    return out


def test_image_words_is_the_inserted_count(case):
    layout, state, model, _, _ = case
    inserted = mt.image_vectors(state, images(0), layout).shape[1]
    assert model.get_image_words() == inserted == (6 if layout == "tagged" else 4)
    assert model.takes_images and model.image_size == 32


def test_greedy_generation_matches_full_forward_reference(case):
    _, _, model, _, _ = case
    image = images(1)[0]
    got = model.generate([PROMPTS[0]], image[None], return_logprobs=True, **GEN)[0]
    ids = model.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    assert got["tokens"] == reference_greedy(case, ids, image, GEN["max_gen_len"])
    assert len(got["tokens"]) >= 3


def test_generate_equals_stream_generate(case):
    _, _, model, _, _ = case
    image = images(2)
    expected = model.generate([PROMPTS[1]], image, **GEN)[0]
    for form in (image, image[0]):
        chunks = list(model.stream_generate(PROMPTS[1], form, **GEN))
        assert chunks[-1] == {"text": expected, "end_of_content": True}
        assert all(expected.startswith(c["text"]) for c in chunks)
    assert len(chunks) >= 2


def test_answer_depends_on_the_image(case):
    _, _, model, _, _ = case
    first = model.generate([PROMPTS[0]], images(3), **GEN)[0]
    second = model.generate([PROMPTS[0]], images(4), **GEN)[0]
    text_only_logits = model.compute_logits([PROMPTS[0]])[0]
    assert first != second
    assert not torch.allclose(model.compute_logits([PROMPTS[0]], images(3))[0], text_only_logits)


def test_batch_equals_each_alone(case):
    """Prompts of different lengths (right padding) with one image each, as a tensor or a list."""
    _, _, model, _, _ = case
    pair = torch.cat([images(5), images(6)])
    alone = [model.generate([p], pair[i:i + 1], **GEN)[0] for i, p in enumerate(PROMPTS)]
    assert model.generate(PROMPTS, pair, **GEN) == alone
    assert model.generate(PROMPTS, [pair[0], pair[1][None]], **GEN) == alone
    # rows stopping at different lengths: the finished one leaves, the other goes on unchanged
    short = model.generate(PROMPTS, pair, max_gen_len=10, temperature=0.0, additional_stop_symbols=[alone[0][:3]])
    assert short[1] == model.generate([PROMPTS[1]], pair[1:], max_gen_len=10, temperature=0.0,
                                      additional_stop_symbols=[alone[0][:3]])[0]


def test_compute_logits_are_text_aligned(case):
    """logits[i] predicts token i+1: the reference's rows N .. N+T-1 of the full sequence."""
    layout, state, model, reference, _ = case
    texts = ["A red square", "Two cats sit on a mat."]
    pair = torch.cat([images(7), images(8)])
    got = model.compute_logits(texts, pair)
    n_image = model.get_image_words()
    for text, image, logits in zip(texts, pair, got):
        ids = model.tokenizer.encode(text, bos=True, eos=False)
        with torch.no_grad():
            full = reference(inputs_embeds=reference_embeds(state, layout, ids, image)[None]).logits[0]
        assert logits.shape == (len(ids), LLAMA_SPM_VOCAB)
        torch.testing.assert_close(logits, full[n_image:], atol=2e-4, rtol=1e-4)

    # evaluate_examples scores the same logits
    ids = model.tokenizer.encode(texts[1], bos=True, eos=False)
    context = model.tokenizer.encode("Two cats", bos=True, eos=False)
    result = model.evaluate_examples([texts[1]], ["Two cats"], images=pair[1:])
    expected = expected_evaluation(got[1], ids, len(context))
    assert result["log_likelihood"][0] == pytest.approx(expected["log_likelihood"], rel=1e-5)
    assert result["max_equal"][0] == expected["max_equal"]


def test_original_forward_and_forward_inference(case):
    """``llma(tokens, image)`` is text-aligned; ``forward_inference`` with the image at start_pos 0,
    then text positions, gives the engine's greedy tokens."""
    _, _, model, _, _ = case
    image = images(9)
    ids = model.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        logits = model.llma(tokens, image)
    torch.testing.assert_close(logits[0], model.compute_logits([ids], image)[0], atol=1e-5, rtol=1e-5)

    expected = model.generate([PROMPTS[0]], image, return_logprobs=True, **GEN)[0]["tokens"]
    got = []
    out = model.llma.forward_inference(tokens, 0, image)
    for step in range(GEN["max_gen_len"]):
        token = int(out[0].argmax())
        if token == model.tokenizer.eos_id:
            break
        got.append(token)
        out = model.llma.forward_inference(torch.tensor([[token]]), len(ids) + step, None)
    assert got == expected
    with pytest.raises(ValueError, match="start_pos=0"):
        model.llma.forward_inference(tokens, 3, image)


def test_images_are_cast_to_the_model_dtype(case):
    _, _, _, _, directory = case
    model = MetaModel.from_pretrained(str(directory), with_visual=True, max_seq_len=64, dtype=torch.bfloat16,
                                      device="cpu", progress=False)
    image = images(10)
    assert model.generate([PROMPTS[0]], image, **GEN) == model.generate([PROMPTS[0]], image.bfloat16(), **GEN)
    assert model.compute_logits([PROMPTS[0]], image.double())[0].dtype == torch.float32


def test_engine_rows_with_and_without_an_image(case):
    """Per-row image counts: a row without an image next to one with, in one padded prefill."""
    _, _, model, _, _ = case
    vectors = model.llma.encode_images(images(12))[0]  # (N, dim)
    ids = [model.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]

    def run(prompts, image_embeds):
        states = None
        for states in model.engine.run(prompts, [8] * len(prompts), SamplingParams(), image_embeds=image_embeds):
            pass
        return [s.new_tokens for s in states]

    with_image = model.generate([PROMPTS[0]], images(12), max_gen_len=8, temperature=0.0,
                                return_logprobs=True)[0]["tokens"]
    without = model.generate([PROMPTS[1]], max_gen_len=8, temperature=0.0, return_logprobs=True)[0]["tokens"]
    assert run(ids, [vectors, None]) == [with_image, without]
    assert run(ids[::-1], [None, vectors[None]]) == [without, with_image]


def test_insert_images_layouts():
    text = torch.arange(1, 7, dtype=torch.float32).view(2, 3, 1)  # two rows of 3 "embeddings"
    image = torch.full((2, 2, 1), -1.0)
    tagged = insert_images(text, [3, 2], image, "tagged")
    assert tagged.embeds[:, :, 0].tolist() == [[1, -1, -1, 2, 3], [4, -1, -1, 5, 6]]  # row 1 pads after 5
    assert (tagged.offsets, tagged.lengths) == ([2, 2], [5, 4])
    assert tagged.positions.tolist() == [[0, 1, 2, 3, 4]] * 2
    prefix = insert_images(text, [3, 3], [image[0], None], "prefix")
    assert prefix.embeds[:, :, 0].tolist() == [[-1, -1, 1, 2, 3], [4, 5, 6, 0, 0]]
    assert [r[:, 0].tolist() for r in prefix.text_rows(prefix.embeds, [3, 3])] == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="unknown image_layout 'middle'"):
        insert_images(text, [3, 3], image, "middle")
    start, end = torch.zeros(1, 1, 1), torch.full((1, 1, 1), 9.0)
    views = [torch.ones(2, 2, 1), torch.full((2, 1, 1), 2.0)]
    assert tag_views(views, start, end)[0, :, 0].tolist() == [0, 1, 1, 9, 0, 2, 9]


# ------------------------------------------------------------------ the context budget

def test_image_positions_count_against_max_seq_len(case):
    layout, _, _, _, directory = case
    n_image = 6 if layout == "tagged" else 4
    model = MetaModel.from_pretrained(str(directory), with_visual=True, max_seq_len=n_image + 12,
                                      dtype=torch.float32, device="cpu", progress=False)
    long_prompt = "one two three four five six seven eight nine ten eleven twelve"
    # the original cut the prompt by the declared count and overran the cache here; ours cuts
    # the prompt (keeping BOS) so that image + prompt + answer fit, and says so
    with pytest.warns(UserWarning, match=f"after the image's {n_image} positions"):
        out = model.generate([long_prompt], images(11), max_gen_len=6, temperature=0.0, return_logprobs=True)
    ids = model.tokenizer.encode(long_prompt, bos=True, eos=False)
    kept = ids[:1] + ids[-(12 - 6 - 1):]  # BOS and the last tokens that fit
    assert len(ids) > len(kept)
    assert out[0]["tokens"] == reference_greedy(case, kept, images(11)[0], 6)

    with pytest.raises(ValueError, match=rf"image takes {n_image} positions and its text \d+ tokens.*"
                                         rf"max_seq_len={n_image + 12}"):
        model.compute_logits([long_prompt], images(11))

    cramped = MetaModel.from_pretrained(str(directory), with_visual=True, max_seq_len=n_image + 1,
                                        dtype=torch.float32, device="cpu", progress=False)
    with pytest.raises(ValueError, match=f"image takes {n_image} positions of max_seq_len={n_image + 1}.*"
                                         "larger max_seq_len"):
        cramped.generate(["Hi"], images(11))
    with pytest.raises(ValueError, match="larger max_seq_len"):
        list(cramped.stream_generate("Hi", images(11)[0]))


# ------------------------------------------------------------------ bad input

def test_image_shape_errors(case):
    _, _, model, _, _ = case
    with pytest.raises(ValueError, match=r"\(2, 3, H, W\) tensor or a list of 2.*got shape \(1, 3, 32, 32\)"):
        model.generate(PROMPTS, images(0))
    with pytest.raises(ValueError, match=r"3 images for 2 prompts"):
        model.generate(PROMPTS, [images(0)[0]] * 3)
    with pytest.raises(ValueError, match=r"takes 32x32 images, got 16x16.*get_transform"):
        model.generate(PROMPTS[:1], torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"float tensor.*torch.uint8"):
        model.generate(PROMPTS[:1], torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(3, H, W\) or \(1, 3, H, W\).*\(2, 3, 32, 32\)"):
        list(model.stream_generate(PROMPTS[0], images(0, n=2)))
    with pytest.raises(ValueError, match=r"must hold tensors, got \['Image'\].*get_transform"):
        from PIL import Image
        model.generate(PROMPTS[:1], [Image.new("RGB", (32, 32))])
    with pytest.raises(ValueError, match="compute_logits expects a LIST"):
        model.compute_logits("text", images(0))


def test_models_without_images_refuse_them(case, tiny_llama_model):
    _, _, _, _, directory = case
    for call in (lambda m: m.generate(["Hi"], images(0)), lambda m: list(m.stream_generate("Hi", images(0)[0])),
                 lambda m: m.compute_logits(["Hi"], images(0)), lambda m: m.evaluate_examples(["Hi"], images=images(0))):
        with pytest.raises(NotImplementedError, match="llama_type 'llama' takes no images"):
            call(tiny_llama_model)
    with pytest.warns(UserWarning, match="dropped .* checkpoint entries"):  # the encoder's weights
        text_only = MetaModel.from_pretrained(str(directory), with_visual=False, max_seq_len=64,
                                              dtype=torch.float32, device="cpu", progress=False)
    with pytest.raises(NotImplementedError, match="takes no images.*with_visual=True"):
        text_only.generate(["Hi"], images(0))
    assert text_only.get_image_words() == 0 and not text_only.takes_images
    with pytest.raises(NotImplementedError, match="takes no images"):
        tiny_llama_model.llma(torch.tensor([[1, 2]]), images(0))


def test_registration_hook():
    assert mt.NAME in known_llama_types() and load_llama_type(mt.NAME) is mt
    with pytest.raises(ValueError, match="built in"):
        register_llama_type("llama", mt)
    with pytest.raises(ValueError, match="has no ModelArgs"):
        register_llama_type("broken", torch)
    unregister_llama_type(mt.NAME)
    try:
        with pytest.raises(ConfigError, match="unknown llama_type 'tiny_mm'"):
            load_llama_type(mt.NAME)
    finally:
        mt.register()


def test_text_generation_of_a_multimodal_type_is_unchanged(case):
    """Without an image a multimodal model generates exactly as its text decoder alone."""
    _, _, model, _, _ = case
    ids = model.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    got = model.generate([PROMPTS[0]], return_logprobs=True, **GEN)[0]["tokens"]
    out = []
    with torch.no_grad():
        seq = list(ids)
        for _ in range(GEN["max_gen_len"]):
            token = int(model.llma.forward(torch.tensor([seq]))[0, -1].argmax())
            if token == model.tokenizer.eos_id:
                break
            out.append(token)
            seq.append(token)
    assert got == out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate([PROMPTS[0]], **GEN)


def test_the_same_picture_again_is_not_encoded_again(case, monkeypatch):
    """A chat about one picture sends it every turn: the last encodings are kept, keyed by the
    pixels and the weights, and a hit gives the same answer as encoding again."""
    import accessory.model.meta as meta

    layout, _, _, _, directory = case
    model = MetaModel.from_pretrained(str(directory), with_visual=True, max_seq_len=64, dtype=torch.float32,
                                      device="cpu", progress=False)
    calls = []
    real = meta.encode_for
    monkeypatch.setattr(meta, "encode_for", lambda llma, batch: calls.append(batch.shape) or real(llma, batch))
    picture = images(3)[0]
    first = model.generate([PROMPTS[0]], [picture], **GEN)
    again = list(model.stream_generate(PROMPTS[1], picture.clone(), **GEN))[-1]["text"]  # equal pixels, new tensor
    assert len(calls) == 1
    assert again == model.generate([PROMPTS[1]], [images(3)[0]], **GEN)[0] and len(calls) == 1
    other = images(4)[0]
    model.generate([PROMPTS[0]], [other], **GEN)
    assert len(calls) == 2  # other pixels: encoded
    with torch.no_grad():  # new weights: encoded again, and the answer is the new weights'
        next(model.llma.parameters()).mul_(1.0)
    assert model.generate([PROMPTS[0]], [picture], **GEN) == first and len(calls) == 3
    for seed in range(5, 5 + meta.IMAGE_MEMO_SIZE):  # the oldest encodings go
        model.generate([PROMPTS[0]], [images(seed)[0]], max_gen_len=1)
    model.generate([PROMPTS[0]], [picture], max_gen_len=1)
    assert len(calls) == 3 + meta.IMAGE_MEMO_SIZE + 1


def _engine_run(engine, prompts, image_embeds, new_tokens=8):
    states = None
    for states in engine.run(prompts, [new_tokens] * len(prompts), SamplingParams(), logprobs=True,
                             image_embeds=image_embeds):
        pass
    return states


@pytest.fixture
def chat_case(case):
    """(model, an engine with the prompt cache, one without, N) on a model with room for turns."""
    from accessory.generation.engine import GenerationEngine

    layout, _, _, _, directory = case
    model = MetaModel.from_pretrained(str(directory), with_visual=True, max_seq_len=128, dtype=torch.float32,
                                      device="cpu", progress=False)
    eos = [model.tokenizer.eos_id]
    return (model, GenerationEngine(model.llma, model.tokenizer, eos, prompt_cache=True),
            GenerationEngine(model.llma, model.tokenizer, eos, prompt_cache=False), model.get_image_words())


def test_a_chat_about_one_picture_reuses_its_positions(chat_case):
    """The next turn about the same picture (its vectors encoded again: equal bytes, new tensor)
    copies the picture's positions and the history, and answers as a fresh prefill does."""
    model, cached, fresh, n = chat_case
    vectors = model.llma.encode_images(images(21))
    first_ids = model.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    first = _engine_run(cached, [first_ids], vectors)[0]
    assert first.cached_tokens == 0 and len(first.new_tokens) == 8
    ids = first_ids + first.new_tokens + model.tokenizer.encode(" " + PROMPTS[1], bos=False, eos=False)
    got = _engine_run(cached, [ids], model.llma.encode_images(images(21)))[0]
    want = _engine_run(fresh, [ids], vectors)[0]
    assert got.cached_tokens == n + len(first_ids) + len(first.new_tokens) - 1  # the last answer token was not fed
    assert got.new_tokens == want.new_tokens
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    # the same turn again (a regenerated answer): all of it reused, bit for bit the first time
    again = _engine_run(cached, [ids], vectors)[0]
    assert again.cached_tokens == n + len(ids)
    assert again.new_tokens == got.new_tokens and again.logprobs == got.logprobs
    # the same text about another picture: nothing reused, and its own answer
    other = model.llma.encode_images(images(22))
    got, want = _engine_run(cached, [ids], other)[0], _engine_run(fresh, [ids], other)[0]
    assert got.cached_tokens == 0
    assert got.new_tokens == want.new_tokens and got.logprobs == want.logprobs
    # the picture's text without the picture: only what precedes the picture's place
    text = _engine_run(cached, [ids], None)[0]
    assert text.cached_tokens == (1 if model.llma.image_layout == "tagged" else 0)  # BOS, before the picture
    assert text.new_tokens == _engine_run(fresh, [ids], None)[0].new_tokens


def test_a_batch_mixes_reused_pictures_new_pictures_and_text(chat_case):
    """One prefill: a row continuing a picture's conversation from its kept cache, a row whose
    new picture goes in at position 0, a text row; each as the fresh batch gives it, and each
    row's next turn reuses its own cache."""
    model, cached, fresh, n = chat_case
    one, two = model.llma.encode_images(images(23))[0], model.llma.encode_images(images(24))[0]
    first_ids = model.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    first = _engine_run(cached, [first_ids], [one])[0]
    cont = first_ids + first.new_tokens + model.tokenizer.encode(" " + PROMPTS[1], bos=False, eos=False)
    prompts = [cont, model.tokenizer.encode(PROMPTS[1], bos=True, eos=False),
               model.tokenizer.encode("Hello there", bos=True, eos=False)]
    cached.prompt_cache_slots = 3
    got = _engine_run(cached, prompts, [one, two, None], new_tokens=6)
    want = _engine_run(fresh, prompts, [one, two, None], new_tokens=6)
    assert [row.cached_tokens for row in got] == [n + len(first_ids) + len(first.new_tokens) - 1, 0, 0]
    for g, w in zip(got, want):
        assert g.new_tokens == w.new_tokens
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    for row, prompt, picture in zip(got, prompts, [one, two, None]):
        follow = prompt + row.new_tokens + model.tokenizer.encode(" Why?", bos=False, eos=False)
        kept = n if picture is not None else 0
        nxt = _engine_run(cached, [follow], None if picture is None else [picture])[0]
        assert nxt.cached_tokens == kept + len(prompt) + len(row.new_tokens) - 1
        assert nxt.new_tokens == _engine_run(fresh, [follow], None if picture is None else [picture])[0].new_tokens


def test_a_picture_chat_through_stream_generate_with_the_cache(case):
    """MetaModel with the cache on: the next turn's streamed answer is the fresh generate's."""
    _, _, _, _, directory = case
    model = MetaModel.from_pretrained(str(directory), with_visual=True, max_seq_len=128, dtype=torch.float32,
                                      device="cpu", progress=False)
    model.engine.prompt_cache = True
    picture = images(25)[0]
    first = model.generate([PROMPTS[0]], [picture], **GEN)[0]
    follow = PROMPTS[0] + first + " " + PROMPTS[1]
    prefills, forward = [], model.llma.forward_tokens

    def counting(tokens, positions, *args, **kwargs):
        if positions.shape[1] > 1:
            prefills.append(positions[0].tolist())
        return forward(tokens, positions, *args, **kwargs)
    model.llma.forward_tokens = counting
    got = list(model.stream_generate(follow, picture, **GEN))[-1]["text"]
    whole = model.get_image_words() + len(model.tokenizer.encode(follow, bos=True, eos=False))
    reused = model.get_image_words() + len(model.tokenizer.encode(PROMPTS[0], bos=True, eos=False))
    assert prefills[0][0] >= reused and prefills[0][-1] == whole - 1  # only the new turn's positions
    model.engine.prompt_cache = False
    assert got == model.generate([follow], [picture], **GEN)[0]


def test_generate_with_pictures_for_some_prompts(case):
    """A list of images holding None: those prompts have no picture, in the same batch."""
    _, _, model, _, _ = case
    picture = images(26)[0]
    got = model.generate(PROMPTS, [None, picture], **GEN)
    assert got == [model.generate([PROMPTS[0]], **GEN)[0], model.generate([PROMPTS[1]], [picture], **GEN)[0]]
    assert model.generate(PROMPTS, [None, None], **GEN) == model.generate(PROMPTS, **GEN)
    with pytest.raises(ValueError, match="None for a prompt without a picture"):
        model.generate(PROMPTS, [None], **GEN)
