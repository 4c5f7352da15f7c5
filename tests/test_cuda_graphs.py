"""The bookkeeping of generation/cuda_graphs.py, on the CPU: its three CUDA calls (warm-up on a side
stream, capture, synchronise) are stood in for by an emulation whose "graph" re-runs the recorded
step on the tensors it captured, the way a replay re-reads them. What a GPU adds (the capture
itself, replayed numbers) is tests/test_cuda.py's.
"""

import copy
import logging

import pytest
import torch

from accessory.generation import engine as engine_module
from accessory.generation.cuda_graphs import GraphedDecoder
from accessory.generation.engine import GenerationEngine
from accessory.generation.sampling import SamplingParams
from accessory.model.layers import attention
from accessory.model.meta import MetaModel

from ckpt_utils import TINY_LLAMA, random_llama_state, write_checkpoint

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away"]


class EmulatedGraph:
    def __init__(self, step, out):
        self.step, self.out, self.replays = step, out, 0

    def replay(self):
        self.out.copy_(self.step())
        self.replays += 1


class EmulatedDecoder(GraphedDecoder):
    def __call__(self, cache, tokens, positions):
        self.current_cache = cache
        return super().__call__(cache, tokens, positions)

    def _warm_up(self, step):
        step()

    def _record(self, step):
        out = step()

        def rerun():
            # a real replay runs no Python; re-running the forward must forget what it keeps per
            # positions tensor (by identity), since the replay feeds the same one, refilled
            attention._last_mask = (None, 0, None, None)
            self.model.rotary._last = (None, None)
            self.current_cache._planned_for = None
            return step()
        return EmulatedGraph(rerun, out), out

    def _synchronize(self):
        pass

    read_backs = 0  # steps replayed before the host read the tokens they are fed

    def read_back(self, *tensors):
        self.read_backs += 1
        return lambda: [t.tolist() for t in tensors]

    def positions_tensor(self, values, device):
        return torch.tensor(values, device=device)[:, None]


class UncapturableDecoder(EmulatedDecoder):
    def _record(self, step):
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("graphs") / "llama",
                            random_llama_state(TINY_LLAMA, vocab_size=32000, seed=5), TINY_LLAMA)


def load(path):
    return MetaModel.from_pretrained(path, max_seq_len=128, device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture
def emulated(monkeypatch):
    """Engines on the CPU take the graphed path, through ``decoder_cls``."""
    def use(decoder_cls=EmulatedDecoder):
        monkeypatch.setattr(engine_module, "GraphedDecoder", decoder_cls)
        monkeypatch.setattr(engine_module, "cuda_graphs_enabled",
                            lambda device, wanted=None, model_parallel=False: wanted is not False)
    return use


def test_graphed_steps_give_the_same_text_and_a_graph_per_batch_size(ckpt, emulated):
    emulated()
    model, plain = load(ckpt), load(ckpt)
    plain.engine.cuda_graphs = False
    texts = model.generate(PROMPTS, max_gen_len=12)
    assert texts == plain.generate(PROMPTS, max_gen_len=12)
    decoder = model.engine._graphed
    assert isinstance(decoder, EmulatedDecoder) and plain.engine._graphed is None
    assert decoder.captures == 1
    (graph,) = [c.graph for c in decoder.graphs.values()]
    assert graph.replays == 11  # every decode step after the prefill
    # a stop string ends the first row early: the second goes on alone, in a new graph
    stop = texts[0][4:8]
    assert model.generate(PROMPTS, max_gen_len=12, additional_stop_symbols=[stop]) == \
        plain.generate(PROMPTS, max_gen_len=12, additional_stop_symbols=[stop])
    # one new graph for the lone row; the two rows' is reused when the new cache got the old one's memory
    assert decoder.captures in (2, 3) and len(decoder.graphs) <= GraphedDecoder.MAX_GRAPHS


@pytest.mark.parametrize("sampling", [SamplingParams(),
                                      SamplingParams(temperature=0.8, top_k=40, seed=3, repetition_penalty=1.3,
                                                     presence_penalty=0.5)])
def test_steps_started_before_the_tokens_are_read_back_change_no_row(ckpt, emulated, sampling):
    """Each step replays as soon as its tokens are picked, before the host reads them: rows that
    end on EOS, a stop string or their own limits, in one batch, get the tokens, log-probabilities
    (to rounding) and kept caches of steps run one after another."""
    emulated()
    model, plain = load(ckpt), load(ckpt)
    prompts = [model.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS + ["A third row"]]

    def engine(of, eos_ids):
        eng = GenerationEngine(of.llma, of.tokenizer, eos_ids=eos_ids, cuda_graphs=of is model, prompt_cache=True)
        eng.prompt_cache_slots = 3
        return eng

    def run(eng, limits, stops=()):
        for states in eng.run(prompts, limits, sampling, stops, logprobs=True, top_logprobs=3):
            pass
        return [(s.new_tokens, s.finish_reason, s.visible, s.logprobs, s.top_logprobs) for s in states]

    reference = run(engine(plain, []), [12, 12, 12])
    eos = reference[1][0][5]  # the second row's sixth token ends it (and any row picking it)
    # the first row stops on its text from its seventh token on
    stop = reference[0][2][len(model.tokenizer.decode(reference[0][0][:6])):][:2]
    limits = [12, 12, 4]  # the third row runs out first
    graphed_engine = engine(model, [eos])
    got = run(graphed_engine, limits, [stop])
    plain_engine = engine(plain, [eos])
    want = run(plain_engine, limits, [stop])
    # (the step after a row ends computes it once more: the other rows' numbers come from a wider
    # product, which may round differently)
    assert [row[:3] for row in got] == [row[:3] for row in want]
    for (*_, got_logprobs, got_top), (*_, want_logprobs, want_top) in zip(got, want):
        assert got_logprobs == pytest.approx(want_logprobs, rel=1e-5, abs=1e-5)
        assert [[i for i, _ in step] for step in got_top] == [[i for i, _ in step] for step in want_top]
        assert [v for step in got_top for _, v in step] == \
            pytest.approx([v for step in want_top for _, v in step], rel=1e-5, abs=1e-5)
        assert len(got_top) == len(got_logprobs) and all(len(step) == 3 for step in got_top)
    assert [reason for _, reason, *_ in got] == ["stop", "eos", "length"]
    decoder = graphed_engine._graphed
    assert isinstance(decoder, EmulatedDecoder) and decoder.read_backs >= 4
    assert plain_engine._graphed is None
    # what the rows' kept caches hold serves a next run exactly as the plain engine's do
    assert len(graphed_engine._kept) == 3
    assert sorted(k.tokens for k in graphed_engine._kept) == sorted(k.tokens for k in plain_engine._kept)
    follow = [prompts[0] + got[0][0] + prompts[2][1:]]  # the stopped row's conversation goes on

    def next_turn(eng):
        (row,) = list(eng.run(follow, [6], sampling))[-1]
        return row.new_tokens, row.cached_tokens
    turn = next_turn(graphed_engine)
    assert turn == next_turn(plain_engine) and turn[1] > len(prompts[0]) + 3


def test_a_step_that_cannot_be_captured_runs_directly_and_says_so(ckpt, emulated, caplog):
    emulated(UncapturableDecoder)
    model, plain = load(ckpt), load(ckpt)
    plain.engine.cuda_graphs = False
    with caplog.at_level(logging.WARNING, logger="accessory.generation.cuda_graphs"):
        assert model.generate(PROMPTS, max_gen_len=10) == plain.generate(PROMPTS, max_gen_len=10)
        assert model.generate(PROMPTS, max_gen_len=10) == plain.generate(PROMPTS, max_gen_len=10)
    assert model.engine._graphed.disabled and caplog.text.count("without CUDA graphs") == 1


def test_a_graph_is_replayed_for_the_same_cache_only_while_the_model_is_unchanged(ckpt):
    model = load(ckpt)
    llma = model.llma
    decoder = EmulatedDecoder(llma)
    cache = llma.new_kv_cache(1, 16)
    tokens, positions = torch.tensor([[5]]), torch.tensor([[0]])
    with torch.inference_mode():
        first = decoder(cache, tokens, positions)
        again = decoder(copy.copy(cache), tokens, positions)  # another cache object over the same memory
        assert decoder.captures == 1
        torch.testing.assert_close(again, first)
        llma.output.weight = torch.nn.Parameter(llma.output.weight.detach() * 2)  # new memory
        doubled = decoder(copy.copy(cache), tokens, positions)
        assert decoder.captures == 2
        torch.testing.assert_close(doubled, 2 * first)
        handle = llma.layers[0].register_forward_hook(lambda module, args, out: out)
        decoder(copy.copy(cache), tokens, positions)
        assert decoder.captures == 3
        handle.remove()
        # a new cache every call: at most MAX_GRAPHS graphs are kept
        for _ in range(GraphedDecoder.MAX_GRAPHS + 2):
            decoder(llma.new_kv_cache(1, 16), tokens, positions)
        assert len(decoder.graphs) <= GraphedDecoder.MAX_GRAPHS
