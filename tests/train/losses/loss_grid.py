"""The grid every fused loss is tested on against its dense reference (one test per loss file), in the
style of Liger-Kernel's ``test/chunked_loss/test_jsd_loss.py``: shapes with odd sizes, dtypes with
their tolerances, and patterns of ignored positions (label -100).

* :data:`SHAPES` ``(batch, time, hidden, vocab, chunk)``: one chunk; Liger's odd (3, 47, 31, 123)
  in chunks of 19; and V = 5003, where a CPU row block is 52 rows, so a chunk of 64 is two blocks.
* :data:`DTYPES`: the inputs' dtype with the tolerance of the fused loss against the dense reference
  on the same inputs. Both compute in fp32 from the same logits (bf16 ones for bf16 inputs), so the
  values agree to fp32 rounding in either dtype; bf16 gradients differ by the rounding of their
  bf16 products, up to 1 bf16 ulp (2^-7) of the largest entry where measured: the tolerance is 2.
  float64 is tested where it is meaningful, in the chunk kernels (the fused pass computes in fp32).
* :data:`IGNORED`: none, every 4th position, a prompt and right padding per row, all (no token).

:func:`problem` builds seeded student / teacher hidden states and heads, labels and each position's
row; the fused losses take the valid rows ``hidden[labels != -100]``, the references the labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

SHAPES = [(2, 8, 16, 50, 1024), (3, 47, 31, 123, 19), (2, 61, 8, 5003, 64)]
SHAPE_IDS = ["one-chunk", "odd-3x47x31x123", "two-blocks-V5003"]


@dataclass(frozen=True)
class Tol:
    """Tolerances of one dtype: values (relative, absolute) and gradients (relative, absolute)."""

    value_rtol: float
    value_atol: float
    grad_rtol: float
    grad_atol: float


DTYPES = [
    pytest.param(torch.float32, Tol(1e-5, 1e-5, 1e-5, 1e-5), id="fp32"),
    pytest.param(torch.bfloat16, Tol(1e-5, 1e-5, 1.6e-2, 1.6e-2), id="bf16"),
]
IGNORED = ["none", "strided", "prompt-padding", "all"]


@dataclass(frozen=True)
class Problem:
    hs: torch.Tensor  # [B*T, H] student hidden states
    ws: torch.Tensor  # [V, H] student head
    ht: torch.Tensor  # [B*T, H] teacher hidden states
    wt: torch.Tensor  # [V, H] teacher head
    labels: torch.Tensor  # [B*T], -100 where ignored
    row: torch.Tensor  # [B*T] the row of each position

    @property
    def valid(self) -> torch.Tensor:
        return self.labels != -100


def problem(shape, dtype=torch.float32, ignored="strided", seed=0) -> Problem:
    """Seeded inputs of ``shape`` in ``dtype``: logits of standard deviation ~2 (student) and ~3
    (teacher), labels with the ``ignored`` pattern of -100."""
    b, t, h, v, _ = shape
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(b * t, h, generator=g)
    ws = torch.randn(v, h, generator=g) * (2 / h**0.5)
    ht = torch.randn(b * t, h, generator=g)
    wt = torch.randn(v, h, generator=g) * (3 / h**0.5)
    labels = torch.randint(0, v, (b, t), generator=g)
    if ignored == "strided":
        labels.view(-1)[::4] = -100
    elif ignored == "prompt-padding":
        for r in range(b):
            labels[r, : 2 + r] = -100
            labels[r, t - 3 * r:] = -100
    elif ignored == "all":
        labels[:] = -100
    row = torch.arange(b).repeat_interleave(t)
    return Problem(hs.to(dtype), ws.to(dtype), ht.to(dtype), wt.to(dtype), labels.flatten(), row)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Fresh leaf copies that require grad."""
    return [x.detach().clone().requires_grad_() for x in tensors]


def assert_values(got: dict, want: dict, tol: Tol) -> None:
    """The same keys, each value within ``tol``."""
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key].float(), want[key].float().detach(), rtol=tol.value_rtol,
                                   atol=tol.value_atol, msg=lambda m, key=key: f"{key}: {m}")


def assert_grads(got: list[torch.Tensor], want: list[torch.Tensor], tol: Tol) -> None:
    """Gradients of the same dtype, each within ``tol`` (absolute: relative to its largest entry)."""
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        scale = float(b.float().abs().max()) if b.numel() else 1.0
        torch.testing.assert_close(a.float(), b.float(), rtol=tol.grad_rtol, atol=tol.grad_atol * max(scale, 1e-3))
