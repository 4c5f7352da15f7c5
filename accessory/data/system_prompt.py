"""Single-turn prompt templates: `format_prompt({"instruction": ..., "input": ...}, sys_name)`.

The texts are the original LLaMA2-Accessory ones, byte for byte; "chatml" is new.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping

from accessory.data.conversation.lib import conv_chatml

__all__ = ["format_prompt", "SYSTEM_PROMPT_NAMES"]

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
_SHORT_QA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request using a single word or phrase.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
_QUESTION_GENERATION = "Generate a question whose answer is:\n{instruction}\n\nQuestion:\n"


def _has_input(format_dict: Mapping) -> bool:
    """Whether an "input" is given: missing, None, empty or whitespace-only all count as none."""
    value = format_dict.get("input")
    return value is not None and str(value).strip() != ""


def _fill(template: str, format_dict: Mapping, sys_name: str) -> str:
    try:
        return template.format_map(format_dict)
    except KeyError as err:
        raise ValueError(
            f"format_prompt(sys_name={sys_name!r}) needs the key {err.args[0]!r} in format_dict; "
            f"got keys {sorted(format_dict)}"
        ) from None


def _alpaca(format_dict: Mapping) -> str:
    template = _ALPACA_WITH_INPUT if _has_input(format_dict) else _ALPACA_NO_INPUT
    return _fill(template, format_dict, "alpaca")


def _chatml(format_dict: Mapping) -> str:
    question = _fill("{instruction}", format_dict, "chatml")
    if _has_input(format_dict):
        question += "\n\n" + str(format_dict["input"])
    conv = conv_chatml(format_dict.get("system") or "")
    conv.load_qas([[question, None]])
    return conv.get_prompt()


_FORMATTERS: Dict[str, Callable[[Mapping], str]] = {
    "alpaca": _alpaca,
    "shortqa": lambda d: _fill(_SHORT_QA, d, "shortqa"),
    "qg": lambda d: _fill(_QUESTION_GENERATION, d, "qg"),  # question generation
    "caption": lambda d: "",  # captioning models get no text prompt
    "None": lambda d: _fill("{instruction}", d, "None"),  # the bare instruction
    "chatml": _chatml,
}

SYSTEM_PROMPT_NAMES = tuple(_FORMATTERS)


def format_prompt(format_dict: Mapping, sys_name: str = "alpaca") -> str:
    """Build a single-turn prompt.

    Args:
        format_dict: {"instruction": str, "input": optional str}; "chatml" also reads an optional
            "system". Other keys are ignored.
        sys_name: one of "alpaca" (with an "### Input:" section only when input is non-blank),
            "shortqa", "qg", "caption" (always ""), "None" (the instruction alone; Python None means
            the same), "chatml" (an optional system turn, the user turn with instruction and input
            separated by a blank line, then an open assistant turn).

    Raises:
        ValueError: unknown sys_name (the original returned None here), or a needed key is missing.
    """
    name = "None" if sys_name is None else sys_name
    formatter = _FORMATTERS.get(name)
    if formatter is None:
        raise ValueError(f"Unknown system prompt {sys_name!r}; expected one of {list(SYSTEM_PROMPT_NAMES)}")
    return formatter(format_dict)
