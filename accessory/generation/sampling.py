"""Token selection as a chain of small steps over a batch of logits (one row per sequence).

The chain runs in llama.cpp's order: penalties on the raw logits (repetition, then presence and
frequency), then temperature, the top-k, top-p and min-p filters (each optional), then the pick.
Greedy decoding (temperature 0) applies the penalties too and then takes ``argmax``; with every
penalty neutral it is exactly ``argmax`` of the model's logits, untouched.

Which tokens each penalty looks at (per row):

- ``repetition_penalty`` (HF / llama.cpp): the last ``penalty_last_n`` tokens of the row's whole
  context, prompt and generated text together (llama.cpp's meaning: 64 by default, -1 = the whole
  context, 0 = off). A token in that window has a positive logit divided by the penalty and a
  negative one multiplied by it, so a penalty above 1 always makes it less likely.
- ``presence_penalty`` / ``frequency_penalty`` (OpenAI): the tokens generated so far, never the
  prompt. ``logit -= presence * (count > 0) + frequency * count``.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..kernels.decode import decode_kernels


@dataclass
class SamplingParams:
    """How to pick the next token. ``temperature <= 0`` means greedy."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    seed: Optional[int] = None  # row r draws from its own generator seeded with seed + r
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the window
    penalty_last_n: int = 64  # repetition window in tokens: -1 = whole context, 0 = off
    presence_penalty: float = 0.0  # subtracted once from every token generated at least once
    frequency_penalty: float = 0.0  # subtracted per occurrence among the generated tokens

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def uses_repetition_penalty(self) -> bool:
        return self.repetition_penalty != 1.0 and self.penalty_last_n != 0

    @property
    def uses_presence_frequency(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.uses_repetition_penalty or self.uses_presence_frequency


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for (batch, vocab) logits, the same index on ties and NaN, through
    the native kernel for float32 CPU logits (torch's took ~650 us for 16 x 32000 on 2 threads)."""
    if logits.dim() == 2 and logits.dtype is torch.float32 and logits.device.type == "cpu" and \
            logits.shape[1] > 0:
        kernels = decode_kernels()
        if kernels is not None:
            logits = logits.contiguous()
            out = torch.empty(logits.shape[0], dtype=torch.long)
            kernels.argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr())
            return out
    return logits.argmax(dim=-1)


def token_counts(histories: Sequence[Sequence[int]], vocab_size: int, device=None) -> torch.Tensor:
    """How often each token id occurs in each row's history: a (batch, vocab_size) long tensor."""
    counts = torch.zeros((len(histories), vocab_size), dtype=torch.long, device=device)
    for row, history in enumerate(histories):
        if len(history):
            ids = torch.as_tensor(list(history), dtype=torch.long, device=device)
            counts[row].scatter_add_(0, ids, torch.ones_like(ids))
    return counts


def penalty_window(context: Sequence[int], last_n: int) -> Sequence[int]:
    """The tail of ``context`` the repetition penalty sees: ``last_n`` tokens, -1 = all, 0 = none."""
    if last_n < 0:
        return context
    return context[len(context) - last_n:] if last_n else context[:0]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive and multiply negative logits of the ``seen`` tokens (bool, like logits)
    by ``penalty``; 1 leaves the logits as they are."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                                     frequency: float) -> torch.Tensor:
    """``logits - presence * (counts > 0) - frequency * counts`` (OpenAI); counts like logits."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by ``temperature`` (> 0): below 1 sharpens, above 1 flattens."""
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest logits of each row."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities sum to at least ``p`` (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # a token is dropped when the mass before it already reaches p (the top token always stays)
    drop_sorted = (probs.cumsum(dim=-1) - probs) > p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the top token's."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


class Sampler:
    """Applies :class:`SamplingParams` to logits; owns one random generator per row for ``seed``.

    Row ``r`` (its index in the original batch, which survives the engine dropping finished rows)
    draws from a generator seeded with ``seed + r``, so its tokens do not depend on which other
    rows share the batch or when they finish.
    """

    def __init__(self, params: SamplingParams, device: torch.device, num_rows: int = 1):
        self.params = params
        self.device = device
        self.generators: List[torch.Generator] = []
        if params.seed is not None:
            for row in range(num_rows):
                generator = torch.Generator(device=device)
                generator.manual_seed(params.seed + row)
                self.generators.append(generator)

    def penalize(self, logits: torch.Tensor, contexts: Optional[Sequence[Sequence[int]]] = None,
                 generated: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
        """The penalty steps: ``contexts`` are each row's prompt + generated tokens, ``generated``
        the generated ones only; both aligned with the rows of ``logits``."""
        p = self.params
        vocab = logits.shape[-1]
        if p.uses_repetition_penalty:
            if contexts is None:
                raise ValueError("repetition_penalty needs each row's token context; pass contexts=")
            windows = [penalty_window(c, p.penalty_last_n) for c in contexts]
            seen = token_counts(windows, vocab, logits.device) > 0
            logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        if p.uses_presence_frequency:
            if generated is None:
                raise ValueError("presence/frequency penalties need each row's generated tokens; "
                                 "pass generated=")
            counts = token_counts(generated, vocab, logits.device)
            logits = apply_presence_frequency_penalty(logits, counts, p.presence_penalty,
                                                      p.frequency_penalty)
        return logits

    def process(self, logits: torch.Tensor, contexts: Optional[Sequence[Sequence[int]]] = None,
                generated: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
        """Every step of the chain but the pick: penalties, then (unless greedy) temperature,
        top-k, top-p and min-p. With greedy and neutral penalties the logits come back untouched."""
        p = self.params
        if p.uses_penalties:
            logits = self.penalize(logits.float(), contexts, generated)
        if p.greedy:
            return logits
        logits = apply_temperature(logits.float(), p.temperature)
        logits = apply_top_k(logits, p.top_k)
        logits = apply_top_p(logits, p.top_p)
        return apply_min_p(logits, p.min_p)

    def __call__(self, logits: torch.Tensor, contexts: Optional[Sequence[Sequence[int]]] = None,
                 generated: Optional[Sequence[Sequence[int]]] = None,
                 rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Next token ids (batch,) for float logits (batch, vocab).

        ``contexts`` / ``generated`` feed the penalties (see :meth:`penalize`); ``rows`` are the
        original batch indices of the logits' rows (default 0..batch-1), which pick the generators.
        """
        logits = self.process(logits, contexts, generated)
        if self.params.greedy:
            return argmax(logits)
        probs = logits.softmax(dim=-1)
        if not self.generators:
            return torch.multinomial(probs, 1).squeeze(-1)
        rows = range(probs.shape[0]) if rows is None else rows
        picks = [torch.multinomial(probs[slot], 1, generator=self._generator(row))
                 for slot, row in enumerate(rows)]
        return torch.cat(picks)

    def _generator(self, row: int) -> torch.Generator:
        while row >= len(self.generators):  # rows beyond num_rows get their own seed + row too
            generator = torch.Generator(device=self.device)
            generator.manual_seed(self.params.seed + len(self.generators))
            self.generators.append(generator)
        return self.generators[row]
