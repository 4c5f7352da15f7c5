"""bf16 weights in 16-row panels (kernels/panels.py, gemv_bf16_panels.c): layout and products."""

import pytest
import torch

from accessory.kernels import panels
from accessory.kernels.panels import pack, panel_elements, panel_linear, panels_available, unpack

needs_panels = pytest.mark.skipif(not panels_available(), reason="no AVX512-BF16 or no C compiler here")

SHAPES = [(16, 64), (37, 33), (130, 2), (1, 1), (48, 2600), (33, 5)]


@needs_panels
@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_pack_then_unpack_gives_the_weight_back_bit_for_bit(out_features, in_features):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(in_features)).bfloat16()
    packed = pack(weight)
    # rows rounded up to 16, inputs to an even count
    assert packed.numel() == -(-out_features // 16) * 16 * 2 * -(-in_features // 2)
    assert torch.equal(unpack(packed, out_features, in_features), weight)
    # pair p of panel 0 is rows 0..15's inputs 2p, 2p+1: row r's input i at (i // 2 * 16 + r) * 2 + i % 2
    r, i = min(out_features, 16) - 1, in_features - 1
    assert packed[(i // 2 * 16 + r) * 2 + i % 2] == weight[r, i]


@needs_panels
# 1-3 rows: interleaved accumulator sets; 4-16 one group; 17, 33: a partial second / third
# group; 300: more than one chunk of 128 rows
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 15, 16, 17, 33, 300])
@pytest.mark.parametrize("out_features,in_features", [(37, 33), (48, 2600), (130, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_match_float64_on_bf16_rounded_inputs(rows, out_features, in_features, dtype):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    x = torch.randn(2, rows, in_features, generator=gen).to(dtype)  # leading dims kept
    expected = x.bfloat16().double() @ weight.double().T
    got = panel_linear(x, pack(weight), out_features)
    assert got.dtype == dtype and got.shape == (2, rows, out_features)
    # float32 sums of exact products; a bf16 result rounds once more
    tolerance = (1e-5 if dtype is torch.float32 else 1e-2) * expected.abs().max().item()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tolerance)


@needs_panels
@pytest.mark.parametrize("rows", [1, 3, 16, 17])
def test_products_write_only_their_rows_and_scratch(rows):
    """Mutation-checked: an unmasked store of the last panel (37 = 2 x 16 + 5 rows) or a scratch
    one row short of the groups fails it."""
    library = panels._kernels()
    out_features, in_features = 37, 33
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    x = torch.randn(rows, in_features, generator=gen)
    packed = pack(weight)
    needed = library.accessory_packed_bf16_scratch_floats(rows, in_features)
    scratch = torch.full((needed + 64,), 12345.0)
    y = torch.full((rows * out_features + 64,), 54321.0)
    library.accessory_packed_bf16_f32(packed.data_ptr(), x.data_ptr(), scratch.data_ptr(), y.data_ptr(), rows,
                                      out_features, in_features)
    assert torch.equal(y[rows * out_features:], torch.full((64,), 54321.0))
    assert torch.equal(scratch[needed:], torch.full((64,), 12345.0))
    expected = x.bfloat16().double() @ weight.double().T
    torch.testing.assert_close(y[:rows * out_features].view(rows, out_features).double(), expected, rtol=0,
                               atol=1e-5 * expected.abs().max().item())


@needs_panels
def test_wrong_inputs_are_refused_with_the_reason():
    weight = torch.randn(20, 8).bfloat16()
    with pytest.raises(ValueError, match="2-D bf16 CPU tensor"):
        pack(weight.float())
    packed = pack(weight)
    with pytest.raises(ValueError, match=f"{panel_elements(20, 8)} contiguous bf16"):
        unpack(packed[:-1], 20, 8)
    with pytest.raises(ValueError, match="contiguous bf16"):
        panel_linear(torch.randn(3, 9), packed, 20)  # 9 inputs: these panels hold 8
    with pytest.raises(ValueError, match="bf16 or float32"):
        panel_linear(torch.randn(3, 8).half(), packed, 20)


@pytest.mark.parametrize("out_features,in_features", [(37, 33), (16, 64), (1, 1)])
def test_without_the_kernels_torch_gives_the_same_layout_and_products(monkeypatch, out_features, in_features):
    """Where the library cannot run, pack / unpack / panel_linear work in torch: the same bytes
    (compared with the library's where it runs here) and the same products."""
    gen = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    x = torch.randn(5, in_features, generator=gen)
    native = pack(weight) if panels_available() else None
    native_product = panel_linear(x, native, out_features) if native is not None else None
    monkeypatch.setattr(panels, "_kernels", lambda: None)
    packed = pack(weight)
    assert packed.numel() == panel_elements(out_features, in_features)
    r, i = min(out_features, 16) - 1, in_features - 1
    assert packed[(i // 2 * 16 + r) * 2 + i % 2] == weight[r, i]
    assert torch.equal(unpack(packed, out_features, in_features), weight)
    got = panel_linear(x, packed, out_features)
    expected = x.bfloat16().double() @ weight.double().T
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    if native is not None:
        assert torch.equal(packed, native)
        torch.testing.assert_close(got, native_product, rtol=0, atol=1e-5 * expected.abs().max().item())


# Edge shapes of the vector paths (blocks of 16 pairs = 32 inputs): odd inputs, inputs not a
# multiple of 32 (one short block, a full one and a short one, a full one exactly), rows not a
# multiple of 16, one row, one input.
EDGE_SHAPES = [(1, 1), (130, 2), (37, 33), (5, 1), (1, 3), (16, 32), (17, 31), (15, 34), (31, 63), (33, 64),
               (3, 95), (48, 97), (100, 130), (18, 4097)]


def _reference_panels(weight: torch.Tensor) -> torch.Tensor:
    """The panel layout in torch, written out independently of panels.py: pair_slot(i, r, 16)."""
    out_features, in_features = weight.shape
    rows, pairs = -(-out_features // 16) * 16, -(-in_features // 2)
    padded = torch.zeros(rows, 2 * pairs, dtype=weight.dtype)
    padded[:out_features, :in_features] = weight
    return padded.view(rows // 16, 16, pairs, 2).transpose(1, 2).reshape(-1)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype is torch.bfloat16 else t.view(torch.int32)


@needs_panels
@pytest.mark.parametrize("out_features,in_features", EDGE_SHAPES)
def test_pack_and_unpack_match_the_torch_layout_bit_for_bit(out_features, in_features):
    """Mutation-checked: a wrong lane order in the 16 x 16 transpose, or the last block's mask one
    input short, fails it."""
    gen = torch.Generator().manual_seed(out_features * 7919 + in_features)
    bits = torch.randint(-2 ** 15, 2 ** 15, (out_features, in_features), generator=gen, dtype=torch.int16)
    weight = bits.view(torch.bfloat16)  # any bits: NaN / inf / denormal patterns are moved, not read
    packed = pack(weight)
    assert torch.equal(_bits(packed), _bits(_reference_panels(weight)))
    assert torch.equal(_bits(unpack(packed, out_features, in_features)), bits)
    # panels with garbage in the padding: unpack reads only the real elements
    garbage = torch.randint(-2 ** 15, 2 ** 15, (packed.numel(),), generator=gen, dtype=torch.int16)
    rows, pairs = -(-out_features // 16) * 16, -(-in_features // 2)
    expected = garbage.view(rows // 16, pairs, 16, 2).transpose(1, 2).reshape(rows, 2 * pairs)
    got = unpack(garbage.view(torch.bfloat16), out_features, in_features)
    assert torch.equal(_bits(got), expected[:out_features, :in_features])


@needs_panels
def test_unpack_writes_only_the_weight():
    library = panels._kernels()
    for out_features, in_features in EDGE_SHAPES:
        packed = pack(torch.randn(out_features, in_features).bfloat16())
        out = torch.full((out_features * in_features + 64,), -7, dtype=torch.int16)
        library.accessory_unpack_bf16(packed.data_ptr(), out.data_ptr(), out_features, in_features)
        assert torch.equal(out[out_features * in_features:], torch.full((64,), -7, dtype=torch.int16))


def _float_to_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """common.h's float_to_bf16 in torch integer arithmetic: round to nearest even, a NaN kept
    quiet with its sign and upper payload (torch's own .bfloat16() makes every NaN 0xffff here)."""
    u = x.view(torch.int32).to(torch.int64) & 0xffffffff
    rounded = (u + 0x7fff + ((u >> 16) & 1)) >> 16
    quiet_nan = (u >> 16) | 0x40
    return torch.where((u & 0x7fffffff) > 0x7f800000, quiet_nan, rounded & 0xffff)


def _special_floats(shape, gen) -> torch.Tensor:
    """Normal values, with NaNs (payloads, both signs, signalling), infs, denormals, float32 max
    (rounds to inf), zeros of both signs, and exact ties (low half 0x8000, even and odd)."""
    x = torch.randn(shape, generator=gen)
    bits = x.view(torch.int32)
    raw = torch.randint(-2 ** 31, 2 ** 31, shape, generator=gen, dtype=torch.int64).to(torch.int32)
    kind = torch.randint(0, 8, shape, generator=gen)
    specials = torch.tensor([0x7f800000, 0xff800000, 0x7f800001, 0xffc00000, 0x7fbfffff, 0x7fc12345, 0x7f7fffff,
                             0x00008000, 0x80000000, 0x00000001, 0x807fffff, 0x3f808000, 0x3f818000],
                            dtype=torch.int64).to(torch.int32)
    bits[kind == 0] = specials[torch.randint(0, len(specials), ((kind == 0).sum().item(),), generator=gen)]
    bits[kind == 1] = raw[kind == 1] & 0x807fffff  # denormals
    bits[kind == 2] = (raw[kind == 2] & ~0xffff) | 0x8000  # ties
    bits[kind == 3] = raw[kind == 3]  # any bits
    return x


def _reference_groups(x_bits: torch.Tensor) -> torch.Tensor:
    """The activation groups of 16 rows (the last one shorter) as grouped_product lays them out:
    group q at q * 16 * pairs, pair p of a group of n rows = n x 2 bf16, an odd input count padded."""
    rows, in_features = x_bits.shape
    pairs = -(-in_features // 2)
    padded = torch.zeros(rows, 2 * pairs, dtype=x_bits.dtype)
    padded[:, :in_features] = x_bits
    return torch.cat([padded[q:q + 16].view(-1, pairs, 2).transpose(0, 1).reshape(-1) for q in range(0, rows, 16)])


@needs_panels
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 15, 16, 17, 33])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (130, 2), (37, 33), (16, 64), (3, 95), (20, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_groups_are_the_bf16_rounded_rows_bit_for_bit(rows, out_features, in_features, dtype):
    """The groups the products leave in scratch against a torch reference, float32 rows rounded as
    float_to_bf16 does (NaN, inf, denormals, ties); then the products of finite rows against float64.
    Mutation-checked: the rounding without its odd bit (ties away), a NaN not made quiet, a wrong
    lane order of the transpose, or the stores of groups under 16 rows unmasked each fail it."""
    library = panels._kernels()
    gen = torch.Generator().manual_seed(rows * 131 + in_features)
    x = _special_floats((rows, in_features), gen)
    expected_bits = _float_to_bf16_bits(x)
    finite = torch.isfinite(x)
    assert torch.equal(expected_bits[finite], x[finite].bfloat16().view(torch.int16).to(torch.int64) & 0xffff)
    if dtype is torch.bfloat16:
        # the same bits as bf16 input (not through torch's conversion, which rewrites NaNs)
        x = ((expected_bits + 2 ** 15) % 2 ** 16 - 2 ** 15).to(torch.int16).view(torch.bfloat16)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    packed = pack(weight)
    needed = library.accessory_packed_bf16_scratch_floats(rows, in_features)
    scratch = torch.full((needed + 64,), 12345.0)
    y = torch.empty(rows * out_features)
    function = library.accessory_packed_bf16_f32 if dtype is torch.float32 else library.accessory_packed_bf16
    function(packed.data_ptr(), x.data_ptr(), scratch.data_ptr(), y.data_ptr(), rows, out_features, in_features)
    groups = scratch[:needed].view(torch.int16).to(torch.int64) & 0xffff
    assert torch.equal(groups, _reference_groups(expected_bits))
    assert torch.equal(scratch[needed:], torch.full((64,), 12345.0))
    # without NaN, inf and huge values (they make whole sums NaN or inf, or overflow float32)
    x_finite = torch.where(torch.isfinite(x) & (x.abs() < 1e30), x, torch.zeros((), dtype=x.dtype))
    expected = x_finite.bfloat16().double() @ weight.double().T
    got = panel_linear(x_finite, packed, out_features)
    tolerance = (1e-5 if dtype is torch.float32 else 1e-2) * max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tolerance)


@needs_panels
@pytest.mark.parametrize("out_features,in_features", [(2049, 2048), (4100, 1025)])
def test_large_weights_pack_and_unpack_bit_for_bit(out_features, in_features):
    """Outputs of 8 MiB and more go out with streaming stores (unpack: where the rows are whole
    blocks of 32 inputs); a partial last panel and an odd input count take the plain stores."""
    gen = torch.Generator().manual_seed(out_features)
    bits = torch.randint(-2 ** 15, 2 ** 15, (out_features, in_features), generator=gen, dtype=torch.int16)
    weight = bits.view(torch.bfloat16)
    packed = pack(weight)
    assert torch.equal(_bits(packed), _bits(_reference_panels(weight)))
    assert torch.equal(_bits(unpack(packed, out_features, in_features)), bits)


@pytest.mark.parametrize("library", [True, False])
def test_pack_into_a_slice_of_a_run_writes_only_that_slice(monkeypatch, library):
    if not library:
        monkeypatch.setattr(panels, "_kernels", lambda: None)
    torch.manual_seed(3)
    weight = torch.randn(37, 33).bfloat16()
    size = panel_elements(37, 33)
    run = torch.full((size + 20,), 7.0, dtype=torch.bfloat16)
    got = pack(weight, out=run[10:10 + size])
    assert got.data_ptr() == run[10:].data_ptr() and torch.equal(run[10:10 + size], pack(weight))
    assert (run[:10] == 7).all() and (run[10 + size:] == 7).all()
    with pytest.raises(ValueError, match=f"are {size} contiguous bf16"):
        pack(weight, out=run[:size - 1])
