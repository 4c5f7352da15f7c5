"""Peak resident memory while loading a 1.1B-parameter bf16 checkpoint (TinyLlama-1.1B shape).

Compares, each in a fresh process:
  * accessory: ``MetaModel.from_pretrained(dtype=bf16)`` (meta-device build, mmap'd safe load)
  * accessory fp16: the same weights from an fp16 checkpoint (each tensor converted to bf16 as it is
    read, so none is used in place from the file)
  * original-style: what LLaMA2-Accessory does - build the model with real (fp32 default) storage,
    ``torch.load`` the whole file, ``load_state_dict``, then cast to bf16.
and prints peak RSS / file size for each, after loading and after one forward pass (which touches
every weight, so memory-mapped pages count too).

    python benchmarks/load_memory.py [--workdir /tmp/accessory-bench]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256, ffn_dim_multiplier=None,
             norm_eps=1e-5, rope_theta=10000.0)  # FFN 5632 with multiple_of 256
VOCAB = 32000


def make_checkpoint(directory: Path) -> Path:
    import shutil

    import torch

    from accessory.model.LLM.llama import ModelArgs, Transformer
    shard = directory / "consolidated.00-of-01.model.pth"
    if shard.exists():
        return shard
    directory.mkdir(parents=True, exist_ok=True)
    args = ModelArgs(**SHAPE, vocab_size=VOCAB, max_seq_len=256)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        state["llma." + key] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    torch.save({"model": state}, shard)
    (directory / "config.json").write_text(json.dumps(SHAPE))
    (directory / "meta.json").write_text(json.dumps({"llama_type": "llama"}))
    shared = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tokenizers" / "llama-spm"
    shutil.copy(os.environ.get("LLAMA_TOKENIZER", shared / "tokenizer.model"), directory / "tokenizer.model")
    return shard


CHILD = r"""
import sys, time, json, torch
mode, path = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
def peak_mb():
    # VmHWM, not ru_maxrss: after fork+exec ru_maxrss still carries the parent's high-water mark
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024
base = peak_mb()
t0 = time.perf_counter()
if mode == "accessory":
    from accessory.model.meta import MetaModel
    model = MetaModel.from_pretrained(path, max_seq_len=256, dtype=torch.bfloat16, device="cpu", progress=False)
    llma = model.llma
else:
    from accessory.model.meta import MetaModel
    from accessory.model.LLM.llama import Transformer
    import json as _j
    model = MetaModel("llama", [path + "/config.json"], path + "/tokenizer.model", max_seq_len=256)  # fp32 init
    sd = torch.load(path + "/consolidated.00-of-01.model.pth", map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(sd, strict=False)
    del sd
    model = model.to(torch.bfloat16)
    llma = model.llma
load_s = time.perf_counter() - t0
after_load = peak_mb()
with torch.inference_mode():
    llma.forward_tokens(torch.ones(1, 8, dtype=torch.long))
print(json.dumps({"base_mb": base, "after_load_mb": after_load, "after_forward_mb": peak_mb(), "load_s": load_s}))
"""


def fp16_copy(directory: Path) -> Path:
    """The checkpoint in ``directory`` written again with fp16 tensors, beside it (made once)."""
    import shutil

    import torch
    target = directory.with_name(directory.name + "-fp16")
    shard = target / "consolidated.00-of-01.model.pth"
    if not shard.exists():
        target.mkdir(parents=True, exist_ok=True)
        state = torch.load(directory / shard.name, map_location="cpu", mmap=True, weights_only=True)["model"]
        torch.save({"model": {k: v.to(torch.float16) for k, v in state.items()}}, shard)
        for name in ("config.json", "meta.json", "tokenizer.model"):
            shutil.copy(directory / name, target / name)
    return target


def measure(mode: str, directory: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(directory)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/accessory-bench/tinyllama-1.1b-bf16")
    args = parser.parse_args()
    directory = Path(args.workdir)
    t0 = time.perf_counter()
    shard = make_checkpoint(directory)
    file_mb = shard.stat().st_size / 2**20
    print(f"checkpoint {shard} ({file_mb:.0f} MiB, made in {time.perf_counter() - t0:.0f} s)")
    print(f"{'loader':<16}{'load s':>8}{'peak after load':>18}{'ratio':>7}{'peak after fwd':>17}{'ratio':>7}")
    for mode in ("accessory", "accessory fp16", "original-style"):
        r = measure(mode.split()[0], fp16_copy(directory) if mode.endswith("fp16") else directory)
        print(f"{mode:<16}{r['load_s']:>8.1f}{r['after_load_mb']:>15.0f} MiB{r['after_load_mb'] / file_mb:>7.2f}"
              f"{r['after_forward_mb']:>14.0f} MiB{r['after_forward_mb'] / file_mb:>7.2f}")
    print("ratio = peak resident memory of the whole process / checkpoint file size (target <= 1.3 for accessory)")


if __name__ == "__main__":
    main()
