"""The sampler chain step by step (exact numbers on hand-made logits) and through the engine:
penalties, their order, greedy parity, per-row seeds, and per-token log-probabilities."""

import pytest
import torch

from accessory.generation.sampling import (Sampler, SamplingParams, apply_presence_frequency_penalty,
                                           apply_repetition_penalty, penalty_window, token_counts)
from accessory.model.meta import MetaModel

from ckpt_utils import TINY_LLAMA, random_llama_state, write_checkpoint

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog and then", "1 2 3"]
REPEATING_PROMPT = "a a a a a a"  # its greedy continuation repeats a token (11789) after 7 steps


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    state = random_llama_state(TINY_LLAMA, 32000, seed=3)
    directory = write_checkpoint(tmp_path_factory.mktemp("sampling"), state, TINY_LLAMA)
    return MetaModel.from_pretrained(str(directory), max_seq_len=96, dtype=torch.float32, device="cpu")


def run_engine(model, prompts, limits, params, **kwargs):
    ids = [model.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    states = None
    for states in model.engine.run(ids, limits, params, **kwargs):
        pass
    return ids, states


# ---------------------------------------------------------------- single steps, exact numbers
def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.0]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_presence_and_frequency_use_counts():
    counts = token_counts([[1, 2, 2, 2], []], vocab_size=4)
    assert counts.tolist() == [[0, 1, 3, 0], [0, 0, 0, 0]]
    out = apply_presence_frequency_penalty(torch.zeros(2, 4), counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_penalty_window_follows_llama_cpp_last_n():
    context = [5, 1, 5, 2]
    assert penalty_window(context, 2) == [5, 2]
    assert penalty_window(context, -1) == context
    assert penalty_window(context, 0) == []
    assert penalty_window(context, 10) == context


def test_sampler_repetition_sees_window_of_prompt_plus_output_presence_sees_output_only():
    logits = torch.full((1, 6), 1.0)
    contexts = [[0, 1, 2, 3]]  # prompt [0, 1, 2] + generated [3]
    generated = [[3]]
    rep = Sampler(SamplingParams(repetition_penalty=2.0, penalty_last_n=2), "cpu")
    assert rep.process(logits, contexts, generated).tolist() == [[1.0, 1.0, 0.5, 0.5, 1.0, 1.0]]
    whole = Sampler(SamplingParams(repetition_penalty=2.0, penalty_last_n=-1), "cpu")
    assert whole.process(logits, contexts, generated).tolist() == [[0.5, 0.5, 0.5, 0.5, 1.0, 1.0]]
    off = Sampler(SamplingParams(repetition_penalty=2.0, penalty_last_n=0), "cpu")
    assert off.process(logits, contexts, generated).tolist() == logits.tolist()
    presence = Sampler(SamplingParams(presence_penalty=0.5), "cpu")
    assert presence.process(logits, contexts, generated).tolist() == [[1.0, 1.0, 1.0, 0.5, 1.0, 1.0]]


def test_chain_order_repetition_then_presence_then_temperature_then_filters():
    # token 0: rep 2 then presence 1 then temperature 0.5: (4 / 2 - 1) / 0.5 = 2
    # (presence first would give (4 - 1) / 2 / 0.5 = 3; temperature first 4 / 0.5 / 2 - 1 = 3)
    params = SamplingParams(temperature=0.5, repetition_penalty=2.0, penalty_last_n=-1, presence_penalty=1.0)
    out = Sampler(params, "cpu").process(torch.tensor([[4.0, 1.0]]), [[0]], [[0]])
    assert out.tolist() == [[2.0, 2.0]]
    # top-k before top-p: within the top 2, token 0 holds 0.731 > 0.7, so top-p keeps it alone;
    # top-p over all four tokens would have kept two (see test_generation.test_sampling_filters)
    filtered = Sampler(SamplingParams(temperature=1.0, top_k=2, top_p=0.7), "cpu").process(
        torch.tensor([[2.0, 1.0, 0.0, -1.0]]))
    assert torch.isinf(filtered).tolist() == [[False, True, True, True]]


def test_greedy_applies_penalties():
    params = SamplingParams(repetition_penalty=4.0, penalty_last_n=-1)
    assert Sampler(params, "cpu")(torch.tensor([[3.0, 2.0]]), [[0]], [[]]).tolist() == [1]


def test_neutral_penalties_leave_greedy_equal_to_argmax():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    histories = [[1, 2, 3], [], [999, 999], [0]]
    neutral = SamplingParams(repetition_penalty=1.0, penalty_last_n=-1, presence_penalty=0.0,
                             frequency_penalty=0.0)
    sampler = Sampler(neutral, "cpu")
    assert sampler.process(logits, histories, histories) is logits  # not even copied
    assert torch.equal(sampler(logits, histories, histories), logits.argmax(dim=-1))


def argmax_cases():
    """(rows, vocab) float32 logits where an argmax can go wrong: ties, NaN, infinities, signed
    zeros, bf16-rounded near ties, vocabularies with and without a tail past the 8-wide blocks."""
    gen = torch.Generator().manual_seed(3)
    for rows, vocab in ((1, 32000), (16, 32000), (3, 7), (2, 9), (5, 1), (4, 33), (2, 64)):
        x = torch.randn(rows, vocab, generator=gen)
        yield x
        yield x.bfloat16().float()
        yield torch.ones(rows, vocab)
        nan = x.clone()
        nan[0, vocab // 2] = nan[-1, -1] = float("nan")
        yield nan
        infinite = x.clone()
        infinite[0] = float("-inf")
        infinite[-1, 0] = infinite[-1, -1] = float("inf")
        yield infinite
        zeros = torch.zeros(rows, vocab)
        zeros[:, 0] = -0.0
        zeros[-1, vocab // 3] = 0.0
        yield zeros
        late = torch.full((rows, vocab), -5.0)
        late[:, -1] = 2.0  # the best in the tail
        yield late


def test_greedy_pick_is_torch_argmax_on_every_edge_case():
    """The native argmax the greedy sampler uses picks exactly torch.argmax's index: the first of
    equal values, the first NaN when there is one."""
    sampler = Sampler(SamplingParams(), "cpu")
    for logits in argmax_cases():
        assert torch.equal(sampler(logits), logits.argmax(dim=-1)), logits
        strided = torch.cat([logits, logits], dim=1)[:, ::2]  # not contiguous
        assert torch.equal(sampler(strided), strided.argmax(dim=-1))


# ---------------------------------------------------------------- through the engine
def test_neutral_penalties_keep_greedy_generation(model):
    default = model.generate(PROMPTS, max_gen_len=8)
    neutral = model.generate(PROMPTS, max_gen_len=8, repetition_penalty=1.0, presence_penalty=0.0,
                             frequency_penalty=0.0, penalty_last_n=-1)
    assert neutral == default


def test_seeded_penalised_sampling_repeats(model):
    kwargs = dict(max_gen_len=12, temperature=0.9, top_k=50, top_p=0.95, seed=7, repetition_penalty=1.3,
                  presence_penalty=0.2, frequency_penalty=0.1)
    assert model.generate(PROMPTS, **kwargs) == model.generate(PROMPTS, **kwargs)


def test_seeded_rows_do_not_depend_on_other_rows_finishing(model):
    params = SamplingParams(temperature=1.0, seed=11, repetition_penalty=1.2)
    _, together = run_engine(model, PROMPTS, [12, 12, 12], params)
    _, early = run_engine(model, PROMPTS, [2, 12, 1], params)  # rows 0 and 2 leave the batch early
    assert early[1].new_tokens == together[1].new_tokens
    assert early[0].new_tokens == together[0].new_tokens[:2]
    # row r draws from seed + r, so row 0 of a batch equals the same prompt sampled alone
    _, alone = run_engine(model, PROMPTS[:1], [12], params)
    assert alone[0].new_tokens == together[0].new_tokens


def _full_forward_steps(model, prompt_ids, row):
    """(token, the log-probabilities a full forward over prompt + new tokens gives its position)
    for each of the row's new tokens."""
    full = torch.tensor([prompt_ids + row.new_tokens])
    with torch.no_grad():
        log_probs = torch.log_softmax(model.llma.forward(full)[0].float(), dim=-1)
    return [(token, log_probs[len(prompt_ids) - 1 + step]) for step, token in enumerate(row.new_tokens)]


def test_logprobs_of_greedy_tokens_match_a_full_forward(model):
    ids, states = run_engine(model, PROMPTS, [6, 6, 6], SamplingParams(), logprobs=True, top_logprobs=3)
    for prompt_ids, row in zip(ids, states):
        assert len(row.logprobs) == len(row.top_logprobs) == len(row.new_tokens) == 6
        for step, (token, expected) in enumerate(_full_forward_steps(model, prompt_ids, row)):
            assert row.logprobs[step] == pytest.approx(float(expected[token]), abs=1e-4)
            best = torch.topk(expected, 3)
            assert [t for t, _ in row.top_logprobs[step]] == best.indices.tolist()
            assert [v for _, v in row.top_logprobs[step]] == pytest.approx(best.values.tolist(), abs=1e-4)
            assert row.top_logprobs[step][0][0] == token  # greedy picks the most likely token


def test_logprobs_of_sampled_tokens_are_the_picked_tokens_under_the_raw_logits(model):
    """Sampled (not the most likely) tokens: each one's log-probability under the model's raw
    distribution, before temperature and top-k."""
    params = SamplingParams(temperature=1.5, top_k=50, seed=11)
    ids, states = run_engine(model, PROMPTS, [8, 8, 8], params, logprobs=True)
    not_best = 0
    for prompt_ids, row in zip(ids, states):
        for step, (token, expected) in enumerate(_full_forward_steps(model, prompt_ids, row)):
            assert row.logprobs[step] == pytest.approx(float(expected[token]), abs=1e-4)
            not_best += int(token != int(expected.argmax()))
    assert not_best > 0  # (the check above would not tell a picked token from the best one)


def test_generate_return_logprobs_is_opt_in(model):
    plain = model.generate(PROMPTS[:1], max_gen_len=5)
    rich = model.generate(PROMPTS[:1], max_gen_len=5, return_logprobs=True)
    assert isinstance(plain[0], str)
    assert rich[0]["text"] == plain[0]
    assert len(rich[0]["tokens"]) == len(rich[0]["logprobs"]) == 5
    assert rich[0]["top_logprobs"] == []
    assert all(lp <= 0.0 for lp in rich[0]["logprobs"])


def test_strong_repetition_penalty_breaks_a_repeating_greedy_continuation(model):
    ids, plain = run_engine(model, [REPEATING_PROMPT], [16], SamplingParams())
    tokens = plain[0].new_tokens
    assert any(t in ids[0] + tokens[:i] for i, t in enumerate(tokens)), "fixture should repeat"
    _, penalised = run_engine(model, [REPEATING_PROMPT], [16],
                              SamplingParams(repetition_penalty=100.0, penalty_last_n=-1))
    new = penalised[0].new_tokens
    assert new != tokens
    assert not any(t in ids[0] + new[:i] for i, t in enumerate(new))
    # the penalty only acts once a token has been seen: up to the first repeat, both agree
    first_repeat = next(i for i, t in enumerate(tokens) if t in ids[0] + tokens[:i])
    assert new[:first_repeat] == tokens[:first_repeat]


def test_stream_generate_takes_the_same_penalties(model):
    kwargs = dict(max_gen_len=16, repetition_penalty=100.0, penalty_last_n=-1)
    chunks = list(model.stream_generate(REPEATING_PROMPT, **kwargs))
    assert chunks[-1] == {"text": model.generate([REPEATING_PROMPT], **kwargs)[0], "end_of_content": True}
    assert chunks[-1]["text"] != model.generate([REPEATING_PROMPT], max_gen_len=16)[0]
