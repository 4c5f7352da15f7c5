"""Linear layers whose weights are held in 16-row panels (model/layers/panel_linear.py).

The module must stay, to everything outside it, the linear it was: the same outputs (up to the
bf16 rounding of the sums), the same state_dict names and bytes, a ``weight`` that can be read,
edited, assigned and cast, checkpoints that load into it. Most tests convert modules with
``to_panels`` directly, which works on any CPU (torch computes the panel layout where the
library cannot run); the model-level ones need ``panels_wanted()`` (AVX512-BF16, no AMX).
"""

import copy
import io

import pytest
import torch
from torch import nn

from accessory.kernels.linear import NativeLinear
from accessory.model.layers.linear import fuse_linears, still_fused
from accessory.model.layers.panel_linear import (FusedPanelLinear, PanelLinear, panels_wanted, to_panels, to_row_major,
                                                 use_panels)


def linear(in_features=40, out_features=37, bias=False, cls=nn.Linear, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    module = cls(in_features, out_features, bias=bias).bfloat16()
    if bias:
        with torch.no_grad():
            module.bias.uniform_(-1, 1)
    return module


def reference(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """x @ W.T (+ bias) in float64 of the bf16-rounded inputs."""
    y = x.bfloat16().double() @ weight.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("cls", [nn.Linear, NativeLinear])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 16, 70])
def test_a_module_in_panels_computes_what_it_did(cls, bias, rows):
    module = linear(bias=bias, cls=cls)
    weight = module.weight.detach().clone()
    x = torch.randn(2, rows, 40)
    before = module(x.bfloat16())
    assert to_panels(module) and type(module) is PanelLinear and "weight" not in module._parameters
    for dtype in (torch.bfloat16, torch.float32):
        with torch.inference_mode():
            got = module(x.to(dtype))
        assert got.dtype is dtype and got.shape == (2, rows, 37)
        expected = reference(x, weight, module.bias)
        # float32 sums rounded once (to bf16 for bf16 inputs)
        tolerance = 1e-5 if dtype is torch.float32 else 2 ** -7
        torch.testing.assert_close(got.double(), expected, atol=tolerance * expected.abs().max().item(), rtol=0)
    torch.testing.assert_close(module(x.bfloat16()), before, atol=2 ** -6 * before.abs().max().item(), rtol=0)


def test_state_dict_holds_the_row_major_weight_bit_for_bit():
    module = linear(bias=True)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    to_panels(module)
    after = module.state_dict()
    assert list(after) == ["weight", "bias"]
    assert all(torch.equal(after[k], v) for k, v in before.items())
    outer = nn.Sequential(module)
    assert list(outer.state_dict()) == ["0.weight", "0.bias"]
    assert list(dict(outer.named_parameters())) == ["0.bias", "0.panels"]


def test_load_state_dict_packs_the_weight_in_place():
    module, other = linear(bias=True), linear(bias=True, seed=1)
    to_panels(module)
    panels = module.panels
    result = module.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert module.panels is panels  # written in place (a fused product's view sees it)
    assert torch.equal(module.state_dict()["weight"], other.weight) and torch.equal(module.bias, other.bias)
    x = torch.randn(3, 40).bfloat16()
    with torch.inference_mode():
        torch.testing.assert_close(module(x), other(x), atol=0.02, rtol=0)


def test_load_state_dict_errors_name_the_weight():
    module = linear()
    to_panels(module)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: copying a param with shape \(36, 40\)"):
        module.load_state_dict({"weight": torch.zeros(36, 40)})
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"weight\"") as error:
        module.load_state_dict({})
    assert "panels" not in str(error.value)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"extra\""):
        module.load_state_dict({"weight": torch.zeros(37, 40), "extra": torch.zeros(1)})
    assert module.load_state_dict({}, strict=False).missing_keys == ["weight"]  # as nn.Linear reports it


def test_reading_the_weight_puts_the_module_back_in_rows():
    module = linear(cls=NativeLinear)
    weight = module.weight.detach().clone()
    to_panels(module)
    got = module.weight
    assert type(module) is NativeLinear and isinstance(got, nn.Parameter) and torch.equal(got, weight)
    assert "panels" not in module._parameters and "_row_major_class" not in module.__dict__
    with torch.no_grad():
        got.mul_(2)  # an in-place edit is what the module computes with
    x = torch.randn(2, 40).bfloat16()
    torch.testing.assert_close(module(x), nn.functional.linear(x, weight * 2))


def test_assigning_or_deleting_the_weight_works_as_on_a_linear():
    module = linear()
    to_panels(module)
    new = nn.Parameter(torch.ones(37, 40, dtype=torch.bfloat16))
    module.weight = new
    assert type(module) is nn.Linear and module.weight is new
    to_panels(module)
    del module.weight
    assert type(module) is nn.Linear and "weight" not in module._parameters


@pytest.mark.parametrize("cast", ["float", "to_float64", "half", "to_meta"])
def test_a_cast_away_from_bf16_or_the_cpu_puts_it_back_in_rows(cast):
    module = linear(bias=True)
    weight = module.weight.detach().clone()
    to_panels(module)
    if cast == "float":
        module.float()
        assert module.weight.dtype is torch.float32 and torch.equal(module.weight, weight.float())
    elif cast == "to_float64":
        module.to(torch.float64)
        assert module.weight.dtype is torch.float64
    elif cast == "half":
        module.half()
        assert module.weight.dtype is torch.float16
    else:
        module.to("meta")
        assert module.weight.is_meta
    assert type(module) is nn.Linear


def test_a_cast_that_keeps_bf16_on_the_cpu_keeps_the_panels():
    module = linear()
    to_panels(module)
    panels = module.panels
    module.to("cpu").bfloat16()
    module.to(torch.bfloat16)
    assert type(module) is PanelLinear and module.panels.data_ptr() == panels.data_ptr()


def test_a_module_in_panels_copies_and_pickles():
    module = linear(bias=True)
    to_panels(module)
    x = torch.randn(4, 40).bfloat16()
    with torch.inference_mode():
        expected = module(x)
    twin = copy.deepcopy(module)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        assert type(other) is PanelLinear
        with torch.inference_mode():
            assert torch.equal(other(x), expected)
        assert type(to_row_major(other)) is nn.Linear


def test_training_through_it_puts_it_back_in_rows():
    module = linear()
    to_panels(module)
    x = torch.randn(3, 40, dtype=torch.bfloat16, requires_grad=True)
    module(x).float().sum().backward()
    assert type(module) is nn.Linear and module.weight.grad is not None and x.grad is not None


def test_it_cannot_be_built_directly():
    with pytest.raises(TypeError, match="to_panels"):
        PanelLinear(4, 4)


def test_only_bf16_cpu_plain_linears_are_converted():
    assert not to_panels(linear().float())
    assert not to_panels(nn.Conv1d(2, 2, 1).bfloat16())
    meta = nn.Linear(4, 4, device="meta", dtype=torch.bfloat16)
    assert not to_panels(meta)


def test_fused_panels_are_one_run_and_give_each_modules_output():
    torch.manual_seed(0)
    wq, wk, wv = (nn.Linear(48, n, bias=False).bfloat16() for n in (32, 16, 16))
    x = torch.randn(5, 48).bfloat16()
    with torch.inference_mode():
        expected = torch.cat([m(x) for m in (wq, wk, wv)], dim=-1)
        for m in (wq, wk, wv):
            to_panels(m)
        separate = torch.cat([m(x) for m in (wq, wk, wv)], dim=-1)
        fused = fuse_linears(wq, wk, wv)
        assert isinstance(fused, FusedPanelLinear) and fused.sizes == [32, 16, 16] and still_fused(fused)
        assert wk.panels.data_ptr() == fused.panels.data_ptr() + 32 * 48 * 2
        assert torch.equal(fused(x), separate)  # the same kernel over the same panels
        torch.testing.assert_close(separate, expected, atol=2 ** -6 * expected.abs().max().item(), rtol=0)
        # a checkpoint loaded into one module reaches the fused product (its panels are a view)
        other = nn.Linear(48, 16, bias=False).bfloat16()
        wk.load_state_dict(other.state_dict())
        assert still_fused(fused)
        torch.testing.assert_close(fused(x)[:, 32:48], other(x), atol=2 ** -6 * other(x).abs().max().item(), rtol=0)
        wv.weight  # noqa: B018 (a read puts wv back in rows: the fused run no longer backs it)
        assert not still_fused(fused)


def test_use_panels_packs_the_children_a_module_fuses_into_one_run(monkeypatch):
    """q/k/v packed straight into one run before fusing, so fusing copies nothing: the fused
    product is a view of the same memory the modules' panels are."""
    if not panels_wanted():
        pytest.skip("weights go into panels only on CPUs with AVX512-BF16 (and no AMX)")
    from accessory.model.LLM.llama import Attention, ModelArgs
    torch.manual_seed(0)
    attention = Attention(ModelArgs(dim=64, n_heads=4, n_kv_heads=2)).bfloat16()
    weights = {name: getattr(attention, name).weight.detach().clone() for name in ("wq", "wk", "wv", "wo")}
    assert use_panels(attention) == 4
    wq, wk, wv = attention.wq.panels, attention.wk.panels, attention.wv.panels
    assert wq.untyped_storage().data_ptr() == wk.untyped_storage().data_ptr() == wv.untyped_storage().data_ptr()
    assert wk.data_ptr() == wq.data_ptr() + wq.numel() * 2 and wv.data_ptr() == wk.data_ptr() + wk.numel() * 2
    attention.fuse()
    fused = attention._wqkv
    assert isinstance(fused, FusedPanelLinear) and still_fused(fused)
    assert fused.panels.data_ptr() == wq.data_ptr() and attention.wq.panels.data_ptr() == wq.data_ptr()
    assert fused.panels.numel() == wq.numel() + wk.numel() + wv.numel()
    for name, weight in weights.items():
        assert torch.equal(getattr(attention, name).state_dict()["weight"], weight)
    x = torch.randn(3, 64).bfloat16()
    with torch.inference_mode():
        expected = torch.cat([x @ weights[n].T for n in ("wq", "wk", "wv")], dim=-1)
        torch.testing.assert_close(fused(x), expected, atol=2 ** -6 * expected.abs().max().item(), rtol=0)


def test_panels_whose_row_counts_are_not_whole_panels_are_not_fused():
    modules = [linear(48, n, seed=n) for n in (24, 24)]
    for m in modules:
        to_panels(m)
    assert fuse_linears(*modules) is None
    last_partial = [linear(48, n, seed=n) for n in (32, 24)]  # only the last may end mid-panel
    for m in last_partial:
        to_panels(m)
    assert isinstance(fuse_linears(*last_partial), FusedPanelLinear)


def test_use_panels_leaves_tied_weights_and_honours_the_setting(monkeypatch):
    if not panels_wanted():
        pytest.skip("weights go into panels only on CPUs with AVX512-BF16 (and no AMX)")
    model = nn.Sequential(nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False), nn.Linear(32, 16)).bfloat16()
    model[1].weight = model[0].weight  # tied
    assert use_panels(model) == 1 and type(model[2]) is PanelLinear and type(model[0]) is nn.Linear
    monkeypatch.setenv("ACCESSORY_PANELS", "0")
    assert not panels_wanted() and use_panels(nn.Sequential(nn.Linear(32, 32).bfloat16())) == 0


def load_in_panels_and_in_rows(checkpoint, monkeypatch):
    """``checkpoint`` loaded in bf16 on the CPU twice: as it loads here (in panels), and with
    ``ACCESSORY_PANELS=0`` (in rows); skips where weights do not go into panels."""
    if not panels_wanted():
        pytest.skip("weights go into panels only on CPUs with AVX512-BF16 (and no AMX)")
    from accessory.model.meta import MetaModel

    def load():
        return MetaModel.from_pretrained(str(checkpoint), dtype=torch.bfloat16, device="cpu", max_seq_len=64,
                                         progress=False)
    model = load()
    monkeypatch.setenv("ACCESSORY_PANELS", "0")
    return model, load()


def test_a_loaded_model_in_panels_matches_the_same_model_in_rows(tiny_llama_dir, monkeypatch):
    """``from_pretrained`` in bf16 on the CPU: the weights in panels (q/k/v and w1/w3 fused runs),
    the same state_dict bit for bit, the same greedy text as with ``ACCESSORY_PANELS=0``."""
    model, rows = load_in_panels_and_in_rows(tiny_llama_dir, monkeypatch)
    layer = model.llma.layers[0]
    assert type(layer.attention.wq) is PanelLinear and isinstance(layer.attention._wqkv, FusedPanelLinear)
    assert isinstance(layer.feed_forward._w13, FusedPanelLinear) and type(model.llma.output) is PanelLinear
    assert type(rows.llma.layers[0].attention.wq) is NativeLinear
    ours, theirs = model.state_dict(), rows.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    prompts = ["Hello world", "A much longer prompt than that"]
    assert model.generate(prompts, max_gen_len=12, temperature=0) == rows.generate(prompts, max_gen_len=12,
                                                                                   temperature=0)
    # nothing in loading or generating read a weight back into rows
    assert not any(type(m) in (nn.Linear, NativeLinear) for m in model.llma.modules())


def test_a_bf16_model_gives_unrounded_float32_logits_in_either_layout(tiny_llama_dir, monkeypatch):
    """The prompt path's head returns its float32 sums, in panels and in rows (the native kernel's
    sums), as the native decode step does: rounded to bf16, logits near 25 are 0.125 apart and
    greedy decoding settles near ties by token order."""
    model, rows = load_in_panels_and_in_rows(tiny_llama_dir, monkeypatch)
    ids = torch.tensor([model.tokenizer.encode("Hello world, once more", bos=True, eos=False)])
    with torch.inference_mode():
        got, theirs = model.llma.forward_tokens(ids), rows.llma.forward_tokens(ids)
    for logits in (got, theirs):
        assert logits.dtype is torch.float32
        assert (logits != logits.bfloat16().float()).any()  # not rounded to bf16
    torch.testing.assert_close(got, theirs, atol=0.02 * got.abs().max().item(), rtol=0)
