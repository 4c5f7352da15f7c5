"""Where a GPU decode step's time goes: its kernels, by kind, against the wall-clock time per token.

    python benchmarks/cuda_profile.py [--shapes 7B S] [--new-tokens 64] [--top 12]

Single-stream greedy decode through the engine as users get it (CUDA graphs and compiled layer
steps, the defaults) on random weights (cuda_decode.py's models), under torch.profiler. Two runs
are profiled, of 1 and of 1 + N new tokens; their difference, divided by N, is the cost of one
decode step without the prefill. Printed per token: the wall-clock time, the sum of the GPU's
kernel times, the rest (the GPU idle: the host's work between steps, gaps between kernels), the
kernels by kind (matrix products, attention, fused element-wise, copies) with the bandwidth the
matrix products imply for the weights they read, and the most expensive kernels by name.
"""

import argparse
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cuda_decode import ours, prompts, random_model, weight_bytes  # noqa: E402

KINDS = (("matrix products", re.compile(r"gemm|gemv|cutlass|xmma|cublas|splitk|sm\d\d_", re.I)),
         ("attention", re.compile(r"fmha|flash|attention|attn|efficient", re.I)),
         ("fused (triton)", re.compile(r"^triton", re.I)),
         ("copies, fills", re.compile(r"memcpy|memset|copy|fill", re.I)))


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def profiled(run, ids, n: int):
    """(wall seconds, {kernel name: [count, microseconds]}) of one run of ``n`` new tokens."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run(ids, n)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[event.name]
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us()
    return wall, kernels


def report(shape: str, model, run, new_tokens: int, top: int) -> None:
    ids = prompts(1, 16).cuda()
    run(ids, new_tokens + 1)  # compile, capture
    run(ids, new_tokens + 1)
    best = None
    for _ in range(3):  # the fastest of three pairs (the profiler's own cost varies)
        wall_1, kernels_1 = profiled(run, ids, 1)
        wall_n, kernels_n = profiled(run, ids, new_tokens + 1)
        per_token = (wall_n - wall_1) / new_tokens
        if best is None or per_token < best[0]:
            best = (per_token, kernels_1, kernels_n)
    per_token, kernels_1, kernels_n = best
    step = {}
    for name, (count, us) in kernels_n.items():
        before = kernels_1.get(name, (0, 0.0))
        step[name] = ((count - before[0]) / new_tokens, (us - before[1]) / new_tokens)
    busy = sum(us for _, us in step.values())
    wall_us = per_token * 1e6
    print(f"\n{shape}: {1 / per_token:.1f} tok/s; per token {wall_us:.0f} us wall, {busy:.0f} us of kernels "
          f"({busy / wall_us:.0%}), {wall_us - busy:.0f} us of the GPU idle; "
          f"{sum(c for c, _ in step.values()):.0f} kernels")
    by_kind = defaultdict(float)
    for name, (_, us) in step.items():
        by_kind[kind_of(name)] += us
    for kind, us in sorted(by_kind.items(), key=lambda item: -item[1]):
        extra = ""
        if kind == "matrix products" and us > 0:
            extra = f"   ({weight_bytes(model) / (us * 1e-6) / 1e12:.2f} TB/s of weights read)"
        print(f"  {kind:<18}{us:>9.1f} us {us / wall_us:>6.1%}{extra}")
    print(f"  {'kernel':<90}{'per token':>10}{'us':>9}")
    for name, (count, us) in sorted(step.items(), key=lambda item: -item[1][1])[:top]:
        print(f"  {name[:88]:<90}{count:>10.1f}{us:>9.1f}")
    if not step:
        print("  (the profiler recorded no kernels)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["7B", "S"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--no-ahead", action="store_true",
                        help="an A/B: each step waits until the host has read the last tokens back")
    parser.add_argument("--compile-mode", default=None,
                        help="an experiment: torch.compile's mode for the layer step (e.g. max-autotune-no-cudagraphs)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    if args.no_ahead:
        from accessory.generation.engine import GenerationEngine
        GenerationEngine._launches_ahead = lambda self: False
    if args.compile_mode:
        import functools
        torch.compile = functools.partial(torch.compile, mode=args.compile_mode)
    print(torch.cuda.get_device_name(), "(steps wait for the host)" if args.no_ahead else "")
    for shape in args.shapes:
        model = random_model(shape, root)
        report(shape, model, ours(model, cuda_graphs=True, compiled=True), args.new_tokens, args.top)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
