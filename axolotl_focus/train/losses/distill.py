"""Token-level distillation against a dense teacher: FOCUS and plain KD.

Per valid token t (label != -100, already shifted), with ``q = softmax(z_teacher / tau)`` and
``p = softmax(z_student / tau)``:

* KD:    ``tau^2 * sum_v q(v) log(q(v) / p(v))``
* FOCUS: ``tau^2 * sum_v w(v) q(v) log(q(v) / p(v))``, ``w(v) = q(v)^beta + (1 - q(v))^gamma``

Gradient with respect to the student logits (paper, appendix A, scaled by the temperature):
``d/dz = tau * (Z p - w q)`` with ``Z = sum_v w(v) q(v)``; for KD ``w = 1`` and ``Z = 1``.

Two implementations of the same objective side by side:

* :func:`reference_ce_distill` materializes the full ``[tokens, vocab]`` logits of student and
  teacher and lets autograd differentiate. It is the readable specification and the test oracle.
* :func:`dense_distill_block` is the same term and its closed-form gradient for one row block of
  the chunked pass (a :class:`~.base.DistillBlock`; entry point :class:`~.fused.FusedCEDistillLoss`),
  in place in the block's scratch buffers.
"""

from __future__ import annotations

import torch

from .base import DistillBlock
from .numerics import EXP_FLOOR, exp_, exp_into, log_softmax_, reference_float, renormalize_
from .specs import IGNORE_INDEX, DistillSpec

# --------------------------------------------------------------------------------------------
# Reference implementation (dense, autograd)
# --------------------------------------------------------------------------------------------


def focus_weights(q: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """``w(v) = q(v)^beta + (1 - q(v))^gamma`` (paper eq. for FOCUS)."""
    return q.pow(beta) + (1.0 - q).pow(gamma)


def reference_distill_per_token(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: DistillSpec
) -> torch.Tensor:
    """Dense per-token FOCUS or KD term, ``[N]``, differentiable w.r.t. the student logits (fp32;
    float64 for float64 logits)."""
    tau = spec.temperature
    log_q = torch.log_softmax(reference_float(teacher_logits) / tau, dim=-1)
    log_p = torch.log_softmax(reference_float(student_logits) / tau, dim=-1)
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

    ``student_logits``/``teacher_logits`` are ``[N, V]`` and already aligned with ``labels`` [N];
    computed in fp32, or float64 for float64 logits.
    """
    valid = labels != IGNORE_INDEX
    zs = reference_float(student_logits[valid])
    ce = torch.nn.functional.cross_entropy(zs, labels[valid], reduction="sum")
    if spec.mode == "none" or teacher_logits is None:
        return ce, zs.new_zeros(())
    return ce, reference_distill_per_token(zs, teacher_logits[valid], spec).sum()


# --------------------------------------------------------------------------------------------
# One row block of the fused, chunked pass
# --------------------------------------------------------------------------------------------


def dense_distill_block(b: DistillBlock) -> torch.Tensor:
    """FOCUS or KD term (``b.spec.mode``) of one row block against the teacher logits ``b.teacher``
    ``[r, V]`` (fp32, consumed); adds its gradient (times ``b.scale = tau * distill_scale``) into
    ``b.grad`` and returns the block's sum (without tau^2).

    ``log q = log_softmax(zt / tau)``, ``wq = w q`` (``= q`` for KD), ``D = sum wq (log q - log p)``;
    gradient ``s (Z p - wq)``, ``Z = sum wq``; ``wq`` and ``q`` live in the block's scratch.
    """
    grad, log_p, p, spec, s, flush = b.grad, b.log_p, b.p, b.spec, b.scale, b.flush
    wq, q = b.scratch
    tau = spec.temperature
    log_q = log_softmax_(b.teacher.div_(tau))
    # -inf teacher logits: q = 0 contributes 0, never NaN (with flush, every log q below the
    # floor has q = 0 exactly, so its log ratio is multiplied by 0 as well)
    log_q.clamp_(min=EXP_FLOOR if flush else -1e30)
    renormalize_(log_q, exp_into(q, log_q, flush))
    if spec.mode == "focus":
        exp_(torch.mul(log_q, spec.beta + 1.0, out=wq), flush)  # q^(beta+1)
        if spec.gamma == 0.0:
            wq.add_(q)
        elif spec.gamma == 1.0:  # (1-q) q
            wq.add_(q).addcmul_(q, q, value=-1.0)
        else:  # (1-q)^gamma * q = exp(gamma*log1p(-q) + log q)
            wq.add_(exp_(q.neg_().log1p_().mul_(spec.gamma).add_(log_q), flush))
        z_norm = wq.sum(-1, keepdim=True)
    else:
        wq = q
        z_norm = None
    log_ratio = log_q.sub_(log_p)  # log q - log p
    total = torch.linalg.vecdot(wq, log_ratio).sum()
    # d/dz_s of tau^2 * sum w q log(q/p) = tau * (Z p - w q)
    if z_norm is not None:
        grad.addcmul_(p, z_norm, value=s)
    else:
        grad.add_(p, alpha=s)
    grad.sub_(wq, alpha=s)
    return total
