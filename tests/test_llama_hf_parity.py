"""The llama architecture against HF transformers' LlamaForCausalLM on the same weights.

Checkpoints are written the way the original code writes them (keys from ORIGINAL.md, the
``{"model": ...}`` wrapper, ``llma.`` prefix, model-parallel shards cut by its split rules), then
loaded through the public ``MetaModel.from_pretrained``.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from accessory.model.meta import MetaModel  # noqa: E402

from ckpt_utils import expected_evaluation, llama_ffn_dim, random_llama_state, write_checkpoint  # noqa: E402


def permute_to_rotate_half(w, n_heads):
    """Meta's interleaved q/k rows -> HF's rotate-half order."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_model(state, cfg, vocab, max_pos):
    n_heads = cfg["n_heads"]
    n_kv = cfg.get("n_kv_heads") or n_heads
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    if cfg.get("rope_scaling"):
        rope = {"rope_type": "linear", "factor": 1.0 / cfg["rope_scaling"], "rope_theta": rope["rope_theta"]}
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=cfg["dim"], num_hidden_layers=cfg["n_layers"],
        num_attention_heads=n_heads, num_key_value_heads=n_kv,
        intermediate_size=llama_ffn_dim(cfg),
        rms_norm_eps=cfg["norm_eps"], max_position_embeddings=max_pos, tie_word_embeddings=False,
        rope_parameters=rope, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state["output.weight"]}
    for i in range(cfg["n_layers"]):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf[q + "self_attn.q_proj.weight"] = permute_to_rotate_half(state[p + "attention.wq.weight"], n_heads)
        hf[q + "self_attn.k_proj.weight"] = permute_to_rotate_half(state[p + "attention.wk.weight"], n_kv)
        hf[q + "self_attn.v_proj.weight"] = state[p + "attention.wv.weight"]
        hf[q + "self_attn.o_proj.weight"] = state[p + "attention.wo.weight"]
        hf[q + "mlp.gate_proj.weight"] = state[p + "feed_forward.w1.weight"]
        hf[q + "mlp.down_proj.weight"] = state[p + "feed_forward.w2.weight"]
        hf[q + "mlp.up_proj.weight"] = state[p + "feed_forward.w3.weight"]
        hf[q + "input_layernorm.weight"] = state[p + "attention_norm.weight"]
        hf[q + "post_attention_layernorm.weight"] = state[p + "ffn_norm.weight"]
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


CONFIGS = {
    "gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5, rope_theta=10000.0),
    "mha_theta_ffnmult": dict(dim=96, n_layers=3, n_heads=6, multiple_of=64, ffn_dim_multiplier=1.3,
                              norm_eps=1e-6, rope_theta=500000.0),
    "mqa_rope_scaling": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, multiple_of=16, norm_eps=1e-5,
                             rope_theta=10000.0, rope_scaling=0.25),
}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "Once upon a time, in a land far away,"]
VOCAB = 32000


@pytest.fixture(scope="module", params=[(name, mp) for name in CONFIGS for mp in (1, 2)],
                ids=lambda p: f"{p[0]}-mp{p[1]}")
def pair(request, tmp_path_factory):
    name, mp = request.param
    cfg = CONFIGS[name]
    state = random_llama_state(cfg, VOCAB, seed=len(name))
    directory = write_checkpoint(tmp_path_factory.mktemp(f"{name}_mp{mp}"), state, cfg, mp=mp)
    ours = MetaModel.from_pretrained(str(directory), max_seq_len=128, dtype=torch.float32, device="cpu")
    return ours, hf_model(state, cfg, VOCAB, max_pos=256)


def test_logits_match_hf(pair):
    ours, hf = pair
    for text, logits in zip(TEXTS, ours.compute_logits(TEXTS)):
        ids = ours.tokenizer.encode(text, bos=True, eos=False)
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0]
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_greedy_text_matches_hf(pair):
    ours, hf = pair
    prompts = TEXTS[:2]
    got = ours.generate(prompts, max_gen_len=12)
    for prompt, text in zip(prompts, got):
        ids = ours.tokenizer.encode(prompt, bos=True, eos=False)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                              eos_token_id=ours.tokenizer.eos_id, pad_token_id=0)
        new = out[0, len(ids):].tolist()
        if ours.tokenizer.eos_id in new:
            new = new[: new.index(ours.tokenizer.eos_id)]
        assert text == ours.tokenizer.decode(new)


def test_cached_decode_matches_full_forward(pair):
    """Step-by-step decoding through the KV cache gives the full forward's last-position logits."""
    ours, _ = pair
    ids = ours.tokenizer.encode(TEXTS[0], bos=True, eos=False)
    full = ours.llma.forward(torch.tensor([ids])).float()[0]
    cache = ours.llma.new_kv_cache(1, len(ids))
    split = 5
    step = ours.llma.forward_tokens(torch.tensor([ids[:split]]), torch.arange(split)[None], cache)
    torch.testing.assert_close(step[0].float(), full[:split], atol=1e-5, rtol=0)
    for pos in range(split, len(ids)):
        step = ours.llma.forward_tokens(torch.tensor([[ids[pos]]]), torch.tensor([[pos]]), cache)
        torch.testing.assert_close(step[0, 0].float(), full[pos], atol=1e-5, rtol=0)


def test_evaluate_examples_match_hf(pair):
    ours, hf = pair
    contexts = ["The quick brown fox", "Once upon a time,"]
    examples = [TEXTS[0], TEXTS[2]]
    result = ours.evaluate_examples(examples, contexts=contexts)
    for i, (example, context) in enumerate(zip(examples, contexts)):
        ids = ours.tokenizer.encode(example, bos=True, eos=False)
        n_context = len(ours.tokenizer.encode(context, bos=True, eos=False))
        with torch.no_grad():
            expected = expected_evaluation(hf(torch.tensor([ids])).logits[0], ids, n_context)
        assert result["log_likelihood"][i] == pytest.approx(expected["log_likelihood"], abs=1e-3)
        assert result["ppl"][i] == pytest.approx(expected["ppl"], abs=1e-4)
        assert result["max_equal"][i] == expected["max_equal"]
