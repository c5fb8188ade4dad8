"""FOCUS / KD / CE: fused chunked loss against the dense reference (on the shared grid of
loss_grid.py) and against closed forms."""

import math

import pytest
import torch
from loss_grid import DTYPES, IGNORED, SHAPE_IDS, SHAPES, assert_grads, assert_values, leaves, problem

from axolotl_focus.train.losses import (
    DistillSpec,
    FusedCEDistillLoss,
    focus_weights,
    reference_ce_distill,
    reference_distill_per_token,
)
from axolotl_focus.train.losses.base import ChunkedPass, chunk_loss_and_grad
from axolotl_focus.train.losses.fused import focus_kd_block


def _chunk_loss_and_grad(zs, teacher, target, spec, ce_scale, distill_scale, block_rows=None):
    """One chunk of the fused pass: ``(ce_sum, distill_sum, gradient w.r.t. zs)``."""
    job = ChunkedPass(spec, ce_scale, distill_scale, zs.shape[0], focus_kd_block)
    return chunk_loss_and_grad(zs, target, job=job, teacher=teacher, block_rows=block_rows)


def _fused(hs, ws, ht, wt, labels, spec, ce_w=1.0, d_w=1.0, chunk_size=1024):
    """The fused pass on the given rows: ``(total, ce_sum, distill_sum)``."""
    loss = FusedCEDistillLoss(spec, ce_weight=ce_w, distill_weight=d_w, chunk_size=chunk_size)
    total, sums = loss(hs, ws, labels, teacher_hidden=ht, teacher_head=wt)
    return total, sums["ce"], sums["distill"]


def _zipf_logits(n, v, s=1.2, seed=0):
    """Peaked teacher logits: log of a Zipf law over a random permutation per row, plus noise."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(v, generator=g) for _ in range(n)]).double() + 1
    return -s * ranks.log() + 0.01 * torch.randn(n, v, generator=g, dtype=torch.float64)


def _problem(n=37, h=16, v=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=dtype)
    ws = torch.randn(v, h, generator=g, dtype=dtype) * 0.5
    ht = torch.randn(n, h, generator=g, dtype=dtype)
    wt = torch.randn(v, h, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    return hs, ws, ht, wt, labels


@pytest.mark.parametrize("mode", ["focus", "kd", "none"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_matches_reference_values_and_grads(mode, chunk, temperature):
    spec = DistillSpec(mode=mode, temperature=temperature, beta=15.0, gamma=1.0)
    hs, ws, ht, wt, labels = _problem()
    ce_w, d_w = 0.7, 0.3

    hs_r, ws_r = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ce, distill = reference_ce_distill(hs_r @ ws_r.T, ht @ wt.T, labels, spec)
    (ce_w * ce + d_w * distill).backward()

    hs_f, ws_f = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    valid = labels != -100
    total, ce_f, d_f = _fused(hs_f[valid], ws_f, ht[valid], wt, labels[valid], spec, ce_w, d_w, chunk_size=chunk)
    total.backward()

    assert ce_f.item() == pytest.approx(ce.item(), rel=1e-5)
    assert d_f.item() == pytest.approx(distill.item(), rel=1e-5, abs=1e-6)
    assert total.item() == pytest.approx((ce_w * ce + d_w * distill).item(), rel=1e-5)
    torch.testing.assert_close(hs_f.grad, hs_r.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ws_f.grad, ws_r.grad, rtol=1e-5, atol=1e-5)
    assert hs_f.grad[~valid].abs().sum() == 0  # ignored positions get no gradient


HYPER = [pytest.param(1.0, 0.5, 0.5, id="tau1"), pytest.param(2.0, 1.0, 0.05, id="tau2"),
         pytest.param(0.5, 0.0, 1.0, id="tau0.5-no-ce")]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("ignored", IGNORED)
@pytest.mark.parametrize("mode", ["focus", "kd", "none"])
@pytest.mark.parametrize("tau, ce_w, d_w", HYPER)
def test_grid_matches_dense_reference(shape, dtype, tol, ignored, mode, tau, ce_w, d_w):
    """Values (total, CE, distillation) and gradients (hidden, head) against the dense reference."""
    x, spec = problem(shape, dtype, ignored), DistillSpec(mode, tau)
    hs, ws = leaves(x.hs, x.ws)
    ce, d = reference_ce_distill(hs @ ws.T, x.ht @ x.wt.T, x.labels, spec)
    want = ce_w * ce + d_w * d
    want.backward()
    hf, wf = leaves(x.hs, x.ws)
    loss = FusedCEDistillLoss(spec, ce_weight=ce_w, distill_weight=d_w, chunk_size=shape[4])
    total, sums = loss(hf[x.valid], wf, x.labels[x.valid], teacher_hidden=x.ht[x.valid], teacher_head=x.wt)
    total.backward()
    assert_values({"total": total, **sums}, {"total": want, "ce": ce, "distill": d}, tol)
    assert_grads([hf.grad, wf.grad], [hs.grad, ws.grad], tol)
    assert hf.grad[~x.valid].abs().sum() == 0  # ignored positions get no gradient


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("mode", ["focus", "kd"])
def test_grid_chunk_kernel_float64(shape, mode):
    """The chunk kernel in float64 (the V = 5003 shape in three row blocks): its sums and closed-form
    gradient equal autograd through the float64 reference to 1e-10."""
    x, spec = problem(shape, torch.float64, "none"), DistillSpec(mode, 2.0)
    zs, zt = x.hs @ x.ws.T, x.ht @ x.wt.T
    ce, d, grad = _chunk_loss_and_grad(zs.clone(), zt.clone(), x.labels, spec, 0.7, 0.3)
    z = zs.clone().requires_grad_()
    ce_ref, d_ref = reference_ce_distill(z, zt, x.labels, spec)
    (0.7 * ce_ref + 0.3 * d_ref).backward()
    assert grad.dtype == torch.float64
    assert ce.item() == pytest.approx(ce_ref.item(), rel=1e-12)
    assert d.item() == pytest.approx(d_ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, z.grad, rtol=1e-10, atol=1e-13)


def test_frozen_head_and_upstream_scale():
    """LoRA case: lm_head frozen; the incoming gradient scales the result linearly."""
    spec = DistillSpec()
    hs, ws, ht, wt, labels = _problem()
    valid = labels != -100
    h1 = hs[valid].clone().requires_grad_()
    total, _, _ = _fused(h1, ws, ht[valid], wt, labels[valid], spec, chunk_size=5)
    (3.0 * total).backward()
    h2 = hs[valid].clone().requires_grad_()
    ce, d = reference_ce_distill(h2 @ ws.T, ht[valid] @ wt.T, labels[valid], spec)
    (3.0 * (ce + d)).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("teacher", ["random", "zipf"])
def test_appendix_a_gradient_identity(teacher):
    """Paper appendix A (tau = 1): d FOCUS / d student logits = Z (p - q~), Z = sum w q, q~ = w q / Z."""
    n, v, beta, gamma = 12, 200, 15.0, 1.0
    g = torch.Generator().manual_seed(1)
    zt = torch.randn(n, v, generator=g, dtype=torch.float64) * 3 if teacher == "random" else _zipf_logits(n, v)
    zs = torch.randn(n, v, generator=g, dtype=torch.float64)
    spec = DistillSpec(mode="focus", temperature=1.0, beta=beta, gamma=gamma)

    q = torch.softmax(zt, -1)
    p = torch.softmax(zs, -1)
    w = q.pow(beta) + (1 - q).pow(gamma)
    z_norm = (w * q).sum(-1, keepdim=True)
    closed_form = z_norm * (p - w * q / z_norm)

    zs_ref = zs.clone().requires_grad_()
    reference_distill_per_token(zs_ref, zt, spec).double().sum().backward()
    torch.testing.assert_close(zs_ref.grad, closed_form.to(zs_ref.grad.dtype), rtol=1e-5, atol=1e-6)

    # The fused kernel with an identity lm_head: hidden states are the logits themselves.
    zs_f = zs.float().clone().requires_grad_()
    labels = torch.zeros(n, dtype=torch.long)
    _fused(zs_f, torch.eye(v), zt.float(), torch.eye(v), labels, spec, ce_w=0.0)[0].backward()
    torch.testing.assert_close(zs_f.grad, closed_form.float(), rtol=1e-4, atol=1e-6)
    if teacher == "zipf":  # peaked teacher: the reweighting really moves mass (q~ != q)
        assert (w * q / z_norm - q).abs().max() > 1e-2


def test_focus_with_beta_gamma_zero_is_twice_kd():
    """w = q^0 + (1-q)^0 = 2 everywhere, so FOCUS(beta=gamma=0) = 2 x KD, values and gradients."""
    hs, ws, ht, wt, labels = _problem(seed=3)
    valid = labels != -100
    results = []
    for spec in (DistillSpec("focus", 2.0, 0.0, 0.0), DistillSpec("kd", 2.0)):
        h = hs[valid].clone().requires_grad_()
        total, _, d = _fused(h, ws, ht[valid], wt, labels[valid], spec, ce_w=0.0, chunk_size=8)
        total.backward()
        results.append((d, h.grad))
    (d_focus, g_focus), (d_kd, g_kd) = results
    assert d_focus.item() == pytest.approx(2 * d_kd.item(), rel=1e-5)
    torch.testing.assert_close(g_focus, 2 * g_kd, rtol=1e-5, atol=1e-6)


def test_kd_closed_form_on_two_token_vocab():
    """KD on V = 2 by hand: tau^2 * [q log(q/p) + (1-q) log((1-q)/(1-p))]."""
    tau = 2.0
    zs = torch.tensor([[0.0, 1.0]])
    zt = torch.tensor([[2.0, 0.0]])
    p = 1 / (1 + math.exp(-(0.0 - 1.0) / tau))
    q = 1 / (1 + math.exp(-(2.0 - 0.0) / tau))
    expected = tau**2 * (q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p)))
    got = reference_distill_per_token(zs, zt, DistillSpec("kd", tau)).item()
    fused = _fused(zs, torch.eye(2), zt, torch.eye(2), torch.tensor([0]), DistillSpec("kd", tau), 0.0)[2]
    assert got == pytest.approx(expected, rel=1e-6)
    assert fused.item() == pytest.approx(expected, rel=1e-6)
    # and FOCUS on the same numbers, weights by hand
    wq = [x * (x**15 + (1 - x)) for x in (q, 1 - q)]
    focus_expected = tau**2 * (wq[0] * math.log(q / p) + wq[1] * math.log((1 - q) / (1 - p)))
    got_focus = reference_distill_per_token(zs, zt, DistillSpec("focus", tau, 15.0, 1.0)).item()
    assert got_focus == pytest.approx(focus_expected, rel=1e-6)


def test_focus_weights_formula():
    q = torch.tensor([0.0, 0.1, 0.8, 1.0])
    torch.testing.assert_close(focus_weights(q, 15.0, 1.0), q**15 + (1 - q))
    assert focus_weights(q, 0.0, 0.0).tolist() == [2.0, 2.0, 2.0, 2.0]


def test_teacher_minus_inf_logits_do_not_produce_nan():
    """A teacher logit of -inf (masked token) has q = 0 and contributes 0, never NaN."""
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    zt[:, 3] = float("-inf")
    target = torch.randint(0, 10, (8,), generator=g)
    spec = DistillSpec()
    _, d, grad = _chunk_loss_and_grad(zs.clone(), zt.clone(), target, spec, 1.0, 1.0)
    zt_finite = zt.clone()
    zt_finite[:, 3] = -1e4
    _, d_ref, grad_ref = _chunk_loss_and_grad(zs.clone(), zt_finite, target, spec, 1.0, 1.0)
    assert torch.isfinite(d) and torch.isfinite(grad).all()
    assert d.item() == pytest.approx(d_ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, grad_ref)


def test_vocab_mismatch_is_a_clear_error():
    hs, ws, ht, wt, labels = _problem()
    with pytest.raises(ValueError, match="vocabulary"):
        _fused(hs, ws, ht, wt[:-1], labels.clamp(min=0), DistillSpec())


def test_bfloat16_inputs_close_to_fp32():
    spec = DistillSpec()
    hs, ws, ht, wt, labels = _problem(n=64, h=32, v=300)
    valid = labels != -100
    out32 = _fused(hs[valid], ws, ht[valid], wt, labels[valid], spec)
    h16 = hs[valid].bfloat16().requires_grad_()
    w16 = ws.bfloat16().requires_grad_()
    out16 = _fused(h16, w16, ht[valid].bfloat16(), wt.bfloat16(), labels[valid], spec)
    out16[0].backward()
    assert h16.grad.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16
    assert out16[1].item() == pytest.approx(out32[1].item(), rel=2e-2)
    assert out16[2].item() == pytest.approx(out32[2].item(), rel=5e-2)


def test_spec_validation():
    with pytest.raises(ValueError, match="focus_distill"):
        DistillSpec(mode="jsd")
    with pytest.raises(ValueError, match="focus_temperature"):
        DistillSpec(temperature=0)
