"""``accessory download`` against a fake release repo on disk (no network).

``huggingface_hub.hf_hub_download`` / ``snapshot_download`` are replaced by fakes that serve a local
directory laid out like Alpha-VLLM/LLaMA2-Accessory, copying files to ``local_dir`` under their repo
paths (what the real functions do with ``local_dir``); each call's arguments are first bound to the
INSTALLED huggingface_hub function's signature, so an argument that version does not accept fails.
"""

import fnmatch
import inspect
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError

from accessory import cli
from accessory.tools import download as dl

from ckpt_utils import TINY_LLAMA, random_llama_state, write_checkpoint


class FakeHub:
    def __init__(self, root: Path):
        self.root = root
        self.calls = []
        self._real_file = huggingface_hub.hf_hub_download
        self._real_snapshot = huggingface_hub.snapshot_download

    def files(self):
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def _copy(self, rel: str, local_dir) -> str:
        target = Path(local_dir) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.root / rel, target)
        return str(target)

    def hf_hub_download(self, repo_id, filename, **kwargs):
        inspect.signature(self._real_file).bind(repo_id, filename, **kwargs)
        self.calls.append(("file", repo_id, kwargs.get("subfolder"), filename))
        rel = f"{kwargs['subfolder']}/{filename}" if kwargs.get("subfolder") else filename
        if rel not in self.files():
            raise EntryNotFoundError(f"404 Client Error: Entry Not Found for url: .../{repo_id}/resolve/main/{rel}")
        return self._copy(rel, kwargs["local_dir"])

    def snapshot_download(self, repo_id, **kwargs):
        inspect.signature(self._real_snapshot).bind(repo_id, **kwargs)
        patterns = kwargs.get("allow_patterns") or ["*"]
        patterns = [patterns] if isinstance(patterns, str) else patterns
        self.calls.append(("snapshot", repo_id, tuple(patterns)))
        for rel in self.files():
            if any(fnmatch.fnmatch(rel, p) for p in patterns):
                self._copy(rel, kwargs["local_dir"])
        return kwargs["local_dir"]


def _put(root: Path, rel: str, content: bytes = None) -> bytes:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content if content is not None else f"contents of {rel}".encode()
    path.write_bytes(data)
    return data


@pytest.fixture(scope="module")
def repo(tmp_path_factory, llama_spm_path):
    """A fake release repo: a loadable tiny alpaca, configs, a delta-only peft model, SPHINX, InternLM."""
    root = tmp_path_factory.mktemp("fake_hub")
    write_checkpoint(root / "finetune/sg/alpaca", random_llama_state(TINY_LLAMA, 32000, seed=4), TINY_LLAMA)
    for prefix in ("", "internLM_", "code_"):
        _put(root, f"config/{prefix}tokenizer.model")
        for size in ("7B", "13B"):
            _put(root, f"config/{prefix}{size}_params.json", f'{{"size": "{prefix}{size}"}}'.encode())
    _put(root, "finetune/sg/alpaca_llamaPeft_normBias/consolidated.00-of-01.model-diff.pth")
    _put(root, "finetune/sg/alpaca_llamaPeft_normBias/consolidated.00-of-01.model.pth")
    _put(root, "finetune/sg/alpaca_llamaPeft_normBias/meta.json")
    for name in ("config.json", "meta.json", "tokenizer.model", "consolidated.00-of-02.model.pth",
                 "consolidated.01-of-02.model.pth"):
        _put(root, f"finetune/mm/SPHINX/SPHINX/{name}")
    _put(root, "finetune/mm/SPHINX/SPHINX-1k/consolidated.00-of-01.model.pth")
    _put(root, "convert/sg/InternLM/consolidated.00-of-01.model.pth")
    _put(root, "finetune/sg/brand_new/consolidated.00-of-01.model.pth")
    return root


@pytest.fixture
def hub(repo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a safety net: nothing here may reach the network
    fake = FakeHub(repo)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def _files(directory: Path):
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def test_model_and_llama2_config_land_under_their_repo_paths_and_load(hub, repo, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["download", "--model_name", "alpaca", "--model_size", "7B", "--down_config",
                     "--output_path", str(out)])
    assert code == 0
    model_files = [f for f in hub.files() if f.startswith("finetune/sg/alpaca/")]
    assert _files(out) == sorted(["config/tokenizer.model", "config/7B_params.json"] + model_files)
    for rel in _files(out):
        assert (out / rel).read_bytes() == (repo / rel).read_bytes()
    printed = capsys.readouterr().out.split()
    assert str(out / "config/7B_params.json") in printed
    assert ("snapshot", dl.REPO_ID, ("finetune/sg/alpaca/*",)) in hub.calls
    # what came down is a checkpoint MetaModel loads, with the same weights
    from accessory.model.meta import MetaModel
    model = MetaModel.from_pretrained(str(out / "finetune/sg/alpaca"), dtype=torch.float32, device="cpu",
                                      progress=False)
    source = MetaModel.from_pretrained(str(repo / "finetune/sg/alpaca"), dtype=torch.float32, device="cpu",
                                       progress=False)
    assert torch.equal(model.llma.output.weight, source.llma.output.weight)


@pytest.mark.parametrize("flags, expected", [
    (["--model_name", "InternLM", "--model_size", "7B", "--down_config"],
     ["config/internLM_tokenizer.model", "config/internLM_7B_params.json"]),
    (["--model_name", "alpaca", "--model_size", "13B", "--down_code"],
     ["config/code_tokenizer.model", "config/code_13B_params.json"]),
    (["--model_name", "alpaca", "--model_size", "13B", "--down_config", "internlm"],
     ["config/internLM_tokenizer.model", "config/internLM_13B_params.json"]),
    (["--model_name", "SPHINX/SPHINX", "--down_config"],
     ["finetune/mm/SPHINX/SPHINX/config.json", "finetune/mm/SPHINX/SPHINX/tokenizer.model",
      "finetune/mm/SPHINX/SPHINX/meta.json"]),
])
def test_config_kind(hub, tmp_path, flags, expected):
    out = tmp_path / "out"
    assert cli.main(["download", *flags, "--output_path", str(out)]) == 0
    fetched = [f"{c[2]}/{c[3]}" for c in hub.calls if c[0] == "file"]
    assert fetched == expected
    assert all((out / rel).is_file() for rel in expected)


def test_sphinx_folder_does_not_pull_its_sibling(hub, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["download", "--model_name", "SPHINX/SPHINX", "--output_path", str(out)]) == 0
    assert all(f.startswith("finetune/mm/SPHINX/SPHINX/") for f in _files(out))
    assert "finetune/mm/SPHINX/SPHINX/consolidated.01-of-02.model.pth" in _files(out)


def test_down_diff_takes_only_the_delta_weights(hub, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["download", "--model_name", "alpaca_llamaPeft_normBias", "--down_diff",
                     "--output_path", str(out)]) == 0
    assert _files(out) == ["finetune/sg/alpaca_llamaPeft_normBias/consolidated.00-of-01.model-diff.pth",
                           "finetune/sg/alpaca_llamaPeft_normBias/meta.json"]


def test_down_diff_without_delta_weights_is_an_error(hub, tmp_path, capsys):
    assert cli.main(["download", "--model_name", "gorilla", "--down_diff", "--output_path", str(tmp_path)]) == 1
    assert "no delta weights" in capsys.readouterr().err


def test_model_outside_the_catalogue(hub, tmp_path, capsys):
    assert cli.main(["download", "--model_name", "brand_new", "--output_path", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "'brand_new' is not in the release catalogue" in err and "--train_type" in err
    # with both types given it is fetched anyway
    assert cli.main(["download", "--model_name", "brand_new", "--train_type", "finetune", "--input_type", "sg",
                     "--output_path", str(tmp_path / "b")]) == 0
    assert _files(tmp_path / "b") == ["finetune/sg/brand_new/consolidated.00-of-01.model.pth"]


def test_catalogue_model_missing_from_the_repo_is_an_error(hub, tmp_path, capsys):
    assert cli.main(["download", "--model_name", "dialog_lima", "--output_path", str(tmp_path)]) == 1
    assert "no weights under finetune/sg/dialog_lima" in capsys.readouterr().err


def test_config_errors_name_the_flag_or_file(hub, tmp_path, capsys):
    assert cli.main(["download", "--model_name", "alpaca", "--down_config", "--output_path", str(tmp_path)]) == 1
    assert "needs --model_size" in capsys.readouterr().err
    assert cli.main(["download", "--model_name", "alpaca", "--model_size", "70B", "--down_config",
                     "--output_path", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "config/tokenizer.model" in err or "config/70B_params.json" in err
    assert cli.main(["download", "--output_path", str(tmp_path)]) == 2
    assert "--model_name is required" in capsys.readouterr().err


def test_list_prints_the_catalogue(capsys):
    assert cli.main(["download", "--list"]) == 0
    lines = capsys.readouterr().out.split()
    assert "finetune/sg/alpaca" in lines and "convert/sg/mixtral-8x7b-32kseqlen" in lines
    assert "finetune/mm/SPHINX/SPHINX-v2-1k" in lines
