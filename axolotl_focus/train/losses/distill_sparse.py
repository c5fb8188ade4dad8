"""Token-level distillation against a sparse teacher: the bucketed FOCUS / KD divergence.

Sparse teacher (:class:`~.specs.SparseTeacher`, e.g. from a teacher-logit cache): instead of its
hidden states and lm_head, the teacher can be given per valid token as k distinct ids K with their
``log q`` (at the training tau) and ``log r``, r the teacher mass outside K. The objective is then
the *bucketed* divergence, K kept individually and all other tokens one bucket T:

``tau^2 * [sum_{v in K} w(v) q(v) log(q(v) / p(v)) + w_T r log(r / p_T)]``, ``p_T = sum_{v in T} p(v)``

with gradient ``tau * (Z p(u) - w(u) q(u) [u in K] - w_T r p(u) / p_T [u in T])``,
``Z = sum_K w q + w_T r``. KD has ``w = w_T = 1``; FOCUS takes ``w_T = 1``, an approximation of the
tail tokens' own weights ``q^beta + (1 - q)^gamma``, ``~ 1 - gamma q`` for small q (for a top-k K,
every tail q <= min_K q). By the log-sum inequality the bucketed KD is <= the full KD. With k = V
(T empty, ``log r = -inf``) both equal the dense objective of :mod:`.distill` (same q).

:func:`reference_ce_distill_sparse` is the dense oracle; :func:`sparse_distill_block` is the same
term for one row block of the chunked pass (:class:`~.fused.FusedCEDistillLoss` called with
``teacher=SparseTeacher(...)``: the chunk's rows sliced, ``log p_T`` a log-sum-exp over T, never
``1 - sum_K p``). :func:`sparse_teacher_from_logits` builds the top-k sparse teacher of dense logits.
"""

from __future__ import annotations

import torch

from .base import DistillBlock
from .distill import focus_weights
from .numerics import EXP_FLOOR, exp_, reference_float
from .specs import IGNORE_INDEX, DistillSpec, SparseTeacher, check_temperature


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
    zs = reference_float(student_logits)
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
    """:func:`~.distill.reference_ce_distill` against a sparse teacher: dense ``(ce_sum, distill_sum)`` over
    tokens whose label is not -100; ``sparse`` has one row per such token, in order."""
    valid = labels != IGNORE_INDEX
    zs = reference_float(student_logits[valid])
    ce = torch.nn.functional.cross_entropy(zs, labels[valid], reduction="sum")
    if spec.mode == "none" or sparse is None:
        return ce, zs.new_zeros(())
    sparse.validate(zs.shape[0], zs.shape[1])
    check_temperature(sparse, spec)
    return ce, reference_sparse_distill_per_token(zs, sparse, spec).sum()


def sparse_distill_block(b: DistillBlock) -> torch.Tensor:
    """Bucketed distillation term (FOCUS or KD, ``b.spec.mode``) of one row block against its sparse
    teacher rows ``b.teacher``; adds its gradient (times ``s = b.scale = tau * distill_scale``) into
    ``b.grad`` and returns the block's sum (without tau^2).

    ``log_p``/``p``: the student's tempered log-probabilities/probabilities ``[r, V]``; ``buf``: one
    of the block's scratch buffers. With K the kept ids, T the rest, ``r = exp(log_tail)``, ``wq = w q`` on K:
    ``D = sum_K wq (log q - log p) + r (log r - log p_T)``, gradient
    ``s (Z p - wq on K - r p / p_T on T)``, ``Z = sum_K wq + r``. ``log p_T`` is a log-sum-exp over
    T: ``log p_T = m + log S``, ``m`` the maximum of ``log p`` over T, ``buf = exp(log p - m)`` on T
    (0 on K) and ``S = sum buf >= 1``, so ``p_u / p_T = buf_u / S``: no ``1 - sum_K p`` cancellation,
    no overflow, and a finite ``log p_T`` however small ``p_T`` is.
    """
    grad, log_p, p, teacher, spec, s, flush = b.grad, b.log_p, b.p, b.teacher, b.spec, b.scale, b.flush
    buf = b.scratch[1]
    ids = teacher.ids.long()
    log_q = teacher.logq.to(log_p.dtype).clamp(min=EXP_FLOOR if flush else -1e30)  # q = 0: no NaN
    q = exp_(log_q.clone(), flush)
    wq = q * focus_weights(q, spec.beta, spec.gamma) if spec.mode == "focus" else q
    total = torch.linalg.vecdot(wq, log_q - log_p.gather(1, ids)).sum()
    z_norm = wq.sum(-1, keepdim=True)
    if ids.shape[1] < log_p.shape[1]:  # the tail bucket T is not empty
        log_tail = teacher.log_tail.to(log_p.dtype).unsqueeze(1)
        tail = log_tail.exp()
        masked = buf.copy_(log_p).scatter_(1, ids, float("-inf"))
        top = masked.amax(-1, keepdim=True)
        tail_sum = exp_(masked.sub_(top), flush).sum(-1, keepdim=True)  # >= 1: the max gives exp(0)
        total += (tail * (log_tail.clamp(min=-1e30) - top - tail_sum.log())).sum()
        z_norm = z_norm + tail
        grad.addcmul_(masked, tail / tail_sum, value=-s)  # r p_u / p_T on T, 0 on K
    grad.addcmul_(p, z_norm, value=s)
    grad.scatter_add_(1, ids, wq.mul(-s))
    return total
