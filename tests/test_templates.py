"""Prompt templates: byte-exact strings of the original's format_prompt and conversation templates, plus ChatML."""

import json
import os
from pathlib import Path

import pytest

from accessory.data.conversation import Conversation, SeparatorStyle, conv_templates, default_conversation
from accessory.data.system_prompt import format_prompt

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSay hi\n\n### Response:"
)
HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "You are LLaVA, a large language and vision assistant trained by UW Madison WAIV Lab.You are able to understand "
    "the visual content that the user provides, and assist the user with a variety of tasks using natural language."
    "Follow the instructions carefully and explain your answers in detail."
)
TWO_TURNS = [["Hi", "Hello!"], ["What is 2+2?", None]]


@pytest.mark.parametrize("fields", [{}, {"input": None}, {"input": ""}, {"input": " \n\t"}])
def test_alpaca_without_input(fields):
    assert format_prompt({"instruction": "Say hi", **fields}) == ALPACA_NO_INPUT
    assert format_prompt({"instruction": "Say hi", **fields}, "alpaca") == ALPACA_NO_INPUT


def test_alpaca_with_input():
    assert format_prompt({"instruction": "Translate {this}", "input": "Bonjour"}) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate {this}\n\n### Input:\nBonjour\n\n### Response:"
    )


def test_other_system_prompts():
    assert format_prompt({"instruction": "Paris"}, "qg") == "Generate a question whose answer is:\nParis\n\nQuestion:\n"
    assert format_prompt({"instruction": "Describe"}, "caption") == ""
    assert format_prompt({"instruction": "Just this", "input": "ignored"}, "None") == "Just this"
    assert format_prompt({"instruction": "Just this"}, None) == "Just this"
    assert format_prompt({"instruction": "Capital of France?"}, "shortqa") == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request using a single word or phrase.\n\n"
        "### Instruction:\nCapital of France?\n\n### Response:"
    )


def test_chatml_system_prompt():
    assert format_prompt({"instruction": "Hi"}, "chatml") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt({"instruction": "Hi", "input": "", "system": ""}, "chatml") == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert format_prompt({"instruction": "Sum up", "input": "Long text", "system": "Be brief."}, "chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nSum up\n\nLong text<|im_end|>\n<|im_start|>assistant\n"
    )


def test_unknown_system_prompt_names_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown system prompt 'alpacca'; expected one of \['alpaca', 'shortqa', "
                                         r"'qg', 'caption', 'None', 'chatml'\]"):
        format_prompt({"instruction": "x"}, "alpacca")


def test_missing_instruction_is_a_clear_error():
    with pytest.raises(ValueError, match="needs the key 'instruction'"):
        format_prompt({"input": "x"}, "alpaca")


def test_default_conversation_two_turns():
    conv = default_conversation()
    conv.load_qas(TWO_TURNS)
    assert conv.get_prompt() == (
        HUMAN_SYSTEM + "\n\n### Human: Hi\n### Assistant: Hello!\n### Human: What is 2+2?\n### Assistant:"
    )
    assert conv.response_end_signal == "\n###"
    assert conv.process()["to_predict"] == ["Hello!\n###"]
    assert default_conversation().messages == []  # each call gives a fresh conversation


def test_single_style_templates_share_one_layout():
    for name in ["default", "v1", "simple"]:
        conv = conv_templates[name]()
        conv.load_qas([["Q", "A"]])
        assert conv.get_prompt() == HUMAN_SYSTEM + "\n\n### Human: Q\n### Assistant: A\n###"
    conv = conv_templates["multimodal"]()
    conv.load_qas([["<image>What is it?", None]])
    assert conv.get_prompt() == LLAVA_SYSTEM + "\n\n### Human: <image>What is it?\n### Assistant:"


def test_vicuna_v1_1_two_style():
    conv = conv_templates["vicuna_v1_1"]()
    conv.load_qas(TWO_TURNS)
    # The doubled spaces are the original's: system + sep, then " ROLE: message" + sep.
    assert conv.get_prompt() == USER_SYSTEM + "  USER: Hi  ASSISTANT: Hello!</s> USER: What is 2+2?  ASSISTANT:"
    assert conv.response_end_signal == "</s>"
    assert conv.process()["to_predict"] == ["Hello!</s>"]
    assert conv.version == "v1"
    # An empty last answer is an open turn in this style, as in the original.
    conv.load_qas([["Hi", ""]])
    assert conv.get_prompt() == USER_SYSTEM + "  USER: Hi  ASSISTANT:"


def test_llava_v1_and_bair_v1():
    conv = conv_templates["llava_v1"]()
    conv.load_qas([["Hi", None]])
    assert conv.get_prompt() == LLAVA_SYSTEM + "  USER: Hi  ASSISTANT:"
    conv = conv_templates["bair_v1"]()
    conv.load_qas([["Hi", "Yo"], ["Bye", None]])
    assert conv.get_prompt() == "BEGINNING OF CONVERSATION:  USER: Hi  GPT: Yo</s> USER: Bye  GPT:"


def test_chatml_conversation():
    conv = conv_templates["chatml"]()
    conv.load_qas(TWO_TURNS)
    assert conv.get_prompt() == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert conv.response_end_signal == "<|im_end|>"
    assert conv.process()["to_predict"] == ["Hello!<|im_end|>"]
    conv.system = "You are terse."
    assert conv.get_prompt().startswith(
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    smol = conv_templates["smollm2"]()
    smol.load_qas([["Hi", None]])
    assert smol.get_prompt() == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chatml_matches_a_real_chat_template():
    # Qwen's tokenizer_config.json carries a ChatML jinja template with a default system turn.
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    shared = Path(os.environ.get("ACCESSORY_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
    folder = shared / "fixtures" / "tokenizers" / "qwen2"
    if not folder.is_dir():
        pytest.skip(f"tokenizer fixtures not found at {folder} (set ACCESSORY_SHARED to the shared/ folder)")
    transformers.logging.set_verbosity_error()
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is 2+2?"}]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    conv = conv_templates["chatml"]()
    conv.system = "You are a helpful assistant"
    conv.load_qas(TWO_TURNS)
    assert conv.get_prompt() == expected


def test_tuple_messages_and_copy():
    conv = default_conversation()
    conv.load_qas([[("Look<image>", "img.png", "Crop"), "A cat"], ["And?", None]])
    assert conv.get_prompt() == (
        HUMAN_SYSTEM + "\n\n### Human: Look<image>\n### Assistant: A cat\n### Human: And?\n### Assistant:"
    )
    clone = conv.copy()
    clone.messages[-1][1] = "Nothing"
    assert conv.messages[-1][1] is None
    assert clone.get_prompt().endswith("### Human: And?\n### Assistant: Nothing\n###")
    # The original's eval scripts call .copy() on template entries; that works too.
    assert conv_templates["v1"].copy().get_prompt() == HUMAN_SYSTEM + "\n\n###"


def test_only_last_message_may_be_open():
    conv = Conversation(system="S", roles=("Human", "Assistant"), messages=[], sep_style=SeparatorStyle.SINGLE)
    conv.load_qas([["Q1", None], ["Q2", None]])
    with pytest.raises(ValueError, match="only the last message may be None"):
        conv.get_prompt()
