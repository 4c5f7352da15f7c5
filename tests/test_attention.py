"""Causal attention over the position-addressed KV cache (model/layers/attention.py): the mask for
each kind of step, and the fused causal kernel for prefills from position 0."""

import torch

import accessory.model.layers.attention as attention
from accessory.model.layers.attention import CAUSAL, attend, visibility_mask


def _reference(q, k, v, positions):
    """float64 softmax attention, key j visible to a query at position p when j <= p; query
    head h reads kv head h // (heads / kv_heads)."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    visible = torch.arange(k.shape[2])[None, None, None, :] <= positions[:, None, :, None]
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


def test_each_step_gets_its_mask():
    rows = torch.arange(6).expand(2, 6)
    assert visibility_mask(rows, 6) is CAUSAL  # a prefill from 0, every row
    assert isinstance(visibility_mask(rows + 3, 9), torch.Tensor)  # a prefill after reused positions
    assert isinstance(visibility_mask(torch.arange(6)[None], 8), torch.Tensor)  # more keys than queries
    assert isinstance(visibility_mask(torch.tensor([[0, 1, 2], [3, 4, 5]]), 6), torch.Tensor)  # rows apart
    assert visibility_mask(torch.tensor([[4], [4]]), 5) is None  # decode steps at the last position
    assert isinstance(visibility_mask(torch.tensor([[4], [2]]), 5), torch.Tensor)


def test_a_prefill_from_zero_matches_the_reference():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 16, generator=gen)
    k, v = torch.randn(2, 2, 7, 16, generator=gen), torch.randn(2, 2, 7, 16, generator=gen)
    positions = torch.arange(7).expand(2, 7)
    torch.testing.assert_close(attend(q, k, v, positions), _reference(q, k, v, positions).float(),
                               atol=1e-5, rtol=1e-5)
    # a bf16 cache, read in float32 on the CPU
    got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), positions)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), positions).float(),
                               atol=2e-2, rtol=2e-2)
    # the same queries after 3 reused positions take the mask, and agree
    shifted = positions + 3
    k10, v10 = torch.randn(2, 2, 10, 16, generator=gen), torch.randn(2, 2, 10, 16, generator=gen)
    torch.testing.assert_close(attend(q, k10, v10, shifted), _reference(q, k10, v10, shifted).float(),
                               atol=1e-5, rtol=1e-5)


def test_generate_prefills_with_the_causal_kernel(tiny_llama_model, monkeypatch):
    calls = []
    real = attention.F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((q.shape[2], is_causal, attn_mask is None))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    tiny_llama_model.generate(["The quick brown fox", "Hi"], max_gen_len=3, temperature=0.0)
    prefill = [c for c in calls if c[0] > 1]
    assert prefill and all(causal and no_mask for _, causal, no_mask in prefill)
