"""The baseline terms in the fused pass (unlikelihood, ScaleGrad, TaiLr): fused against the dense
reference (also on the shared grid of loss_grid.py), per-sequence seen tokens, by-hand values,
degenerate settings and the UL clamp."""

import math

import pytest
import torch
from loss_grid import DTYPES, IGNORED, SHAPE_IDS, SHAPES, assert_grads, assert_values, leaves, problem

from axolotl_focus.train.losses import (
    AuxSpec,
    DistillSpec,
    FusedCEDistillLoss,
    reference_aux_terms,
    reference_ce_distill,
    seen_tokens,
)

UL, SG, TAILR = AuxSpec(unlikelihood=0.7), AuxSpec(scalegrad=0.3), AuxSpec(tailr=(0.1, 0.2))
SPECS = {"ul": UL, "scalegrad": SG, "tailr": TAILR, "ul+scalegrad": AuxSpec(unlikelihood=0.5, scalegrad=0.5),
         "ul+tailr": AuxSpec(unlikelihood=0.5, tailr=(0.3, 0.1))}


def _batch(b=3, t=24, h=16, v=11, seed=0):
    """Rows with prompts (-100 at the start), right padding (-100 at the end) and, with V = 11,
    many repeated targets; returns flat [B*T] tensors and the row of each position. Student logits
    of standard deviation ~1.6: no candidate near p = 1, where -log(1 - p) is ill-conditioned in
    fp32 (log p ~ 0 carries the absolute rounding of logsumexp) for any implementation."""
    g = torch.Generator().manual_seed(seed)
    hs, ws = torch.randn(b * t, h, generator=g), torch.randn(v, h, generator=g) * 0.4
    ht, wt = torch.randn(b * t, h, generator=g), torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    for row in range(b):
        labels[row, : 2 + row] = -100  # prompt
        labels[row, t - 3 * row:] = -100  # padding
    return hs, ws, ht, wt, labels.flatten(), torch.arange(b).repeat_interleave(t)


def _reference_total(hs, ws, ht, wt, labels, seq, aux, spec, ce_w, d_w, scale):
    """Dense objective: scale * (ce_w * (CE | ScaleGrad | TaiLr) + alpha * UL + d_w * distill)."""
    zs = hs @ ws.T
    ce, distill = reference_ce_distill(zs, ht @ wt.T, labels, spec)
    terms = reference_aux_terms(zs, labels, seq, aux)
    nll = terms.get("scalegrad", terms.get("tailr", ce))
    total = scale * (ce_w * nll + d_w * distill + (aux.unlikelihood or 0.0) * terms.get("ul", 0.0))
    return total, dict(terms, ce=ce, distill=distill)


def _fused(hs, ws, ht, wt, labels, seq, aux, spec, ce_w=1.0, d_w=0.0, scale=1.0, chunk=1024):
    valid = labels != -100
    loss = FusedCEDistillLoss(spec, aux=aux, ce_weight=ce_w, distill_weight=d_w, chunk_size=chunk)
    return loss(hs[valid], ws, labels[valid], teacher_hidden=None if ht is None else ht[valid], teacher_head=wt,
                sequence=seq[valid], scale=scale)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("mode", ["none", "focus"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_fused_terms_match_dense_reference(name, mode, chunk):
    aux, spec = SPECS[name], DistillSpec(mode=mode)
    hs, ws, ht, wt, labels, seq = _batch()
    ce_w, d_w, scale = 0.8, 0.3, 0.6
    hs_r, ws_r = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    want, want_terms = _reference_total(hs_r, ws_r, ht, wt, labels, seq, aux, spec, ce_w, d_w, scale)
    want.backward()
    hs_f, ws_f = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    got, sums = _fused(hs_f, ws_f, ht, wt, labels, seq, aux, spec, ce_w, d_w, scale, chunk)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    expected_keys = {"ce", "distill"} | set(name.split("+"))
    assert set(sums) == expected_keys
    for key in expected_keys:
        assert sums[key].item() == pytest.approx(want_terms[key].item(), rel=1e-5, abs=1e-5), key
    torch.testing.assert_close(hs_f.grad, hs_r.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ws_f.grad, ws_r.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("ignored", IGNORED)
@pytest.mark.parametrize("name", list(SPECS))
def test_grid_matches_dense_reference(shape, dtype, tol, ignored, name):
    """With FOCUS, one sequence per row: values (total, every sum) and gradients against the reference."""
    x, aux, spec = problem(shape, dtype, ignored), SPECS[name], DistillSpec("focus")
    hs, ws = leaves(x.hs, x.ws)
    want, want_terms = _reference_total(hs, ws, x.ht, x.wt, x.labels, x.row, aux, spec, 0.8, 0.3, 0.6)
    want.backward()
    hf, wf = leaves(x.hs, x.ws)
    got, sums = _fused(hf, wf, x.ht, x.wt, x.labels, x.row, aux, spec, 0.8, 0.3, 0.6, shape[4])
    got.backward()
    assert_values({"total": got, **sums}, {"total": want, **want_terms}, tol)
    assert_grads([hf.grad, wf.grad], [hs.grad, ws.grad], tol)
    assert hf.grad[~x.valid].abs().sum() == 0


@pytest.mark.parametrize("name", ["ul", "scalegrad"])
def test_rows_do_not_leak(name):
    """A row's seen set is its own: the batch's sums are the sums of its rows computed alone, and
    changing row 2 leaves row 1's share unchanged."""
    hs, ws, ht, wt, labels, seq = _batch(b=2)
    spec, aux = DistillSpec("none"), SPECS[name]
    alone = [_fused(hs[seq == r], ws, None, None, labels[seq == r], seq[seq == r], aux, spec)[1][name]
             for r in (0, 1)]
    together = _fused(hs, ws, None, None, labels, seq, aux, spec)[1][name]
    assert together.item() == pytest.approx(alone[0].item() + alone[1].item(), rel=1e-6)
    changed = labels.clone()
    changed[seq == 1] = torch.where(labels[seq == 1] == -100, -100, (labels[seq == 1] + 3) % ws.shape[0])
    row2 = _fused(hs[seq == 1], ws, None, None, changed[seq == 1], seq[seq == 1], aux, spec)[1][name]
    total2 = _fused(hs, ws, None, None, changed, seq, aux, spec)[1][name]
    assert (total2 - row2).item() == pytest.approx(alone[0].item(), rel=1e-6)
    # one sequence id for both rows would leak: row 1's targets become row 2's "earlier" tokens
    merged = _fused(hs, ws, None, None, labels, torch.zeros_like(seq), aux, spec)[1][name]
    assert merged.item() != pytest.approx(together.item(), rel=1e-3)


def test_seen_tokens_are_per_sequence_prefixes():
    targets = torch.tensor([4, 2, 4, 7, 2, 2, 9, 4])
    sequence = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    seen = seen_tokens(targets, sequence)
    assert seen.ids[0, :3].tolist() == [4, 2, 7] and seen.first[0, :3].tolist() == [0, 1, 3]
    assert seen.ids[1].tolist() == [2, 9, 4] and seen.first[1].tolist() == [5, 6, 7]
    ids, mask = seen.chunk(3, 7)  # tokens 3..6
    got = [set(ids[i][mask[i]].tolist()) for i in range(4)]
    assert got == [{4, 2}, {4, 2, 7}, set(), {2}]


# -- hand-computed examples on a 5-token vocabulary --------------------------------------------

PROBS = [[0.2, 0.2, 0.2, 0.2, 0.2],  # prompt position (label -100)
         [0.1, 0.2, 0.4, 0.2, 0.1],  # target 2, nothing seen yet
         [0.3, 0.1, 0.2, 0.3, 0.1],  # target 3, seen {2}
         [0.1, 0.1, 0.5, 0.2, 0.1],  # target 2, seen {2, 3}
         [0.2, 0.2, 0.2, 0.1, 0.3]]  # target 4, seen {2, 3}
TARGETS = [-100, 2, 3, 2, 4]


def _hand(aux):
    """Identity head: the hidden states are the logits log(p), so softmax gives PROBS exactly."""
    logits = torch.tensor(PROBS).log()
    labels = torch.tensor(TARGETS)
    total, sums = _fused(logits, torch.eye(5), None, None, labels, torch.zeros(5, dtype=torch.long), aux,
                         DistillSpec("none"))
    ref = reference_aux_terms(logits, labels, torch.zeros(5, dtype=torch.long), aux)
    return total.item(), {k: v.item() for k, v in sums.items()}, {k: v.item() for k, v in ref.items()}


CE_HAND = -(math.log(0.4) + math.log(0.3) + math.log(0.5) + math.log(0.3))


def test_unlikelihood_by_hand():
    # candidates: t2 {2}: p=0.2; t3 {3}: p=0.2; t4 {2, 3}: p=0.2, 0.1
    ul = -(math.log(1 - 0.2) + math.log(1 - 0.2) + math.log(1 - 0.2) + math.log(1 - 0.1))
    total, sums, ref = _hand(AuxSpec(unlikelihood=0.5))
    assert sums["ul"] == pytest.approx(ul, rel=1e-6) and ref["ul"] == pytest.approx(ul, rel=1e-6)
    assert sums["ce"] == pytest.approx(CE_HAND, rel=1e-6)
    assert total == pytest.approx(CE_HAND + 0.5 * ul, rel=1e-6)


def test_scalegrad_by_hand():
    g = 0.5
    # -log p(y) - log w + log(g (1 - S) + S); S = p of seen tokens, w = g when y is novel
    sg = (-math.log(0.4) - math.log(g) + math.log(g * 1.0 + 0.0)
          - math.log(0.3) - math.log(g) + math.log(g * (1 - 0.2) + 0.2)
          - math.log(0.5) + math.log(g * (1 - 0.7) + 0.7)
          - math.log(0.3) - math.log(g) + math.log(g * (1 - 0.3) + 0.3))
    total, sums, ref = _hand(AuxSpec(scalegrad=g))
    assert sums["scalegrad"] == pytest.approx(sg, rel=1e-6) and total == pytest.approx(sg, rel=1e-6)
    assert ref["scalegrad"] == pytest.approx(sg, rel=1e-6)
    # the definition itself at t2: p~ = 0.5 p on novel tokens {0, 1, 3, 4}, renormalized
    rescaled = [0.5 * 0.3, 0.5 * 0.1, 0.2, 0.5 * 0.3, 0.5 * 0.1]
    assert -math.log(rescaled[3] / sum(rescaled)) == pytest.approx(
        -math.log(0.3) - math.log(g) + math.log(g * 0.8 + 0.2), rel=1e-12)


def test_tailr_by_hand():
    gamma, min_weight = 0.1, 0.2
    weights = [min(1.0, max(min_weight, p / (gamma + (1 - gamma) * p))) for p in (0.4, 0.3, 0.5, 0.3)]
    tailr = sum(-w * math.log(p) for w, p in zip(weights, (0.4, 0.3, 0.5, 0.3)))
    total, sums, ref = _hand(AuxSpec(tailr=(gamma, min_weight)))
    assert sums["tailr"] == pytest.approx(tailr, rel=1e-6) and total == pytest.approx(tailr, rel=1e-6)
    assert ref["tailr"] == pytest.approx(tailr, rel=1e-6)
    # min_weight binds: gamma = 1 gives w = p, clamped up to 0.45 for every token here
    total, _, _ = _hand(AuxSpec(tailr=(1.0, 0.45)))
    assert total == pytest.approx(sum(-max(0.45, p) * math.log(p) for p in (0.4, 0.3, 0.5, 0.3)), rel=1e-6)


@pytest.mark.parametrize("aux", [AuxSpec(scalegrad=1.0), AuxSpec(tailr=(1.0, 1.0)), AuxSpec(unlikelihood=0.0)],
                         ids=["scalegrad-gamma1", "tailr-gamma1-min1", "ul-alpha0"])
def test_degenerate_settings_equal_ce(aux):
    hs, ws, ht, wt, labels, seq = _batch(seed=2)
    grads = []
    for a in (None, aux):
        h = hs.clone().requires_grad_()
        total, sums = _fused(h, ws, ht, wt, labels, seq, a, DistillSpec("none"), 0.7)
        total.backward()
        grads.append((total.item(), h.grad))
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-6, atol=1e-7)


def test_unlikelihood_clamp_keeps_value_and_gradient_finite():
    """Candidates with 1 - p below UL_EPS (1e-6 and 0 in fp32): the value stops at -log(UL_EPS),
    the gradient stays finite, pushes the first down and matches the reference's straight-through clamp."""
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 14.5, 0.0], [0.0, 40.0, 0.0]])
    labels, seq = torch.tensor([1, 0, 0]), torch.zeros(3, dtype=torch.long)
    z = logits.clone().requires_grad_()
    total, sums = _fused(z, torch.eye(3), None, None, labels, seq, AuxSpec(unlikelihood=1.0), DistillSpec("none"))
    total.backward()
    assert sums["ul"].item() == pytest.approx(-2 * math.log(1e-5), rel=1e-4)
    assert torch.isfinite(z.grad).all() and z.grad[1, 1] > 0.05
    z_ref = logits.clone().requires_grad_()
    ref = reference_aux_terms(z_ref, labels, seq, AuxSpec(unlikelihood=1.0))
    (ref["ul"] + torch.nn.functional.cross_entropy(z_ref, labels, reduction="sum")).backward()
    assert ref["ul"].item() == pytest.approx(sums["ul"].item(), rel=1e-6)
    # a_c (1 - p_c) with a_c = 1e5: fp32 cancellation of ~1e5 x 6e-8 in both implementations
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=5e-3)


def test_aux_spec_rejects_scalegrad_with_tailr():
    with pytest.raises(ValueError, match="scalegrad and tailr"):
        AuxSpec(scalegrad=0.5, tailr=(0.1, 0.2))
