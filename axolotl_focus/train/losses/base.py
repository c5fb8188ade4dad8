"""The chunking shared by the fused losses: token chunks, closed-form gradients, in-place numerics.

Every fused loss here is computed from the final hidden states ``[N, H]`` of the valid positions
and the lm_head weights ``[V, H]`` in token chunks of ``chunk_size`` rows: each chunk's logits
``[c, V]`` are built (:func:`logits_into`, into one reused fp32 buffer), reduced to the chunk's
loss sums, turned in place into their closed-form gradient with respect to the logits and
multiplied back into gradients of the hidden states and the head (fp32 accumulation for the
head), then dropped before the next chunk. Forward therefore already computes the gradients;
backward only scales them by the incoming gradient. The peak memory of a loss is
``O(chunk_size x V)`` instead of ``O(N x V)``, and the result does not depend on ``chunk_size``
beyond fp32 rounding. Within a chunk the elementwise part runs in row blocks of ~1 MiB per fp32
buffer on CPU (larger on accelerators), in four reused ``[block, V]`` scratch buffers.

This module holds the loop and what the formulas share; the formulas themselves, each with its
dense autograd reference beside it, live in the sibling modules and are handed to the loop
(:class:`ChunkFormulas`):

* :class:`FusedCEDistill` / :func:`chunk_loss_and_grad`: CE (or the NLL-like baseline term) plus
  distillation against a dense teacher (its hidden states and head, chunked the same way) or a
  :class:`SparseTeacher` (the chunk's rows sliced); formulas in ``distill.py``,
  ``distill_sparse.py`` and ``aux.py``, entry points in ``fused.py``.
* :class:`ChunkedTokenNLL`: per-token NLL ``lse(z) - z[target]`` ``[N]``, backward recomputing each
  chunk's logits (RePAIR, ``margin.py``).
* :class:`FusedTokenNLLTerm`: a sum of per-token terms of the NLL whose gradient is known as soon
  as the chunk's NLL is (DITTO, ``ditto.py``).

Sums and normalization: the losses return *sums* over the valid tokens (label != -100, already
shifted) they are given, never means; the trainer divides by the number of valid tokens of the
whole optimizer step (``num_items_in_batch``, passed in as ``ce_scale`` / ``distill_scale``) so
that gradient accumulation and data parallelism normalize exactly. The sums returned for
logging are detached fp32 scalars.

Numerics (CPU): ``log_softmax`` runs in place through the fused kernel and is renormalized with
the exact sum of the probabilities (:func:`renormalize_`); exponents are floored at
:data:`EXP_FLOOR` and results below :data:`EXP_FLUSH` flushed to 0 (:func:`exp_`), which keeps the
vectorized exp out of its slow subnormal path at a change far below fp32 rounding.

The shared dataclasses live here too: :class:`DistillSpec`, :class:`LossSums`, :class:`SparseTeacher`
and the per-chunk state :class:`AuxChunk` of the baseline terms. The module is over 500 lines
because the loop, its three autograd functions and the in-place helpers they share belong
together (one contract, one place to read it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from ...loss_settings import DISTILL_MODES  # the modes' one definition, shared with the config

if TYPE_CHECKING:
    from .aux import AuxSpec

IGNORE_INDEX = -100


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


def check_temperature(sparse: SparseTeacher, spec: DistillSpec) -> None:
    if sparse.temperature is not None and not math.isclose(sparse.temperature, spec.temperature, rel_tol=1e-6):
        raise ValueError(f"sparse teacher temperature {sparse.temperature} differs from the loss's "
                         f"{spec.temperature}: its logq are log softmax(z / tau) at the training tau")


# Elements per row block of the elementwise part: ~1 MiB fp32 per buffer on CPU, so that the
# ~20 elementwise passes run in cache instead of streaming [chunk, V] buffers through memory; on
# accelerators large blocks keep kernels big enough to hide launch overhead.
_BLOCK_ELEMENTS_CPU = 1 << 18
_BLOCK_ELEMENTS_ACCEL = 1 << 22


# On CPU the vectorized exp is 10-30x slower when its result is subnormal or underflows (inputs
# below ~-87.3), which is most of the vocabulary for peaked distributions and nearly all of
# q^(beta+1). Exponents are therefore clamped at EXP_FLOOR and results below EXP_FLUSH (~2e-38,
# the bottom of the normal fp32 range) set to 0: a change of < 2e-38 per element, far below any
# fp32 rounding of the sums it enters.
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

    The CPU kernel's fp32 row sum is biased (log-probabilities about 2e-6 too high at V = 32k);
    callers renormalize with the exact (cascade) sum of the probabilities, see
    :func:`renormalize_`.
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


def _block_rows(vocab: int, device: torch.device) -> int:
    elements = _BLOCK_ELEMENTS_CPU if device.type == "cpu" else _BLOCK_ELEMENTS_ACCEL
    return max(1, elements // max(1, vocab))


@dataclass
class AuxChunk:
    """The baseline terms' state for one chunk: spec, UL weight, seen ids/mask, running sums."""

    spec: AuxSpec
    ul_scale: float
    ids: torch.Tensor | None  # [c, k] distinct earlier targets of each token's sequence
    seen: torch.Tensor | None  # [c, k] which of them precede the token
    sums: torch.Tensor  # [3]: ul, scalegrad, tailr (order of AUX_TERMS)


def logits_into(out: torch.Tensor, hidden: torch.Tensor, head: torch.Tensor, low: torch.Tensor | None):
    """``out[:] = float(hidden @ head.T)`` without a fresh ``[c, V]`` allocation when possible."""
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


def chunk_buffers(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int):
    """Reused per-chunk buffers: fp32 logits ``[c, V]`` and, for a non-fp32 head, its staging copy."""
    c = max(1, min(chunk_size, hidden.shape[0]))
    z = torch.empty((c, weight.shape[0]), dtype=torch.float32, device=hidden.device)
    low = torch.empty_like(z, dtype=weight.dtype) if weight.dtype != torch.float32 else None
    return z, low


def chunk_loss_and_grad(
    zs: torch.Tensor,
    zt: torch.Tensor | SparseTeacher | None,
    target: torch.Tensor,
    spec: DistillSpec,
    ce_scale: float,
    distill_scale: float,
    block_rows: int | None = None,
    scratch: torch.Tensor | None = None,
    aux: AuxChunk | None = None,
    *,
    formulas: ChunkFormulas,
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
    With ``aux``, the baseline terms change the CE part of the gradient (``formulas.aux``) and
    add their sums into ``aux.sums``. The distillation term of each row block is
    ``formulas.dense_distill``'s; a :class:`SparseTeacher` ``zt`` (this chunk's rows) replaces
    the teacher logits, the term is then ``formulas.sparse_distill``'s.
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
            log_softmax_(torch.div(x, tau, out=log_p))
            renormalize_(log_p, exp_into(p, log_p, flush))
        # CE and its gradient ce_scale * (softmax(zs) - onehot)
        log_softmax_(x)
        picked = x.gather(1, t.unsqueeze(1))
        # unlikelihood needs 1 - p_c = -expm1(log p_c), exact where p_c ~ 1 (1 - p is not)
        log_p_ids = x.gather(1, aux.ids[i:j]) if aux is not None and aux.spec.unlikelihood is not None else None
        grad = exp_(x, flush)
        log_total = renormalize_(None, grad)
        nll = log_total - picked
        ce_sum += nll.sum()
        if aux is not None:
            if log_p_ids is not None:
                log_p_ids.sub_(log_total)
            formulas.aux(grad, t, nll, aux, i, j, ce_scale, log_p_ids)
        else:
            if ce_scale != 1.0:
                grad.mul_(ce_scale)
            grad[torch.arange(r, device=x.device), t] -= ce_scale
        if not distill:
            continue
        if isinstance(zt, SparseTeacher):
            distill_sum += formulas.sparse_distill(grad, log_p, p, zt.rows(i, j), q, spec, s, flush)
            continue
        distill_sum += formulas.dense_distill(grad, log_p, p, zt[i:j], wq, q, spec, s, flush)
    return ce_sum, distill_sum * tau**2, zs


class ChunkFormulas(NamedTuple):
    """The per-row-block formulas :func:`chunk_loss_and_grad` applies (the loop owns the rest).

    * ``dense_distill(grad, log_p, p, zt, wq, q, spec, s, flush) -> sum``: distillation against
      the teacher logits ``zt`` ``[r, V]`` (consumed; ``wq``, ``q``: scratch), gradient times
      ``s = tau * distill_scale`` added into ``grad``, the block's sum (without tau^2) returned.
    * ``sparse_distill(grad, log_p, p, teacher, buf, spec, s, flush) -> sum``: the same against the
      block's :class:`SparseTeacher` rows.
    * ``aux(p, t, nll, aux_chunk, i, j, ce_scale, log_p_ids)``: turns the probabilities into the
      gradient of the CE-like terms in place and adds the baseline terms' sums.
    """

    dense_distill: Callable[..., torch.Tensor]
    sparse_distill: Callable[..., torch.Tensor]
    aux: Callable[..., None]


class FusedCEDistill(torch.autograd.Function):
    """CE plus distillation (and the baseline terms) over token chunks, gradients in forward;
    ``formulas`` (:class:`ChunkFormulas`) gives the per-block terms. Entry points: ``fused.py``."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, target, spec, ce_scale, distill_scale, chunk_size,
                aux=None, seen=None, ul_scale=0.0, sparse=None, formulas=None):
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
            logits_into(zs, hs_c, w_s, low)
            zt = None
            if h_t is not None:
                zt = zt_buf[:m]
                logits_into(zt, h_t[start:end], w_t, low)
            elif sparse is not None:
                zt = sparse.rows(start, end, dev)
            chunk_aux = None
            if aux is not None:
                ids, seen_c = seen.chunk(start, end) if aux.needs_seen else (None, None)
                chunk_aux = AuxChunk(aux, ul_scale, ids, seen_c, aux_sums)
            ce_c, distill_c, grad = chunk_loss_and_grad(
                zs, zt, target[start:end], spec, ce_scale, distill_scale, block_rows, scratch, chunk_aux,
                formulas=formulas,
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
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None, None, None


class ChunkedTokenNLL(torch.autograd.Function):
    """Per-token NLL ``lse(z) - z[target]`` from hidden states and lm_head weights, in chunks.

    Forward keeps only the ``[N]`` result; backward recomputes each chunk's logits, so memory
    stays ``O(chunk x vocab)`` whatever the number of tokens.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_size):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        z_buf, low = chunk_buffers(hidden, weight, chunk_size)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            z = z_buf[: end - start]
            logits_into(z, hidden[start:end], weight, low)
            out[start:end] = softmax_nll_(z, target[start:end])
        ctx.save_for_backward(hidden, weight, target)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, target = ctx.saved_tensors
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if ctx.needs_input_grad[1] else None)
        z_buf, low = chunk_buffers(hidden, weight, ctx.chunk_size)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h, z = hidden[start:end], z_buf[: end - start]
            logits_into(z, h, weight, low)
            softmax_nll_(z, target[start:end])
            add_nll_grad_(z, target[start:end], grad_out[start:end], h, weight,
                          grad_h[start:end] if grad_h is not None else None, grad_w)
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None


class FusedTokenNLLTerm(torch.autograd.Function):
    """``sum_t term_t`` of per-token terms of the NLL of :class:`ChunkedTokenNLL`, in one pass over
    the chunks, for terms whose gradient is known as soon as the chunk's NLL is.

    ``term(nll, start, end) -> (value, coef)``: ``nll`` ``[N]`` is filled up to ``end`` (earlier
    chunks included), ``value`` is the sum of the terms of tokens ``start:end`` and ``coef``
    ``[end - start]`` their derivative with respect to the tokens' own NLL. Forward computes the
    loss and both gradients (one logits matmul per chunk instead of a forward one plus a
    recomputation in backward); backward only scales them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, term, chunk_size):
        n, dev = hidden.shape[0], hidden.device
        nll = torch.empty(n, dtype=torch.float32, device=dev)
        total = torch.zeros((), dtype=torch.float32, device=dev)
        grad_h = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if weight.requires_grad else None
        z_buf, low = chunk_buffers(hidden, weight, chunk_size)  # logits, then softmax, then gradient
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h, z = hidden[start:end], z_buf[: end - start]
            logits_into(z, h, weight, low)
            nll[start:end] = softmax_nll_(z, target[start:end])
            value, coef = term(nll, start, end)
            total += value
            add_nll_grad_(z, target[start:end], coef, h, weight,
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
        return grad_h, grad_w, None, None, None
