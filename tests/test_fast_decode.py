"""The native CPU decode step (model/layers/fast_decode.py + kernels/decode_ops.c).

Each decode step's logits are compared with the model's own torch path run in float32 on the same
(bf16-rounded) weights: the native step keeps its residual stream in float32, so it must be at
least as close to that reference as the bf16 torch path is. The kernels' attention is checked
against a plain re-statement of the math for both rotary pairings and grouped KV heads.
"""

import copy
import ctypes
import math
from types import SimpleNamespace

import pytest
import torch

import accessory.kernels.quant as kq
from accessory.kernels.decode import decode_kernels
from accessory.model.LLM.llama import PLAIN_BLOCK_TYPES, ModelArgs, Transformer
from accessory.model.layers import fast_decode
from accessory.model.layers.fast_decode import uses_fast_decode
from accessory.model.layers.panel_linear import panels_wanted, use_panels
from accessory.quant import dequantize, resolve_scheme
from accessory.quant import quantize as pack
from accessory.quant.linear import QuantLinear

pytestmark = pytest.mark.skipif(decode_kernels() is None, reason="native kernels cannot be built on this machine")

ARGS = dict(dim=80, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64)


# q (128 rows), k and v (64 each), w1 and w3 (352 each): multiples of 16, so each fused matrix is
# one run of panels when the weights are held in panels
PANEL_ARGS = dict(dim=128, multiple_of=32)


def tiny(dtype=torch.bfloat16, seed=0, layout="rows", **overrides) -> Transformer:
    """A random bf16 model, its weights in rows, or in 16-row panels (``layout="panels"``, as
    ``MetaModel.from_pretrained`` holds them on CPUs with AVX512-BF16)."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**ARGS, **overrides})).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.8, 1.2)
    if layout == "panels":
        if not panels_wanted():
            pytest.skip("weights are held in panels only on CPUs with AVX512-BF16 (and no AMX)")
        assert use_panels(model) == 7 * model.n_layers + 1  # every linear, the head included
    model.fuse_projections()
    return model


def product_kinds(model) -> set:
    """The kinds of the products the native step's plans read."""
    plans = fast_decode._plans(model, PLAIN_BLOCK_TYPES)
    return {p.kind for plan in plans for p in (plan.qkv, plan.wo, plan.w13, plan.w2)} | {fast_decode._ends(model).head.kind}


def quantize(model: Transformer, scheme_name: str) -> Transformer:
    scheme = resolve_scheme(scheme_name, "cpu")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and name != "output":
                setattr(module, name, QuantLinear.from_linear(child, scheme))
    model.fuse_projections()
    return model


def decode_logits(model, prompt_lens=(7, 4, 7), steps=5, fast=True, monkeypatch=None):
    """Prefill rows of different lengths (each padded row writes only its own positions), then
    ``steps`` decode steps; (steps, rows, vocab) float32 logits."""
    monkeypatch.setenv("ACCESSORY_FAST_DECODE", "1" if fast else "0")
    gen = torch.Generator().manual_seed(1)
    rows, longest = len(prompt_lens), max(prompt_lens)
    tokens = torch.randint(0, ARGS["vocab_size"], (rows, longest + steps), generator=gen)
    cache = model.new_kv_cache(rows, 48)
    out = []
    with torch.inference_mode():
        model.forward_tokens(tokens[:, :longest], torch.arange(longest).expand(rows, longest).clone(), cache)
        for step in range(steps):
            positions = torch.tensor([[n + step] for n in prompt_lens])
            out.append(model.forward_tokens(tokens[:, longest + step:longest + step + 1], positions, cache)[:, 0].float())
    return torch.stack(out)


def uses_fast_path(model) -> bool:
    return uses_fast_decode(model)


def count_native_steps(monkeypatch, prefill: bool = False) -> list:
    """A list that grows by one for every native decode step run from now on (one token a row);
    with ``prefill``, by the rows of every native call of a prompt's tokens (``cache_rows`` set)
    instead."""
    kernels = fast_decode.decode_kernels()
    counting = SimpleNamespace(**vars(kernels))
    calls = []

    def counted(step):
        if (step.cache_rows is not None) == prefill:
            calls.append(step.rows if prefill else 1)
        return kernels.decode_step(step)
    counting.decode_step = counted
    monkeypatch.setattr(fast_decode, "decode_kernels", lambda: counting)
    return calls


# AVX2 kernel: 3 rows one weight row at a time; 7 and 14 the batched (outer-product) form over a
# chunk of 8 rows and of 16; 40 over chunks of 16, the last partial. AVX512-BF16 kernel: tiles of
# 4 x 4 from 3 rows (40 rows: 10 tiles). 40 rows run natively where max_step_rows allows them.
@pytest.mark.parametrize("prompt_lens", [(7, 4, 7), (7, 4, 7, 1, 5, 6, 2), (7, 4, 7, 1, 5, 6, 2, 7, 3, 7, 4, 6, 5, 1),
                                         (7, 4, 7, 1, 5, 6, 2, 7, 3, 7, 4, 6, 5, 1) * 2 + (3, 5, 7, 2, 6, 4, 1, 6, 2, 5, 7, 3)])
@pytest.mark.parametrize("layout", ["rows", "panels"])
def test_bf16_step_is_as_close_to_float32_as_the_torch_path(monkeypatch, prompt_lens, layout):
    model = tiny(layout=layout, **(PANEL_ARGS if layout == "panels" else {}))
    reference = decode_logits(copy.deepcopy(model).float(), prompt_lens, fast=False, monkeypatch=monkeypatch)
    torch_bf16 = decode_logits(model, prompt_lens, fast=False, monkeypatch=monkeypatch)
    assert not uses_fast_path(model)
    steps = count_native_steps(monkeypatch)
    native = decode_logits(model, prompt_lens, fast=True, monkeypatch=monkeypatch)
    assert uses_fast_path(model)
    assert product_kinds(model) == {"bf16" if layout == "rows" else "panels"}
    natively = len(prompt_lens) <= fast_decode.max_step_rows(fast_decode._plans(model, PLAIN_BLOCK_TYPES),
                                                             fast_decode._ends(model))
    assert len(steps) == (5 if natively else 0)
    native_error = (native - reference).abs().max().item()
    torch_error = (torch_bf16 - reference).abs().max().item()
    assert native_error <= max(torch_error, 1e-3) * 1.5, (native_error, torch_error)
    assert native_error < 0.05 * reference.abs().max().item()


@pytest.mark.parametrize("layout", ["rows", "panels"])
def test_greedy_tokens_match_the_float32_reference(monkeypatch, layout):
    model = tiny(seed=3, layout=layout, **(PANEL_ARGS if layout == "panels" else {}))
    reference = decode_logits(copy.deepcopy(model).float(), fast=False, monkeypatch=monkeypatch)
    native = decode_logits(model, fast=True, monkeypatch=monkeypatch)
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05  # rows whose best token is not a near tie
    assert clear.sum() > 5
    assert torch.equal(native.argmax(-1)[clear], reference.argmax(-1)[clear])


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_quantized_step_matches_the_torch_path(scheme, monkeypatch):
    model = quantize(tiny(dim=128, multiple_of=64), scheme)
    torch_path = decode_logits(model, fast=False, monkeypatch=monkeypatch)
    native = decode_logits(model, fast=True, monkeypatch=monkeypatch)
    assert uses_fast_path(model)
    # both read the same packed weights; they differ by bf16 rounding of the activations
    torch.testing.assert_close(native, torch_path, atol=0.04 * torch_path.abs().max().item(), rtol=0)


def test_int4_groups_the_kernels_cannot_spread_take_the_torch_path(monkeypatch):
    """int4 with groups of 96 inputs (a multiple of 32, not 32 << k): the step declines, and the
    logits are those of the same model with its weights quantized and expanded back."""
    scheme = resolve_scheme("int4-g96", "cpu")
    plain = tiny(dim=192, multiple_of=96)
    model = quantize(copy.deepcopy(plain), "int4-g96")
    with torch.no_grad():
        for name, child in plain.named_modules():
            if type(child) is torch.nn.Linear and not name.endswith("output"):
                child.weight.copy_(dequantize(pack(child.weight, scheme), scheme))
    got = decode_logits(model, fast=True, monkeypatch=monkeypatch)
    assert not uses_fast_path(model)
    expected = decode_logits(plain, fast=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(got, expected, atol=0.02 * expected.abs().max().item(), rtol=0)


def test_models_it_does_not_handle_take_the_torch_path(monkeypatch):
    fp32 = tiny(torch.float32)  # no float32 weight kernel: torch's own product is used
    decode_logits(fp32, monkeypatch=monkeypatch)
    assert not uses_fast_path(fp32)

    hooked = tiny()
    calls = []
    hooked.layers[1].attention.wo.register_forward_hook(lambda *a: calls.append(1))
    decode_logits(hooked, steps=2, monkeypatch=monkeypatch)
    assert not uses_fast_path(hooked) and len(calls) == 3  # prefill + 2 steps, all through the modules

    unfused = tiny()
    unfused.layers[0].attention._wqkv = None
    decode_logits(unfused, steps=2, monkeypatch=monkeypatch)
    assert not uses_fast_path(unfused)


def test_a_cast_or_a_new_hook_after_the_first_step_is_noticed(monkeypatch):
    model = tiny()
    decode_logits(model, steps=1, monkeypatch=monkeypatch)
    assert uses_fast_path(model)
    calls = []
    model.layers[0].feed_forward.w2.register_forward_hook(lambda *a: calls.append(1))
    decode_logits(model, steps=2, monkeypatch=monkeypatch)
    assert not uses_fast_path(model) and len(calls) == 3

    model = tiny()
    decode_logits(model, steps=1, monkeypatch=monkeypatch)
    model.float()
    got = decode_logits(model, monkeypatch=monkeypatch)
    assert not uses_fast_path(model)
    torch.testing.assert_close(got, decode_logits(model, fast=False, monkeypatch=monkeypatch), atol=0, rtol=0)


def test_panels_that_cannot_be_fused_take_the_torch_path(monkeypatch):
    """k and v of 40 rows each (not whole panels): q/k/v stay three products, the step the
    modules', with the same logits as the same weights in rows give through the torch path."""
    rows = tiny()
    model = tiny(layout="panels")
    assert model.layers[0].attention._wqkv is None and model.layers[0].feed_forward._w13 is not None
    got = decode_logits(model, monkeypatch=monkeypatch)
    assert not uses_fast_path(model)
    expected = decode_logits(rows, fast=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(got, expected, atol=0.01 * expected.abs().max().item(), rtol=0)


def test_a_weight_read_between_steps_puts_it_back_in_rows_and_the_step_follows(monkeypatch):
    """Reading ``wk.weight`` of a model in panels gives the real row-major parameter (its module
    back in rows for good): q/k/v are no longer one product, so the step takes the torch path,
    and an in-place edit of that weight is what the next steps compute with."""
    model = tiny(layout="panels", **PANEL_ARGS)
    twin = copy.deepcopy(model)
    twin.fuse_projections()
    first = decode_logits(model, monkeypatch=monkeypatch)
    assert uses_fast_path(model) and torch.equal(decode_logits(twin, monkeypatch=monkeypatch), first)
    wk = model.layers[0].attention.wk
    weight = wk.weight
    assert type(wk) is torch.nn.Linear and isinstance(weight, torch.nn.Parameter) and weight.shape == (64, 128)
    torch.testing.assert_close(decode_logits(model, monkeypatch=monkeypatch), first, atol=0.01 * first.abs().max().item(),
                               rtol=0)
    assert not uses_fast_path(model)
    with torch.no_grad():
        weight.mul_(0)  # keys all zero in layer 0: its attention averages the values evenly
    edited = decode_logits(model, monkeypatch=monkeypatch)
    assert (edited - first).abs().max() > 0.05 * first.abs().max()
    with torch.no_grad():
        twin.layers[0].attention.wk.weight.mul_(0)
    torch.testing.assert_close(decode_logits(twin, fast=False, monkeypatch=monkeypatch), edited,
                               atol=0.01 * edited.abs().max().item(), rtol=0)


def test_a_model_stays_copyable_and_its_copy_decodes_alike(monkeypatch):
    model = tiny()
    first = decode_logits(model, monkeypatch=monkeypatch)
    twin = copy.deepcopy(model)  # fused over its own copies (FusedViews.__deepcopy__): the native step
    assert torch.equal(decode_logits(twin, monkeypatch=monkeypatch), first)
    assert uses_fast_path(twin)
    with torch.no_grad():  # and it reads the copy's weights, not the original's
        twin.layers[0].feed_forward.w2.weight.mul_(2)
    edited = decode_logits(twin, monkeypatch=monkeypatch)
    assert (edited - first).abs().max() > 0.05 * first.abs().max()
    assert torch.equal(decode_logits(model, monkeypatch=monkeypatch), first)


def rotate_reference(x, cos, sin, interleaved):
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("head_dim,n_heads,n_kv_heads,length",  # each path: 64, 128, other multiples of 8, 20;
                         # a cache head's query heads past the 8 attended together: in chunks of 5 + 4, 6 + 6 + 5
                         [(16, 4, 2, 10), (20, 6, 1, 150), (24, 3, 3, 67), (64, 8, 8, 70), (128, 4, 2, 133),
                          (64, 18, 2, 70), (128, 17, 1, 100)])
@pytest.mark.parametrize("kind", ["f32", "bf16", "bf16-avx512"])
@pytest.mark.parametrize("one_row", [False, True])
def test_attend_step_kernel(interleaved, head_dim, n_heads, n_kv_heads, length, kind, one_row):
    """Against float32 attention; a bf16 cache with head size 64 or 128 on a CPU with AVX512-BF16
    (``bf16-avx512``) scores with the query rounded to bf16, so there against that query.
    ``one_row``: the queries are a prompt's tokens in one cache row (``cache_rows``, as a native
    prefill runs them), each seeing the keys the others wrote at its earlier positions."""
    kernels = decode_kernels()
    cache_dtype = torch.float32 if kind == "f32" else torch.bfloat16
    before = kernels.attention_avx512(-1)
    try:
        if kernels.attention_avx512(int(kind == "bf16-avx512")) != (kind == "bf16-avx512"):
            pytest.skip("this CPU (or compiler) has no AVX512-BF16")
        attend_step_against_reference(kernels, interleaved, head_dim, n_heads, n_kv_heads, length, cache_dtype,
                                      bf16_query=kind == "bf16-avx512" and head_dim in (64, 128), one_row=one_row)
    finally:
        kernels.attention_avx512(before)


def attend_step_against_reference(kernels, interleaved, head_dim, n_heads, n_kv_heads, length, cache_dtype,
                                  bf16_query, one_row=False):
    gen = torch.Generator().manual_seed(head_dim + length)
    rows, max_len = 3, 160
    if one_row:  # the last three tokens of a prompt, all in cache row 1
        positions, cache_rows = torch.tensor([length - 3, length - 2, length - 1]), torch.ones(rows, dtype=torch.long)
    else:
        positions, cache_rows = torch.tensor([length - 1, 0, length // 2]), torch.arange(rows)
    angles = torch.randn(max_len, head_dim // 2, generator=gen)
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    keys = torch.randn(rows + 1, n_kv_heads, max_len, head_dim, generator=gen).to(cache_dtype)
    values = torch.randn(rows + 1, n_kv_heads, max_len, head_dim, generator=gen).to(cache_dtype)
    qkv = torch.randn(rows, (n_heads + 2 * n_kv_heads) * head_dim, generator=gen)
    want_keys, want_values = keys.clone(), values.clone()
    q, k, v = qkv.view(rows, -1, head_dim).split([n_heads, n_kv_heads, n_kv_heads], dim=1)
    c, s = cos[positions][:, None], sin[positions][:, None]
    q, k = rotate_reference(q, c, s, interleaved), rotate_reference(k, c, s, interleaved)
    want = torch.empty(rows, n_heads, head_dim)
    for m in range(rows):  # every key and value written before any query attends
        r, p = int(cache_rows[m]), int(positions[m])
        want_keys[r, :, p], want_values[r, :, p] = k[m], v[m]  # (rounded to the cache's dtype as torch does)
    for m in range(rows):
        r, p = int(cache_rows[m]), int(positions[m])
        for h in range(n_heads):
            g = h // (n_heads // n_kv_heads)
            query = q[m, h].bfloat16().float() if bf16_query else q[m, h]
            scores = want_keys[r, g, :p + 1].float() @ query / math.sqrt(head_dim)
            want[m, h] = scores.softmax(-1) @ want_values[r, g, :p + 1].float()
    out = torch.empty(rows, n_heads * head_dim)
    kernels.attend_step(qkv.data_ptr(), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), int(interleaved),
                        keys.data_ptr(), values.data_ptr(), int(cache_dtype is torch.bfloat16), out.data_ptr(),
                        rows, n_heads, n_kv_heads, head_dim, max_len, 1 / math.sqrt(head_dim),
                        cache_rows.data_ptr() if one_row else None)
    # bf16: the rotated key rounded to nearest, as torch rounds it (up to one step where the two
    # float32 rotations differ in their last bit at a rounding boundary)
    close = dict(atol=0, rtol=2 ** -8) if cache_dtype is torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys, want_keys, **close)
    torch.testing.assert_close(values, want_values)
    torch.testing.assert_close(out, want.view(rows, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows,features", [(1, 5), (3, 37), (16, 2048)])  # vector body, scalar tail, threads
def test_silu_mul_kernel(rows, features):
    """silu(gate) * up, with the kernel's own exp: within float32 rounding of torch's float64 result,
    also at the ends of exp's range (clamped there), and NaN propagated."""
    kernels = decode_kernels()
    gen = torch.Generator().manual_seed(features)
    gate_up = torch.randn(rows, 2 * features, generator=gen) * 8
    special = torch.tensor([-1000.0, -100.0, -87.5, -30.0, -1e-20, 0.0, 1e-20, 30.0, 88.5, 100.0, 1000.0])
    gate_up[0, :min(features, len(special))] = special[:features]
    out = torch.empty(rows, features)
    kernels.silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, features)
    gate, up = gate_up.double().split(features, dim=-1)
    torch.testing.assert_close(out.double(), torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-30)

    gate_up[0, 0] = float("nan")
    kernels.silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, features)
    assert out[0, 0].isnan() and not out[:, 1:].isnan().any()


def test_generation_through_the_engine_picks_the_float32_best_token(tiny_llama_dir, monkeypatch):
    """The seed's checkpoint loaded in bf16, greedy batched decode of two prompts of different
    lengths through the engine: every token the fast step picks is the float32 model's best
    token for that context, or within a near tie of it (bf16 rounding may swap near ties)."""
    from accessory.generation.engine import GenerationEngine
    from accessory.generation.sampling import SamplingParams
    from accessory.model.meta import MetaModel
    model = MetaModel.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16, device="cpu", max_seq_len=64,
                                      progress=False)
    reference = copy.deepcopy(model.llma).float()
    monkeypatch.setenv("ACCESSORY_FAST_DECODE", "1")
    prompts = [model.tokenizer.encode(p, bos=True, eos=False) for p in ("Hello world", "A much longer prompt here")]
    engine = GenerationEngine(model.llma, model.tokenizer, eos_ids=[])
    for rows in engine.run(prompts, [12, 9], SamplingParams()):
        pass
    assert uses_fast_path(model.llma)
    assert [len(r.new_tokens) for r in rows] == [12, 9]
    for prompt, row in zip(prompts, rows):
        ids = torch.tensor([prompt + row.new_tokens])
        with torch.inference_mode():
            logits = reference.forward_tokens(ids)[0, len(prompt) - 1:-1]
        picked = logits.gather(-1, torch.tensor(row.new_tokens)[:, None])[:, 0]
        assert (logits.max(-1).values - picked).max() < 0.02 * logits.abs().max(), row.new_tokens


def test_the_cache_is_bf16_where_the_native_step_reads_it(monkeypatch):
    """A bf16 model's cache is bf16 when its decode steps run natively (half the memory and the
    bytes each step reads), float32 where torch's attention would read it."""
    monkeypatch.setenv("ACCESSORY_FAST_DECODE", "1")
    model = tiny()
    assert model.new_kv_cache(2, 8).keys[0].dtype is torch.bfloat16
    assert model.new_kv_cache(fast_decode.MAX_ROWS + 1, 8).keys[0].dtype is torch.float32  # more rows than
    # the native step takes; from 17 rows it depends on the kernels (bf16: the CPU's, see max_step_rows)
    takes_17 = fast_decode.max_step_rows(fast_decode._plans(model, PLAIN_BLOCK_TYPES), fast_decode._ends(model)) >= 17
    assert model.new_kv_cache(17, 8).keys[0].dtype is (torch.bfloat16 if takes_17 else torch.float32)
    assert tiny(torch.float32).new_kv_cache(2, 8).keys[0].dtype is torch.float32
    assert tiny(torch.float16).new_kv_cache(2, 8).keys[0].dtype is torch.float32
    handle = model.layers[0].register_forward_hook(lambda *args: None)
    assert model.new_kv_cache(2, 8).keys[0].dtype is torch.float32
    handle.remove()
    monkeypatch.setenv("ACCESSORY_FAST_DECODE", "0")
    assert model.new_kv_cache(2, 8).keys[0].dtype is torch.float32


# ---- the whole step in one call: embedding, layers, final norm and output head (decode_logits)

def record_whole_steps(monkeypatch) -> list:
    """Per one-token step through forward_tokens: whether it ran as one native call."""
    import accessory.model.LLM.llama as llama
    calls, whole_step = [], llama.decode_logits

    def recorded(model, tokens, *args):
        logits = whole_step(model, tokens, *args)
        if tokens.shape[1] == 1:
            calls.append(logits is not None)
        return logits
    monkeypatch.setattr(llama, "decode_logits", recorded)
    return calls


class ModuleHead(Transformer):
    """The same model whose final norm and output run through the modules (an override the whole
    step must not bypass), its layers still native."""

    def logits(self, h):
        return super().logits(h)


def test_whole_step_matches_the_layers_only_step(monkeypatch):
    """One native call per step gives the logits the native layers + torch head give, up to the
    head's bf16 rounding (the call keeps the normed activations and the logits in float32)."""
    calls = record_whole_steps(monkeypatch)
    model = tiny()
    whole = decode_logits(model, monkeypatch=monkeypatch)
    assert calls == [True] * 5 and uses_fast_path(model)
    split = tiny()
    split.__class__ = ModuleHead
    calls.clear()
    layers_only = decode_logits(split, monkeypatch=monkeypatch)
    assert calls == [] and uses_fast_path(split)
    torch.testing.assert_close(whole, layers_only, atol=0.02 * layers_only.abs().max().item(), rtol=0)
    assert not torch.equal(whole, layers_only)  # the head did run differently


@pytest.mark.parametrize("override", ["embed_tokens", "logits", "run_layers"])
def test_a_model_that_overrides_an_end_keeps_its_override(override, monkeypatch):
    calls = record_whole_steps(monkeypatch)
    seen = []

    def spy(self, *args, **kwargs):
        seen.append(1)
        return getattr(Transformer, override)(self, *args, **kwargs)
    model = tiny()
    model.__class__ = type("Variant", (Transformer,), {override: spy})
    decode_logits(model, steps=2, monkeypatch=monkeypatch)
    assert not any(calls) and len(seen) == 3  # prefill + 2 steps, each through the override


@pytest.mark.parametrize("end", ["tok_embeddings", "norm", "output"])
def test_a_hook_on_an_end_is_honoured(end, monkeypatch):
    calls = record_whole_steps(monkeypatch)
    model = tiny()
    decode_logits(model, steps=1, monkeypatch=monkeypatch)
    assert calls == [True]
    seen = []
    getattr(model, end).register_forward_hook(lambda *args: seen.append(1))
    calls.clear()
    got = decode_logits(model, steps=2, monkeypatch=monkeypatch)
    assert calls == [False, False] and len(seen) == 3  # prefill + 2 steps
    torch.testing.assert_close(got, decode_logits(model, steps=2, fast=False, monkeypatch=monkeypatch),
                               atol=0.02 * got.abs().max().item(), rtol=0)


def test_a_replaced_output_weight_is_noticed(monkeypatch):
    calls = record_whole_steps(monkeypatch)
    model = tiny()
    before = decode_logits(model, steps=2, monkeypatch=monkeypatch)
    with torch.no_grad():
        model.output.weight = torch.nn.Parameter(model.output.weight * 2)
    after = decode_logits(model, steps=2, monkeypatch=monkeypatch)
    assert all(calls)
    torch.testing.assert_close(after, before * 2, atol=0.02 * after.abs().max().item(), rtol=0)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("head_scheme", [None, "int8"])
def test_whole_step_heads_match_the_torch_path(tied, head_scheme, monkeypatch):
    """A quantized output head (the int8 one int4 models keep) and an output tied to the
    embedding run in the one call too."""
    calls = record_whole_steps(monkeypatch)
    model = tiny(dim=128, multiple_of=64)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    if head_scheme:
        model.output = QuantLinear.from_linear(model.output, resolve_scheme(head_scheme, "cpu"))
    torch_path = decode_logits(model, fast=False, monkeypatch=monkeypatch)
    calls.clear()
    native = decode_logits(model, fast=True, monkeypatch=monkeypatch)
    assert calls == [True] * 5
    torch.testing.assert_close(native, torch_path, atol=0.03 * torch_path.abs().max().item(), rtol=0)


def test_output_index_of_a_one_token_step(monkeypatch):
    """The engine's output_index: 0 (or -1) per row picks the step's one token; any other index is
    the torch path's IndexError."""
    calls = record_whole_steps(monkeypatch)
    model = tiny()
    rows = 3
    cache = model.new_kv_cache(rows, 16)
    tokens, positions = torch.tensor([[5], [6], [7]]), torch.zeros(rows, 1, dtype=torch.long)
    with torch.inference_mode():
        plain = model.forward_tokens(tokens, positions, cache)
        assert plain.shape == (rows, 1, ARGS["vocab_size"]) and plain.dtype is torch.float32
        for index in (torch.zeros(rows, dtype=torch.long), torch.tensor([0, -1, 0])):
            torch.testing.assert_close(model.forward_tokens(tokens, positions.clone(), cache, output_index=index),
                                       plain[:, 0], atol=0, rtol=0)
        assert calls == [True] * 3
        with pytest.raises(IndexError):
            model.forward_tokens(tokens, positions.clone(), cache, output_index=torch.tensor([0, 1, 0]))


def test_out_of_range_inputs_raise_the_torch_error_and_leave_the_cache_alone(monkeypatch):
    """A token id past the vocabulary or a position past the cache is refused before anything is
    written, and the torch path then raises its own error."""
    calls = record_whole_steps(monkeypatch)
    model = tiny()
    cache = model.new_kv_cache(2, 16)
    positions = torch.tensor([[3], [4]])
    with torch.inference_mode():
        model.forward_tokens(torch.tensor([[1], [2]]), positions, cache)
        saved = [k.clone() for k in cache.keys]
        with pytest.raises(IndexError):
            model.forward_tokens(torch.tensor([[1], [ARGS["vocab_size"]]]), torch.tensor([[5], [5]]), cache)
        with pytest.raises((IndexError, RuntimeError, ValueError)):
            model.forward_tokens(torch.tensor([[1], [2]]), torch.tensor([[5], [16]]), cache)
    assert calls == [True, False, False]
    for key, before in zip(cache.keys, saved):
        assert torch.equal(key, before)


def test_a_hook_added_between_two_steps_of_one_cache_is_honoured(monkeypatch):
    calls = record_whole_steps(monkeypatch)
    model = tiny()
    cache = model.new_kv_cache(2, 16)
    seen = []
    with torch.inference_mode():
        model.forward_tokens(torch.tensor([[1], [2]]), torch.tensor([[0], [0]]), cache)
        model.layers[1].feed_forward.w2.register_forward_hook(lambda *args: seen.append(1))
        model.forward_tokens(torch.tensor([[3], [4]]), torch.tensor([[1], [1]]), cache)
    assert calls == [True, False] and seen == [1]


def test_a_replaced_layer_is_noticed(monkeypatch):
    model = tiny()
    decode_logits(model, steps=1, monkeypatch=monkeypatch)
    assert uses_fast_path(model)
    first = decode_logits(model, monkeypatch=monkeypatch)
    replacement = copy.deepcopy(model.layers[1])
    with torch.no_grad():
        replacement.attention.wo.weight.mul_(3)
    model.layers[1] = replacement  # the step's plans must follow it to its own weights
    edited = decode_logits(model, monkeypatch=monkeypatch)
    assert uses_fast_path(model) and (edited - first).abs().max() > 0.05 * first.abs().max()
    torch.testing.assert_close(edited, decode_logits(model, fast=False, monkeypatch=monkeypatch),
                               atol=0.01 * edited.abs().max().item(), rtol=0)


def test_two_caches_stepped_in_turn_each_keep_their_own_rows(monkeypatch):
    """Steps alternate between two live caches of the same batch size: each must read and write
    its own (the step keeps the last cache's pointers only while it is that cache)."""
    monkeypatch.setenv("ACCESSORY_FAST_DECODE", "1")
    model = tiny()
    gen = torch.Generator().manual_seed(5)
    streams = [torch.randint(0, ARGS["vocab_size"], (2, 6), generator=gen) for _ in range(2)]

    def run(order):
        caches = [model.new_kv_cache(2, 16) for _ in streams]
        out = {0: [], 1: []}
        with torch.inference_mode():
            for which, step in order:
                positions = torch.full((2, 1), step)
                out[which].append(model.forward_tokens(streams[which][:, step:step + 1], positions, caches[which]))
        return {which: torch.cat(logits, 1) for which, logits in out.items() if logits}
    alone = {which: run([(which, s) for s in range(6)])[which] for which in (0, 1)}
    interleaved = run([(which, s) for s in range(6) for which in (0, 1)])
    assert uses_fast_path(model)
    for which in (0, 1):
        assert torch.equal(interleaved[which], alone[which])


def test_two_threads_decode_one_model_at_once(monkeypatch):
    """Each thread has its own step buffers: two threads stepping one model with their own caches
    get what each gets alone."""
    import threading
    model = tiny()
    prompts = [(7, 4, 7), (3, 6, 5)]  # the same batch size: the same-sized buffers, one set per thread
    alone = [decode_logits(model, lens, steps=6, monkeypatch=monkeypatch) for lens in prompts]
    got, errors = [None, None], []
    barrier = threading.Barrier(2)

    def work(which):
        try:
            barrier.wait()
            for _ in range(20):
                got[which] = decode_logits(model, prompts[which], steps=6, monkeypatch=monkeypatch)
                assert torch.equal(got[which], alone[which])
        except Exception as exc:  # (re-raised below, in the test's thread)
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(which,)) for which in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert uses_fast_path(model)
    for which in (0, 1):
        assert torch.equal(got[which], alone[which])


def test_how_many_rows_a_native_step_takes(monkeypatch):
    """16 rows always; beyond, up to MAX_ROWS as far as every product's kind allows: bf16 as far as
    kernels.linear gives its kernel rows (64 with AVX512-BF16, 256 on AVX2-only CPUs, 16 with AMX),
    int8 / int4 64 and nf4 16 (kernels.quant.max_rows; the step itself stops at MAX_ROWS), or any
    number where the panel library's expansion runs the packed kinds (kernels.quant.expand_from)."""
    def plan(*kinds):
        return SimpleNamespace(**{name: SimpleNamespace(kind=kind) for name, kind in zip(("qkv", "wo", "w13", "w2"), kinds)})
    bf16 = [plan("bf16", "bf16", "bf16", "bf16")] * 2
    head = lambda kind: SimpleNamespace(head=SimpleNamespace(kind=kind))  # noqa: E731
    for kernel_rows, expected in [(64, 64), (256, fast_decode.MAX_ROWS), (16, 16), (0, 16)]:
        monkeypatch.setattr(fast_decode, "max_kernel_rows", lambda: kernel_rows)
        assert fast_decode.max_step_rows(bf16, head("bf16")) == expected, kernel_rows
    monkeypatch.setattr(fast_decode, "max_kernel_rows", lambda: 64)
    assert fast_decode.max_step_rows([plan("int8", "int8", "int8", "int8")], head("int8")) == 64
    monkeypatch.setattr(fast_decode, "expand_from", lambda kind: 0)  # (no AVX512-BF16 library)
    assert fast_decode.max_step_rows([plan("nf4", "nf4", "nf4", "nf4")], head("int8")) == 16
    monkeypatch.setattr(fast_decode, "expand_from", lambda kind: {"int8": 32, "int4": 32, "nf4": 8}[kind])
    assert fast_decode.max_step_rows([plan("nf4", "nf4", "nf4", "nf4")], head("int8")) == 64
    assert fast_decode.max_step_rows([plan("int4", "int4", "int4", "int4")], head("bf16")) == 64
    monkeypatch.setattr(fast_decode, "max_kernel_rows", lambda: 32)
    assert fast_decode.max_step_rows([plan("int4", "int4", "int4", "int4")], head("bf16")) == 32
    assert fast_decode.max_step_rows([plan("int4", "int4", "int4", "int4")]) == 64  # (no ends: the layers only)


def prefill(model, prompt_lens, fast=True, monkeypatch=None, start=0):
    """Rows of different lengths prefilled at once (padded to the longest, each row at positions
    ``start``...): (every position's float32 logits, the cache)."""
    monkeypatch.setenv("ACCESSORY_FAST_DECODE", "1" if fast else "0")
    gen = torch.Generator().manual_seed(2)
    rows, longest = len(prompt_lens), max(prompt_lens)
    tokens = torch.randint(0, ARGS["vocab_size"], (rows, start + longest), generator=gen)
    cache = model.new_kv_cache(rows, 64)
    with torch.inference_mode():
        if start:  # an earlier part of the prompt already in the cache (the engine's kept prefixes)
            model.forward_tokens(tokens[:, :start], torch.arange(start).expand(rows, start).clone(), cache)
        positions = torch.arange(start, start + longest).expand(rows, longest).clone()
        logits = model.forward_tokens(tokens[:, start:], positions, cache).float()
    return logits, cache


def needs_avx512_kind(kind: str) -> None:
    if kind not in decode_kernels().avx512_kinds:
        pytest.skip(f"a native prefill takes {kind} products only from an AVX-512 library, not built here")


# 3 rows of up to 40 tokens: 120 tokens, two native calls of up to 64 rows
@pytest.mark.parametrize("prompt_lens,start", [((40, 23, 37), 0), ((9,), 0), ((12, 30), 17)])
@pytest.mark.parametrize("layout", ["panels", "rows"])
def test_native_prefill_is_as_close_to_float32_as_the_torch_path(monkeypatch, prompt_lens, start, layout):
    """A prompt's tokens through the native step (bf16 weights in panels, or in rows with the
    AVX512-BF16 kernel): every position's logits as close to the float32 model's as the torch
    path's, the cache as close, in ceil(tokens / 64) native calls."""
    needs_avx512_kind("panels" if layout == "panels" else "bf16")
    model = tiny(layout=layout, **PANEL_ARGS)
    reference, reference_cache = prefill(copy.deepcopy(model).float(), prompt_lens, False, monkeypatch, start)
    torch_bf16, torch_cache = prefill(model, prompt_lens, False, monkeypatch, start)
    calls = count_native_steps(monkeypatch, prefill=True)
    native, native_cache = prefill(model, prompt_lens, True, monkeypatch, start)
    calls_of = lambda tokens: [64] * (tokens // 64) + [tokens % 64] * (tokens % 64 > 0)  # noqa: E731
    assert calls == calls_of(len(prompt_lens) * start) + calls_of(len(prompt_lens) * max(prompt_lens))
    for row, length in enumerate(prompt_lens):  # (a padded row's positions past its prompt: not compared)
        native_error = (native[row, :length] - reference[row, :length]).abs().max().item()
        torch_error = (torch_bf16[row, :length] - reference[row, :length]).abs().max().item()
        assert native_error <= max(torch_error, 1e-3) * 1.5, (row, native_error, torch_error)
        for name in ("keys", "values"):
            for ours, bf16, want in zip(getattr(native_cache, name), getattr(torch_cache, name),
                                        getattr(reference_cache, name)):
                end = start + length
                native_error = (ours[row, :, :end].float() - want[row, :, :end]).abs().max().item()
                torch_error = (bf16[row, :, :end].float() - want[row, :, :end]).abs().max().item()
                assert native_error <= max(torch_error, 1e-2) * 1.5, (name, row, native_error, torch_error)
    assert not torch.equal(native, torch_bf16)  # (it did run apart from the torch path)


def test_decode_after_a_native_prefill_picks_the_float32_best_tokens(monkeypatch):
    model = tiny(seed=3, layout="panels", **PANEL_ARGS)
    reference = decode_logits(copy.deepcopy(model).float(), prompt_lens=(30, 12, 21), fast=False,
                              monkeypatch=monkeypatch)
    calls = count_native_steps(monkeypatch, prefill=True)
    native = decode_logits(model, prompt_lens=(30, 12, 21), fast=True, monkeypatch=monkeypatch)
    assert sum(calls) == 3 * 30
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05
    assert clear.sum() > 5
    assert torch.equal(native.argmax(-1)[clear], reference.argmax(-1)[clear])


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_native_quantized_prefill_matches_the_torch_path(scheme, monkeypatch):
    """int8 / int4 / nf4 weights (expanded to bf16 from kernels.quant.expand_from rows, else VNNI
    products): the prompt's logits within the activations' rounding of the torch path's, which
    reads the same packed weights."""
    needs_avx512_kind(scheme)
    model = quantize(tiny(dim=128, multiple_of=64), scheme)
    torch_path, _ = prefill(model, (40, 23, 37), False, monkeypatch)
    calls = count_native_steps(monkeypatch, prefill=True)
    native, _ = prefill(model, (40, 23, 37), True, monkeypatch)
    assert calls == [64, 56]
    for row, length in enumerate((40, 23, 37)):
        torch.testing.assert_close(native[row, :length], torch_path[row, :length],
                                   atol=0.04 * torch_path.abs().max().item(), rtol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_packed_products_of_many_rows_go_through_the_expansion(scheme, monkeypatch):
    """In a native step, a packed matrix's product goes through the panel library's expansion from
    kernels.quant.expand_from rows on (int8 / int4 32, nf4 8), through the integer kernels below:
    two prompts padded to 40 tokens run as calls of 64 and 16 rows, then come 2-row decode steps.
    Counted through the function the step calls, which still does the work (the logits unchanged)."""
    if not kq.expand_from(scheme):
        pytest.skip("the expansion runs only on CPUs with AVX512-BF16")
    model = quantize(tiny(dim=128, multiple_of=64), scheme)
    want = decode_logits(copy.deepcopy(model), prompt_lens=(40, 33), steps=2, monkeypatch=monkeypatch)
    kernels = fast_decode.decode_kernels()
    rows = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 7, *[ctypes.c_int64] * 4)
    def counted(kind, *arguments):
        rows.append(arguments[7])
        return kernels.quant_panels(kind, *arguments)
    monkeypatch.setattr(fast_decode, "decode_kernels", lambda: SimpleNamespace(**{**vars(kernels), "quant_panels": counted}))
    got = decode_logits(model, prompt_lens=(40, 33), steps=2, monkeypatch=monkeypatch)
    assert uses_fast_path(model)
    per_call = 4 * model.n_layers  # (q/k/v, o, w1/w3 and w2 packed; the head is not)
    assert rows == [64] * per_call + ([16] * per_call if kq.expand_from(scheme) <= 16 else [])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["setting off", "nf4 without the expansion", "no AVX-512 library", "16-row step",
                                  "positions not increasing", "long prompt"])
def test_prompts_the_native_prefill_does_not_take_run_the_torch_path(monkeypatch, case):
    if case == "nf4 without the expansion":  # (its integer-free kernel takes 16 rows)
        monkeypatch.setattr(fast_decode, "expand_from", lambda kind: 0)
        monkeypatch.setattr(kq, "EXPAND_FROM", {})
        model = quantize(tiny(dim=128, multiple_of=64), "nf4")
    else:
        model = tiny(layout="rows" if case == "16-row step" else "panels", **PANEL_ARGS)
    if case == "16-row step":  # (as with AMX, whose bf16 kernel takes 16 rows)
        monkeypatch.setattr(fast_decode, "max_kernel_rows", lambda: 16)
    if case == "setting off":
        monkeypatch.setenv("ACCESSORY_NATIVE_PREFILL", "0")
    if case == "long prompt":  # a query's attention past that share of its layer's products
        first = fast_decode._plans(model, PLAIN_BLOCK_TYPES)[0]
        products = sum(p.out_features * p.in_features for p in (first.qkv, first.wo, first.w13, first.w2))
        monkeypatch.setattr(fast_decode, "PREFILL_ATTENTION_SHARE", 19 * first.n_heads * first.head_dim * 2 / products)
    tokens = torch.randint(0, ARGS["vocab_size"], (2, 20))
    positions = torch.arange(20).expand(2, 20).clone()
    if case == "positions not increasing":
        positions[1] = positions[1].flip(0)
    cache = model.new_kv_cache(2, 32)
    monkeypatch.setenv("ACCESSORY_FAST_DECODE", "0")
    with torch.inference_mode():
        want = model.forward_tokens(tokens, positions, model.new_kv_cache(2, 32))
    monkeypatch.setenv("ACCESSORY_FAST_DECODE", "1")
    calls = count_native_steps(monkeypatch, prefill=True)
    if case == "no AVX-512 library":  # (the product kinds the step's libraries run with AVX-512)
        fast_decode.decode_kernels().avx512_kinds = frozenset()
    with torch.inference_mode():
        got = model.forward_tokens(tokens, positions, cache)
    assert calls == []
    assert torch.equal(got, want)
    if case == "long prompt":  # one token fewer: native
        monkeypatch.setattr(fast_decode, "PREFILL_ATTENTION_SHARE", fast_decode.PREFILL_ATTENTION_SHARE * 1.01)
        with torch.inference_mode():
            model.forward_tokens(tokens[:, :19], positions[:, :19].clone(), model.new_kv_cache(2, 32))
        assert calls == [38]


def test_a_native_prefill_checks_the_cache_holds_its_rows(monkeypatch):
    """The step's buffers remember a cache they checked; a prompt of more rows than that cache
    holds must not reach the kernels through them."""
    model = tiny(layout="panels", **PANEL_ARGS)
    calls = count_native_steps(monkeypatch, prefill=True)
    cache = model.new_kv_cache(1, 32)
    with torch.inference_mode():
        model.forward_tokens(torch.randint(0, 300, (1, 8)), torch.arange(8)[None].clone(), cache)
        assert calls == [8]
        with pytest.raises((IndexError, RuntimeError, ValueError)):  # the torch path's error
            model.forward_tokens(torch.randint(0, 300, (2, 8)), torch.arange(8, 16).expand(2, 8).clone(), cache)
    assert calls == [8]
