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

Both functions return *sums* over valid tokens; the trainer divides by the number of valid tokens
of the whole optimizer step (``num_items_in_batch``) so that gradient accumulation and data
parallelism normalize exactly.
"""

from __future__ import annotations

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


# --------------------------------------------------------------------------------------------
# Fused, chunked implementation
# --------------------------------------------------------------------------------------------


def _chunk_loss_and_grad(
    zs: torch.Tensor,
    zt: torch.Tensor | None,
    target: torch.Tensor,
    spec: DistillSpec,
    ce_scale: float,
    distill_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss sums of one chunk and the gradient of ``ce_scale*CE + distill_scale*D`` w.r.t. ``zs``.

    ``zs`` (fp32, [c, V]) is overwritten with the gradient; ``zt`` is consumed. Works in place so
    that at most five ``[c, V]`` buffers are alive at once.
    """
    rows = torch.arange(zs.shape[0], device=zs.device)
    lse = torch.logsumexp(zs, dim=-1)
    ce_sum = (lse - zs[rows, target]).sum()
    distill_sum = zs.new_zeros(())
    grad_distill = None
    if zt is not None:
        tau = spec.temperature
        log_q = zt.div_(tau)
        log_q.sub_(torch.logsumexp(log_q, dim=-1, keepdim=True))
        log_q.clamp_(min=-1e30)  # -inf teacher logits: q = 0 contributes 0, never NaN
        log_p = zs / tau
        log_p.sub_(torch.logsumexp(log_p, dim=-1, keepdim=True))
        if spec.mode == "focus":
            weighted_q = log_q.mul(spec.beta + 1.0).exp_()  # q^(beta+1)
            if spec.gamma == 0.0:
                weighted_q.add_(log_q.exp())
            else:  # (1-q)^gamma * q = exp(gamma*log1p(-q) + log q)
                weighted_q.add_(log_q.exp().neg_().log1p_().mul_(spec.gamma).add_(log_q).exp_())
            z_norm = weighted_q.sum(-1)
        else:
            weighted_q = log_q.exp()
            z_norm = None
        log_ratio = log_q.sub_(log_p)  # log q - log p
        distill_sum = tau**2 * torch.linalg.vecdot(weighted_q, log_ratio).sum()
        del log_ratio
        # d/dz_s of tau^2 * sum w q log(q/p) = tau * (Z p - w q)
        grad_distill = log_p.exp_()
        if z_norm is not None:
            grad_distill.mul_(z_norm.unsqueeze(-1))
        grad_distill.sub_(weighted_q).mul_(tau * distill_scale)
        del weighted_q
    # d/dz_s of CE = softmax(z_s) - onehot(target)
    grad = zs.sub_(lse.unsqueeze(-1)).exp_().mul_(ce_scale)
    grad[rows, target] -= ce_scale
    if grad_distill is not None:
        grad.add_(grad_distill)
    return ce_sum, distill_sum, grad


class _FusedCEDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, target, spec, ce_scale, distill_scale, chunk_size):
        grad_h = torch.zeros_like(h_s) if h_s.requires_grad else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if w_s.requires_grad else None
        ce_total = h_s.new_zeros((), dtype=torch.float32)
        distill_total = h_s.new_zeros((), dtype=torch.float32)
        for start in range(0, h_s.shape[0], chunk_size):
            end = min(start + chunk_size, h_s.shape[0])
            hs_c = h_s[start:end]
            zs = (hs_c @ w_s.T).float()
            zt = (h_t[start:end] @ w_t.T).float() if h_t is not None else None
            ce_c, distill_c, grad = _chunk_loss_and_grad(
                zs, zt, target[start:end], spec, ce_scale, distill_scale
            )
            del zt
            ce_total += ce_c
            distill_total += distill_c
            if grad_h is not None:
                grad_h[start:end] = grad.to(w_s.dtype) @ w_s
            if grad_w is not None:
                grad_w.addmm_(grad.T, hs_c.float())
            del grad
        ctx.save_for_backward(grad_h, grad_w)
        ctx.head_dtype = w_s.dtype
        total = ce_scale * ce_total + distill_scale * distill_total
        ctx.mark_non_differentiable(ce_total, distill_total)
        return total, ce_total, distill_total

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_distill):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.head_dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ce_scale * CE_sum + distill_scale * D_sum`` over the given (valid) token rows.

    Args:
        student_hidden: ``[N, H]`` final (normed) student hidden states of the valid positions.
        student_head: ``[V, H]`` student lm_head weight (may or may not require grad).
        teacher_hidden / teacher_head: the teacher's counterparts (no grad), or None for CE only.
        targets: ``[N]`` next-token ids.
    Returns ``(total, ce_sum, distill_sum)``; only ``total`` is differentiable, the sums are
    detached fp32 scalars for logging.
    """
    if teacher_hidden is None or spec.mode == "none":
        teacher_hidden = teacher_head = None
    elif teacher_head.shape[0] != student_head.shape[0]:
        raise ValueError(
            f"teacher vocabulary ({teacher_head.shape[0]}) differs from the student's "
            f"({student_head.shape[0]}): distillation needs one shared vocabulary"
        )
    total, ce, distill = _FusedCEDistill.apply(
        student_hidden, student_head, teacher_hidden, teacher_head, targets, spec,
        float(ce_scale), float(distill_scale), int(chunk_size),
    )
    return total, ce, distill


# --------------------------------------------------------------------------------------------
# RePAIR (paper, section 4.2.2): margin between mean token NLLs of chosen and rejected
# --------------------------------------------------------------------------------------------


class _ChunkedTokenNLL(torch.autograd.Function):
    """Per-token NLL ``lse(z) - z[target]`` from hidden states and lm_head weights, in chunks.

    Forward keeps only the ``[N]`` result; backward recomputes each chunk's logits, so memory
    stays ``O(chunk x vocab)`` whatever the number of tokens.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_size):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            z = (hidden[start : start + chunk_size] @ weight.T).float()
            rows = torch.arange(z.shape[0], device=z.device)
            out[start : start + chunk_size] = torch.logsumexp(z, -1) - z[rows, target[start : start + chunk_size]]
        ctx.save_for_backward(hidden, weight, target)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, target = ctx.saved_tensors
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[start : start + ctx.chunk_size]
            z = (h @ weight.T).float()
            rows = torch.arange(z.shape[0], device=z.device)
            g = z.sub_(torch.logsumexp(z, -1, keepdim=True)).exp_()  # softmax
            g[rows, target[start : start + ctx.chunk_size]] -= 1.0
            g.mul_(grad_out[start : start + ctx.chunk_size].unsqueeze(-1))
            if grad_h is not None:
                grad_h[start : start + ctx.chunk_size] = g.to(weight.dtype) @ weight
            if grad_w is not None:
                grad_w.addmm_(g.T, h.float())
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
