"""What the fused losses are given: the distillation hyperparameters (:class:`DistillSpec`), a
sparse teacher (:class:`SparseTeacher`, top-k ids + tail mass per valid token), and the label that
marks a position without a target (:data:`IGNORE_INDEX`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...loss_settings import DISTILL_MODES  # the modes' one definition, shared with the config

IGNORE_INDEX = -100


@dataclass(frozen=True)
class DistillSpec:
    """Which distillation term to add to CE, with its hyperparameters (paper defaults).

    ``mode`` picks the per-block formula (FOCUS or KD) unless the loss is given its own
    (``FusedCEDistillLoss(formula=...)``, which then reads ``temperature`` and what else it needs);
    ``"none"`` is CE alone, whatever the formula.
    """

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


def check_temperature(sparse: SparseTeacher, spec: DistillSpec) -> None:
    """Raise ValueError unless the sparse teacher's ``logq`` were taken at the loss's temperature."""
    if sparse.temperature is not None and not math.isclose(sparse.temperature, spec.temperature, rel_tol=1e-6):
        raise ValueError(f"sparse teacher temperature {sparse.temperature} differs from the loss's "
                         f"{spec.temperature}: its logq are log softmax(z / tau) at the training tau")
