"""Training losses: cross-entropy plus token-level distillation (FOCUS or plain KD).

Two implementations of the same objective live here side by side:

* :func:`reference_ce_distill` materializes the full ``[tokens, vocab]`` logits of student and
  teacher and lets autograd differentiate. It is the readable specification and the test oracle.
* :func:`fused_ce_distill` computes the same sums from the final hidden states and the lm_head
  weights in token chunks. Each chunk's logits are built, reduced to the loss, turned into their
  closed-form gradient and dropped before the next chunk, so the peak memory of the loss is
  ``O(chunk_size x vocab)`` instead of ``O(tokens x vocab)``.

Per valid token t (label != -100, already shifted), with ``q = softmax(z_teacher / tau)`` and
``p = softmax(z_student / tau)``:

* KD:    ``tau^2 * sum_v q(v) log(q(v) / p(v))``
* FOCUS: ``tau^2 * sum_v w(v) q(v) log(q(v) / p(v))``, ``w(v) = q(v)^beta + (1 - q(v))^gamma``

Gradient with respect to the student logits (paper, appendix A, scaled by the temperature):
``d/dz = tau * (Z p - w q)`` with ``Z = sum_v w(v) q(v)``; for KD ``w = 1`` and ``Z = 1``.

Sparse teacher (:class:`SparseTeacher`, e.g. from a teacher-logit cache): instead of its hidden
states and lm_head, the teacher can be given per valid token as k distinct ids K with their
``log q`` (at the training tau) and ``log r``, r the teacher mass outside K. The objective is then
the *bucketed* divergence, K kept individually and all other tokens one bucket T:

``tau^2 * [sum_{v in K} w(v) q(v) log(q(v) / p(v)) + w_T r log(r / p_T)]``, ``p_T = sum_{v in T} p(v)``

with gradient ``tau * (Z p(u) - w(u) q(u) [u in K] - w_T r p(u) / p_T [u in T])``,
``Z = sum_K w q + w_T r``. KD has ``w = w_T = 1``; FOCUS takes ``w_T = 1``, an approximation of the
tail tokens' own weights ``q^beta + (1 - q)^gamma``, ``~ 1 - gamma q`` for small q (for a top-k K,
every tail q <= min_K q). By the log-sum inequality the bucketed KD is <= the full KD. With k = V
(T empty, ``log r = -inf``) both equal the dense objective above (same q). :func:`reference_ce_distill_sparse`
is the dense oracle; :func:`fused_ce_distill` takes ``teacher=SparseTeacher(...)`` in the same
chunk loop (the chunk's rows sliced, ``log p_T`` a log-sum-exp over T, never ``1 - sum_K p``).

Both functions return *sums* over valid tokens; the trainer divides by the number of valid tokens
of the whole optimizer step (``num_items_in_batch``) so that gradient accumulation and data
parallelism normalize exactly.

The paper's baseline objectives (``focus_aux_losses``) ride on the same fused pass
(:func:`fused_ce_distill_aux`, see "Baseline terms" below): token-level unlikelihood, ScaleGrad and
TaiLr need, besides the gold token, only the probabilities of the tokens already seen in the same
sequence, a small padded ``[chunk, K]`` id set built per chunk from :class:`SeenTokens`. DITTO
needs only gold-token probabilities, and the gradient of each token's term only its own and its
previous copy's (stop-gradient, earlier in the row): :func:`fused_ditto_loss` computes loss and
gradients in one chunked pass (:func:`ditto_loss` is the same formula on given token NLLs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
DISTILL_MODES = ("focus", "kd", "none")


@dataclass(frozen=True)
class DistillSpec:
    """Which distillation term to add to CE, with its hyperparameters (paper defaults)."""

    mode: str = "focus"  # "focus" | "kd" | "none"
    temperature: float = 2.0
    beta: float = 15.0
    gamma: float = 1.0

    def __post_init__(self):
        if self.mode not in DISTILL_MODES:
            raise ValueError(f"focus_distill must be one of {DISTILL_MODES}, got {self.mode!r}")
        if self.temperature <= 0:
            raise ValueError(f"focus_temperature must be > 0, got {self.temperature}")
        if self.beta < 0 or self.gamma < 0:
            raise ValueError(f"focus_beta and focus_gamma must be >= 0, got {self.beta}, {self.gamma}")


@dataclass
class LossSums:
    """Sums over valid tokens (detached, for logging) and the number of valid tokens."""

    ce: torch.Tensor
    distill: torch.Tensor
    tokens: int


@dataclass(frozen=True, eq=False)
class SparseTeacher:
    """The teacher as its top-k tokens per valid position instead of hidden states + lm_head.

    Row n belongs to the n-th valid token (label != -100) in the order the fused pass gets its
    rows, i.e. row-major over ``[batch, time]`` of the shifted labels (``hidden[labels != -100]``).

    * ``ids`` ``[N, k]`` integer: the k distinct token ids kept (e.g. the teacher's top-k).
    * ``logq`` ``[N, k]`` float: ``log softmax(z_teacher / tau)`` at those ids, at the training
      temperature tau.
    * ``log_tail`` ``[N]`` float: log of the teacher mass outside the k ids (-inf when none).
    * ``temperature``: the tau ``logq`` was computed at, checked against the loss's when given.
    """

    ids: torch.Tensor
    logq: torch.Tensor
    log_tail: torch.Tensor
    temperature: float | None = None

    def rows(self, start: int, end: int, device: torch.device | None = None) -> SparseTeacher:
        """Rows ``start:end`` (views; copied to ``device`` when given)."""
        part = (self.ids[start:end], self.logq[start:end], self.log_tail[start:end])
        if device is not None:
            part = tuple(x.to(device, non_blocking=True) for x in part)
        return SparseTeacher(*part, temperature=self.temperature)

    def validate(self, n_tokens: int, vocab: int, mass_tol: float = 1e-3) -> None:
        """Raise ValueError, naming the field, unless this is a sparse teacher of ``n_tokens``
        positions over ``vocab`` tokens whose kept and tail masses sum to 1 (within ``mass_tol``
        in log space)."""
        ids, logq, log_tail = self.ids, self.logq, self.log_tail
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"sparse teacher ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() != 2 or ids.shape[0] != n_tokens or not 1 <= ids.shape[1] <= vocab:
            raise ValueError(f"sparse teacher ids must be [{n_tokens}, k] with 1 <= k <= {vocab}, "
                             f"got {list(ids.shape)}")
        for name, x, shape in (("logq", logq, ids.shape), ("log_tail", log_tail, (n_tokens,))):
            if not x.dtype.is_floating_point:
                raise ValueError(f"sparse teacher {name} must be a float tensor, got {x.dtype}")
            if tuple(x.shape) != tuple(shape):
                raise ValueError(f"sparse teacher {name} must be {list(shape)}, got {list(x.shape)}")
            if x.device != ids.device:
                raise ValueError(f"sparse teacher {name} is on {x.device}, ids on {ids.device}")
            if torch.isnan(x).any() or (x > mass_tol).any():
                raise ValueError(f"sparse teacher {name} must be log-probabilities (<= 0, no NaN)")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"sparse teacher temperature must be > 0, got {self.temperature}")
        if n_tokens == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"sparse teacher ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
        ordered = ids.sort(1).values
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise ValueError("sparse teacher ids must be distinct within each row")
        if ids.shape[1] == vocab and torch.isfinite(log_tail).any():
            raise ValueError("sparse teacher log_tail must be -inf where k = vocab (no tail tokens)")
        mass = torch.logsumexp(torch.cat([logq.double(), log_tail.double().unsqueeze(1)], 1), 1)
        if (mass.abs() > mass_tol).any():
            raise ValueError(f"sparse teacher logq and log_tail: masses must sum to 1, log of the sum off by up "
                             f"to {float(mass.abs().max()):.3g}")


AUX_TERMS = ("ul", "scalegrad", "tailr")  # order of the aux sums returned by the fused pass
# 1 - p(c) of an unlikelihood candidate is clamped at this floor (Welleck et al.'s value), in the
# value and in the gradient factor p/(1-p), with the gradient passed through; see :func:`_aux_block`.
UL_EPS = 1e-5


@dataclass(frozen=True)
class AuxSpec:
    """Baseline terms computed inside the fused pass; ``None`` switches a term off.

    * ``unlikelihood``: alpha, ADDS ``alpha * sum_{c in C_t} -log(1 - p(c))`` (Welleck et al., 2019);
      C_t = distinct earlier targets of the same sequence, minus y_t.
    * ``scalegrad``: gamma, REPLACES the NLL by ``-log p~(y_t)``, ``p~ = gamma * p`` on tokens not
      seen earlier in the sequence, renormalized (Lin et al., 2021).
    * ``tailr``: ``(gamma, min_weight)``, REPLACES the NLL by ``w * NLL``,
      ``w = sg(clamp(p / (gamma + (1 - gamma) p), min_weight, 1))`` (Ji et al., 2023).
    """

    unlikelihood: float | None = None
    scalegrad: float | None = None
    tailr: tuple[float, float] | None = None

    def __post_init__(self):
        if self.scalegrad is not None and self.tailr is not None:
            raise ValueError("focus_aux_losses: scalegrad and tailr both replace the NLL term; choose one")
        if self.scalegrad is not None and not 0 < self.scalegrad <= 1:
            raise ValueError(f"focus_aux_losses.scalegrad.gamma must be in (0, 1], got {self.scalegrad}")
        if self.tailr is not None and not (0 < self.tailr[0] <= 1 and 0 <= self.tailr[1] <= 1):
            raise ValueError(f"focus_aux_losses.tailr: gamma in (0, 1] and min_weight in [0, 1], got {self.tailr}")
        if self.unlikelihood is not None and self.unlikelihood < 0:
            raise ValueError(f"focus_aux_losses.unlikelihood.alpha must be >= 0, got {self.unlikelihood}")

    @property
    def needs_seen(self) -> bool:
        return self.unlikelihood is not None or self.scalegrad is not None


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


# --------------------------------------------------------------------------------------------
# Reference implementation (dense, autograd)
# --------------------------------------------------------------------------------------------


def focus_weights(q: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """``w(v) = q(v)^beta + (1 - q(v))^gamma`` (paper eq. for FOCUS)."""
    return q.pow(beta) + (1.0 - q).pow(gamma)


def reference_distill_per_token(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: DistillSpec
) -> torch.Tensor:
    """Dense per-token FOCUS or KD term, ``[N]``, differentiable w.r.t. the student logits."""
    tau = spec.temperature
    log_q = torch.log_softmax(teacher_logits.float() / tau, dim=-1)
    log_p = torch.log_softmax(student_logits.float() / tau, dim=-1)
    q = log_q.exp()
    weighted_q = q * focus_weights(q, spec.beta, spec.gamma) if spec.mode == "focus" else q
    return tau**2 * (weighted_q * (log_q - log_p)).sum(-1)


def reference_ce_distill(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    spec: DistillSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(ce_sum, distill_sum)`` over tokens whose label is not -100.

    ``student_logits``/``teacher_logits`` are ``[N, V]`` and already aligned with ``labels`` [N].
    """
    valid = labels != IGNORE_INDEX
    zs = student_logits[valid].float()
    ce = torch.nn.functional.cross_entropy(zs, labels[valid], reduction="sum")
    if spec.mode == "none" or teacher_logits is None:
        return ce, zs.new_zeros(())
    return ce, reference_distill_per_token(zs, teacher_logits[valid], spec).sum()


def sparse_teacher_from_logits(teacher_logits: torch.Tensor, k: int, temperature: float) -> SparseTeacher:
    """:class:`SparseTeacher` of the top-k tokens of ``teacher_logits`` ``[N, V]`` at ``temperature``
    (fp32, float64 for float64 logits); ``log_tail`` is the exact log-sum-exp of the rest. Memory
    ``O(N x V)``: call it per chunk of rows."""
    z = teacher_logits.double() if teacher_logits.dtype == torch.float64 else teacher_logits.float()
    log_q = torch.log_softmax(z / temperature, dim=-1)
    logq, ids = log_q.topk(k, dim=-1)
    log_tail = log_q.scatter(1, ids, float("-inf")).logsumexp(-1)
    return SparseTeacher(ids, logq, log_tail, float(temperature))


def reference_sparse_distill_per_token(
    student_logits: torch.Tensor, sparse: SparseTeacher, spec: DistillSpec
) -> torch.Tensor:
    """Dense per-token bucketed FOCUS or KD term against a sparse teacher, ``[N]``, differentiable
    w.r.t. the student logits (fp32, float64 for float64 logits): the kept ids individually, the
    other tokens as one bucket of teacher mass ``r = exp(log_tail)`` and weight 1."""
    tau = spec.temperature
    zs = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
    log_p = torch.log_softmax(zs / tau, dim=-1)
    ids = sparse.ids.long()
    log_q = sparse.logq.to(zs.dtype)
    q = log_q.exp()
    weighted_q = q * focus_weights(q, spec.beta, spec.gamma) if spec.mode == "focus" else q
    # clamp: a zero mass (log = -inf) contributes 0, never NaN
    per_token = (weighted_q * (log_q.clamp(min=-1e30) - log_p.gather(1, ids))).sum(-1)
    if ids.shape[1] < log_p.shape[1]:  # non-empty tail bucket
        log_p_tail = log_p.scatter(1, ids, float("-inf")).logsumexp(-1)
        log_tail = sparse.log_tail.to(zs.dtype)
        per_token = per_token + log_tail.exp() * (log_tail.clamp(min=-1e30) - log_p_tail)
    return tau**2 * per_token


def reference_ce_distill_sparse(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    sparse: SparseTeacher | None,
    spec: DistillSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference_ce_distill` against a sparse teacher: dense ``(ce_sum, distill_sum)`` over
    tokens whose label is not -100; ``sparse`` has one row per such token, in order."""
    valid = labels != IGNORE_INDEX
    zs = student_logits[valid]
    zs = zs if zs.dtype == torch.float64 else zs.float()
    ce = torch.nn.functional.cross_entropy(zs, labels[valid], reduction="sum")
    if spec.mode == "none" or sparse is None:
        return ce, zs.new_zeros(())
    sparse.validate(zs.shape[0], zs.shape[1])
    _check_temperature(sparse, spec)
    return ce, reference_sparse_distill_per_token(zs, sparse, spec).sum()


def _check_temperature(sparse: SparseTeacher, spec: DistillSpec) -> None:
    if sparse.temperature is not None and not math.isclose(sparse.temperature, spec.temperature, rel_tol=1e-6):
        raise ValueError(f"sparse teacher temperature {sparse.temperature} differs from the loss's "
                         f"{spec.temperature}: its logq are log softmax(z / tau) at the training tau")


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
    """
    valid = labels != IGNORE_INDEX
    if seen is None:
        seen = reference_seen_mask(labels, sequence, logits.shape[-1])
    seen = seen[valid]
    target = labels[valid]
    log_p = torch.log_softmax(logits[valid].float(), -1)
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


# --------------------------------------------------------------------------------------------
# Fused, chunked implementation
# --------------------------------------------------------------------------------------------


# Elements per row block of the elementwise part: ~1 MiB fp32 per buffer on CPU, so that the
# ~20 elementwise passes run in cache instead of streaming [chunk, V] buffers through memory; on
# accelerators large blocks keep kernels big enough to hide launch overhead.
_BLOCK_ELEMENTS_CPU = 1 << 18
_BLOCK_ELEMENTS_ACCEL = 1 << 22


# On CPU the vectorized exp is 10-30x slower when its result is subnormal or underflows (inputs
# below ~-87.3), which is most of the vocabulary for peaked distributions and nearly all of
# q^(beta+1). Exponents are therefore clamped at _EXP_FLOOR and results below _EXP_FLUSH (~2e-38,
# the bottom of the normal fp32 range) set to 0: a change of < 2e-38 per element, far below any
# fp32 rounding of the sums it enters.
_EXP_FLOOR = -87.0
_EXP_FLUSH = 2e-38


def _exp_(x: torch.Tensor, flush: bool) -> torch.Tensor:
    """In-place exp; with ``flush``, results below ``_EXP_FLUSH`` are exactly 0 (see above)."""
    if not flush:
        return x.exp_()
    x.clamp_(min=_EXP_FLOOR).exp_()
    return torch.nn.functional.threshold_(x, _EXP_FLUSH, 0.0)


def _exp_into(out: torch.Tensor, x: torch.Tensor, flush: bool) -> torch.Tensor:
    """``out = exp(x)``, ``x`` unchanged; with ``flush`` as :func:`_exp_`."""
    if not flush:
        return torch.exp(x, out=out)
    torch.clamp(x, min=_EXP_FLOOR, out=out).exp_()
    return torch.nn.functional.threshold_(out, _EXP_FLUSH, 0.0)


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """In-place ``log_softmax`` over the last dim (the fused kernel, no ``[c, V]`` temporaries).

    The CPU kernel's fp32 row sum is biased (log-probabilities about 2e-6 too high at V = 32k);
    callers renormalize with the exact (cascade) sum of the probabilities, see
    :func:`_renormalize_`.
    """
    if x.device.type == "cpu":  # verified alias-safe there; elsewhere stay on the public API
        return torch._log_softmax(x, -1, False, out=x)
    return x.copy_(torch.log_softmax(x, -1))


def _renormalize_(log_probs: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor:
    """Make ``probs`` sum to 1 per row and shift ``log_probs`` accordingly; returns ``log(sum)``."""
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    log_total = total.log_()
    if log_probs is not None:
        log_probs.sub_(log_total)
    return log_total


def _block_rows(vocab: int, device: torch.device) -> int:
    elements = _BLOCK_ELEMENTS_CPU if device.type == "cpu" else _BLOCK_ELEMENTS_ACCEL
    return max(1, elements // max(1, vocab))


@dataclass
class _AuxChunk:
    """The baseline terms' state for one chunk: spec, UL weight, seen ids/mask, running sums."""

    spec: AuxSpec
    ul_scale: float
    ids: torch.Tensor | None  # [c, k] distinct earlier targets of each token's sequence
    seen: torch.Tensor | None  # [c, k] which of them precede the token
    sums: torch.Tensor  # [3]: ul, scalegrad, tailr (order of AUX_TERMS)


def _aux_block(p: torch.Tensor, t: torch.Tensor, nll: torch.Tensor, aux: _AuxChunk, i: int, j: int,
               ce_scale: float, log_p_ids: torch.Tensor | None) -> None:
    """Turn the probabilities ``p`` ([r, V], rows i:j of the chunk) into the gradient of the
    CE-like term(s) in place, and add the terms' sums into ``aux.sums``.

    Plain CE gives ``ce_scale (p - onehot_y)``. TaiLr scales it per row by the detached weight w
    (``b = ce_scale * w``). With ``g = gamma`` and ``S = sum_{v seen} p_v``, ScaleGrad's
    ``-log p + log(g + (1 - g) S) - [y unseen] log g`` adds ``c p_j (1[j seen] - S)``,
    ``c = ce_scale (1 - g) / (g + (1 - g) S)``. Unlikelihood adds, per candidate c,
    ``ul_scale a_c (onehot_c - p)`` with ``a_c = p_c / max(1 - p_c, UL_EPS)``. The clamp bounds the
    value (at ``-log UL_EPS``, never inf when ``1 - p_c`` rounds to 0) and the factor ``a_c``; for
    ``1 - p_c >= UL_EPS`` the gradient is exact, beyond it the push on the candidate,
    ``a_c (1 - p_c)``, shrinks gradually to ``p_c (1 - p_c) / UL_EPS`` instead of vanishing at once
    as under an autograd clamp. ``1 - p_c`` is ``-expm1(log p_c)`` from the log-probabilities
    ``log_p_ids`` at the ids (no rounding of ``p_c`` to 1). Everything together is one
    row scale of ``p``, the one-hot subtraction and one ``scatter_add`` over the ``[r, k]`` ids.
    """
    spec, r = aux.spec, p.shape[0]
    base = nll.new_full((r, 1), ce_scale)
    extra = None
    if spec.tailr is not None:
        gamma, min_weight = spec.tailr
        p_gold = torch.exp(-nll)
        weight = (p_gold / (gamma + (1 - gamma) * p_gold)).clamp_(min_weight, 1.0)
        aux.sums[2] += (weight * nll).sum()
        base = base * weight
    scale = base
    if aux.ids is not None:
        ids, seen = aux.ids[i:j], aux.seen[i:j]
        p_ids = p.gather(1, ids)
        extra = torch.zeros_like(p_ids)
        if spec.scalegrad is not None:
            gamma = spec.scalegrad
            p_seen = p_ids * seen
            s = p_seen.sum(1, keepdim=True)
            denom = gamma + (1 - gamma) * s
            gold_seen = ((ids == t.unsqueeze(1)) & seen).any(1, keepdim=True)
            aux.sums[1] += (nll + denom.log() - (~gold_seen) * math.log(gamma)).sum()
            coef = ce_scale * (1 - gamma) / denom
            scale = scale - coef * s
            extra += coef * p_seen
        if spec.unlikelihood is not None:
            candidate = seen & (ids != t.unsqueeze(1))
            one_minus = torch.expm1(log_p_ids).neg_().clamp_(min=UL_EPS)
            aux.sums[0] -= (one_minus.log() * candidate).sum()
            a = (p_ids * candidate).div_(one_minus).mul_(aux.ul_scale)
            scale = scale - a.sum(1, keepdim=True)
            extra += a
    p.mul_(scale)
    p[torch.arange(r, device=p.device), t] -= base.squeeze(1)
    if extra is not None:
        p.scatter_add_(1, ids, extra)


def _sparse_distill_block(grad: torch.Tensor, log_p: torch.Tensor, p: torch.Tensor, teacher: SparseTeacher,
                          buf: torch.Tensor, spec: DistillSpec, s: float, flush: bool) -> torch.Tensor:
    """Bucketed distillation term of one row block against a sparse teacher; adds its gradient
    (times ``s = tau * distill_scale``) into ``grad`` and returns the block's sum (without tau^2).

    ``log_p``/``p``: the student's tempered log-probabilities/probabilities ``[r, V]``; ``buf``: a
    ``[r, V]`` scratch. With K the kept ids, T the rest, ``r = exp(log_tail)``, ``wq = w q`` on K:
    ``D = sum_K wq (log q - log p) + r (log r - log p_T)``, gradient
    ``s (Z p - wq on K - r p / p_T on T)``, ``Z = sum_K wq + r``. ``log p_T`` is a log-sum-exp over
    T: ``log p_T = m + log S``, ``m`` the maximum of ``log p`` over T, ``buf = exp(log p - m)`` on T
    (0 on K) and ``S = sum buf >= 1``, so ``p_u / p_T = buf_u / S``: no ``1 - sum_K p`` cancellation,
    no overflow, and a finite ``log p_T`` however small ``p_T`` is.
    """
    ids = teacher.ids.long()
    log_q = teacher.logq.to(log_p.dtype).clamp(min=_EXP_FLOOR if flush else -1e30)  # q = 0: no NaN
    q = _exp_(log_q.clone(), flush)
    wq = q * focus_weights(q, spec.beta, spec.gamma) if spec.mode == "focus" else q
    total = torch.linalg.vecdot(wq, log_q - log_p.gather(1, ids)).sum()
    z_norm = wq.sum(-1, keepdim=True)
    if ids.shape[1] < log_p.shape[1]:  # the tail bucket T is not empty
        log_tail = teacher.log_tail.to(log_p.dtype).unsqueeze(1)
        tail = log_tail.exp()
        masked = buf.copy_(log_p).scatter_(1, ids, float("-inf"))
        top = masked.amax(-1, keepdim=True)
        tail_sum = _exp_(masked.sub_(top), flush).sum(-1, keepdim=True)  # >= 1: the max gives exp(0)
        total += (tail * (log_tail.clamp(min=-1e30) - top - tail_sum.log())).sum()
        z_norm = z_norm + tail
        grad.addcmul_(masked, tail / tail_sum, value=-s)  # r p_u / p_T on T, 0 on K
    grad.addcmul_(p, z_norm, value=s)
    grad.scatter_add_(1, ids, wq.mul(-s))
    return total


def _chunk_loss_and_grad(
    zs: torch.Tensor,
    zt: torch.Tensor | SparseTeacher | None,
    target: torch.Tensor,
    spec: DistillSpec,
    ce_scale: float,
    distill_scale: float,
    block_rows: int | None = None,
    scratch: torch.Tensor | None = None,
    aux: _AuxChunk | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss sums of one chunk and the gradient of ``ce_scale*CE + distill_scale*D`` w.r.t. ``zs``.

    ``zs`` (fp32, [c, V]) is overwritten with the gradient; ``zt`` (fp32, [c, V]) is consumed.
    The rows are processed in blocks of ``block_rows`` (default: ~1 MiB per buffer on CPU) with
    four ``[block_rows, V]`` fp32 scratch buffers (``scratch``, ``[4, >= block_rows, V]``, reused
    across calls by the caller), so that only ``zs`` and ``zt`` are chunk-sized and, on CPU, the
    elementwise passes run in cache.

    Per row: ``CE = -log_softmax(zs)[target]``; ``log q = log_softmax(zt / tau)``,
    ``log p = log_softmax(zs / tau)``, ``wq = w q`` (``= q`` for KD), ``D = tau^2 sum wq (log q - log p)``;
    gradient ``ce_scale (softmax(zs) - onehot) + distill_scale * tau (Z p - wq)``, ``Z = sum wq``.
    With ``aux``, the baseline terms change the CE part of the gradient (:func:`_aux_block`) and
    add their sums into ``aux.sums``. A :class:`SparseTeacher` ``zt`` (this chunk's rows) replaces
    the teacher logits: the distillation term is then :func:`_sparse_distill_block`'s.
    """
    c, vocab = zs.shape
    if block_rows is None:
        block_rows = _block_rows(vocab, zs.device)
    block_rows = max(1, min(block_rows, c))
    distill = zt is not None
    if distill and (scratch is None or scratch.shape[0] < 4 or scratch.shape[1] < block_rows
                    or scratch.shape[2] != vocab):
        scratch = zs.new_empty((4, block_rows, vocab))
    flush = zs.device.type == "cpu"
    tau = spec.temperature
    s = tau * distill_scale
    ce_sum = zs.new_zeros(())
    distill_sum = zs.new_zeros(())
    for i in range(0, c, block_rows):
        j = min(i + block_rows, c)
        r = j - i
        x = zs[i:j]
        t = target[i:j]
        if distill:
            log_p, p, wq, q = (buf[:r] for buf in scratch)
            _log_softmax_(torch.div(x, tau, out=log_p))
            _renormalize_(log_p, _exp_into(p, log_p, flush))
        # CE and its gradient ce_scale * (softmax(zs) - onehot)
        _log_softmax_(x)
        picked = x.gather(1, t.unsqueeze(1))
        # unlikelihood needs 1 - p_c = -expm1(log p_c), exact where p_c ~ 1 (1 - p is not)
        log_p_ids = x.gather(1, aux.ids[i:j]) if aux is not None and aux.spec.unlikelihood is not None else None
        grad = _exp_(x, flush)
        log_total = _renormalize_(None, grad)
        nll = log_total - picked
        ce_sum += nll.sum()
        if aux is not None:
            if log_p_ids is not None:
                log_p_ids.sub_(log_total)
            _aux_block(grad, t, nll, aux, i, j, ce_scale, log_p_ids)
        else:
            if ce_scale != 1.0:
                grad.mul_(ce_scale)
            grad[torch.arange(r, device=x.device), t] -= ce_scale
        if not distill:
            continue
        if isinstance(zt, SparseTeacher):
            distill_sum += _sparse_distill_block(grad, log_p, p, zt.rows(i, j), q, spec, s, flush)
            continue
        log_q = _log_softmax_(zt[i:j].div_(tau))
        # -inf teacher logits: q = 0 contributes 0, never NaN (with flush, every log q below the
        # floor has q = 0 exactly, so its log ratio is multiplied by 0 as well)
        log_q.clamp_(min=_EXP_FLOOR if flush else -1e30)
        _renormalize_(log_q, _exp_into(q, log_q, flush))
        if spec.mode == "focus":
            _exp_(torch.mul(log_q, spec.beta + 1.0, out=wq), flush)  # q^(beta+1)
            if spec.gamma == 0.0:
                wq.add_(q)
            elif spec.gamma == 1.0:  # (1-q) q
                wq.add_(q).addcmul_(q, q, value=-1.0)
            else:  # (1-q)^gamma * q = exp(gamma*log1p(-q) + log q)
                wq.add_(_exp_(q.neg_().log1p_().mul_(spec.gamma).add_(log_q), flush))
            z_norm = wq.sum(-1, keepdim=True)
        else:
            wq = q
            z_norm = None
        log_ratio = log_q.sub_(log_p)  # log q - log p
        distill_sum += torch.linalg.vecdot(wq, log_ratio).sum()
        # d/dz_s of tau^2 * sum w q log(q/p) = tau * (Z p - w q)
        if z_norm is not None:
            grad.addcmul_(p, z_norm, value=s)
        else:
            grad.add_(p, alpha=s)
        grad.sub_(wq, alpha=s)
    return ce_sum, distill_sum * tau**2, zs


def _logits_into(out: torch.Tensor, hidden: torch.Tensor, head: torch.Tensor, low: torch.Tensor | None):
    """``out[:] = float(hidden @ head.T)`` without a fresh ``[c, V]`` allocation when possible."""
    if hidden.dtype == torch.float32 and head.dtype == torch.float32:
        torch.mm(hidden, head.T, out=out)
    elif low is not None and hidden.dtype == head.dtype == low.dtype:
        out.copy_(torch.mm(hidden, head.T, out=low[: out.shape[0]]))
    else:
        out.copy_(hidden @ head.T)


class _FusedCEDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, target, spec, ce_scale, distill_scale, chunk_size,
                aux=None, seen=None, ul_scale=0.0, sparse=None):
        n, vocab = h_s.shape[0], w_s.shape[0]
        dev = h_s.device
        grad_h = torch.zeros(h_s.shape, dtype=h_s.dtype, device=dev) if h_s.requires_grad else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=dev) if w_s.requires_grad else None
        ce_total = torch.zeros((), dtype=torch.float32, device=dev)
        distill_total = torch.zeros((), dtype=torch.float32, device=dev)
        aux_sums = torch.zeros(len(AUX_TERMS), dtype=torch.float32, device=dev)
        # Buffers reused by every chunk: fp32 student logits (then gradient), teacher logits,
        # a low-precision staging buffer for non-fp32 heads, and the per-block scratch.
        c = max(1, min(chunk_size, n))
        zs_buf = torch.empty((c, vocab), dtype=torch.float32, device=dev)
        zt_buf = torch.empty((c, vocab), dtype=torch.float32, device=dev) if h_t is not None else None
        low_dtype = w_s.dtype if w_s.dtype != torch.float32 else None
        if low_dtype is None and h_t is not None and w_t.dtype != torch.float32:
            low_dtype = w_t.dtype
        low = torch.empty((c, vocab), dtype=low_dtype, device=dev) if low_dtype is not None else None
        block_rows = min(_block_rows(vocab, dev), c)
        distill = h_t is not None or sparse is not None
        scratch = torch.empty((4, block_rows, vocab), dtype=torch.float32, device=dev) if distill else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            m = end - start
            hs_c = h_s[start:end]
            zs = zs_buf[:m]
            _logits_into(zs, hs_c, w_s, low)
            zt = None
            if h_t is not None:
                zt = zt_buf[:m]
                _logits_into(zt, h_t[start:end], w_t, low)
            elif sparse is not None:
                zt = sparse.rows(start, end, dev)
            chunk_aux = None
            if aux is not None:
                ids, seen_c = seen.chunk(start, end) if aux.needs_seen else (None, None)
                chunk_aux = _AuxChunk(aux, ul_scale, ids, seen_c, aux_sums)
            ce_c, distill_c, grad = _chunk_loss_and_grad(
                zs, zt, target[start:end], spec, ce_scale, distill_scale, block_rows, scratch, chunk_aux
            )
            ce_total += ce_c
            distill_total += distill_c
            if grad_h is not None:
                if h_s.dtype == w_s.dtype == torch.float32 and grad_h.is_contiguous():
                    torch.mm(grad, w_s, out=grad_h[start:end])
                elif low is not None and h_s.dtype == w_s.dtype == low.dtype and grad_h.is_contiguous():
                    g_low = low[:m]
                    g_low.copy_(grad)
                    torch.mm(g_low, w_s, out=grad_h[start:end])
                else:
                    grad_h[start:end] = grad.to(w_s.dtype) @ w_s
            if grad_w is not None:
                grad_w.addmm_(grad.T, hs_c.float())
            del grad, zs, zt
        del zs_buf, zt_buf, low, scratch
        ctx.save_for_backward(grad_h, grad_w)
        ctx.head_dtype = w_s.dtype
        nll_like = ce_total
        if aux is not None and aux.scalegrad is not None:
            nll_like = aux_sums[1]
        elif aux is not None and aux.tailr is not None:
            nll_like = aux_sums[2]
        total = ce_scale * nll_like + distill_scale * distill_total + ul_scale * aux_sums[0]
        ctx.mark_non_differentiable(ce_total, distill_total, aux_sums)
        return total, ce_total, distill_total, aux_sums

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_distill, _grad_aux):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.head_dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None, None


def fused_ce_distill(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.Tensor | None,
    targets: torch.Tensor,
    spec: DistillSpec,
    ce_scale: float = 1.0,
    distill_scale: float = 1.0,
    chunk_size: int = 1024,
    *,
    teacher: SparseTeacher | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ce_scale * CE_sum + distill_scale * D_sum`` over the given (valid) token rows.

    Args:
        student_hidden: ``[N, H]`` final (normed) student hidden states of the valid positions.
        student_head: ``[V, H]`` student lm_head weight (may or may not require grad).
        teacher_hidden / teacher_head: the teacher's counterparts (no grad), or None for CE only.
        targets: ``[N]`` next-token ids.
        teacher: a :class:`SparseTeacher` of the N rows instead of teacher_hidden / teacher_head
            (both None then): the bucketed objective of "Sparse teacher" in the module docstring.
    Returns ``(total, ce_sum, distill_sum)``; only ``total`` is differentiable, the sums are
    detached fp32 scalars for logging.
    """
    total, sums = fused_ce_distill_aux(student_hidden, student_head, teacher_hidden, teacher_head, targets,
                                       spec, ce_scale, distill_scale, chunk_size, teacher=teacher)
    return total, sums["ce"], sums["distill"]


def fused_ce_distill_aux(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.Tensor | None,
    targets: torch.Tensor,
    spec: DistillSpec,
    ce_scale: float = 1.0,
    distill_scale: float = 1.0,
    chunk_size: int = 1024,
    aux: AuxSpec | None = None,
    sequence: torch.Tensor | None = None,
    aux_scale: float = 1.0,
    *,
    teacher: SparseTeacher | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`fused_ce_distill` with the baseline terms of ``aux`` in the same pass.

    The NLL term (weight ``ce_scale``) is CE, or ScaleGrad / TaiLr when configured; unlikelihood
    adds ``aux.unlikelihood * aux_scale * UL_sum`` (``aux_scale``: the per-token normalization,
    i.e. ``ce_scale`` without the CE weight). ``sequence`` ``[N]`` (contiguous ids, default: one
    sequence) delimits the "earlier targets" of UL and ScaleGrad. Returns the differentiable total
    and detached sums: ``ce`` (plain NLL, always), ``distill``, and ``ul`` / ``scalegrad`` /
    ``tailr`` for the configured terms. With ``aux=None`` this is exactly :func:`fused_ce_distill`.
    ``teacher``: a :class:`SparseTeacher` in place of teacher_hidden / teacher_head, as there.
    """
    seen = None
    if aux is not None and aux.needs_seen:
        if sequence is None:
            sequence = torch.zeros_like(targets)
        seen = seen_tokens(targets, sequence)
    ul_scale = float(aux.unlikelihood or 0.0) * aux_scale if aux is not None else 0.0
    if teacher is not None:
        if teacher_hidden is not None or teacher_head is not None:
            raise ValueError("give the teacher either as teacher_hidden/teacher_head or as a sparse teacher, not both")
        teacher.validate(student_hidden.shape[0], student_head.shape[0])
        _check_temperature(teacher, spec)
        if spec.mode == "none":
            teacher = None
    if teacher_hidden is None or spec.mode == "none":
        teacher_hidden = teacher_head = None
    elif teacher_head.shape[0] != student_head.shape[0]:
        raise ValueError(
            f"teacher vocabulary ({teacher_head.shape[0]}) differs from the student's "
            f"({student_head.shape[0]}): distillation needs one shared vocabulary"
        )
    total, ce, distill, aux_sums = _FusedCEDistill.apply(
        student_hidden, student_head, teacher_hidden, teacher_head, targets, spec,
        float(ce_scale), float(distill_scale), int(chunk_size), aux, seen, ul_scale, teacher,
    )
    sums = {"ce": ce, "distill": distill}
    if aux is not None:
        on = (aux.unlikelihood is not None, aux.scalegrad is not None, aux.tailr is not None)
        sums.update({name: aux_sums[k] for k, name in enumerate(AUX_TERMS) if on[k]})
    return total, sums


# --------------------------------------------------------------------------------------------
# RePAIR (paper, section 4.2.2): margin between mean token NLLs of chosen and rejected
# --------------------------------------------------------------------------------------------


def _softmax_nll_(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """In place: fp32 logits ``z`` ``[c, V]`` become ``softmax(z)``; returns ``-log softmax(z)[target]``
    ``[c]`` (renormalized with the exact row sum, see :func:`_log_softmax_`)."""
    _log_softmax_(z)
    gold = z.gather(1, target.unsqueeze(1))[:, 0]
    return _renormalize_(None, z.exp_())[:, 0] - gold


def _add_nll_grad_(probs: torch.Tensor, target: torch.Tensor, coef: torch.Tensor, hidden: torch.Tensor,
                   weight: torch.Tensor, grad_h: torch.Tensor | None, grad_w: torch.Tensor | None) -> None:
    """Gradient of ``sum(coef * nll)`` for one chunk, from ``probs = softmax(hidden @ weight.T)``
    (overwritten): ``d nll / d z = probs - onehot(target)``; written into ``grad_h`` (the chunk's
    rows) and added into the fp32 ``grad_w``."""
    probs[torch.arange(probs.shape[0], device=probs.device), target] -= 1.0
    probs.mul_(coef.unsqueeze(-1))
    if grad_h is not None:
        grad_h.copy_(probs.to(weight.dtype) @ weight)
    if grad_w is not None:
        grad_w.addmm_(probs.T, hidden.float())


def _chunk_buffers(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int):
    """Reused per-chunk buffers: fp32 logits ``[c, V]`` and, for a non-fp32 head, its staging copy."""
    c = max(1, min(chunk_size, hidden.shape[0]))
    z = torch.empty((c, weight.shape[0]), dtype=torch.float32, device=hidden.device)
    low = torch.empty_like(z, dtype=weight.dtype) if weight.dtype != torch.float32 else None
    return z, low


class _ChunkedTokenNLL(torch.autograd.Function):
    """Per-token NLL ``lse(z) - z[target]`` from hidden states and lm_head weights, in chunks.

    Forward keeps only the ``[N]`` result; backward recomputes each chunk's logits, so memory
    stays ``O(chunk x vocab)`` whatever the number of tokens.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_size):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        z_buf, low = _chunk_buffers(hidden, weight, chunk_size)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            z = z_buf[: end - start]
            _logits_into(z, hidden[start:end], weight, low)
            out[start:end] = _softmax_nll_(z, target[start:end])
        ctx.save_for_backward(hidden, weight, target)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, target = ctx.saved_tensors
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if ctx.needs_input_grad[1] else None)
        z_buf, low = _chunk_buffers(hidden, weight, ctx.chunk_size)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h, z = hidden[start:end], z_buf[: end - start]
            _logits_into(z, h, weight, low)
            _softmax_nll_(z, target[start:end])
            _add_nll_grad_(z, target[start:end], grad_out[start:end], h, weight,
                           grad_h[start:end] if grad_h is not None else None, grad_w)
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None


def chunked_token_nll(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
                      chunk_size: int = 1024) -> torch.Tensor:
    """``-log p(target)`` per row of ``hidden`` ([N, H]) under ``softmax(hidden @ head.T)``."""
    return _ChunkedTokenNLL.apply(hidden, head, targets, int(chunk_size))


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


# --------------------------------------------------------------------------------------------
# DITTO (Xu et al., 2022): self-reinforcement penalty on pseudo-repetition rows
# --------------------------------------------------------------------------------------------

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


class _FusedDitto(torch.autograd.Function):
    """:func:`ditto_loss` of :func:`chunked_token_nll` in one pass over the chunks.

    Token t's term depends on its own probability and on its previous copy's, which is
    stop-gradient and comes earlier in the flat order, so the gradient of every chunk is known as
    soon as its logits are: forward computes the loss and both gradients (one logits matmul per
    chunk instead of a forward one plus a recomputation in backward); backward only scales them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, previous, lam, chunk_size):
        n, dev = hidden.shape[0], hidden.device
        nll = torch.empty(n, dtype=torch.float32, device=dev)
        total = torch.zeros((), dtype=torch.float32, device=dev)
        grad_h = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if weight.requires_grad else None
        z_buf, low = _chunk_buffers(hidden, weight, chunk_size)  # logits, then softmax, then gradient
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h, z = hidden[start:end], z_buf[: end - start]
            _logits_into(z, h, weight, low)
            nll[start:end] = _softmax_nll_(z, target[start:end])
            prev = previous[start:end]
            p = torch.exp(-nll[start:end])
            gap = p - lam * torch.exp(-nll[prev.clamp(min=0)])  # earlier tokens: already computed
            one_minus = (1 - gap.abs()).clamp_(min=DITTO_FLOOR)
            total += torch.where(prev >= 0, -one_minus.log(), 0.0).sum()
            # d term / d p = sign(gap) / (1 - |gap|) (0 where clamped) and d p / d nll = -p
            coef = torch.where((prev >= 0) & (one_minus > DITTO_FLOOR), -torch.sign(gap) * p / one_minus, 0.0)
            _add_nll_grad_(z, target[start:end], coef, h, weight,
                           grad_h[start:end] if grad_h is not None else None, grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.head_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.head_dtype)
        return grad_h, grad_w, None, None, None, None


def fused_ditto_loss(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, previous: torch.Tensor,
                     lam: float, chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
    """``(sum, count)`` of :func:`ditto_loss` straight from hidden states ``[N, H]`` and lm_head
    weights, with memory ``O(chunk x vocab)`` and one logits matmul per chunk (gradients are
    computed in the forward pass, like the fused CE + distillation loss)."""
    if previous.numel() != hidden.shape[0]:
        raise ValueError(f"previous has {previous.numel()} entries for {hidden.shape[0]} tokens")
    total = _FusedDitto.apply(hidden, head, targets, previous, float(lam), int(chunk_size))
    return total, int((previous >= 0).sum())


def reference_ditto(logits: torch.Tensor, input_ids: torch.Tensor, lengths: list[int], prefix_len: list[int],
                    unit_len: list[int], lam: float) -> tuple[torch.Tensor, int]:
    """Dense DITTO over padded pseudo rows, position by position: ``logits`` ``[B, T, V]`` of
    ``input_ids`` ``[B, T]``; row b is ``lengths[b]`` tokens, a prefix of ``prefix_len[b]`` and then
    copies of a ``unit_len[b]``-token unit. Token i (from the second copy on) is predicted at
    position i - 1 and compared with token i - L, predicted at i - L - 1."""
    probs = torch.softmax(logits.float(), -1)
    total, count = logits.new_zeros((), dtype=torch.float32), 0
    for b in range(input_ids.shape[0]):
        unit = unit_len[b]
        for i in range(prefix_len[b] + unit, lengths[b]):
            now = probs[b, i - 1, input_ids[b, i]]
            before = probs[b, i - 1 - unit, input_ids[b, i - unit]].detach()
            total = total - torch.log(torch.clamp(1 - (now - lam * before).abs(), min=DITTO_FLOOR))
            count += 1
    return total, count
