"""The engine's prompt cache: a one-prompt run reuses the keys and values the last one-prompt run
left for the tokens both share, and prefills only the rest (generation/engine.py)."""

import pytest
import torch

from accessory.generation.engine import GenerationEngine, prompt_cache_enabled
from accessory.generation.sampling import SamplingParams
from accessory.model.meta import MetaModel

from ckpt_utils import TINY_LLAMA, random_llama_state, write_checkpoint

FIRST = "The quick brown fox jumps over the lazy dog and then"
MORE = " Then the dog woke up and chased the fox all the way home."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    state = random_llama_state(TINY_LLAMA, 32000, seed=3)
    return write_checkpoint(tmp_path_factory.mktemp("prompt_cache"), state, TINY_LLAMA)


def _load(checkpoint, dtype=torch.float32, **kwargs):
    return MetaModel.from_pretrained(str(checkpoint), max_seq_len=160, dtype=dtype, device="cpu", progress=False,
                                     **kwargs)


@pytest.fixture(scope="module")
def model(checkpoint):
    return _load(checkpoint)


def _engines(model):
    """(an engine with the prompt cache, one without) on the same model."""
    eos = [model.tokenizer.eos_id]
    return (GenerationEngine(model.llma, model.tokenizer, eos, prompt_cache=True),
            GenerationEngine(model.llma, model.tokenizer, eos, prompt_cache=False))


def _run(engine, ids, new_tokens=8):
    states = None
    for states in engine.run([ids], [new_tokens], SamplingParams(), logprobs=True):
        pass
    return states[0]


def _encode(model, text, bos=False):
    return model.tokenizer.encode(text, bos=bos, eos=False)


def _second_turn(model, first_ids, first):
    """The next prompt of a chat: the first prompt, its answer and a new message."""
    return first_ids + first.new_tokens + _encode(model, MORE)


def test_off_unless_asked(model, monkeypatch):
    monkeypatch.delenv("ACCESSORY_PROMPT_CACHE", raising=False)
    assert not GenerationEngine(model.llma, model.tokenizer, []).prompt_cache
    assert prompt_cache_enabled(default=True) and not prompt_cache_enabled(default=False)
    monkeypatch.setenv("ACCESSORY_PROMPT_CACHE", "1")
    assert GenerationEngine(model.llma, model.tokenizer, []).prompt_cache
    assert not GenerationEngine(model.llma, model.tokenizer, [], prompt_cache=False).prompt_cache
    monkeypatch.setenv("ACCESSORY_PROMPT_CACHE", "0")
    assert not prompt_cache_enabled(default=True)


def test_next_turn_prefills_only_what_the_cache_lacks(model):
    cached, fresh = _engines(model)
    first_ids = _encode(model, FIRST, bos=True)
    first = _run(cached, first_ids)
    assert first.cached_tokens == 0 and len(first.new_tokens) == 8
    ids = _second_turn(model, first_ids, first)
    got, want = _run(cached, ids), _run(fresh, ids)
    # the cache holds the first prompt and the answer's tokens fed back (all but the last)
    assert got.cached_tokens == len(first_ids) + len(first.new_tokens) - 1
    assert want.cached_tokens == 0
    assert got.new_tokens == want.new_tokens
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


@pytest.mark.parametrize("quant", [None, "int4"])
def test_the_same_prompt_again_repeats_exactly(checkpoint, quant):
    """A regenerated answer reuses the whole prompt and the kept prefill logits: bit for bit the
    first run, although the kernels round a one-token prefill differently."""
    model = _load(checkpoint, dtype=torch.bfloat16, quant=quant)
    cached, fresh = _engines(model)
    ids = _encode(model, FIRST, bos=True)
    first, again, plain = _run(cached, ids, 12), _run(cached, ids, 12), _run(fresh, ids, 12)
    assert again.cached_tokens == len(ids)
    assert again.new_tokens == first.new_tokens == plain.new_tokens
    assert again.logprobs == first.logprobs == plain.logprobs


def test_changed_weights_are_not_reused(checkpoint):
    model = _load(checkpoint)
    cached, fresh = _engines(model)
    first_ids = _encode(model, FIRST, bos=True)
    ids = _second_turn(model, first_ids, _run(cached, first_ids))
    weight = model.llma.layers[0].attention.wq.weight
    with torch.no_grad():  # an in-place write, as load_state_dict makes
        weight.mul_(1.5)
    got, want = _run(cached, ids), _run(fresh, ids)
    assert got.cached_tokens == 0
    assert got.new_tokens == want.new_tokens and got.logprobs == want.logprobs


def test_a_checkpoint_loaded_into_weights_in_panels_is_not_reused(checkpoint):
    """bf16 on a CPU with AVX512-BF16: the weights are held in panels, and load_state_dict packs a
    new weight into them in place; the kept keys and values were computed from the old one."""
    from accessory.model.layers.panel_linear import PanelLinear, panels_wanted
    if not panels_wanted():
        pytest.skip("weights are held in panels only on CPUs with AVX512-BF16 (and no AMX)")
    model = _load(checkpoint, dtype=torch.bfloat16)
    wq = model.llma.layers[0].attention.wq
    assert type(wq) is PanelLinear
    cached, fresh = _engines(model)
    first_ids = _encode(model, FIRST, bos=True)
    ids = _second_turn(model, first_ids, _run(cached, first_ids))
    state = wq.state_dict()
    wq.load_state_dict({"weight": state["weight"] * 1.5})
    assert type(wq) is PanelLinear
    got, want = _run(cached, ids), _run(fresh, ids)
    assert got.cached_tokens == 0
    assert got.new_tokens == want.new_tokens and got.logprobs == want.logprobs


def test_a_new_hook_stops_reuse(model):
    cached, _ = _engines(model)
    first_ids = _encode(model, FIRST, bos=True)
    ids = _second_turn(model, first_ids, _run(cached, first_ids))
    handle = model.llma.layers[1].register_forward_hook(lambda module, args, output: None)
    try:
        assert _run(cached, ids).cached_tokens == 0
    finally:
        handle.remove()


def test_a_run_stopped_early_keeps_what_it_wrote(model):
    cached, fresh = _engines(model)
    first_ids = _encode(model, FIRST, bos=True)
    run = cached.run([first_ids], [20], SamplingParams())
    for _ in range(3):
        rows = next(run)
    answer = list(rows[0].new_tokens)
    run.close()
    assert len(answer) == 3
    # the cache had room for 20 new tokens; the kept one holds what was written, no more
    assert cached._kept[0].cache.max_len == len(first_ids) + 2
    ids = first_ids + answer + _encode(model, MORE)
    got, want = _run(cached, ids), _run(fresh, ids)
    assert got.cached_tokens == len(first_ids) + 2  # the third token was never fed back
    assert got.new_tokens == want.new_tokens
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


def test_a_failed_prefill_leaves_only_the_copied_positions(checkpoint, monkeypatch):
    """A prefill that fails after writing part of the cache: the next run must not reuse those
    positions (here poisoned with NaN)."""
    model = _load(checkpoint)
    cached, fresh = _engines(model)
    first_ids = _encode(model, FIRST, bos=True)
    first = _run(cached, first_ids)
    ids = _second_turn(model, first_ids, first)
    copied = len(first_ids) + len(first.new_tokens) - 1

    def failing(tokens, positions, cache, *args, **kwargs):
        start = int(positions.min())
        for tensor in cache.keys + cache.values:
            tensor[:, :, start:] = float("nan")
        raise RuntimeError("step failed")

    monkeypatch.setattr(model.llma, "forward_tokens", failing)
    with pytest.raises(RuntimeError, match="step failed"):
        _run(cached, ids + _encode(model, " and"))
    monkeypatch.undo()
    got, want = _run(cached, ids), _run(fresh, ids)
    assert got.cached_tokens == copied
    assert got.new_tokens == want.new_tokens
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


def _batch(engine, prompts, new_tokens):
    states = None
    for states in engine.run(prompts, new_tokens, SamplingParams(), logprobs=True):
        pass
    return states


def test_a_batch_reuses_and_keeps_each_rows_cache(model):
    """Rows of one batch start from their own kept prefixes (different positions per row), leave
    at different steps (their caches copied out first), and are each found by their next turn."""
    cached, fresh = _engines(model)
    cached.prompt_cache_slots = 3
    starts = [_encode(model, FIRST, bos=True), _encode(model, "Once upon a time in a small village", bos=True)]
    firsts = [_run(cached, ids) for ids in starts]
    seconds = [_second_turn(model, ids, first) for ids, first in zip(starts, firsts)]
    prompts = seconds + [_encode(model, "A completely new question about cats", bos=True)]
    limits = [8, 5, 2]  # the rows finish at different steps
    got, want = _batch(cached, prompts, limits), _batch(fresh, prompts, limits)
    held = [len(ids) + len(first.new_tokens) - 1 for ids, first in zip(starts, firsts)]
    # (the new question would share BOS only, but both kept caches went to their conversations)
    assert [row.cached_tokens for row in got] == held + [0]
    for g, w in zip(got, want):
        assert g.new_tokens == w.new_tokens
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    for ids, row in zip(prompts, got):  # every row's cache was kept: each next turn reuses it
        following = ids + row.new_tokens + _encode(model, " Go on.")
        again, plain = _run(cached, following), _run(fresh, following)
        assert again.cached_tokens == len(ids) + len(row.new_tokens) - 1
        assert again.new_tokens == plain.new_tokens


def test_cleared_cache_is_not_reused(model):
    cached, _ = _engines(model)
    first_ids = _encode(model, FIRST, bos=True)
    ids = _second_turn(model, first_ids, _run(cached, first_ids))
    cached.clear_prompt_cache()
    assert _run(cached, ids).cached_tokens == 0


def test_a_cut_prompt_shares_nothing(model):
    """A conversation cut from the left (it outgrew the context) starts differently: no reuse,
    and the answer is a fresh run's."""
    cached, fresh = _engines(model)
    first_ids = _encode(model, FIRST, bos=True)
    _run(cached, first_ids)
    ids = _encode(model, MORE, bos=True)
    got, want = _run(cached, ids), _run(fresh, ids)
    assert got.cached_tokens == 1  # BOS only
    assert got.new_tokens == want.new_tokens


def test_chat_faces_turn_it_on(checkpoint, monkeypatch):
    import argparse

    from accessory.demos.common import load_chat_model
    args = argparse.Namespace(pretrained_path=[str(checkpoint)], llama_type=None, llama_config=None,
                              tokenizer_path=None, max_seq_len=64, dtype=torch.float32, device="cpu", quant=None)
    monkeypatch.delenv("ACCESSORY_PROMPT_CACHE", raising=False)
    model = load_chat_model(args)
    assert model.engine.prompt_cache and model.engine.prompt_cache_slots == 1
    args.prompt_cache_slots = 3  # the server's and the multi-turn demo's flag
    assert load_chat_model(args).engine.prompt_cache_slots == 3
    args.prompt_cache_slots = 0
    assert not load_chat_model(args).engine.prompt_cache
    monkeypatch.setenv("ACCESSORY_PROMPT_CACHE", "0")
    assert not load_chat_model(args).engine.prompt_cache


@pytest.mark.parametrize("slots", [1, 2])
def test_conversations_taking_turns_keep_their_caches_with_enough_slots(model, slots):
    """Two conversations alternate (two clients of a server): with two slots each next turn finds
    its own conversation's cache; with one, each finds the other's and reuses only BOS."""
    cached, fresh = _engines(model)
    cached.prompt_cache_slots = slots
    starts = [_encode(model, FIRST, bos=True), _encode(model, "Once upon a time in a small village", bos=True)]
    firsts = [_run(cached, ids) for ids in starts]
    for ids, first in zip(starts, firsts):
        following = _second_turn(model, ids, first)
        got = _run(cached, following)
        held = len(ids) + len(first.new_tokens) - 1
        assert got.cached_tokens == (held if slots == 2 else 1)
        want = _run(fresh, following)
        assert got.new_tokens == want.new_tokens
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


def test_a_repeated_turn_does_not_push_another_conversation_out(model):
    """The same prompt again (a regenerated answer, greedy: the same ids) supersedes its own kept
    cache instead of taking a second slot, so the other conversation's cache stays."""
    cached, _ = _engines(model)
    cached.prompt_cache_slots = 2
    other_ids = _encode(model, "Once upon a time in a small village", bos=True)
    other = _run(cached, other_ids)
    ids = _encode(model, FIRST, bos=True)
    _run(cached, ids)
    assert _run(cached, ids).cached_tokens == len(ids)
    assert len(cached._kept) == 2
    assert _run(cached, _second_turn(model, other_ids, other)).cached_tokens == len(other_ids) + len(other.new_tokens) - 1


def test_a_batch_with_a_repeated_prompt_and_a_long_new_one(model):
    """A row whose whole prompt is kept still prefills its last token (a batch keeps no logits per
    row), and its padding, written past its own last position while a long new prompt fills,
    needs cache room beyond what either row asks for."""
    cached, fresh = _engines(model)
    repeated = _encode(model, FIRST + MORE, bos=True)
    _run(cached, repeated, 2)
    new = _encode(model, "Tell me everything you know about the history of the small village and its people, "
                         "its roads and rivers, its bakers and its bells", bos=True)
    assert len(new) > 2 * len(repeated) // 3
    got, want = _batch(cached, [repeated, new], [2, 2]), _batch(fresh, [repeated, new], [2, 2])
    assert got[0].cached_tokens == len(repeated) - 1
    for g, w in zip(got, want):
        assert g.new_tokens == w.new_tokens
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)


def test_kept_caches_stay_within_their_memory_bound(model):
    """Older conversations' caches go once the kept caches would hold more than
    ``prompt_cache_bytes``; the most recent one always stays."""
    cached, _ = _engines(model)
    cached.prompt_cache_slots = 3
    starts = [_encode(model, FIRST, bos=True), _encode(model, "Once upon a time in a small village", bos=True)]
    _run(cached, starts[0])
    one = cached._kept[0].nbytes
    assert one > 0
    cached.prompt_cache_bytes = one + one // 2  # room for one cache with the newest, not two
    firsts = [_run(cached, ids) for ids in starts[1:]]
    assert len(cached._kept) == 1
    cached.prompt_cache_bytes = 0  # the newest stays even alone over the bound
    assert _run(cached, _second_turn(model, starts[1], firsts[0])).cached_tokens > len(starts[1])
    assert len(cached._kept) == 1
    cached.prompt_cache_bytes = None
    _run(cached, starts[0])
    assert len(cached._kept) == 2


def test_serve_flags_bound_the_prompt_cache(checkpoint):
    import argparse

    from accessory.demos.common import load_chat_model
    args = argparse.Namespace(pretrained_path=[str(checkpoint)], llama_type=None, llama_config=None,
                              tokenizer_path=None, max_seq_len=64, dtype=torch.float32, device="cpu", quant=None,
                              prompt_cache_slots=2, prompt_cache_mb=1.5)
    engine = load_chat_model(args).engine
    assert (engine.prompt_cache_slots, engine.prompt_cache_bytes) == (2, 3 * 2 ** 19)


def test_a_deep_copy_has_its_own_weights_and_generation_state(checkpoint, monkeypatch):
    """``copy.deepcopy(MetaModel)`` (it used to fail on a lock): the copy generates as the original,
    with its own engine and prompt caches; an edit to the copy's weights changes its text only."""
    import copy
    monkeypatch.setenv("ACCESSORY_PROMPT_CACHE", "1")
    original = _load(checkpoint, dtype=torch.bfloat16)
    prompt = "Once upon a time"
    first = original.generate([prompt], max_gen_len=8, temperature=0)
    assert original._engine is not None  # (its kept caches and locks now exist)
    twin = copy.deepcopy(original)
    assert twin._engine is None and twin._image_memo_lock is not original._image_memo_lock
    assert twin.generate([prompt], max_gen_len=8, temperature=0) == first
    with torch.no_grad():
        for layer in twin.llma.layers:
            layer.attention.wo.weight.mul_(-1)
    edited = twin.generate([prompt], max_gen_len=8, temperature=0)
    assert edited != first
    assert original.generate([prompt], max_gen_len=8, temperature=0) == first
