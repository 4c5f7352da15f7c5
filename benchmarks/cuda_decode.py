"""Single-stream decode speed on a CUDA GPU against HF transformers, and its share of the HBM bandwidth.

    python benchmarks/cuda_decode.py [--shapes S 7B] [--new-tokens 128] [--quant int8 int4 nf4]

Weights are random (built on the GPU, no checkpoint download): the speed of a decode step does not
depend on their values. For each shape it prints decode tok/s (one stream, bf16), the weight bytes
read per token, the bandwidth that implies, its fraction of the device's measured copy bandwidth,
and HF transformers' decode tok/s on the same weights in the same run.
"""

import argparse
import json
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


def ours(model: MetaModel):
    engine = GenerationEngine(model.llma, model.tokenizer, eos_ids=[])

    def run(ids, n):
        for _ in engine.run(ids.tolist(), [n] * ids.shape[0], SamplingParams()):
            pass
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
    print(f"{'shape':<6}{'weights':<8}{'ours tok/s':>11}{'GB/token':>10}{'GB/s':>8}{'of copy bw':>11}"
          f"{'HF tok/s':>10}{'ratio':>7}")
    for shape in args.shapes:
        for quant in [None, *args.quant]:
            model = random_model(shape, root, quant)
            rate = decode_rate(ours(model), args.new_tokens)
            per_token = weight_bytes(model)
            hf_rate = None
            if quant is None and not args.no_hf:
                hf = to_hf(model)
                hf.model.rotary_emb.to("cuda")
                hf_rate = decode_rate(hf_runner(hf), args.new_tokens)
                del hf
            used = rate * per_token
            hf_text = f"{hf_rate:>10.1f}{rate / hf_rate:>7.2f}" if hf_rate else ""
            print(f"{shape:<6}{quant or 'bf16':<8}{rate:>11.1f}{per_token / 1e9:>10.2f}{used / 1e9:>8.0f}"
                  f"{used / bandwidth:>11.0%}{hf_text}", flush=True)
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
