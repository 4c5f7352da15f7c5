"""internlm and falcon: checkpoints in the original's layout, loaded through ``MetaModel``.

Checkpoints are written here the way the original writes them (keys and shapes from ORIGINAL.md,
``{"model": {"llma."+k: v}}``, config.json with every one of its fields, model-parallel shards
cut by its fairscale layer types), restated independently of the package. Falcon is compared
with HF transformers' ``FalconForCausalLM`` on the same weights (q/k/v fused into HF's
``query_key_value`` layout of each variant); InternLM, which HF does not ship, with a plain
float64 forward written below from the formulas.
"""

import json
import math
import shutil
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import pytest
import torch
import torch.nn.functional as F

from accessory.errors import ConfigError
from accessory.model.meta import MetaModel

from ckpt_utils import tokenizer_fixture

PREFIX = "llma."
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "Once upon a time, in a land far away,"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread beats a thread pool, most of all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- writing checkpoints

def write_original_checkpoint(directory: Path, state: Mapping[str, torch.Tensor], config: Dict,
                              llama_type: str, tokenizer: str, split_dim: Callable[[str], Optional[int]],
                              mp: int = 1) -> Path:
    """``consolidated.NN-of-MM.model.pth`` shards (cut by ``split_dim``), config.json, meta.json, tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    for rank in range(mp):
        shard = {}
        for key, tensor in state.items():
            dim = split_dim(key)
            piece = tensor if dim is None or mp == 1 else torch.chunk(tensor, mp, dim=dim)[rank]
            shard[PREFIX + key] = piece.contiguous().clone()
        torch.save({"model": shard}, directory / f"consolidated.{rank:02d}-of-{mp:02d}.model.pth")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "meta.json").write_text(json.dumps({"llama_type": llama_type}))
    source = tokenizer_fixture(tokenizer)
    names = (["tokenizer.model"] if (source / "tokenizer.model").is_file()
             else ["tokenizer.json", "tokenizer_config.json"])
    for name in names:
        shutil.copy(source / name, directory / name)
    return directory


def random_tensor(key: str, shape, gen: torch.Generator) -> torch.Tensor:
    """Scales that keep logits spread out: embeddings N(0,1), linears N(0,1/in), biases and norm
    offsets N(0, 0.1), norm weights 1 + N(0, 0.1), the output head twice a linear."""
    if key.endswith("embeddings.weight") or key == "embedding.weight":
        return torch.randn(shape, generator=gen)
    if len(shape) == 1:
        base = 1.0 if key.endswith(".weight") else 0.0  # 1-D weights are norm scales
        return base + 0.1 * torch.randn(shape, generator=gen)
    scale = 2.0 if key in ("output.weight", "head.weight") else 1.0
    return scale * torch.randn(shape, generator=gen) / math.sqrt(shape[1])


def random_state(shapes: Dict[str, tuple], seed: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {key: random_tensor(key, shape, gen) for key, shape in shapes.items()}


def load(directory: Path, max_seq_len: int = 128) -> MetaModel:
    return MetaModel.from_pretrained(str(directory), dtype=torch.float32, device="cpu",
                                     max_seq_len=max_seq_len, progress=False)


def assert_greedy_matches(model: MetaModel, prompts, reference_new_tokens: Callable[[list, int], list],
                          n_new: int = 8):
    """``model.generate`` (greedy, batched) gives the text of the reference's greedy continuation
    (``reference_new_tokens(prompt_ids, n_new)``), cut at EOS."""
    got = model.generate(prompts, max_gen_len=n_new)
    eos = model.tokenizer.eos_id
    for prompt, text in zip(prompts, got):
        ids = model.tokenizer.encode(prompt, bos=model.tokenizer.add_bos, eos=False)
        new = reference_new_tokens(ids, n_new)
        if eos in new:
            new = new[: new.index(eos)]
        assert text == model.tokenizer.decode(new)


def assert_cache_matches_full_forward(model: MetaModel, ids: list, split: int = 4):
    """Prefill then token-by-token decoding through the KV cache reproduce the full forward."""
    full = model.llma.forward(torch.tensor([ids]))[0]
    cache = model.llma.new_kv_cache(1, len(ids))
    step = model.llma.forward_tokens(torch.tensor([ids[:split]]), torch.arange(split)[None], cache)
    torch.testing.assert_close(step[0], full[:split], atol=1e-5, rtol=0)
    for pos in range(split, len(ids)):
        step = model.llma.forward_tokens(torch.tensor([[ids[pos]]]), torch.tensor([[pos]]), cache)
        torch.testing.assert_close(step[0, 0], full[pos], atol=1e-5, rtol=0)
    # The original's stateful entry point agrees too.
    last = model.llma.forward_inference(torch.tensor([ids[:split]]), 0)
    torch.testing.assert_close(last[0].float(), full[split - 1], atol=1e-5, rtol=0)
    last = model.llma.forward_inference(torch.tensor([ids[split:]]), split)
    torch.testing.assert_close(last[0].float(), full[-1], atol=1e-5, rtol=0)


# =========================================================================== internlm

INTERNLM_DEFAULTS = dict(num_layers=32, hidden_size=4096, num_attention_heads=32, mlp_ratio=8 / 3, drop_rate=0.0,
                         layer_norm_epsilon=1e-5, norm_type="rmsnorm", norm_eps=1e-5, use_scaled_init=True,
                         use_swiglu=True, vocab_size=-1, multiple_of=256, rope_theta=10000,
                         max_batch_size=32, max_seq_len=2048, rope_scaling=None)

INTERNLM_CONFIGS = {
    # FFN width int(64 * 8/3) = 170 -> 192
    "rmsnorm": dict(num_layers=2, hidden_size=64, num_attention_heads=4, multiple_of=32, layer_norm_epsilon=1e-6),
    # LayerNorm with bias, another rotary base and position scaling; FFN int(48 * 3.5) = 168 -> 176
    "layernorm_theta_scaling": dict(num_layers=3, hidden_size=48, num_attention_heads=3, mlp_ratio=3.5,
                                    multiple_of=16, norm_type="layernorm", rope_theta=50000.0, rope_scaling=0.5),
}
SPM_VOCAB = 32000


def internlm_full_config(cfg: Mapping) -> Dict:
    return {**INTERNLM_DEFAULTS, **cfg, "vocab_size": SPM_VOCAB}


def internlm_ffn(cfg: Mapping) -> int:
    return cfg["multiple_of"] * math.ceil(int(cfg["hidden_size"] * cfg["mlp_ratio"]) / cfg["multiple_of"])


def internlm_shapes(cfg: Mapping) -> Dict[str, tuple]:
    dim, ffn = cfg["hidden_size"], internlm_ffn(cfg)
    norm_keys = ("weight",) if cfg["norm_type"] == "rmsnorm" else ("weight", "bias")
    shapes = {"embedding.weight": (SPM_VOCAB, dim)}
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        shapes.update({
            p + "mixer.Wqkv.weight": (3 * dim, dim), p + "mixer.Wqkv.bias": (3 * dim,),
            p + "mixer.out_proj.weight": (dim, dim), p + "mixer.out_proj.bias": (dim,),
            p + "mlp.w1.weight": (ffn, dim), p + "mlp.w2.weight": (ffn, dim), p + "mlp.w3.weight": (dim, ffn),
        })
        for norm in ("norm1", "norm2"):
            shapes.update({f"{p}{norm}.{k}": (dim,) for k in norm_keys})
    shapes.update({f"norm.{k}": (dim,) for k in norm_keys})
    shapes["head.weight"] = (SPM_VOCAB, dim)
    return shapes


def internlm_split_dim(key: str) -> Optional[int]:
    """fairscale's cut of each internlm parameter: ParallelEmbedding dim 1; ColumnParallelLinear
    (Wqkv weight+bias, w1, w3 = Column(F, D), head) dim 0, contiguously; RowParallelLinear
    (out_proj, w2 = Row(D, F) whose weight is (F, D)) weight dim 1, bias replicated."""
    if key == "embedding.weight":
        return 1
    if key == "head.weight" or ".mixer.Wqkv." in key or key.endswith(("mlp.w1.weight", "mlp.w3.weight")):
        return 0
    if key.endswith(("mixer.out_proj.weight", "mlp.w2.weight")):
        return 1
    return None


def as_float64(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.double() for k, v in state.items()}


def internlm_reference_logits(state: Mapping[str, torch.Tensor], cfg: Mapping, ids: list) -> torch.Tensor:
    """InternLM's forward in float64 from the formulas, without a cache: (seq, vocab)."""
    s = state  # float64 (see as_float64) for a reference well below the 1e-4 tolerance
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hd, eps, seq = dim // n_heads, cfg["layer_norm_epsilon"], len(ids)

    def norm(x, name):
        if cfg["norm_type"] == "rmsnorm":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * s[name + ".weight"]
        return F.layer_norm(x, (dim,), s[name + ".weight"], s[name + ".bias"], eps)

    positions = torch.arange(seq, dtype=torch.float64)
    if cfg.get("rope_scaling") is not None:
        positions = positions * cfg["rope_scaling"]
    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(positions, inv_freq).repeat(1, 2)[:, None, :]  # (seq, 1, hd)

    def rope(x):  # (seq, heads, hd), pairs (i, i + hd/2)
        rotated = torch.cat((-x[..., hd // 2:], x[..., : hd // 2]), dim=-1)
        return x * angles.cos() + rotated * angles.sin()

    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    h = s["embedding.weight"][torch.tensor(ids)]
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        x = norm(h, p + "norm1")
        qkv = (x @ s[p + "mixer.Wqkv.weight"].T + s[p + "mixer.Wqkv.bias"]).view(seq, 3, n_heads, hd)
        q, k, v = rope(qkv[:, 0]), rope(qkv[:, 1]), qkv[:, 2]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(seq, dim)
        h = h + attn @ s[p + "mixer.out_proj.weight"].T + s[p + "mixer.out_proj.bias"]
        x = norm(h, p + "norm2")
        h = h + (F.silu(x @ s[p + "mlp.w1.weight"].T) * (x @ s[p + "mlp.w2.weight"].T)) @ s[p + "mlp.w3.weight"].T
    return norm(h, "norm") @ s["head.weight"].T


@pytest.fixture(scope="module", params=[("rmsnorm", 1), ("rmsnorm", 2), ("layernorm_theta_scaling", 1)],
                ids=lambda p: f"{p[0]}-mp{p[1]}")
def internlm_case(request, tmp_path_factory):
    name, mp = request.param
    cfg = internlm_full_config(INTERNLM_CONFIGS[name])
    state = random_state(internlm_shapes(cfg), seed=len(name) + mp)
    directory = write_original_checkpoint(tmp_path_factory.mktemp(f"internlm_{name}_mp{mp}"), state, cfg,
                                          "internlm", "llama-spm", internlm_split_dim, mp=mp)
    return load(directory), as_float64(state), cfg


def test_internlm_args_are_the_originals():
    from dataclasses import asdict
    from accessory.model.LLM.internlm import ModelArgs
    assert asdict(ModelArgs()) == INTERNLM_DEFAULTS
    assert list(asdict(ModelArgs())) == list(INTERNLM_DEFAULTS)  # config.json key order


def test_internlm_logits_match_reference(internlm_case):
    model, state, cfg = internlm_case
    for text, logits in zip(TEXTS, model.compute_logits(TEXTS)):
        ids = model.tokenizer.encode(text, bos=True, eos=False)
        expected = internlm_reference_logits(state, cfg, ids).float()
        assert logits.shape == expected.shape == (len(ids), SPM_VOCAB)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_internlm_greedy_matches_reference(internlm_case):
    model, state, cfg = internlm_case

    def reference_new_tokens(ids, n_new):
        new = []
        for _ in range(n_new):
            new.append(int(internlm_reference_logits(state, cfg, ids + new)[-1].argmax()))
        return new
    assert_greedy_matches(model, TEXTS[:2], reference_new_tokens)


def test_internlm_cache_matches_full_forward(internlm_case):
    model, _, cfg = internlm_case
    assert model.llma.new_kv_cache(2, 8).keys[0].shape == (2, cfg["num_attention_heads"], 8,
                                                           cfg["hidden_size"] // cfg["num_attention_heads"])
    assert_cache_matches_full_forward(model, model.tokenizer.encode(TEXTS[2], bos=True, eos=False))


def test_internlm_evaluate_examples(internlm_case):
    model, state, cfg = internlm_case
    context, example = "Once upon a time,", TEXTS[2]
    result = model.evaluate_examples([example], contexts=[context])
    ids = model.tokenizer.encode(example, bos=True, eos=False)
    start = len(model.tokenizer.encode(context, bos=True, eos=False)) - 1
    logits = internlm_reference_logits(state, cfg, ids)[start:-1]
    nll = F.cross_entropy(logits, torch.tensor(ids[start + 1:]), reduction="none")
    assert result["log_likelihood"][0] == pytest.approx(-nll.sum().item(), abs=1e-3)
    assert result["ppl"][0] == pytest.approx(nll.mean().item(), abs=1e-4)
    assert result["max_equal"][0] == bool((logits.argmax(-1) == torch.tensor(ids[start + 1:])).all())


def test_internlm_layernorm_keys():
    """norm_type != "rmsnorm" gives LayerNorms whose bias is a checkpoint key."""
    from accessory.model.LLM.internlm import ModelArgs, Transformer
    args = ModelArgs(**{**internlm_full_config(INTERNLM_CONFIGS["layernorm_theta_scaling"]), "vocab_size": 10})
    keys = set(Transformer(args).state_dict())
    assert {"layers.0.norm1.bias", "layers.0.norm2.bias", "norm.bias"} <= keys
    assert keys == set(internlm_shapes(internlm_full_config(INTERNLM_CONFIGS["layernorm_theta_scaling"])))


# =========================================================================== falcon

FALCON_DEFAULTS = dict(num_layers=80, hidden_size=14848, num_attention_heads=232, attention_dropout=0.0,
                       hidden_dropout=0.0, bias=False, multi_query=True, new_decoder_architecture=True,
                       parallel_attn=True, num_kv_heads=None, layer_norm_epsilon=1e-5, vocab_size=-1,
                       rope_theta=10000, max_batch_size=32, max_seq_len=2048, rope_scaling=None)
FALCON_VOCAB = 65024  # len() of the falcon tokenizer fixture

_TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4)
FALCON_CONFIGS = {
    # Falcon-7B: one kv head, old architecture, attention and MLP in parallel off one LayerNorm
    "7b_multi_query_parallel": dict(_TINY, multi_query=True, new_decoder_architecture=False, parallel_attn=True),
    # Falcon-180B as the original's own config writes it: num_kv_heads=8 but multi_query -> ONE kv head
    "180b_new_arch_multi_query": dict(_TINY, multi_query=True, new_decoder_architecture=True, num_kv_heads=2,
                                      layer_norm_epsilon=1e-6),
    # new architecture with multi_query=False: the original ignores num_kv_heads and uses full MHA
    "new_arch_mha_bias": dict(_TINY, num_layers=3, multi_query=False, new_decoder_architecture=True,
                              num_kv_heads=2, bias=True, rope_theta=50000.0),
    # old architecture, sequential attention then MLP, full MHA, biases
    "old_sequential_mha_bias": dict(_TINY, multi_query=False, new_decoder_architecture=False, parallel_attn=False,
                                    bias=True),
    # old architecture, sequential, multi-query
    "old_sequential_multi_query": dict(_TINY, multi_query=True, new_decoder_architecture=False,
                                       parallel_attn=False, rope_scaling=0.5),
}


def falcon_full_config(cfg: Mapping) -> Dict:
    return {**FALCON_DEFAULTS, **cfg, "vocab_size": FALCON_VOCAB}


def falcon_shapes(cfg: Mapping) -> Dict[str, tuple]:
    """Every falcon parameter at mp=1 as the original builds it."""
    dim = cfg["hidden_size"]
    kv_dim = dim // cfg["num_attention_heads"] if cfg["multi_query"] else dim
    shapes = {"word_embeddings.weight": (FALCON_VOCAB, dim)}
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        linears = {"self_attention.wq": (dim, dim), "self_attention.wk": (kv_dim, dim),
                   "self_attention.wv": (kv_dim, dim), "self_attention.dense": (dim, dim),
                   "mlp.dense_h_to_4h": (4 * dim, dim), "mlp.dense_4h_to_h": (dim, 4 * dim)}
        for name, shape in linears.items():
            shapes[p + name + ".weight"] = shape
            if cfg["bias"]:
                shapes[p + name + ".bias"] = shape[:1]
        if cfg["new_decoder_architecture"]:
            norms = ["ln_attn", "ln_mlp"]
        else:
            norms = ["input_layernorm"] + ([] if cfg["parallel_attn"] else ["post_attention_layernorm"])
        for norm in norms:
            shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (dim,)
    shapes["ln_f.weight"] = shapes["ln_f.bias"] = (dim,)
    shapes["output.weight"] = (FALCON_VOCAB, dim)
    return shapes


def falcon_split_dim(cfg: Mapping) -> Callable[[str], Optional[int]]:
    """fairscale's cut: word_embeddings dim 1; Column wq, (wk, wv unless multi_query: then plain
    replicated nn.Linear), dense_h_to_4h, output: weight and bias dim 0; Row dense, dense_4h_to_h:
    weight dim 1, bias replicated; LayerNorms replicated."""
    def split_dim(key: str) -> Optional[int]:
        if key == "word_embeddings.weight":
            return 1
        if key == "output.weight" or ".wq." in key or ".dense_h_to_4h." in key:
            return 0
        if ".wk." in key or ".wv." in key:
            return None if cfg["multi_query"] else 0
        if key.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
            return 1
        return None
    return split_dim


def hf_falcon(state: Mapping[str, torch.Tensor], cfg: Mapping):
    """``FalconForCausalLM`` with the same weights. The original's model maps onto HF's flags as:
    new arch -> new_decoder_architecture with num_kv_heads = the kv heads actually built (1 or H);
    old arch -> multi_query as is. HF's fused query_key_value rows are laid out per variant:
    new arch (kv, heads/kv + 2, hd) groups; old multi-query [all q, k, v]; old MHA (heads, 3, hd)."""
    transformers = pytest.importorskip("transformers")
    n_heads, dim = cfg["num_attention_heads"], cfg["hidden_size"]
    hd = dim // n_heads
    n_kv = 1 if cfg["multi_query"] else n_heads
    config = transformers.FalconConfig(
        vocab_size=FALCON_VOCAB, hidden_size=dim, num_hidden_layers=cfg["num_layers"], num_attention_heads=n_heads,
        num_kv_heads=n_kv, new_decoder_architecture=cfg["new_decoder_architecture"],
        multi_query=cfg["multi_query"], parallel_attn=cfg["parallel_attn"] or cfg["new_decoder_architecture"],
        bias=cfg["bias"], layer_norm_epsilon=cfg["layer_norm_epsilon"], alibi=False, tie_word_embeddings=False,
        max_position_embeddings=512, attn_implementation="eager",
        rope_parameters=({"rope_type": "default", "rope_theta": float(cfg["rope_theta"])} if not cfg["rope_scaling"]
                         else {"rope_type": "linear", "factor": 1.0 / cfg["rope_scaling"],
                               "rope_theta": float(cfg["rope_theta"])}))
    model = transformers.FalconForCausalLM(config).eval()

    def fuse(q, k, v):
        """Rows (or bias entries) of query_key_value from wq/wk/wv's, per HF's _split_heads."""
        tail = q.shape[1:]
        q, k, v = q.view(n_heads, hd, *tail), k.view(n_kv, hd, *tail), v.view(n_kv, hd, *tail)
        if cfg["new_decoder_architecture"]:
            groups = q.view(n_kv, n_heads // n_kv, hd, *tail)
            return torch.cat((groups, k[:, None], v[:, None]), dim=1).reshape(-1, *tail)
        if cfg["multi_query"]:
            return torch.cat((q, k, v), dim=0).reshape(-1, *tail)
        return torch.stack((q, k, v), dim=1).reshape(-1, *tail)

    hf = {"transformer.word_embeddings.weight": state["word_embeddings.weight"],
          "transformer.ln_f.weight": state["ln_f.weight"], "transformer.ln_f.bias": state["ln_f.bias"],
          "lm_head.weight": state["output.weight"]}
    for i in range(cfg["num_layers"]):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        for kind in (("weight", "bias") if cfg["bias"] else ("weight",)):
            attn = p + "self_attention."
            hf[q + "self_attention.query_key_value." + kind] = fuse(
                state[attn + "wq." + kind], state[attn + "wk." + kind], state[attn + "wv." + kind])
            hf[q + "self_attention.dense." + kind] = state[attn + "dense." + kind]
            hf[q + "mlp.dense_h_to_4h." + kind] = state[p + "mlp.dense_h_to_4h." + kind]
            hf[q + "mlp.dense_4h_to_h." + kind] = state[p + "mlp.dense_4h_to_h." + kind]
        for norm in ("ln_attn", "ln_mlp", "input_layernorm", "post_attention_layernorm"):
            for kind in ("weight", "bias"):
                if p + norm + "." + kind in state:
                    hf[q + norm + "." + kind] = state[p + norm + "." + kind]
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


FALCON_CASES = [(name, mp) for name in FALCON_CONFIGS for mp in (1, 2)]


@pytest.fixture(scope="module", params=FALCON_CASES, ids=lambda p: f"{p[0]}-mp{p[1]}")
def falcon_case(request, tmp_path_factory):
    name, mp = request.param
    cfg = falcon_full_config(FALCON_CONFIGS[name])
    state = random_state(falcon_shapes(cfg), seed=len(name) + mp)
    directory = write_original_checkpoint(tmp_path_factory.mktemp(f"falcon_{name}_mp{mp}"), state, cfg,
                                          "falcon", "falcon", falcon_split_dim(cfg), mp=mp)
    return load(directory), hf_falcon(state, cfg), cfg


def test_falcon_args_are_the_originals():
    from dataclasses import asdict
    from accessory.model.LLM.falcon import ModelArgs
    assert asdict(ModelArgs()) == FALCON_DEFAULTS
    assert list(asdict(ModelArgs())) == list(FALCON_DEFAULTS)  # config.json key order
    assert ModelArgs.initializer_range == 0.02  # a class attribute, not a field


def test_falcon_logits_match_hf(falcon_case):
    model, hf, _ = falcon_case
    for text, logits in zip(TEXTS, model.compute_logits(TEXTS)):
        ids = model.tokenizer.encode(text, bos=model.tokenizer.add_bos, eos=False)
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0]
        assert logits.shape == expected.shape == (len(ids), FALCON_VOCAB)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_falcon_greedy_matches_hf(falcon_case):
    model, hf, _ = falcon_case

    def hf_new_tokens(ids, n_new):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                              eos_token_id=model.tokenizer.eos_id, pad_token_id=model.tokenizer.eos_id)
        return out[0, len(ids):].tolist()
    assert_greedy_matches(model, TEXTS[:2], hf_new_tokens)


def test_falcon_cache_holds_the_built_kv_heads(falcon_case):
    model, _, cfg = falcon_case
    n_kv = 1 if cfg["multi_query"] else cfg["num_attention_heads"]
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert model.llma.new_kv_cache(2, 8).keys[0].shape == (2, n_kv, 8, hd)
    assert model.llma.layers[0].self_attention.wk.weight.shape == (n_kv * hd, cfg["hidden_size"])
    assert_cache_matches_full_forward(model, model.tokenizer.encode(TEXTS[2], bos=False, eos=False))
    # The built model's own split plan knows whether wk/wv are replicated.
    kv_dim = model.llma.split_plan.shard_dim("layers.0.self_attention.wk.weight")
    assert kv_dim == (None if cfg["multi_query"] else 0)


def test_falcon_evaluate_examples(falcon_case):
    model, hf, _ = falcon_case
    context, example = "Once upon a time,", TEXTS[2]
    result = model.evaluate_examples([example], contexts=[context])
    ids = model.tokenizer.encode(example, bos=False, eos=False)
    start = len(model.tokenizer.encode(context, bos=False, eos=False)) - 1
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, start:-1]
    nll = F.cross_entropy(logits, torch.tensor(ids[start + 1:]), reduction="none", ignore_index=0)
    assert result["log_likelihood"][0] == pytest.approx(-nll.sum().item(), abs=1e-3)
    assert result["ppl"][0] == pytest.approx(nll.mean().item(), abs=1e-4)


def test_falcon_kv_merge_one_head_per_rank():
    """With heads == mp a multi-query replica and an MHA column piece have the same shape:
    identical pieces are replicas, differing pieces are joined."""
    from accessory.model.LLM.falcon import Transformer
    plan = Transformer.split_plan
    gen = torch.Generator().manual_seed(0)
    replica = torch.randn(8, 16, generator=gen)  # hd=8, D=16, 2 heads, mp=2
    assert plan.merge("layers.0.self_attention.wk.weight", [replica, replica.clone()]) is replica
    pieces = [torch.randn(8, 16, generator=gen) for _ in range(2)]
    assert plan.merge("layers.0.self_attention.wv.weight", pieces).shape == (16, 16)
    # Shapes alone decide when they can: 4 rows of 16 per rank can only be replicas at mp=2.
    differing = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    assert plan.merge("layers.0.self_attention.wk.weight", differing) is differing[0]
    assert plan.merge("layers.0.self_attention.wq.weight", differing).shape == (8, 16)


# =========================================================================== config errors

@pytest.mark.parametrize("llama_type, extra", [("falcon", "initializer_range"), ("internlm", "n_heads")])
def test_unknown_config_field_names_field_and_architecture(tmp_path, llama_type, extra):
    if llama_type == "falcon":
        cfg = falcon_full_config(FALCON_CONFIGS["7b_multi_query_parallel"])
        state = random_state(falcon_shapes(cfg), seed=0)
        split, tokenizer = falcon_split_dim(cfg), "falcon"
    else:
        cfg = internlm_full_config(INTERNLM_CONFIGS["rmsnorm"])
        state = random_state(internlm_shapes(cfg), seed=0)
        split, tokenizer = internlm_split_dim, "llama-spm"
    directory = write_original_checkpoint(tmp_path / "ckpt", state, {**cfg, extra: 1}, llama_type, tokenizer, split)
    with pytest.raises(ConfigError) as info:
        load(directory)
    assert extra in str(info.value) and repr(llama_type) in str(info.value)


@pytest.mark.parametrize("architecture", ["internlm", "falcon"])
@pytest.mark.parametrize("layout", ["panels", "rows"])
def test_a_bf16_model_gives_unrounded_float32_logits(architecture, layout, tmp_path, monkeypatch):
    """As llama's: loaded in bf16 on the CPU, the head (in panels, or a native bf16 linear in rows)
    returns its float32 sums, not rounded to bf16, within bf16 error of the float32 model's."""
    from accessory.model.layers.panel_linear import PanelLinear, panels_wanted
    from accessory.kernels.linear import NativeLinear
    if layout == "panels" and not panels_wanted():
        pytest.skip("weights are held in panels only on CPUs with AVX512-BF16 (and no AMX)")
    monkeypatch.setenv("ACCESSORY_PANELS", "1" if layout == "panels" else "0")
    if architecture == "internlm":
        cfg = internlm_full_config(INTERNLM_CONFIGS["rmsnorm"])
        state = random_state(internlm_shapes(cfg), seed=5)
        directory = write_original_checkpoint(tmp_path, state, cfg, "internlm", "llama-spm", internlm_split_dim)
    else:
        cfg = falcon_full_config(FALCON_CONFIGS["7b_multi_query_parallel"])
        state = random_state(falcon_shapes(cfg), seed=5)
        directory = write_original_checkpoint(tmp_path, state, cfg, "falcon", "falcon", falcon_split_dim(cfg))
    bf16 = MetaModel.from_pretrained(str(directory), dtype=torch.bfloat16, device="cpu", max_seq_len=64,
                                     progress=False)
    head = bf16.llma.head if architecture == "internlm" else bf16.llma.output
    assert type(head) is (PanelLinear if layout == "panels" else NativeLinear)
    ids = torch.tensor([bf16.tokenizer.encode(TEXTS[0], bos=bf16.tokenizer.add_bos, eos=False)])
    with torch.inference_mode():
        got = bf16.llma.forward_tokens(ids)
        want = load(directory).llma.forward_tokens(ids)
    assert got.dtype is torch.float32
    assert (got != got.bfloat16().float()).any()  # not rounded to bf16
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)
