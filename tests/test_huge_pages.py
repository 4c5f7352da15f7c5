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
    small = zeros_in_huge_pages(1000, torch.float32)
    assert small.shape == (1000,) and not small.any() and "hg" not in vm_flags(small.data_ptr())
    monkeypatch.setenv("ACCESSORY_HUGE_PAGES", "0")
    assert not huge_pages_available()
    large = zeros_in_huge_pages(HUGE_PAGE, torch.bfloat16)
    assert large.shape == (HUGE_PAGE,) and not large.any() and "hg" not in vm_flags(large.data_ptr())


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
