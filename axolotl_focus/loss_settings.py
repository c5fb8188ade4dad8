"""The loss settings the config names and the training losses read, without pydantic or torch: the
distillation modes (``focus_distill``) and :class:`AuxSpec`, the baseline terms of the fused pass
(built from ``focus_aux_losses`` by :meth:`axolotl_focus.config.FocusAuxLosses.aux_spec`, read by
:mod:`axolotl_focus.train.losses`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["DISTILL_MODES", "AuxSpec", "DistillMode"]

DistillMode = Literal["focus", "kd", "none"]
DISTILL_MODES = get_args(DistillMode)


@dataclass(frozen=True)
class AuxSpec:
    """Baseline terms computed inside the fused pass; ``None`` switches a term off.

    * ``unlikelihood``: alpha, ADDS ``alpha * sum_{c in C_t} -log(1 - p(c))`` (Welleck et al., 2019);
      C_t = distinct earlier targets of the same sequence, minus y_t.
    * ``scalegrad``: gamma, REPLACES the NLL by ``-log p~(y_t)``, ``p~ = gamma * p`` on tokens not
      seen earlier in the sequence, renormalized (Lin et al., 2021).
    * ``tailr``: ``(gamma, min_weight)``, REPLACES the NLL by ``w * NLL``,
      ``w = sg(clamp(p / (gamma + (1 - gamma) p), min_weight, 1))`` (Ji et al., 2023).
    """

    unlikelihood: float | None = None
    scalegrad: float | None = None
    tailr: tuple[float, float] | None = None

    def __post_init__(self):
        if self.scalegrad is not None and self.tailr is not None:
            raise ValueError("focus_aux_losses: scalegrad and tailr both replace the NLL term; choose one")
        if self.scalegrad is not None and not 0 < self.scalegrad <= 1:
            raise ValueError(f"focus_aux_losses.scalegrad.gamma must be in (0, 1], got {self.scalegrad}")
        if self.tailr is not None and not (0 < self.tailr[0] <= 1 and 0 <= self.tailr[1] <= 1):
            raise ValueError(f"focus_aux_losses.tailr: gamma in (0, 1] and min_weight in [0, 1], got {self.tailr}")
        if self.unlikelihood is not None and self.unlikelihood < 0:
            raise ValueError(f"focus_aux_losses.unlikelihood.alpha must be >= 0, got {self.unlikelihood}")

    @property
    def needs_seen(self) -> bool:
        return self.unlikelihood is not None or self.scalegrad is not None
