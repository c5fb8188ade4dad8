"""The distribution study (paper section 6): how the student's next-token distribution agrees
with the teacher's, in the head and in the tail.

The teacher samples ``distribution_samples`` continuations of
open-ended prompts (top-p, first seed); teacher q and student p at every generated position
(temperature 1). H = top-p set (``head_top_p`` 0.9; the smallest set of most probable tokens
with mass >= 0.9), T = the rest. ``ar_head = |H_q & H_p| / |H_q|``, ``ar_tail = |T_q & T_p| /
|T_q|``, ``cor_head`` / ``cor_tail`` = Pearson correlation of q and p over the tokens of H_q /
T_q, ``count_head`` = mean |H_p| (the student's candidates; ``count_head_teacher`` = mean
|H_q|). Means over positions (correlations over positions where defined).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def top_p_mask(probs: torch.Tensor, top_p: float = 0.9) -> torch.Tensor:
    """Boolean mask of the top-p set per row: the most probable tokens, in order, until their mass
    reaches ``top_p`` (the token that crosses it included; ties broken by token id)."""
    sorted_p, order = torch.sort(probs.double(), dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    keep = before < top_p - 1e-12
    return torch.zeros_like(keep).scatter(-1, order, keep)


def _masked_pearson(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.double()
    n = m.sum(-1)
    dx = (x - (x * m).sum(-1, keepdim=True) / n.clamp(min=1)[:, None]) * m
    dy = (y - (y * m).sum(-1, keepdim=True) / n.clamp(min=1)[:, None]) * m
    vx, vy = (dx * dx).sum(-1), (dy * dy).sum(-1)
    r = (dx * dy).sum(-1) / torch.sqrt(vx * vy)
    return torch.where((n >= 2) & (vx > 0) & (vy > 0), r, torch.full_like(r, float("nan")))


def distribution_stats(q: torch.Tensor, p: torch.Tensor, top_p: float = 0.9) -> dict[str, torch.Tensor]:
    """Per-position head/tail agreement and correlation of teacher ``q`` and student ``p`` ([N, V]).

    Returns float64 tensors ``[N]``: ``ar_head``, ``ar_tail`` (NaN when T_q is empty),
    ``cor_head``, ``cor_tail`` (NaN when undefined), ``count_head`` (|H_p|), ``count_head_teacher``
    (|H_q|).
    """
    q, p = q.double(), p.double()
    hq, hp = top_p_mask(q, top_p), top_p_mask(p, top_p)
    tq, tp = ~hq, ~hp
    n_tail = tq.sum(-1).double()
    return {
        "ar_head": (hq & hp).sum(-1).double() / hq.sum(-1).double(),
        "ar_tail": torch.where(n_tail > 0, (tq & tp).sum(-1).double() / n_tail.clamp(min=1),
                               torch.full_like(n_tail, float("nan"))),
        "cor_head": _masked_pearson(q, p, hq),
        "cor_tail": _masked_pearson(q, p, tq),
        "count_head": hp.sum(-1).double(),
        "count_head_teacher": hq.sum(-1).double(),
    }


def _position_logits(model, seqs: list[list[int]], starts: list[int]) -> torch.Tensor:
    """Logits predicting ``seq[start:]`` for each row, stacked: ``[sum(len - start), V]``."""
    device = next(model.parameters()).device
    width = max(map(len, seqs))
    x = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    logits = model(input_ids=x, attention_mask=mask).logits
    rows = [logits[i, st - 1 : len(s) - 1] for i, (s, st) in enumerate(zip(seqs, starts))]
    return torch.cat(rows).float()


def distribution_study(teacher, student, samples: list[dict], top_p: float = 0.9, batch_size: int = 8,
                       chunk: int = 64, progress: bool = False) -> dict:
    """Mean :func:`distribution_stats` over every generated position of the teacher ``samples``
    (rows with ``prompt_tokens`` and ``tokens``), fed to both models."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    positions = 0
    samples = [s for s in samples if s["tokens"]]
    with torch.inference_mode():
        for b in tqdm(range(0, len(samples), batch_size), desc="distribution study", disable=not progress):
            batch = samples[b : b + batch_size]
            seqs = [s["prompt_tokens"] + s["tokens"] for s in batch]
            starts = [len(s["prompt_tokens"]) for s in batch]
            zt, zs = _position_logits(teacher, seqs, starts), _position_logits(student, seqs, starts)
            vocab = min(zt.shape[-1], zs.shape[-1])
            for c in range(0, zt.shape[0], chunk):
                stats = distribution_stats(torch.softmax(zt[c : c + chunk, :vocab], -1),
                                           torch.softmax(zs[c : c + chunk, :vocab], -1), top_p)
                for key, val in stats.items():
                    ok = ~torch.isnan(val)
                    sums[key] = sums.get(key, 0.0) + val[ok].sum().item()
                    counts[key] = counts.get(key, 0) + int(ok.sum())
            positions += zt.shape[0]
    out = {k: sums[k] / counts[k] if counts.get(k) else None for k in sums}
    return out | {"positions": positions, "samples": len(samples), "top_p": top_p}


def teacher_examples(teacher, samples: list[dict], k: int = 50, quantiles=(0.25, 0.5, 0.9)) -> list[dict]:
    """Sorted top-``k`` teacher probabilities (and the remaining mass) at three positions of the
    first samples: those at the given quantiles of the top-1 probability (for the q / q~ plot)."""
    batch = [s for s in samples if s["tokens"]][:8]
    if not batch:
        return []
    with torch.inference_mode():
        q = torch.softmax(_position_logits(teacher, [s["prompt_tokens"] + s["tokens"] for s in batch],
                                           [len(s["prompt_tokens"]) for s in batch]), -1)
    top = torch.sort(q, dim=-1, descending=True).values
    order = torch.argsort(top[:, 0], stable=True).tolist()
    picks = dict.fromkeys(order[min(int(f * len(order)), len(order) - 1)] for f in quantiles)
    return [{"top": top[i, :k].tolist(), "rest_mass": float(top[i, k:].sum()), "vocab": q.shape[-1]} for i in picks]
