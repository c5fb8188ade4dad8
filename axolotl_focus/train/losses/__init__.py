"""Training losses: cross-entropy plus token-level distillation (FOCUS or plain KD), the paper's
baseline terms, the RePAIR margin and DITTO, each fused over token chunks beside its dense reference.

The chunk loop owns everything the losses share; a loss is one per-block formula beside its dense
autograd reference:

* :mod:`.base`: the chunk loop of the CE + distillation pass and the two per-block dataclasses its
  hooks take (:class:`DistillBlock`, ``NLLBlock``); the sums / normalization contract.
* :mod:`.fused`: the entry point, :class:`FusedCEDistillLoss` (an ``nn.Module`` holding the
  hyperparameters), returning a :class:`LossResult` (total + sums).
* :mod:`.distill`: FOCUS / KD against a dense teacher.
* :mod:`.distill_sparse`: the bucketed FOCUS / KD against a sparse (top-k + tail) teacher.
* :mod:`.aux`: unlikelihood, ScaleGrad, TaiLr (the pass's NLL-like term).
* :mod:`.nll`: the per-token NLL loops; :mod:`.margin`: RePAIR's margin loss; :mod:`.ditto`: DITTO's
  self-reinforcement penalty.
* :mod:`.numerics`: the in-place numerics; :mod:`.specs`: :class:`DistillSpec`, :class:`SparseTeacher`.

Importing this package needs only torch (never axolotl).
"""

from .aux import AuxSpec, reference_aux_terms, seen_tokens
from .base import DistillBlock
from .distill import focus_weights, reference_ce_distill, reference_distill_per_token
from .distill_sparse import reference_ce_distill_sparse, reference_sparse_distill_per_token, sparse_teacher_from_logits
from .ditto import ditto_loss, ditto_previous_index, fused_ditto_loss, reference_ditto
from .fused import FusedCEDistillLoss, LossResult
from .margin import chunked_token_nll, repair_margin_loss
from .specs import DISTILL_MODES, IGNORE_INDEX, DistillSpec, SparseTeacher

__all__ = [
    "DISTILL_MODES", "IGNORE_INDEX",
    "AuxSpec", "DistillBlock", "DistillSpec", "FusedCEDistillLoss", "LossResult", "SparseTeacher",
    "chunked_token_nll", "ditto_loss", "ditto_previous_index", "focus_weights", "fused_ditto_loss",
    "reference_aux_terms", "reference_ce_distill", "reference_ce_distill_sparse", "reference_ditto",
    "reference_distill_per_token", "reference_sparse_distill_per_token", "repair_margin_loss", "seen_tokens",
    "sparse_teacher_from_logits",
]
