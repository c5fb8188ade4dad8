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


def _chunk_loss_and_grad(
    zs: torch.Tensor,
    zt: torch.Tensor | None,
    target: torch.Tensor,
    spec: DistillSpec,
    ce_scale: float,
    distill_scale: float,
    block_rows: int | None = None,
    scratch: torch.Tensor | None = None,
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
        grad = _exp_(x, flush)
        ce_sum += (_renormalize_(None, grad) - picked).sum()
        if ce_scale != 1.0:
            grad.mul_(ce_scale)
        grad[torch.arange(r, device=x.device), t] -= ce_scale
        if not distill:
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
    def forward(ctx, h_s, w_s, h_t, w_t, target, spec, ce_scale, distill_scale, chunk_size):
        n, vocab = h_s.shape[0], w_s.shape[0]
        dev = h_s.device
        grad_h = torch.zeros(h_s.shape, dtype=h_s.dtype, device=dev) if h_s.requires_grad else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=dev) if w_s.requires_grad else None
        ce_total = torch.zeros((), dtype=torch.float32, device=dev)
        distill_total = torch.zeros((), dtype=torch.float32, device=dev)
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
        scratch = torch.empty((4, block_rows, vocab), dtype=torch.float32, device=dev) if h_t is not None else None
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
            ce_c, distill_c, grad = _chunk_loss_and_grad(
                zs, zt, target[start:end], spec, ce_scale, distill_scale, block_rows, scratch
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
