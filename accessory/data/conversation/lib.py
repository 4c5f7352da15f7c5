"""Multi-turn chat prompts: the original LLaMA2-Accessory templates, byte for byte, plus ChatML.

A `Conversation` holds a system text and a list of `[role, message]` turns and renders them into one
prompt string. The last message may be None: the prompt then ends with an open turn for the model
to answer, and generation should stop at `response_end_signal`.

    conv = default_conversation()
    conv.load_qas([["Hi", "Hello!"], ["What is 2+2?", None]])
    prompt = conv.get_prompt()      # "...### Human: What is 2+2?\n### Assistant:"
"""

from __future__ import annotations

import dataclasses
from enum import Enum, auto
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "SeparatorStyle",
    "Conversation",
    "ConversationTemplate",
    "conv_templates",
    "default_conversation",
]

CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"


class SeparatorStyle(Enum):
    """How turns are joined into a prompt."""

    SINGLE = auto()  # "{system}\n\n### Human: q\n### Assistant: a\n###"
    TWO = auto()  # "{system} USER: q ASSISTANT: a</s>"
    CHATML = auto()  # "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"


@dataclasses.dataclass
class Conversation:
    """A conversation history and the rules that turn it into a prompt.

    Messages are `[role, text]` pairs; text may also be a tuple whose first item is the text (the
    multimodal demos pass `(text, image, mode)`). Only the last message may be None (an open turn).
    """

    system: str
    roles: Tuple[str, str]
    messages: List[list]
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: Optional[str] = None
    version: str = "Unknown"
    skip_next: bool = False

    def process(self) -> Dict[str, object]:
        """Render the conversation.

        Returns:
            {"conv": the full prompt string, "to_predict": the answer texts, each with the end signal
            that follows it, in order; these are the spans a model learns to produce in training}.
        """
        if self.sep_style == SeparatorStyle.SINGLE:
            return self._render_single()
        if self.sep_style == SeparatorStyle.TWO:
            return self._render_two()
        if self.sep_style == SeparatorStyle.CHATML:
            return self._render_chatml()
        raise ValueError(f"Unknown separator style {self.sep_style!r}; expected one of {list(SeparatorStyle)}")

    def _turns(self, open_when_empty: bool):
        """Yield (role, text or None); None marks the open last turn. Other turns must have text."""
        last = len(self.messages) - 1
        for index, (role, message) in enumerate(self.messages):
            if isinstance(message, tuple):
                message = message[0]
            # The TWO style treats an empty last answer as open, as the original did.
            is_open = message is None or (open_when_empty and message == "" and index == last)
            if is_open and index != last:
                raise ValueError(
                    f"Message {index} of {len(self.messages)} ({role!r}) is None; only the last message may be "
                    f"None (the turn left open for the model). Fill in or drop the earlier empty turns."
                )
            yield role, None if is_open else message

    def _render_single(self) -> Dict[str, object]:
        conv = self.system + "\n\n" + self.sep
        to_predict = []
        for role, message in self._turns(open_when_empty=False):
            if message is None:
                conv += f" {role}:"
                continue
            conv += f" {role}: {message}\n{self.sep}"
            if role == self.roles[1]:
                to_predict.append(f"{message}\n{self.sep}")
        return {"conv": conv, "to_predict": to_predict}

    def _render_two(self) -> Dict[str, object]:
        # User turns end with sep, assistant turns with sep2, judged by position as the original does.
        conv = self.system + self.sep
        to_predict = []
        for index, (role, message) in enumerate(self._turns(open_when_empty=True)):
            if message is None:
                conv += f" {role}:"
                continue
            turn_end = self.sep if index % 2 == 0 else self.sep2
            conv += f" {role}: {message}{turn_end}"
            if role == self.roles[1]:
                to_predict.append(message + turn_end)
        return {"conv": conv, "to_predict": to_predict}

    def _render_chatml(self) -> Dict[str, object]:
        conv = f"{CHATML_START}system\n{self.system}{CHATML_END}\n" if self.system else ""
        to_predict = []
        for role, message in self._turns(open_when_empty=False):
            if message is None:
                conv += f"{CHATML_START}{role}\n"
                continue
            conv += f"{CHATML_START}{role}\n{message}{CHATML_END}\n"
            if role == self.roles[1]:
                to_predict.append(message + CHATML_END)
        return {"conv": conv, "to_predict": to_predict}

    def get_prompt(self) -> str:
        """The conversation rendered as one prompt string."""
        return self.process()["conv"]

    def append_message(self, role: str, message) -> None:
        """Add one turn; `message` None leaves it open for the model to answer."""
        self.messages.append([role, message])

    def load_qas(self, qas: Sequence[Sequence[Optional[str]]]) -> None:
        """Replace the history with question/answer pairs `[[q1, a1], ..., [qN, aN]]`.

        The last answer may be None; `get_prompt()` then gives the prompt for generating it.
        """
        self.messages = []
        for question, answer in qas:
            self.append_message(self.roles[0], question)
            self.append_message(self.roles[1], answer)

    def copy(self) -> "Conversation":
        """An independent copy: same settings, its own list of messages."""
        return dataclasses.replace(self, messages=[list(turn) for turn in self.messages])

    @property
    def response_end_signal(self) -> str:
        """The text that ends an answer; generation stops when the model writes it."""
        if self.sep_style == SeparatorStyle.SINGLE:
            return "\n" + self.sep
        if self.sep_style == SeparatorStyle.CHATML:
            return CHATML_END
        return self.sep2


class ConversationTemplate:
    """A named recipe for a fresh, empty `Conversation`.

    Call it, or call `.copy()` on it, to get a new conversation; the original's entries were plain
    functions, and some of its scripts called `.copy()` on them, so both spellings work here.
    """

    def __init__(self, factory: Callable[[], Conversation]):
        self._factory = factory
        self.__doc__ = factory.__doc__

    def __call__(self) -> Conversation:
        return self._factory()

    def copy(self) -> Conversation:
        """Same as calling the template: a fresh conversation."""
        return self._factory()

    def __repr__(self) -> str:
        return f"ConversationTemplate({self._factory.__name__})"


_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# No spaces between the sentences: that is how the original joins them.
_LLAVA_SYSTEM = (
    "You are LLaVA, a large language and vision assistant trained by UW Madison WAIV Lab."
    "You are able to understand the visual content that the user provides, and assist the user with a "
    "variety of tasks using natural language."
    "Follow the instructions carefully and explain your answers in detail."
)
# What SmolLM2-Instruct's own chat template inserts when no system message is given.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _single(system: str) -> Conversation:
    return Conversation(
        system=system, roles=("Human", "Assistant"), messages=[], sep_style=SeparatorStyle.SINGLE, sep="###"
    )


def _two(system: str, roles: Tuple[str, str], version: str = "Unknown") -> Conversation:
    return Conversation(
        system=system, roles=roles, messages=[], sep_style=SeparatorStyle.TWO, sep=" ", sep2="</s>", version=version
    )


def conv_v1_2() -> Conversation:
    """The default: "### Human: ...\n### Assistant: ..." with the human/assistant system text."""
    return _single(_HUMAN_SYSTEM)


def simple_conv_multimodal() -> Conversation:
    """The "### Human:" layout with the LLaVA system text."""
    return _single(_LLAVA_SYSTEM)


def conv_vicuna_v1_1() -> Conversation:
    """Vicuna v1.1: "USER: ... ASSISTANT: ...</s>"."""
    return _two(_USER_SYSTEM, ("USER", "ASSISTANT"), version="v1")


def conv_llava_v1() -> Conversation:
    """LLaVA v1: Vicuna v1.1 layout with the LLaVA system text."""
    return _two(_LLAVA_SYSTEM, ("USER", "ASSISTANT"), version="v1")


def conv_bair_v1() -> Conversation:
    """BAIR (Koala): "BEGINNING OF CONVERSATION: USER: ... GPT: ...</s>"."""
    return _two("BEGINNING OF CONVERSATION:", ("USER", "GPT"))


def conv_chatml(system: str = "") -> Conversation:
    """ChatML ("<|im_start|>user\\n...<|im_end|>\\n"), for Qwen, SmolLM2-Instruct and the like.

    The system turn is written only when `system` is non-empty; set `conv.system` to add one.
    """
    return Conversation(
        system=system, roles=("user", "assistant"), messages=[], sep_style=SeparatorStyle.CHATML, sep=CHATML_END,
        version="chatml",
    )


def conv_smollm2() -> Conversation:
    """ChatML with SmolLM2-Instruct's default system text, as its own chat template writes it."""
    return conv_chatml(SMOLLM2_SYSTEM)


# The original kept several names for the same templates (v1, v1_2, simple and default are one).
conv_templates: Dict[str, ConversationTemplate] = {
    "default": ConversationTemplate(conv_v1_2),
    "simple": ConversationTemplate(conv_v1_2),
    "multimodal": ConversationTemplate(simple_conv_multimodal),
    "llava_v1": ConversationTemplate(conv_llava_v1),
    "v1": ConversationTemplate(conv_v1_2),
    "bair_v1": ConversationTemplate(conv_bair_v1),
    "vicuna_v1_1": ConversationTemplate(conv_vicuna_v1_1),
    "chatml": ConversationTemplate(conv_chatml),
    "smollm2": ConversationTemplate(conv_smollm2),
}

default_conversation = conv_templates["default"]
