"""The OpenAI API over one ``MetaModel``: request checking, prompts, generation and response bodies.

Nothing here knows about HTTP: :class:`OpenAIService` takes a parsed JSON body and returns either a
response dict or an iterator of stream chunks (dicts), and raises :class:`ApiError` for a request it
cannot serve. ``accessory/serve/http.py`` puts it behind a web server.

Generation goes straight through ``model.engine`` (the loop ``MetaModel.generate`` runs), so the text
is what ``generate`` returns for the same prompt and sampling settings, and each choice also gets the
engine's finish reason, token count and log-probabilities. The choices of one request (``n`` > 1,
or several prompts to /v1/completions) run as one batch, and so do requests that wait for the model
together with the same sampling settings (see batching.py).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ..data.conversation import conv_templates
from ..demos.common_mm import IMAGE_TRANSFORMS, image_tensor
from ..generation.sampling import SamplingParams
from .batching import BatchScheduler, Job

#: The most choices (``n`` times the number of prompts) one request may ask for.
MAX_CHOICES = 16
#: The most alternatives per token ``top_logprobs`` (chat) may ask for; /v1/completions allows 5.
MAX_TOP_LOGPROBS = 20
#: How many earlier tokens give a token's text its context (SentencePiece's leading space, merged bytes).
_TOKEN_TEXT_WINDOW = 4


class ApiError(Exception):
    """A request the server will not serve: rendered as ``{"error": {message, type, param, code}}``."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> Dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------ field checks

_MISSING = object()


def _type_name(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _field(body: Dict, name: str, kinds: Tuple[type, ...], what: str, default=None):
    """``body[name]`` when it is one of ``kinds`` (a bool is never a number); ``default`` when absent/null."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        raise ApiError(f"'{name}' must be {what}, got {_type_name(value)} {value!r:.60}", param=name,
                       code="invalid_type")
    return value


def _number(body: Dict, name: str, default: float, low: float, high: float) -> float:
    value = float(_field(body, name, (int, float), "a number", default))
    if not low <= value <= high:
        raise ApiError(f"'{name}' must be between {low} and {high}, got {value}", param=name, code="invalid_value")
    return value


def _integer(body: Dict, name: str, default: Optional[int], low: int, high: Optional[int] = None) -> Optional[int]:
    value = _field(body, name, (int,), "an integer", default)
    if value is None:
        return None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(f"'{name}' must be {bound}, got {value}", param=name, code="invalid_value")
    return value


def _stop_strings(body: Dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(f"'stop' must be a string or an array of strings, got {stop!r:.60}", param="stop",
                       code="invalid_type")
    if len(stop) > 4:
        raise ApiError(f"'stop' holds at most 4 strings, got {len(stop)}", param="stop", code="invalid_value")
    if any(s == "" for s in stop):
        raise ApiError("'stop' strings must not be empty", param="stop", code="invalid_value")
    return stop


def _reject_unsupported(body: Dict, names_and_neutral: Dict[str, object]) -> None:
    """400 for a field this server cannot honour, unless it holds its neutral value."""
    for name, neutral in names_and_neutral.items():
        value = body.get(name)
        if value is not None and value != neutral and not (neutral == () and value in ([], {})):
            raise ApiError(f"'{name}' is not supported by this server; leave it out", param=name,
                           code="unsupported_parameter")


def _content_text(content, index: int, images: Optional[List[str]] = None) -> str:
    """A message's text: a string, or an array of {"type": "text", "text"} parts (joined). With
    ``images`` (a list), {"type": "image_url", "image_url": {"url"}} parts are allowed and their
    URLs appended to it; otherwise they are refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else _type_name(part)
            if kind == "image_url" and images is not None:
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ApiError(f"messages[{index}].content: an image_url part needs {{\"image_url\": {{\"url\": "
                                   f"\"data:image/png;base64,...\"}}}}", param=f"messages[{index}].content",
                                   code="invalid_value")
                images.append(url)
                continue
            if kind != "text" or not isinstance(part.get("text"), str):
                what = "text and image_url parts are" if images is not None else "only text parts are"
                raise ApiError(f"messages[{index}].content: {what} supported "
                               f"({{\"type\": \"text\", \"text\": ...}}), got {kind!r}",
                               param=f"messages[{index}].content", code="invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(f"messages[{index}].content must be a string or an array of text parts, got "
                   f"{_type_name(content)}", param=f"messages[{index}].content", code="invalid_type")


def messages_to_conversation(messages, template_name: str, images: Optional[List[str]] = None):
    """(prompt, stop symbol) for OpenAI chat ``messages`` under a conversation template.

    Leading "system" (or "developer") messages replace the template's system text; then "user" and
    "assistant" messages must alternate, starting and ending with "user". ``images``: a list that
    receives the URLs of the user messages' image_url parts (None: such parts are refused).
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty array of {\"role\", \"content\"} objects",
                       param="messages", code="invalid_value" if isinstance(messages, list) else "invalid_type")
    system: List[str] = []
    turns: List[Tuple[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(f"messages[{index}] must be an object with a string 'role'", param=f"messages[{index}]",
                           code="invalid_type")
        role = message["role"]
        text = _content_text(message.get("content"), index, images if role == "user" else None)
        if role in ("system", "developer"):
            if turns:
                raise ApiError(f"messages[{index}]: a {role} message must come before the user/assistant turns",
                               param=f"messages[{index}].role", code="invalid_value")
            system.append(text)
        elif role in ("user", "assistant"):
            expected = "user" if not turns or turns[-1][0] == "assistant" else "assistant"
            if role != expected:
                raise ApiError(f"messages[{index}]: expected a {expected} message (user and assistant must "
                               f"alternate, starting with user), got {role}", param=f"messages[{index}].role",
                               code="invalid_value")
            turns.append((role, text))
        else:
            raise ApiError(f"messages[{index}]: unsupported role {role!r}; use system, user or assistant",
                           param=f"messages[{index}].role", code="invalid_value")
    if not turns or turns[-1][0] != "user":
        raise ApiError("the last message must be a user message (the one the model answers)", param="messages",
                       code="invalid_value")
    conversation = conv_templates[template_name]()
    if system:
        conversation.system = "\n".join(system)
    qas = [[turns[i][1], turns[i + 1][1] if i + 1 < len(turns) else None] for i in range(0, len(turns), 2)]
    conversation.load_qas(qas)
    return conversation.get_prompt(), conversation.response_end_signal


# ------------------------------------------------------------------ one request, checked

@dataclass
class Plan:
    """A checked request: what to generate and how to answer."""
    kind: str  # "chat" or "completion"
    prompts: List[List[int]]  # token ids, one list per distinct prompt
    n: int
    max_tokens: List[int]  # per prompt
    sampling: SamplingParams
    stops: List[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    lstrip: bool  # chat answers lose the space the template leaves before them
    model: str
    image: Optional[object] = None  # (3, S, S) pixels of the conversation's picture, or None
    image_positions: int = 0  # the positions that picture takes before each row's text

    @property
    def rows(self) -> List[int]:
        """Prompt index of each choice, in choice order (prompt-major, as OpenAI orders them)."""
        return [p for p in range(len(self.prompts)) for _ in range(self.n)]


@dataclass
class _Choice:
    """What one choice has sent so far (streaming) and its per-token texts (logprobs)."""
    index: int
    sent_text: str = ""
    token_texts: List[str] = field(default_factory=list)
    sent_tokens: int = 0
    role_sent: bool = False


class OpenAIService:
    """Serves the OpenAI endpoints for one model; thread-safe (one worker thread runs the model).

    ``max_batch``: the most rows (choices of waiting requests) run together; one request's own rows
    (up to ``MAX_CHOICES``) always run together.
    """

    def __init__(self, model, model_name: str, template_name: str, max_batch: int = MAX_CHOICES,
                 image_transform: str = "padded_resize"):
        """``image_transform``: how a chat's picture is brought to the model's size
        (``accessory.data.transform.get_transform``: padded_resize or resized_center_crop)."""
        if template_name not in conv_templates:
            raise ValueError(f"unknown conversation template {template_name!r}; known: {', '.join(conv_templates)}")
        if image_transform not in IMAGE_TRANSFORMS:
            raise ValueError(f"unknown image transform {image_transform!r}; known: {', '.join(IMAGE_TRANSFORMS)}")
        self.model = model
        self.model_name = model_name
        self.template_name = template_name
        self.image_transform = image_transform
        self.scheduler = BatchScheduler(self._run, max_rows=max_batch)
        self.created = int(time.time())

    @property
    def max_seq_len(self) -> int:
        return int(self.model.args.max_seq_len)

    # -------------------------------------------------------------- /v1/models
    def model_card(self) -> Dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "accessory",
                "max_model_len": self.max_seq_len}

    def models(self) -> Dict:
        return {"object": "list", "data": [self.model_card()]}

    def _run(self, *args, images=None, **kwargs):
        """``engine.run`` for the scheduler's worker thread; ``images``: per row, (3, S, S) pixels
        or None, encoded here (in the thread that owns the model; MetaModel keeps the last
        encodings, so a chat's picture is encoded once)."""
        if images is not None:
            encoded = {}
            for pixels in images:
                if pixels is not None and id(pixels) not in encoded:
                    encoded[id(pixels)] = self.model._encode_images(pixels[None], 1, "image")[0]
            kwargs["image_embeds"] = [None if pixels is None else encoded[id(pixels)] for pixels in images]
        return self.model.engine.run(*args, **kwargs)

    def _picture(self, urls: List[str]):
        """The (3, S, S) pixels of a conversation's picture, from its image_url parts' URLs (the
        same picture may come again with each user message), or None without any."""
        if not urls:
            return None
        if not self.model.takes_images:
            raise ApiError(f"this server's model takes no images (llama_type {self.model.llama_type!r}); send "
                           f"text only, or serve a multimodal checkpoint with `accessory serve --with_visual`",
                           param="messages", code="invalid_value")
        if len(set(urls)) > 1:
            raise ApiError(f"the messages hold {len(set(urls))} different pictures; the model takes one picture "
                           f"per conversation (send the same one again, or start a new conversation)",
                           param="messages", code="invalid_value")
        url = urls[0]
        if not url.startswith("data:"):
            raise ApiError("this server does not download pictures: send the picture inline as a data URL "
                           "(\"data:image/png;base64,...\")", param="messages", code="invalid_value")
        header, _, data = url.partition(",")
        if not header.endswith(";base64") or not data:
            raise ApiError("an image data URL must be base64: \"data:image/<type>;base64,<data>\"",
                           param="messages", code="invalid_value")
        import base64
        import binascii
        import io

        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
            image.load()
        except (binascii.Error, ValueError) as exc:
            raise ApiError(f"the image data URL is not valid base64: {exc}", param="messages",
                           code="invalid_value") from None
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ApiError(f"the image data URL holds no picture PIL can read ({exc})", param="messages",
                           code="invalid_value") from None
        return image_tensor(self.model, image, self.image_transform)[0]

    # -------------------------------------------------------------- request -> plan
    def _encode(self, text: str) -> List[int]:
        tokenizer = self.model.tokenizer
        return tokenizer.encode(text, bos=tokenizer.add_bos, eos=False)

    def plan(self, body, kind: str) -> Plan:
        if not isinstance(body, dict):
            raise ApiError(f"the request body must be a JSON object, got {_type_name(body)}", code="invalid_type")
        model = _field(body, "model", (str,), "a string", self.model_name)
        if model != self.model_name:
            raise ApiError(f"the model {model!r} does not exist; this server serves {self.model_name!r} "
                           f"(see GET /v1/models)", param="model", code="model_not_found")
        common_unsupported = {"logit_bias": (), "tools": (), "functions": (), "suffix": "", "echo": False,
                              "best_of": 1}
        _reject_unsupported(body, common_unsupported)
        response_format = body.get("response_format")
        if response_format not in (None, {"type": "text"}):
            raise ApiError("'response_format' other than {\"type\": \"text\"} is not supported",
                           param="response_format", code="unsupported_parameter")

        if kind == "chat":
            if "messages" not in body:
                raise ApiError("'messages' is required", param="messages", code="missing_required_parameter")
            urls: List[str] = []
            prompt, end_signal = messages_to_conversation(body["messages"], self.template_name, urls)
            image = self._picture(urls)
            prompts = [self._encode(prompt)]
            template_stops = [end_signal]
        else:
            if "prompt" not in body:
                raise ApiError("'prompt' is required", param="prompt", code="missing_required_parameter")
            prompts = [self._encode(p) if isinstance(p, str) else p for p in self._prompt_list(body["prompt"])]
            template_stops, image = [], None
        image_positions = 0 if image is None else self.model.get_image_words()

        n = _integer(body, "n", 1, 1, MAX_CHOICES)
        if n * len(prompts) > MAX_CHOICES:
            raise ApiError(f"{len(prompts)} prompts x n={n} = {n * len(prompts)} choices; at most {MAX_CHOICES} "
                           f"per request", param="n", code="invalid_value")
        stream = _field(body, "stream", (bool,), "a boolean", False)
        stream_options = _field(body, "stream_options", (dict,), "an object", {})
        include_usage = _field(stream_options, "include_usage", (bool,), "a boolean", False)

        if kind == "chat":
            logprobs = _field(body, "logprobs", (bool,), "a boolean", False)
            top_logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
            if top_logprobs and not logprobs:
                raise ApiError("'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
            max_tokens = _integer(body, "max_completion_tokens", None, 1)
            if max_tokens is None:
                max_tokens = _integer(body, "max_tokens", None, 1)
        else:
            wanted = _integer(body, "logprobs", None, 0, 5)
            logprobs, top_logprobs = wanted is not None, wanted or 0
            max_tokens = _integer(body, "max_tokens", 16, 1)

        budgets = []
        for index, tokens in enumerate(prompts):
            room = self.max_seq_len - len(tokens) - image_positions
            where = "the messages" if kind == "chat" else ("the prompt" if len(prompts) == 1 else f"prompt {index}")
            if room < 1 or (max_tokens is not None and max_tokens > room):
                picture = f" and {image_positions} for the picture" if image_positions else ""
                asked = f" However, you requested {len(tokens) + image_positions + (max_tokens or 1)} tokens " \
                        f"({len(tokens)} in {where}{picture}, {max_tokens or 1} for the completion)."
                raise ApiError(f"This model's maximum context length is {self.max_seq_len} tokens.{asked} "
                               f"Shorten {where} or lower max_tokens (or start the server with a larger "
                               f"--max_seq_len).", param="messages" if kind == "chat" else "prompt",
                               code="context_length_exceeded")
            budgets.append(room if max_tokens is None else max_tokens)

        sampling = SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
            top_k=_integer(body, "top_k", 0, 0),
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            seed=_integer(body, "seed", None, 0, 2 ** 63 - 1 - MAX_CHOICES),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 100.0),
            penalty_last_n=_integer(body, "penalty_last_n", 64, -1),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        )
        if sampling.top_p == 0.0:
            raise ApiError("'top_p' must be greater than 0", param="top_p", code="invalid_value")
        return Plan(kind=kind, prompts=prompts, n=n, max_tokens=budgets, sampling=sampling,
                    stops=template_stops + _stop_strings(body), stream=stream, include_usage=include_usage,
                    logprobs=logprobs, top_logprobs=top_logprobs, lstrip=kind == "chat", model=model,
                    image=image, image_positions=image_positions)

    def _prompt_list(self, prompt) -> List:
        """/v1/completions' prompt: a string, an array of strings, token ids, or arrays of token ids."""
        vocab = self.model.tokenizer.n_words

        def token_list(value, where):
            if not value or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in value):
                raise ApiError(f"{where} must be a non-empty array of token ids in 0..{vocab - 1}", param="prompt",
                               code="invalid_value")
            return list(value)

        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return list(prompt)
            if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
                return [token_list(prompt, "'prompt'")]
            if all(isinstance(p, list) for p in prompt):
                return [token_list(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        raise ApiError("'prompt' must be a string, an array of strings, an array of token ids or an array of "
                       f"such arrays, got {_type_name(prompt)} {prompt!r:.60}", param="prompt",
                       code="invalid_type" if not isinstance(prompt, list) else "invalid_value")

    # -------------------------------------------------------------- generation
    def _job(self, plan: Plan) -> Job:
        """The request's rows, queued for the model; iterate it for their states after each step."""
        return self.scheduler.submit(Job([plan.prompts[p] for p in plan.rows], [plan.max_tokens[p] for p in plan.rows],
                                         plan.sampling, plan.stops, plan.logprobs, plan.top_logprobs,
                                         images=None if plan.image is None else [plan.image] * len(plan.rows)))

    def _token_text(self, context: Sequence[int], token: int) -> str:
        """The text ``token`` adds after ``context`` (a few earlier tokens give it its leading space)."""
        decode = self.model.tokenizer.decode
        window = list(context[-_TOKEN_TEXT_WINDOW:])
        if not window:
            return decode([token])
        before, after = decode(window), decode(window + [token])
        return after[len(before):] if after.startswith(before) else decode([token])

    def _visible(self, plan: Plan, row) -> str:
        return row.visible.lstrip() if plan.lstrip else row.visible

    def _settled_tokens(self, row, choice: _Choice) -> int:
        """How many of the row's tokens lie (at least partly) in its visible text."""
        while len(choice.token_texts) < len(row.logprobs):
            i = len(choice.token_texts)
            choice.token_texts.append(self._token_text(row.new_tokens[:i], row.new_tokens[i]))
        limit = len(row.visible)
        count, offset = 0, 0
        for text in choice.token_texts:
            if offset >= limit:
                break
            offset += len(text)
            count += 1
        return count

    def _logprobs(self, plan: Plan, row, choice: _Choice, start: int, stop: int) -> Dict:
        if plan.kind == "chat":
            content = []
            for i in range(start, stop):
                entry = _token_entry(choice.token_texts[i], row.logprobs[i])
                entry["top_logprobs"] = [_token_entry(self._token_text(row.new_tokens[:i], t), lp)
                                         for t, lp in (row.top_logprobs[i] if plan.top_logprobs else [])]
                content.append(entry)
            return {"content": content, "refusal": None}
        offsets, offset = [], sum(len(t) for t in choice.token_texts[:start])
        for i in range(start, stop):
            offsets.append(offset)
            offset += len(choice.token_texts[i])
        top = None
        if plan.top_logprobs:
            top = []
            for i in range(start, stop):
                alternatives: Dict[str, float] = {}
                for t, lp in row.top_logprobs[i]:
                    alternatives.setdefault(self._token_text(row.new_tokens[:i], t), lp)
                top.append(alternatives)
        return {"tokens": choice.token_texts[start:stop], "token_logprobs": row.logprobs[start:stop],
                "top_logprobs": top, "text_offset": offsets}

    def _usage(self, plan: Plan, rows) -> Dict:
        prompt_tokens = sum(len(p) + plan.image_positions for p in plan.prompts)  # (a picture's positions count)
        completion_tokens = sum(len(row.new_tokens) for row in rows)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(row.cached_tokens for row in rows)}}

    # -------------------------------------------------------------- responses
    def complete(self, body, kind: str):
        """The response for ``kind`` "chat" or "completion": a dict, or (``stream``) an iterator of chunks.

        Checks the request first, so an :class:`ApiError` is raised here, before any chunk.
        """
        plan = self.plan(body, kind)
        ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        if plan.stream:
            return self._stream(plan, ident)
        states = None
        job = self._job(plan)
        try:
            for states in job:
                pass
        finally:
            job.cancel()  # a no-op once it ran to its end
        choices = []
        for index, row in enumerate(states):
            choice = _Choice(index)
            text = self._visible(plan, row)
            logprobs = None
            if plan.logprobs:
                logprobs = self._logprobs(plan, row, choice, 0, self._settled_tokens(row, choice))
            reason = "length" if row.finish_reason == "length" else "stop"
            if kind == "chat":
                choices.append({"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                                "logprobs": logprobs, "finish_reason": reason})
            else:
                choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason})
        return {"id": ident, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": plan.model, "choices": choices,
                "usage": self._usage(plan, states), "system_fingerprint": None}

    def _stream(self, plan: Plan, ident: str) -> Iterator[Dict]:
        created = int(time.time())
        chat = plan.kind == "chat"

        def chunk(choices, usage=None):
            out = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": created, "model": plan.model, "choices": choices, "system_fingerprint": None}
            if plan.include_usage:
                out["usage"] = usage
            return out

        def piece(choice: _Choice, text: str, logprobs, reason):
            if chat:
                delta = {"content": text}
                if not choice.role_sent:
                    delta = {"role": "assistant", **delta}
                    choice.role_sent = True
                return {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": reason}

        choices = [_Choice(i) for i in range(len(plan.rows))]
        states = None
        job = self._job(plan)
        try:
            for states in job:
                out = []
                for choice, row in zip(choices, states):
                    if choice.sent_text is None:  # finished and reported
                        continue
                    text = self._visible(plan, row)
                    delta = text[len(choice.sent_text):] if text.startswith(choice.sent_text) else ""
                    logprobs = None
                    if plan.logprobs:
                        settled = self._settled_tokens(row, choice)
                        if settled > choice.sent_tokens:
                            logprobs = self._logprobs(plan, row, choice, choice.sent_tokens, settled)
                            choice.sent_tokens = settled
                    reason = None
                    if row.finished:
                        reason = "length" if row.finish_reason == "length" else "stop"
                    if delta or logprobs or reason:
                        out.append(piece(choice, delta, logprobs, reason))
                        choice.sent_text = text
                    if row.finished:
                        choice.sent_text = None
                if out:
                    yield chunk(out)
        finally:
            job.cancel()  # the client left, or a no-op once the job ran to its end
        if plan.include_usage:
            yield chunk([], self._usage(plan, states))


def _token_entry(text: str, logprob: float) -> Dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
