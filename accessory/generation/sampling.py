"""Token selection as a chain of small steps over a batch of logits (one row per sequence).

Greedy decoding (temperature 0) is exactly ``argmax`` of the model's logits. Otherwise logits go
through temperature, then the top-k, top-p and min-p filters (each optional), and one token is
drawn from what is left.
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingParams:
    """How to pick the next token. ``temperature <= 0`` means greedy."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


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
    """Applies :class:`SamplingParams` to logits; owns the random generator for ``seed``."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids (batch,) for float logits (batch, vocab)."""
        p = self.params
        if p.greedy:
            return logits.argmax(dim=-1)
        logits = logits.float() / p.temperature
        logits = apply_top_k(logits, p.top_k)
        logits = apply_top_p(logits, p.top_p)
        logits = apply_min_p(logits, p.min_p)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
