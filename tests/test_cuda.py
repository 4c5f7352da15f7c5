"""The CUDA paths (skipped where torch sees no GPU, as on CI): the same numbers as on the CPU.

Run on a GPU machine with ``python -m pytest tests/test_cuda.py``.
"""

import logging

import pytest
import torch

from ckpt_utils import TINY_LLAMA, random_llama_state, write_checkpoint

from accessory.model.meta import MetaModel
from accessory.quant import QuantLinear
from accessory.quant import linear as quant_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    state = random_llama_state(TINY_LLAMA, vocab_size=32000, seed=5)
    return write_checkpoint(tmp_path_factory.mktemp("cuda") / "llama", state, TINY_LLAMA)


def _load(path, device, **kw):
    kw.setdefault("dtype", torch.float32)
    return MetaModel.from_pretrained(path, max_seq_len=128, device=device, progress=False, **kw)


def _logits(model, text=PROMPTS[1]):
    tokens = torch.tensor([model.tokenizer.encode(text, bos=True, eos=False)], device=model.device)
    with torch.inference_mode():
        return model.llma.forward_tokens(tokens).float().cpu()


def test_default_device_is_cuda_and_logits_match_cpu(ckpt):
    gpu = MetaModel.from_pretrained(ckpt, max_seq_len=128, dtype=torch.float32, progress=False)
    assert gpu.device.type == "cuda"
    cpu = _load(ckpt, "cpu")
    torch.testing.assert_close(_logits(gpu), _logits(cpu), rtol=1e-4, atol=1e-4)


def test_generation_matches_cpu_batched_streamed_and_per_row_limits(ckpt, monkeypatch):
    monkeypatch.delenv("ACCESSORY_CUDA_GRAPHS", raising=False)  # the default: decode steps as CUDA graphs
    gpu, cpu = _load(ckpt, "cuda"), _load(ckpt, "cpu")
    assert gpu.generate(PROMPTS, max_gen_len=20) == cpu.generate(PROMPTS, max_gen_len=20)
    assert gpu.engine._graphed.captures and not gpu.engine._graphed.disabled
    streamed = list(gpu.stream_generate(PROMPTS[0], max_gen_len=20))
    assert streamed[-1]["text"] == gpu.generate([PROMPTS[0]], max_gen_len=20)[0]
    sampled = [gpu.generate(PROMPTS, max_gen_len=12, temperature=0.8, top_p=0.9, seed=7) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_decode_steps_replay_cuda_graphs_with_the_same_text(ckpt, monkeypatch):
    monkeypatch.setenv("ACCESSORY_CUDA_GRAPHS", "1")
    model = _load(ckpt, "cuda")
    graphed = model.generate(PROMPTS, max_gen_len=24)
    decoder = model.engine._graphed
    assert decoder is not None and not decoder.disabled and decoder.graphs
    monkeypatch.setenv("ACCESSORY_CUDA_GRAPHS", "0")
    eager = _load(ckpt, "cuda")
    assert eager.generate(PROMPTS, max_gen_len=24) == graphed and eager.engine._graphed is None
    # rows finishing at different lengths shrink the batch: a new graph per batch size
    stop = model.generate(PROMPTS, max_gen_len=20)[0][:6]  # a stop string ends row 0 early
    assert model.generate(PROMPTS, max_gen_len=20, additional_stop_symbols=[stop]) == \
        eager.generate(PROMPTS, max_gen_len=20, additional_stop_symbols=[stop])


def test_steps_start_before_their_tokens_reach_the_host_with_the_cpus_tokens(ckpt, monkeypatch):
    """Each graphed step replays before the host has read the tokens it is fed: rows that end on
    EOS, a stop string or their own limits in one batch still get the CPU's tokens and
    log-probabilities (read back with the tokens)."""
    from accessory.generation.cuda_graphs import GraphedDecoder
    from accessory.generation.engine import GenerationEngine
    from accessory.generation.sampling import SamplingParams
    monkeypatch.delenv("ACCESSORY_CUDA_GRAPHS", raising=False)
    read_backs = []
    read_back = GraphedDecoder.read_back
    monkeypatch.setattr(GraphedDecoder, "read_back", lambda self, *t: read_backs.append(1) or read_back(self, *t))
    gpu, cpu = _load(ckpt, "cuda"), _load(ckpt, "cpu")
    prompts = [cpu.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS + ["A third row"]]

    def run(model, limits, eos_ids=(), stops=()):
        engine = GenerationEngine(model.llma, model.tokenizer, eos_ids=eos_ids)
        for states in engine.run(prompts, limits, SamplingParams(), stops, logprobs=True, top_logprobs=2):
            pass
        return [(s.new_tokens, s.finish_reason, s.visible) for s in states], \
            [(s.logprobs, [v for step in s.top_logprobs for _, v in step]) for s in states]
    reference, _ = run(cpu, [12, 12, 12])
    eos = reference[1][0][5]
    stop = reference[0][2][len(cpu.tokenizer.decode(reference[0][0][:6])):][:2]
    got, got_logprobs = run(gpu, [12, 12, 4], [eos], [stop])
    want, want_logprobs = run(cpu, [12, 12, 4], [eos], [stop])
    assert got == want
    for (chosen, best), (want_chosen, want_best) in zip(got_logprobs, want_logprobs):
        assert chosen == pytest.approx(want_chosen, abs=1e-4) and best == pytest.approx(want_best, abs=1e-4)
    assert [reason for _, reason, _ in got] == ["stop", "eos", "length"] and len(read_backs) >= 4


@pytest.mark.parametrize("quant", ["int8", "int4", "nf4"])
def test_quantized_decode_steps_replay_cuda_graphs_with_the_same_text(ckpt, quant, monkeypatch):
    monkeypatch.setenv("ACCESSORY_CUDA_GRAPHS", "1")
    model = _load(ckpt, "cuda", quant=quant)
    graphed = model.generate(PROMPTS, max_gen_len=16)
    decoder = model.engine._graphed
    assert decoder.captures and not decoder.disabled
    monkeypatch.setenv("ACCESSORY_CUDA_GRAPHS", "0")
    assert _load(ckpt, "cuda", quant=quant).generate(PROMPTS, max_gen_len=16) == graphed


def test_cuda_graphs_step_aside_for_a_mixture_of_experts(tmp_path, monkeypatch, caplog):
    """Routing tokens to experts reads counts back from the GPU, which a capture cannot hold: the
    engine says so once, runs the steps directly, and the GPU stays usable."""
    import test_mixtral as mx
    config = mx.original_config(mx.CFG, "mixtral_sparse")
    path = mx.write_original_checkpoint(tmp_path / "moe", mx.dense_to_sparse(mx.random_mixtral_state(mx.CFG, seed=3),
                                                                             mx.CFG), config, "mixtral_sparse", 1)
    monkeypatch.setenv("ACCESSORY_CUDA_GRAPHS", "1")
    model = _load(path, "cuda")
    with caplog.at_level(logging.WARNING, logger="accessory.generation.cuda_graphs"):
        text = model.generate(PROMPTS, max_gen_len=12)
    assert model.engine._graphed.disabled and "without CUDA graphs" in caplog.text
    assert model.generate(PROMPTS, max_gen_len=12) == text
    monkeypatch.setenv("ACCESSORY_CUDA_GRAPHS", "0")
    assert _load(path, "cuda").generate(PROMPTS, max_gen_len=12) == text
    assert _load(path, "cpu").generate(PROMPTS, max_gen_len=12) == text


@pytest.mark.parametrize("case", ["internlm/layernorm_theta_scaling", "falcon/7b_multi_query_parallel",
                                  "falcon/new_arch_mha_bias"])
def test_zoo_decode_steps_replay_cuda_graphs_by_default_with_the_same_text(case, tmp_path, monkeypatch):
    import test_internlm_falcon as zoo
    family, name = case.split("/")
    if family == "internlm":
        cfg = zoo.internlm_full_config(zoo.INTERNLM_CONFIGS[name])
        shapes, split, tokenizer = zoo.internlm_shapes(cfg), zoo.internlm_split_dim, "llama-spm"
    else:
        cfg = zoo.falcon_full_config(zoo.FALCON_CONFIGS[name])
        shapes, split, tokenizer = zoo.falcon_shapes(cfg), zoo.falcon_split_dim(cfg), "falcon"
    path = zoo.write_original_checkpoint(tmp_path / family, zoo.random_state(shapes, seed=1), cfg, family,
                                         tokenizer, split)
    monkeypatch.delenv("ACCESSORY_CUDA_GRAPHS", raising=False)
    model = _load(path, "cuda")
    text = model.generate(PROMPTS, max_gen_len=16)
    assert model.engine._graphed.captures and not model.engine._graphed.disabled
    monkeypatch.setenv("ACCESSORY_CUDA_GRAPHS", "0")
    eager = _load(path, "cuda")
    assert eager.generate(PROMPTS, max_gen_len=16) == text and eager.engine._graphed is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_steps_run_compiled_with_the_modules_numbers(ckpt, dtype, monkeypatch):
    from accessory.model.LLM.llama import PLAIN_BLOCK_TYPES
    from accessory.model.layers.compiled_decode import compiled_decode_layers
    monkeypatch.delenv("ACCESSORY_COMPILE", raising=False)
    llma = _load(ckpt, "cuda", dtype=dtype).llma
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 461, 10575]], device="cuda")
    cache = llma.new_kv_cache(1, 32)
    zero = torch.zeros(1, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        llma.forward_tokens(ids[:, :5], torch.arange(5, device="cuda")[None], cache, output_index=zero + 4)
        other = llma.new_kv_cache(1, 32)
        for mine, theirs in zip(cache.keys + cache.values, other.keys + other.values):
            theirs.copy_(mine)
        assert compiled_decode_layers(llma, llma.embed_tokens(ids[:, 5:6]), torch.tensor([[5]], device="cuda"),
                                      llma.new_kv_cache(1, 32), PLAIN_BLOCK_TYPES) is not None
        compiled, modules = [], []
        for i in range(5, 8):
            position = torch.tensor([[i]], device="cuda")
            compiled.append(llma.forward_tokens(ids[:, i:i + 1], position, cache, output_index=zero).float())
            monkeypatch.setenv("ACCESSORY_COMPILE", "0")
            modules.append(llma.forward_tokens(ids[:, i:i + 1], position, other, output_index=zero).float())
            monkeypatch.delenv("ACCESSORY_COMPILE")
    compiled, modules = torch.stack(compiled), torch.stack(modules)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2  # bf16: the norm's weight applied before rounding
    assert ((compiled - modules).abs().max() / modules.std()) < tolerance


def test_bf16_generation_runs(ckpt):
    model = _load(ckpt, "cuda", dtype=torch.bfloat16)
    assert model.llma.output.weight.dtype == torch.bfloat16
    assert all(isinstance(t, str) for t in model.generate(PROMPTS, max_gen_len=8))


LONG = "Once upon a time, in a land far away, there lived a king who had three daughters and a dog"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("quant", ["int8", "int4", "nf4"])
def test_quantized_model_on_cuda_matches_the_cpu_quantized_model(ckpt, quant, dtype, monkeypatch):
    gpu, cpu = _load(ckpt, "cuda", quant=quant, dtype=dtype), _load(ckpt, "cpu", quant=quant, dtype=dtype)
    assert any(isinstance(m, QuantLinear) for m in gpu.modules())
    gpu_state = gpu.state_dict()
    for name, b in cpu.state_dict().items():  # packed on the GPU or the CPU: the same format, up to
        a = gpu_state[name].cpu()               # a code flipped by a last-bit difference at a tie
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name.endswith(".qweight"):
            assert (a != b).float().mean() < 1e-3, name
    # the CUDA products (tinygemm int4 and bitsandbytes nf4 in bf16) against the CPU's exact format
    # arithmetic on the very same packed tensors: a long prompt takes it anyway; for the short,
    # decode-sized one the CPU's own kernels (which round the activations to int8) are set aside
    cpu.load_state_dict({k: v.cpu() for k, v in gpu_state.items()})
    monkeypatch.setattr(quant_linear, "quant_gemv", lambda *args, **kwargs: None)
    tolerance = 1e-3 if dtype == torch.float32 else 6e-2  # bf16: a few last-bit steps of a logit
    for text in (LONG, PROMPTS[0]):
        got, want = _logits(gpu, text), _logits(cpu, text)
        assert ((got - want).abs().max() / want.std()) < tolerance, text
    assert isinstance(gpu.generate(PROMPTS, max_gen_len=8)[0], str)


@pytest.mark.parametrize("group_size", [96, 128])
def test_int4_products_on_cuda_for_any_group_size(group_size):
    """formats.py allows any multiple of 32 as an int4 group; tinygemm takes 32-256 in powers of
    two, so groups of 96 take the expansion, on the GPU, with the format's product either way."""
    from accessory.quant import QuantScheme, dequantize, quantize
    scheme = QuantScheme("int4", group_size)
    packed = {k: v.cuda() for k, v in quantize(torch.randn(64, 384), scheme).items()}
    x = torch.randn(3, 384, device="cuda", dtype=torch.bfloat16)
    cache = {}
    got = quant_linear.quantized_matmul(x, packed, scheme, 64, 384, cache)
    want = x.float() @ dequantize(packed, scheme).float().T
    assert got.shape == (3, 64) and ((got.float() - want).abs().max() / want.abs().max()) < 2e-2


@pytest.mark.parametrize("name,group", [("int8", 0), ("int4", 32), ("int4", 96), ("nf4", 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_decode_sized_packed_products_read_the_codes_in_one_triton_kernel(name, group, dtype):
    """quant/triton_rows.py against the product of the format's own expanded weights: 1, 3 and 16
    rows (one-row and tl.dot forms), 37 outputs (a partial last block of them), 576 inputs (a
    partial last step of every block size), groups of 32, 64 and 96; float32 exact up to summation
    order, 16-bit activations within their output's rounding."""
    from accessory.quant import QuantScheme, dequantize, quantize, triton_rows
    from accessory.quant.formats import nf4_levels
    if triton_rows.kernel() is None:
        pytest.skip("Triton cannot be imported here")
    scheme = QuantScheme(name, group) if group else QuantScheme(name)
    packed = {k: v.cuda() for k, v in quantize(torch.randn(37, 576), scheme).items()}
    weight = dequantize(packed, scheme)
    for rows in (1, 3, 16):
        x = torch.randn(1, rows, 576, device="cuda").to(dtype)
        got = triton_rows.packed_rows(x, packed, scheme, 37, 576, levels=nf4_levels(x.device))
        want = x.float() @ weight.T
        assert got.dtype == dtype and got.shape == (1, rows, 37)
        error = ((got.float() - want).abs().max() / want.abs().max()).item()
        assert error < (1e-5 if dtype == torch.float32 else 1e-2), (rows, error)


def test_packed_products_take_the_triton_kernel_up_to_its_row_count(monkeypatch):
    """A QuantLinear on the GPU with ACCESSORY_TRITON=1: up to MAX_ROWS token rows through the
    kernel, more through the other paths (tinygemm here), the same numbers either way; none with
    the variable unset."""
    from accessory.quant import QuantScheme, triton_rows
    if triton_rows.kernel() is None:
        pytest.skip("Triton cannot be imported here")
    calls = []
    real = triton_rows.packed_rows
    monkeypatch.setattr(triton_rows, "packed_rows", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    linear = torch.nn.Linear(256, 64, bias=False)
    layer = QuantLinear.from_linear(linear, QuantScheme("int4", 32)).cuda()
    x = torch.randn(1, triton_rows.MAX_ROWS + 1, 256, device="cuda", dtype=torch.bfloat16)
    monkeypatch.delenv("ACCESSORY_TRITON", raising=False)
    with torch.inference_mode():
        layer(x[:, :1])
    assert calls == []
    monkeypatch.setenv("ACCESSORY_TRITON", "1")
    with torch.inference_mode():
        few, many = layer(x[:, :triton_rows.MAX_ROWS]), layer(x)
    assert calls == [(1, triton_rows.MAX_ROWS, 256)]
    torch.testing.assert_close(few, many[:, :triton_rows.MAX_ROWS], atol=2e-2, rtol=2e-2)
