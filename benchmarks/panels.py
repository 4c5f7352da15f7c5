"""bf16 products over weights in 16-row panels (kernels/panels.py) against the row-major kernel and torch.

    python benchmarks/panels.py [--shapes S XS] [--rows 1 2 4 8 16 32 64 128] [--threads 2] [--repeats 9]

For every matrix of a decode step (per layer: q/k/v fused, wo, w1/w3 fused, w2; the output head),
random bf16 weights, the step's products for --rows activation rows (float32 in, as the native
decode step passes them) run through
  panels     accessory_packed_bf16_f32 (gemv_bf16_panels.c) over the weights in panels
  row-major  accessory_gemv_bf16_f32 of the bf16 library the engine uses (gemv_bf16_avx512.c on
             CPUs with AVX512-BF16), over the same weights row-major
  torch      torch.mm of the bf16-rounded rows by the bf16 weight (oneDNN), from 32 rows
in interleaved rounds (one pass of each per round; medians over --repeats rounds). The weights of a
shape take far more than the caches (S: 2.2 GB), so every pass reads them from memory as a decode
step does. Prints GFLOP/s and each form's ratio over the row-major kernel. Needs AVX512-BF16.
"""

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accessory.kernels import bf16_library, scratch_floats  # noqa: E402
from accessory.kernels.panels import _kernels, pack, panels_available  # noqa: E402

SHAPES = {"XS": (768, 12, 768, 2048), "S": (2048, 22, 256, 5632)}  # dim, layers, kv dim, ffn
VOCAB = 32000


def matrices(shape: str):
    dim, layers, kv, ffn = SHAPES[shape]
    per_layer = [(dim + 2 * kv, dim), (dim, dim), (2 * ffn, dim), (dim, ffn)]
    return per_layer * layers + [(VOCAB, dim)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["S", "XS"], choices=list(SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if not panels_available():
        sys.exit("panels: needs a CPU with AVX512-BF16 and a C compiler")
    torch.set_num_threads(args.threads)
    name, row_major_library = bf16_library()
    row_major = row_major_library.accessory_gemv_bf16_f32
    row_major.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    panel_product = _kernels().accessory_packed_bf16_f32
    print(f"row-major kernel: {name}; {args.threads} threads, medians of {args.repeats} interleaved rounds")
    print(f"{'shape':<6}{'rows':>5}{'panels':>10}{'row-major':>11}{'torch':>9}{'x row-major':>13}{'torch x':>9}")
    for shape in args.shapes:
        gen = torch.Generator().manual_seed(0)
        weights = [torch.randn(o, i, generator=gen).bfloat16() for o, i in matrices(shape)]
        packed = [pack(w) for w in weights]
        for rows in args.rows:
            xs = {i: torch.randn(rows, i, generator=gen) for i in {w.shape[1] for w in weights}}
            xs_bf16 = {i: x.bfloat16() for i, x in xs.items()}
            ys = [torch.empty(rows, w.shape[0]) for w in weights]
            scratch = scratch_floats(4 * rows * max(xs) + 64)
            flops = sum(2 * rows * w.numel() for w in weights)

            def run(form):
                start = time.perf_counter()
                for w, p, y in zip(weights, packed, ys):
                    o, i = w.shape
                    if form == "panels":
                        panel_product(p.data_ptr(), xs[i].data_ptr(), scratch.data_ptr(), y.data_ptr(), rows, o, i)
                    elif form == "row-major":
                        row_major(w.data_ptr(), xs[i].data_ptr(), scratch.data_ptr(), y.data_ptr(), rows, o, i)
                    else:
                        torch.mm(xs_bf16[i], w.T)
                return time.perf_counter() - start

            forms = ["panels", "row-major"] + (["torch"] if rows >= 32 else [])
            for form in forms:
                run(form)  # warm up
            times = {form: [] for form in forms}
            for _ in range(args.repeats):
                for form in forms:
                    times[form].append(run(form))
            rate = {form: flops / statistics.median(t) / 1e9 for form, t in times.items()}
            torch_rate, base = rate.get("torch"), rate["row-major"]
            torch_cells = ("-", "-") if torch_rate is None else (f"{torch_rate:.1f}", f"{torch_rate / base:.2f}")
            print(f"{shape:<6}{rows:>5}{rate['panels']:>10.1f}{base:>11.1f}{torch_cells[0]:>9}"
                  f"{rate['panels'] / base:>13.2f}{torch_cells[1]:>9}", flush=True)
    print("(GFLOP/s; 'x row-major': panels over the row-major kernel; 'torch x': torch over it)")


if __name__ == "__main__":
    main()
