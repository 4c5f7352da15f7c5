"""Tensor parallelism over torch.distributed: two gloo processes on 127.0.0.1 run a tiny model cut
in halves, and must give the single-process model's logits and text.

One spawn runs every scenario (process start-up dominates the cost); each rank writes what it
measured to a JSON file and the tests below assert on those files.
"""

import faulthandler
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ckpt_utils import LLAMA_SPM_VOCAB, TINY_LLAMA, random_llama_state, write_checkpoint
from test_llama_peft_adapter import CONFIGS, full_config, random_state, write_original_checkpoint

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "Once upon a time,"]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load(path, **kwargs):
    from accessory.model.meta import MetaModel
    return MetaModel.from_pretrained(path, dtype=torch.float32, device="cpu", max_seq_len=128, progress=False,
                                     **kwargs)


def _max_diff(logits, reference) -> float:
    return max((a - b).abs().max().item() for a, b in zip(logits, reference))


def _sampled(model, seed: int):
    torch.manual_seed(seed)  # a different random state on each rank: rank 0's picks must win
    return model.generate(PROMPTS, max_gen_len=12, temperature=0.8)


def _all_ranks(value):
    values = [None] * WORLD
    dist.all_gather_object(values, value)
    return values


def _one_row(engine, ids, new_tokens):
    from accessory.generation.sampling import SamplingParams
    states = None
    for states in engine.run([ids], [new_tokens], SamplingParams()):
        pass
    return states[0]


def _prompt_cache(model, reference, rank: int) -> dict:
    """Two chat turns with the prompt cache on every rank, then the second again after rank 1
    alone dropped its cache: the ranks must agree on what to reuse (their collectives meet)."""
    model.engine.prompt_cache = True
    first_ids = model.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    first = _one_row(model.engine, first_ids, 6)
    ids = first_ids + first.new_tokens + model.tokenizer.encode(" And then", bos=False, eos=False)
    second = _one_row(model.engine, ids, 6)
    if rank == 1:
        model.engine.clear_prompt_cache()
    again = _one_row(model.engine, ids, 6)
    return {"held": len(first_ids) + len(first.new_tokens) - 1, "cached": [second.cached_tokens, again.cached_tokens],
            "tokens": [second.new_tokens, again.new_tokens], "reference": _one_row(reference.engine, ids, 6).new_tokens}


def _worker(rank: int, port: int, dirs: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a rank left waiting in a collective (ranks that disagree) exits with its stack after a few
    # minutes, which fails the spawn, instead of hanging the test run (the scenarios take seconds)
    faulthandler.dump_traceback_later(180, exit=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    group = dist.new_group(list(range(WORLD)))
    singles = [dist.new_group([r]) for r in range(WORLD)]  # every rank must create every group
    result = {}

    reference = _load(dirs["llama_mp1"])
    ref_logits = reference.compute_logits(PROMPTS)
    ref_greedy = reference.generate(PROMPTS, max_gen_len=12)
    result["reference_greedy"] = ref_greedy
    for key in ("llama_mp1", "llama_mp2"):
        model = _load(dirs[key], mp_group=group)
        attention = model.llma.layers[0].attention
        result[key] = {
            "wq_shape": list(attention.wq.weight.shape),
            "wo_shape": list(attention.wo.weight.shape),
            "embedding_shape": list(model.llma.tok_embeddings.weight.shape),
            "output_shape": list(model.llma.output.weight.shape),
            "heads": [attention.n_heads, attention.n_kv_heads, model.llma.n_kv_heads],
            "logits_diff": _max_diff(model.compute_logits(PROMPTS), ref_logits),
            "greedy": model.generate(PROMPTS, max_gen_len=12),
            "sampled_all_ranks": _all_ranks(_sampled(model, seed=1234 + 17 * rank)),
        }

    # quantized at mp 2: each rank packs its own slices (row-parallel weights get per-half scales)
    for quant in ("int8", "int4"):
        from accessory.quant import QuantLinear
        model = _load(dirs["llama_mp2"], mp_group=group, quant=quant)
        attention = model.llma.layers[0].attention
        logits = torch.cat([t.flatten() for t in model.compute_logits(PROMPTS)])
        reference_flat = torch.cat([t.flatten() for t in ref_logits])
        result[quant] = {
            "packed": isinstance(attention.wo, QuantLinear) and isinstance(model.llma.output, QuantLinear),
            "wq_rows": attention.wq.qweight.shape[0],
            "rms": ((logits - reference_flat).norm() / reference_flat.norm()).item(),
            "sampled_all_ranks": _all_ranks(_sampled(model, seed=99 + rank)),
        }

    result["prompt_cache"] = _prompt_cache(_load(dirs["llama_mp2"], mp_group=group), reference, rank)

    single = _load(dirs["llama_mp2"], mp_group=singles[rank])
    result["single"] = {"wq_shape": list(single.llma.layers[0].attention.wq.weight.shape),
                        "logits_diff": _max_diff(single.compute_logits(PROMPTS), ref_logits)}

    try:
        _load(dirs["llama_mp1"], llama_type="lama", mp_group=group)
        result["unknown"] = None
    except Exception as exc:  # noqa: BLE001 -- the test checks the type and message
        result["unknown"] = [type(exc).__name__, str(exc)]

    peft_reference = _load(dirs["peft_mp2"])  # merged on one process
    peft_ref_logits = peft_reference.compute_logits(PROMPTS)
    for key in ("peft_mp1", "peft_mp2"):
        peft = _load(dirs[key], mp_group=group)
        result[key] = {"logits_diff": _max_diff(peft.compute_logits(PROMPTS), peft_ref_logits),
                       "greedy_equal": peft.generate(PROMPTS, max_gen_len=8)
                       == peft_reference.generate(PROMPTS, max_gen_len=8)}

    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, llama_spm_path):
    """What each of the two ranks measured (a list of two dicts)."""
    root = tmp_path_factory.mktemp("model_parallel")
    state = random_llama_state(TINY_LLAMA, LLAMA_SPM_VOCAB, seed=0)
    llama_type, cfg = CONFIGS["peft_lora_bias"]
    peft_state = random_state(llama_type, cfg, seed=3)
    dirs = {
        "llama_mp1": str(write_checkpoint(root / "llama_mp1", state, TINY_LLAMA, mp=1)),
        "llama_mp2": str(write_checkpoint(root / "llama_mp2", state, TINY_LLAMA, mp=2)),
        "peft_mp1": str(write_original_checkpoint(root / "peft_mp1", peft_state, llama_type,
                                                  full_config(llama_type, cfg), mp=1)),
        "peft_mp2": str(write_original_checkpoint(root / "peft_mp2", peft_state, llama_type,
                                                  full_config(llama_type, cfg), mp=2)),
    }
    out_dir = root / "results"
    out_dir.mkdir()
    mp.spawn(_worker, args=(_free_port(), dirs, str(out_dir)), nprocs=WORLD, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("key", ["llama_mp1", "llama_mp2"])
def test_each_rank_holds_half_of_every_split_weight(ranks, key):
    for result in ranks:
        got = result[key]
        assert got["wq_shape"] == [32, 64]  # 4 heads x 16 -> 2 heads per rank (column)
        assert got["wo_shape"] == [64, 32]  # row
        assert got["embedding_shape"] == [LLAMA_SPM_VOCAB, 32]  # embedding dim
        assert got["output_shape"] == [LLAMA_SPM_VOCAB // 2, 64]  # vocab rows
        assert got["heads"] == [2, 1, 1]  # n_heads 4, n_kv_heads 2, halved


@pytest.mark.parametrize("key", ["llama_mp1", "llama_mp2"])
def test_logits_and_greedy_text_match_one_process(ranks, key):
    for result in ranks:
        assert result[key]["logits_diff"] < 1e-5
        assert result[key]["greedy"] == result["reference_greedy"]
    assert any(text for text in ranks[0]["reference_greedy"])


@pytest.mark.parametrize("key", ["llama_mp1", "llama_mp2"])
def test_sampled_text_is_the_same_on_every_rank(ranks, key):
    for result in ranks:
        texts = result[key]["sampled_all_ranks"]
        assert texts[0] == texts[1]
        assert texts[0] != result["reference_greedy"]  # temperature 0.8 really sampled


@pytest.mark.parametrize("key", ["peft_mp1", "peft_mp2"])
def test_llama_peft_with_lora_and_biases(ranks, key):
    for result in ranks:
        assert result[key]["logits_diff"] < 1e-5
        assert result[key]["greedy_equal"]


def test_prompt_cache_reuse_is_agreed_across_ranks(ranks):
    for result in ranks:
        got = result["prompt_cache"]
        assert got["cached"] == [got["held"], 0]  # rank 1's dropped cache: neither rank reuses
        assert got["tokens"] == [got["reference"], got["reference"]]


def test_group_of_size_one_loads_the_whole_model(ranks):
    for result in ranks:
        assert result["single"]["wq_shape"] == [64, 64]
        assert result["single"]["logits_diff"] < 1e-5


def test_unknown_architecture_in_a_group_names_the_known_ones(ranks):
    for result in ranks:
        kind, message = result["unknown"]
        assert kind == "ConfigError"
        assert "unknown llama_type 'lama'" in message and "llama_peft" in message


def test_architecture_without_tensor_parallel_support_is_a_clear_error(monkeypatch):
    """A known type left out of TENSOR_PARALLEL_TYPES (every shipped text type is in it today)."""
    from accessory.model.layers import tensor_parallel
    monkeypatch.setattr(tensor_parallel, "TENSOR_PARALLEL_TYPES", ("llama",))
    with pytest.raises(NotImplementedError) as info:
        tensor_parallel.check_supported("internlm", 2)
    message = str(info.value)
    assert "'internlm'" in message and "model-parallel size 2" in message
    assert "Model parallelism over torch.distributed" in message and "mp_group=None" in message


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_rank_loads_its_slice_from_any_shard_count(tmp_path, shards):
    """No process group needed: rank 1 of 2 fills exactly its slices from 1, 2 or 4 shards."""
    from accessory.checkpoint.load import load_pretrained
    from accessory.model.layers.tensor_parallel import shard_meta_model
    from accessory.model.meta import MetaModel

    state = random_llama_state(TINY_LLAMA, LLAMA_SPM_VOCAB, seed=5)
    directory = write_checkpoint(tmp_path / "ckpt", state, TINY_LLAMA, mp=shards)
    with torch.device("meta"):
        model = MetaModel("llama", [directory / "config.json"], directory / "tokenizer.model", max_seq_len=64)
    shard_meta_model(model.llma, model.split_plan, rank=1, size=2)
    load_pretrained(model, [directory], model.split_plan, torch.float32, torch.device("cpu"), progress=False,
                    shard=(1, 2))
    params = dict(model.llma.named_parameters())
    expected_dims = {"tok_embeddings.weight": 1, "output.weight": 0, "layers.1.attention.wk.weight": 0,
                     "layers.1.feed_forward.w2.weight": 1, "layers.1.ffn_norm.weight": None}
    for name, dim in expected_dims.items():
        full = state[name]
        want = full if dim is None else torch.chunk(full, 2, dim=dim)[1]
        assert torch.equal(params[name], want), name


@pytest.mark.parametrize("quant, tolerance", [("int8", 0.02), ("int4", 0.25)])
def test_quantized_model_parallel_close_to_full_precision(ranks, quant, tolerance):
    for result in ranks:
        q = result[quant]
        assert q["packed"] and q["wq_rows"] == TINY_LLAMA["dim"] // WORLD
        assert q["rms"] < tolerance  # as tests/test_quant.py's tolerances at mp 1
    assert ranks[0][quant]["sampled_all_ranks"][0] == ranks[0][quant]["sampled_all_ranks"][1]
