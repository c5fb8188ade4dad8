"""DITTO (Xu et al., 2022): the self-reinforcement penalty on pseudo-repetition rows.

A pseudo-repetition row is a prefix followed by copies of a unit of L tokens (built for the
trainer by :mod:`axolotl_focus.train.ditto`). Every token t from the second copy on (the first one
included) is compared with the same token one copy earlier, t - L:

``sum_t -log(clamp(1 - |p_t - lam * sg(p_{t-L})|, min=1e-20))``

with ``p`` the gold-token probabilities and ``sg`` stop-gradient. It needs only gold-token
probabilities, and the gradient of each token's term only its own and its previous copy's
(stop-gradient, earlier in the row): :func:`fused_ditto_loss` computes loss and gradients in one
chunked pass (:class:`~.nll.FusedTokenNLLTerm` with :func:`ditto_chunk_term`), :func:`ditto_loss`
is the same formula on given token NLLs and :func:`reference_ditto` the dense, position-by-position
oracle on padded rows.
"""

from __future__ import annotations

import torch

from .nll import FusedTokenNLLTerm
from .numerics import reference_float

DITTO_FLOOR = 1e-20


def ditto_previous_index(rows: torch.Tensor, unit_len: torch.Tensor) -> torch.Tensor:
    """For flat targets ``[N]`` of pseudo-repetition rows (``rows``: row of each target, contiguous;
    the targets of row b are its copies of a unit of ``unit_len[b]`` tokens back to back), the flat
    index of the same token one copy earlier, or -1 in the first copy.

    Every token of copy 2 on is compared, the first one included (DITTO's reference code starts one
    token late and never penalizes the first token of the second copy).
    """
    n = rows.numel()
    index = torch.arange(n, device=rows.device)
    counts = torch.bincount(rows, minlength=unit_len.numel())
    within = index - (counts.cumsum(0) - counts)[rows]
    length = unit_len.to(rows.device)[rows]
    return torch.where(within >= length, index - length, -1)


def ditto_loss(token_nll: torch.Tensor, previous: torch.Tensor, lam: float) -> tuple[torch.Tensor, int]:
    """``(sum, count)`` of ``-log(clamp(1 - |p_t - lam * sg(p_prev)|, min=1e-20))`` over tokens with
    ``previous >= 0``; ``p = exp(-token_nll)`` (gold-token probabilities)."""
    where = previous >= 0
    p = torch.exp(-token_nll)
    gap = (p[where] - lam * p[previous[where]].detach()).abs()
    return -torch.log(torch.clamp(1 - gap, min=DITTO_FLOOR)).sum(), int(where.sum())


def ditto_chunk_term(previous: torch.Tensor, lam: float):
    """The per-chunk DITTO term for :class:`~.nll.FusedTokenNLLTerm`: ``term(nll=, start=, end=)``
    returns the terms' sum over tokens ``start:end`` and their derivatives with respect to the
    tokens' NLL. Token t's previous copy is stop-gradient and comes earlier in the flat order, so
    its NLL is already computed."""

    def term(*, nll: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        prev = previous[start:end]
        p = torch.exp(-nll[start:end])
        gap = p - lam * torch.exp(-nll[prev.clamp(min=0)])  # earlier tokens: already computed
        one_minus = (1 - gap.abs()).clamp_(min=DITTO_FLOOR)
        value = torch.where(prev >= 0, -one_minus.log(), 0.0).sum()
        # d term / d p = sign(gap) / (1 - |gap|) (0 where clamped) and d p / d nll = -p
        coef = torch.where((prev >= 0) & (one_minus > DITTO_FLOOR), -torch.sign(gap) * p / one_minus, 0.0)
        return value, coef

    return term


def fused_ditto_loss(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, previous: torch.Tensor,
                     lam: float, chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
    """``(sum, count)`` of :func:`ditto_loss` straight from hidden states ``[N, H]`` and lm_head
    weights, with memory ``O(chunk x vocab)`` and one logits matmul per chunk (gradients are
    computed in the forward pass, like the fused CE + distillation loss)."""
    if previous.numel() != hidden.shape[0]:
        raise ValueError(f"previous has {previous.numel()} entries for {hidden.shape[0]} tokens")
    total = FusedTokenNLLTerm.apply(hidden, head, targets, ditto_chunk_term(previous, float(lam)),
                                    int(chunk_size))
    return total, int((previous >= 0).sum())


def reference_ditto(logits: torch.Tensor, input_ids: torch.Tensor, lengths: list[int], prefix_len: list[int],
                    unit_len: list[int], lam: float) -> tuple[torch.Tensor, int]:
    """Dense DITTO over padded pseudo rows, position by position: ``logits`` ``[B, T, V]`` of
    ``input_ids`` ``[B, T]``; row b is ``lengths[b]`` tokens, a prefix of ``prefix_len[b]`` and then
    copies of a ``unit_len[b]``-token unit. Token i (from the second copy on) is predicted at
    position i - 1 and compared with token i - L, predicted at i - L - 1. Computed in fp32, or
    float64 for float64 logits."""
    probs = torch.softmax(reference_float(logits), -1)
    # gold[b, i] = probability of token i at position i - 1 (indexed below instead of the [B, T, V]
    # probabilities, whose every index would cost a [B, T, V] gradient in backward)
    gold = torch.nn.functional.pad(probs[:, :-1].gather(2, input_ids[:, 1:, None].to(probs.device))[..., 0], (1, 0))
    total, count = probs.new_zeros(()), 0
    for b in range(input_ids.shape[0]):
        unit = unit_len[b]
        for i in range(prefix_len[b] + unit, lengths[b]):
            now = gold[b, i]
            before = gold[b, i - unit].detach()
            total = total - torch.log(torch.clamp(1 - (now - lam * before).abs(), min=DITTO_FLOOR))
            count += 1
    return total, count
