"""Weights in panels and the KV cache in 2 MiB pages (quant/memory.py ``zeros_in_huge_pages``).

Whether the kernel actually backs a region with huge pages depends on free contiguous memory, so
the tests check what the code controls: the tensor is zeros, 2 MiB-aligned, and lies in a
mapping advised ``MADV_HUGEPAGE`` (``hg`` among its VmFlags in /proc/self/smaps).
"""

import gc

import pytest
import torch
from torch import nn

from accessory.model.layers.kv_cache import KVCache
from accessory.quant.memory import HUGE_PAGE, huge_pages_available, zeros_in_huge_pages


def vm_flags(address: int) -> set:
    """The VmFlags of this process's mapping that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(v, 16) for v in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


needs_huge_pages = pytest.mark.skipif(not huge_pages_available(),
                                      reason="transparent huge pages are off here (or not Linux)")


@needs_huge_pages
def test_zeros_in_huge_pages_are_zeros_in_an_advised_aligned_mapping():
    tensor = zeros_in_huge_pages(3 * HUGE_PAGE // 2 + 7, torch.bfloat16)  # 3 MiB and a bit
    assert tensor.dtype is torch.bfloat16 and tensor.shape == (3 * HUGE_PAGE // 2 + 7,)
    assert tensor.data_ptr() % HUGE_PAGE == 0 and "hg" in vm_flags(tensor.data_ptr())
    assert not tensor.any()


@needs_huge_pages
def test_the_tensor_keeps_its_mapping_alive():
    tensor = zeros_in_huge_pages(HUGE_PAGE, torch.float32)[5:]  # a view; the function's locals are gone
    gc.collect()
    tensor.fill_(2.5)
    assert float(tensor.sum()) == 2.5 * tensor.numel()


def test_small_tensors_and_the_setting_give_ordinary_zeros(monkeypatch):
    """``torch.zeros``: no mapping of its own (where the C heap then puts the memory is its affair:
    once, late in a full run, a 4 MiB block from it sat in a range whose flags read ``hg``)."""
    import mmap

    def no_mapping(*args, **kwargs):
        raise AssertionError("zeros_in_huge_pages mapped memory of its own")
    monkeypatch.setattr(mmap, "mmap", no_mapping)
    small = zeros_in_huge_pages(1000, torch.float32)
    assert small.shape == (1000,) and small.dtype is torch.float32 and not small.any()
    monkeypatch.setenv("ACCESSORY_HUGE_PAGES", "0")
    assert not huge_pages_available()
    large = zeros_in_huge_pages(HUGE_PAGE, torch.bfloat16)
    assert large.shape == (HUGE_PAGE,) and large.dtype is torch.bfloat16 and not large.any()


@needs_huge_pages
def test_a_cpu_kv_cache_is_one_advised_allocation_of_separate_layers():
    cache = KVCache(n_layers=3, batch_size=4, max_len=512, n_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                    device=torch.device("cpu"))  # 3 MiB in all
    tensors = cache.keys + cache.values
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    assert all(t.shape == (4, 2, 512, 64) and t.is_contiguous() and not t.any() for t in tensors)
    assert "hg" in vm_flags(cache.keys[0].data_ptr())
    positions = torch.tensor([[3], [0], [9], [511]])
    k, v = torch.randn(4, 2, 1, 64), torch.randn(4, 2, 1, 64)
    cache.update(1, positions, k, v)
    assert torch.equal(cache.keys[1][2, :, 9], k[2, :, 0].bfloat16())
    assert torch.equal(cache.values[1][3, :, 511], v[3, :, 0].bfloat16())
    # the write reached layer 1's keys and values only
    assert int(cache.keys[1].ne(0).sum()) == int(k.ne(0).sum())
    assert not any(t.any() for t in (cache.keys[0], cache.keys[2], cache.values[0], cache.values[2]))


@needs_huge_pages
def test_use_panels_puts_a_models_panels_in_one_advised_allocation():
    from accessory.model.layers.panel_linear import PanelLinear, panels_wanted, use_panels
    if not panels_wanted():
        pytest.skip("weights go into panels only on CPUs with AVX512-BF16 (and no AMX)")
    from accessory.model.LLM.llama import FeedForward
    torch.manual_seed(0)
    model = nn.Sequential(FeedForward(dim=512, hidden_dim=1024), nn.Linear(512, 1000, bias=False))
    model = model.bfloat16()
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert use_panels(model) == 4
    panels = [m.panels for m in model.modules() if type(m) is PanelLinear]
    assert len({p.untyped_storage().data_ptr() for p in panels}) == 1 and "hg" in vm_flags(panels[0].data_ptr())
    w1, w3 = model[0].w1.panels, model[0].w3.panels  # the fused pair side by side
    assert w3.data_ptr() == w1.data_ptr() + w1.numel() * 2
    state = model.state_dict()
    assert all(torch.equal(state[name], weights[name]) for name in weights)
    x = torch.randn(3, 512).bfloat16()
    with torch.inference_mode():
        expected = x.double() @ weights["1.weight"].double().T
        torch.testing.assert_close(model[1](x).double(), expected, atol=2 ** -6 * expected.abs().max().item(),
                                   rtol=0)


@needs_huge_pages
def test_rows_in_huge_pages_moves_plain_weights_and_fusing_views_them():
    """What ``use_panels`` leaves in rows (CPUs without AVX512-BF16, ``ACCESSORY_PANELS=0``): one
    advised allocation, q/k/v side by side, and fusing them then copies nothing."""
    from accessory.kernels.linear import use_native_linear
    from accessory.model.LLM.llama import Attention, ModelArgs
    from accessory.model.layers.linear import rows_in_huge_pages, still_fused
    torch.manual_seed(0)
    attention = Attention(ModelArgs(dim=1024, n_heads=8, n_kv_heads=4)).bfloat16()  # 6 MiB of weights
    use_native_linear(attention)
    weights = {name: tensor.clone() for name, tensor in attention.state_dict().items()}
    x = torch.randn(3, 1024).bfloat16()
    with torch.inference_mode():
        before = {name: getattr(attention, name)(x) for name in ("wq", "wk", "wv", "wo")}
    assert rows_in_huge_pages(attention) == 4
    wq, wk, wv = (getattr(attention, name).weight for name in ("wq", "wk", "wv"))
    assert "hg" in vm_flags(wq.data_ptr()) and wq.untyped_storage().data_ptr() == attention.wo.weight.untyped_storage().data_ptr()
    assert wk.data_ptr() == wq.data_ptr() + wq.numel() * 2 and wv.data_ptr() == wk.data_ptr() + wk.numel() * 2
    state = attention.state_dict()
    assert all(torch.equal(state[name], weights[name]) for name in weights)
    attention.fuse()
    fused = attention._wqkv
    assert still_fused(fused) and fused.weight.data_ptr() == wq.data_ptr() and fused.weight.shape == (2048, 1024)
    with torch.inference_mode():
        assert torch.equal(torch.cat([before[n] for n in ("wq", "wk", "wv")], dim=-1), fused(x))
        assert torch.equal(attention.wo(x), before["wo"])


def test_rows_in_huge_pages_leaves_tied_weights_and_small_models(monkeypatch):
    from accessory.model.layers.linear import rows_in_huge_pages
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False), nn.Linear(1024, 1024, bias=False)).bfloat16()
    model[1].weight = model[0].weight  # tied: 2 MiB, one parameter of two modules
    assert rows_in_huge_pages(model) == 0 and model[1].weight is model[0].weight
    assert rows_in_huge_pages(nn.Sequential(nn.Linear(64, 64).bfloat16())) == 0  # below one page
    monkeypatch.setenv("ACCESSORY_HUGE_PAGES", "0")
    assert rows_in_huge_pages(nn.Sequential(nn.Linear(2048, 1024).bfloat16())) == 0


def assert_as_in_small_pages(model, load, monkeypatch) -> None:
    """``model`` has the state_dict and greedy text of ``load()`` with ``ACCESSORY_HUGE_PAGES=0``."""
    monkeypatch.setenv("ACCESSORY_HUGE_PAGES", "0")
    small = load()
    ours, theirs = model.state_dict(), small.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    prompts = ["Hello world", "A much longer prompt than that"]
    assert model.generate(prompts, max_gen_len=12, temperature=0) == small.generate(prompts, max_gen_len=12,
                                                                                    temperature=0)


@needs_huge_pages
def test_a_model_loaded_in_rows_holds_its_weights_in_huge_pages(tiny_llama_dir, monkeypatch):
    """``from_pretrained`` where weights stay in rows: in one advised allocation (the page-size
    threshold lowered for the tiny checkpoint), the same state_dict and greedy text as in 4 KiB
    pages."""
    import accessory.quant.memory as memory
    from accessory.model.meta import MetaModel

    def load():
        return MetaModel.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16, device="cpu", max_seq_len=64,
                                         progress=False)
    monkeypatch.setenv("ACCESSORY_PANELS", "0")
    monkeypatch.setattr(memory, "HUGE_PAGE", 4096)
    model = load()
    wq = model.llma.layers[0].attention.wq.weight
    assert "hg" in vm_flags(wq.data_ptr())
    assert model.llma.layers[0].attention._wqkv.weight.data_ptr() == wq.data_ptr()  # fused as a view
    assert_as_in_small_pages(model, load, monkeypatch)


def quantized_attention(scheme_name: str, dim: int = 1536):
    """An attention whose four linears are packed (1536 wide: 7 MiB of int8 codes, 3.5 of int4)."""
    from accessory.model.LLM.llama import Attention, ModelArgs
    from accessory.quant import resolve_scheme
    from accessory.quant.linear import QuantLinear
    torch.manual_seed(0)
    attention = Attention(ModelArgs(dim=dim, n_heads=dim // 128, n_kv_heads=dim // 256)).bfloat16()
    scheme = resolve_scheme(scheme_name, "cpu")
    for name in ("wq", "wk", "wv", "wo"):
        setattr(attention, name, QuantLinear.from_linear(getattr(attention, name), scheme))
    return attention


@needs_huge_pages
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_packed_in_huge_pages_moves_packed_tensors_and_fusing_views_them(scheme):
    """A quantized model's codes (the scales too where they fill a page): one advised allocation per
    dtype, q/k/v side by side, so fusing them copies nothing; the state_dict, what torch.save
    writes of it, and the outputs unchanged."""
    import io
    from accessory.quant.linear import FusedQuantLinear, packed_in_huge_pages
    attention = quantized_attention(scheme)
    state = {name: tensor.clone() for name, tensor in attention.state_dict().items()}
    x = torch.randn(3, 1536).bfloat16()
    with torch.inference_mode():
        before = {name: getattr(attention, name)(x) for name in ("wq", "wk", "wv", "wo")}
    scales = attention.wq.scales
    assert packed_in_huge_pages(attention) == 4  # the four codes; the scales fill no page here
    q, k, v = (getattr(attention, name) for name in ("wq", "wk", "wv"))
    a, b, c = q.qweight, k.qweight, v.qweight
    assert "hg" in vm_flags(a.data_ptr()) and not a.requires_grad
    assert a.untyped_storage().data_ptr() == attention.wo.qweight.untyped_storage().data_ptr()
    assert b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
    assert c.data_ptr() == b.data_ptr() + b.numel() * b.element_size()
    assert q.scales is scales  # (left where it was)
    after = attention.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[n], state[n]) and after[n].dtype == state[n].dtype
                                              for n in state)
    saved = io.BytesIO()
    torch.save(after, saved)  # (one storage seen as two dtypes is refused)
    saved.seek(0)
    assert all(torch.equal(t, state[n]) for n, t in torch.load(saved).items())
    placed = q.qweight.data_ptr()
    attention.fuse()
    fused = attention._wqkv
    assert type(fused) is FusedQuantLinear
    assert fused.packed["qweight"].data_ptr() == placed  # a view, not a copy
    with torch.inference_mode():
        assert torch.equal(torch.cat([before[n] for n in ("wq", "wk", "wv")], dim=-1), fused(x))
        assert torch.equal(attention.wo(x), before["wo"])


def test_packed_in_huge_pages_leaves_small_models_and_the_setting(monkeypatch):
    from accessory.quant.linear import packed_in_huge_pages
    small = quantized_attention("int8", dim=512)  # (1 MiB of codes: below a page)
    before = small.wo.qweight
    assert packed_in_huge_pages(small) == 0 and small.wo.qweight is before
    monkeypatch.setenv("ACCESSORY_HUGE_PAGES", "0")
    attention = quantized_attention("int8")
    before = attention.wq.qweight
    assert packed_in_huge_pages(attention) == 0 and attention.wq.qweight is before


@needs_huge_pages
def test_a_quantized_model_holds_its_packed_weights_in_huge_pages(tiny_llama_dir, monkeypatch):
    """``from_pretrained(quant="int8")``: the packed tensors in one advised allocation (the
    page-size threshold lowered for the tiny checkpoint), q/k/v fused as a view, the same
    state_dict and greedy text as in 4 KiB pages."""
    import accessory.quant.memory as memory
    from accessory.model.meta import MetaModel

    def load():
        return MetaModel.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16, device="cpu", max_seq_len=64,
                                         quant="int8", progress=False)
    monkeypatch.setattr(memory, "HUGE_PAGE", 4096)
    model = load()
    wq = model.llma.layers[0].attention.wq.qweight
    assert "hg" in vm_flags(wq.data_ptr())
    assert model.llma.layers[0].attention._wqkv.packed["qweight"].data_ptr() == wq.data_ptr()
    assert_as_in_small_pages(model, load, monkeypatch)


_PEAK_CHILD = r"""
import json, sys, torch
from accessory.model.meta import MetaModel
def field(name):
    return int(open("/proc/self/status").read().split(name + ":")[1].split()[0]) * 1024
before = field("VmRSS")
model = MetaModel.from_pretrained(sys.argv[1], dtype=torch.bfloat16, max_seq_len=64, progress=False)
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"load": field("VmHWM") - before, "model": size}))
"""


@needs_huge_pages
@pytest.mark.parametrize("panels", ["1", "0"], ids=["panels", "rows"])
def test_an_fp16_checkpoint_read_into_bf16_peaks_near_a_bf16_ones_load(tmp_path, panels):
    """Read into bf16, an fp16 checkpoint's tensors are converted copies (not the file's mapped
    pages), which use_panels / rows_in_huge_pages then copy into their 2 MiB-page allocation. Its
    pages are made resident as the copy writes them, and the loader lets go of the file's pages
    each tensor was read from, so the load's peak (in a fresh process, above its memory before)
    passes that of the same model's bf16 checkpoint (its tensors used in place) by 0.28 of the
    model here, against 0.72 with the allocation made resident up front and 0.98 with the file's
    pages kept (S's shape: 2.05x the model's size with both, 1.15x without)."""
    import json
    import os
    import subprocess
    import sys
    from ckpt_utils import random_llama_state, write_checkpoint
    cfg = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, multiple_of=256, norm_eps=1e-5, rope_theta=10000.0)
    state = random_llama_state(cfg, vocab_size=32000)  # 60M parameters: 115 MiB in bf16
    peaks = {}
    for dtype in (torch.bfloat16, torch.float16):
        directory = write_checkpoint(tmp_path / str(dtype), state, cfg, dtype=dtype)
        out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(directory)], capture_output=True, text=True,
                             env={**os.environ, "ACCESSORY_PANELS": panels}, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        peaks[dtype] = json.loads(out.stdout.strip().splitlines()[-1])
    model = peaks[torch.float16]["model"]
    assert peaks[torch.float16]["load"] - peaks[torch.bfloat16]["load"] < 0.5 * model, peaks
