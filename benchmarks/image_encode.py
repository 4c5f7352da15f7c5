"""Image-encode time and peak memory of the real-size SPHINX-Tiny encoders on CPU.

For each llama_type asked (default ``llama_ens_light``: ConvNeXt-XXLarge + DINOv2 ViT-g/14 +
``visual_proj`` + tags, one 512 view; ``llama_ens5_light`` is five views of a 1024 image), in a
fresh process: build the model on the meta device, ``to_empty`` onto the CPU and fill it with
random weights (the numbers do not depend on the values), then time ``encode_images`` on a batch
of random images. The text side is one layer (it takes no part in encoding).

Prints, per type and dtype: parameters of the encoders + connectors, build time, encode seconds
per batch (median of ``--repeats``), and peak resident memory after building (the weights) and
after encoding (weights + activations), and one view through ConvNeXt (at 512) and DINOv2 (at 224)
alone.

    python benchmarks/image_encode.py [--types llama_ens_light llama_ens5_light] [--dtype fp32 bf16]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(llama_type: str, dtype_name: str, batch: int, repeats: int, threads: int) -> dict:
    import importlib
    import resource
    import statistics
    import time

    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    module = importlib.import_module(f"accessory.model.LLM.{llama_type}")
    args = module.ModelArgs(dim=2048, n_layers=1, n_heads=32, n_kv_heads=4, vocab_size=32000)  # SPHINX-Tiny width

    def peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    base = peak_mib()
    start = time.perf_counter()
    with torch.device("meta"):
        model = module.Transformer(args, with_visual=True)
    model = model.to_empty(device="cpu").to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(std=p[0].numel() ** -0.5)
            else:
                p.fill_(1.0 if name.endswith("weight") or name.endswith("gamma") else 0.0)
    model.eval()
    build_s = time.perf_counter() - start
    visual = [n for n in ("qformer", "clip", "openclip_convnext_xxl", "dinov2_vitg14", "qformer_proj", "visual_proj")
              if hasattr(model, n)]
    params = sum(p.numel() for n in visual for p in getattr(model, n).parameters()) + 2 * args.dim
    after_build = peak_mib()

    images = torch.randn(batch, 3, model.image_size, model.image_size).to(dtype)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.encode_images(images)
            times.append(time.perf_counter() - t0)
        # one view through each encoder alone, at the sizes it sees in this type
        parts = {}
        for name, side in (("openclip_convnext_xxl", model.convnext_size), ("dinov2_vitg14", model.view_size)):
            view = torch.randn(batch, 3, side, side).to(dtype)
            t0 = time.perf_counter()
            getattr(model, name)(view)
            parts[name] = time.perf_counter() - t0
    assert out.shape == (batch, model.image_words, args.dim)
    return dict(type=llama_type, dtype=dtype_name, batch=batch, image=model.image_size, words=model.image_words,
                params=params, build_s=build_s, encode_s=statistics.median(times), first_s=times[0],
                base_mib=base, build_mib=after_build, encode_mib=peak_mib(),
                convnext_s=parts["openclip_convnext_xxl"], dinov2_s=parts["dinov2_vitg14"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", nargs="+", default=["llama_ens_light"])
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        llama_type, dtype = opts.child.split(":")
        print(json.dumps(child(llama_type, dtype, opts.batch, opts.repeats, opts.threads)))
        return
    print(f"{'llama_type':18} {'dtype':5} {'batch':>5} {'image':>5} {'N':>5} {'params':>14} {'build s':>8} "
          f"{'encode s':>9} {'1st s':>7} {'cnx/view s':>10} {'dino/view s':>11} {'peak build MiB':>15} "
          f"{'peak encode MiB':>16}", flush=True)
    for llama_type in opts.types:
        for dtype in opts.dtype:
            cmd = [sys.executable, __file__, "--child", f"{llama_type}:{dtype}", "--batch", str(opts.batch),
                   "--repeats", str(opts.repeats), "--threads", str(opts.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if done.returncode:
                sys.exit(f"{llama_type} {dtype} failed:\n{done.stderr}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{r['type']:18} {r['dtype']:5} {r['batch']:5d} {r['image']:5d} {r['words']:5d} {r['params']:14,d} "
                  f"{r['build_s']:8.1f} {r['encode_s']:9.2f} {r['first_s']:7.2f} {r['convnext_s']:10.2f} "
                  f"{r['dinov2_s']:11.2f} {r['build_mib']:15.0f} {r['encode_mib']:16.0f}", flush=True)


if __name__ == "__main__":
    main()
