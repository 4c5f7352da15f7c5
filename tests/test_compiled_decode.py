"""The compiled decode step (model/layers/compiled_decode.py), run here on the CPU through torch's
own compiler (its device is a GPU; tests/test_cuda.py runs it there): the same logits, cache and
text as the modules, and the modules whenever it cannot be used.
"""

import copy
import logging

import pytest
import torch

from accessory.model.LLM.llama import PLAIN_BLOCK_TYPES
from accessory.model.layers import compiled_decode

from test_fast_decode import ARGS, tiny  # (float32 here: the native step takes bf16)


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch):
    monkeypatch.setattr(compiled_decode, "DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(compiled_decode, "_failed", False)
    monkeypatch.delenv("ACCESSORY_COMPILE", raising=False)
    monkeypatch.setenv("ACCESSORY_FAST_DECODE", "0")  # (float32 takes the torch path anyway)


def prefilled(model, prompt_lens=(7, 4), capacity=24):
    """A cache holding each row's prompt, the rows' next tokens and positions (rows of different
    lengths: the later steps need the position mask)."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ARGS["vocab_size"], (len(prompt_lens), max(prompt_lens)), generator=gen)
    cache = model.new_kv_cache(len(prompt_lens), capacity)
    positions = torch.arange(tokens.shape[1]).expand(len(prompt_lens), -1)
    with torch.inference_mode():
        model.forward_tokens(tokens, positions, cache, output_index=torch.tensor(prompt_lens) - 1)
    step = torch.randint(0, ARGS["vocab_size"], (len(prompt_lens), 1), generator=gen)
    return cache, step, torch.tensor(prompt_lens)[:, None]


def decode(model, cache, step, positions, steps=3):
    """Logits of ``steps`` greedy decode steps."""
    out = []
    with torch.inference_mode():
        for i in range(steps):
            logits = model.forward_tokens(step, positions + i, cache,
                                          output_index=torch.zeros(len(step), dtype=torch.long))
            out.append(logits.float())
            step = logits.argmax(-1).view(-1, 1)
    return torch.stack(out)


def test_compiled_step_gives_the_modules_logits_and_cache(monkeypatch):
    model = tiny(torch.float32)
    cache, step, positions = prefilled(model)
    cache_compiled = copy.deepcopy(cache)
    with torch.inference_mode():
        direct = compiled_decode.compiled_decode_layers(
            model, model.embed_tokens(step), positions, copy.deepcopy(cache), PLAIN_BLOCK_TYPES)
    assert direct is not None and direct.shape == (2, 1, ARGS["dim"])
    compiled = decode(model, cache_compiled, step, positions)
    monkeypatch.setenv("ACCESSORY_COMPILE", "0")
    modules = decode(model, cache, step, positions)
    torch.testing.assert_close(compiled, modules, rtol=1e-5, atol=1e-5)
    for a, b in zip(cache_compiled.keys + cache_compiled.values, cache.keys + cache.values):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layers_it_does_not_handle_take_the_modules(monkeypatch):
    model = tiny(torch.float32)
    cache, step, positions = prefilled(model)
    h = model.embed_tokens(step)
    types = PLAIN_BLOCK_TYPES
    with torch.inference_mode():
        assert compiled_decode.compiled_decode_layers(model, h, positions, cache, types) is not None
        assert compiled_decode.compiled_decode_layers(model, model.embed_tokens(torch.cat([step, step], 1)),
                                                      torch.cat([positions, positions + 1], 1), cache, types) is None
        handle = model.layers[1].attention.wo.register_forward_hook(lambda *args: None)
        assert compiled_decode.compiled_decode_layers(model, h, positions, cache, types) is None
        handle.remove()
        model.layers[0].feed_forward.w2.bias = torch.nn.Parameter(torch.zeros(ARGS["dim"]))
        assert compiled_decode.compiled_decode_layers(model, h, positions, cache, types) is None
        model.layers[0].feed_forward.w2.bias = None
        assert compiled_decode.compiled_decode_layers(model, h, positions, cache, types) is not None
        assert compiled_decode.compiled_decode_layers(model, h, positions + 100, cache, types) is None  # modules raise
        monkeypatch.setenv("ACCESSORY_COMPILE", "0")
        assert compiled_decode.compiled_decode_layers(model, h, positions, cache, types) is None
        monkeypatch.setattr(compiled_decode, "DEVICES", ("cuda",))
        monkeypatch.delenv("ACCESSORY_COMPILE")
        assert compiled_decode.compiled_decode_layers(model, h, positions, cache, types) is None


def test_a_failed_compilation_is_said_once_and_the_modules_take_over(monkeypatch, caplog):
    def no_compiler(fn, **kwargs):
        def broken(*args):
            raise RuntimeError("no triton here")
        return broken
    monkeypatch.setattr(compiled_decode, "_compiled", {})
    monkeypatch.setattr(torch, "compile", no_compiler)
    model = tiny(torch.float32)
    cache, step, positions = prefilled(model)
    reference = copy.deepcopy(cache)
    with caplog.at_level(logging.WARNING, logger=compiled_decode.__name__):
        logits = decode(model, cache, step, positions)
    assert compiled_decode._failed and caplog.text.count("without torch.compile") == 1
    assert "no triton here" in caplog.text
    monkeypatch.setenv("ACCESSORY_COMPILE", "0")
    torch.testing.assert_close(logits, decode(model, reference, step, positions), rtol=0, atol=0)


def test_models_of_different_head_layouts_compile_in_one_process(monkeypatch):
    """A second shape recompiles the same step function; the head counts must stay plain numbers
    there (torch made them symbolic on the recompile, and SDPA's ``enable_gqa`` refused a SymBool)."""
    monkeypatch.setattr(compiled_decode, "_compiled", {})
    torch._dynamo.reset()
    for overrides in ({"n_kv_heads": 4}, {}, {"n_heads": 2, "n_kv_heads": 1, "dim": 64}):
        model = tiny(torch.float32, **overrides)
        cache, step, positions = prefilled(model)
        reference = copy.deepcopy(cache)
        with torch.inference_mode():
            assert compiled_decode.compiled_decode_layers(
                model, model.embed_tokens(step), positions, copy.deepcopy(cache), PLAIN_BLOCK_TYPES) is not None
        compiled = decode(model, cache, step, positions)
        assert not compiled_decode._failed, overrides
        monkeypatch.setenv("ACCESSORY_COMPILE", "0")
        torch.testing.assert_close(compiled, decode(model, reference, step, positions), rtol=1e-5, atol=1e-5)
        monkeypatch.delenv("ACCESSORY_COMPILE")
