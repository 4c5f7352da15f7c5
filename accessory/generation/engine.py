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
"""

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from ..model.layers.multimodal import image_offsets, insert_images
from .cuda_graphs import GraphedDecoder, cuda_graphs_enabled
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


class GenerationEngine:
    """Drives a model that offers ``new_kv_cache`` and ``forward_tokens`` (see model/LLM/llama.py)."""

    def __init__(self, model, tokenizer, eos_ids: Sequence[int], sync_group=None,
                 cuda_graphs: Optional[bool] = None):
        """``sync_group``: a torch.distributed group whose ranks must pick the same tokens (the
        model-parallel group), or None. ``cuda_graphs``: replay decode steps on a GPU as CUDA
        graphs (``generation/cuda_graphs.py``); None: on, unless ``ACCESSORY_CUDA_GRAPHS=0`` or model-parallel."""
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = set(i for i in eos_ids if i is not None)
        self.sync_group = sync_group
        self.cuda_graphs = cuda_graphs
        self._graphed = None  # CUDA-graph decode steps (generation/cuda_graphs.py), made on first CUDA run

    def _agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first rank's token ids on every rank of ``sync_group`` (unchanged without one)."""
        if self.sync_group is None:
            return tokens
        import torch.distributed as dist
        tokens = tokens.contiguous()
        dist.broadcast(tokens, src=dist.get_global_rank(self.sync_group, 0), group=self.sync_group)
        return tokens

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

        offsets = image_offsets(image_embeds, len(rows), self.model.image_layout)  # image positions before each row's text
        capacity = max(offsets[i] + rows[i].prompt_len + rows[i].max_new_tokens for i in active)
        cache = self.model.new_kv_cache(len(active), capacity)
        longest = max(rows[i].prompt_len for i in active)
        tokens = torch.zeros((len(active), longest), dtype=torch.long, device=device)
        for slot, i in enumerate(active):
            tokens[slot, : rows[i].prompt_len] = torch.tensor(list(prompts[i]), dtype=torch.long)
        if image_embeds is None:
            positions = torch.arange(longest, device=device).expand(len(active), longest)
            last_index = torch.tensor([rows[i].prompt_len - 1 for i in active], device=device)
            logits = self.model.forward_tokens(tokens, positions, cache, output_index=last_index)
        else:
            row_images = (image_embeds[active] if isinstance(image_embeds, torch.Tensor)
                          else [image_embeds[i] for i in active])
            inputs = insert_images(self.model.embed_tokens(tokens), [rows[i].prompt_len for i in active],
                                   row_images, self.model.image_layout)
            last_index = torch.tensor([n - 1 for n in inputs.lengths], device=device)
            logits = self.model.forward_tokens(None, inputs.positions, cache, output_index=last_index,
                                               input_embeds=inputs.embeds, image_prefix=inputs.prefix)

        while True:
            logits = logits.float()
            contexts = generated = None
            if sampling.uses_penalties:
                generated = [rows[i].new_tokens for i in active]
                contexts = [prompts[i] + rows[i].new_tokens for i in active]
            next_tokens = self._agree(sampler(logits, contexts, generated, rows=active)).tolist()
            if logprobs:
                self._record_logprobs([rows[i] for i in active], logits, next_tokens, top_logprobs)
            for slot, i in enumerate(active):
                self._advance(rows[i], next_tokens[slot], matcher)
            yield rows
            still = [slot for slot, i in enumerate(active) if not rows[i].finished]
            if not still:
                return
            if len(still) < len(active):
                cache.select_rows(torch.tensor(still, device=device))
                active = [active[slot] for slot in still]
            step_tokens = torch.tensor([[rows[i].new_tokens[-1]] for i in active], device=device)
            step_positions = torch.tensor([[offsets[i] + rows[i].prompt_len + len(rows[i].new_tokens) - 1]
                                           for i in active],
                                          device=device)
            if self._graphed is not None:
                logits = self._graphed(cache, step_tokens, step_positions)
            else:  # (batch, 1, vocab): one token a row, so no index to gather by
                logits = self.model.forward_tokens(step_tokens, step_positions, cache)[:, 0]

    def _record_logprobs(self, rows: List[RowState], logits: torch.Tensor, tokens: List[int],
                         top_k: int) -> None:
        """Log-probabilities (nats) of the picked tokens under the raw logits; EOS is not recorded,
        so the lists stay aligned with ``new_tokens``."""
        log_probs = torch.log_softmax(logits, dim=-1)
        picked = log_probs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
        if top_k > 0:
            best = torch.topk(log_probs, min(top_k, log_probs.shape[-1]), dim=-1)
            best_ids, best_values = best.indices.tolist(), best.values.tolist()
        for slot, row in enumerate(rows):
            if tokens[slot] in self.eos_ids:
                continue
            row.logprobs.append(picked[slot])
            if top_k > 0:
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
