"""The chunk loop of the fused CE + distillation pass: it owns everything the formulas share, and a
formula is one function of one row block.

The pass is computed from the final hidden states ``[N, H]`` of the valid positions and the lm_head
weights ``[V, H]`` in token chunks of ``chunk_size`` rows: each chunk's logits ``[c, V]`` are built
(:func:`~.numerics.logits_into`, into one reused fp32 buffer), reduced to the chunk's loss sums,
turned in place into their closed-form gradient with respect to the logits and multiplied back into
gradients of the hidden states and the head (fp32 accumulation for the head), then dropped before
the next chunk. Forward therefore already computes the gradients; backward only scales them by the
incoming gradient. The peak memory is ``O(chunk_size x V)`` instead of ``O(N x V)``, and the result
does not depend on ``chunk_size`` beyond fp32 rounding. Within a chunk the elementwise part runs in
row blocks of ~1 MiB per fp32 buffer on CPU (larger on accelerators), in four reused ``[block, V]``
scratch buffers.

Per row block the loop computes what every formula needs: the student's ``softmax(z)`` and its
NLL, and with a teacher the tempered ``log p = log_softmax(z / tau)`` and ``p``, then hands the
block to two hooks, each taking one dataclass:

* the NLL-like term, :class:`NLLTerm` (CE; the baseline terms of :mod:`.aux` change or add to it),
  sees an :class:`NLLBlock` and turns ``softmax(z)`` into its gradient in place;
* the distillation formula, a :data:`DistillFormula` ``(DistillBlock) -> block sum``, adds its
  gradient into the same buffer (FOCUS / KD: :mod:`.distill`, the bucketed objective against a
  sparse teacher: :mod:`.distill_sparse`). A new divergence is such a function plus its dense
  reference (reverse KL in ``tests/train/losses/test_reverse_kl.py``).

Sums and normalization: the pass returns *sums* over the valid tokens (label != -100, already
shifted) it is given, never means; the trainer divides by the number of valid tokens of the whole
optimizer step (``num_items_in_batch``) so that gradient accumulation and data parallelism
normalize exactly. The sums returned for logging are detached fp32 scalars. The entry point is
:class:`~.fused.FusedCEDistillLoss`; the NLL-only loops of RePAIR and DITTO are in :mod:`.nll`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .numerics import exp_, exp_into, log_softmax_, logits_into, renormalize_
from .specs import DistillSpec, SparseTeacher

# Elements per row block of the elementwise part: ~1 MiB fp32 per buffer on CPU, so that the
# ~20 elementwise passes run in cache instead of streaming [chunk, V] buffers through memory; on
# accelerators large blocks keep kernels big enough to hide launch overhead.
_BLOCK_ELEMENTS_CPU = 1 << 18
_BLOCK_ELEMENTS_ACCEL = 1 << 22


def _block_rows(vocab: int, device: torch.device) -> int:
    elements = _BLOCK_ELEMENTS_CPU if device.type == "cpu" else _BLOCK_ELEMENTS_ACCEL
    return max(1, elements // max(1, vocab))


@dataclass(frozen=True)
class NLLBlock:
    """Rows ``rows`` of a chunk as the NLL-like term sees them (fp32).

    * ``grad`` ``[r, V]``: ``softmax(z)`` on entry, the gradient of ``scale * term`` w.r.t. ``z`` on exit.
    * ``target`` ``[r]``, ``nll`` ``[r, 1]``: the gold ids and ``-log softmax(z)[target]``.
    * ``scale``: the term's weight (the pass's ``ce_scale``).
    * ``rows``: the block's rows within its chunk (to index the term's per-chunk state).
    * ``log_p_ids`` ``[r, k]``: ``log softmax(z)`` at the ids :meth:`NLLTerm.log_p_ids` asked for, or None.
    """

    grad: torch.Tensor
    target: torch.Tensor
    nll: torch.Tensor
    scale: float
    rows: slice
    log_p_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class DistillBlock:
    """One row block as a distillation formula sees it (fp32 ``[r, V]`` unless noted).

    * ``grad``: the gradient w.r.t. the student logits so far; the formula ADDS its own, i.e.
      ``scale * d(value) / d(z / tau)``.
    * ``log_p``, ``p``: the student's ``log_softmax(z / tau)`` and ``softmax(z / tau)`` (read only).
    * ``teacher``: the block's teacher logits (consumed: the formula may overwrite them), or its
      :class:`~.specs.SparseTeacher` rows when the pass was given a sparse teacher.
    * ``scratch``: two free ``[r, V]`` buffers.
    * ``spec``: the temperature and the formula's hyperparameters.
    * ``scale``: ``tau * distill_scale``; ``flush``: hand to :func:`~.numerics.exp_` (CPU).

    The formula returns the block's sum of the per-token divergence between the tempered
    distributions (without tau^2: the loop multiplies the chunk's sum by tau^2).
    """

    grad: torch.Tensor
    log_p: torch.Tensor
    p: torch.Tensor
    teacher: torch.Tensor | SparseTeacher
    scratch: tuple[torch.Tensor, torch.Tensor]
    spec: DistillSpec
    scale: float
    flush: bool


DistillFormula = Callable[[DistillBlock], torch.Tensor]


class NLLTerm:
    """The NLL-like term of the pass: cross-entropy. :class:`~.aux.AuxTerms` replaces it (ScaleGrad,
    TaiLr) or adds to it (unlikelihood). The loop calls :meth:`chunk` before each chunk,
    :meth:`block` per row block and :meth:`finish` once at the end."""

    def chunk(self, start: int, end: int) -> None:
        """Rows ``start:end`` of the pass come next (CE keeps no per-chunk state)."""

    def log_p_ids(self, rows: slice) -> torch.Tensor | None:
        """``[r, k]`` ids whose log-probabilities the block of ``rows`` needs (gathered by the
        loop before its in-place exp), or None."""
        return None

    def block(self, b: NLLBlock) -> None:
        """CE: ``b.grad`` becomes ``scale * (softmax(z) - onehot(target))``."""
        if b.scale != 1.0:
            b.grad.mul_(b.scale)
        b.grad[torch.arange(b.grad.shape[0], device=b.grad.device), b.target] -= b.scale

    def finish(self, ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum weighted by ce_scale, addend at its own weight)`` of the pass, from the CE sum."""
        return ce, ce.new_zeros(())

    def sums(self) -> dict[str, torch.Tensor]:
        """The term's detached sums for logging, besides ``ce`` (none for CE)."""
        return {}


@dataclass(frozen=True, eq=False)
class ChunkedPass:
    """What the loop needs besides the student's hidden states, head and targets.

    ``ce_scale`` / ``distill_scale``: the weights of the NLL-like sum and of the distillation sum in
    the differentiable total. The teacher is ``teacher_hidden`` ``[N, H_t]`` with ``teacher_head``
    ``[V, H_t]`` (chunked like the student), or ``sparse`` (rows sliced per chunk), or neither (CE
    alone, ``formula`` unused).
    """

    spec: DistillSpec
    ce_scale: float
    distill_scale: float
    chunk_size: int
    formula: DistillFormula | None = None
    teacher_hidden: torch.Tensor | None = None
    teacher_head: torch.Tensor | None = None
    sparse: SparseTeacher | None = None
    nll_term: NLLTerm = field(default_factory=NLLTerm)


def chunk_loss_and_grad(
    zs: torch.Tensor,
    target: torch.Tensor,
    *,
    job: ChunkedPass,
    teacher: torch.Tensor | SparseTeacher | None = None,
    block_rows: int | None = None,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ce_sum, distill_sum, zs)`` of one chunk: the sums and, in place of ``zs``, the gradient of
    ``ce_scale * NLL-like + distill_scale * D`` w.r.t. the logits.

    ``zs`` (fp32, ``[c, V]``) is overwritten with the gradient; ``teacher``, the chunk's teacher
    logits (fp32, ``[c, V]``, consumed) or :class:`~.specs.SparseTeacher` rows, or None for CE alone.
    The rows are processed in blocks of ``block_rows`` (default: ~1 MiB per buffer on CPU) with
    four ``[block_rows, V]`` fp32 scratch buffers (``scratch``, ``[4, >= block_rows, V]``, reused
    across calls by the caller), so that only ``zs`` and the teacher logits are chunk-sized and,
    on CPU, the elementwise passes run in cache. Per row ``CE = -log_softmax(zs)[target]``; the
    distillation sum is ``tau^2`` times the sum of ``job.formula``'s block values.
    """
    c, vocab = zs.shape
    if block_rows is None:
        block_rows = _block_rows(vocab, zs.device)
    block_rows = max(1, min(block_rows, c))
    distill = teacher is not None
    if distill and (scratch is None or scratch.shape[0] < 4 or scratch.shape[1] < block_rows
                    or scratch.shape[2] != vocab):
        scratch = zs.new_empty((4, block_rows, vocab))
    flush = zs.device.type == "cpu"
    term, tau = job.nll_term, job.spec.temperature
    s = tau * job.distill_scale
    ce_sum = zs.new_zeros(())
    distill_sum = zs.new_zeros(())
    for i in range(0, c, block_rows):
        rows = slice(i, min(i + block_rows, c))
        x, t = zs[rows], target[rows]
        r = x.shape[0]
        if distill:
            log_p, p, buf_a, buf_b = (buf[:r] for buf in scratch)
            log_softmax_(torch.div(x, tau, out=log_p))
            renormalize_(log_p, exp_into(p, log_p, flush))
        log_softmax_(x)
        picked = x.gather(1, t.unsqueeze(1))
        ids = term.log_p_ids(rows)
        log_p_ids = x.gather(1, ids) if ids is not None else None
        grad = exp_(x, flush)
        log_total = renormalize_(None, grad)
        nll = log_total - picked
        ce_sum += nll.sum()
        if log_p_ids is not None:
            log_p_ids.sub_(log_total)
        term.block(NLLBlock(grad, t, nll, job.ce_scale, rows, log_p_ids))
        if distill:
            rows_t = teacher.rows(i, rows.stop) if isinstance(teacher, SparseTeacher) else teacher[rows]
            distill_sum += job.formula(DistillBlock(grad, log_p, p, rows_t, (buf_a, buf_b), job.spec, s, flush))
    return ce_sum, distill_sum * tau**2, zs


class FusedCEDistill(torch.autograd.Function):
    """The chunked pass as an autograd function: ``(total, ce_sum, distill_sum)``, gradients in
    forward (:func:`chunk_loss_and_grad` per chunk); only ``total`` is differentiable."""

    @staticmethod
    def forward(ctx, h_s, w_s, target, job: ChunkedPass):
        n, vocab = h_s.shape[0], w_s.shape[0]
        dev = h_s.device
        h_t, w_t, chunk_size = job.teacher_hidden, job.teacher_head, job.chunk_size
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
        distill = h_t is not None or job.sparse is not None
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
            elif job.sparse is not None:
                zt = job.sparse.rows(start, end, dev)
            job.nll_term.chunk(start, end)
            ce_c, distill_c, grad = chunk_loss_and_grad(zs, target[start:end], job=job, teacher=zt,
                                                        block_rows=block_rows, scratch=scratch)
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
        nll_like, added = job.nll_term.finish(ce_total)
        total = job.ce_scale * nll_like + job.distill_scale * distill_total + added
        ctx.mark_non_differentiable(ce_total, distill_total)
        return total, ce_total, distill_total

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_distill):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.head_dtype)
        return grad_h, grad_w, None, None
