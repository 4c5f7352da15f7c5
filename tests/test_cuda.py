"""The CUDA paths (skipped where torch sees no GPU, as on CI): the same numbers as on the CPU.

Run on a GPU machine with ``python -m pytest tests/test_cuda.py``.
"""

import pytest
import torch

from ckpt_utils import TINY_LLAMA, random_llama_state, write_checkpoint

from accessory.model.meta import MetaModel
from accessory.quant import QuantLinear

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


def test_generation_matches_cpu_batched_streamed_and_per_row_limits(ckpt):
    gpu, cpu = _load(ckpt, "cuda"), _load(ckpt, "cpu")
    assert gpu.generate(PROMPTS, max_gen_len=20) == cpu.generate(PROMPTS, max_gen_len=20)
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


def test_bf16_generation_runs(ckpt):
    model = _load(ckpt, "cuda", dtype=torch.bfloat16)
    assert model.llma.output.weight.dtype == torch.bfloat16
    assert all(isinstance(t, str) for t in model.generate(PROMPTS, max_gen_len=8))


LONG = "Once upon a time, in a land far away, there lived a king who had three daughters and a dog"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("quant", ["int8", "int4", "nf4"])
def test_quantized_model_on_cuda_matches_the_cpu_quantized_model(ckpt, quant, dtype):
    gpu, cpu = _load(ckpt, "cuda", quant=quant, dtype=dtype), _load(ckpt, "cpu", quant=quant, dtype=dtype)
    assert any(isinstance(m, QuantLinear) for m in gpu.modules())
    gpu_state = gpu.state_dict()
    for name, b in cpu.state_dict().items():  # packed on the GPU or the CPU: the same format, up to
        a = gpu_state[name].cpu()               # a code flipped by a last-bit difference at a tie
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name.endswith(".qweight"):
            assert (a != b).float().mean() < 1e-3, name
    # the CUDA products (tinygemm int4 and bitsandbytes nf4 in bf16) against the CPU's exact format
    # arithmetic (a prompt longer than the CPU kernels take) on the very same packed tensors
    cpu.load_state_dict({k: v.cpu() for k, v in gpu_state.items()})
    tolerance = 1e-3 if dtype == torch.float32 else 6e-2  # bf16: a few last-bit steps of a logit
    got, want = _logits(gpu, LONG), _logits(cpu, LONG)
    assert ((got - want).abs().max() / want.std()) < tolerance
    # short: decode-sized products, where the CPU's int8/int4 kernels round the activations to int8
    # per block of 32 (nf4 too, through its int8 output head)
    got, want = _logits(gpu, PROMPTS[0]), _logits(cpu, PROMPTS[0])
    assert ((got - want).abs().max() / want.std()) < 0.05
    assert isinstance(gpu.generate(PROMPTS, max_gen_len=8)[0], str)
