"""Multimodal llama_types cut over two model-parallel ranks (gloo, two CPU processes).

One type of each family: llama_qformerv2, llama_qformerv2_peft (LoRA and biases), the CLIP prefix
of llama and of mixtral (whole experts per rank), llama_adapter with its visual branch, llama_ens and mixtral_sparse_ens (SPHINX). Each
is loaded with ``mp_group`` of size 2 from its 1-shard checkpoint and from a 2-shard one written as
the original writes it (text weights cut by the original's rules, restated in the test helpers
imported below; encoders and projections whole in both shards), and compared with one process
loading the 1-shard checkpoint: logits of three prompts with three images (an odd batch, so the
image batch split pads it) and their greedy answers. Each rank also reports the batch sizes its
``encode_images`` saw (its padded slice, 2 of 3) and that it holds every encoder weight whole.

Checkpoints and tiny encoders come from tests/test_mm_types_a.py, test_mm_types_ens.py,
test_llama_peft_adapter.py and test_mixtral.py. One spawn runs every case (process start-up
dominates the cost).
"""

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
PROMPTS = ["What is in the image?", "Describe it.", "Hi"]
GEN_LEN = 6
MAX_SEQ_LEN = 160
CASES = ("llama_qformerv2", "llama_qformerv2_peft", "llama", "mixtral", "llama_adapter", "llama_ens", "mixtral_sparse_ens")
TEXT_PREFIXES = ("tok_embeddings.", "layers.", "norm.", "output.", "prefix")  # prefix*: llama_adapter's


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _images(seed: int, n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- checkpoints

def _write_cases(root: Path) -> dict:
    """{case: {"type", "size", "mp1", "mp2"}}: 1- and 2-shard checkpoints in the original's layout."""
    import ckpt_utils
    import test_llama_peft_adapter as tpa
    import test_mixtral
    import test_mm_types_a as mma
    import test_mm_types_ens as ens

    cases = {}

    def add(name, llama_type, state, config, size, writer=tpa.write_original_checkpoint):
        dirs = {}
        for n in (1, 2):
            if writer is test_mixtral.write_original_checkpoint:
                dirs[f"mp{n}"] = str(writer(root / f"{name}_mp{n}", state, config, llama_type, n))
            else:
                dirs[f"mp{n}"] = str(writer(root / f"{name}_mp{n}", state, llama_type, config, n))
        cases[name] = {"type": llama_type, "size": size, **dirs}

    vocab, dim = ckpt_utils.LLAMA_SPM_VOCAB, ckpt_utils.TINY_LLAMA["dim"]
    text = ckpt_utils.random_llama_state(ckpt_utils.TINY_LLAMA, vocab, seed=31)
    add("llama_qformerv2", "llama_qformerv2", {**text, **mma.visual_state("llama_qformerv2", dim)},
        dict(ckpt_utils.TINY_LLAMA, qformer_config=mma.QFORMER_TINY), mma.SIZE)
    _, peft_cfg = tpa.CONFIGS["peft_lora_bias"]
    peft = tpa.random_state("llama_peft", peft_cfg, seed=32)
    add("llama_qformerv2_peft", "llama_qformerv2_peft",
        {**peft, **mma.visual_state("llama_qformerv2_peft", peft_cfg["dim"], seed=4)},
        dict(tpa.full_config("llama_peft", peft_cfg), qformer_config=mma.QFORMER_TINY), mma.SIZE)
    add("llama", "llama", {**text, **mma.visual_state("llama", dim, seed=5)},
        dict(ckpt_utils.TINY_LLAMA, clip_config=mma.CLIP_TINY), mma.SIZE)
    dense, _ = mma.text_state("mixtral", mma.text_config("mixtral"))
    add("mixtral", "mixtral", {**dense, **mma.visual_state("mixtral", dim, seed=6)},
        dict(mma.text_config("mixtral"), clip_config=mma.CLIP_TINY), mma.SIZE,
        writer=test_mixtral.write_original_checkpoint)
    adapter = mma.AdapterCase(root / "adapter_source")
    add("llama_adapter", "llama_adapter", {**adapter.text, **adapter.visual},
        json.loads((adapter.directory / "config.json").read_text()), mma.SIZE)
    add("llama_ens", "llama_ens", ens.random_state("llama_ens"), ens.config("llama_ens"), ens.TYPES["llama_ens"][0])
    add("mixtral_sparse_ens", "mixtral_sparse_ens", ens.random_state("mixtral_sparse_ens"),
        ens.config("mixtral_sparse_ens"), ens.TYPES["mixtral_sparse_ens"][0], writer=test_mixtral.write_original_checkpoint)
    return cases


# --------------------------------------------------------------------------- the ranks

def _load(path, **kwargs):
    from accessory.model.meta import MetaModel
    return MetaModel.from_pretrained(path, with_visual=True, dtype=torch.float32, device="cpu",
                                     max_seq_len=MAX_SEQ_LEN, progress=False, **kwargs)


def _visual_shapes(model) -> dict:
    return {k: list(v.shape) for k, v in model.llma.state_dict().items() if not k.startswith(TEXT_PREFIXES)}


def _picture_chat(model, reference, image) -> dict:
    """Two turns about one picture with the prompt cache on: where the second turn's prefill
    starts, its answer, and the one-process answer without the cache."""
    model.engine.prompt_cache = True
    first = model.generate([PROMPTS[0]], image, max_gen_len=GEN_LEN)[0]
    follow = PROMPTS[0] + first + " " + PROMPTS[1]
    starts, forward = [], model.llma.forward_tokens

    def counting(tokens, positions, *rest, **kwargs):
        if positions.shape[1] > 1:
            starts.append(int(positions[0, 0]))
        return forward(tokens, positions, *rest, **kwargs)
    model.llma.forward_tokens = counting
    text = model.generate([follow], image, max_gen_len=GEN_LEN)[0]
    model.llma.forward_tokens = forward
    model.engine.prompt_cache = False
    return {"start": starts[0], "text": text, "expected": reference.generate([follow], image, max_gen_len=GEN_LEN)[0],
            "words": model.get_image_words(), "layout": model.llma.image_layout}


def _worker(rank: int, port: int, cases: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    group = dist.new_group(list(range(WORLD)))
    result = {}
    for name, info in cases.items():
        images = _images(7, len(PROMPTS), info["size"])
        reference = _load(info["mp1"])
        expected = reference.compute_logits(PROMPTS, images)
        got = {"reference_greedy": reference.generate(PROMPTS, images, max_gen_len=GEN_LEN),
               "reference_visual": _visual_shapes(reference),
               "reference_wq_rows": reference.llma.layers[0].attention.wq.weight.shape[0]}
        for key in ("mp1", "mp2"):
            model = _load(info[key], mp_group=group)
            seen = []
            encode = model.llma.encode_images

            def recording(batch, encode=encode, seen=seen):
                seen.append(batch.shape[0])
                return encode(batch)
            model.llma.encode_images = recording
            logits = model.compute_logits(PROMPTS, images)
            got[key] = {
                "max_diff": max((a - b).abs().max().item() for a, b in zip(logits, expected)),
                "close": all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(logits, expected)),
                "greedy": model.generate(PROMPTS, images, max_gen_len=GEN_LEN),
                "encoded_batches": list(seen),
                "visual": _visual_shapes(model),
                "wq_rows": model.llma.layers[0].attention.wq.weight.shape[0],
            }
            if key == "mp2":
                got[key]["chat"] = _picture_chat(model, reference, images[:1])
        result[name] = got
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("transformers")  # the imported checkpoint builders need it
    root = tmp_path_factory.mktemp("mm_model_parallel")
    cases = _write_cases(root)
    out_dir = root / "results"
    out_dir.mkdir()
    mp.spawn(_worker, args=(_free_port(), cases, str(out_dir)), nprocs=WORLD, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("shards", ["mp1", "mp2"])
@pytest.mark.parametrize("case", CASES)
def test_logits_and_greedy_text_match_one_process(ranks, case, shards):
    for rank in range(WORLD):
        got = ranks[rank][case]
        assert got[shards]["close"], f"rank {rank}: max |diff| {got[shards]['max_diff']}"
        assert got[shards]["greedy"] == got["reference_greedy"]
        assert any(got["reference_greedy"])  # the answers are not all empty


@pytest.mark.parametrize("case", CASES)
def test_a_picture_chat_reuses_the_picture_on_every_rank(ranks, case):
    """With the prompt cache on, the next turn about the same picture prefills from after the
    picture and the first turn on both ranks (the adapter's picture takes no positions), and
    answers as one process without the cache."""
    for rank in range(WORLD):
        chat = ranks[rank][case]["mp2"]["chat"]
        assert chat["text"] == chat["expected"]
        assert chat["start"] > chat["words"] > (-1 if chat["layout"] == "adapter" else 0)
    assert ranks[0][case]["mp2"]["chat"]["start"] == ranks[1][case]["mp2"]["chat"]["start"]


@pytest.mark.parametrize("case", CASES)
def test_each_rank_encodes_its_padded_slice_of_the_image_batch(ranks, case):
    # three images over two ranks: padded to four, two per rank (compute_logits, then generate)
    for rank in range(WORLD):
        assert ranks[rank][case]["mp2"]["encoded_batches"] == [2, 2]


@pytest.mark.parametrize("case", CASES)
def test_every_rank_holds_the_encoders_and_projections_whole(ranks, case):
    for rank in range(WORLD):
        got = ranks[rank][case]
        for shards in ("mp1", "mp2"):
            assert got[shards]["visual"] == got["reference_visual"]
            assert got[shards]["wq_rows"] * WORLD == got["reference_wq_rows"]  # while the text side is cut
        assert got["reference_visual"]


def test_one_process_encodes_the_whole_batch(tmp_path):
    """Without a group, encode_images sees the whole batch (no split, no collective)."""
    import test_mm_types_ens as ens
    from accessory.model.layers import multimodal
    from ckpt_utils import write_checkpoint
    name = "llama_ens_light"
    directory = write_checkpoint(tmp_path, ens.random_state(name), ens.config(name), full_config=False,
                                 llama_type=name)
    model = _load(str(directory))
    assert getattr(model.llma, "image_batch_split", None) is None
    images = _images(3, 3, ens.TYPES[name][0])
    torch.testing.assert_close(multimodal.encode_for(model.llma, images), model.llma.encode_images(images),
                               atol=0, rtol=0)
