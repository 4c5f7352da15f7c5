"""The mixtral family: mixtral against HF transformers' MixtralForCausalLM, mixtral_sparse and
mixtral_peft against mixtral / an independent token-by-token reference, at model-parallel 1 and 2.

Checkpoints are written the way the original writes them (``{"model": {"llma." + k: v}}`` in
``consolidated.NN-of-MM.model.pth``, the full ``asdict(ModelArgs)`` config.json, meta.json, a real
tokenizer). The original's key names, defaults and model-parallel cuts are restated here from
/work/shared/ORIGINAL.md and the original source, independently of the package's split plans.
"""

import importlib
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Mapping

import pytest
import torch
import torch.nn.functional as F

from accessory.errors import ConfigError
from accessory.model.layers.moe import dispatch, route_top_k
from accessory.model.meta import MetaModel

from ckpt_utils import PREFIX, tokenizer_fixture

VOCAB = 32000
NUM_EXPERTS, TOP_K = 4, 2
CFG = dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, norm_eps=1e-5, rope_theta=1000000.0,
           moe={"num_experts": NUM_EXPERTS, "num_experts_per_tok": TOP_K})
LORA_RANK = 4
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "Once upon a time, in a land far away,"]
MAX_SEQ_LEN = 128


# --------------------------------------------------------------------------- the original's layout

def original_config(cfg: Mapping, llama_type: str, **peft) -> Dict:
    """config.json as the original writes it: every ModelArgs field, in order, with its defaults."""
    config = dict(dim=4096, hidden_dim=16384, head_dim=128, n_layers=32, n_heads=32, n_kv_heads=None,
                  vocab_size=VOCAB, norm_eps=1e-5, rope_theta=1000000, max_batch_size=32, max_seq_len=2048,
                  moe={"num_experts_per_tok": 2, "num_experts": 8}, load_balancing_weight=0.1, rope_scaling=None)
    if llama_type == "mixtral_peft":
        config.update(lora_rank=-1, bias_tuning=True, norm_tuning=False)
    config.update(cfg)
    config.update(peft)
    return config


def linear_names(cfg: Mapping):
    """(name, (out, in)) of every linear that mixtral_peft gives a bias / LoRA, per layer."""
    dim, heads = cfg["dim"], cfg["n_heads"]
    hd, kv, hidden = dim // heads, cfg["n_kv_heads"], cfg["hidden_dim"]
    names = []
    for i in range(cfg["n_layers"]):
        p = f"layers.{i}."
        names += [(p + "attention.wq", (heads * hd, dim)), (p + "attention.wk", (kv * hd, dim)),
                  (p + "attention.wv", (kv * hd, dim)), (p + "attention.wo", (dim, heads * hd))]
        for e in range(NUM_EXPERTS):
            q = f"{p}feed_forward.experts.{e}."
            names += [(q + "w1", (hidden, dim)), (q + "w2", (dim, hidden)), (q + "w3", (hidden, dim))]
    return names


def random_mixtral_state(cfg: Mapping, seed: int, bias: bool = False, lora_rank: int = 0) -> Dict[str, torch.Tensor]:
    """Random mixtral (or mixtral_peft) weights, keys without ``llma.``, in the original's order."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=gen) * scale

    dim = cfg["dim"]
    state = {"tok_embeddings.weight": randn(VOCAB, dim)}
    linears = dict(linear_names(cfg))
    for i in range(cfg["n_layers"]):
        p = f"layers.{i}."
        layer_linears = [n for n in linears if n.startswith(p)]
        for name in layer_linears:
            out_f, in_f = linears[name]
            state[name + ".weight"] = randn(out_f, in_f, scale=1 / math.sqrt(in_f))
            if bias:
                state[name + ".bias"] = randn(out_f, scale=0.1)
            if lora_rank > 0:
                state[name + ".lora_a.weight"] = randn(lora_rank, in_f, scale=1 / math.sqrt(in_f))
                state[name + ".lora_b.weight"] = randn(out_f, lora_rank, scale=0.2 / math.sqrt(lora_rank))
            if name.endswith("experts.%d.w3" % (NUM_EXPERTS - 1)):
                # a decisive router: well-separated top-k choices
                state[p + "feed_forward.gate.weight"] = randn(NUM_EXPERTS, dim, scale=3 / math.sqrt(dim))
        state[p + "attention_norm.weight"] = 1 + randn(dim, scale=0.1)
        state[p + "ffn_norm.weight"] = 1 + randn(dim, scale=0.1)
    state["norm.weight"] = 1 + randn(dim, scale=0.1)
    state["output.weight"] = randn(VOCAB, dim, scale=2 / math.sqrt(dim))
    return state


def dense_to_sparse(state: Mapping[str, torch.Tensor], cfg: Mapping) -> Dict[str, torch.Tensor]:
    """mixtral -> mixtral_sparse: stack the experts; w2 rows are each expert's w2 TRANSPOSED."""
    sparse = {}
    for key, value in state.items():
        if ".feed_forward.experts." not in key:
            sparse[key] = value
        elif ".experts.0.w1." in key:  # the stacked weights sit where the experts were, before the gate
            p = key[: key.index("experts.")]
            for w in ("w1", "w2", "w3"):
                per_expert = [state[f"{p}experts.{e}.{w}.weight"] for e in range(NUM_EXPERTS)]
                sparse[p + w] = torch.cat([t.T if w == "w2" else t for t in per_expert], dim=0)
    return sparse


def original_cut(key: str, tensor: torch.Tensor, mp: int, rank: int):
    """Rank ``rank``'s piece of ``key`` under the original's rules, or None when it holds none."""
    parts = key.split(".")
    if key == "tok_embeddings.weight":
        return tensor.chunk(mp, dim=1)[rank]  # ParallelEmbedding: the embedding dim
    if key == "output.weight":
        return tensor.chunk(mp, dim=0)[rank]
    if "experts" in parts:  # whole experts per rank, GLOBAL expert index in the key
        expert = int(parts[parts.index("experts") + 1])
        return tensor if expert // (NUM_EXPERTS // mp) == rank else None
    if parts[-1] in ("w1", "w2", "w3") and parts[-2] == "feed_forward":  # mixtral_sparse
        hidden = tensor.shape[0] // NUM_EXPERTS
        step = hidden // mp
        return tensor.view(NUM_EXPERTS, hidden, -1)[:, rank * step:(rank + 1) * step].reshape(-1, tensor.shape[1])
    if "attention" in parts:
        layer = parts[parts.index("attention") + 1]
        tail = ".".join(parts[parts.index("attention") + 2:])
        column = layer in ("wq", "wk", "wv")
        if tail in ("weight", "bias", "lora_b.weight") and column:  # ColumnParallel / LoRA's lora_b
            return tensor.chunk(mp, dim=0)[rank]
        if layer == "wo" and tail in ("weight", "lora_a.weight"):  # RowParallel / LoRA's lora_a
            return tensor.chunk(mp, dim=1)[rank]
    return tensor  # norms, the router, Row biases, replicated LoRA halves


def original_shards(state: Mapping[str, torch.Tensor], mp: int) -> List[Dict[str, torch.Tensor]]:
    shards = [{} for _ in range(mp)]
    for key, tensor in state.items():
        for rank in range(mp):
            piece = original_cut(key, tensor, mp, rank)
            if piece is not None:
                shards[rank][key] = piece.contiguous().clone()
    return shards


def write_original_checkpoint(directory: Path, state, config: Dict, llama_type: str, mp: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for rank, shard in enumerate(original_shards(state, mp)):
        torch.save({"model": {PREFIX + k: v for k, v in shard.items()}},
                   directory / f"consolidated.{rank:02d}-of-{mp:02d}.model.pth")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "meta.json").write_text(json.dumps({"llama_type": llama_type}))
    shutil.copy(tokenizer_fixture("llama-spm") / "tokenizer.model", directory / "tokenizer.model")
    return directory


def load(directory: Path) -> MetaModel:
    return MetaModel.from_pretrained(str(directory), dtype=torch.float32, device="cpu", max_seq_len=MAX_SEQ_LEN)


# --------------------------------------------------------------------------- HF and a plain reference

def hf_mixtral(state: Mapping[str, torch.Tensor], cfg: Mapping):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=cfg["dim"], intermediate_size=cfg["hidden_dim"],
        num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_kv_heads"], num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
        rms_norm_eps=cfg["norm_eps"], max_position_embeddings=2 * MAX_SEQ_LEN, tie_word_embeddings=False,
        sliding_window=None, router_jitter_noise=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]}, attn_implementation="eager")
    model = transformers.MixtralForCausalLM(config).eval()

    def rotate_half_rows(w, heads):  # Meta's interleaved q/k rows -> HF's rotate-half order
        out_f, in_f = w.shape
        return w.view(heads, out_f // heads // 2, 2, in_f).transpose(1, 2).reshape(out_f, in_f)

    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state["output.weight"]}
    for i in range(cfg["n_layers"]):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf[q + "self_attn.q_proj.weight"] = rotate_half_rows(state[p + "attention.wq.weight"], cfg["n_heads"])
        hf[q + "self_attn.k_proj.weight"] = rotate_half_rows(state[p + "attention.wk.weight"], cfg["n_kv_heads"])
        hf[q + "self_attn.v_proj.weight"] = state[p + "attention.wv.weight"]
        hf[q + "self_attn.o_proj.weight"] = state[p + "attention.wo.weight"]
        hf[q + "mlp.gate.weight"] = state[p + "feed_forward.gate.weight"]
        experts = [f"{p}feed_forward.experts.{e}." for e in range(NUM_EXPERTS)]
        hf[q + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([state[e + "w1.weight"], state[e + "w3.weight"]]) for e in experts])
        hf[q + "mlp.experts.down_proj"] = torch.stack([state[e + "w2.weight"] for e in experts])
        hf[q + "input_layernorm.weight"] = state[p + "attention_norm.weight"]
        hf[q + "post_attention_layernorm.weight"] = state[p + "ffn_norm.weight"]
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


def reference_logits(state: Mapping[str, torch.Tensor], cfg: Mapping, tokens: List[int]) -> torch.Tensor:
    """A plain token-by-token re-statement of the original's math (float64), LoRA and biases included."""
    s = {k: v.double() for k, v in state.items()}
    dim, heads, kv = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    hd, seq = dim // heads, len(tokens)

    def linear(x, name):
        y = x @ s[name + ".weight"].T
        if name + ".bias" in s:
            y = y + s[name + ".bias"]
        if name + ".lora_a.weight" in s:
            y = y + (x @ s[name + ".lora_a.weight"].T) @ s[name + ".lora_b.weight"].T
        return y

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg["norm_eps"]) * w

    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rot = torch.polar(torch.ones(seq, hd // 2, dtype=torch.float64), torch.outer(torch.arange(seq).double(), inv_freq))

    def rope(x):  # (seq, heads, hd), pairs (2i, 2i+1) as complex numbers
        c = torch.view_as_complex(x.reshape(seq, x.shape[1], hd // 2, 2).contiguous())
        return torch.view_as_real(c * rot[:, None, :]).reshape(x.shape)

    h = s["tok_embeddings.weight"][torch.tensor(tokens)]
    for i in range(cfg["n_layers"]):
        p = f"layers.{i}."
        x = rms(h, s[p + "attention_norm.weight"])
        q = rope(linear(x, p + "attention.wq").view(seq, heads, hd))
        k = rope(linear(x, p + "attention.wk").view(seq, kv, hd)).repeat_interleave(heads // kv, dim=1)
        v = linear(x, p + "attention.wv").view(seq, kv, hd).repeat_interleave(heads // kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(seq, dim)
        h = h + linear(attn, p + "attention.wo")
        x = rms(h, s[p + "ffn_norm.weight"])
        ffn = torch.zeros_like(x)
        for t in range(seq):
            probs = (x[t] @ s[p + "feed_forward.gate.weight"].T).softmax(-1)
            weights, chosen = probs.topk(TOP_K)
            for weight, e in zip(weights / weights.sum(), chosen.tolist()):
                e_ = f"{p}feed_forward.experts.{e}."
                ffn[t] += weight * linear(F.silu(linear(x[t], e_ + "w1")) * linear(x[t], e_ + "w3"), e_ + "w2")
        h = h + ffn
    return (rms(h, s["norm.weight"]) @ s["output.weight"].T).float()


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread beats a thread pool, most of all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense_state():
    return random_mixtral_state(CFG, seed=7)


@pytest.fixture(scope="module")
def hf(dense_state):
    return hf_mixtral(dense_state, CFG)


@pytest.fixture(scope="module", params=[1, 2], ids=lambda mp: f"mp{mp}")
def mixtral_model(request, dense_state, tmp_path_factory):
    mp = request.param
    directory = write_original_checkpoint(tmp_path_factory.mktemp(f"mixtral_mp{mp}"), dense_state,
                                          original_config(CFG, "mixtral"), "mixtral", mp)
    return load(directory)


# --------------------------------------------------------------------------- defaults and names

def test_model_args_are_the_originals():
    from accessory.model.LLM import mixtral, mixtral_peft, mixtral_sparse

    def originals(args):  # clip_config is ours (shrinks the CLIP of with_visual=True), None by default
        fields = asdict(args)
        assert fields.pop("clip_config") is None
        return fields

    expected = original_config({}, "mixtral")
    expected["vocab_size"] = -1
    assert originals(mixtral.ModelArgs()) == expected
    assert list(originals(mixtral.ModelArgs())) == list(expected)
    assert originals(mixtral_sparse.ModelArgs()) == expected
    peft = original_config({}, "mixtral_peft")
    peft["vocab_size"] = -1
    assert list(originals(mixtral_peft.ModelArgs()).items()) == list(peft.items())


def test_head_dim_field_is_ignored(mixtral_model):
    # config.json says head_dim=128 (the default); heads are dim // n_heads = 16 wide, as in the original.
    assert mixtral_model.args.head_dim == 128
    assert mixtral_model.llma.layers[0].attention.head_dim == CFG["dim"] // CFG["n_heads"]


def test_state_dict_keys_are_the_originals(mixtral_model, dense_state):
    assert list(mixtral_model.llma.state_dict()) == list(dense_state)


def test_missing_moe_entry_is_a_config_error():
    from accessory.model.LLM import mixtral
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        mixtral.Transformer(mixtral.ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=10, moe={"num_experts": 4}))


# --------------------------------------------------------------------------- mixtral vs HF

def test_logits_match_hf(mixtral_model, hf):
    for text, logits in zip(TEXTS, mixtral_model.compute_logits(TEXTS)):
        ids = mixtral_model.tokenizer.encode(text, bos=True, eos=False)
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0]
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_greedy_generation_matches_hf(mixtral_model, hf):
    prompts = TEXTS[:2]
    got = mixtral_model.generate(prompts, max_gen_len=12)
    for prompt, text in zip(prompts, got):
        ids = mixtral_model.tokenizer.encode(prompt, bos=True, eos=False)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                              eos_token_id=mixtral_model.tokenizer.eos_id, pad_token_id=0)
        new = out[0, len(ids):].tolist()
        if mixtral_model.tokenizer.eos_id in new:
            new = new[: new.index(mixtral_model.tokenizer.eos_id)]
        assert text == mixtral_model.tokenizer.decode(new)


def test_evaluate_examples_match_hf(mixtral_model, hf):
    from ckpt_utils import expected_evaluation
    examples, contexts = [TEXTS[0], TEXTS[2]], ["The quick brown fox", "Once upon a time,"]
    result = mixtral_model.evaluate_examples(examples, contexts=contexts)
    for i, (example, context) in enumerate(zip(examples, contexts)):
        ids = mixtral_model.tokenizer.encode(example, bos=True, eos=False)
        n_context = len(mixtral_model.tokenizer.encode(context, bos=True, eos=False))
        with torch.no_grad():
            expected = expected_evaluation(hf(torch.tensor([ids])).logits[0], ids, n_context)
        assert result["log_likelihood"][i] == pytest.approx(expected["log_likelihood"], abs=1e-3)
        assert result["ppl"][i] == pytest.approx(expected["ppl"], abs=1e-4)
        assert result["max_equal"][i] == expected["max_equal"]


def test_forward_returns_logits_and_losses(mixtral_model):
    ids = torch.tensor([mixtral_model.tokenizer.encode(TEXTS[0], bos=True, eos=False)])
    logits, additional = mixtral_model.llma(ids)
    assert additional == {}
    torch.testing.assert_close(logits, mixtral_model.llma.forward_tokens(ids), atol=0, rtol=0)
    mixtral_model.llma.train()
    try:
        _, additional = mixtral_model.llma(ids)
    finally:
        mixtral_model.llma.eval()
    loss, weight = additional["load_balancing"]
    assert weight == 0.1
    assert 1.0 <= float(loss) <= NUM_EXPERTS  # 1 for a perfectly balanced router


def test_cached_decode_matches_full_forward(mixtral_model):
    llma = mixtral_model.llma
    ids = mixtral_model.tokenizer.encode(TEXTS[2], bos=True, eos=False)
    full = llma.forward_tokens(torch.tensor([ids]))[0]
    cache = llma.new_kv_cache(1, len(ids))
    split = 4
    step = llma.forward_tokens(torch.tensor([ids[:split]]), torch.arange(split)[None], cache)
    torch.testing.assert_close(step[0], full[:split], atol=1e-5, rtol=0)
    for pos in range(split, len(ids)):
        step = llma.forward_tokens(torch.tensor([[ids[pos]]]), torch.tensor([[pos]]), cache)
        torch.testing.assert_close(step[0, 0], full[pos], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- mixtral_sparse

@pytest.mark.parametrize("mp", [1, 2])
def test_sparse_from_dense_weights_matches_mixtral(mp, dense_state, tmp_path):
    dense = load(write_original_checkpoint(tmp_path / "dense", dense_state, original_config(CFG, "mixtral"),
                                           "mixtral", 1))
    sparse_state = dense_to_sparse(dense_state, CFG)
    sparse = load(write_original_checkpoint(tmp_path / "sparse", sparse_state,
                                            original_config(CFG, "mixtral_sparse"), "mixtral_sparse", mp))
    assert list(sparse.llma.state_dict()) == list(sparse_state)
    for got, expected in zip(sparse.compute_logits(TEXTS), dense.compute_logits(TEXTS)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert sparse.generate(TEXTS[:2], max_gen_len=8) == dense.generate(TEXTS[:2], max_gen_len=8)
    logits, additional = sparse.llma(torch.tensor([[1, 450, 4996]]))
    assert additional == {} and logits.shape == (1, 3, VOCAB)


# --------------------------------------------------------------------------- mixtral_peft

@pytest.mark.parametrize("mp", [1, 2])
def test_peft_matches_reference(mp, tmp_path):
    state = random_mixtral_state(CFG, seed=11, bias=True, lora_rank=LORA_RANK)
    config = original_config(CFG, "mixtral_peft", lora_rank=LORA_RANK)
    model = load(write_original_checkpoint(tmp_path / "peft", state, config, "mixtral_peft", mp))
    assert list(model.llma.state_dict()) == list(state)
    for text, logits in zip(TEXTS, model.compute_logits(TEXTS)):
        expected = reference_logits(state, CFG, model.tokenizer.encode(text, bos=True, eos=False))
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_peft_lora_folds_into_mixtral(tmp_path):
    """With bias_tuning off, LoRA is exactly W + B A: mixtral on the folded weights agrees."""
    state = random_mixtral_state(CFG, seed=12, lora_rank=LORA_RANK)
    config = original_config(CFG, "mixtral_peft", lora_rank=LORA_RANK, bias_tuning=False)
    peft = load(write_original_checkpoint(tmp_path / "peft", state, config, "mixtral_peft", 2))
    folded = {k: v for k, v in state.items() if "lora" not in k}
    for name, _ in linear_names(CFG):
        folded[name + ".weight"] = state[name + ".weight"] + state[name + ".lora_b.weight"] @ state[name + ".lora_a.weight"]
    dense = load(write_original_checkpoint(tmp_path / "dense", folded, original_config(CFG, "mixtral"), "mixtral", 1))
    for got, expected in zip(peft.compute_logits(TEXTS), dense.compute_logits(TEXTS)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_peft_trainable_params_are_the_originals():
    from accessory.model.LLM import mixtral_peft
    args = mixtral_peft.ModelArgs(dim=64, hidden_dim=32, n_layers=1, n_heads=4, vocab_size=10,
                                  moe={"num_experts": 2, "num_experts_per_tok": 1}, lora_rank=2)
    names = set(mixtral_peft.Transformer(args).get_trainable_params())
    assert names and all(("bias" in n or "lora" in n) for n in names)
    assert "layers.0.feed_forward.experts.1.w2.lora_b.weight" in names
    assert not any("norm" in n or "gate" in n for n in names)
    args.norm_tuning, args.bias_tuning = True, False
    names = set(mixtral_peft.Transformer(args).get_trainable_params())
    assert "layers.0.ffn_norm.weight" in names and not any(n.endswith("bias") for n in names)


# --------------------------------------------------------------------------- split plans

def _built(llama_type: str, **extra):
    """The architecture built (on the meta device) from CFG, as MetaModel builds it."""
    module = importlib.import_module(f"accessory.model.LLM.{llama_type}")
    with torch.device("meta"):
        return module.Transformer(module.ModelArgs(vocab_size=VOCAB, max_seq_len=MAX_SEQ_LEN, **CFG, **extra))


@pytest.mark.parametrize("llama_type,mp", [("mixtral", 2), ("mixtral", 4), ("mixtral_peft", 2),
                                           ("mixtral_sparse", 2), ("mixtral_sparse", 4)])
def test_split_plan_cuts_like_the_original(llama_type, mp):
    """The model's one declaration splits a full state dict into the original's shards and merges them back."""
    if llama_type == "mixtral_peft":
        state = random_mixtral_state(CFG, seed=3, bias=True, lora_rank=LORA_RANK)
        plan = _built(llama_type, lora_rank=LORA_RANK).split_plan
    else:
        state = random_mixtral_state(CFG, seed=3)
        if llama_type == "mixtral_sparse":
            state = dense_to_sparse(state, CFG)
        plan = _built(llama_type).split_plan
    expected = original_shards(state, mp)
    for key, tensor in state.items():
        pieces = plan.split(key, tensor, mp)
        holders = [rank for rank, piece in enumerate(pieces) if piece is not None]
        assert holders == [rank for rank in range(mp) if key in expected[rank]], key
        for rank in holders:
            assert torch.equal(pieces[rank], expected[rank][key]), (key, rank)
        assert torch.equal(plan.merge(key, [expected[rank][key] for rank in holders]), tensor), key


def test_dispatch_matches_the_originals_masked_loop():
    gen = torch.Generator().manual_seed(0)
    tokens, dim, experts = 37, 8, 6
    x = torch.randn(tokens, dim, generator=gen)
    mats = torch.randn(experts, dim, dim, generator=gen)
    weights, ids, _ = route_top_k(torch.randn(tokens, experts, generator=gen), 3)
    run = lambda e, rows: torch.tanh(rows @ mats[e])  # noqa: E731
    # The original: repeat each token top_k times, fill each expert's rows through a boolean mask.
    flat = ids.reshape(-1)
    repeated = x.repeat_interleave(3, dim=0)
    y = torch.zeros_like(repeated)
    for e in range(experts):
        y[flat == e] = run(e, repeated[flat == e])
    expected = (y.view(tokens, 3, dim) * weights.unsqueeze(-1)).sum(dim=1)
    torch.testing.assert_close(dispatch(x, ids, weights, run, experts), expected, atol=1e-6, rtol=0)
    # A rank holding experts 0..2 only: the other slots contribute zero.
    local = dispatch(x, ids, weights, run, experts, local_experts=range(3))
    y_local = torch.where((flat < 3)[:, None], y, torch.zeros_like(y))
    torch.testing.assert_close(local, (y_local.view(tokens, 3, dim) * weights.unsqueeze(-1)).sum(1), atol=1e-6, rtol=0)
