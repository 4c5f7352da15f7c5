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
