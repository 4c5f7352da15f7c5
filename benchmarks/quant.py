"""Quantized inference on the CPU: decode speed, quality and load memory, against our own bf16.

    python benchmarks/quant.py [--threads 2] [--schemes int8 int4 nf4] [--skip-speed] [--skip-quality]
                               [--memory-shapes S] [--new-tokens 32]

* speed: single-stream decode tok/s and 16-stream aggregate tok/s on the S shape (TinyLlama-1.1B,
  random weights, as benchmarks/decode.py), each scheme as a ratio to bf16 in the same run.
* quality: perplexity (exp of the mean token NLL from ``MetaModel.evaluate_examples``) of the
  embedded SmolLM2-135M-Instruct on a fixed English text, per scheme, and its increase over bf16.
* memory: peak resident memory (VmHWM) of a fresh process that loads the checkpoint with
  ``quant=`` and runs one forward, against the file size and the packed size. ``--memory-shapes 7B``
  writes a 13 GB random Llama-2-7B checkpoint first (minutes) to check the 5 GB int4 target.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode import SHAPES, build_checkpoint, measure_interleaved, ours_runner  # noqa: E402

from accessory.model.meta import MetaModel  # noqa: E402

MEMORY_SHAPES = dict(SHAPES, **{"7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, multiple_of=256,
                                           norm_eps=1e-5)})

TEXT = """\
The river town woke slowly on market days. Before the sun cleared the hills, the baker had already
pulled the first loaves from the oven, and the smell of bread drifted down the narrow street toward
the water. Fishermen mended their nets on the stone steps of the quay, talking about the weather and
the price of diesel, while their children chased gulls between the stacked crates. By eight o'clock
the square was full. Farmers from the valley sold apples, cheese and honey from the backs of their
vans; an old man played the accordion beside the fountain; and the schoolteacher, who had lived in
the town for forty years, walked from stall to stall greeting everyone by name. Nobody was in a hurry.
In the afternoon the wind changed, clouds gathered over the estuary, and the first drops of rain sent
the traders scrambling to cover their goods. Within an hour the square was empty again, the cobbles
shining under the street lamps, and the only sound was the water running in the gutters toward the
river. Scientists describe rain as the condensation of water vapour around tiny particles of dust or
salt; each droplet grows by colliding with others until it is heavy enough to fall. A typical raindrop
is about two millimetres across and falls at roughly six metres per second. The same physics explains
why coastal towns see so much drizzle: the air above the sea carries both moisture and salt.
"""


def speed(args) -> None:
    """Every scheme loaded at once, then measured in interleaved rounds (decode.measure_interleaved)."""
    directory = build_checkpoint("S", Path(args.workdir))
    schemes = ["bf16", *args.schemes]
    runners = {}
    for scheme in schemes:
        model = MetaModel.from_pretrained(str(directory), max_seq_len=512, dtype=torch.bfloat16, device="cpu",
                                          quant=None if scheme == "bf16" else scheme, progress=False)
        runners[scheme] = ours_runner(model)
    rates = measure_interleaved("S", runners, args.new_tokens, args.repeats, metrics=("decode", "batch16"))
    rows = {scheme: rates["S", scheme] for scheme in schemes}
    print(f"\nS shape (1.1B), {args.threads} threads, {args.new_tokens} new tokens, median of {args.repeats} "
          f"interleaved rounds")
    print(f"{'weights':<10}{'decode tok/s':>13}{'x bf16':>8}{'batch16 tok/s':>15}{'x bf16':>8}")
    for scheme, r in rows.items():
        print(f"{scheme:<10}{r['decode']:>13.1f}{r['decode'] / rows['bf16']['decode']:>8.2f}"
              f"{r['batch16']:>15.1f}{r['batch16'] / rows['bf16']['batch16']:>8.2f}")


@torch.inference_mode()
def decode_perplexity(model: MetaModel, ids) -> float:
    """Perplexity of ``ids`` fed one token per step through the KV cache: the decode kernels'
    products (which quantize the activations per block of 32 for int8/int4), where
    ``evaluate_examples`` runs the whole text as one prefill."""
    llma = model.llma
    cache = llma.new_kv_cache(1, len(ids))
    nll, scored = 0.0, 0
    for t in range(len(ids) - 1):
        logits = llma.forward_tokens(torch.tensor([[ids[t]]]), torch.tensor([[t]]), cache)
        if ids[t + 1] != 0:  # as evaluate_examples, which ignores label 0
            nll -= torch.log_softmax(logits[0, -1].float(), dim=-1)[ids[t + 1]].item()
            scored += 1
    return math.exp(nll / scored)


def quality(args) -> None:
    from accessory.checkpoint.demo_model import ensure_demo_model
    directory = ensure_demo_model()
    results = {}
    ids = None
    for scheme in ["bf16", *args.schemes]:
        model = MetaModel.from_pretrained(str(directory), max_seq_len=2048, dtype=torch.bfloat16, device="cpu",
                                          quant=None if scheme == "bf16" else scheme, progress=False)
        ids = model.tokenizer.encode(TEXT, bos=True, eos=False)
        nll = model.evaluate_examples([ids])["ppl"][0]  # the original's "ppl" is the mean NLL
        results[scheme] = (math.exp(nll), decode_perplexity(model, ids))
        del model
    print(f"\nSmolLM2-135M-Instruct perplexity on a fixed {len(ids)}-token English text (bf16 activations):")
    print("prefill = the whole text in one forward (evaluate_examples); decode = one token per step "
          "through the KV cache (the decode kernels)")
    print(f"{'weights':<10}{'prefill':>9}{'increase':>10}{'decode':>9}{'increase':>10}")
    base = results["bf16"]
    for scheme, (prefill, decode) in results.items():
        print(f"{scheme:<10}{prefill:>9.3f}{prefill / base[0] - 1:>10.1%}{decode:>9.3f}{decode / base[1] - 1:>10.1%}")


CHILD = r"""
import sys, json, time, torch
path, quant = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
def peak_mb():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
base = peak_mb()
from accessory.model.meta import MetaModel
t0 = time.perf_counter()
model = MetaModel.from_pretrained(path, max_seq_len=256, dtype=torch.bfloat16, device="cpu", progress=False,
                                  quant=None if quant == "bf16" else quant)
load_s = time.perf_counter() - t0
after_load = peak_mb()
with torch.inference_mode():
    model.llma.forward_tokens(torch.ones(1, 8, dtype=torch.long))
packed = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"base": base, "load": after_load, "forward": peak_mb(), "load_s": load_s, "model_mb": packed}))
"""


def make_big_checkpoint(shape: str, root: Path) -> Path:
    if shape in SHAPES:
        return build_checkpoint(shape, root)
    directory = root / shape
    shard = directory / "consolidated.00-of-01.model.pth"
    if shard.exists():
        return directory
    import shutil
    from decode import TOKENIZER
    from accessory.model.LLM.llama import ModelArgs, Transformer
    cfg = MEMORY_SHAPES[shape]
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(ModelArgs(**cfg, vocab_size=32000)).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, s in shapes.items():  # drawn in bf16-sized pieces to keep this process small
        value = torch.empty(s, dtype=torch.bfloat16)
        for start in range(0, s[0], 1024):
            value[start:start + 1024] = torch.randn((min(1024, s[0] - start), *s[1:]), generator=gen) * 0.02
        state["llma." + key] = value
    torch.save({"model": state}, shard)
    del state
    (directory / "config.json").write_text(json.dumps(cfg))
    (directory / "meta.json").write_text(json.dumps({"llama_type": "llama"}))
    shutil.copy(TOKENIZER / "tokenizer.model", directory / "tokenizer.model")
    return directory


def memory(args) -> None:
    for shape in args.memory_shapes:
        directory = make_big_checkpoint(shape, Path(args.workdir))
        file_mb = (directory / "consolidated.00-of-01.model.pth").stat().st_size / 2**20
        print(f"\n{shape}: peak resident memory of a process loading the {file_mb:.0f} MiB bf16 checkpoint")
        print(f"{'weights':<10}{'load s':>8}{'model MiB':>11}{'peak MiB':>10}{'peak/model':>11}{'peak/file':>10}")
        for scheme in ["bf16", *args.schemes]:
            out = subprocess.run([sys.executable, "-c", CHILD, str(directory), scheme], capture_output=True,
                                 text=True, check=True, cwd=Path(__file__).resolve().parents[1])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{scheme:<10}{r['load_s']:>8.1f}{r['model_mb']:>11.0f}{r['forward']:>10.0f}"
                  f"{r['forward'] / r['model_mb']:>11.2f}{r['forward'] / file_mb:>10.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schemes", nargs="+", default=["int8", "int4", "int4-g64", "nf4"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--memory-shapes", nargs="*", default=["S"], choices=list(MEMORY_SHAPES))
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "accessory-bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not args.skip_quality:
        quality(args)
    if not args.skip_speed:
        speed(args)
    if args.memory_shapes:
        memory(args)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
