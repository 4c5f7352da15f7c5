"""Decode and prefill speed of Accessory's engine against HF transformers on the same random weights.

    python benchmarks/decode.py [--shapes XS S] [--threads 2] [--new-tokens 64] [--repeats 3]

Shapes: XS (dim 768, 12 layers, 12 heads, FFN 2048, vocab 32000) and S (TinyLlama-1.1B: dim 2048,
22 layers, 32 heads, 4 KV heads, FFN 5632). Both run in bf16. Rates are medians over repeats:
  decode  = tokens/s of one stream after the prompt (time(N+1 tokens) - time(1 token)) / N
  prefill = prompt tokens/s for a 128-token prompt
  batch16 = aggregate new tokens/s of 16 streams decoding together
Prints a table with accessory / HF ratios.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accessory.generation.engine import GenerationEngine  # noqa: E402
from accessory.generation.sampling import SamplingParams  # noqa: E402
from accessory.model.LLM.llama import ModelArgs, Transformer, ffn_hidden_dim  # noqa: E402
from accessory.model.meta import MetaModel  # noqa: E402

SHAPES = {
    "XS": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, multiple_of=2048, norm_eps=1e-5),
    "S": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256, norm_eps=1e-5),
}
VOCAB = 32000
TOKENIZER = Path(os.environ.get("ACCESSORY_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "fixtures" / \
    "tokenizers" / "llama-spm"


def build_checkpoint(shape: str, root: Path) -> Path:
    cfg = SHAPES[shape]
    directory = root / shape
    if (directory / "consolidated.00-of-01.model.pth").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(ModelArgs(**cfg, vocab_size=VOCAB)).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, s in shapes.items():
        value = 1 + 0.1 * torch.randn(s, generator=gen) if key.endswith("norm.weight") else \
            torch.randn(s, generator=gen) / (s[1] ** 0.5 if key != "tok_embeddings.weight" else 1)
        state["llma." + key] = value.to(torch.bfloat16)
    torch.save({"model": state}, directory / "consolidated.00-of-01.model.pth")
    (directory / "config.json").write_text(json.dumps(cfg))
    (directory / "meta.json").write_text(json.dumps({"llama_type": "llama"}))
    shutil.copy(TOKENIZER / "tokenizer.model", directory / "tokenizer.model")
    return directory


def to_hf(model: MetaModel):
    import transformers
    a = model.args
    n_kv = a.n_kv_heads or a.n_heads
    config = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
        num_key_value_heads=n_kv, intermediate_size=ffn_hidden_dim(a.dim, a.multiple_of, a.ffn_dim_multiplier),
        rms_norm_eps=a.norm_eps, max_position_embeddings=a.max_seq_len, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(a.rope_theta)}, dtype=torch.bfloat16)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    sd = model.llma.state_dict()

    def rotate(w, heads):
        return w.view(heads, w.shape[0] // heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
    mapped = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
              "lm_head.weight": sd["output.weight"]}
    for i in range(a.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        mapped.update({
            q + "self_attn.q_proj.weight": rotate(sd[p + "attention.wq.weight"], a.n_heads),
            q + "self_attn.k_proj.weight": rotate(sd[p + "attention.wk.weight"], n_kv),
            q + "self_attn.v_proj.weight": sd[p + "attention.wv.weight"],
            q + "self_attn.o_proj.weight": sd[p + "attention.wo.weight"],
            q + "mlp.gate_proj.weight": sd[p + "feed_forward.w1.weight"],
            q + "mlp.down_proj.weight": sd[p + "feed_forward.w2.weight"],
            q + "mlp.up_proj.weight": sd[p + "feed_forward.w3.weight"],
            q + "input_layernorm.weight": sd[p + "attention_norm.weight"],
            q + "post_attention_layernorm.weight": sd[p + "ffn_norm.weight"]})
    hf.load_state_dict({k: v.contiguous().clone() for k, v in mapped.items()}, assign=True, strict=False)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config)  # rebuild its buffers off the meta device
    return hf.eval()


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prompts(batch: int, length: int):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(100, VOCAB, (batch, length), generator=gen)


def ours_runner(model: MetaModel):
    engine = GenerationEngine(model.llma, model.tokenizer, eos_ids=[])  # no early stop on random weights

    def run(ids: torch.Tensor, new_tokens: int):
        for _ in engine.run(ids.tolist(), [new_tokens] * ids.shape[0], SamplingParams()):
            pass
    return run


def hf_runner(hf):
    def run(ids: torch.Tensor, new_tokens: int):
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return run


def measure(run, new_tokens: int, repeats: int) -> dict:
    one = prompts(1, 16)
    t1 = median_time(lambda: run(one, 1), repeats)
    tn = median_time(lambda: run(one, new_tokens + 1), repeats)
    long_prompt = prompts(1, 128)
    tp = median_time(lambda: run(long_prompt, 1), repeats)
    batch = prompts(16, 16)
    b1 = median_time(lambda: run(batch, 1), repeats)
    bn = median_time(lambda: run(batch, new_tokens + 1), repeats)
    return {"decode": new_tokens / (tn - t1), "prefill": 128 / tp, "batch16": 16 * new_tokens / (bn - b1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["XS", "S"], choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "accessory-bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:
        directory = build_checkpoint(shape, Path(args.workdir))
        model = MetaModel.from_pretrained(str(directory), max_seq_len=512, dtype=torch.bfloat16, device="cpu")
        ours = measure(ours_runner(model), args.new_tokens, args.repeats)
        hf = measure(hf_runner(to_hf(model)), args.new_tokens, args.repeats)
        rows.append((shape, ours, hf))
        del model
    print(f"\n{args.threads} threads, bf16, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'shape':<6}{'metric':<9}{'accessory tok/s':>16}{'HF tok/s':>10}{'ratio':>7}")
    for shape, ours, hf in rows:
        for metric in ("decode", "prefill", "batch16"):
            print(f"{shape:<6}{metric:<9}{ours[metric]:>16.1f}{hf[metric]:>10.1f}{ours[metric] / hf[metric]:>7.2f}")


if __name__ == "__main__":
    main()
