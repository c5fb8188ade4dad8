"""Training losses: cross-entropy plus token-level distillation (FOCUS or plain KD), the paper's
baseline terms, the RePAIR margin and DITTO, each fused over token chunks beside its dense reference.

One module per formula, each holding its per-chunk block and its dense autograd reference:

* :mod:`.base`: the chunking every fused loss shares (chunk loop, autograd functions, in-place
  numerics, block sizes) and the shared dataclasses; the sums / normalization contract.
* :mod:`.distill`: FOCUS / KD against a dense teacher.
* :mod:`.distill_sparse`: the bucketed FOCUS / KD against a sparse (top-k + tail) teacher.
* :mod:`.aux`: unlikelihood, ScaleGrad, TaiLr.
* :mod:`.fused`: the entry points of the fused CE + distillation (+ baseline terms) pass.
* :mod:`.margin`: RePAIR's margin loss and the chunked per-token NLL.
* :mod:`.ditto`: DITTO's self-reinforcement penalty.

Importing this package needs only torch (never axolotl).
"""

from .aux import UL_EPS, AuxSpec, SeenTokens, reference_aux_terms, reference_seen_mask, seen_tokens
from .base import AUX_TERMS, DISTILL_MODES, IGNORE_INDEX, DistillSpec, LossSums, SparseTeacher
from .distill import focus_weights, reference_ce_distill, reference_distill_per_token
from .distill_sparse import reference_ce_distill_sparse, reference_sparse_distill_per_token, sparse_teacher_from_logits
from .ditto import DITTO_FLOOR, ditto_loss, ditto_previous_index, fused_ditto_loss, reference_ditto
from .fused import fused_ce_distill, fused_ce_distill_aux
from .margin import chunked_token_nll, repair_margin_loss

__all__ = [
    "AUX_TERMS", "DISTILL_MODES", "DITTO_FLOOR", "IGNORE_INDEX", "UL_EPS",
    "AuxSpec", "DistillSpec", "LossSums", "SeenTokens", "SparseTeacher",
    "chunked_token_nll", "ditto_loss", "ditto_previous_index", "focus_weights", "fused_ce_distill",
    "fused_ce_distill_aux", "fused_ditto_loss", "reference_aux_terms", "reference_ce_distill",
    "reference_ce_distill_sparse", "reference_ditto", "reference_distill_per_token", "reference_seen_mask",
    "reference_sparse_distill_per_token", "repair_margin_loss", "seen_tokens", "sparse_teacher_from_logits",
]
