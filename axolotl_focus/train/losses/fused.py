"""The entry point of the fused CE + distillation pass: :class:`FusedCEDistillLoss`, an
``nn.Module`` that holds the hyperparameters and returns one :class:`LossResult`.

It checks the inputs, picks the teacher's form and the per-block formulas and hands them to the
chunk loop of :mod:`.base` (:class:`~.base.FusedCEDistill`), which returns sums over the valid
tokens given; see there for the chunking and normalization contract. The distillation formula is
FOCUS or KD by ``spec.mode`` (:func:`focus_kd_block`: :func:`~.distill.dense_distill_block`
against teacher logits, :func:`~.distill_sparse.sparse_distill_block` against a sparse teacher),
or the one given as ``formula``; the NLL-like term is CE, or :class:`~.aux.AuxTerms` with ``aux``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .aux import AuxSpec, AuxTerms
from .base import ChunkedPass, DistillBlock, DistillFormula, FusedCEDistill, NLLTerm
from .distill import dense_distill_block
from .distill_sparse import sparse_distill_block
from .specs import DistillSpec, SparseTeacher, check_temperature


class LossResult(NamedTuple):
    """What the fused pass returns: ``total``, the differentiable loss, and ``sums``, detached fp32
    sums over the valid tokens: ``ce`` (plain NLL, always), ``distill`` (0 without a teacher) and
    ``ul`` / ``scalegrad`` / ``tailr`` for the configured baseline terms."""

    total: torch.Tensor
    sums: dict[str, torch.Tensor]


def focus_kd_block(b: DistillBlock) -> torch.Tensor:
    """FOCUS or KD (``b.spec.mode``) of one row block, against teacher logits or sparse teacher rows."""
    if isinstance(b.teacher, SparseTeacher):
        return sparse_distill_block(b)
    return dense_distill_block(b)


class FusedCEDistillLoss(torch.nn.Module):
    """``scale * (ce_weight * NLL_sum + distill_weight * D_sum + alpha_UL * UL_sum)`` over the given
    (valid) token rows, in token chunks with gradients in forward.

    Hyperparameters:
        spec: the distillation term (:class:`~.specs.DistillSpec`; mode ``"none"``: CE alone).
        aux: the baseline terms (:class:`~.aux.AuxSpec`): ScaleGrad or TaiLr replace CE as the
            NLL-like sum, unlikelihood adds ``aux.unlikelihood * scale * UL_sum``.
        ce_weight / distill_weight: the weights of the NLL-like and of the distillation sums.
        chunk_size: token rows per chunk (peak memory ``O(chunk_size x V)``).
        formula: the per-block distillation formula (default: :func:`focus_kd_block`); a new
            divergence is such a function (see :class:`~.base.DistillBlock`) plus its reference.
    """

    def __init__(self, spec: DistillSpec | None = None, *, aux: AuxSpec | None = None, ce_weight: float = 1.0,
                 distill_weight: float = 1.0, chunk_size: int = 1024, formula: DistillFormula | None = None):
        super().__init__()
        self.spec = spec if spec is not None else DistillSpec()
        self.aux = aux
        self.ce_weight, self.distill_weight = ce_weight, distill_weight
        self.chunk_size = int(chunk_size)
        self.formula = formula or focus_kd_block

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_head: torch.Tensor,
        targets: torch.Tensor,
        *,
        teacher_hidden: torch.Tensor | None = None,
        teacher_head: torch.Tensor | None = None,
        teacher: SparseTeacher | None = None,
        sequence: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> LossResult:
        """The loss of ``N`` valid token rows.

        Args:
            student_hidden: ``[N, H]`` final (normed) student hidden states of the valid positions.
            student_head: ``[V, H]`` student lm_head weight (may or may not require grad).
            targets: ``[N]`` next-token ids.
            teacher_hidden / teacher_head: the teacher's counterparts (no grad), or None.
            teacher: a :class:`~.specs.SparseTeacher` of the N rows instead of teacher_hidden /
                teacher_head (both None then): the bucketed objective of :mod:`.distill_sparse`.
            sequence: ``[N]`` contiguous sequence ids (default: one sequence); they delimit the
                "earlier targets" of unlikelihood and ScaleGrad.
            scale: the normalization, e.g. 1 / the optimizer step's valid tokens.
        """
        spec = self.spec
        if teacher is not None:
            if teacher_hidden is not None or teacher_head is not None:
                raise ValueError("give the teacher either as teacher_hidden/teacher_head or as a sparse teacher, "
                                 "not both")
            teacher.validate(student_hidden.shape[0], student_head.shape[0])
            check_temperature(teacher, spec)
            if spec.mode == "none":
                teacher = None
        if teacher_hidden is None or spec.mode == "none":
            teacher_hidden = teacher_head = None
        elif teacher_head.shape[0] != student_head.shape[0]:
            raise ValueError(
                f"teacher vocabulary ({teacher_head.shape[0]}) differs from the student's "
                f"({student_head.shape[0]}): distillation needs one shared vocabulary"
            )
        nll_term = AuxTerms(self.aux, scale, targets, sequence) if self.aux is not None else NLLTerm()
        job = ChunkedPass(spec, float(self.ce_weight * scale), float(self.distill_weight * scale), self.chunk_size,
                          self.formula, teacher_hidden, teacher_head, teacher, nll_term)
        total, ce, distill = FusedCEDistill.apply(student_hidden, student_head, targets, job)
        return LossResult(total, {"ce": ce, "distill": distill, **nll_term.sums()})
