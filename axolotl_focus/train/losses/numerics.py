"""The in-place numerics the fused losses share: logits into a reused buffer, exp and log_softmax in
place, renormalization, and the per-token NLL with its gradient.

Every helper writes into a buffer it is given (no ``[c, V]`` temporaries), on fp32 logits.

* ``log_softmax`` runs in place through the fused kernel and is renormalized with the exact sum of
  the probabilities (:func:`renormalize_`): the CPU kernel's fp32 row sum is biased
  (log-probabilities about 2e-6 too high at V = 32k).
* On CPU the vectorized exp is 10-30x slower when its result is subnormal or underflows (inputs
  below ~-87.3), which is most of the vocabulary for peaked distributions and nearly all of
  ``q^(beta+1)``. With ``flush`` (the chunk loop sets it on CPU), exponents are therefore clamped
  at :data:`EXP_FLOOR` and results below :data:`EXP_FLUSH` (~2e-38, the bottom of the normal fp32
  range) set to 0: a change of < 2e-38 per element, far below any fp32 rounding of the sums it
  enters.

:func:`reference_float` is the precision of the dense references: fp32, or float64 as given.
"""

from __future__ import annotations

import torch

EXP_FLOOR = -87.0
EXP_FLUSH = 2e-38


def reference_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dense references' precision: fp32, or float64 as given (float64 oracles, e.g. of
    the fp32 / bf16 fused losses on an accelerator in benchmarks/gpu_check.py)."""
    return x if x.dtype == torch.float64 else x.float()


def exp_(x: torch.Tensor, flush: bool) -> torch.Tensor:
    """In-place exp; with ``flush``, results below ``EXP_FLUSH`` are exactly 0 (see above)."""
    if not flush:
        return x.exp_()
    x.clamp_(min=EXP_FLOOR).exp_()
    return torch.nn.functional.threshold_(x, EXP_FLUSH, 0.0)


def exp_into(out: torch.Tensor, x: torch.Tensor, flush: bool) -> torch.Tensor:
    """``out = exp(x)``, ``x`` unchanged; with ``flush`` as :func:`exp_`."""
    if not flush:
        return torch.exp(x, out=out)
    torch.clamp(x, min=EXP_FLOOR, out=out).exp_()
    return torch.nn.functional.threshold_(out, EXP_FLUSH, 0.0)


def log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """In-place ``log_softmax`` over the last dim (the fused kernel, no ``[c, V]`` temporaries).

    Callers renormalize with the exact (cascade) sum of the probabilities, see :func:`renormalize_`.
    """
    if x.device.type == "cpu":  # verified alias-safe there; elsewhere stay on the public API
        return torch._log_softmax(x, -1, False, out=x)
    return x.copy_(torch.log_softmax(x, -1))


def renormalize_(log_probs: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor:
    """Make ``probs`` sum to 1 per row and shift ``log_probs`` accordingly; returns ``log(sum)``."""
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    log_total = total.log_()
    if log_probs is not None:
        log_probs.sub_(log_total)
    return log_total


def logits_into(out: torch.Tensor, hidden: torch.Tensor, head: torch.Tensor, low: torch.Tensor | None):
    """``out[:] = float(hidden @ head.T)`` without a fresh ``[c, V]`` allocation when possible
    (``low``: a staging buffer in the inputs' low precision)."""
    if hidden.dtype == torch.float32 and head.dtype == torch.float32:
        torch.mm(hidden, head.T, out=out)
    elif low is not None and hidden.dtype == head.dtype == low.dtype:
        out.copy_(torch.mm(hidden, head.T, out=low[: out.shape[0]]))
    else:
        out.copy_(hidden @ head.T)


def softmax_nll_(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """In place: fp32 logits ``z`` ``[c, V]`` become ``softmax(z)``; returns ``-log softmax(z)[target]``
    ``[c]`` (renormalized with the exact row sum, see :func:`log_softmax_`)."""
    log_softmax_(z)
    gold = z.gather(1, target.unsqueeze(1))[:, 0]
    return renormalize_(None, z.exp_())[:, 0] - gold


def add_nll_grad_(probs: torch.Tensor, target: torch.Tensor, coef: torch.Tensor, hidden: torch.Tensor,
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
