"""llama_peft and llama_adapter against a reference forward written here from the formulas.

Checkpoints are written as the original writes them: keys from its source (biases, ``lora_a`` /
``lora_b``, ``prefix`` / ``prefix_gate`` / ``prefix_new_gate``), ``{"model": ...}`` with the
``llma.`` prefix, the full ``asdict(ModelArgs)`` as config.json, and model-parallel shards cut by
the rules restated in :func:`original_split_dim` (including the LoRA exceptions). They are loaded
through the public ``MetaModel.from_pretrained``; nothing here imports the model code's split plan.
"""

import dataclasses
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from accessory.errors import ConfigError
from accessory.generation.sampling import SamplingParams
from accessory.model.LLM import llama_adapter, llama_peft
from accessory.model.meta import MetaModel

from ckpt_utils import (full_llama_config, llama_shapes, llama_spm_tokenizer, random_llama_state, shard_name,
                        write_checkpoint)

VOCAB = 32000
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "Once upon a time, in a land far away,"]

# The original's extra config fields and defaults (llama_peft.py / llama_adapter.py ModelArgs).
PEFT_DEFAULTS = dict(lora_rank=-1, bias_tuning=True, norm_tuning=True)
ADAPTER_DEFAULTS = dict(prefix_layers=None, prefix_len=10, use_prefix_new_gate=False, lora_rank=-1,
                        bias_tuning=True, norm_tuning=True, trainable_mode="sg")

CONFIGS = {
    # GQA (n_rep 2), LoRA and biases on all seven linears
    "peft_lora_bias": ("llama_peft", dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                                          norm_eps=1e-5, rope_theta=10000.0, lora_rank=4)),
    # the defaults: biases, no LoRA
    "peft_bias": ("llama_peft", dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-6,
                                     rope_theta=500000.0)),
    # the last 2 of 3 layers adapted, LoRA, the new gate
    "adapter_lora_newgate": ("llama_adapter", dict(dim=64, n_layers=3, n_heads=4, multiple_of=32, norm_eps=1e-5,
                                                   rope_theta=10000.0, lora_rank=4, prefix_layers=2, prefix_len=5,
                                                   use_prefix_new_gate=True)),
    # the defaults: every layer adapted, prefix_len 10, biases, no LoRA, no new gate
    "adapter_defaults": ("llama_adapter", dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5,
                                               rope_theta=10000.0)),
}


# --------------------------------------------------------------------------- original's layout

def full_config(llama_type, cfg):
    """``asdict(ModelArgs)`` as the original writes config.json for ``llama_type``."""
    extra = dict(PEFT_DEFAULTS if llama_type == "llama_peft" else ADAPTER_DEFAULTS)
    extra.update({k: v for k, v in cfg.items() if k in extra})
    base = full_llama_config({k: v for k, v in cfg.items() if k not in extra}, VOCAB)
    return {**base, **extra}


def random_state(llama_type, cfg, seed):
    """Random weights in the original's keys (no ``llma.``): llama's, plus biases, LoRA and prefix."""
    conf = full_config(llama_type, cfg)
    state = random_llama_state(cfg, VOCAB, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    for key in list(state):
        match = re.fullmatch(r"(layers\.\d+\.(?:attention|feed_forward)\.(w\w+))\.weight", key)
        if not match:
            continue
        name, proj = match.groups()
        out_features, in_features = state[key].shape
        # llama_adapter's wk / wv never have a bias (the prefix goes through them)
        if conf["bias_tuning"] and not (llama_type == "llama_adapter" and proj in ("wk", "wv")):
            state[name + ".bias"] = 0.2 * torch.randn(out_features, generator=gen)
        rank = conf["lora_rank"]
        if rank > 0:
            state[name + ".lora_a.weight"] = torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features)
            state[name + ".lora_b.weight"] = 0.5 * torch.randn(out_features, rank, generator=gen) / math.sqrt(rank)
    if llama_type == "llama_adapter":
        n_prefixed = conf["prefix_layers"] or conf["n_layers"]
        state["prefix"] = torch.randn(n_prefixed, 1, conf["prefix_len"], conf["dim"], generator=gen)
        state["prefix_gate"] = torch.randn(n_prefixed, conf["n_heads"], generator=gen)
        if conf["use_prefix_new_gate"]:
            state["prefix_new_gate"] = 1.0 + 0.5 * torch.randn(n_prefixed, generator=gen)
    return state


def original_split_dim(key):
    """The dim the original cuts ``key`` along across model-parallel ranks (None = replicated).

    ParallelEmbedding: dim 1. The output head and Column layers (wq wk wv w1 w3): weight and bias
    dim 0; their ``lora_a`` is an nn.Linear (replicated), ``lora_b`` a ColumnParallelLinear (dim 0).
    Row layers (wo w2): weight dim 1, bias replicated, ``lora_a`` a RowParallelLinear (dim 1),
    ``lora_b`` an nn.Linear (replicated). ``prefix_gate`` (layers, local heads): each rank trains its
    own heads' gates, so the full tensor is the ranks' pieces side by side (dim 1).
    """
    if key == "tok_embeddings.weight":
        return 1
    if key == "output.weight":
        return 0
    if key == "prefix_gate":
        return 1
    match = re.fullmatch(
        r"layers\.\d+\.(?:attention|feed_forward)\.(w\w+)\.(weight|bias|lora_a\.weight|lora_b\.weight)", key)
    if not match:
        return None
    proj, param = match.groups()
    if proj in ("wq", "wk", "wv", "w1", "w3"):
        return {"weight": 0, "bias": 0, "lora_a.weight": None, "lora_b.weight": 0}[param]
    return {"weight": 1, "bias": None, "lora_a.weight": 1, "lora_b.weight": None}[param]


def write_original_checkpoint(directory, state, llama_type, config, mp):
    """``consolidated.NN-of-MM.model.pth`` shards of ``state`` cut for ``mp`` ranks, config, meta, tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = [{} for _ in range(mp)]
    for key, tensor in state.items():
        dim = original_split_dim(key)
        pieces = [tensor] * mp if dim is None else torch.chunk(tensor, mp, dim=dim)
        for rank, piece in enumerate(pieces):
            shards[rank]["llma." + key] = piece.contiguous().clone()
    for rank, shard in enumerate(shards):
        torch.save({"model": shard}, directory / shard_name("consolidated", rank, mp))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "meta.json").write_text(json.dumps({"llama_type": llama_type}))
    shutil.copy(llama_spm_tokenizer(), directory / "tokenizer.model")
    return directory


def load(paths, **kwargs):
    kwargs.setdefault("max_seq_len", 128)
    return MetaModel.from_pretrained(paths, dtype=torch.float32, device="cpu", progress=False, **kwargs)


# --------------------------------------------------------------------------- reference forward

def ref_linear(state, name, x):
    """``W x + b + B (A x)``: whichever of bias / LoRA the state holds."""
    y = x @ state[name + ".weight"].double().T
    if name + ".bias" in state:
        y = y + state[name + ".bias"].double()
    if name + ".lora_a.weight" in state:
        y = y + (x @ state[name + ".lora_a.weight"].double().T) @ state[name + ".lora_b.weight"].double().T
    return y


def ref_rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def ref_rope(x, theta):
    """Meta's interleaved RoPE at positions 0..seq-1 on x (seq, heads, hd), as complex products."""
    seq, heads, hd = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), freqs)
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    pairs = torch.view_as_complex(x.reshape(seq, heads, hd // 2, 2).contiguous())
    return torch.view_as_real(pairs * rotation).reshape(seq, heads, hd)


def ref_softmax_attention(q, k, v, causal):
    """q (heads, s, hd), k/v (heads, t, hd); softmax(q k^T / sqrt(hd)) v, lower-triangular if causal."""
    scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    if causal:
        hidden = torch.triu(torch.ones(q.shape[1], k.shape[1], dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores.softmax(-1) @ v


def reference_logits(state, conf, tokens, last_only=False):
    """Logits (seq, vocab) in float64 for one token list, written from the original's formulas;
    (1, vocab) for the last position only with ``last_only``."""
    dim, n_layers, n_heads = conf["dim"], conf["n_layers"], conf["n_heads"]
    n_kv = conf["n_kv_heads"] or n_heads
    hd = dim // n_heads
    eps, theta = conf["norm_eps"], conf["rope_theta"]
    n_prefixed = conf.get("prefix_layers") or (n_layers if "prefix" in state else 0)
    h = state["tok_embeddings.weight"].double()[torch.tensor(tokens)]
    seq = len(tokens)
    for layer in range(n_layers):
        p = f"layers.{layer}."
        x = ref_rms_norm(h, state[p + "attention_norm.weight"], eps)
        q = ref_rope(ref_linear(state, p + "attention.wq", x).view(seq, n_heads, hd), theta)
        k = ref_rope(ref_linear(state, p + "attention.wk", x).view(seq, n_kv, hd), theta)
        v = ref_linear(state, p + "attention.wv", x).view(seq, n_kv, hd)
        k, v = k.repeat_interleave(n_heads // n_kv, dim=1), v.repeat_interleave(n_heads // n_kv, dim=1)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        out = ref_softmax_attention(q, k, v, causal=True)
        index = layer - (n_layers - n_prefixed)
        if index >= 0:  # an adapted layer: gated, unmasked attention to the prefix (no RoPE)
            prefix = state["prefix"][index, 0].double()
            prefix_len = prefix.shape[0]
            pk = ref_linear(state, p + "attention.wk", prefix).view(prefix_len, n_heads, hd).transpose(0, 1)
            pv = ref_linear(state, p + "attention.wv", prefix).view(prefix_len, n_heads, hd).transpose(0, 1)
            gate = state["prefix_gate"][index].double().tanh()[:, None, None]
            if "prefix_new_gate" in state:
                gate = gate * state["prefix_new_gate"][index].double()
            out = out + gate * ref_softmax_attention(q, pk, pv, causal=False)
        h = h + ref_linear(state, p + "attention.wo", out.transpose(0, 1).reshape(seq, dim))
        x = ref_rms_norm(h, state[p + "ffn_norm.weight"], eps)
        gated = torch.nn.functional.silu(ref_linear(state, p + "feed_forward.w1", x))
        h = h + ref_linear(state, p + "feed_forward.w2", gated * ref_linear(state, p + "feed_forward.w3", x))
    if last_only:
        h = h[-1:]
    return ref_rms_norm(h, state["norm.weight"], eps) @ state["output.weight"].double().T


GREEDY_STEPS = 6
_greedy_cache = {}


def reference_greedy(state, conf, ids, n, eos_id):
    """The first ``n`` (<= GREEDY_STEPS) greedy tokens after ``ids``, stopping before EOS.

    Memoised per weights and prompt: greedy runs of different lengths share their prefix."""
    assert n <= GREEDY_STEPS
    key = (id(state), tuple(ids))
    if key not in _greedy_cache:
        sequence, new = list(ids), []
        for _ in range(GREEDY_STEPS):
            token = int(reference_logits(state, conf, sequence, last_only=True)[-1].argmax())
            if token == eos_id:
                break
            new.append(token)
            sequence.append(token)
        _greedy_cache[key] = new
    return _greedy_cache[key][:n]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def weights():
    """Per config: (weights in float32, the same in float64 for the reference, full config)."""
    result = {}
    for index, (name, (llama_type, cfg)) in enumerate(CONFIGS.items()):
        state = random_state(llama_type, cfg, seed=index)
        result[name] = (state, {k: v.double() for k, v in state.items()}, full_config(llama_type, cfg))
    return result


@pytest.fixture(scope="module", params=[(name, mp) for name in CONFIGS for mp in (1, 2)],
                ids=lambda p: f"{p[0]}-mp{p[1]}")
def loaded(request, tmp_path_factory, weights):
    """(model loaded from the original's layout at mp 1 or 2, float64 reference weights, config)."""
    name, mp = request.param
    llama_type = CONFIGS[name][0]
    state, state64, conf = weights[name]
    directory = write_original_checkpoint(tmp_path_factory.mktemp(f"{name}_mp{mp}"), state, llama_type, conf, mp)
    return load(str(directory)), state64, conf


# --------------------------------------------------------------------------- parity

def test_logits_match_reference(loaded):
    model, state, conf = loaded
    for text, logits in zip(TEXTS, model.compute_logits(TEXTS)):
        ids = model.tokenizer.encode(text, bos=True, eos=False)
        expected = reference_logits(state, conf, ids)
        assert logits.shape == (len(ids), VOCAB)
        torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=0)


def test_greedy_generate_matches_reference(loaded):
    model, state, conf = loaded
    prompts = ["Hello", "The quick brown fox jumps over the lazy dog and then"]
    texts = model.generate(prompts, max_gen_len=GREEDY_STEPS)
    for prompt, text in zip(prompts, texts):
        ids = model.tokenizer.encode(prompt, bos=True, eos=False)
        expected = reference_greedy(state, conf, ids, GREEDY_STEPS, model.tokenizer.eos_id)
        assert text == model.tokenizer.decode(expected)


def test_cache_rows_leaving_the_batch_keep_their_tokens(loaded):
    """Rows with different limits: the engine drops finished rows from the (prefix) KV cache."""
    model, state, conf = loaded
    prompts = ["Hello", "The quick brown fox jumps over the lazy dog and then", "1 2 3"]
    ids = [model.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    limits = [5, 2, 4]
    states = None
    for states in model.engine.run(ids, limits, SamplingParams()):
        pass
    for prompt_ids, limit, row in zip(ids, limits, states):
        assert row.new_tokens == reference_greedy(state, conf, prompt_ids, limit, model.tokenizer.eos_id)


def test_evaluate_examples_log_likelihood(loaded):
    model, state, conf = loaded
    result = model.evaluate_examples(TEXTS[:2])
    for text, log_likelihood in zip(TEXTS[:2], result["log_likelihood"]):
        ids = model.tokenizer.encode(text, bos=True, eos=False)
        log_probs = reference_logits(state, conf, ids)[:-1].log_softmax(-1)
        expected = float(log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
        assert log_likelihood == pytest.approx(expected, abs=1e-3)
    assert set(result) == {"log_likelihood", "ppl", "max_equal", "non_context_logits"}


def test_forward_inference_incremental(loaded):
    """The original's entry point: prompt at start_pos 0, then one token at a time, with the cache."""
    model, state, conf = loaded
    ids = model.tokenizer.encode(TEXTS[2], bos=True, eos=False)
    expected = reference_logits(state, conf, ids)
    split = len(ids) - 3
    got = [model.llma.forward_inference(torch.tensor([ids[:split]]), 0)[0]]
    for pos in range(split, len(ids)):
        got.append(model.llma.forward_inference(torch.tensor([[ids[pos]]]), pos)[0])
    torch.testing.assert_close(torch.stack(got[1:]).double(), expected[split:], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[0].double(), expected[split - 1], atol=1e-4, rtol=0)


def test_reused_cache_recomputes_the_prefix(tmp_path):
    """A cache reused for a new sequence (start_pos 0) must not serve the old prefix keys."""
    llama_type, cfg = CONFIGS["adapter_lora_newgate"]
    conf = full_config(llama_type, cfg)
    state = random_state(llama_type, cfg, seed=7)
    model = load(str(write_original_checkpoint(tmp_path, state, llama_type, conf, 1)))
    ids = model.tokenizer.encode(TEXTS[0], bos=True, eos=False)
    model.llma.forward_inference(torch.tensor([ids]), 0)
    with torch.no_grad():
        model.llma.prefix.mul_(-0.5)
    state = dict(state, prefix=state["prefix"] * -0.5)
    got = model.llma.forward_inference(torch.tensor([ids]), 0)[0]
    torch.testing.assert_close(got.double(), reference_logits(state, conf, ids)[-1], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- structure

@pytest.mark.parametrize("name", list(CONFIGS))
def test_split_plan_is_the_originals(name):
    llama_type, cfg = CONFIGS[name]
    module = llama_peft if llama_type == "llama_peft" else llama_adapter
    args = module.ModelArgs(**{**full_config(llama_type, cfg), "vocab_size": VOCAB})
    with torch.device("meta"):
        model = module.Transformer(args)
    keys = list(model.state_dict())
    assert set(keys) == set(random_state(llama_type, cfg, seed=0))
    for key in keys:
        assert model.split_plan.shard_dim(key) == original_split_dim(key), key


def test_config_fields_and_defaults_are_the_originals():
    peft_fields = {f.name: f.default for f in dataclasses.fields(llama_peft.ModelArgs)}
    adapter_fields = {f.name: f.default for f in dataclasses.fields(llama_adapter.ModelArgs)}
    llama_config = full_llama_config({}, -1)
    ours = {"clip_config": None}  # not the original's: shrinks the CLIP of with_visual=True (default: real sizes)
    assert peft_fields == {**llama_config, **PEFT_DEFAULTS, **ours}
    assert adapter_fields == {**llama_config, **ADAPTER_DEFAULTS, **ours, "visual_config": None}
    # the visual sizes are class attributes, not config fields
    assert llama_adapter.ModelArgs.v_embed_dim == 768 and "v_embed_dim" not in adapter_fields


def test_peft_without_options_is_llama():
    cfg = CONFIGS["peft_lora_bias"][1]
    args = llama_peft.ModelArgs(**{**cfg, "lora_rank": -1, "bias_tuning": False, "vocab_size": VOCAB})
    with torch.device("meta"):
        model = llama_peft.Transformer(args)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == llama_shapes(cfg, VOCAB)


def test_adapter_parameter_shapes():
    torch.manual_seed(0)  # the init's spread is checked below: a fixed draw, not whatever earlier tests left
    llama_type, cfg = CONFIGS["adapter_lora_newgate"]
    args = llama_adapter.ModelArgs(**{**full_config(llama_type, cfg), "vocab_size": VOCAB})
    model = llama_adapter.Transformer(args)
    params = dict(model.named_parameters())
    assert params["prefix"].shape == (2, 1, 5, 64)
    assert params["prefix_gate"].shape == (2, 4)
    assert params["prefix_new_gate"].shape == (2,)
    assert not params["prefix_gate"].any() and (params["prefix_new_gate"] == 1).all()  # zero-init attention
    assert "layers.0.attention.wk.bias" not in params and "layers.0.attention.wv.bias" not in params
    assert "layers.0.attention.wq.bias" in params and "layers.0.feed_forward.w2.bias" in params
    assert not (params["layers.0.attention.wq.lora_b.weight"]).any()  # a fresh LoRA is a no-op
    assert float(params["layers.0.attention.wq.lora_a.weight"].detach().std()) == pytest.approx(0.02, rel=0.1)
    without_new_gate = llama_adapter.Transformer(dataclasses.replace(args, use_prefix_new_gate=False))
    assert "prefix_new_gate" not in dict(without_new_gate.named_parameters())


def test_trainable_params_and_is_peft():
    cfg = CONFIGS["peft_lora_bias"][1]
    with torch.device("meta"):
        peft = llama_peft.Transformer(llama_peft.ModelArgs(**{**cfg, "vocab_size": VOCAB}))
        no_norm = llama_peft.Transformer(llama_peft.ModelArgs(**{**cfg, "vocab_size": VOCAB, "norm_tuning": False}))
        adapter = llama_adapter.Transformer(llama_adapter.ModelArgs(
            **{**full_config(*CONFIGS["adapter_lora_newgate"]), "vocab_size": VOCAB}))
    assert peft.is_peft and adapter.is_peft
    names = set(peft.get_trainable_params())
    assert names == {k for k in peft.state_dict() if re.search(r"bias|lora|norm", k)}
    assert "layers.1.feed_forward.w2.lora_a.weight" in names and "norm.weight" in names
    assert set(no_norm.get_trainable_params()) == {k for k in names if "norm" not in k}
    adapter_names = set(adapter.get_trainable_params())
    assert {"prefix", "prefix_gate", "prefix_new_gate"} <= adapter_names
    assert adapter_names == {k for k in adapter.state_dict() if re.search(r"bias|lora|norm|prefix", k)}


# --------------------------------------------------------------------------- loading

@pytest.mark.parametrize("name", ["peft_lora_bias", "adapter_lora_newgate"])
def test_two_stage_load_base_then_trainable_only_finetune(name, tmp_path):
    """pretrained_path=[base llama (mp 2), fine-tune holding only get_trainable_params' keys (mp 1)]."""
    llama_type, cfg = CONFIGS[name]
    conf = full_config(llama_type, cfg)
    state = random_state(llama_type, cfg, seed=11)
    base_state = random_llama_state(cfg, VOCAB, seed=12)  # norms differ: the fine-tune's must win
    trainable = {k: v for k, v in state.items() if re.search(r"bias|lora|norm|prefix", k)}
    assert not set(trainable) - set(state) and "layers.0.attention.wq.weight" not in trainable
    base = write_checkpoint(tmp_path / "base", base_state, cfg, mp=2)
    finetune = write_original_checkpoint(tmp_path / "finetune", trainable, llama_type, conf, mp=1)
    model = load([str(base), str(finetune)])
    merged = {**base_state, **trainable}
    ids = model.tokenizer.encode(TEXTS[0], bos=True, eos=False)
    torch.testing.assert_close(model.compute_logits([ids])[0].double(), reference_logits(merged, conf, ids),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("llama_type,extra", [("llama_peft", dict(lora_rank=4)),
                                               ("llama_adapter", dict(lora_rank=4, use_prefix_new_gate=True))])
def test_fresh_options_leave_llama_unchanged(llama_type, extra, tmp_path):
    """A llama checkpoint loaded with strict=False into a PEFT type: zero biases, zero lora_b and
    zero prefix gates (the original's initialisation) give llama's logits exactly."""
    cfg = dict(CONFIGS["adapter_defaults"][1])
    state = random_llama_state(cfg, VOCAB, seed=5)
    directory = write_checkpoint(tmp_path / "llama", state, cfg)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(full_config(llama_type, {**cfg, **extra})))
    llama_model = load(str(directory))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "parameters were not in the checkpoint" is expected here
        model = load(str(directory), llama_type=llama_type, llama_config=[str(config_file)], strict=False)
    assert any("lora_b" in k for k in model.load_result["missing_keys"])
    ours, reference = model.compute_logits(TEXTS[:1])[0], llama_model.compute_logits(TEXTS[:1])[0]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- errors

def adapter_args(**changes):
    return llama_adapter.ModelArgs(**{**full_config(*CONFIGS["adapter_defaults"]), "vocab_size": VOCAB, **changes})


def test_adapter_rejects_grouped_kv_heads():
    with pytest.raises(ConfigError, match=r"n_kv_heads == n_heads.*n_heads=4, n_kv_heads=2"):
        llama_adapter.Transformer(adapter_args(n_kv_heads=2))
    with torch.device("meta"):
        llama_adapter.Transformer(adapter_args(n_kv_heads=4))  # equal counts are fine


@pytest.mark.parametrize("changes,message", [
    (dict(prefix_len=0), r"prefix_len > 0.*prefix_len=0"),
    (dict(prefix_layers=3), r"prefix_layers=3 must be between 1 and n_layers=2"),
    (dict(prefix_layers=0), r"prefix_layers=0"),
])
def test_adapter_rejects_bad_prefix(changes, message):
    with pytest.raises(ConfigError, match=message):
        llama_adapter.Transformer(adapter_args(**changes))


def test_unknown_trainable_mode():
    with torch.device("meta"):
        model = llama_adapter.Transformer(adapter_args(trainable_mode="everything"))
    with pytest.raises(ConfigError, match="trainable_mode 'everything'"):
        model.get_trainable_params()
