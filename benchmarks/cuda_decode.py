"""Single-stream decode speed on a CUDA GPU against HF transformers, and its share of the HBM bandwidth.

    python benchmarks/cuda_decode.py [--shapes S 7B] [--new-tokens 128] [--quant int8 int4 nf4]

Weights are random (built on the GPU, no checkpoint download): the speed of a decode step does not
depend on their values. For each shape it prints decode tok/s (one stream) with ordinary launches
of the modules, with each step replayed as a CUDA graph, and replayed with the layers compiled
(model/layers/compiled_decode.py; the default), the weight bytes read per token, the bandwidth
the fastest implies, its fraction of the device's measured copy bandwidth, HF transformers'
decode tok/s on the same weights in the same run, and how many graphs were captured (one per new
KV cache: a count that grows with the runs means the captures are inside the timings).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode import SHAPES, TOKENIZER, hf_runner, prompts, to_hf  # noqa: E402

from accessory.generation.engine import GenerationEngine  # noqa: E402
from accessory.generation.sampling import SamplingParams  # noqa: E402
from accessory.model.meta import MetaModel  # noqa: E402

CUDA_SHAPES = dict(SHAPES, **{"7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, multiple_of=256,
                                         norm_eps=1e-5)})


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read and written."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (time.perf_counter() - t0)


def random_model(shape: str, root: Path, quant=None) -> MetaModel:
    """A MetaModel of ``shape`` with random weights initialised on the GPU (strict=False from a
    checkpoint holding only the final norm)."""
    import shutil
    import warnings
    directory = root / f"{shape}-stub"
    directory.mkdir(parents=True, exist_ok=True)
    cfg = CUDA_SHAPES[shape]
    torch.save({"model": {"llma.norm.weight": torch.ones(cfg["dim"])}}, directory / "consolidated.00-of-01.model.pth")
    (directory / "config.json").write_text(json.dumps(cfg))
    (directory / "meta.json").write_text(json.dumps({"llama_type": "llama"}))
    shutil.copy(TOKENIZER / "tokenizer.model", directory / "tokenizer.model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MetaModel.from_pretrained(str(directory), max_seq_len=1024, dtype=torch.bfloat16, device="cuda",
                                         strict=False, progress=False, quant=quant)


def decode_rate(run, new_tokens: int, repeats: int = 3) -> float:
    one = prompts(1, 16).cuda()
    times = {}
    for n in (1, new_tokens + 1):
        run(one, n)
        samples = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(one, n)
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        times[n] = sorted(samples)[len(samples) // 2]
    return new_tokens / (times[new_tokens + 1] - times[1])


def ours(model: MetaModel, cuda_graphs: bool, compiled: bool):
    """Decode with or without CUDA graphs and compiled layer steps (both on by default)."""
    engine = GenerationEngine(model.llma, model.tokenizer, eos_ids=[], cuda_graphs=cuda_graphs)

    def run(ids, n):
        before = os.environ.get("ACCESSORY_COMPILE")
        os.environ["ACCESSORY_COMPILE"] = "1" if compiled else "0"
        try:
            for _ in engine.run(ids.tolist(), [n] * ids.shape[0], SamplingParams()):
                pass
        finally:
            os.environ.pop("ACCESSORY_COMPILE")
            if before is not None:
                os.environ["ACCESSORY_COMPILE"] = before
    run.engine = engine
    return run


def weight_bytes(model: MetaModel) -> int:
    """Bytes a decode step reads: every parameter except the embedding table (one row is read)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "tok_embeddings" not in n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["S", "7B"], choices=list(CUDA_SHAPES))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--quant", nargs="*", default=[])
    parser.add_argument("--no-hf", action="store_true")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    root = Path(tempfile.mkdtemp())
    print(f"{'shape':<6}{'weights':<8}{'eager':>8}{'graphs':>8}{'+compile':>9}{'GB/token':>10}{'GB/s':>8}"
          f"{'of copy bw':>11}{'HF':>8}{'x HF':>7}{'captures':>9}   (tok/s)")
    for shape in args.shapes:
        for quant in [None, *args.quant]:
            model = random_model(shape, root, quant)
            eager = decode_rate(ours(model, cuda_graphs=False, compiled=False), args.new_tokens)
            graphed = decode_rate(ours(model, cuda_graphs=True, compiled=False), args.new_tokens)
            both_run = ours(model, cuda_graphs=True, compiled=True)
            both = decode_rate(both_run, args.new_tokens)
            decoder = both_run.engine._graphed
            captures = "off" if decoder is None or decoder.disabled else decoder.captures
            per_token = weight_bytes(model)
            hf_rate = None
            if quant is None and not args.no_hf:
                hf = to_hf(model)
                hf.model.rotary_emb.to("cuda")
                hf_rate = decode_rate(hf_runner(hf), args.new_tokens)
                del hf
            best = max(eager, graphed, both)
            used = best * per_token
            hf_text = f"{hf_rate:>8.1f}{best / hf_rate:>7.2f}" if hf_rate else f"{'':>15}"
            print(f"{shape:<6}{quant or 'bf16':<8}{eager:>8.1f}{graphed:>8.1f}{both:>9.1f}{per_token / 1e9:>10.2f}"
                  f"{used / 1e9:>8.0f}{used / bandwidth:>11.0%}{hf_text}{captures:>9}", flush=True)
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
