"""The fused CE + distillation pass, the entry points: :func:`fused_ce_distill` (CE plus FOCUS / KD
against a dense or a sparse teacher) and :func:`fused_ce_distill_aux` (the same with the baseline
terms of :mod:`.aux`).

They check the inputs, choose the teacher's form and hand the per-row-block formulas
(:data:`FORMULAS`: :func:`~.distill.dense_distill_block`, :func:`~.distill_sparse.sparse_distill_block`,
:func:`~.aux.aux_block`) to the chunk loop of :mod:`.base` (:class:`~.base.FusedCEDistill`), which
returns sums over the valid tokens given; see there for the chunking and normalization contract.
"""

from __future__ import annotations

import torch

from .aux import AuxSpec, aux_block, seen_tokens
from .base import AUX_TERMS, ChunkFormulas, DistillSpec, FusedCEDistill, SparseTeacher, check_temperature
from .distill import dense_distill_block
from .distill_sparse import sparse_distill_block

FORMULAS = ChunkFormulas(dense_distill=dense_distill_block, sparse_distill=sparse_distill_block, aux=aux_block)


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
            (both None then): the bucketed objective of :mod:`.distill_sparse`.
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
    total, ce, distill, aux_sums = FusedCEDistill.apply(
        student_hidden, student_head, teacher_hidden, teacher_head, targets, spec,
        float(ce_scale), float(distill_scale), int(chunk_size), aux, seen, ul_scale, teacher, FORMULAS,
    )
    sums = {"ce": ce, "distill": distill}
    if aux is not None:
        on = (aux.unlikelihood is not None, aux.scalegrad is not None, aux.tailr is not None)
        sums.update({name: aux_sums[k] for k, name in enumerate(AUX_TERMS) if on[k]})
    return total, sums
