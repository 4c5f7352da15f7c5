"""HF InternLMForCausalLM (remote code, ``model_type: "internlm"``) <-> Accessory ``internlm`` conversion.

transformers ships no InternLM class, so the HF side is written by hand here: random tensors under
InternLM's HF names in ``model.safetensors`` plus a ``config.json``. Converted at mp 1 and 2 and
loaded with ``MetaModel.from_pretrained``, the logits must equal a float64 forward written below
directly on the HF-named weights (rotate-half RoPE, RMSNorm, SwiGLU, biased q/k/v/o). Converting
back and forth must be exact; InternLM2 and other configs ``internlm`` cannot hold are refused.
"""

import json
import math
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

from accessory.checkpoint.hf import accessory_to_hf, hf_to_accessory  # noqa: E402
from accessory.checkpoint.hf_internlm import ffn_args_for_intermediate  # noqa: E402
from accessory.errors import CheckpointError, ConfigError  # noqa: E402
from accessory.model.LLM.internlm import ffn_hidden_dim  # noqa: E402
from accessory.model.meta import MetaModel  # noqa: E402

from ckpt_utils import tokenizer_fixture  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "Once upon a time, in a land far away,"]
VOCAB = 32000  # the llama-spm fixture's


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BASE = dict(architectures=["InternLMForCausalLM"], model_type="internlm", vocab_size=VOCAB, hidden_size=64,
            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, hidden_act="silu",
            rms_norm_eps=1e-6, max_position_embeddings=256, bias=True, tie_word_embeddings=False)

VARIANTS = {
    # InternLM-7B's layout: biases, untied head, FFN width not from the 8/3 rule
    "bias": {},
    # no biases (zero biases on the Accessory side), tied embeddings, the 8/3-and-256 FFN width
    "no_bias_tied": dict(bias=False, tie_word_embeddings=True, intermediate_size=256),
    # InternLM's own rotary field (dynamic NTK, base) instead of rope_theta
    "rotary_dynamic": dict(rotary={"base": 50000, "type": "dynamic"}, rms_norm_eps=1e-5),
    # rope_theta given outright
    "rope_theta": dict(rope_theta=1000000.0, intermediate_size=160),
}


def hf_shapes(cfg: Dict) -> Dict[str, tuple]:
    dim, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, dim)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (dim, dim)
            if cfg["bias"]:
                shapes[p + f"self_attn.{proj}.bias"] = (dim,)
        shapes.update({p + "mlp.gate_proj.weight": (ffn, dim), p + "mlp.up_proj.weight": (ffn, dim),
                       p + "mlp.down_proj.weight": (dim, ffn), p + "input_layernorm.weight": (dim,),
                       p + "post_attention_layernorm.weight": (dim,)})
    return shapes


def make_hf(directory: Path, seed: int = 0, **overrides) -> Path:
    """An HF InternLM directory: random weights of unit-ish scale, config.json, the llama-spm tokenizer."""
    cfg = {**BASE, **overrides}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in hf_shapes(cfg).items():
        if "norm" in name:
            state[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("bias"):
            state[name] = 0.1 * torch.randn(shape, generator=gen)
        else:
            state[name] = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    source = tokenizer_fixture("llama-spm")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, directory / name)
    return directory


# --------------------------------------------------------------------------- the reference forward

def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_logits(hf_dir: Path, ids: List[int]) -> torch.Tensor:
    """InternLMForCausalLM's forward in float64 on the HF-named weights, no cache: (seq, vocab)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = {k: v.double() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hd, eps = dim // n_heads, cfg["rms_norm_eps"]
    theta = cfg.get("rope_theta", (cfg.get("rotary") or {}).get("base", 10000.0))
    seq = len(ids)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]  # (seq, 1, hd)
    mask = torch.full((seq, seq), float("-inf"), dtype=torch.float64).triu(1)

    def linear(x, name):
        out = x @ sd[name + ".weight"].T
        return out + sd[name + ".bias"] if name + ".bias" in sd else out

    x = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        q, k, v = (linear(h, p + f"self_attn.{n}").view(seq, n_heads, hd) for n in ("q_proj", "k_proj", "v_proj"))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(seq, dim)
        x = x + linear(attn, p + "self_attn.o_proj")
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        x = x + linear(F.silu(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return _rms(x, sd["model.norm.weight"], eps) @ head.T


def load_shards(directory: Path, mp: int) -> List[Dict[str, torch.Tensor]]:
    return [torch.load(directory / f"consolidated.{r:02d}-of-{mp:02d}.model.pth", weights_only=True)["model"]
            for r in range(mp)]


def assert_same_shards(a: Path, b: Path, mp: int) -> None:
    for sa, sb in zip(load_shards(a, mp), load_shards(b, mp)):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------- tests

@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_dir(request, tmp_path_factory):
    return make_hf(tmp_path_factory.mktemp(f"hf_internlm_{request.param}"), **VARIANTS[request.param])


@pytest.mark.parametrize("mp", [1, 2])
def test_hf_to_accessory_logits_match_reference(hf_dir, tmp_path, mp):
    out = hf_to_accessory(hf_dir, tmp_path / "acc", mp=mp, progress=False)
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    assert json.loads((out / "meta.json").read_text()) == {"llama_type": "internlm"}
    config = json.loads((out / "config.json").read_text())
    assert ffn_hidden_dim(config["hidden_size"], config["mlp_ratio"], config["multiple_of"]) == \
        hf_cfg["intermediate_size"]
    assert config["layer_norm_epsilon"] == hf_cfg["rms_norm_eps"] and config["norm_type"] == "rmsnorm"
    shards = load_shards(out, mp)
    dim = hf_cfg["hidden_size"]
    assert shards[0]["llma.layers.0.mixer.Wqkv.weight"].shape == (3 * dim // mp, dim)
    assert shards[0]["llma.layers.0.mixer.out_proj.bias"].shape == (dim,)
    if mp == 1:  # Wqkv rows are cat(q, k, v); the MLP's w1/w2/w3 are gate/up/down
        hf = load_file(str(hf_dir / "model.safetensors"))
        acc = shards[0]
        q, k, v = (hf[f"model.layers.1.self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj"))
        assert torch.equal(acc["llma.layers.1.mixer.Wqkv.weight"], torch.cat((q, k, v)))
        assert torch.equal(acc["llma.layers.1.mlp.w2.weight"], hf["model.layers.1.mlp.up_proj.weight"])
        assert torch.equal(acc["llma.layers.1.mlp.w3.weight"], hf["model.layers.1.mlp.down_proj.weight"])
        if not hf_cfg["bias"]:
            assert not acc["llma.layers.1.mixer.Wqkv.bias"].any()
            assert not acc["llma.layers.1.mixer.out_proj.bias"].any()
        if hf_cfg["tie_word_embeddings"]:
            assert torch.equal(acc["llma.head.weight"], acc["llma.embedding.weight"])
    model = MetaModel.from_pretrained(str(out), max_seq_len=128, dtype=torch.float32, device="cpu")
    for text, logits in zip(TEXTS, model.compute_logits(TEXTS)):
        ids = model.tokenizer.encode(text, bos=model.tokenizer.add_bos, eos=False)
        expected = reference_logits(hf_dir, ids).float()
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mp", [1, 2])
def test_round_trips_are_exact(hf_dir, tmp_path, mp):
    acc = hf_to_accessory(hf_dir, tmp_path / "acc", mp=mp, progress=False)
    back = accessory_to_hf(acc, tmp_path / "back", progress=False)
    original_cfg = json.loads((hf_dir / "config.json").read_text())
    written = json.loads((back / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == ("internlm", ["InternLMForCausalLM"])
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert written[key] == original_cfg[key], key
    theta = original_cfg.get("rope_theta", (original_cfg.get("rotary") or {}).get("base", 10000.0))
    assert written["rope_theta"] == theta and written["bias"] is True
    # HF -> Accessory -> HF: the same tensors (zero biases added where the original had none)
    original, again_hf = load_file(str(hf_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
    for name, tensor in original.items():
        assert torch.equal(again_hf[name], tensor), name
    for name in set(again_hf) - set(original):
        assert name.endswith(".bias") and not original_cfg["bias"] and not again_hf[name].any(), name
    # Accessory -> HF -> Accessory: the same shards
    again = hf_to_accessory(back, tmp_path / "again", mp=mp, progress=False)
    assert_same_shards(acc, again, mp)
    assert json.loads((again / "config.json").read_text()) == json.loads((acc / "config.json").read_text())


def test_bf16_dtype_round_trip(tmp_path):
    src = make_hf(tmp_path / "hf")
    acc = hf_to_accessory(src, tmp_path / "acc", dtype=torch.bfloat16, mp=2, progress=False)
    assert all(t.dtype == torch.bfloat16 for s in load_shards(acc, 2) for t in s.values())
    back = accessory_to_hf(acc, tmp_path / "back", progress=False)
    again = hf_to_accessory(back, tmp_path / "again", mp=2, progress=False)
    assert_same_shards(acc, again, 2)


def test_sharded_hf_checkpoint(tmp_path):
    """q, k and v of one layer in different safetensors files still fuse into one Wqkv."""
    src = make_hf(tmp_path / "hf")
    state = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(state)
    files = {"model-00001-of-00002.safetensors": [n for n in names if "k_proj" not in n],
             "model-00002-of-00002.safetensors": [n for n in names if "k_proj" in n]}
    for file, keys in files.items():
        save_file({k: state[k] for k in keys}, str(src / file))
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in files.items() for k in keys}}))
    single = make_hf(tmp_path / "single")
    a = hf_to_accessory(src, tmp_path / "a", mp=2, progress=False)
    b = hf_to_accessory(single, tmp_path / "b", mp=2, progress=False)
    assert_same_shards(a, b, 2)


@pytest.mark.parametrize("dim, hidden", [(4096, 11008), (64, 96), (64, 256), (64, 160), (5120, 13824),
                                         (48, 1), (7, 1000), (4096, 14336), (2048, 5632)])
def test_ffn_args_reproduce_intermediate_size(dim, hidden):
    mlp_ratio, multiple_of = ffn_args_for_intermediate(dim, hidden)
    assert ffn_hidden_dim(dim, mlp_ratio, multiple_of) == hidden
    if (dim, hidden) == (4096, 11008):  # InternLM-7B keeps the original's defaults
        assert (mlp_ratio, multiple_of) == (8 / 3, 256)


def _write_config(tmp_path: Path, **change) -> Path:
    src = tmp_path / "hf"
    src.mkdir(exist_ok=True)
    (src / "config.json").write_text(json.dumps({**BASE, **change}))
    return src


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["InternLM2ForCausalLM"]}, "InternLM2"),
    ({"num_key_value_heads": 2}, "num_key_value_heads = 2"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ({"rotary": {"base": 10000, "type": "yarn"}}, "rotary type 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"hidden_size": 66}, "not divisible"),
])
def test_unrepresentable_configs_refused(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        hf_to_accessory(_write_config(tmp_path, **change), tmp_path / "out", progress=False)


def test_internlm2_model_type_refused(tmp_path):
    src = _write_config(tmp_path, model_type="internlm2", architectures=["InternLM2ForCausalLM"])
    with pytest.raises(CheckpointError, match="model_type is 'internlm2'.*'internlm' \\(InternLMForCausalLM\\)"):
        hf_to_accessory(src, tmp_path / "out", progress=False)


def test_internlm2_tensor_layout_refused(tmp_path):
    """InternLM2 weights (packed attention.wqkv) under a first-generation config are refused by name."""
    src = _write_config(tmp_path)
    save_file({"model.tok_embeddings.weight": torch.zeros(VOCAB, 64),
               "model.layers.0.attention.wqkv.weight": torch.zeros(192, 64)}, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match="InternLM2's layout"):
        hf_to_accessory(src, tmp_path / "out", progress=False)


def test_missing_qkv_part_refused(tmp_path):
    src = make_hf(tmp_path / "hf")
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.1.self_attn.v_proj.weight"]
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mixer\.Wqkv\.weight is built from 3 HF tensors"):
        hf_to_accessory(src, tmp_path / "out", progress=False)


def test_missing_lm_head_without_tie_refused(tmp_path):
    src = make_hf(tmp_path / "hf")
    state = load_file(str(src / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no lm_head.weight"):
        hf_to_accessory(src, tmp_path / "out", progress=False)


def test_mp_must_divide_heads(tmp_path):
    with pytest.raises(ConfigError, match="num_attention_heads = 4 cannot be split over mp = 3"):
        hf_to_accessory(make_hf(tmp_path / "hf"), tmp_path / "out", mp=3, progress=False)


@pytest.mark.parametrize("change, message", [({"norm_type": "layernorm"}, "LayerNorm"),
                                             ({"rope_scaling": 0.5}, "rope_scaling")])
def test_to_hf_refuses_what_hf_internlm_lacks(tmp_path, change, message):
    acc = hf_to_accessory(make_hf(tmp_path / "hf"), tmp_path / "acc", progress=False)
    config = json.loads((acc / "config.json").read_text())
    config.update(change)
    (acc / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        accessory_to_hf(acc, tmp_path / "back", progress=False)
