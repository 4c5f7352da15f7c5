"""The native CPU matrix-vector kernel and the q/k/v, w1/w3 fusion."""

import pytest
import torch
import torch.nn.functional as F

from accessory.kernels import native_kernels_enabled
from accessory.kernels.linear import (MAX_ROWS, NativeLinear, linear, native_linear_available, scratch_floats_needed,
                                     use_native_linear)
from accessory.model.layers.linear import LoraLinear, fuse_linears, still_fused

needs_kernel = pytest.mark.skipif(not native_linear_available(),
                                  reason="native kernel unavailable here (no C compiler or no AVX2/FMA)")


@needs_kernel
# AVX2 kernel: 5 rows: weight rows in pairs; 6-8: outer products over a chunk of 8 rows; from 9:
# over chunks of 16 rows (the last one partial at 40). AVX512-BF16 kernel: 1 and 2 rows its row
# form, from 3 tiles of 4 x 4 (rows of more than 2048 inputs in chunks, 2600 here). More than 16 rows
# take the kernel on CPUs without native bf16 (up to 256) and with AVX512-BF16 but no AMX (up to 64);
# torch's product elsewhere.
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 40, 256])
@pytest.mark.parametrize("out_features,in_features", [(64, 64), (37, 100), (130, 33), (512, 768), (48, 2600)])
def test_native_linear_matches_float_reference(rows, out_features, in_features):
    gen = torch.Generator().manual_seed(rows * out_features + in_features)
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    w = torch.randn(out_features, in_features, generator=gen).bfloat16()
    expected = F.linear(x.float(), w.float())
    got = linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    # float32 accumulation, one bf16 rounding of the result
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    # the same as torch's own bf16 product up to rounding of the output
    torch.testing.assert_close(got.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    if rows > MAX_ROWS:  # a prompt-sized call's scratch: its activations in float32, padded to 16 rows
        assert scratch_floats_needed(rows, in_features) <= -(-rows // 16) * 16 * in_features + 8


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 6, 8, 9, 16])
@pytest.mark.parametrize("offset", [0, 3])  # scratch aligned to 32 bytes, or 12 bytes past
@pytest.mark.parametrize("activations", ["float32", "bf16"])
def test_kernel_stays_within_the_scratch_it_asks_for(rows, offset, activations):
    """The decode step sizes the kernel's scratch by what ``scratch_floats_needed`` states (the
    shared, larger buffer ``linear`` uses would hide an overrun): both entries, in each form, must
    stay inside it, wherever it starts. Mutation-checked: dropping the 8 floats of alignment slack,
    or the bf16 entry's second M x I, fails it."""
    from accessory.kernels import linear as kernel_linear
    from accessory.kernels.decode import decode_kernels
    gen = torch.Generator().manual_seed(rows)
    out_features, in_features = 37, 100
    x = torch.randn(rows, in_features, generator=gen)
    w = torch.randn(out_features, in_features, generator=gen).bfloat16()
    needed = scratch_floats_needed(rows, in_features)
    raw = torch.full((8 + offset + 2 * needed + 64,), 12345.0)  # room to see an overrun, not crash on it
    aligned = (-raw.data_ptr() % 32) // 4  # the offset, not the allocator, decides the alignment
    scratch = raw[aligned + offset:]
    if activations == "float32":
        y = torch.empty(rows, out_features)
        decode_kernels().gemv_bf16(w.data_ptr(), x.data_ptr(), scratch.data_ptr(), y.data_ptr(), rows,
                                   out_features, in_features)
    else:
        x = x.bfloat16()
        y = torch.empty(rows, out_features, dtype=torch.bfloat16)
        kernel_linear._kernel()(w.data_ptr(), x.data_ptr(), scratch.data_ptr(), y.data_ptr(), None, rows,
                                out_features, in_features)
    assert torch.equal(scratch[needed:], torch.full((scratch.numel() - needed,), 12345.0))
    expected = F.linear(x.float(), w.float())
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("batch", [1, 3, 7, 20])  # 2, 6, 14 and 40 rows: each form of the kernel
def test_native_linear_keeps_leading_dims_and_adds_the_bias_before_rounding(batch):
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 2, 48, generator=gen).bfloat16()
    w = torch.randn(40, 48, generator=gen).bfloat16()
    b = (torch.randn(40, generator=gen) * 10).bfloat16()
    got = linear(x, w, b)
    assert got.shape == (batch, 2, 40)
    exact = F.linear(x.double(), w.double(), b.double())
    # within half a bf16 step of the exact sum (plus float32 accumulation): rounded once
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-4).all()


def test_other_inputs_fall_back_to_torch_exactly(monkeypatch):
    from accessory.kernels import linear as kernel_linear
    w = torch.randn(24, 32)
    monkeypatch.setattr(kernel_linear, "cpu_has_native_bf16", lambda: True)
    x = torch.randn(max(kernel_linear.max_kernel_rows(), MAX_ROWS) + 1, 32).bfloat16()
    assert torch.equal(linear(x, w.bfloat16()), F.linear(x, w.bfloat16()))  # too many rows, native bf16
    x32 = torch.randn(2, 32)
    assert torch.equal(linear(x32, w), F.linear(x32, w))  # float32


@pytest.mark.parametrize("out_features", [24, 300, 2500])
def test_long_bf16_inputs_without_native_bf16_are_computed_in_float32(monkeypatch, out_features):
    """Inputs of more than MAX_ROWS_WITHOUT_NATIVE_BF16 rows: the weight widened to float32 block by
    block (blocks of at least 64 rows, so 2500 rows of 1040 inputs take several), the result
    rounded once to bf16."""
    from accessory.kernels import linear as kernel_linear
    monkeypatch.setattr(kernel_linear, "cpu_has_native_bf16", lambda: False)
    gen = torch.Generator().manual_seed(out_features)
    x = torch.randn(3, kernel_linear.MAX_ROWS_WITHOUT_NATIVE_BF16 // 2, 1040, generator=gen).bfloat16()
    w = torch.randn(out_features, 1040, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16()
    got = linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (*x.shape[:2], out_features)
    expected = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-4 * expected.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, "beyond"])  # the kernel; beyond its rows, torch's product
def test_float32_out_gives_the_sums_unrounded(bias, rows):
    from accessory.kernels.linear import max_kernel_rows
    rows = max_kernel_rows() + 1 if rows == "beyond" else rows
    torch.manual_seed(rows)
    x, weight = torch.randn(rows, 96).bfloat16(), torch.randn(40, 96).bfloat16()
    b = torch.randn(40).bfloat16() if bias else None
    sums = linear(x, weight, b, float32_out=True)
    assert sums.dtype is torch.float32 and sums.shape == (rows, 40)
    expected = x.double() @ weight.double().T + (0 if b is None else b.double())
    if rows <= max_kernel_rows():  # the kernel's float32 sums, and its bf16 result their rounding
        torch.testing.assert_close(sums.double(), expected, atol=1e-4, rtol=1e-5)
        assert torch.equal(sums.bfloat16(), linear(x, weight, b))
    else:
        torch.testing.assert_close(sums.double(), expected, atol=0, rtol=2 ** -7)


def test_env_switch_disables_native_kernels(monkeypatch):
    monkeypatch.setenv("ACCESSORY_NATIVE_KERNELS", "0")
    assert native_kernels_enabled() is False


@needs_kernel
def test_use_native_linear_only_changes_the_class():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.ReLU(), LoraLinear(8, 4, lora_rank=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_native_linear(model) == 1
    assert type(model[0]) is NativeLinear and type(model[2]) is LoraLinear
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_fused_linears_are_views_and_give_the_same_outputs():
    torch.manual_seed(0)
    wq, wk, wv = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(3, 16)
    expected = [m(x) for m in (wq, wk, wv)]
    state = {n: m.weight.detach().clone() for n, m in zip("qkv", (wq, wk, wv))}
    fused = fuse_linears(wq, wk, wv)
    assert fused.weight.shape == (32, 16) and fused.sizes == [16, 8, 8]
    assert wq.weight.data_ptr() == fused.weight.data_ptr() and still_fused(fused)
    assert all(torch.equal(m.weight, state[n]) for n, m in zip("qkv", (wq, wk, wv)))
    got = fused(x).split(fused.sizes, dim=-1)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    wq.to(torch.float64)  # moving a module un-fuses it: the caller must notice
    assert not still_fused(fused)


@pytest.mark.parametrize("change", ["cast", "assign", "replace"])
@pytest.mark.parametrize("which", [0, 2])
def test_any_fused_module_changed_unfuses_the_product(change, which):
    """Not only the first module: a later one cast, given a new weight or replaced in its parent
    leaves the fused matrix stale, and the product must say so."""
    from accessory.model.LLM.llama import Attention, ModelArgs
    attention = Attention(ModelArgs(dim=32, n_heads=4, n_kv_heads=2))
    attention.fuse()
    assert still_fused(attention._wqkv)
    name = ("wq", "wk", "wv")[which]
    module = getattr(attention, name)
    if change == "cast":
        module.to(torch.float64)
    elif change == "assign":
        module.weight = torch.nn.Parameter(module.weight.detach().clone())
    else:
        setattr(attention, name, torch.nn.Linear(32, module.weight.shape[0], bias=False))
    assert not still_fused(attention._wqkv)


@pytest.mark.parametrize("kind", ["rows", "panels", "int8"])
def test_a_deep_copy_of_a_fused_block_is_fused_over_its_own_copies(kind):
    """Each parameter deep-copies on its own, so a field-by-field copy of the fused product would
    back none of the copied modules (the copy would run unfused; for panels it would also copy the
    whole allocation the panels share): the copy fuses the copied modules again."""
    import copy
    from accessory.model.LLM.llama import Attention, ModelArgs
    from accessory.model.layers.panel_linear import panels_wanted, use_panels
    from accessory.quant import QuantScheme, quantize_model
    torch.manual_seed(0)
    attention = Attention(ModelArgs(dim=64, n_heads=4, n_kv_heads=2)).bfloat16()
    if kind == "panels":
        if not panels_wanted():
            pytest.skip("use_panels packs only on CPUs with AVX512-BF16 (and no AMX)")
        assert use_panels(attention) == 4  # all four in one allocation
    elif kind == "int8":
        quantize_model(attention, QuantScheme("int8"))
    attention.fuse()
    twin = copy.deepcopy(attention)
    assert still_fused(twin._wqkv) and twin._wqkv is not attention._wqkv
    assert twin._wqkv.owners[0][2] is twin.wq  # watches the copy's children, not the original's
    if kind == "panels":  # its own run, not a copy of everything the original's shared memory held
        assert twin._wqkv.panels.untyped_storage().nbytes() == twin._wqkv.panels.numel() * 2
    x = torch.randn(3, 64).bfloat16()
    with torch.inference_mode():
        assert torch.equal(twin._wqkv(x), attention._wqkv(x))
        for name in ("wq", "wk", "wv"):  # each copied module's output is its part of the fused one
            assert torch.equal(getattr(twin, name)(x), getattr(attention, name)(x))
    setattr(twin, "wk", torch.nn.Linear(64, 32, bias=False))  # the copy's own modules are watched
    assert not still_fused(twin._wqkv) and still_fused(attention._wqkv)


def test_biased_or_lora_linears_are_not_fused():
    assert fuse_linears(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4, bias=False)) is None
    assert fuse_linears(LoraLinear(4, 4, bias=False, lora_rank=2), torch.nn.Linear(4, 4, bias=False)) is None


def test_the_decode_step_structs_match_their_ctypes_mirrors():
    """kernels/decode.py fills decode_ops.c's step structs through ctypes mirrors; a field added
    on one side only would shift every field after it (decode_kernels() then refuses to run)."""
    from accessory.kernels import load_library
    from accessory.kernels.decode import layout_of_mirrors, native_layout
    library = load_library("decode_ops")
    if library is None:
        pytest.skip("native kernels cannot be built on this machine")
    assert native_layout(library) == layout_of_mirrors()


@needs_kernel
@pytest.mark.parametrize("name", ["gemv_bf16", "gemv_bf16_avx512"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 9, 16, 17, 40, 70])
@pytest.mark.parametrize("out_features,in_features", [(37, 100), (130, 33), (21, 31), (64, 768), (9, 2085)])
def test_each_bf16_library_against_float64(name, rows, out_features, in_features):
    """Both entry points of each library (bf16 activations -> bf16 or float32 sums; float32
    activations -> float32 sums), rows of every tile form and inputs with tails past the last whole
    vector (2085: rows the AVX512 library takes in chunks, up to 64 activation rows, with a tail in
    the last chunk), against the float64 product. bf16 activations multiply exactly, so the only errors are
    float32 accumulation (and one rounding to bf16). Float32 activations: the AVX512 library rounds
    them to bf16, as torch's bf16 product does; the AVX2 one keeps them in float32."""
    import ctypes

    from accessory.kernels import cpu_supports_avx512_bf16, load_library
    if name == "gemv_bf16_avx512" and not cpu_supports_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    library = load_library(name)
    assert library is not None
    entry, entry_f32, scratch_of = (library.accessory_gemv_bf16, library.accessory_gemv_bf16_f32,
                                    library.accessory_gemv_bf16_scratch_floats)
    entry.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    entry_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    scratch_of.argtypes, scratch_of.restype = [ctypes.c_int64] * 2, ctypes.c_int64
    gen = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    x32 = torch.randn(rows, in_features, generator=gen)
    x = x32.bfloat16()
    w = torch.randn(out_features, in_features, generator=gen).bfloat16()
    scratch = torch.empty(scratch_of(rows, in_features) + 16)

    def check(got, activations, rounded_once):
        exact = activations.double() @ w.double().T
        bound = activations.double().abs() @ w.double().abs().T * in_features * 2 ** -23
        if rounded_once:
            bound = bound + exact.abs() * 2 ** -8
        assert ((got.double() - exact).abs() <= bound + 1e-30).all(), (got.double() - exact).abs().max()

    y = torch.empty(rows, out_features, dtype=torch.bfloat16)
    entry(w.data_ptr(), x.data_ptr(), scratch.data_ptr(), y.data_ptr(), None, rows, out_features, in_features)
    check(y, x, rounded_once=True)
    y32 = torch.empty(rows, out_features)
    entry(w.data_ptr(), x.data_ptr(), scratch.data_ptr(), None, y32.data_ptr(), rows, out_features, in_features)
    check(y32, x, rounded_once=False)
    entry_f32(w.data_ptr(), x32.data_ptr(), scratch.data_ptr(), y32.data_ptr(), rows, out_features, in_features)
    rounds_activations = name == "gemv_bf16_avx512"
    check(y32, x if rounds_activations else x32, rounded_once=False)


KERNEL_CHOICES = [("bf16_kernel_name", "bf16_library", "ACCESSORY_BF16_KERNEL", "cpu_supports_avx512_bf16", "gemv_bf16"),
                  ("quant_kernel_name", "quant_library", "ACCESSORY_QUANT_KERNEL", "cpu_supports_avx512_vnni",
                   "gemv_quant")]


@pytest.mark.parametrize("name_of,_,variable,supports,base", KERNEL_CHOICES, ids=["bf16", "quant"])
def test_kernel_choice_follows_the_cpu_and_the_environment(monkeypatch, name_of, _, variable, supports, base):
    from accessory import kernels
    kernel_name = getattr(kernels, name_of)
    monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(kernels, supports, lambda: True)
    assert kernel_name() == base + "_avx512"
    monkeypatch.setenv(variable, "avx2")
    assert kernel_name() == base
    monkeypatch.setenv(variable, "avx512")
    assert kernel_name() == base + "_avx512"
    monkeypatch.setattr(kernels, supports, lambda: False)
    monkeypatch.setenv(variable, "auto")
    assert kernel_name() == base
    monkeypatch.setenv(variable, "amx")
    with pytest.raises(ValueError, match=f"{variable}='amx': use auto, avx2 or avx512"):
        kernel_name()


@pytest.mark.parametrize("name_of,library_of,_,__,base", KERNEL_CHOICES, ids=["bf16", "quant"])
def test_a_library_that_cannot_be_built_falls_back_to_the_avx2_one(monkeypatch, name_of, library_of, _, __, base):
    from accessory import kernels
    monkeypatch.setattr(kernels, name_of, lambda: base + "_avx512")
    monkeypatch.setattr(kernels, "_libraries", {base + "_avx512": None})
    name, library = getattr(kernels, library_of)()
    assert name == base and library is kernels.load_library(base)
    if native_linear_available():
        assert library is not None


def test_how_many_rows_the_kernel_takes_follows_the_cpu(monkeypatch):
    """AVX2 only: up to 256 rows (torch's bf16 product is slow there); AVX512-BF16 without AMX: up to
    64 (the dot-product kernel beats oneDNN that far); AMX, or the AVX2 kernel on a CPU with native
    bf16: 16."""
    from accessory.kernels import linear as kernel_linear
    monkeypatch.setattr(kernel_linear, "_kernel", lambda: object())
    for native, name, flags, expected in [
            (False, "gemv_bf16", {"avx2"}, kernel_linear.MAX_ROWS_WITHOUT_NATIVE_BF16),
            (True, "gemv_bf16_avx512", {"avx512_bf16"}, kernel_linear.MAX_ROWS_AVX512_BF16),
            (True, "gemv_bf16_avx512", {"avx512_bf16", "amx_bf16"}, MAX_ROWS),
            (True, "gemv_bf16", {"avx512_bf16"}, MAX_ROWS)]:
        monkeypatch.setattr(kernel_linear, "cpu_has_native_bf16", lambda: native)
        monkeypatch.setattr(kernel_linear, "_kernel_name", name)
        monkeypatch.setattr(kernel_linear, "cpu_flags", lambda: frozenset(flags))
        assert kernel_linear.max_kernel_rows() == expected, (native, name, flags)
    monkeypatch.setattr(kernel_linear, "_kernel", lambda: None)
    assert kernel_linear.max_kernel_rows() == 0
