"""Write checkpoints the way the original LLaMA2-Accessory (and Meta) write them, for tests.

Everything here is an independent re-statement of /work/shared/ORIGINAL.md ("Checkpoint directory
and file format", "Model-parallel split rules", llama's keys and FFN width). It deliberately does
not import the package's split plan or model code, so a test that writes with these helpers and
loads with ``accessory`` checks one implementation against the other.

Typical use::

    from ckpt_utils import TINY_LLAMA, random_llama_state, write_checkpoint, llama_spm_tokenizer

    state = random_llama_state(TINY_LLAMA, vocab_size=32000)       # keys without "llma."
    ckpt = write_checkpoint(tmp_path / "ckpt", state, TINY_LLAMA, mp=2)
    model = MetaModel.from_pretrained(ckpt, dtype=torch.float32, device="cpu")

``tests/`` is on ``sys.path`` under pytest (rootdir-relative imports), so ``import ckpt_utils``
works from any test module.
"""

import json
import math
import os
import shutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import pytest
import torch

PathLike = Union[str, Path]

#: A llama small enough to load and run in milliseconds: hd = 16, 2 kv heads (GQA, n_rep = 2),
#: FFN width int(2*4*64/3) = 170 -> 192 (multiple_of 32).
TINY_LLAMA = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5,
                  rope_theta=10000.0)

#: The prefix the original's MetaModel puts before every language-model key.
PREFIX = "llma."

#: The tokenizer every tiny checkpoint uses unless told otherwise (Llama 2 SentencePiece).
LLAMA_SPM_VOCAB = 32000


# --------------------------------------------------------------------------- shared fixtures

def shared_dir() -> Path:
    """The project's shared/ folder (``$ACCESSORY_SHARED``, else ``<repo>/../shared``), or skip."""
    path = Path(os.environ.get("ACCESSORY_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    if not (path / "fixtures" / "tokenizers").is_dir():
        pytest.skip(f"shared fixtures not found at {path}/fixtures/tokenizers "
                    f"(set ACCESSORY_SHARED to the shared/ folder)")
    return path


def tokenizer_fixture(name: str = "llama-spm") -> Path:
    """Folder of one real tokenizer under shared/fixtures/tokenizers (see its README), or skip."""
    folder = shared_dir() / "fixtures" / "tokenizers" / name
    if not folder.is_dir():
        pytest.skip(f"tokenizer fixture {folder} is missing")
    return folder


def llama_spm_tokenizer() -> Path:
    """Path of the Llama 2 ``tokenizer.model`` (32000 pieces), or skip."""
    return tokenizer_fixture("llama-spm") / "tokenizer.model"


# --------------------------------------------------------------------------- weights

def llama_ffn_dim(cfg: Mapping) -> int:
    """The original llama FFN width: int(2*4*dim/3), times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * cfg["dim"]) / 3)
    if cfg.get("ffn_dim_multiplier") is not None:
        hidden = int(cfg["ffn_dim_multiplier"] * hidden)
    multiple_of = cfg.get("multiple_of", 256)
    return multiple_of * math.ceil(hidden / multiple_of)


def llama_shapes(cfg: Mapping, vocab_size: int) -> Dict[str, tuple]:
    """Every parameter of a ``llama`` model at mp=1, in the original's order, keys without ``llma.``."""
    dim, n_heads = cfg["dim"], cfg["n_heads"]
    n_kv_heads = cfg.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads
    ffn = llama_ffn_dim(cfg)
    shapes = {"tok_embeddings.weight": (vocab_size, dim)}
    for layer in range(cfg["n_layers"]):
        p = f"layers.{layer}."
        shapes.update({
            p + "attention.wq.weight": (n_heads * head_dim, dim),
            p + "attention.wk.weight": (n_kv_heads * head_dim, dim),
            p + "attention.wv.weight": (n_kv_heads * head_dim, dim),
            p + "attention.wo.weight": (dim, n_heads * head_dim),
            p + "feed_forward.w1.weight": (ffn, dim),
            p + "feed_forward.w2.weight": (dim, ffn),
            p + "feed_forward.w3.weight": (ffn, dim),
            p + "attention_norm.weight": (dim,),
            p + "ffn_norm.weight": (dim,),
        })
    shapes["norm.weight"] = (dim,)
    shapes["output.weight"] = (vocab_size, dim)
    return shapes


def random_llama_state(cfg: Mapping, vocab_size: int, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Random ``llama`` weights, keys in the original's layout WITHOUT the ``llma.`` prefix.

    Scales keep the logits spread out (std about 1-2 over the vocabulary, so greedy decoding has
    clear winners and no ties): embeddings ~N(0, 1), each linear ~N(0, 1/in_features), norm
    weights ~1 + N(0, 0.1). Deterministic for a given ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in llama_shapes(cfg, vocab_size).items():
        if key.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key == "tok_embeddings.weight":
            value = torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
            if key == "output.weight":
                value = value * 2.0
        state[key] = value.to(dtype)
    return state


# --------------------------------------------------------------------------- model-parallel split

def llama_split_dim(key: str) -> Optional[int]:
    """The dim the original cuts ``key`` along across model-parallel ranks (None = replicated).

    ParallelEmbedding splits the embedding dim (1); ColumnParallelLinear (wq wk wv w1 w3 and the
    output head) its rows (0); RowParallelLinear (wo w2) its columns (1); norms are replicated.
    """
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    last = name.split(".")[-2] if name.count(".") else name
    if name == "tok_embeddings.weight":
        return 1
    if name == "output.weight":
        return 0
    if last in ("wq", "wk", "wv", "w1", "w3"):
        return 0
    if last in ("wo", "w2"):
        return 1
    return None


def split_for_mp(state: Mapping[str, torch.Tensor], mp: int) -> List[Dict[str, torch.Tensor]]:
    """Cut a full state dict into ``mp`` per-rank state dicts by the original's split rules.

    Replicated tensors are copied to every rank. Each piece is a contiguous copy, so that
    ``torch.save`` writes only the piece and safetensors accepts it.
    """
    shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for key, tensor in state.items():
        dim = llama_split_dim(key)
        if dim is None or mp == 1:
            for shard in shards:
                shard[key] = tensor.clone()
            continue
        if tensor.shape[dim] % mp:
            raise ValueError(f"{key} {tuple(tensor.shape)}: dim {dim} is not divisible by mp={mp}")
        for rank, piece in enumerate(torch.chunk(tensor, mp, dim=dim)):
            shards[rank][key] = piece.contiguous().clone()
    return shards


def merge_from_mp(shards: List[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`split_for_mp` (concatenate split tensors, take rank 0's replicas)."""
    merged = {}
    for key in shards[0]:
        dim = llama_split_dim(key)
        pieces = [s[key] for s in shards]
        merged[key] = pieces[0] if dim is None or len(pieces) == 1 else torch.cat(pieces, dim=dim)
    return merged


# --------------------------------------------------------------------------- writing

FORMATS = ("consolidated", "meta_ori", "safetensors", "diff", "diff_safetensors", "meta_safetensors")


def shard_name(fmt: str, rank: int, mp: int) -> str:
    """File name of rank ``rank`` of ``mp`` in format ``fmt`` (see :data:`FORMATS`)."""
    return {
        "consolidated": f"consolidated.{rank:02d}-of-{mp:02d}.model.pth",
        "safetensors": f"consolidated.{rank:02d}-of-{mp:02d}.model.safetensors",
        "diff": f"consolidated.{rank:02d}-of-{mp:02d}.model-diff.pth",
        "diff_safetensors": f"consolidated.{rank:02d}-of-{mp:02d}.model-diff.safetensors",
        "meta_ori": f"consolidated.{rank:02d}.pth",
        "meta_safetensors": f"consolidated.{rank:02d}.safetensors",
    }[fmt]


def full_llama_config(cfg: Mapping, vocab_size: int, max_seq_len: int = 2048) -> Dict:
    """``asdict(ModelArgs)`` as the original's llama writes it to config.json (every field)."""
    config = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, vocab_size=vocab_size,
                  multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=10000,
                  max_batch_size=32, max_seq_len=max_seq_len, rope_scaling=None)
    config.update(cfg)
    return config


def meta_rope_freqs(cfg: Mapping) -> torch.Tensor:
    """The ``rope.freqs`` buffer Meta's consolidated.NN.pth files carry: (head_dim/2,) inverse frequencies."""
    head_dim = cfg["dim"] // cfg["n_heads"]
    theta = cfg.get("rope_theta", 10000.0)
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


def write_checkpoint(directory: PathLike, state: Mapping[str, torch.Tensor], cfg: Optional[Mapping], *,
                     mp: int = 1, fmt: str = "consolidated", tokenizer: Optional[str] = "llama-spm",
                     write_meta: bool = True, write_config: bool = True,
                     dtype: Optional[torch.dtype] = None, full_config: bool = True,
                     vocab_size: Optional[int] = None, llama_type: str = "llama") -> Path:
    """Write ``state`` (keys without ``llma.``) as a checkpoint directory; returns the directory.

    Formats (:data:`FORMATS`):

    * ``consolidated``: ``torch.save({"model": {"llma."+k: v}}, "consolidated.NN-of-MM.model.pth")``
    * ``diff``: the same dicts named ``consolidated.NN-of-MM.model-diff.pth`` (values are deltas)
    * ``meta_ori``: Meta's ``consolidated.NN.pth``: a bare dict, no prefix, no wrapper, plus
      ``rope.freqs`` (which the model has no parameter for)
    * ``safetensors`` / ``diff_safetensors``: flat ``{"llma."+k: v}`` in ``.safetensors`` files
    * ``meta_safetensors``: Meta's keys (no prefix) in ``consolidated.NN.safetensors``

    ``mp``: model-parallel size, split by :func:`split_for_mp`. ``dtype``: cast floating tensors
    first (None keeps them). ``cfg``: written as config.json when ``write_config`` -- the full
    ``asdict(ModelArgs)`` as the original writes it when ``full_config`` (needs ``vocab_size``,
    default: rows of ``tok_embeddings.weight``), else ``cfg`` as given. ``write_meta``:
    ``meta.json = {"llama_type": llama_type}``. ``tokenizer``: a fixture name under
    shared/fixtures/tokenizers (its ``tokenizer.model``, or its ``tokenizer.json`` +
    ``tokenizer_config.json`` when there is no .model) or None for no tokenizer.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; one of {FORMATS}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    meta_layout = fmt in ("meta_ori", "meta_safetensors")
    for rank, shard in enumerate(split_for_mp(state, mp)):
        if meta_layout:
            entries = dict(shard)
            if cfg is not None:
                entries["rope.freqs"] = meta_rope_freqs(cfg)
        else:
            entries = {PREFIX + k: v for k, v in shard.items()}
        path = directory / shard_name(fmt, rank, mp)
        if fmt.endswith("safetensors"):
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in entries.items()}, str(path))
        elif meta_layout:
            torch.save(entries, path)
        else:
            torch.save({"model": entries}, path)
    if write_config and cfg is not None:
        if full_config:
            if vocab_size is None and "tok_embeddings.weight" in state:
                vocab_size = state["tok_embeddings.weight"].shape[0]
            config = full_llama_config(cfg, vocab_size if vocab_size is not None else -1)
        else:
            config = dict(cfg)
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    if write_meta:
        (directory / "meta.json").write_text(json.dumps({"llama_type": llama_type}))
    if tokenizer is not None:
        source = tokenizer_fixture(tokenizer)
        if (source / "tokenizer.model").is_file():
            shutil.copy(source / "tokenizer.model", directory / "tokenizer.model")
        else:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(source / name, directory / name)
    return directory


def prefixed(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with ``llma.`` before every key, as ``MetaModel.state_dict()`` names them."""
    return {PREFIX + k: v for k, v in state.items()}


# --------------------------------------------------------------------------- scoring

def expected_evaluation(logits: torch.Tensor, ids: List[int], context_len: int) -> Dict[str, object]:
    """What the original's ``evaluate_examples`` gives for one example, from reference ``logits``
    (seq, vocab): tokens after the context scored with cross entropy (ignore_index 0);
    ``ppl`` is the MEAN negative log-likelihood, as the original names it."""
    start = context_len - 1
    scored = logits[start:-1].double()
    labels = torch.tensor(ids[start + 1:])
    nll = torch.nn.functional.cross_entropy(scored, labels, reduction="none", ignore_index=0)
    return {"log_likelihood": -nll.sum().item(), "ppl": nll.mean().item(),
            "max_equal": bool((scored.argmax(-1) == labels).all())}
