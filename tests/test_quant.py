"""Weight-only quantization (accessory/quant): formats, native kernels, quantized models, checkpoints.

Tolerances, per scheme, for the quantized model's logits against the full-precision model's (RMS
deviation relative to the logits' RMS, on the random tiny llama, whose Gaussian weights are a worst
case for 4 bits: measured int8 1.2%, int4 17%): int8 2%, int4 25%, nf4 30%. Against a model whose
weights are *replaced by their dequantized values* the match is much tighter, which checks that the
code computes exactly the format's arithmetic: 1e-4 of the logits' spread at worst, except the int4
decode kernel, which rounds activations to int8 per block of 32 as llama.cpp's Q4 x Q8 product does
(5% RMS; measured 2.4%, and it leaves the error against full precision unchanged: 17.0% vs 17.0%).
Real-model quality (perplexity on SmolLM2) is measured by benchmarks/quant.py.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from ckpt_utils import TINY_LLAMA, random_llama_state, write_checkpoint

import accessory.kernels.quant as kq
from accessory.errors import CheckpointError, ConfigError
from accessory.model.meta import MetaModel
from accessory.quant import QuantLinear, QuantScheme, dequantize, eligible_linears, quantize, resolve_scheme
from accessory.quant.checkpoint import read_quantization, save_quantized
from accessory.quant.formats import NF4_LEVELS
from accessory.model.layers.linear import still_fused
from accessory.quant.linear import FusedQuantLinear, quantized_matmul

SCHEMES = [QuantScheme("int8"), QuantScheme("int4"), QuantScheme("int4", 64), QuantScheme("nf4")]
LOGIT_TOLERANCE = {"int8": 0.02, "int4": 0.25, "nf4": 0.30}


def _ids(scheme):
    return f"{scheme.name}-g{scheme.group_size}" if scheme.group_size else scheme.name


# --------------------------------------------------------------------------- formats

@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids)
def test_dequantize_inverts_quantize_within_the_format_step(scheme):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    packed = quantize(w, scheme)
    assert {k: tuple(v.shape) for k, v in packed.items()} == scheme.shapes(48, 256)
    assert {k: v.dtype for k, v in packed.items()} == {k: scheme.dtypes()[k] for k in packed}
    back = dequantize(packed, scheme)
    if scheme.name == "int8":
        step = w.abs().amax(dim=1, keepdim=True) / 127  # half a step at most, per row
        assert ((back - w).abs() <= step / 2 + 1e-6).all()
    elif scheme.name == "int4":
        groups = w.view(48, -1, scheme.group_size)
        step = (groups.amax(-1) - groups.amin(-1)) / 15
        err = (back - w).view(48, -1, scheme.group_size).abs().amax(-1)
        assert (err <= step * 0.51 + 1e-3).all()  # half a step, plus fp16 rounding of scale/offset
    else:
        groups = w.view(48, -1, scheme.group_size)
        absmax = groups.abs().amax(-1, keepdim=True)
        widest_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()
        err = (back.view_as(groups) - groups).abs()
        assert (err <= absmax * widest_gap / 2 + 1e-3).all()
    # a dequantized matrix is a fixed point: quantizing it again gives the same codes
    again = quantize(back, scheme)
    assert torch.equal(dequantize(again, scheme), back)


def test_int4_codes_use_the_full_range_and_pack_per_block_of_32():
    w = torch.arange(64, dtype=torch.float32).repeat(2, 1)  # one group of 32 rising values, twice
    packed = quantize(w, QuantScheme("int4", 32))
    first_block = packed["qweight"][0, :16]
    low, high = first_block & 0x0F, first_block >> 4
    assert low[0] == 0 and high[-1] == 15  # minimum -> 0, maximum -> 15
    assert torch.equal(low, torch.round(torch.arange(16) * 15 / 31).to(torch.uint8))


def test_schemes_parse_and_refuse_bad_input():
    assert resolve_scheme(False) is None and resolve_scheme(None) is None
    assert resolve_scheme(True, torch.device("cpu")) == QuantScheme("int4", 32)
    assert resolve_scheme(True, torch.device("cuda")) == QuantScheme("nf4", 64)
    assert resolve_scheme("int4-g128") == QuantScheme("int4", 128)
    assert resolve_scheme("INT8") == QuantScheme("int8")
    with pytest.raises(ValueError, match="int8, int4, nf4"):
        resolve_scheme("int3")
    with pytest.raises(ValueError, match="multiple of 32"):
        resolve_scheme("int4-g48")
    with pytest.raises(ValueError, match="multiple of it"):
        quantize(torch.randn(4, 48), QuantScheme("int4", 32))


# --------------------------------------------------------------------------- kernels

needs_kernels = pytest.mark.skipif(not kq.native_quant_available(), reason="native quant kernels unavailable "
                                   "(no C compiler or no AVX2/FMA/F16C on this CPU)")


@pytest.fixture(params=["avx2", "avx512"])
def quant_kernel(request, monkeypatch):
    """Each library of the quantized products in turn: gemv_quant.c (AVX2) and, where the CPU has
    AVX512-VNNI, gemv_quant_avx512.c; the expansion for many rows (AVX512-BF16) held off, so that
    these integer kernels take every count of rows they can."""
    from accessory import kernels
    monkeypatch.setattr(kq, "EXPAND_FROM", {})
    if request.param == "avx512" and not (kernels.cpu_supports_avx512_vnni() and kernels.native_kernels_enabled()):
        pytest.skip("this CPU has no AVX512-VNNI (or native kernels are off)")
    monkeypatch.setenv("ACCESSORY_QUANT_KERNEL", request.param)
    monkeypatch.setattr(kq, "_loaded", False)
    monkeypatch.setattr(kq, "_functions", None)
    assert kernels.quant_library()[0] == ("gemv_quant_avx512" if request.param == "avx512" else "gemv_quant")
    return request.param


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids)
@pytest.mark.parametrize("rows", [1, 3, 5, 16, "most"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_kernel_computes_the_formats_product(scheme, rows, dtype, quant_kernel):
    rows = kq.max_rows(scheme.name) if rows == "most" else rows
    gen = torch.Generator().manual_seed(rows)
    out_features, in_features = 37, 256 if scheme.name != "int8" else 200  # odd rows; int8: a tail
    w = torch.randn(out_features, in_features, generator=gen) * 0.05
    packed = quantize(w, scheme)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    y = kq.quant_gemv(x, packed, scheme, out_features, in_features)
    assert y is not None and y.dtype == dtype and y.shape == (rows, out_features)
    reference = x.double() @ dequantize(packed, scheme, torch.float64).T
    scale = reference.abs().max()
    # int8 and int4 round the activations to int8 per block of 32 (see the test below)
    tolerance = 2e-2 if scheme.name in ("int8", "int4") else 1e-5 if dtype == torch.float32 else 1e-2
    assert ((y.double() - reference).abs().max() / scale) < tolerance


def _blockwise_int8(x: torch.Tensor):
    """x (rows, n * 32) float32 -> the kernels' int8 codes and float32 step per block of 32:
    step = amax / 127, codes = round-half-even(x * (127 / amax)) in float32."""
    blocks = x.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    inverse = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return torch.round(blocks * inverse), amax / 127


@needs_kernels
@pytest.mark.parametrize("scheme,in_features", [
    (QuantScheme("int8"), 200), (QuantScheme("int8"), 232), (QuantScheme("int4"), 384), (QuantScheme("int4"), 224),
    (QuantScheme("int4"), 1312), (QuantScheme("int4", 64), 320), (QuantScheme("int4", 128), 384)],
    ids=lambda v: v if isinstance(v, int) else _ids(v))
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 61, 64])
def test_integer_kernels_compute_their_stated_arithmetic(scheme, in_features, rows, quant_kernel):
    """int8 / int4 against a float64 re-statement of what they compute: the weight codes times
    the activations' block codes, scaled per block (int4: plus each group's offset times the
    exact sum of its activations; int8: the inputs past the last block of 32 in float). Inputs of
    even and odd numbers of blocks (the AVX-512 library takes two or four at a time) and past 16
    groups (it sums the offsets' term sixteen groups at a time); halves round to even."""
    gen = torch.Generator().manual_seed(rows)
    out_features = 37
    w = torch.randn(out_features, in_features, generator=gen) * 0.05
    packed = quantize(w, scheme)
    x = torch.randn(rows, in_features, generator=gen)
    x[:, 5] *= 40  # an outlier channel: its block gets a coarse step, the others do not
    # the second block all ties: its largest magnitude 127 makes its step 1, so its codes are
    # -15.5 .. 15.5 rounded, to the even neighbour as torch.round (and lrintf) rounds them
    x[:, 32:64] = torch.arange(32) - 15.5
    x[:, 32] = 127
    y = kq.quant_gemv(x, packed, scheme, out_features, in_features)
    whole = in_features // 32 * 32
    xq, step = _blockwise_int8(x[:, :whole])
    xq, step = xq.double(), step.double()
    if scheme.name == "int8":
        q = packed["qweight"].double()
        per_block = torch.einsum("mbk,obk->mob", xq, q[:, :whole].view(out_features, -1, 32))
        reference = (per_block * step[:, None, :, 0]).sum(-1) + x[:, whole:].double() @ q[:, whole:].T
        reference = reference * packed["scales"].double()
    else:
        codes = dequantize({**packed, "scales": torch.ones_like(packed["scales"]),
                            "offsets": torch.zeros_like(packed["offsets"])}, scheme, torch.float64)
        per_block = torch.einsum("mbk,obk->mob", xq, codes.view(out_features, -1, 32))
        block_scale = packed["scales"].double().repeat_interleave(scheme.group_size // 32, dim=1)
        reference = (per_block * step[:, None, :, 0] * block_scale).sum(-1)
        group_sums = x.double().view(rows, -1, scheme.group_size).sum(-1)
        reference = reference + group_sums @ packed["offsets"].double().T
    assert torch.allclose(y.double(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids)
def test_kernel_declines_what_it_does_not_handle(scheme, quant_kernel):
    """Up to max_rows (the AVX512-VNNI library's int8 / int4 products take longer prompts than the
    AVX2 one's) natively; beyond, and for what it cannot take, the expansion."""
    packed = quantize(torch.randn(8, 64), scheme)
    most = kq.max_rows(scheme.name)
    if kq.native_quant_available():
        assert most == (kq.MAX_ROWS_VNNI if quant_kernel == "avx512" else kq.MAX_ROWS)[scheme.name]
    if kq.native_quant_available():
        assert kq.quant_gemv(torch.randn(most, 64), packed, scheme, 8, 64) is not None
    assert kq.quant_gemv(torch.randn(most + 1, 64), packed, scheme, 8, 64) is None  # a longer prompt: fallback
    x = torch.randn(most + 4, 64)
    assert torch.allclose(quantized_matmul(x, packed, scheme, 8, 64), x @ dequantize(packed, scheme).T,
                          atol=1e-5)


needs_expansion = pytest.mark.skipif(not kq.expand_from("int8"), reason="the panel library's expansion runs only "
                                     "on CPUs with AVX512-BF16 (and a C compiler)")


@needs_expansion
@pytest.mark.parametrize("scheme,in_features", [
    (QuantScheme("int8"), 200), (QuantScheme("int8"), 256), (QuantScheme("int4"), 256), (QuantScheme("int4", 64), 320),
    (QuantScheme("int4", 96), 480), (QuantScheme("nf4"), 256), (QuantScheme("nf4", 32), 96)],
    ids=lambda v: v if isinstance(v, int) else _ids(v))
@pytest.mark.parametrize("rows", ["first", 33, 64, 130, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_expansion_computes_the_bf16_product_of_the_formats_weights(scheme, in_features, rows, dtype):
    """From expand_from rows on, any number of them (past one chunk of 128 rows, odd counts), each
    16-row panel is expanded to bf16: the product is the bf16-rounded activations times the
    format's weights rounded to bf16 (int8: its exact codes, the row's scale on the sums), summed
    in float32, for int8 inputs with a tail past the last block of 32, 4-bit groups of 32-96 (96:
    one the integer kernels cannot take), and 37 outputs (a partial last panel). The integer
    kernels (int8 activations) or float32 products would miss this reference by far more."""
    rows = kq.expand_from(scheme.name) if rows == "first" else rows
    gen = torch.Generator().manual_seed(rows + in_features)
    out_features = 37
    w = torch.randn(out_features, in_features, generator=gen) * 0.05
    w[4, 7:40] *= 20  # an outlier group
    packed = quantize(w, scheme)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    y = kq.quant_gemv(x, packed, scheme, out_features, in_features)
    assert y is not None and y.dtype == dtype and y.shape == (rows, out_features)
    activations = x.float().bfloat16().double()
    if scheme.name == "int8":
        reference = (activations @ packed["qweight"].double().T) * packed["scales"].double()
    else:
        reference = activations @ dequantize(packed, scheme, torch.float32).bfloat16().double().T
    error = (y.double() - reference).abs().max() / reference.abs().max()
    assert error < (2e-6 if dtype == torch.float32 else 8e-3)  # (float32 sums; bf16 / fp16 outputs rounded)
    if dtype == torch.float32:  # (the float32 product of the same inputs is further off than the sums' order)
        exact = x.double() @ dequantize(packed, scheme, torch.float64).T
        assert (y.double() - exact).abs().max() / exact.abs().max() > 4 * error


@needs_expansion
def test_expansion_takes_over_from_its_row_count(monkeypatch):
    """Below expand_from rows the integer kernels run (int8 activations), from it the expansion."""
    scheme = QuantScheme("int8")
    packed = quantize(torch.randn(48, 256) * 0.05, scheme)
    first = kq.expand_from("int8")
    expanded = []
    real = kq._expanded_product
    monkeypatch.setattr(kq, "_expanded_product", lambda *a: expanded.append(a[3]) or real(*a))
    for rows in (1, first - 1, first, first + 100):
        assert kq.quant_gemv(torch.randn(rows, 256), packed, scheme, 48, 256) is not None
    assert expanded == [first, first + 100]


@pytest.mark.parametrize("group_size", [96, 160])
def test_int4_groups_the_kernels_cannot_spread_take_the_expansion(group_size, quant_kernel):
    """formats.py allows any multiple of 32 as a group; the int4 kernels spread a group's scale
    over its blocks by a shift (groups of 32 << k). Other sizes take the expansion, whose product
    is the format's (the kernels gave 16-46% of the output's range off for them)."""
    scheme = QuantScheme("int4", group_size)
    packed = quantize(torch.randn(16, 480), scheme)
    assert not kq.takes_scheme(scheme) and kq.takes_scheme(QuantScheme("int4", 128))
    for rows in (1, 3):
        x = torch.randn(rows, 480)
        assert kq.quant_gemv(x, packed, scheme, 16, 480) is None
        assert torch.allclose(quantized_matmul(x, packed, scheme, 16, 480), x @ dequantize(packed, scheme).T,
                              atol=1e-4)


def test_fallback_without_native_kernels_gives_the_same_products(monkeypatch):
    scheme = QuantScheme("int4", 32)
    packed = quantize(torch.randn(40, 128), scheme)
    x = torch.randn(2, 128)
    monkeypatch.setattr(kq, "_kernels", lambda: None)
    assert kq.quant_gemv(x, packed, scheme, 40, 128) is None
    assert torch.allclose(quantized_matmul(x, packed, scheme, 40, 128), x @ dequantize(packed, scheme).T,
                          atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES + [QuantScheme("int4", 128), QuantScheme("nf4", 32)], ids=_ids)
def test_native_expansion_equals_the_formats_dequantize(scheme):
    """Prompt-sized products expand blocks of packed rows natively: bit for bit the float32 matrix
    formats.dequantize gives, for a row slice too (the block the product asks for)."""
    gen = torch.Generator().manual_seed(scheme.group_size or 7)
    weight = torch.randn(37, 256, generator=gen)
    weight[3, :40] *= 30  # an outlier group
    packed = quantize(weight, scheme)
    torch.testing.assert_close(kq.dequantize_rows(packed, scheme, 256), dequantize(packed, scheme), rtol=0, atol=0)
    block = {name: t[5:21] for name, t in packed.items()}
    torch.testing.assert_close(kq.dequantize_rows(block, scheme, 256), dequantize(packed, scheme)[5:21], rtol=0, atol=0)
    # tensors the kernel would misread are left to formats.dequantize
    assert kq.dequantize_rows({**packed, "scales": packed["scales"].double()}, scheme, 256) is None
    assert kq.dequantize_rows({name: t.t() if t.dim() == 2 else t for name, t in packed.items()}, scheme, 256) is None
    assert kq.dequantize_rows(packed, scheme, 128) is None
    if scheme.name == "int4":
        assert kq.dequantize_rows({"qweight": packed["qweight"], "scales": packed["scales"]}, scheme, 256) is None


@needs_kernels
@pytest.mark.parametrize("native_bf16", [False, True])
def test_bf16_prefill_expands_rows_natively(monkeypatch, native_bf16):
    """Prompt-sized bf16 inputs: the packed rows expanded by the native kernel (torch's element-wise
    expansion cost 3x the product on the Zen 4 machine), multiplied in float32 without native bf16,
    in bf16 with it (the expanded rows rounded to bf16, as torch's bf16 product needs them)."""
    import accessory.quant.linear as ql
    monkeypatch.setattr(ql, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(kq, "EXPAND_FROM", {})  # (where the panel library's expansion does not run)
    calls = []
    monkeypatch.setattr(ql, "dequantize_rows", lambda *a: calls.append(1) or kq.dequantize_rows(*a))
    scheme = QuantScheme("nf4")
    packed = quantize(torch.randn(64, 128), scheme)
    x = torch.randn(40, 128).bfloat16()
    got = quantized_matmul(x, packed, scheme, 64, 128)
    assert calls
    if not native_bf16:
        torch.testing.assert_close(got, (x.float() @ dequantize(packed, scheme).T).bfloat16(), rtol=0, atol=0)
    else:
        expected = F.linear(x, dequantize(packed, scheme).bfloat16())
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("native_bf16", [False, True])
def test_bf16_prefill_products_on_cpus_with_and_without_native_bf16(monkeypatch, native_bf16):
    """Prompt-sized bf16 inputs expand the packed matrix: in float32 blocks of rows where the CPU
    lacks native bf16 (what this path is for), in bf16 otherwise; both near the float64 product."""
    import accessory.quant.linear as ql
    monkeypatch.setattr(ql, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(kq, "EXPAND_FROM", {})  # (where the panel library's expansion does not run)
    scheme = QuantScheme("int4", 32)
    gen = torch.Generator().manual_seed(5)
    packed = quantize(torch.randn(9000, 128, generator=gen) * 0.05, scheme)  # several blocks of rows
    x = torch.randn(2, kq.max_rows("int4") // 2 + 3, 128, generator=gen).bfloat16()  # past the kernels' rows
    got = quantized_matmul(x, packed, scheme, 9000, 128)
    assert got.dtype == torch.bfloat16 and got.shape == (*x.shape[:2], 9000)
    reference = x.double() @ dequantize(packed, scheme, torch.float64).T
    error = ((got.double() - reference).abs().max() / reference.abs().max()).item()
    assert error < (1e-2 if native_bf16 else 5e-3)


# --------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    state = random_llama_state(TINY_LLAMA, vocab_size=32000, seed=3)
    return write_checkpoint(tmp_path_factory.mktemp("q") / "llama", state, TINY_LLAMA)


def _load(path, **kw):
    kw.setdefault("dtype", torch.float32)
    return MetaModel.from_pretrained(path, max_seq_len=128, device="cpu", progress=False, **kw)


PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away"]


LONG = "Once upon a time, in a land far away, there lived a king who had three daughters and an old dog"


def _logits(model, text=" ".join([LONG] * 3)):
    """Whole-prompt logits through the float32 expansion path: more tokens than the kernels take
    (the AVX512-VNNI library's longer reach held to the AVX2 one's while they run, and the panel
    library's expansion, which rounds the activations to bf16, held off)."""
    tokens = torch.tensor([model.tokenizer.encode(text, bos=True, eos=False)])
    assert tokens.shape[1] > max(kq.MAX_ROWS.values())
    vnni, expand_from = dict(kq.MAX_ROWS_VNNI), kq.EXPAND_FROM
    kq.MAX_ROWS_VNNI.update(kq.MAX_ROWS)
    kq.EXPAND_FROM = {}
    try:
        with torch.inference_mode():
            return model.llma.forward_tokens(tokens).float()
    finally:
        kq.MAX_ROWS_VNNI.update(vnni)
        kq.EXPAND_FROM = expand_from


def _decode_logits(model, text=PROMPTS[1]):
    """Logits of each position computed one token at a time through the KV cache (the kernels' path)."""
    tokens = model.tokenizer.encode(text, bos=True, eos=False)
    cache = model.llma.new_kv_cache(1, len(tokens), dtype=torch.float32, device="cpu")
    rows = []
    with torch.inference_mode():
        for pos, tok in enumerate(tokens):
            rows.append(model.llma.forward_tokens(torch.tensor([[tok]]), positions=torch.tensor([[pos]]),
                                                  kv_cache=cache)[0, -1].float())
    return torch.stack(rows)[None]


@pytest.fixture(scope="module")
def full_model(tiny_ckpt):
    return _load(tiny_ckpt)


def _rel(a, b):
    """Largest deviation, relative to the logits' spread."""
    return ((a - b).abs().max() / b.std()).item()


def _rms(a, b):
    """Root-mean-square deviation, relative to the logits' root-mean-square."""
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids)
def test_quantized_model_is_close_to_full_precision_and_exact_to_its_format(tiny_ckpt, full_model, scheme):
    model = _load(tiny_ckpt, quant=scheme.name if scheme.name == "int8" else f"{scheme.name}-g{scheme.group_size}")
    assert model.quant_scheme == scheme
    packed = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    # every linear of every block and the output head; never the embedding
    assert len(packed) == 2 * 7 + 1 and "llma.output" in packed
    assert type(model.llma.tok_embeddings.weight) is torch.nn.Parameter
    attention, ffn = model.llma.layers[0].attention, model.llma.layers[0].feed_forward
    assert isinstance(attention._wqkv, FusedQuantLinear) and still_fused(attention._wqkv)
    assert isinstance(ffn._w13, FusedQuantLinear) and still_fused(ffn._w13)
    assert model.llma.tok_embeddings.weight.dtype == torch.float32
    assert not any(n.endswith(".weight") and "layers" in n and "norm" not in n
                   for n, _ in model.named_parameters())

    reference = full_model.llma
    for name in packed:  # the full model with each weight replaced by its dequantized value
        module = model.get_submodule(name)
        ref_module = reference.get_submodule(name[len("llma."):])
        ref_module.__dict__.setdefault("_saved_weight", ref_module.weight.data.clone())
        ref_module.weight.data = module.dequantized_weight(torch.float32)
    try:
        for logits_of in (_logits, _decode_logits):  # prefill (expansion) and decode (kernels)
            exact = logits_of(full_model)
            if logits_of is _decode_logits:  # the int8/int4 kernels round activations to int8
                assert _rms(logits_of(model), exact) < 0.05  # (nf4 too, through its int8 head)
            else:
                assert _rel(logits_of(model), exact) < 1e-4, logits_of.__name__
    finally:
        for name in packed:
            ref_module = reference.get_submodule(name[len("llma."):])
            ref_module.weight.data = ref_module.__dict__.pop("_saved_weight")
    assert _rms(_decode_logits(model), _decode_logits(full_model)) < LOGIT_TOLERANCE[scheme.name]


def test_int8_greedy_text_equals_full_precision(tiny_ckpt, full_model):
    model = _load(tiny_ckpt, quant="int8")
    assert model.generate(PROMPTS, max_gen_len=12) == full_model.generate(PROMPTS, max_gen_len=12)
    # Longer runs of a random model meet near-ties; there, along the full model's greedy path, int8
    # picks the same token at every step whose top-2 logit margin exceeds int8's deviation.
    for prompt in PROMPTS:
        prefix = full_model.tokenizer.encode(prompt, bos=True, eos=False)
        tokens = prefix + full_model.tokenizer.encode(full_model.generate([prompt], max_gen_len=32)[0],
                                                      bos=False, eos=False)
        with torch.inference_mode():
            full = full_model.llma.forward_tokens(torch.tensor([tokens]))[0, len(prefix) - 1:-1]
            quant = model.llma.forward_tokens(torch.tensor([tokens]))[0, len(prefix) - 1:-1]
        top2 = full.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.1 * full.std()
        assert clear.sum() >= len(clear) // 2
        assert torch.equal(full.argmax(-1)[clear], quant.argmax(-1)[clear])


def test_bf16_quantized_model_generates_and_streams_the_same_text(tiny_ckpt):
    model = _load(tiny_ckpt, quant="int4", dtype=torch.bfloat16)
    text = model.generate([PROMPTS[0]], max_gen_len=16)[0]
    streamed = list(model.stream_generate(PROMPTS[0], max_gen_len=16))
    assert text and streamed[-1]["text"] == text


def test_seed_api_quant_true(tiny_ckpt):
    model = MetaModel.from_pretrained(str(tiny_ckpt), max_seq_len=64, quant=True, device="cpu", progress=False)
    assert model.quant_scheme == QuantScheme("int4", 32)
    assert isinstance(model.generate(["Hi"], images=None, max_gen_len=4)[0], str)


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids)
def test_casting_a_quantized_layer_keeps_its_packed_format(scheme):
    """``.bfloat16()`` / ``.float()`` (or ``.to(dtype)``) on a model with quantized layers cast the
    bias, never the packed tensors, which the kernels read by their format."""
    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(128, 24)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 128, generator=gen))
    layer = QuantLinear.from_linear(linear, scheme)
    formats = {name: t.dtype for name, t in layer.packed.items()}
    x = torch.randn(3, 128, generator=gen)
    want = x @ layer.dequantized_weight().T + linear.bias.detach()
    layer.bfloat16()
    assert {name: t.dtype for name, t in layer.packed.items()} == formats and layer.bias.dtype is torch.bfloat16
    got = layer(x.bfloat16()).float()
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    layer.to(torch.float32)
    assert {name: t.dtype for name, t in layer.packed.items()} == formats
    assert (layer(x) - want).abs().max() < 0.02 * want.abs().max()  # (int8 kernels round activations)


def test_lora_bias_and_norms_stay_full_precision(tmp_path):
    cfg = dict(TINY_LLAMA, lora_rank=8, bias_tuning=True)
    from ckpt_utils import llama_shapes
    gen = torch.Generator().manual_seed(0)
    state = random_llama_state(TINY_LLAMA, vocab_size=32000)
    for key, shape in llama_shapes(TINY_LLAMA, 32000).items():
        if key.startswith("layers.") and key.endswith(("wq.weight", "w1.weight")):
            base = key[: -len("weight")]
            state[base + "lora_a.weight"] = torch.randn(8, shape[1], generator=gen) * 0.1
            state[base + "lora_b.weight"] = torch.randn(shape[0], 8, generator=gen) * 0.1
            state[base + "bias"] = torch.randn(shape[0], generator=gen) * 0.1
    ckpt = write_checkpoint(tmp_path / "peft", state, cfg, llama_type="llama_peft")
    full, quantized = _load(ckpt, strict=False), _load(ckpt, strict=False, quant="int8")
    wq = quantized.llma.layers[0].attention.wq
    assert isinstance(wq, QuantLinear) and wq.lora_a.weight.dtype == torch.float32
    assert torch.equal(wq.lora_a.weight, full.llma.layers[0].attention.wq.lora_a.weight)
    assert torch.equal(wq.bias, full.llma.layers[0].attention.wq.bias)
    assert "llma.layers.0.attention.wq.lora_b.weight" in quantized.state_dict()
    for name, module in quantized.named_modules():  # LoRA and biases apply on top of the format's weight
        if isinstance(module, QuantLinear):
            full.get_submodule(name).weight.data = module.dequantized_weight(torch.float32)
    assert _rel(_logits(quantized), _logits(full)) < 1e-4
    assert _rms(_decode_logits(quantized), _decode_logits(full)) < 0.05  # int8-rounded activations


def test_blocklist_and_routers_are_not_quantized():
    from accessory.model.LLM import load_llama_type
    module = load_llama_type("mixtral")
    args = module.ModelArgs(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256,
                            moe={"num_experts": 4, "num_experts_per_tok": 2})
    with torch.device("meta"):
        model = module.Transformer(args)
    names = eligible_linears(model, QuantScheme("int8"), blocklist=["output"])
    assert names and not any(n.endswith(".gate") for n in names) and "output" not in names
    assert any(".experts." in n or "experts" in n for n in names)


# --------------------------------------------------------------------------- pre-quantized checkpoints

@pytest.mark.parametrize("quant", ["int8", "int4", "nf4"])
def test_saved_quantized_checkpoint_loads_exactly(tiny_ckpt, tmp_path, quant):
    model = _load(tiny_ckpt, quant=quant, dtype=torch.bfloat16)
    out = save_quantized(model, tmp_path / "q", sources=[tiny_ckpt])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["llama_type"] == "llama" and meta["quantization"]["scheme"] == quant
    assert read_quantization(out) == model.quant_scheme
    assert (out / "tokenizer.model").is_file() and (out / "config.json").is_file()
    saved = torch.load(out / "consolidated.00-of-01.model.pth", weights_only=True)["model"]
    packed_bytes = sum(t.numel() * t.element_size() for k, t in saved.items()
                       if k.endswith((".qweight", ".scales", ".offsets")) and not k.startswith("llma.output."))
    bf16_bytes = sum(m.in_features * m.out_features * 2 for n, m in model.named_modules()
                     if isinstance(m, QuantLinear) and n != "llma.output")
    # the output head keeps 8 bits under the 4-bit schemes (quant.scheme_for)
    assert model.llma.output.scheme == QuantScheme("int8")
    # 8 bits + a float32 scale per (here short, 64-input) row; 4 bits + fp16 scale (and offset) per group
    assert packed_bytes <= bf16_bytes * (0.6 if quant == "int8" else 0.33)

    again = _load(out, dtype=torch.bfloat16)  # no quant argument: the saved format is used
    assert again.quant_scheme == model.quant_scheme
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_decode_logits(again), _decode_logits(model))
    assert again.generate([PROMPTS[0]], max_gen_len=8) == model.generate([PROMPTS[0]], max_gen_len=8)
    assert _load(out, dtype=torch.bfloat16, quant=True).quant_scheme == model.quant_scheme


def test_pre_quantized_checkpoint_errors(tiny_ckpt, tmp_path):
    out = save_quantized(_load(tiny_ckpt, quant="int8"), tmp_path / "q8", sources=[tiny_ckpt])
    with pytest.raises(ConfigError, match="saved quantized as"):
        _load(out, quant="int4")
    with pytest.raises(CheckpointError, match="load it alone"):
        _load([tiny_ckpt, out])
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(_load(tiny_ckpt), tmp_path / "x", sources=[tiny_ckpt])
    (out / "meta.json").write_text(json.dumps({"llama_type": "llama", "quantization": {"scheme": "int2"}}))
    with pytest.raises(CheckpointError, match="scheme int8, int4 or nf4"):
        _load(out)


# --------------------------------------------------------------------------- command line

def test_quantize_command_then_generate_and_demo_flag(tiny_ckpt, tmp_path, capsys):
    from accessory.cli import main
    out = tmp_path / "int8"
    assert main(["quantize", str(tiny_ckpt), str(out), "--quant", "int8", "--dtype", "fp32"]) == 0
    assert read_quantization(out) == QuantScheme("int8")
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", PROMPTS[0], "--max-gen-len", "8", "--dtype", "fp32"]) == 0
    from_saved = json.loads(capsys.readouterr().out)["text"]
    assert main(["generate", str(tiny_ckpt), "--prompt", PROMPTS[0], "--max-gen-len", "8", "--dtype", "fp32",
                 "--quant", "int8"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == from_saved
    assert main(["quantize", str(tiny_ckpt), str(out), "--quant", "int8"]) == 1  # output already holds shards
    assert "already holds weight shards" in capsys.readouterr().err
    assert main(["generate", str(tiny_ckpt), "--prompt", "x", "--quant", "int3"]) == 1
    assert "int8, int4, nf4" in capsys.readouterr().err


def test_demo_quant_flag_parses_bare_and_with_a_scheme():
    import argparse
    from accessory.demos.common import add_model_args
    parser = argparse.ArgumentParser()
    add_model_args(parser, max_seq_len=2048)
    assert parser.parse_args([]).quant is False
    assert parser.parse_args(["--quant"]).quant is True
    assert parser.parse_args(["--quant", "--port", "1"]).quant is True
    assert parser.parse_args(["--quant", "int8"]).quant == "int8"
