"""``MetaModel``: the seed's Python API over checkpoint/ (loading), model/ (math) and generation/.

Code written against LLaMA2-Accessory runs unchanged::

    model = MetaModel.from_pretrained("/path/to/pretrained", max_seq_len=2048)
    model.generate([prompt], images=None, max_gen_len=512)
    for chunk in model.stream_generate(prompt, image=None, max_gen_len=512): print(chunk["text"])

Differences from the original, all deliberate (see docs/differences.md): no torch.distributed
set-up is needed at model-parallel size 1; CPU works; every batch row stops at its own
``max_gen_len``; prompts too long are cut from the left keeping BOS; delta checkpoints are added;
missing weights are an error unless ``strict=False``; BOS follows the tokenizer's own setting.
"""

import collections
import copy
import dataclasses
import json
import logging
import threading
import typing
import warnings
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from ..checkpoint.discover import find_shards, read_llama_type
from ..checkpoint.load import load_pretrained
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..generation.engine import GenerationEngine, tensor_digest, weights_state
from ..kernels.linear import use_native_linear
from ..generation.sampling import SamplingParams
from ..quant import Quantizer, eligible_linears, make_shells, resolve_scheme
from ..quant.checkpoint import read_quantization
from ..quant.linear import packed_in_huge_pages
from .LLM import load_llama_type
from .layers.linear import rows_in_huge_pages
from .layers.multimodal import encode_for, image_offsets, insert_images
from .layers.panel_linear import use_panels
from .layers.tensor_parallel import add_collectives, check_supported, model_parallel_of, shard_meta_model
from .tokenizer import Tokenizer, probe_tokenizer_path

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def resolve_dtype(dtype) -> torch.dtype:
    """A torch dtype from a dtype or one of 'bf16', 'fp16', 'fp32' (and their long names)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}: use torch.bfloat16, torch.float16, torch.float32 or "
                     f"'bf16' / 'fp16' / 'fp32'")


def resolve_device(device) -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def merge_config_files(llama_config: Union[PathLike, Sequence[PathLike], None],
                       sources: Optional[Dict[str, str]] = None) -> Dict:
    """Merge json config files in order (later keys win); ``sources`` (if given) receives the
    file that set each key."""
    if llama_config is None:
        return {}
    if isinstance(llama_config, (str, Path)):
        llama_config = [llama_config]
    merged: Dict = {}
    for path in llama_config:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"llama_config file {path} does not exist")
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"llama_config file {path} is not valid JSON: {exc}") from exc
        if not isinstance(content, dict):
            raise ConfigError(f"llama_config file {path} must hold a JSON object, found {type(content).__name__}")
        merged.update(content)
        if sources is not None:
            sources.update({key: str(path) for key in content})
    return merged


def build_args(model_module, llama_type: str, config: Dict, max_seq_len: int, vocab_size: int,
               sources: Optional[Dict[str, str]] = None):
    """``ModelArgs`` of ``llama_type`` from merged config, rejecting fields it does not take and
    values of the wrong type (``sources`` maps keys to the file they came from, for messages)."""
    sources = sources or {}
    model_args_cls = model_module.ModelArgs
    fields = {f.name for f in dataclasses.fields(model_args_cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        files = sorted({sources[k] for k in unknown if k in sources})
        raise ConfigError(
            f"config field(s) {unknown}{f' in {files}' if files else ''} are not arguments of "
            f"llama_type {llama_type!r}; it takes: "
            f"{', '.join(sorted(fields))}. Remove them from the config file or pick the right llama_type")
    hints = typing.get_type_hints(model_args_cls)
    for key, value in config.items():
        expected = hints.get(key)
        if expected is not None and not _value_fits(value, expected):
            raise ConfigError(
                f"config field {key!r} of llama_type {llama_type!r} is {value!r} ({type(value).__name__}), "
                f"expected {getattr(expected, '__name__', expected)}; fix the value in "
                f"{sources.get(key, 'the config file')}")
    args = dict(config)
    args["max_seq_len"] = max_seq_len
    args["max_batch_size"] = 32
    args["vocab_size"] = vocab_size
    return model_args_cls(**args)


def _value_fits(value, annotation) -> bool:
    """Whether a JSON value suits a dataclass field annotation (int for float is fine)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return any(_value_fits(value, arm) for arm in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (bool, str):
        return isinstance(value, annotation)
    if origin in (list, tuple, typing.List, typing.Tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, typing.Dict):
        return isinstance(value, dict)
    return True  # anything else (Any, custom types): let the architecture judge


def _quant_plan(quant, device: torch.device, paths: Sequence[Path]):
    """(scheme, prequantized): the quantization asked for, or the one the checkpoint was saved in."""
    try:
        asked = resolve_scheme(quant, device)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    saved = read_quantization(paths[-1])
    if saved is None:
        return asked, False
    if len(paths) > 1:
        raise CheckpointError(f"{paths[-1]} is a pre-quantized checkpoint: load it alone (a base or "
                              f"delta listed with it cannot be added to packed weights)")
    if quant is not True and asked is not None and asked != saved:
        raise ConfigError(f"{paths[-1]} was saved quantized as {saved.to_json()}, but quant={quant!r} "
                          f"asks for {asked.to_json()}: pass quant=True (or leave quant out) to use the "
                          f"saved format, or re-quantize from the full-precision checkpoint")
    return saved, True


#: encoded image batches MetaModel keeps (see MetaModel._encode_images)
IMAGE_MEMO_SIZE = 4


class MetaModel(nn.Module):
    """A language model (``self.llma``) with its tokenizer and the original's inference API."""

    def __init__(self, llama_type: str, llama_config: Union[PathLike, Sequence[PathLike], None],
                 tokenizer_path: PathLike, with_visual: bool = False, max_seq_len: int = 4096) -> None:
        """Build the architecture with fresh weights (``from_pretrained`` builds it on the meta
        device instead and fills it from a checkpoint)."""
        super().__init__()
        self.llama_type = llama_type
        self.with_visual = with_visual
        model_module = load_llama_type(llama_type)
        self.tokenizer = Tokenizer(str(tokenizer_path))
        sources: Dict[str, str] = {}
        config = merge_config_files(llama_config, sources)
        try:
            self.args = build_args(model_module, llama_type, config, max_seq_len, self.tokenizer.n_words, sources)
            self.llma = model_module.Transformer(self.args, with_visual=with_visual)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            files = [str(p) for p in ([llama_config] if isinstance(llama_config, (str, Path)) else llama_config or [])]
            raise ConfigError(
                f"llama_type {llama_type!r} cannot be built from the config {files or '(defaults)'}: {exc}. "
                f"Fix the value in the config file") from exc
        self.split_plan = self.llma.split_plan  # an instance attribute where it depends on the config
        self.is_peft = getattr(self.llma, "is_peft", False)
        self.mp_group = None  # set by from_pretrained when the weights are cut across a group
        self._engine = None
        self._image_memo = collections.OrderedDict()  # see _encode_images
        self._image_memo_lock = threading.Lock()

    # Generation state of one model object: its engine (with the prompt caches it keeps) and the
    # image encodings it remembers, each behind a lock, which a copy starts without.
    _PER_OBJECT = ("_engine", "_image_memo", "_image_memo_lock")

    def __deepcopy__(self, memo) -> "MetaModel":
        """A copy with its own weights (as ``nn.Module`` copies) and fresh generation state: no
        engine, kept prompt caches or image memo of the original's (locks cannot be copied, and
        caches of the original's weights would not describe the copy's once they are edited)."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            if key not in self._PER_OBJECT:
                copied.__dict__[key] = copy.deepcopy(value, memo)
        copied._engine = None
        copied._image_memo = collections.OrderedDict()
        copied._image_memo_lock = threading.Lock()
        return copied

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_path: Union[PathLike, Sequence[PathLike]],
                        llama_type: Optional[str] = None,
                        llama_config: Union[PathLike, Sequence[PathLike], None] = None,
                        tokenizer_path: Optional[PathLike] = None,
                        with_visual: bool = False, max_seq_len: int = 4096,
                        mp_group=None, dtype=torch.bfloat16, device=None, quant=False,
                        *, strict: bool = True, progress: bool = True) -> "MetaModel":
        """Load a model from one or more checkpoint directories, applied in order.

        Unspecified ``llama_type`` / ``llama_config`` / ``tokenizer_path`` are read from the last
        directory (``meta.json``, ``config.json``, ``tokenizer.model`` or ``tokenizer.json`` +
        ``tokenizer_config.json``). ``device=None`` picks CUDA when available, else CPU.
        ``strict=False`` lets parameters absent from every checkpoint be freshly initialised.

        ``mp_group``: a torch.distributed group of N > 1 processes runs the model tensor-parallel
        (every text llama_type): every process of the group calls this, and later every
        scoring / generation call, with the same arguments; each holds only its 1/N slice of the
        split weights, read from a checkpoint of any shard count. gloo on CPU, nccl on CUDA
        (pass each process its own ``device``, e.g. ``f"cuda:{local_rank}"``). ``None`` or a
        group of size 1: the whole model on this process.

        ``quant``: weight-only quantization of the linear layers while loading (see accessory/quant):
        ``"int8"`` (per-channel), ``"int4"`` (group-wise, ``"int4-g64"`` for groups of 64), ``"nf4"``,
        or ``True`` for 4-bit (int4 on the CPU, nf4 on CUDA). A checkpoint saved pre-quantized
        (``accessory quantize``) loads in its own format.
        """
        if isinstance(pretrained_path, (str, Path)):
            paths = [Path(pretrained_path)]
        else:
            paths = [Path(p) for p in pretrained_path or []]
        if not paths:
            raise CheckpointError("pretrained_path is empty: give at least one checkpoint directory")
        for path in paths:
            if str(path).startswith("hf:/"):
                raise CheckpointError(
                    f"{path}: hf:// paths need a model hub, which Accessory does not download from yet; "
                    f"download the repo yourself and pass its local directory")
            find_shards(path)  # fail early, with the reason, before anything is built
        parallel = model_parallel_of(mp_group)
        dtype, device = resolve_dtype(dtype), resolve_device(device)
        last = paths[-1]
        scheme, prequantized = _quant_plan(quant, device, paths)
        if prequantized and parallel is not None:
            raise CheckpointError(
                f"{last} is a pre-quantized checkpoint, which loads on one process only; for model "
                f"parallelism load the full-precision checkpoint with quant={scheme.name!r}: each rank "
                f"quantizes its own slice")

        if llama_type is None:
            llama_type = read_llama_type(last, f"Pass llama_type= (e.g. 'llama') or write "
                                               f"{{\"llama_type\": \"llama\"}} into {last / 'meta.json'}")
        if parallel is not None:
            check_supported(llama_type, parallel.size)
        if llama_config is None:
            config_file = last / "config.json"
            if config_file.is_file():
                llama_config = [config_file]
            else:
                warnings.warn(f"{config_file} does not exist: using the default ModelArgs of {llama_type} "
                              f"(7B sizes for llama); pass llama_config= if that is wrong", stacklevel=2)
                llama_config = []
        if tokenizer_path is None:
            tokenizer_path = probe_tokenizer_path(str(last))
            if tokenizer_path is None:
                raise TokenizerError(
                    f"no tokenizer in {last}: expected tokenizer.model, or tokenizer.json + "
                    f"tokenizer_config.json. Copy the tokenizer there or pass tokenizer_path=")

        with torch.device("meta"):
            model = cls(llama_type, llama_config, tokenizer_path, with_visual, max_seq_len)
        shard = None
        if parallel is not None:
            try:
                shard_meta_model(model.llma, model.split_plan, parallel.rank, parallel.size)
            except ValueError as exc:
                raise ConfigError(f"llama_type {llama_type!r} cannot be cut over {parallel.size} "
                                  f"model-parallel ranks: {exc}") from exc
            shard = (parallel.rank, parallel.size)
        quantizer = None  # after the cut: a rank packs only its own slices
        if prequantized:
            make_shells(model, scheme, eligible_linears(model, scheme, model.get_quant_blocklist()))
        elif scheme is not None:
            quantizer = Quantizer(model, scheme, model.get_quant_blocklist())
        # Pack each weight as it is read (peak memory near the packed size), except where values
        # still change after loading: deltas add onto the base, ranks > 0 zero some biases.
        pack_while_loading = quantizer is not None and parallel is None and \
            not any(find_shards(p).is_diff for p in paths)
        result = load_pretrained(model, paths, model.split_plan, dtype, device, strict=strict, progress=progress,
                                 shard=shard, after_load=quantizer.after_load if pack_while_loading else None)
        model.load_result = result
        if parallel is not None:
            add_collectives(model.llma, model.split_plan, parallel)
            model.mp_group = parallel.group
        if quantizer is not None:
            quantizer.finish()  # what was not packed while loading (hooks move to the packed layers)
        model.quant_scheme = scheme
        if device.type == "cpu":
            use_native_linear(model)
            use_panels(model)
            rows_in_huge_pages(model)  # (what use_panels left in rows)
            packed_in_huge_pages(model)  # (int8 / int4 / nf4 layers)
        if hasattr(model.llma, "fuse_projections"):
            model.llma.fuse_projections()
        model.eval()
        return model

    # ------------------------------------------------------------------ scoring
    def _encode(self, text: str, bos: Optional[bool] = None, eos: bool = False) -> List[int]:
        if bos is None:
            bos = self.tokenizer.add_bos
        return self.tokenizer.encode(text, bos=bos, eos=eos)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.inference_mode()
    def compute_logits(self, examples: List[Union[str, List[int]]], images=None,
                       bos: Optional[bool] = None, eos: bool = False) -> List[torch.Tensor]:
        """Float32 logits (len_i, vocab) for each text or token list, in one right-padded batch.

        ``bos=None`` follows the tokenizer's own setting (the original always added BOS).
        ``images`` (multimodal types): one per example, a (batch, 3, H, W) tensor or a list of
        (3, H, W) tensors; the logits stay text-aligned (row i predicts token i+1).
        """
        if isinstance(examples, str):
            raise ValueError("compute_logits expects a LIST of examples, got a str")
        token_lists = [self._encode(e, bos, eos) if isinstance(e, str) else list(e) for e in examples]
        image_embeds = None if images is None else self._encode_images(images, len(token_lists), "images")
        lengths = [len(t) for t in token_lists]
        batch = torch.zeros((len(token_lists), max(lengths)), dtype=torch.long, device=self.device)
        for i, tokens in enumerate(token_lists):
            batch[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        if image_embeds is None:
            logits = self.llma.forward_tokens(batch)
            if isinstance(logits, tuple):
                logits = logits[0]
            return [row[:n].float() for row, n in zip(logits, lengths)]
        n_image = max(image_offsets(image_embeds, len(lengths), self.llma.image_layout))
        for i, n in enumerate(lengths):
            if n_image + n > self.args.max_seq_len:
                raise ValueError(
                    f"example {i}: its image takes {n_image} positions and its text {n} tokens, "
                    f"{n_image + n} in all, more than max_seq_len={self.args.max_seq_len}; shorten the "
                    f"example or load the model with a larger max_seq_len")
        inputs = insert_images(self.llma.embed_tokens(batch), lengths, image_embeds, self.llma.image_layout)
        logits = self.llma.forward_tokens(None, input_embeds=inputs.embeds, image_prefix=inputs.prefix)
        if isinstance(logits, tuple):
            logits = logits[0]
        return [row.float() for row in inputs.text_rows(logits, lengths)]

    @torch.inference_mode()
    def evaluate_examples(self, examples: List[Union[str, List[int]]],
                          contexts: Optional[List[Union[str, List[int]]]] = None, images=None,
                          bos: Optional[bool] = None, eos: bool = False) -> Dict[str, List]:
        """Per example: ``log_likelihood`` (sum of token log-probs), ``ppl`` (the original's name
        for the MEAN negative log-likelihood, not its exp), ``max_equal`` (every greedy prediction
        right) and ``non_context_logits``; only tokens after ``contexts[i]`` are scored. ``images``
        as in ``compute_logits``."""
        if isinstance(examples, str):
            raise ValueError("evaluate_examples expects a LIST of examples, got a str")
        token_lists = [self._encode(e, bos, eos) if isinstance(e, str) else list(e) for e in examples]
        context_lists = None
        if contexts is not None:
            context_lists = [self._encode(c, bos, False) if isinstance(c, str) else list(c) for c in contexts]
            for i, (e, c) in enumerate(zip(token_lists, context_lists)):
                if e[: len(c)] != c:
                    raise ValueError(f"example {i} does not start with its context's tokens")
        logits = self.compute_logits(token_lists, images)
        loss_fn = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=0)
        result = {"log_likelihood": [], "ppl": [], "max_equal": [], "non_context_logits": []}
        for i, item_logits in enumerate(logits):
            start = 0 if context_lists is None else len(context_lists[i]) - 1
            item_logits = item_logits[start:-1]
            labels = torch.tensor(token_lists[i][start + 1:], dtype=torch.long, device=item_logits.device)
            loss = loss_fn(item_logits, labels)
            result["log_likelihood"].append(-loss.sum().item())
            result["ppl"].append(loss.mean().item())
            result["max_equal"].append(bool((item_logits.argmax(dim=-1) == labels).all().item()))
            result["non_context_logits"].append(item_logits)
        return result

    # ------------------------------------------------------------------ generation
    @property
    def engine(self) -> GenerationEngine:
        if self._engine is None:
            self._engine = GenerationEngine(self.llma, self.tokenizer, [self.tokenizer.eos_id],
                                            sync_group=self.mp_group)
        return self._engine

    def _fit_prompt(self, tokens: List[int], max_gen_len: int, image_positions: int = 0) -> (List[int], int):
        """Cut a prompt from the left (keeping BOS) so that prompt + max_gen_len fits the context
        (what is left of it after ``image_positions`` taken by an image)."""
        max_seq_len = self.args.max_seq_len - image_positions
        if image_positions and max_seq_len < 2:
            raise ValueError(
                f"the image takes {image_positions} positions of max_seq_len={self.args.max_seq_len}, "
                f"leaving no room for a prompt and an answer; load the model with a larger max_seq_len "
                f"(image + prompt + max_gen_len must fit)")
        max_gen_len = max(0, min(max_gen_len, max_seq_len - 1))
        room = max_seq_len - max_gen_len
        if len(tokens) <= room:
            return tokens, max_gen_len
        keep_bos = bool(tokens) and tokens[0] == self.tokenizer.bos_id and self.tokenizer.add_bos
        head = tokens[:1] if keep_bos else []
        tail = tokens[-(room - len(head)):] if room > len(head) else []
        image_note = f" after the image's {image_positions} positions" if image_positions else ""
        warnings.warn(f"prompt of {len(tokens)} tokens does not fit max_seq_len={self.args.max_seq_len}"
                      f"{image_note} with max_gen_len={max_gen_len}: keeping {'BOS and ' if head else ''}its last "
                      f"{len(tail)} tokens", stacklevel=3)
        return head + tail, max_gen_len

    def _sampling(self, temperature, top_p, top_k, min_p, seed, **penalties) -> SamplingParams:
        """SamplingParams from the face's arguments; ``penalties`` are repetition_penalty,
        penalty_last_n, presence_penalty and frequency_penalty (see generation/sampling.py)."""
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                              **penalties)

    @torch.inference_mode()
    def generate(self, prompts: List[str], images=None, max_gen_len: int = 512, temperature: float = 0.0,
                 top_p: float = 0.95, additional_stop_symbols: Iterable[str] = (), *, top_k: int = 0,
                 min_p: float = 0.0, seed: Optional[int] = None, repetition_penalty: float = 1.0,
                 penalty_last_n: int = 64, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 return_logprobs: bool = False, top_logprobs: int = 0) -> List:
        """The new text for each prompt: each row stops at EOS, at a stop symbol (the text before
        it is returned) or after ``max_gen_len`` new tokens, whichever comes first.

        ``repetition_penalty`` looks at the last ``penalty_last_n`` tokens of prompt + output
        (-1 = all, 0 = off); ``presence_penalty`` / ``frequency_penalty`` at the output only.
        With ``return_logprobs=True`` (or ``top_logprobs=k > 0``) each item is instead a dict
        ``{"text", "tokens", "logprobs", "top_logprobs"}``: the generated token ids, each one's
        log-probability (nats) under the model's raw distribution, and the k best
        ``(token id, logprob)`` pairs of each step.

        ``images`` (multimodal types): one per prompt, a (batch, 3, H, W) tensor or a list of
        (3, H, W) tensors (None for a prompt without a picture), preprocessed
        (``accessory.data.transform.get_transform``); cast to the model's dtype and device here.
        The image's positions count against ``max_seq_len``."""
        if isinstance(prompts, str):
            raise ValueError("generate expects a LIST of prompts, got a str; use [prompt]")
        image_embeds = self._encode_some_images(images, len(prompts))
        n_images = image_offsets(image_embeds, len(prompts), self.llma.image_layout)
        fitted = [self._fit_prompt(self._encode(p), max_gen_len, n) for p, n in zip(prompts, n_images)]
        states = None
        penalties = dict(repetition_penalty=repetition_penalty, penalty_last_n=penalty_last_n,
                         presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        return_logprobs = return_logprobs or top_logprobs > 0
        for states in self.engine.run([f[0] for f in fitted], [f[1] for f in fitted],
                                      self._sampling(temperature, top_p, top_k, min_p, seed, **penalties),
                                      list(additional_stop_symbols), logprobs=return_logprobs,
                                      top_logprobs=top_logprobs, image_embeds=image_embeds):
            pass
        if return_logprobs:
            return [{"text": row.visible, "tokens": list(row.new_tokens), "logprobs": list(row.logprobs),
                     "top_logprobs": list(row.top_logprobs)} for row in states]
        return [row.visible for row in states]

    @torch.inference_mode()
    def stream_generate(self, prompt: str, image=None, max_gen_len: int = 512, temperature: float = 0.0,
                        top_p: float = 0.95, additional_stop_symbols: Iterable[str] = (), *, top_k: int = 0,
                        min_p: float = 0.0, seed: Optional[int] = None, repetition_penalty: float = 1.0,
                        penalty_last_n: int = 64, presence_penalty: float = 0.0,
                        frequency_penalty: float = 0.0) -> Iterator[Dict]:
        """Yield ``{"text": all text so far, "end_of_content": False}`` as tokens arrive, then the
        final text with ``end_of_content=True``. The final text equals ``generate``'s; the
        penalties mean what they mean there. ``image``: (3, H, W) or (1, 3, H, W)."""
        image_embeds = None if image is None else self._encode_images(image, 1, "image", single=True)
        n_image = image_offsets(image_embeds, 1, self.llma.image_layout)[0]
        tokens, max_gen_len = self._fit_prompt(self._encode(prompt), max_gen_len, n_image)
        last_text = None
        penalties = dict(repetition_penalty=repetition_penalty, penalty_last_n=penalty_last_n,
                         presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        for states in self.engine.run([tokens], [max_gen_len],
                                      self._sampling(temperature, top_p, top_k, min_p, seed, **penalties),
                                      list(additional_stop_symbols), image_embeds=image_embeds):
            row = states[0]
            if row.finished:
                yield {"text": row.visible, "end_of_content": True}
                return
            if row.visible != last_text:
                last_text = row.visible
                yield {"text": row.visible, "end_of_content": False}

    def get_quant_blocklist(self) -> List[str]:
        """Modules ``quant`` leaves in full precision beyond the defaults (visual encoders and their
        projections): the type's ``quant_blocklist``, ``llma.``-prefixed, as the original."""
        return ["llma." + name for name in getattr(self.llma, "quant_blocklist", ())]

    # ------------------------------------------------------------------ images
    @property
    def takes_images(self) -> bool:
        """Whether this model accepts images (a multimodal llama_type loaded with ``with_visual=True``)."""
        return getattr(self.llma, "image_layout", None) is not None

    @property
    def image_size(self) -> int:
        """The image side in pixels the model expects (the original's ``llma.image_size``, else 224)."""
        return int(getattr(self.llma, "image_size", None) or 224)

    def get_image_words(self) -> int:
        """How many sequence positions one image takes (the type's ``image_words``; 0 without images)."""
        return getattr(self.llma, "image_words", 0) if self.takes_images else 0

    def _encode_some_images(self, images, count: int):
        """``generate``'s images: None, (count, N, dim) vectors, or per prompt (N, dim) vectors or
        None when ``images`` is a list holding None for the prompts without a picture."""
        if images is None:
            return None
        if not isinstance(images, (list, tuple)) or all(image is not None for image in images):
            return self._encode_images(images, count, "images")
        if len(images) != count:
            raise ValueError(f"images: {len(images)} images for {count} prompts; give one per prompt "
                             f"(None for a prompt without a picture)")
        given = [i for i, image in enumerate(images) if image is not None]
        if not given:
            return None
        encoded = self._encode_images([images[i] for i in given], len(given), "images")
        out = [None] * count
        for k, i in enumerate(given):
            out[i] = encoded[k]
        return out

    def _encode_images(self, images, count: int, name: str, single: bool = False) -> torch.Tensor:
        """(count, N, dim) vectors that ``images`` insert, after checking them and casting them to
        the model's dtype and device."""
        if not self.takes_images:
            hint = "" if self.with_visual else \
                " (it was loaded with with_visual=False; a multimodal llama_type needs with_visual=True)"
            raise NotImplementedError(f"llama_type {self.llama_type!r} takes no images{hint}")
        batch = self._image_batch(images, count, name, single)
        # A chat about a picture sends it again every turn, and a CPU takes seconds to encode one
        # (21 s for SPHINX-Tiny's encoders, benchmarks/README.md): the last few encodings are
        # kept, keyed by the pixels and the weights' state (not under model parallelism, whose
        # ranks would have to agree on every hit). A hit returns the very vectors computed before.
        key = None
        if self.mp_group is None:
            key = (tensor_digest(batch), weights_state(self.llma, count_writes=True))
            with self._image_memo_lock:
                if key in self._image_memo:
                    self._image_memo.move_to_end(key)
                    return self._image_memo[key]
        embeds = encode_for(self.llma, batch)
        if embeds.dim() != 3 or embeds.shape[0] != count:
            raise RuntimeError(f"llama_type {self.llama_type!r}: encode_images returned shape {tuple(embeds.shape)}, "
                               f"expected ({count}, N, dim)")
        if key is not None:
            with self._image_memo_lock:
                self._image_memo[key] = embeds
                while len(self._image_memo) > IMAGE_MEMO_SIZE:
                    self._image_memo.popitem(last=False)
        return embeds

    def _image_batch(self, images, count: int, name: str, single: bool) -> torch.Tensor:
        """``images`` as one (count, 3, H, W) float tensor, or a ValueError saying what is wrong."""
        expected = "a (3, H, W) or (1, 3, H, W) tensor" if single else \
            f"a ({count}, 3, H, W) tensor or a list of {count} (3, H, W) tensors, one per prompt"
        fix = (f"preprocess each image with accessory.data.transform.get_transform('padded_resize', "
               f"{self.image_size})(pil_image)")
        if isinstance(images, (list, tuple)) and not single:
            if len(images) != count:
                raise ValueError(f"{name}: {len(images)} images for {count} prompts; expected {expected}")
            if not all(isinstance(i, torch.Tensor) for i in images):
                raise ValueError(f"{name} must hold tensors, got {[type(i).__name__ for i in images]}; {fix}")
            if any(i.dim() == 4 and i.shape[0] == 1 for i in images):
                images = [i[0] if i.dim() == 4 and i.shape[0] == 1 else i for i in images]
            if len({tuple(i.shape) for i in images}) > 1:
                raise ValueError(f"{name}: images of different shapes {[tuple(i.shape) for i in images]}; "
                                 f"resize them to {self.image_size}x{self.image_size}: {fix}")
            if any(i.dim() != 3 for i in images):
                raise ValueError(f"{name} must be {expected}, got shapes {[tuple(i.shape) for i in images]}")
            images = torch.stack(images)
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"{name} must be {expected}, got {type(images).__name__}; {fix}")
        if single and images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[0] != count or images.shape[1] != 3:
            raise ValueError(f"{name} must be {expected}, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"{name} must be a float tensor (normalised pixels), got {images.dtype}; {fix}")
        size = getattr(self.llma, "image_size", None)
        if size is not None and tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"llama_type {self.llama_type!r} takes {size}x{size} images, got "
                             f"{images.shape[2]}x{images.shape[3]}; {fix}")
        return images

