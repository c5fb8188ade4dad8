"""RePAIR (paper, section 4.2.2): the margin between the mean token NLLs of chosen and rejected
continuations, and the chunked per-token NLL it is computed from.

Eq. 1: ``mean over pairs of max(0, m + l+ - l-)``, l the mean token NLL ``-log p(y_t)`` of a
continuation (chosen: l+, rejected: l-). The token NLLs come from :func:`chunked_token_nll`, which
never materializes more than one chunk of logits (:class:`~.nll.ChunkedTokenNLL`).
"""

from __future__ import annotations

import torch

from .nll import ChunkedTokenNLL


def chunked_token_nll(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
                      chunk_size: int = 1024) -> torch.Tensor:
    """``-log p(target)`` per row of ``hidden`` ([N, H]) under ``softmax(hidden @ head.T)``."""
    return ChunkedTokenNLL.apply(hidden, head, targets, int(chunk_size))


def repair_margin_loss(token_nll: torch.Tensor, row_of_token: torch.Tensor, chosen_rows: torch.Tensor,
                       rejected_rows: torch.Tensor, num_rows: int, margin: float) -> tuple[torch.Tensor, dict]:
    """Eq. 1: ``mean over pairs of max(0, m + l+ - l-)``, l = mean token NLL of a continuation.

    ``token_nll`` [N] with ``row_of_token`` [N] (its row in the batch); pair i compares rows
    ``chosen_rows[i]`` and ``rejected_rows[i]``. Returns the loss and detached statistics.
    """
    sums = torch.zeros(num_rows, dtype=token_nll.dtype, device=token_nll.device).index_add(0, row_of_token, token_nll)
    counts = torch.zeros(num_rows, dtype=token_nll.dtype, device=token_nll.device).index_add(
        0, row_of_token, torch.ones_like(token_nll))
    mean_nll = sums / counts.clamp(min=1)
    l_pos, l_neg = mean_nll[chosen_rows], mean_nll[rejected_rows]
    hinge = torch.clamp(margin + l_pos - l_neg, min=0)
    stats = {"nll_chosen": l_pos.detach().mean(), "nll_rejected": l_neg.detach().mean(),
             "active": (hinge.detach() > 0).float().mean()}
    return hinge.mean(), stats
