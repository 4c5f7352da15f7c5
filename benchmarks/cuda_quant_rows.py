"""Decode-sized products with packed weights on a CUDA GPU: quant/triton_rows.py's kernel against
cuBLAS's bf16 product, torch's tinygemm (int4) and bitsandbytes (nf4, where installed).

    python benchmarks/cuda_quant_rows.py [--rows 1 16] [--sweep] [--best-to best.json]

For each matrix of a LLaMA-2 7B layer (the fused q/k/v, the output, the fused gate/up and the down
projection) and each row count, the time of one product, the weight bytes it read per second, and
its ratio to the bf16 product's time. Every product is replayed from a CUDA graph (no launch cost
from Python) and cycles through enough copies of its weights to pass the GPU's L2 cache, as a
decode step reads each matrix once. ``--sweep`` times the Triton kernel's block sizes for int4
(outputs per program, inputs per step, warps) and prints the best for a layer's four products;
``--best-to`` writes them as triton_rows.BLOCKS' entries.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accessory.quant import QuantScheme, quantize  # noqa: E402
from accessory.quant import cuda as quant_cuda  # noqa: E402
from accessory.quant import triton_rows  # noqa: E402
from accessory.quant.formats import nf4_levels  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008)}
SCHEMES = {"int8": QuantScheme("int8"), "int4": QuantScheme("int4", 32), "nf4": QuantScheme("nf4", 64)}
ENOUGH = 512 << 20  # bytes of weight copies cycled through (the H200's L2 holds 60 MB)


def copies_of(nbytes: int) -> int:
    return max(2, -(-ENOUGH // nbytes))


def time_per_call(calls) -> float:
    """Seconds per call of ``calls`` (callables), replayed from one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # (compiles, and allocates outside the capture)
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return sorted(times)[len(times) // 2]


def packed_weights(name: str, shape):
    return quantize(torch.randn(shape, device="cuda") * 0.02, SCHEMES[name])


def nbytes(packed) -> int:
    return sum(t.numel() * t.element_size() for t in packed.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--best-to")
    args = parser.parse_args()
    if triton_rows.kernel() is None:
        sys.exit("Triton cannot be imported here: nothing to measure")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    levels = nf4_levels(torch.device("cuda"))
    best = {}
    for rows in args.rows:
        print(f"\n{rows} row(s): us per product (GB/s of weights read), x = the bf16 product's time over it")
        print(f"{'matrix':<7}{'bf16':>16}" + "".join(f"{k:>22}" for k in
                                                     ("int8", "int4", "nf4", "int4 tinygemm", "nf4 bnb")))
        packed_all = {}
        for matrix, (out_features, in_features) in SHAPES.items():
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
            dense = [torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
                     for _ in range(copies_of(out_features * in_features * 2))]
            t_dense = time_per_call([lambda w=w: F.linear(x, w) for w in dense])
            cells = [f"{t_dense * 1e6:>8.1f} ({out_features * in_features * 2 / t_dense / 1e9:>5.0f})"]
            del dense
            for name in ("int8", "int4", "nf4"):
                one = packed_weights(name, (out_features, in_features))
                copies = [{k: v.clone() for k, v in one.items()} for _ in range(copies_of(nbytes(one)))]
                packed_all[(matrix, name)] = copies
                scheme = SCHEMES[name]
                t = time_per_call([lambda p=p: triton_rows.packed_rows(x, p, scheme, out_features, in_features,
                                                                         levels=levels) for p in copies])
                cells.append(f"{t * 1e6:>8.1f} ({nbytes(one) / t / 1e9:>5.0f}) {t_dense / t:>4.2f}x")
            for name, prepare in (("int4", lambda p: quant_cuda._tinygemm(p, SCHEMES["int4"])),
                                  ("nf4", lambda p: quant_cuda._bitsandbytes(p, SCHEMES["nf4"], torch.bfloat16))):
                copies = packed_all[(matrix, name)][:4]  # (each conversion holds its own copy)
                runs = [prepare(p) for p in copies]
                if any(r is None for r in runs):
                    cells.append(f"{'-':>22}")
                    continue
                t = time_per_call([lambda r=r: r(x) for r in runs])
                cells.append(f"{t * 1e6:>8.1f} ({nbytes(copies[0]) / t / 1e9:>5.0f}) {t_dense / t:>4.2f}x")
                del runs
            print(f"{matrix:<7}" + "".join(f"{c:>22}" if i else f"{c:>16}" for i, c in enumerate(cells)), flush=True)
        if args.sweep:
            grid = (itertools.product((8, 16, 32), (256, 512, 1024), (4, 8)) if rows == 1 else
                    itertools.product((16, 32), (64, 128, 256), (4, 8)))
            results = []
            for blocks in grid:
                total = 0.0
                for matrix, (out_features, in_features) in SHAPES.items():
                    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
                    copies = packed_all[(matrix, "int4")]
                    total += time_per_call([lambda p=p: triton_rows.packed_rows(
                        x, p, SCHEMES["int4"], out_features, in_features, blocks=blocks) for p in copies])
                results.append((total, blocks))
            results.sort()
            default = triton_rows.BLOCKS["one" if rows == 1 else "many"]
            at_default = next(t for t, b in results if b == default)
            print(f"int4 sweep, {rows} row(s), a layer's four products: best {results[0][1]} "
                  f"{results[0][0] * 1e6:.1f} us, then " + ", ".join(f"{b} {t * 1e6:.1f}" for t, b in results[1:6])
                  + f"; the default {default} {at_default * 1e6:.1f} us")
            best["one" if rows == 1 else "many"] = list(results[0][1])
        del packed_all
    if args.best_to and best:
        Path(args.best_to).write_text(json.dumps(best))


if __name__ == "__main__":
    main()
