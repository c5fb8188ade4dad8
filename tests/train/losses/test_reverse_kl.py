"""A new distillation loss is its per-block formula plus its dense reference: reverse KL,
``tau^2 * sum_v p(v) log(p(v) / q(v))`` (p the student's, q the teacher's tempered distribution),
checked on the shared grid of loss_grid.py like the losses of the package."""

import math

import pytest
import torch
from loss_grid import DTYPES, IGNORED, SHAPE_IDS, SHAPES, assert_grads, assert_values, leaves, problem

from axolotl_focus.train.losses import DistillBlock, DistillSpec, FusedCEDistillLoss, reference_ce_distill
from axolotl_focus.train.losses.base import ChunkedPass, chunk_loss_and_grad
from axolotl_focus.train.losses.numerics import log_softmax_, reference_float


# -- the example: the formula of one row block and the dense reference ------------------------
def reverse_kl_block(b: DistillBlock) -> torch.Tensor:
    """``f = sum_v p (log p - log q)`` per row; adds ``scale * df/d(z / tau) = scale * p (log p - log q - f)``."""
    log_q = log_softmax_(b.teacher.div_(b.spec.temperature))  # the block's teacher logits are ours to overwrite
    ratio = torch.sub(b.log_p, log_q, out=b.scratch[0])
    per_row = torch.linalg.vecdot(b.p, ratio)
    b.grad.addcmul_(b.p, ratio.sub_(per_row.unsqueeze(1)), value=b.scale)
    return per_row.sum()


def reference_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: DistillSpec):
    """Dense per-token reverse KL ``[N]``, differentiable w.r.t. the student logits (autograd)."""
    tau = spec.temperature
    log_p = torch.log_softmax(reference_float(student_logits) / tau, -1)
    log_q = torch.log_softmax(reference_float(teacher_logits) / tau, -1)
    return tau**2 * (log_p.exp() * (log_p - log_q)).sum(-1)
# -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("ignored", IGNORED)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_grid_matches_dense_reference(shape, dtype, tol, ignored, tau):
    x, spec = problem(shape, dtype, ignored), DistillSpec(temperature=tau)
    hs, ws = leaves(x.hs, x.ws)
    zs, valid = hs @ ws.T, x.valid
    ce = reference_ce_distill(zs, None, x.labels, DistillSpec("none"))[0]
    d = reference_reverse_kl(zs[valid], (x.ht @ x.wt.T)[valid], spec).sum()
    want = 0.5 * ce + 0.5 * d
    want.backward()
    hf, wf = leaves(x.hs, x.ws)
    loss = FusedCEDistillLoss(spec, ce_weight=0.5, distill_weight=0.5, chunk_size=shape[4], formula=reverse_kl_block)
    total, sums = loss(hf[valid], wf, x.labels[valid], teacher_hidden=x.ht[valid], teacher_head=x.wt)
    total.backward()
    assert_values({"total": total, **sums}, {"total": want, "ce": ce, "distill": d}, tol)
    assert_grads([hf.grad, wf.grad], [hs.grad, ws.grad], tol)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_grid_chunk_kernel_float64(shape):
    """The closed-form gradient of the formula equals autograd through the reference to 1e-10."""
    x, spec = problem(shape, torch.float64, "none"), DistillSpec(temperature=2.0)
    zs, zt = x.hs @ x.ws.T, x.ht @ x.wt.T
    job = ChunkedPass(spec, 0.0, 1.0, zs.shape[0], reverse_kl_block)
    _, d, grad = chunk_loss_and_grad(zs.clone(), x.labels, job=job, teacher=zt.clone())
    z = zs.clone().requires_grad_()
    ref = reference_reverse_kl(z, zt, spec).sum()
    ref.backward()
    assert d.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, z.grad, rtol=1e-10, atol=1e-13)


def test_reverse_kl_by_hand_on_two_token_vocab():
    """V = 2, tau = 2: tau^2 * [p log(p/q) + (1-p) log((1-p)/(1-q))]."""
    tau, zs, zt = 2.0, torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    p, q = 1 / (1 + math.exp(1.0 / tau)), 1 / (1 + math.exp(-2.0 / tau))
    expected = tau**2 * (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    loss = FusedCEDistillLoss(DistillSpec(temperature=tau), ce_weight=0.0, formula=reverse_kl_block)
    _, sums = loss(zs, torch.eye(2), torch.tensor([0]), teacher_hidden=zt, teacher_head=torch.eye(2))
    assert reference_reverse_kl(zs, zt, DistillSpec(temperature=tau)).item() == pytest.approx(expected, rel=1e-6)
    assert sums["distill"].item() == pytest.approx(expected, rel=1e-6)
