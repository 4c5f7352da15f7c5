"""Resharding (accessory reshard) and delta weights (accessory delta apply / extract).

Checkpoints are written with tests/ckpt_utils.py and tests/test_mixtral.py's independent statement
of the original's split rules, so resharded shards are compared against that reference, not only
against our own merge.
"""

from pathlib import Path

import pytest
import torch

from accessory.checkpoint.delta import apply_delta, extract_delta
from accessory.checkpoint.reshard import reshard
from accessory.cli import main as cli_main
from accessory.errors import CheckpointError
from accessory.model.meta import MetaModel

from ckpt_utils import PREFIX, TINY_LLAMA, random_llama_state, split_for_mp, write_checkpoint
from test_mixtral import CFG as MIXTRAL_CFG
from test_mixtral import original_config, original_shards, random_mixtral_state, write_original_checkpoint

VOCAB = 32000
#: n_kv_heads = 4 so that mp = 4 holds whole key/value heads (TINY_LLAMA's 2 cannot go past mp = 2).
LLAMA4 = dict(TINY_LLAMA, n_kv_heads=4)
MIXTRAL4 = dict(MIXTRAL_CFG, n_kv_heads=4)
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello"]


def shard(directory: Path, rank: int, mp: int, diff: bool = False):
    name = f"consolidated.{rank:02d}-of-{mp:02d}.model{'-diff' if diff else ''}.pth"
    return torch.load(directory / name, weights_only=True)["model"]


def assert_same(actual, expected):
    """Same keys, same dtypes, bit-identical values."""
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


def logits(paths, **kwargs):
    model = MetaModel.from_pretrained(paths, dtype=torch.float32, device="cpu", max_seq_len=64, progress=False,
                                      **kwargs)
    return model.compute_logits(TEXTS)


# --------------------------------------------------------------------------- reshard

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_llama_reshard_round_trip_is_bit_identical(tmp_path, dtype):
    state = random_llama_state(LLAMA4, VOCAB, dtype=dtype)
    src = write_checkpoint(tmp_path / "mp1", state, LLAMA4, mp=1)
    reshard(src, tmp_path / "mp2", 2, progress=False)
    reshard(tmp_path / "mp2", tmp_path / "mp4", 4, progress=False)
    reshard(tmp_path / "mp4", tmp_path / "back", 1, progress=False)
    for mp in (2, 4):  # each rank equals the original's own split of the full weights
        for rank, expected in enumerate(split_for_mp(state, mp)):
            assert_same(shard(tmp_path / f"mp{mp}", rank, mp), {PREFIX + k: v for k, v in expected.items()})
    assert_same(shard(tmp_path / "back", 0, 1), shard(src, 0, 1))
    for name in ("config.json", "meta.json", "tokenizer.model"):
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes()


def test_mixtral_reshard_round_trip_is_bit_identical(tmp_path):
    state = random_mixtral_state(MIXTRAL4, seed=3)
    config = original_config(MIXTRAL4, "mixtral")
    src = write_original_checkpoint(tmp_path / "mp1", state, config, "mixtral", mp=1)
    reshard(src, tmp_path / "mp2", 2, progress=False)
    reshard(tmp_path / "mp2", tmp_path / "mp4", 4, progress=False)
    reshard(tmp_path / "mp4", tmp_path / "back", 1, progress=False)
    for mp in (2, 4):  # whole experts per rank, by global index, as the original saves them
        for rank, expected in enumerate(original_shards(state, mp)):
            actual = shard(tmp_path / f"mp{mp}", rank, mp)
            assert sorted(actual) == sorted(PREFIX + k for k in expected)
            for key, value in expected.items():
                assert torch.equal(actual[PREFIX + key], value), key
    assert_same(shard(tmp_path / "back", 0, 1), shard(src, 0, 1))
    torch.testing.assert_close(logits(str(tmp_path / "mp4")), logits(str(src)), rtol=0, atol=0)


def test_resharded_meta_checkpoint_gives_the_same_logits(tmp_path):
    state = random_llama_state(TINY_LLAMA, VOCAB)
    src = write_checkpoint(tmp_path / "meta", state, TINY_LLAMA, mp=2, fmt="meta_ori", dtype=torch.bfloat16)
    out = reshard(src, tmp_path / "mp1", 1, progress=False)
    written = shard(out, 0, 1)
    assert written[PREFIX + "layers.0.attention.wq.weight"].dtype == torch.bfloat16  # source dtype kept
    torch.testing.assert_close(logits(str(out)), logits(str(src)), rtol=0, atol=0)
    as_fp32 = reshard(src, tmp_path / "fp32", 2, dtype=torch.float32, progress=False)
    assert shard(as_fp32, 1, 2)[PREFIX + "norm.weight"].dtype == torch.float32


def test_reshard_errors(tmp_path):
    src = write_checkpoint(tmp_path / "src", random_llama_state(TINY_LLAMA, VOCAB), TINY_LLAMA, mp=1)
    with pytest.raises(CheckpointError, match=r"n_heads = 4 .*mp = 3"):
        reshard(src, tmp_path / "mp3", 3, progress=False)
    assert not (tmp_path / "mp3").exists()  # refused before anything is written
    reshard(src, tmp_path / "out", 2, progress=False)
    with pytest.raises(CheckpointError, match="already holds weight shards"):
        reshard(src, tmp_path / "out", 2, progress=False)
    with pytest.raises(CheckpointError, match="also an input"):
        reshard(src, src, 2, progress=False)
    (src / "config.json").unlink()
    with pytest.raises(Exception, match="config.json does not exist"):
        reshard(src, tmp_path / "noconfig", 2, progress=False)


def test_mixtral_experts_must_divide(tmp_path):
    cfg = dict(MIXTRAL_CFG, n_heads=8, n_kv_heads=8)
    state = random_mixtral_state(cfg, seed=1)
    src = write_original_checkpoint(tmp_path / "src", state, original_config(cfg, "mixtral"), "mixtral", mp=1)
    with pytest.raises(CheckpointError, match="4 experts cannot be spread evenly over 8"):
        reshard(src, tmp_path / "mp8", 8, progress=False)


# --------------------------------------------------------------------------- delta weights

def finetune_of(state, seed=7, scale=1e-2):
    """Weights a fine-tune might produce: the base plus small changes."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v.float() + scale * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
            for k, v in state.items()}


def test_delta_round_trip_fp32_is_exact_with_meta_base(tmp_path):
    base_state = random_llama_state(TINY_LLAMA, VOCAB)
    ft_state = finetune_of(base_state)
    base = write_checkpoint(tmp_path / "base", base_state, TINY_LLAMA, mp=2, fmt="meta_ori", tokenizer=None,
                            write_meta=False, write_config=False)
    ft = write_checkpoint(tmp_path / "ft", ft_state, TINY_LLAMA, mp=1)
    with pytest.warns(UserWarning, match=r"1 base entries not in the fine-tuned checkpoint, left out: llma\.rope\.freqs$"):
        delta = extract_delta(base, ft, tmp_path / "delta", progress=False)
    written = shard(delta, 0, 1, diff=True)
    for key, value in ft_state.items():
        torch.testing.assert_close(written[PREFIX + key], value - base_state[key], rtol=0, atol=0)
    assert (delta / "config.json").is_file() and (delta / "tokenizer.model").is_file()

    with pytest.warns(UserWarning, match=r"1 base entries the model has no parameter for, dropped: llma\.rope\.freqs"):
        again = apply_delta(base, delta, tmp_path / "again", progress=False)
    assert_same(shard(again, 0, 1), shard(ft, 0, 1))  # fp32: exact

    # from_pretrained adds the delta onto the base itself
    torch.testing.assert_close(logits([str(base), str(delta)], llama_type="llama",
                                      llama_config=str(ft / "config.json"), tokenizer_path=str(ft / "tokenizer.model")),
                               logits(str(ft)), rtol=1e-5, atol=1e-5)


def test_delta_bf16_within_one_ulp_at_other_mp_sizes(tmp_path):
    base_state = random_llama_state(LLAMA4, VOCAB, dtype=torch.bfloat16)
    ft_state = finetune_of(base_state, scale=0.05)
    base = write_checkpoint(tmp_path / "base", base_state, LLAMA4, mp=1)
    ft = write_checkpoint(tmp_path / "ft", ft_state, LLAMA4, mp=2)
    delta = extract_delta(base, ft, tmp_path / "delta", mp=4, progress=False)
    assert len(list(delta.glob("consolidated.*-of-04.model-diff.pth"))) == 4
    assert shard(delta, 0, 4, diff=True)[PREFIX + "norm.weight"].dtype == torch.bfloat16
    again = apply_delta(base, delta, tmp_path / "again", mp=1, progress=False)
    rebuilt = shard(again, 0, 1)
    exact = total = 0
    for key, expected in ft_state.items():
        value = rebuilt[PREFIX + key]
        assert value.dtype == torch.bfloat16
        error = (value.float() - expected.float()).abs()
        # the bf16 delta is rounded at the scale of the larger of base and finetuned: one ulp of that
        scale = torch.maximum(expected.float().abs(), base_state[key].float().abs()).clamp_min(1e-30)
        ulp = 2.0 ** (torch.floor(torch.log2(scale)) - 7)
        assert bool((error <= ulp).all()), key
        exact += int((error == 0).sum())
        total += error.numel()
    assert exact / total > 0.9


def test_finetuned_only_keys_are_stored_whole(tmp_path):
    base_state = random_llama_state(TINY_LLAMA, VOCAB)
    ft_state = dict(finetune_of(base_state), **{"extra_proj.weight": torch.randn(8, 64)})
    base = write_checkpoint(tmp_path / "base", base_state, TINY_LLAMA, mp=1)
    ft = write_checkpoint(tmp_path / "ft", ft_state, TINY_LLAMA, mp=1)
    with pytest.warns(UserWarning, match=r"1 fine-tuned entries with no base weight, stored whole.*extra_proj"):
        delta = extract_delta(base, ft, tmp_path / "delta", progress=False)
    assert torch.equal(shard(delta, 0, 1, diff=True)[PREFIX + "extra_proj.weight"], ft_state["extra_proj.weight"])
    with pytest.warns(UserWarning, match="new parameters"):
        again = apply_delta(base, delta, tmp_path / "again", progress=False)
    assert_same(shard(again, 0, 1), shard(ft, 0, 1))


def test_delta_errors(tmp_path):
    state = random_llama_state(TINY_LLAMA, VOCAB)
    base = write_checkpoint(tmp_path / "base", state, TINY_LLAMA, mp=1)
    delta = write_checkpoint(tmp_path / "delta", state, TINY_LLAMA, mp=1, fmt="diff")
    with pytest.raises(CheckpointError, match="delta .* cannot be a base"):
        apply_delta(delta, base, tmp_path / "out", progress=False)
    other = dict(TINY_LLAMA, dim=32)
    small = write_checkpoint(tmp_path / "small", random_llama_state(other, VOCAB), other, mp=1)
    with pytest.raises(CheckpointError, match="shapes .* differ"):
        extract_delta(small, base, tmp_path / "out2", progress=False)


# --------------------------------------------------------------------------- command line

def test_cli(tmp_path, capsys):
    state = random_llama_state(TINY_LLAMA, VOCAB)
    base = write_checkpoint(tmp_path / "base", state, TINY_LLAMA, mp=1)
    ft = write_checkpoint(tmp_path / "ft", finetune_of(state), TINY_LLAMA, mp=1)
    assert cli_main(["reshard", str(ft), str(tmp_path / "ft2"), "--mp", "2", "--quiet"]) == 0
    assert cli_main(["delta", "extract", str(base), str(tmp_path / "ft2"), str(tmp_path / "d"), "--quiet"]) == 0
    assert cli_main(["delta", "apply", str(base), str(tmp_path / "d"), str(tmp_path / "ft3"), "--mp", "1",
                     "--quiet"]) == 0
    assert_same(shard(tmp_path / "ft3", 0, 1), shard(ft, 0, 1))
    assert cli_main(["reshard", str(ft), str(tmp_path / "bad"), "--mp", "3", "--quiet"]) == 1
    assert "n_heads = 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["reshard", "--help"])
    assert "accessory reshard ./llama2-13b-mp2" in capsys.readouterr().out
