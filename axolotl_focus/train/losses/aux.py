"""The paper's baseline objectives (``focus_aux_losses``) as terms of the fused pass: token-level
unlikelihood, ScaleGrad and TaiLr.

Per valid token t with gold target y_t, ``p = softmax(z_student)`` (no temperature):

* unlikelihood (Welleck et al., 2019), weight alpha, ADDS ``alpha * sum_{c in C_t} -log(1 - p(c))``,
  C_t = the distinct earlier targets of the same sequence, minus y_t; ``1 - p(c)`` is clamped at
  :data:`UL_EPS` in the value and in the gradient factor, the gradient passed through.
* ScaleGrad (Lin et al., 2021), gamma, REPLACES the NLL by ``-log p~(y_t)``, ``p~ = gamma * p`` on
  the tokens not seen earlier in the sequence, renormalized.
* TaiLr (Ji et al., 2023), ``(gamma, min_weight)``, REPLACES the NLL by ``w * NLL``,
  ``w = sg(clamp(p / (gamma + (1 - gamma) p), min_weight, 1))``.

Besides the gold token these need only the probabilities of the tokens already seen in the same
sequence: a small padded ``[chunk, K]`` id set built per chunk from :class:`SeenTokens`, never an
``[N, V]`` mask. :class:`AuxTerms` is the NLL-like term of the chunked pass (:class:`~.base.NLLTerm`;
entry point :class:`~.fused.FusedCEDistillLoss` with ``aux=AuxSpec(...)``): its :meth:`~AuxTerms.block`
is the terms' closed-form gradient and sums for one row block; :func:`reference_aux_terms` is the
dense autograd oracle, straight from the papers' definitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...loss_settings import AuxSpec  # the settings' one definition, shared with the config
from .base import NLLBlock, NLLTerm
from .numerics import reference_float
from .specs import IGNORE_INDEX

# 1 - p(c) of an unlikelihood candidate is clamped at this floor (Welleck et al.'s value), in the
# value and in the gradient factor p/(1-p), with the gradient passed through; see :meth:`AuxTerms.block`.
UL_EPS = 1e-5
AUX_TERMS = ("ul", "scalegrad", "tailr")  # the order of AuxTerms.totals


@dataclass
class SeenTokens:
    """Per sequence, its distinct target ids in order of first occurrence, padded ``[S, K]``.

    ``ids[s, k]`` is the k-th distinct target of sequence s and ``first[s, k]`` the index (in the
    flat token list) where it first occurs (``N`` on padding). Token n of sequence ``seq[n]`` has
    seen exactly the slots with ``first < n``, a prefix of the row. Memory ``O(S x K)``, K <= the
    longest sequence: no ``[N, N]`` or ``[N, V]`` mask ever exists.
    """

    ids: torch.Tensor
    first: torch.Tensor
    seq: torch.Tensor

    def chunk(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [c, k], seen [c, k])`` for tokens ``start:end``, k trimmed to the chunk's need."""
        seq = self.seq[start:end]
        first = self.first[seq]
        seen = first < torch.arange(start, end, device=first.device).unsqueeze(1)
        k = max(1, int(seen.sum(1).max()))  # seen slots form a prefix of each row
        return self.ids[seq, :k], seen[:, :k].contiguous()


def seen_tokens(targets: torch.Tensor, sequence: torch.Tensor) -> SeenTokens:
    """:class:`SeenTokens` of flat valid targets ``[N]`` whose sequence ids ``[N]`` are contiguous
    (each sequence's tokens adjacent and in order, as ``hidden[labels != -100]`` gives them)."""
    n, dev = targets.numel(), targets.device
    seq = torch.unique_consecutive(sequence, return_inverse=True)[1]
    span = int(targets.max()) + 1 if n else 1
    uniq, inverse = torch.unique(seq * span + targets, return_inverse=True)
    first = torch.full((uniq.numel(),), n, dtype=torch.long, device=dev).scatter_reduce_(
        0, inverse, torch.arange(n, device=dev), "amin")
    useq = uniq // span
    order = torch.argsort(useq * (n + 1) + first)  # by sequence, then by first occurrence
    useq, first, tok = useq[order], first[order], (uniq % span)[order]
    counts = torch.bincount(useq, minlength=int(seq.max()) + 1 if n else 1)
    slot = torch.arange(useq.numel(), device=dev) - (counts.cumsum(0) - counts)[useq]
    shape = (counts.numel(), max(1, int(counts.max())))
    ids = torch.zeros(shape, dtype=torch.long, device=dev).index_put_((useq, slot), tok)
    firsts = torch.full(shape, n, dtype=torch.long, device=dev).index_put_((useq, slot), first)
    return SeenTokens(ids, firsts, seq)


def reference_seen_mask(labels: torch.Tensor, sequence: torch.Tensor, vocab: int) -> torch.Tensor:
    """Dense ``[N, V]`` mask of the targets seen earlier in the same sequence (labels -100 skipped)."""
    seen = torch.zeros(labels.numel(), vocab, dtype=torch.bool)
    earlier: dict[int, set[int]] = {}
    for n, (label, seq) in enumerate(zip(labels.tolist(), sequence.tolist())):
        if label == IGNORE_INDEX:
            continue
        history = earlier.setdefault(seq, set())
        seen[n, list(history)] = True
        history.add(label)
    return seen.to(labels.device)


def reference_aux_terms(logits: torch.Tensor, labels: torch.Tensor, sequence: torch.Tensor,
                        aux: AuxSpec, seen: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Dense sums of the configured baseline terms over tokens whose label is not -100.

    ``logits`` ``[N, V]`` aligned with ``labels`` ``[N]``; ``sequence`` ``[N]`` says which sequence
    each position belongs to. Straight from the papers' definitions, with autograd:
    UL ``-sum_c log(1 - p_c)`` (1 - p_c clamped at UL_EPS, the clamp passing the gradient through),
    ScaleGrad as the NLL of the rescaled, renormalized distribution, TaiLr ``sg(w) * NLL``.
    ``seen``: a precomputed :func:`reference_seen_mask` (``[N, V]``), e.g. a vectorized one.
    Computed in fp32, or float64 for float64 logits.
    """
    valid = labels != IGNORE_INDEX
    if seen is None:
        seen = reference_seen_mask(labels, sequence, logits.shape[-1])
    seen = seen[valid]
    target = labels[valid]
    log_p = torch.log_softmax(reference_float(logits[valid]), -1)
    p = log_p.exp()
    nll = -log_p.gather(1, target[:, None]).squeeze(1)
    out = {}
    if aux.unlikelihood is not None:
        candidate = seen.clone()
        candidate[torch.arange(target.numel()), target] = False
        one_minus = -torch.expm1(log_p)  # 1 - p, exact also where p ~ 1
        one_minus = one_minus + (one_minus.clamp(min=UL_EPS) - one_minus).detach()
        out["ul"] = -(one_minus.log() * candidate).sum()
    if aux.scalegrad is not None:
        rescaled = p * torch.where(seen, 1.0, aux.scalegrad)
        rescaled = rescaled / rescaled.sum(-1, keepdim=True)
        out["scalegrad"] = -rescaled.gather(1, target[:, None]).log().sum()
    if aux.tailr is not None:
        gamma, min_weight = aux.tailr
        p_gold = (-nll).exp().detach()
        out["tailr"] = ((p_gold / (gamma + (1 - gamma) * p_gold)).clamp(min_weight, 1) * nll).sum()
    return out


class AuxTerms(NLLTerm):
    """The baseline terms of one fused pass as its NLL-like term (:class:`~.base.NLLTerm`).

    ``scale``: the per-token normalization (unlikelihood's weight is ``spec.unlikelihood * scale``);
    ``targets`` / ``sequence`` ``[N]``: the pass's flat targets and their contiguous sequence ids
    (default: one sequence), which delimit the "earlier targets". :attr:`totals` ``[3]`` holds the
    running sums in the order of :data:`AUX_TERMS`; per chunk, ``ids`` / ``seen_mask`` ``[c, k]``
    are the chunk's earlier targets (:meth:`SeenTokens.chunk`).
    """

    def __init__(self, spec: AuxSpec, scale: float, targets: torch.Tensor, sequence: torch.Tensor | None = None):
        self.spec = spec
        self.ul_scale = float(spec.unlikelihood or 0.0) * scale
        self.seen = None
        if spec.needs_seen:
            self.seen = seen_tokens(targets, torch.zeros_like(targets) if sequence is None else sequence)
        self.totals = torch.zeros(len(AUX_TERMS), dtype=torch.float32, device=targets.device)
        self.ids = self.seen_mask = None

    def chunk(self, start: int, end: int) -> None:
        if self.seen is not None:
            self.ids, self.seen_mask = self.seen.chunk(start, end)

    def log_p_ids(self, rows: slice) -> torch.Tensor | None:
        # unlikelihood needs 1 - p_c = -expm1(log p_c), exact where p_c ~ 1 (1 - p is not)
        return self.ids[rows] if self.spec.unlikelihood is not None else None

    def finish(self, ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ScaleGrad's or TaiLr's sum in place of CE, and unlikelihood's at its own weight."""
        nll_like = ce
        if self.spec.scalegrad is not None:
            nll_like = self.totals[1]
        elif self.spec.tailr is not None:
            nll_like = self.totals[2]
        return nll_like, self.ul_scale * self.totals[0]

    def sums(self) -> dict[str, torch.Tensor]:
        on = (self.spec.unlikelihood is not None, self.spec.scalegrad is not None, self.spec.tailr is not None)
        return {name: self.totals[k] for k, name in enumerate(AUX_TERMS) if on[k]}

    def block(self, b: NLLBlock) -> None:
        """Turn the probabilities ``p = b.grad`` ([r, V]) into the gradient of the CE-like term(s) in
        place, and add the terms' sums into :attr:`totals`.

        Plain CE gives ``ce_scale (p - onehot_y)``. TaiLr scales it per row by the detached weight w
        (``base = ce_scale * w``). With ``g = gamma`` and ``S = sum_{v seen} p_v``, ScaleGrad's
        ``-log p + log(g + (1 - g) S) - [y unseen] log g`` adds ``c p_j (1[j seen] - S)``,
        ``c = ce_scale (1 - g) / (g + (1 - g) S)``. Unlikelihood adds, per candidate c,
        ``ul_scale a_c (onehot_c - p)`` with ``a_c = p_c / max(1 - p_c, UL_EPS)``. The clamp bounds the
        value (at ``-log UL_EPS``, never inf when ``1 - p_c`` rounds to 0) and the factor ``a_c``; for
        ``1 - p_c >= UL_EPS`` the gradient is exact, beyond it the push on the candidate,
        ``a_c (1 - p_c)``, shrinks gradually to ``p_c (1 - p_c) / UL_EPS`` instead of vanishing at once
        as under an autograd clamp. ``1 - p_c`` is ``-expm1(log p_c)`` from the log-probabilities
        ``b.log_p_ids`` at the ids (no rounding of ``p_c`` to 1). Everything together is one
        row scale of ``p``, the one-hot subtraction and one ``scatter_add`` over the ``[r, k]`` ids.
        """
        p, t, nll, ce_scale = b.grad, b.target, b.nll, b.scale
        spec, r = self.spec, p.shape[0]
        base = nll.new_full((r, 1), ce_scale)
        extra = None
        if spec.tailr is not None:
            gamma, min_weight = spec.tailr
            p_gold = torch.exp(-nll)
            weight = (p_gold / (gamma + (1 - gamma) * p_gold)).clamp_(min_weight, 1.0)
            self.totals[2] += (weight * nll).sum()
            base = base * weight
        scale = base
        if self.ids is not None:
            ids, seen = self.ids[b.rows], self.seen_mask[b.rows]
            p_ids = p.gather(1, ids)
            extra = torch.zeros_like(p_ids)
            if spec.scalegrad is not None:
                gamma = spec.scalegrad
                p_seen = p_ids * seen
                s = p_seen.sum(1, keepdim=True)
                denom = gamma + (1 - gamma) * s
                gold_seen = ((ids == t.unsqueeze(1)) & seen).any(1, keepdim=True)
                self.totals[1] += (nll + denom.log() - (~gold_seen) * math.log(gamma)).sum()
                coef = ce_scale * (1 - gamma) / denom
                scale = scale - coef * s
                extra += coef * p_seen
            if spec.unlikelihood is not None:
                candidate = seen & (ids != t.unsqueeze(1))
                one_minus = torch.expm1(b.log_p_ids).neg_().clamp_(min=UL_EPS)
                self.totals[0] -= (one_minus.log() * candidate).sum()
                a = (p_ids * candidate).div_(one_minus).mul_(self.ul_scale)
                scale = scale - a.sum(1, keepdim=True)
                extra += a
        p.mul_(scale)
        p[torch.arange(r, device=p.device), t] -= base.squeeze(1)
        if extra is not None:
            p.scatter_add_(1, ids, extra)
