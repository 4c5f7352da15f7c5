"""The seed's multi-process model-parallel examples (docs/inference.md "Multi-GPU Inference with
Model Parallelism" and docs/projects/mixtral-8x7b.md of LLaMA2-Accessory), run as scripts with two
processes on the CPU.

The code is the seed's, verbatim, except what a CPU test must change: ``backend="gloo"`` instead of
nccl, no ``torch.cuda.set_device(rank)``, the checkpoint path, a free port, and 2 processes. The
examples ask for up to 512 new tokens; to keep the test short the tiny random model is built to
end its answers itself (its output head's EOS row is pointed along one fixed direction, so EOS
wins after some tens of tokens).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_mixtral import CFG, dense_to_sparse, original_config, random_mixtral_state, write_original_checkpoint

REPO = Path(__file__).resolve().parent.parent
EOS_ID = 2  # the Llama 2 tokenizer's

INFERENCE_MD = '''
from accessory.model.meta import MetaModel
from accessory.data.system_prompt import format_prompt

import random 
import numpy as np

import torch
import torch.distributed as dist
import multiprocessing as mp

def main(world_size, rank) -> None:
    # specify random seed to ensure consistent token sampling among model parallel ranks
    random.seed(0)
    torch.random.manual_seed(0)
    np.random.seed(0)
    
    dist.init_process_group(
        backend="nccl", rank=rank, world_size=world_size,
        init_method=f"tcp://127.0.0.1:23560",
    )
    torch.cuda.set_device(rank)
    
    # mp_group identifies which ranks will work collaboratively through model parallelism
    model = MetaModel.from_pretrained("/path/to/pretrained", max_seq_len=2048,
                                      mp_group=dist.new_group(ranks=list(range(dist.get_world_size()))))

    instruction = "What's the best programming language in the world?"
    prompt = format_prompt({"instruction": instruction}, sys_name="alpaca")

    response = None
    for response_in_progress in model.stream_generate(prompt, image=None, max_gen_len=512):
        response = response_in_progress['text']
        print(response)


if __name__ == "__main__":
    N_GPU = 2
    if N_GPU == 1:
        main(world_size=1, rank=0)
    elif N_GPU > 1:
        # You can use whatever method, e.g. torchrun, slurm, etc. for distributed launch
        # Just be sure to initialize torch distributed (by invoking dist.init_process_group)
        # before creating the model if model parallel size > 1 is used
        mp.set_start_method("spawn")
        for rank in range(N_GPU):
            process = mp.Process(target=main, args=(N_GPU, rank))
            process.start()
    else:
        raise ValueError
'''

MIXTRAL_MD = '''
from accessory.model.meta import MetaModel

import random 
import numpy as np

import torch
import torch.distributed as dist
import multiprocessing as mp

def main(world_size, rank) -> None:
    # specify random seed to ensure consistent token sampling among model parallel ranks
    random.seed(0)
    torch.random.manual_seed(0)
    np.random.seed(0)
    
    dist.init_process_group(
        backend="nccl", rank=rank, world_size=world_size,
        init_method=f"tcp://127.0.0.1:23560",
    )
    torch.cuda.set_device(rank)
    
    pretrained_path = "/path/to/converted"  # converted checkpoints of either base or sparse format
    # mp_group identifies which ranks will work collaboratively through model parallelism
    model = MetaModel.from_pretrained(pretrained_path, max_seq_len=2048,
                                      mp_group=dist.new_group(ranks=list(range(dist.get_world_size()))))

    prompt = "The best programming language in the world is"

    response = model.generate([prompt], images=None, max_gen_len=512)[0]
    if rank == 0:  # without this filter, the response will be printed for `world_size` times
        print(response)
    # or if you want to generate the response token by token
    response = None
    for response_in_progress in model.stream_generate(prompt, image=None, max_gen_len=512):
        response = response_in_progress['text']
        if rank == 0:
            print(response)


if __name__ == "__main__":
    N_GPU = 8 # 1, 2, 4, or 8
    if N_GPU == 1:
        main(world_size=1, rank=0)
    elif N_GPU > 1:
        # You can use whatever method, e.g. torchrun, slurm, etc. for distributed launch
        # Just be sure to initialize torch distributed (by invoking dist.init_process_group)
        # before creating the model if model parallel size > 1 is used
        mp.set_start_method("spawn")
        for rank in range(N_GPU):
            process = mp.Process(target=main, args=(N_GPU, rank))
            process.start()
    else:
        raise ValueError
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def for_cpu(code: str, checkpoint: Path, n_processes: int = 2) -> str:
    """The seed's example with only the CPU changes (see the module docstring), each checked to apply."""
    replacements = [
        ('backend="nccl"', 'backend="gloo"'),
        ("    torch.cuda.set_device(rank)\n", ""),
        ("tcp://127.0.0.1:23560", f"tcp://127.0.0.1:{_free_port()}"),
        ("/path/to/pretrained" if "/path/to/pretrained" in code else "/path/to/converted", str(checkpoint)),
        ("N_GPU = 8 #" if "N_GPU = 8 #" in code else "N_GPU = 2", f"N_GPU = {n_processes}" + (" #" if "N_GPU = 8 #" in code else "")),
    ]
    for old, new in replacements:
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    return code


def run_script(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, llama_spm_path):
    """A tiny mixtral checkpoint in 2 shards and its sparse (stacked experts) conversion in 1."""
    root = tmp_path_factory.mktemp("seed_example")
    dense = random_mixtral_state(CFG, seed=7)
    direction = torch.randn(CFG["dim"], generator=torch.Generator().manual_seed(1))
    dense["output.weight"][EOS_ID] = 6.0 * direction / direction.norm()
    return {
        "mixtral": write_original_checkpoint(root / "mixtral", dense, original_config(CFG, "mixtral"), "mixtral", 2),
        "mixtral_sparse": write_original_checkpoint(root / "sparse", dense_to_sparse(dense, CFG),
                                                    original_config(CFG, "mixtral_sparse"), "mixtral_sparse", 1),
    }


def test_inference_md_example_runs_on_two_cpu_processes(checkpoints, tmp_path):
    code = for_cpu(INFERENCE_MD, checkpoints["mixtral"])
    assert "mp.Process(target=main" in code and 'backend="gloo"' in code and "cuda" not in code
    done = run_script(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip()  # both ranks stream and print


def test_mixtral_md_example_prints_rank_zero_text_once_per_step(checkpoints, tmp_path):
    code = for_cpu(MIXTRAL_MD, checkpoints["mixtral_sparse"])
    done = run_script(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip()
