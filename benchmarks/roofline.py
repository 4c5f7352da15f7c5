"""How close the CPU kernels run to this machine's own limits, and what those limits allow.

    python benchmarks/roofline.py [--shapes XS S] [--threads 2] [--repeats 5]

The peers here are the machine itself, measured in the same run by benchmarks/roofline.c (compiled
with the system C compiler, as accessory/kernels are):
  read   two threads reading the same weight matrices as plain 256-bit loads (with the same 1 KB
         software prefetch as the AVX2 kernel's one-row form; none for the AVX512-BF16 library,
         whose one-row form prefetches into L2 only),
         matrix by matrix in a decode step's order
  fma    12 independent multiply-adds per thread in registers, of the instruction the kernel in use
         multiplies with: 8-lane float32 FMAs (gemv_bf16.c, AVX2), or 16-lane AVX512-BF16 dot
         products of 32 bf16 pairs (gemv_bf16_avx512.c, on CPUs that have them)
Ours are the bf16 products a decode step runs (accessory/kernels.bf16_library: the kernel this CPU
gets; ACCESSORY_BF16_KERNEL=avx2 measures the AVX2 one anywhere), on random bf16
weights of the step's matrices (every layer's qkv, wo, w13 and w2, then the output head): one
stream (M=1, bound by reading the weights) and 16 streams (M=16, bound by the multiply-adds).

Printed per shape, medians of interleaved rounds: the weights' bytes; read GB/s, ours at M=1 GB/s
and its share of the read; the one-stream decode ceiling those bytes allow at the read's speed;
the FMA peak, ours at M=16 GFLOP/s and its share; and the best ratio 16 streams can reach over one
(16 x ideal one-stream time / ideal 16-stream time, each bound by its own limit; the attention
and the rest of a step left out), next to ours (products only).
"""

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode import SHAPES, VOCAB  # noqa: E402

from accessory.kernels import bf16_library  # noqa: E402
from accessory.model.LLM.llama import ffn_hidden_dim  # noqa: E402


def machine_library(workdir: Path) -> ctypes.CDLL:
    """benchmarks/roofline.c built and loaded (after torch, so both share torch's libgomp)."""
    source = Path(__file__).resolve().parent / "roofline.c"
    target = workdir / "roofline.so"
    subprocess.run(["cc", "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-o", str(target),
                    str(source)], check=True)
    library = ctypes.CDLL(str(target))
    library.roofline_read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    library.roofline_read.restype = ctypes.c_double
    library.roofline_fma.argtypes = [ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.POINTER(ctypes.c_int)]
    library.roofline_fma.restype = ctypes.c_double
    library.roofline_dpbf16.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_int)]
    library.roofline_dpbf16.restype = ctypes.c_double
    return library


def step_matrices(shape: str):
    """(out, in) of every bf16 product of one decode step, in order."""
    cfg = SHAPES[shape]
    dim, heads, kv_heads = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    ffn = ffn_hidden_dim(dim, cfg["multiple_of"], None)
    kv = dim // heads * kv_heads
    layer = [(dim + 2 * kv, dim), (dim, dim), (2 * ffn, dim), (dim, ffn)]
    return layer * cfg["n_layers"] + [(VOCAB, dim)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["XS", "S"], choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel, gemv = bf16_library()
    if gemv is None:
        sys.exit("the native kernels are not available here (no C compiler, or no AVX2/FMA)")
    product = gemv.accessory_gemv_bf16_f32
    product.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    with tempfile.TemporaryDirectory() as tmp:
        machine = machine_library(Path(tmp))

    threads = ctypes.c_int(0)
    fma_iters = 20_000_000

    dot_products = kernel == "gemv_bf16_avx512"

    def fma_rate() -> float:
        t = time.perf_counter()
        if dot_products:  # the peak of the instruction that kernel multiplies with
            machine.roofline_dpbf16(fma_iters // 4, ctypes.byref(threads))
            return threads.value * (fma_iters // 4) * 12 * 32 * 2 / (time.perf_counter() - t) / 1e9
        machine.roofline_fma(fma_iters, 0.999, 0.001, ctypes.byref(threads))
        return threads.value * fma_iters * 12 * 8 * 2 / (time.perf_counter() - t) / 1e9

    peak = "AVX512-BF16 dot products" if dot_products else "AVX2 float32 FMAs"
    print(f"{args.threads} threads, medians of {args.repeats} interleaved rounds; kernel {kernel}.c, "
          f"peak (fma column) of its {peak}", flush=True)
    rows = []
    for shape in args.shapes:
        weights = [torch.randn(o, i).to(torch.bfloat16) for o, i in step_matrices(shape)]
        nbytes = sum(w.numel() * 2 for w in weights)
        widest = max(max(w.shape) for w in weights)
        x = torch.randn(16, widest)
        y = torch.empty(16 * VOCAB)
        scratch = torch.empty(gemv.accessory_gemv_bf16_scratch_floats(16, widest) + 64)

        def ours(m: int) -> float:
            t = time.perf_counter()
            for w in weights:
                product(w.data_ptr(), x.data_ptr(), scratch.data_ptr(), y.data_ptr(), m, w.shape[0], w.shape[1])
            return time.perf_counter() - t

        def read() -> float:
            t = time.perf_counter()
            for w in weights:
                machine.roofline_read(w.data_ptr(), w.numel() * 2, int(not dot_products))
            return time.perf_counter() - t

        ours(1), ours(16), read(), fma_rate()  # warm-up
        samples = {"read": [], "ours1": [], "ours16": [], "fma": []}
        for round_index in range(args.repeats):
            samples["read"].append(read())
            samples["ours1"].append(ours(1))
            samples["ours16"].append(ours(16))
            samples["fma"].append(fma_rate())
            print(f"  {shape} round {round_index + 1}/{args.repeats}: read {nbytes / samples['read'][-1] / 1e9:.2f} GB/s"
                  f"  ours M=1 {nbytes / samples['ours1'][-1] / 1e9:.2f} GB/s"
                  f"  ours M=16 {16 * nbytes / samples['ours16'][-1] / 1e9:.1f} GFLOP/s"
                  f"  fma {samples['fma'][-1]:.1f} GFLOP/s", flush=True)
        m = {key: statistics.median(values) for key, values in samples.items()}
        flops16 = 16 * nbytes  # 2 FLOPs per weight (2 bytes) per stream
        ideal1 = m["read"]
        ideal16 = max(m["read"], flops16 / (m["fma"] * 1e9))
        rows.append((shape, nbytes / 1e6, nbytes / m["read"] / 1e9, nbytes / m["ours1"] / 1e9, m["read"] / m["ours1"],
                     1 / m["read"], m["fma"], flops16 / m["ours16"] / 1e9, flops16 / m["ours16"] / 1e9 / m["fma"],
                     16 * ideal1 / ideal16, 16 * m["ours1"] / m["ours16"]))
    print()
    print(f"{'shape':<5} {'MB':>6} {'read GB/s':>9} {'ours M=1':>8} {'x read':>6} {'decode ceiling tok/s':>20} "
          f"{'fma GFLOP/s':>11} {'ours M=16':>9} {'x fma':>5} {'16-stream ceiling':>17} {'ours 16/1':>9}")
    for r in rows:
        print(f"{r[0]:<5} {r[1]:6.0f} {r[2]:9.2f} {r[3]:8.2f} {r[4]:6.2f} {r[5]:20.1f} {r[6]:11.1f} {r[7]:9.1f} "
              f"{r[8]:5.2f} {r[9]:16.2f}x {r[10]:8.2f}x")


if __name__ == "__main__":
    main()
