"""The generation loop shared by ``generate``, ``stream_generate`` and every face built on them.

One prefill over all prompts (right-padded; each row's cache slots are addressed by its own
positions, so padding is never attended), then one decode step per token for the rows still
running. A row stops on an end-of-sequence token, on a stop string found in its decoded text, or
at its own ``max_new_tokens``; finished rows leave the batch and cost nothing more.

The sampler sees each row's prompt + generated tokens (for the penalties) and its original row
index (for its seeded generator), both looked up through ``active`` so they stay aligned with the
logits as finished rows leave. With ``logprobs=True`` each row also records, per generated token,
its log-probability under the model's raw distribution (before penalties or temperature).

A model cut across a model-parallel group runs one engine per process: with ``sync_group`` the
tokens picked by the group's first rank are broadcast each step, so every rank feeds the same
tokens to its slice whatever its random state.

Prompt cache (off by default; the chat faces turn it on): each row of a text run keeps its cache
when it ends (a one-row run the cache itself, a batch's rows copies taken as they leave), with the
token ids whose keys and values it holds: its prompt and the tokens fed back, counted as positions
are written, so a run stopped early or a failed step claims only what it wrote. Up to
``prompt_cache_slots`` caches are kept (1 unless set), the most recent first, and older ones only
while all fit in ``prompt_cache_bytes`` (None: no bound). Each row of a later
run takes the kept cache sharing the longest prefix with its prompt, copies those positions and
prefills only the rest, from its own position: in a chat each turn's prompt is the last one plus
the answer and a new message, so a turn costs its new tokens instead of the whole conversation.
The prompt's last token is prefilled again for its logits, unless a one-row run's prompt is the
kept run's own (a regenerated answer): its first logits are kept too, so that run repeats
exactly. Otherwise reused keys were computed by other steps than a fresh prefill's (decode steps
for an answer, a prefill of another length or batch), so a reused turn can differ from a fresh
one by rounding, as llama.cpp's prompt reuse does: hence off for ``generate`` /
``stream_generate`` unless asked for. Nothing is reused when the model's weights (their memory,
or an in-place write torch counts) or hooks changed since.
``prompt_cache=True`` (or the attribute) turns it on, ``ACCESSORY_PROMPT_CACHE=1`` / ``0`` where
the code does not say; ``clear_prompt_cache()`` frees the kept caches.

Images take part. In the ``tagged`` and ``prefix`` layouts a row's positions are held as its text
ids with its image's vectors at their positions, each such position keyed by a digest of the
vectors' bytes, so a multimodal chat's next turn about the same picture reuses the picture's
positions and the history (the SPHINX encoders put hundreds to thousands of vectors there). An
image is reused whole or not at all: a row whose image is not reused prefills from 0. The
``adapter`` layout's image takes no positions but changes every position's keys through the
adapter prefix: each id of such a row is held paired with the digest, so only a prompt about the
same picture matches, and at least its last token is prefilled again, with the picture, since the
cache keeps the prefix's own keys apart from the positions a kept cache gives.
"""

import hashlib
import itertools
import threading
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from ..kernels import switched_off, switched_on
from ..model.layers.multimodal import image_offsets, insert_images, insert_index
from .cuda_graphs import GraphedDecoder, cuda_graphs_enabled, weights_state
from .detokenize import IncrementalDetokenizer
from .sampling import Sampler, SamplingParams
from .stopping import StopStringMatcher


@dataclass
class RowState:
    """Progress of one sequence in the batch."""
    prompt_len: int
    max_new_tokens: int
    detokenizer: IncrementalDetokenizer
    new_tokens: List[int] = field(default_factory=list)
    visible: str = ""  # text that may be shown (never part of a stop string)
    finished: bool = False
    finish_reason: Optional[str] = None  # "eos", "stop", "length"
    # with logprobs=True, one entry per token of new_tokens: log_softmax of the raw float logits
    logprobs: List[float] = field(default_factory=list)
    # with top_logprobs=k, one list per token of new_tokens: the k best (token id, logprob) pairs
    top_logprobs: List[List[Tuple[int, float]]] = field(default_factory=list)
    # leading prompt positions (an image's included) whose keys and values came from the prompt cache
    cached_tokens: int = 0


def prompt_cache_enabled(wanted: Optional[bool] = None, default: bool = False) -> bool:
    """``wanted`` when given, else ``ACCESSORY_PROMPT_CACHE`` when set (``1``, ``true``, ``yes``,
    ``on`` / ``0``, ``false``, ``no``, ``off``), else ``default`` (the faces pass True)."""
    if wanted is not None:
        return bool(wanted)
    if switched_on("ACCESSORY_PROMPT_CACHE"):
        return True
    if switched_off("ACCESSORY_PROMPT_CACHE"):
        return False
    return default


@dataclass(eq=False)
class _KeptCache:
    """A finished one-prompt run's cache: positions 0..len(tokens)-1 hold the keys and values of
    ``tokens`` (``prompt`` and the tokens fed back), computed by weights in ``weights``' state;
    ``logits``: its prefill's (None if the prefill did not finish)."""
    cache: object
    tokens: list  # token ids; an image's positions as _image_key tuples (the adapter's: (key, id) pairs)
    weights: tuple
    prompt: list
    logits: Optional[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in itertools.chain(self.cache.keys, self.cache.values))


def tensor_digest(tensor: torch.Tensor) -> str:
    """A sha1 hex digest of ``tensor``'s shape, dtype and bytes (read from the CPU)."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha1(f"{tuple(data.shape)} {data.dtype}".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _image_key(vectors: torch.Tensor) -> tuple:
    """What stands for each of an image's positions among a row's held ids: a digest of all its
    vectors (one tuple, repeated at each of its positions)."""
    return ("image", tensor_digest(vectors.reshape(vectors.shape[-2:])))


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # (a chat's next turn: compared at C speed)
        return n
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


class GenerationEngine:
    """Drives a model that offers ``new_kv_cache`` and ``forward_tokens`` (see model/LLM/llama.py)."""

    def __init__(self, model, tokenizer, eos_ids: Sequence[int], sync_group=None,
                 cuda_graphs: Optional[bool] = None, prompt_cache: Optional[bool] = None):
        """``sync_group``: a torch.distributed group whose ranks must pick the same tokens (the
        model-parallel group), or None. ``cuda_graphs``: replay decode steps on a GPU as CUDA
        graphs (``generation/cuda_graphs.py``); None: on, unless ``ACCESSORY_CUDA_GRAPHS=0`` or model-parallel.
        ``prompt_cache``: reuse the keys and values earlier runs' rows kept (see the module notes);
        None: ``ACCESSORY_PROMPT_CACHE`` when set, else off. The attribute can be changed later."""
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = set(i for i in eos_ids if i is not None)
        self.sync_group = sync_group
        self.cuda_graphs = cuda_graphs
        self.prompt_cache = prompt_cache_enabled(prompt_cache)
        # how many rows' caches are kept (several conversations taking turns, as on a server);
        # each holds one row's cache, up to the positions its run asked for
        self.prompt_cache_slots = 1
        # the most bytes the kept caches hold together, the most recent one aside (None: no bound)
        self.prompt_cache_bytes: Optional[int] = None
        self._graphed = None  # CUDA-graph decode steps (generation/cuda_graphs.py), made on first CUDA run
        self._kept: List[_KeptCache] = []  # the most recently kept first
        self._kept_lock = threading.Lock()

    def clear_prompt_cache(self) -> None:
        """Drop the kept caches (their memory is freed once no run uses them)."""
        with self._kept_lock:
            self._kept = []

    def _take_kept(self, prompt: Sequence, state: tuple) -> Tuple[Optional[_KeptCache], int]:
        """The kept cache that serves most of ``prompt`` (a row's position ids, see
        :meth:`_position_ids`) and how many leading positions it serves: all of them when
        ``prompt`` is its run's prompt and the logits were kept, else the shared prefix less the
        last position (prefilled again for its logits). A kept cache is only ever
        copied from, so it stays for other runs, unless all its ids begin ``prompt`` (the same
        conversation's last turn): this run's cache will hold them too, so it goes now, before
        the prefill needs memory. Caches kept before the weights or hooks changed (``state``,
        :func:`weights_state` now) are dropped."""
        prompt = list(prompt)

        def serves(kept: _KeptCache) -> int:
            if kept.logits is not None and kept.prompt == prompt:
                return len(prompt)
            return max(0, min(_common_prefix(kept.tokens, prompt), len(prompt) - 1))
        with self._kept_lock:
            self._kept = [kept for kept in self._kept if kept.weights == state]
            if not self._kept:
                return None, 0
            kept = max(self._kept, key=serves)  # the first (most recent) of equals
            if kept.tokens == prompt[:len(kept.tokens)]:
                self._kept.remove(kept)
        return kept, serves(kept)

    def _keep(self, kept: _KeptCache) -> None:
        """Keep a finished run's cache first; one whose ids it extends (the same conversation's
        earlier turn) goes, and the oldest beyond ``prompt_cache_slots`` or, with the new one,
        beyond ``prompt_cache_bytes``."""
        def extended(old: _KeptCache) -> bool:
            return len(old.tokens) <= len(kept.tokens) and kept.tokens[:len(old.tokens)] == old.tokens
        with self._kept_lock:
            others = [old for old in self._kept if not extended(old)][:max(self.prompt_cache_slots, 1) - 1]
            if self.prompt_cache_bytes is not None:
                total, fitting = kept.nbytes, []
                for old in others:
                    if total + old.nbytes > self.prompt_cache_bytes:
                        break
                    total += old.nbytes
                    fitting.append(old)
                others = fitting
            self._kept = [kept] + others

    def _agree_min(self, values: List[int]) -> List[int]:
        """Each of ``values`` lowered to its smallest across ``sync_group`` (each rank keeps its own
        caches; a rank that stopped a run early holds fewer positions)."""
        if self.sync_group is None:
            return values
        import torch.distributed as dist
        tensor = torch.tensor(values, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.sync_group)
        return tensor.tolist()

    def _agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first rank's token ids on every rank of ``sync_group`` (unchanged without one)."""
        if self.sync_group is None:
            return tokens
        import torch.distributed as dist
        tokens = tokens.contiguous()
        dist.broadcast(tokens, src=dist.get_global_rank(self.sync_group, 0), group=self.sync_group)
        return tokens

    def _launches_ahead(self) -> bool:
        """Whether a decode step may start before the host has the last tokens: with graphed steps
        (a GPU's queue runs them while the host works) and no group to agree the tokens with."""
        return self._graphed is not None and not self._graphed.disabled and self.sync_group is None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def run(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
            sampling: SamplingParams, stop_strings: Sequence[str] = (), *, logprobs: bool = False,
            top_logprobs: int = 0, image_embeds=None) -> Iterator[List[RowState]]:
        """Generate for every prompt; after each decode step yield the list of row states.

        ``prompts`` must already fit: ``len(prompt) + max_new_tokens <= the model's context``.
        ``logprobs`` fills ``RowState.logprobs``; ``top_logprobs=k`` (implies logprobs) also
        fills ``RowState.top_logprobs`` with the k most likely tokens of each step.
        ``image_embeds``: per row, the vectors its image inserts ((batch, N, dim), or a list of
        (N_r, dim) / None), placed by the model's ``image_layout`` at prefill only; row r's text
        then sits N_r positions later and ``N_r + len(prompt) + max_new_tokens`` must fit.
        """
        logprobs = logprobs or top_logprobs > 0
        device = self.device
        if self._graphed is None and cuda_graphs_enabled(device, self.cuda_graphs, self.sync_group is not None):
            self._graphed = GraphedDecoder(self.model)
        rows = [RowState(len(p), int(n), IncrementalDetokenizer(self.tokenizer))
                for p, n in zip(prompts, max_new_tokens)]
        matcher = StopStringMatcher(stop_strings)
        sampler = Sampler(sampling, device, num_rows=len(rows))
        prompts = [list(p) for p in prompts]
        for row in rows:
            if row.max_new_tokens <= 0:
                row.finished, row.finish_reason = True, "length"
        active = [i for i, row in enumerate(rows) if not row.finished]
        if not active:
            yield rows
            return

        layout = self.model.image_layout
        offsets = image_offsets(image_embeds, len(rows), layout)  # image positions before each row's text
        capacity = max(offsets[i] + rows[i].prompt_len + rows[i].max_new_tokens for i in active)
        # reuse kept caches' shared prefixes, and keep this run's rows' caches after it
        keep = self.prompt_cache
        # per row, the ids its cache positions will hold (its image's positions included) and what
        # its new tokens are paired with (the adapter layout's image digest, or None)
        held, tags = {}, {}
        for i in (active if keep else ()):
            held[i], tags[i] = self._position_ids(prompts[i], image_embeds, i, offsets[i])
        single = len(active) == 1
        kept_for, starts = [None] * len(active), [0] * len(active)
        if keep:
            state = weights_state(self.model, count_writes=True)
            geometry = (self.model.n_layers, self.model.n_kv_heads, self.model.head_dim)
            for slot, i in enumerate(active):
                kept_for[slot], starts[slot] = self._take_kept(held[i], state)
                if kept_for[slot] is not None and kept_for[slot].cache.geometry != geometry:
                    starts[slot] = 0
                if not single or tags[i] is not None:
                    # a batch prefills at least each row's last token (kept logits: one row only), and so
                    # does an adapter image row (the prefill gives the cache the picture's prefix keys)
                    starts[slot] = min(starts[slot], len(held[i]) - 1)
                if offsets[i] and starts[slot] < insert_index(layout) + offsets[i]:
                    starts[slot] = 0  # (an image is reused whole or not at all)
            starts = self._agree_min(starts)
        # text tokens each row's prefill starts from, and how many positions it writes
        text_from = [starts[slot] - offsets[i] if starts[slot] else 0 for slot, i in enumerate(active)]
        lengths = [offsets[i] + rows[i].prompt_len - starts[slot] for slot, i in enumerate(active)]
        longest = max(lengths)
        # (a row that starts later writes its padding further on: room for it)
        capacity = max(capacity, max(starts) + longest)
        cache = self.model.new_kv_cache(len(active), capacity)
        for slot, kept in enumerate(kept_for):
            if starts[slot] > 0 and not cache.copy_prefix_from(kept.cache, starts[slot], row=slot):
                raise RuntimeError(f"a kept cache could not serve {starts[slot]} positions of row {slot}: "
                                   f"turn the prompt cache off (ACCESSORY_PROMPT_CACHE=0) and report this")
        first_logits = kept_for[0].logits if single and starts[0] > 0 and lengths[0] == 0 else None
        kept_for = kept = None  # (a superseded kept cache's memory goes before the prefill needs more)
        cached = {}  # row -> leading positions of its held ids + new tokens that `cache` holds
        for slot, i in enumerate(active):
            rows[i].cached_tokens = cached[i] = starts[slot]
        kept_rows = 0
        try:
            tokens = torch.zeros((len(active), max(rows[i].prompt_len - text_from[slot]
                                                   for slot, i in enumerate(active))),
                                 dtype=torch.long, device=device)
            for slot, i in enumerate(active):
                tokens[slot, : rows[i].prompt_len - text_from[slot]] = torch.tensor(prompts[i][text_from[slot]:],
                                                                                    dtype=torch.long)
            positions = (torch.tensor(starts, device=device)[:, None]
                         + torch.arange(longest, device=device)[None, :])
            if len(set(starts)) == 1:  # (the cache's write plan then takes one slice for all rows)
                positions = torch.arange(starts[0], starts[0] + longest, device=device).expand(len(active), longest)
            last_index = torch.tensor([n - 1 for n in lengths], device=device)
            # rows whose image goes into this prefill (all of them in the adapter layout)
            inserted = [slot for slot, i in enumerate(active)
                        if offsets[i] and starts[slot] == 0 or image_embeds is not None and layout == "adapter"]
            if first_logits is not None:  # the kept run's own prompt: its prefill's logits
                logits = first_logits.clone()
            elif not inserted:
                logits = self.model.forward_tokens(tokens, positions, cache, output_index=last_index)
            else:
                row_images = [image_embeds[i] if slot in inserted else None for slot, i in enumerate(active)]
                inputs = insert_images(self.model.embed_tokens(tokens),
                                       [rows[i].prompt_len - text_from[slot] for slot, i in enumerate(active)],
                                       row_images, layout)
                logits = self.model.forward_tokens(None, positions, cache, output_index=last_index,
                                                   input_embeds=inputs.embeds, image_prefix=inputs.prefix)
            first_logits = {}
            for slot, i in enumerate(active):
                cached[i] = offsets[i] + rows[i].prompt_len
                if keep:
                    first_logits[i] = logits[slot:slot + 1].clone()

            while True:
                logits = logits.float()
                contexts = generated = None
                if sampling.uses_penalties:
                    generated = [rows[i].new_tokens for i in active]
                    contexts = [prompts[i] + rows[i].new_tokens for i in active]
                picked = self._agree(sampler(logits, contexts, generated, rows=active))
                # what goes back to the host: the tokens and, with logprobs, their log-probabilities
                wanted = (picked, *(self._logprob_tensors(logits, picked, top_logprobs) if logprobs else ()))
                ahead = None  # the next step, started before this one's tokens reach the host
                if self._launches_ahead() and \
                        any(len(rows[i].new_tokens) + 1 < rows[i].max_new_tokens for i in active):
                    # each row's next input is the token just picked, whatever it turns out to be:
                    # replay the next step on it now, so that the GPU computes it while the host
                    # reads these tokens back and handles them, time the GPU otherwise sat idle
                    # (measured on an H200: 7B 221 -> 227 tok/s, TinyLlama's shape 889 -> 1029;
                    # benchmarks/cuda_profile.py). A row this token finishes (EOS, a stop string,
                    # its limit) is computed once more, within the cache, and dropped from the
                    # step's logits.
                    read_back = self._graphed.read_back(*wanted)
                    positions_ahead = [offsets[i] + rows[i].prompt_len + len(rows[i].new_tokens) for i in active]
                    ahead = self._graphed(cache, picked[:, None],
                                          self._graphed.positions_tensor(positions_ahead, device))
                    next_tokens, *logprob_lists = read_back()
                else:
                    next_tokens, *logprob_lists = [t.tolist() for t in wanted]
                if logprobs:
                    self._record_logprobs([rows[i] for i in active], next_tokens, *logprob_lists)
                for slot, i in enumerate(active):
                    self._advance(rows[i], next_tokens[slot], matcher)
                yield rows
                still = [slot for slot, i in enumerate(active) if not rows[i].finished]
                if not still:
                    return
                if len(still) < len(active):
                    if keep:  # rows leaving the batch: keep copies of their caches first
                        state = weights_state(self.model, count_writes=True)
                        for slot, i in enumerate(active):
                            if rows[i].finished and kept_rows < self.prompt_cache_slots:
                                self._keep_row(cache.row_prefix(slot, cached[i]), held[i], tags[i], rows[i],
                                               cached[i], first_logits.get(i), state)
                                kept_rows += 1
                    cache.select_rows(torch.tensor(still, device=device))
                    active = [active[slot] for slot in still]
                    if ahead is not None:
                        ahead = ahead[still]
                if ahead is not None:  # (already running on these tokens)
                    logits = ahead
                else:
                    step_tokens = torch.tensor([[rows[i].new_tokens[-1]] for i in active], device=device)
                    step_positions = torch.tensor([[offsets[i] + rows[i].prompt_len + len(rows[i].new_tokens) - 1]
                                                   for i in active],
                                                  device=device)
                    if self._graphed is not None:
                        logits = self._graphed(cache, step_tokens, step_positions)
                    else:  # (batch, 1, vocab): one token a row, so no index to gather by
                        logits = self.model.forward_tokens(step_tokens, step_positions, cache)[:, 0]
                for i in active:
                    cached[i] = offsets[i] + rows[i].prompt_len + len(rows[i].new_tokens)
        finally:  # also when the caller stops early or a step fails: the positions written before
            if keep:
                state = weights_state(self.model, count_writes=True)
                for slot, i in enumerate(active):
                    if kept_rows >= self.prompt_cache_slots:
                        break
                    # the last row of a run keeps the cache itself, unless a quarter or more of it
                    # was never written (room for a longer answer, up to the whole context: a 7B
                    # llama-2 cache of 4096 positions takes 2 GiB); rows of a batch, copies
                    whole = cache.batch_size == 1 and 4 * cached[i] >= 3 * cache.max_len
                    row_cache = cache if whole else cache.row_prefix(slot, cached[i])
                    self._keep_row(row_cache, held[i], tags[i], rows[i], cached[i],
                                   first_logits.get(i) if isinstance(first_logits, dict) else None, state)
                    kept_rows += 1

    def _position_ids(self, prompt: List[int], image_embeds, row: int, n_image: int) -> Tuple[list, Optional[tuple]]:
        """(the ids a row's cache positions hold before its new tokens, what its new tokens are
        paired with): the prompt's ids, with its image's (``n_image`` vectors) at their place in
        the layout as :func:`_image_key`; in the ``adapter`` layout every id paired with that key
        instead (the picture is in every position's keys), which new tokens get too."""
        if image_embeds is None or image_embeds[row] is None:
            return list(prompt), None
        if self.model.image_layout == "adapter":
            key = _image_key(image_embeds[row])
            return [(key, token) for token in prompt], key
        at = insert_index(self.model.image_layout)
        return prompt[:at] + [_image_key(image_embeds[row])] * n_image + prompt[at:], None

    def _keep_row(self, cache, prompt: list, tag: Optional[tuple], row: RowState, cached: int,
                  logits: Optional[torch.Tensor], state: tuple):
        """Keep ``cache`` (one row) as holding the first ``cached`` ids of ``prompt`` (the ids of
        its prompt's positions, :meth:`_position_ids`) + its new tokens (paired with ``tag`` when
        not None), computed by weights in ``state``."""
        if cached <= 0:  # (a prefill that failed with nothing reused holds nothing)
            return
        new = row.new_tokens if tag is None else [(tag, token) for token in row.new_tokens]
        held = (list(prompt) + new)[:cached]
        self._keep(_KeptCache(cache, held, state, list(prompt), logits if cached >= len(prompt) else None))

    @staticmethod
    def _logprob_tensors(logits: torch.Tensor, picked: torch.Tensor, top_k: int) -> tuple:
        """On the logits' device: the log-probabilities (nats) of the picked tokens under the raw
        logits and, with ``top_k``, the k best tokens' ids and log-probabilities."""
        log_probs = torch.log_softmax(logits, dim=-1)
        chosen = log_probs.gather(-1, picked.to(log_probs.device)[:, None])[:, 0]
        if top_k <= 0:
            return (chosen,)
        best = torch.topk(log_probs, min(top_k, log_probs.shape[-1]), dim=-1)
        return chosen, best.indices, best.values

    def _record_logprobs(self, rows: List[RowState], tokens: List[int], chosen: List[float],
                         best_ids: Optional[list] = None, best_values: Optional[list] = None) -> None:
        """Each row's entries from :meth:`_logprob_tensors`' values; EOS is not recorded, so the
        lists stay aligned with ``new_tokens``."""
        for slot, row in enumerate(rows):
            if tokens[slot] in self.eos_ids:
                continue
            row.logprobs.append(chosen[slot])
            if best_ids is not None:
                row.top_logprobs.append(list(zip(best_ids[slot], best_values[slot])))

    def _advance(self, row: RowState, token: int, matcher: StopStringMatcher) -> None:
        if token in self.eos_ids:
            self._finish(row, "eos", matcher)
            return
        row.new_tokens.append(token)
        before = len(row.detokenizer.text)
        row.detokenizer.add(token)
        stopped, visible = matcher.check(row.detokenizer.text, before)
        if stopped:
            row.visible = row.detokenizer.text[:visible]
            row.finished, row.finish_reason = True, "stop"
            return
        row.visible = row.detokenizer.text[:visible]
        if len(row.new_tokens) >= row.max_new_tokens:
            self._finish(row, "length", matcher)

    @staticmethod
    def _finish(row: RowState, reason: str, matcher: StopStringMatcher) -> None:
        row.detokenizer.flush()
        text = row.detokenizer.text
        index = matcher.find(text)
        row.visible = text if index is None else text[:index]
        row.finished, row.finish_reason = True, ("stop" if index is not None else reason)
