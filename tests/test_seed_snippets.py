"""The seed's documented inference snippets (docs/inference.md of LLaMA2-Accessory), run verbatim
with only the paths replaced, against a checkpoint in the newer layout and one in the legacy layout."""

import contextlib
import io
import json

import pytest
import torch

from ckpt_utils import TINY_LLAMA, llama_spm_tokenizer, random_llama_state, write_checkpoint

PRETRAINED = '''
from accessory.model.meta import MetaModel

model = MetaModel.from_pretrained("/path/to/pretrained", max_seq_len=2048)

# for pretrained model (i.e. trained on large corpus without specific template)
prompt = "The best programming language in the world is"
response = model.generate([prompt], images=None, max_gen_len=512)[0]
print(response)
# or if you want to generate the response token by token
response = None
for response_in_progress in model.stream_generate(prompt, image=None, max_gen_len=512):
    response = response_in_progress['text']
print(response)
'''

SINGLE_TURN = '''
from accessory.model.meta import MetaModel
from accessory.data.system_prompt import format_prompt

model = MetaModel.from_pretrained("/path/to/pretrained", max_seq_len=2048)

# for single-turn-finetuned model
instruction = "What's the best programming language in the world?"
prompt = format_prompt({"instruction": instruction}, sys_name="alpaca")

response = model.generate([prompt], images=None, max_gen_len=512)[0]
print(response)
# or if you want to generate the response token by token
response = None
for response_in_progress in model.stream_generate(prompt, image=None, max_gen_len=512):
    response = response_in_progress['text']
print(response)
'''

MULTI_TURN = '''
from accessory.model.meta import MetaModel
from accessory.data.conversation import default_conversation

model = MetaModel.from_pretrained("/path/to/pretrained", max_seq_len=2048)

conv = default_conversation()

# for multi-turn-finetuned model
q1 = "What's the best programming language in the world?"
a1 = "The best programming language in the world in PHP."
q2 = "Are you sure? Why not Python?"
qas = [[q1, a1], [q2, None]]  # leave the last answer, namely the one to generate, to None
conv.load_qas(qas)
prompt = conv.get_prompt()

# conv_sep is the symbol marking the end of one response, equal to "###" in this example
conv_sep = conv.response_end_signal

# ------EITHER-------
response = None
for response_in_progress in model.stream_generate(
        prompt, image=None, max_gen_len=512, additional_stop_symbols=[conv_sep]
):
    response = response_in_progress['text']
print(response)
# --------OR---------
response = None
for response_in_progress in model.stream_generate(prompt, image=None, max_gen_len=512):
    sep_pos = response_in_progress["text"].find(conv_sep)
    if sep_pos != -1:
        response = response_in_progress["text"][:sep_pos]
        break
    else:
        response = response_in_progress["text"]
print(response)
'''

LEGACY_LOAD = '''
from accessory.model.meta import MetaModel
example_llama_type='llama'
example_llama_config=[
    '/path/to/llama/7B/params.json',
    '/path/to/override.json']
example_tokenizer_path='/path/to/tokenizer.model'
model = MetaModel.from_pretrained(
    "/path/to/pretrained", llama_type=example_llama_type,
    llama_config=example_llama_config, tokenizer_path=example_tokenizer_path
)
'''


def run_snippet(source: str, replacements: dict) -> list:
    for old, new in replacements.items():
        source = source.replace(old, new)
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out):
        # max_gen_len=512 over max_seq_len=2048 is what the docs use; keep it but make it quick
        # by letting the tiny model run on CPU in bf16 as a user's would.
        exec(compile(source, "<seed snippet>", "exec"), namespace)
    return out.getvalue().split("\n")[:-1], namespace


@pytest.fixture(scope="module")
def new_layout(tmp_path_factory):
    state = random_llama_state(TINY_LLAMA, 32000, seed=11)
    return str(write_checkpoint(tmp_path_factory.mktemp("new_layout"), state, TINY_LLAMA, dtype=torch.bfloat16))


@pytest.mark.parametrize("snippet", [PRETRAINED, SINGLE_TURN], ids=["pretrained", "single_turn"])
def test_generate_and_stream_snippets(new_layout, snippet):
    lines, ns = run_snippet(snippet, {"/path/to/pretrained": new_layout})
    printed = "\n".join(lines)
    # the two printed responses (generate, then stream) are the same text
    assert len(printed) > 0
    half = len(lines) // 2
    assert lines[:half] == lines[half:]
    assert ns["model"].llma.tok_embeddings.weight.dtype == torch.bfloat16


def test_multi_turn_snippet(new_layout):
    lines, ns = run_snippet(MULTI_TURN, {"/path/to/pretrained": new_layout})
    half = len(lines) // 2
    assert lines[:half] == lines[half:], "stop symbol and manual cut must give the same response"
    assert "###" not in "\n".join(lines)
    assert ns["conv_sep"] == "\n###"


def test_legacy_layout_snippet(tmp_path):
    state = random_llama_state(TINY_LLAMA, 32000, seed=11)
    legacy = write_checkpoint(tmp_path / "legacy", state, TINY_LLAMA, write_meta=False, write_config=False,
                              tokenizer=None)
    params = tmp_path / "params.json"
    params.write_text(json.dumps(dict(TINY_LLAMA, n_layers=32)))  # wrong depth, fixed by the override
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"n_layers": TINY_LLAMA["n_layers"]}))
    _, ns = run_snippet(LEGACY_LOAD, {
        "/path/to/pretrained": str(legacy), "/path/to/llama/7B/params.json": str(params),
        "/path/to/override.json": str(override), "/path/to/tokenizer.model": str(llama_spm_tokenizer())})
    model = ns["model"]
    assert len(model.llma.layers) == TINY_LLAMA["n_layers"]
    # the legacy-layout model is the same model as the new-layout one
    new = write_checkpoint(tmp_path / "new", state, TINY_LLAMA)
    from accessory.model.meta import MetaModel
    reference = MetaModel.from_pretrained(str(new), max_seq_len=4096)
    text = "Hello there"
    torch.testing.assert_close(model.compute_logits([text])[0], reference.compute_logits([text])[0], atol=0, rtol=0)
