"""Tensor parallelism for every text architecture besides llama / llama_peft (those are in
test_model_parallel.py): falcon (each variant), internlm, llama_adapter, mixtral, mixtral_peft
and mixtral_sparse, run by two gloo processes on 127.0.0.1 from 1-shard and 2-shard checkpoints in
the original's layout, against the same checkpoint run whole on one process.

One spawn runs every case (process start-up dominates the cost); each rank writes what it measured
to a JSON file and the tests below assert on those files.
"""

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_internlm_falcon import (FALCON_CONFIGS, INTERNLM_CONFIGS, falcon_full_config, falcon_shapes,
                                  falcon_split_dim, internlm_full_config, internlm_shapes, internlm_split_dim,
                                  random_state as random_zoo_state)
from test_internlm_falcon import write_original_checkpoint as write_zoo_checkpoint
from test_llama_peft_adapter import CONFIGS as PEFT_CONFIGS
from test_llama_peft_adapter import full_config as peft_full_config
from test_llama_peft_adapter import random_state as random_peft_state
from test_llama_peft_adapter import write_original_checkpoint as write_peft_checkpoint
from test_mixtral import CFG as MIXTRAL_CFG
from test_mixtral import (LORA_RANK, NUM_EXPERTS, dense_to_sparse, original_config, random_mixtral_state)
from test_mixtral import write_original_checkpoint as write_mixtral_checkpoint

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "Once upon a time,"]
WORLD = 2
SPM_VOCAB = 32000
GEN_LEN = 10

# falcon variants (tests/test_internlm_falcon.py): Falcon-7B (one kv head, parallel attention off
# one LayerNorm), Falcon-180B/40B as the original builds them (new architecture, num_kv_heads set
# but multi_query: one replicated kv head), full multi-head attention with biases (new and old,
# sequential, architecture), and the sequential multi-query one.
FALCON_CASES = ["7b_multi_query_parallel", "180b_new_arch_multi_query", "new_arch_mha_bias",
                "old_sequential_mha_bias", "old_sequential_multi_query"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- checkpoints

def _falcon_state(cfg, seed):
    """Random falcon weights for the Llama 2 vocabulary (a smaller vocab than falcon's own:
    the architecture does not care which tokenizer feeds it)."""
    shapes = {k: ((SPM_VOCAB,) + s[1:] if k in ("word_embeddings.weight", "output.weight") else s)
              for k, s in falcon_shapes(cfg).items()}
    return random_zoo_state(shapes, seed)


def _write_cases(root: Path) -> dict:
    """{case: {"type": llama_type, "mp1": dir, "mp2": dir}} in the original's layout."""
    cases = {}

    def add(case, llama_type, write):
        cases[case] = {"type": llama_type, **{f"mp{n}": str(write(root / f"{case}_mp{n}", n)) for n in (1, 2)}}

    for i, name in enumerate(FALCON_CASES):
        cfg = {**falcon_full_config(FALCON_CONFIGS[name]), "vocab_size": SPM_VOCAB}
        state = _falcon_state(cfg, seed=10 + i)
        add(f"falcon_{name}", "falcon",
            lambda d, n, s=state, c=cfg: write_zoo_checkpoint(d, s, c, "falcon", "llama-spm", falcon_split_dim(c), n))

    cfg = internlm_full_config(INTERNLM_CONFIGS["rmsnorm"])
    state = random_zoo_state(internlm_shapes(cfg), seed=20)
    add("internlm", "internlm",
        lambda d, n: write_zoo_checkpoint(d, state, cfg, "internlm", "llama-spm", internlm_split_dim, n))

    llama_type, adapter_cfg = PEFT_CONFIGS["adapter_lora_newgate"]
    adapter_state = random_peft_state(llama_type, adapter_cfg, seed=21)
    add("llama_adapter", "llama_adapter",
        lambda d, n: write_peft_checkpoint(d, adapter_state, llama_type, peft_full_config(llama_type, adapter_cfg), n))

    dense = random_mixtral_state(MIXTRAL_CFG, seed=22)
    add("mixtral", "mixtral",
        lambda d, n: write_mixtral_checkpoint(d, dense, original_config(MIXTRAL_CFG, "mixtral"), "mixtral", n))
    peft = random_mixtral_state(MIXTRAL_CFG, seed=23, bias=True, lora_rank=LORA_RANK)
    add("mixtral_peft", "mixtral_peft",
        lambda d, n: write_mixtral_checkpoint(d, peft, original_config(MIXTRAL_CFG, "mixtral_peft", lora_rank=LORA_RANK),
                                              "mixtral_peft", n))
    sparse = dense_to_sparse(random_mixtral_state(MIXTRAL_CFG, seed=24), MIXTRAL_CFG)
    add("mixtral_sparse", "mixtral_sparse",
        lambda d, n: write_mixtral_checkpoint(d, sparse, original_config(MIXTRAL_CFG, "mixtral_sparse"),
                                              "mixtral_sparse", n))
    return cases


# --------------------------------------------------------------------------- the ranks

def _load(path, **kwargs):
    from accessory.model.meta import MetaModel
    return MetaModel.from_pretrained(path, dtype=torch.float32, device="cpu", max_seq_len=128, progress=False,
                                     **kwargs)


def _max_diff(logits, reference) -> float:
    return max((a - b).abs().max().item() for a, b in zip(logits, reference))


def _all_ranks(value):
    values = [None] * WORLD
    dist.all_gather_object(values, value)
    return values


def _layout(model) -> dict:
    """Shapes and head counts a rank holds, for the per-architecture checks below."""
    layer = model.llma.layers[0]
    params = {name: list(p.shape) for name, p in layer.named_parameters()}
    heads = {name: [m.n_heads, getattr(m, "n_kv_heads", None)] for name, m in layer.named_modules()
             if hasattr(m, "n_heads")}
    experts = getattr(getattr(layer, "feed_forward", None), "experts", None)
    return {"params": params, "heads": heads, "cache_kv_heads": model.llma.n_kv_heads,
            "experts": None if experts is None else sorted(int(e) for e in experts)}


def _worker(rank: int, port: int, cases: dict, bad_heads: str, out_dir: str) -> None:
    import warnings
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    group = dist.new_group(list(range(WORLD)))
    result = {}
    for case, info in cases.items():
        reference = _load(info["mp1"])
        ref_logits = reference.compute_logits(PROMPTS)
        ref_greedy = reference.generate(PROMPTS, max_gen_len=GEN_LEN)
        got = {"reference_greedy": ref_greedy}
        for key in ("mp1", "mp2"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = _load(info[key], mp_group=group)
            got[key] = {
                "layout": _layout(model),
                "warnings": [str(w.message) for w in caught],
                "logits_diff": _max_diff(model.compute_logits(PROMPTS), ref_logits),
                "greedy": model.generate(PROMPTS, max_gen_len=GEN_LEN),
            }
        torch.manual_seed(1234 + 17 * rank)  # a different random state on each rank: rank 0's picks must win
        got["sampled_all_ranks"] = _all_ranks(model.generate(PROMPTS, max_gen_len=GEN_LEN, temperature=1.0))
        result[case] = got
    try:
        _load(bad_heads, mp_group=group)
        result["bad_heads"] = None
    except Exception as exc:  # noqa: BLE001 -- the test checks the type and message
        result["bad_heads"] = [type(exc).__name__, str(exc)]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, llama_spm_path):
    """What each of the two ranks measured (a list of two dicts), and the cases."""
    root = tmp_path_factory.mktemp("model_parallel_zoo")
    cases = _write_cases(root)
    # internlm with 3 heads cannot be cut in two
    cfg = internlm_full_config(INTERNLM_CONFIGS["layernorm_theta_scaling"])
    bad = write_zoo_checkpoint(root / "internlm_3_heads", random_zoo_state(internlm_shapes(cfg), seed=30), cfg,
                               "internlm", "llama-spm", internlm_split_dim, 1)
    out_dir = root / "results"
    out_dir.mkdir()
    mp.spawn(_worker, args=(_free_port(), cases, str(bad), str(out_dir)), nprocs=WORLD, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


CASES = [f"falcon_{name}" for name in FALCON_CASES] + ["internlm", "llama_adapter", "mixtral", "mixtral_peft",
                                                         "mixtral_sparse"]


@pytest.mark.parametrize("shards", ["mp1", "mp2"])
@pytest.mark.parametrize("case", CASES)
def test_logits_and_greedy_text_match_one_process(ranks, case, shards):
    for result in ranks:
        got = result[case]
        assert got[shards]["logits_diff"] < 1e-5
        assert got[shards]["greedy"] == got["reference_greedy"]
        assert got[shards]["warnings"] == []  # nothing dropped: other ranks' experts are not "unexpected"
    assert any(ranks[0][case]["reference_greedy"])


@pytest.mark.parametrize("case", CASES)
def test_sampled_text_is_the_same_on_every_rank(ranks, case):
    for result in ranks:
        texts = result[case]["sampled_all_ranks"]
        assert texts[0] == texts[1]
        assert texts[0] != result[case]["reference_greedy"]  # temperature 1 really sampled


@pytest.mark.parametrize("name", FALCON_CASES)
def test_falcon_layout(ranks, name):
    cfg = FALCON_CONFIGS[name]
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = dim // heads
    kv_heads = 1 if cfg["multi_query"] else heads // WORLD  # the one multi-query kv head is replicated
    for result in ranks:
        for shards in ("mp1", "mp2"):
            layout = result[f"falcon_{name}"][shards]["layout"]
            params = layout["params"]
            assert params["self_attention.wq.weight"] == [dim // WORLD, dim]
            assert params["self_attention.wk.weight"] == [kv_heads * head_dim, dim]
            assert params["self_attention.dense.weight"] == [dim, dim // WORLD]
            assert params["mlp.dense_h_to_4h.weight"] == [4 * dim // WORLD, dim]
            assert layout["heads"]["self_attention"] == [heads // WORLD, kv_heads]
            assert layout["cache_kv_heads"] == kv_heads


def test_internlm_layout_holds_whole_heads_of_q_k_and_v(ranks):
    dim = INTERNLM_CONFIGS["rmsnorm"]["hidden_size"]
    for result in ranks:
        for shards in ("mp1", "mp2"):
            params = result["internlm"][shards]["layout"]["params"]
            assert params["mixer.Wqkv.weight"] == [3 * dim // WORLD, dim]
            assert params["mixer.Wqkv.bias"] == [3 * dim // WORLD]
            ffn = params["mlp.w1.weight"][0] * WORLD
            assert params["mlp.w2.weight"] == [ffn // WORLD, dim]  # cut like w1 at runtime, not as stored
            assert params["mlp.w3.weight"] == [dim, ffn // WORLD]


def test_mixtral_ranks_hold_whole_experts(ranks):
    per_rank = NUM_EXPERTS // WORLD
    for rank, result in enumerate(ranks):
        for case in ("mixtral", "mixtral_peft"):
            for shards in ("mp1", "mp2"):
                layout = result[case][shards]["layout"]
                assert layout["experts"] == list(range(rank * per_rank, (rank + 1) * per_rank))
                assert layout["params"]["feed_forward.gate.weight"] == [NUM_EXPERTS, MIXTRAL_CFG["dim"]]


def test_mixtral_sparse_ranks_hold_a_slice_of_every_expert(ranks):
    rows = NUM_EXPERTS * MIXTRAL_CFG["hidden_dim"] // WORLD
    for result in ranks:
        for shards in ("mp1", "mp2"):
            params = result["mixtral_sparse"][shards]["layout"]["params"]
            for w in ("w1", "w2", "w3"):
                assert params[f"feed_forward.{w}"] == [rows, MIXTRAL_CFG["dim"]]


def test_heads_that_do_not_divide_are_a_clear_error(ranks):
    for result in ranks:
        kind, message = result["bad_heads"]
        assert kind == "ConfigError"
        assert "heads=3 is not divisible by the model-parallel size 2" in message


# --------------------------------------------------------------------------- the plan alone (no processes)

def test_internlm_rank_piece_from_stored_shards_is_whole_heads():
    """A rank's Wqkv piece, from the original's contiguous 2-shard cut or from the full tensor, is
    rows [q_r, k_r, v_r]; w2 / w3 are re-cut by rows / columns whatever their stored cut."""
    from accessory.model.LLM.internlm import Transformer
    plan = Transformer.split_plan
    dim = 8
    wqkv = torch.arange(3 * dim * 2, dtype=torch.float32).reshape(3 * dim, 2)
    bias = torch.arange(3 * dim, dtype=torch.float32)
    w2 = torch.randn(12, dim)
    w3 = torch.randn(dim, 12)
    for rank in range(2):
        rows = torch.cat([torch.arange(b * dim + rank * dim // 2, b * dim + (rank + 1) * dim // 2) for b in range(3)])
        for name, full in (("layers.0.mixer.Wqkv.weight", wqkv), ("layers.0.mixer.Wqkv.bias", bias)):
            stored = list(torch.chunk(full, 2, dim=0))  # the original's ColumnParallelLinear pieces
            for pieces in (stored, [full]):
                assert torch.equal(plan.local_piece(name, pieces, rank, 2), full[rows])
            assert plan.local_shape(name, tuple(full.shape), rank, 2) == tuple(full[rows].shape)
        assert torch.equal(plan.local_piece("layers.0.mlp.w2.weight", list(torch.chunk(w2, 2, dim=1)), rank, 2),
                           torch.chunk(w2, 2, dim=0)[rank])
        assert torch.equal(plan.local_piece("layers.0.mlp.w3.weight", list(torch.chunk(w3, 2, dim=0)), rank, 2),
                           torch.chunk(w3, 2, dim=1)[rank])
    # checkpoints keep the original's cut
    assert [tuple(p.shape) for p in plan.split("layers.0.mlp.w2.weight", w2, 2)] == [(12, dim // 2)] * 2
    assert torch.equal(plan.merge("layers.0.mixer.Wqkv.bias", list(torch.chunk(bias, 2))), bias)


def test_whole_experts_rank_holds_only_its_own():
    from accessory.model.LLM.mixtral import split_plan_for
    plan = split_plan_for(4)
    name = "layers.1.feed_forward.experts.3.w1.weight"
    assert [plan.holds(name, rank, 2) for rank in range(2)] == [False, True]
    assert plan.local_shape(name, (6, 4), 0, 2) is None and plan.local_shape(name, (6, 4), 1, 2) == (6, 4)
    assert plan.reduce_at(name) == "layers.1.feed_forward"
    assert plan.reduce_at("layers.1.feed_forward.gate.weight") is None
