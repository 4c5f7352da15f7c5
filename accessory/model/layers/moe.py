"""Mixture-of-experts routing and token dispatch, shared by the mixtral variants.

Routing (Mixtral, the original's ``MoE.forward``): ``softmax(router logits)``, keep the top k
experts per token, renormalise their k weights to sum to 1. The layer's output for a token is then
``sum_k weight_k * expert_k(x)``.

Dispatch groups the (token, slot) pairs by expert and runs each selected expert once, on exactly
the tokens routed to it, instead of the original's one boolean mask per expert over every token.
The weighted sum over the k slots is taken last, as the original does, so the rounding matches it
in low precision too.
"""

from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

#: ``run_expert(expert_id, x_rows)`` -> the expert's output for ``x_rows`` (n, dim).
ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def route_top_k(router_logits: torch.Tensor, top_k: int,
                softmax_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token from ``router_logits`` (tokens, experts).

    ``softmax_dtype``: the dtype the softmax runs in (None: the logits' own dtype, as the original
    ``mixtral`` does; ``torch.float32`` for ``mixtral_sparse``).
    Returns ``(weights, expert_ids, probs)``: the renormalised weights (tokens, top_k) in the
    softmax dtype, the chosen expert ids (tokens, top_k) in descending weight order, and the full
    routing probabilities (tokens, experts).
    """
    probs = F.softmax(router_logits, dim=-1, dtype=softmax_dtype)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids, probs


def dispatch(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, run_expert: ExpertFn,
             num_experts: int, local_experts: Optional[Iterable[int]] = None) -> torch.Tensor:
    """``sum_k weights[t, k] * expert_{expert_ids[t, k]}(x[t])`` for every token ``t``.

    ``x`` (tokens, dim); ``expert_ids`` and ``weights`` (tokens, top_k), the weights in x's dtype.
    Each expert runs once, on the rows routed to it (gathered in token order). ``local_experts``:
    the experts this rank holds (default all); slots routed elsewhere contribute zero, to be summed
    across ranks by the caller.
    """
    n_tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)
    # Slots sorted by expert (stable: each expert's tokens stay in order); slot s is token s // top_k.
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    wanted = None if local_experts is None else set(int(e) for e in local_experts)
    slot_outputs = x.new_zeros(n_tokens * top_k, x.shape[-1])
    start = 0
    for expert_id, count in enumerate(counts):
        if count and (wanted is None or expert_id in wanted):
            slots = order[start:start + count]
            slot_outputs.index_copy_(0, slots, run_expert(expert_id, x.index_select(0, slots // top_k)))
        start += count
    return (slot_outputs.view(n_tokens, top_k, -1) * weights.unsqueeze(-1)).sum(dim=1)


def load_balancing_loss(probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer balance loss ``E / (T k) * sum_e tokens_e * mean_t probs[t, e]``.

    ``probs`` (tokens, experts), ``expert_ids`` (tokens, top_k). Equals 1 for a perfectly even
    router; the caller weights it by ``load_balancing_weight``.
    """
    n_tokens, top_k = expert_ids.shape
    tokens_per_expert = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).to(probs.dtype)
    return num_experts / (n_tokens * top_k) * torch.dot(tokens_per_expert, probs.mean(dim=0))
