"""The paper's baselines as extra loss terms: unlikelihood, ScaleGrad, TaiLr (in the fused pass),
DITTO (pseudo-repetition rows), their config and their trainer steps."""

import math
import os
import sys

import pytest
import torch

from axolotl_focus.losses import (
    AuxSpec,
    DistillSpec,
    chunked_token_nll,
    ditto_loss,
    ditto_previous_index,
    fused_ce_distill_aux,
    fused_ditto_loss,
    reference_aux_terms,
    reference_ce_distill,
    reference_ditto,
    seen_tokens,
)
from axolotl_focus.train.ditto import is_ditto_step, prefix_and_unit, pseudo_rows, sentence_end_ids

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
import focus_step  # noqa: E402

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


def _reference_total(hs, ws, ht, wt, labels, seq, aux, spec, ce_w, d_w, aux_scale):
    """Dense objective: ce_w * (CE | ScaleGrad | TaiLr) + alpha * aux_scale * UL + d_w * distill."""
    zs = hs @ ws.T
    ce, distill = reference_ce_distill(zs, ht @ wt.T, labels, spec)
    terms = reference_aux_terms(zs, labels, seq, aux)
    nll = terms.get("scalegrad", terms.get("tailr", ce))
    total = ce_w * nll + d_w * distill + (aux.unlikelihood or 0.0) * aux_scale * terms.get("ul", 0.0)
    return total, dict(terms, ce=ce, distill=distill)


def _fused(hs, ws, ht, wt, labels, seq, aux, spec, ce_w=1.0, d_w=0.0, aux_scale=1.0, chunk=1024):
    valid = labels != -100
    return fused_ce_distill_aux(hs[valid], ws, None if ht is None else ht[valid], wt, labels[valid], spec, ce_w,
                                d_w, chunk, aux, seq[valid], aux_scale)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("mode", ["none", "focus"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_fused_terms_match_dense_reference(name, mode, chunk):
    aux, spec = SPECS[name], DistillSpec(mode=mode)
    hs, ws, ht, wt, labels, seq = _batch()
    ce_w, d_w, aux_scale = 0.8, 0.3, 0.6
    hs_r, ws_r = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    want, want_terms = _reference_total(hs_r, ws_r, ht, wt, labels, seq, aux, spec, ce_w, d_w, aux_scale)
    want.backward()
    hs_f, ws_f = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    got, sums = _fused(hs_f, ws_f, ht, wt, labels, seq, aux, spec, ce_w, d_w, aux_scale, chunk)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    expected_keys = {"ce", "distill"} | set(name.split("+"))
    assert set(sums) == expected_keys
    for key in expected_keys:
        assert sums[key].item() == pytest.approx(want_terms[key].item(), rel=1e-5, abs=1e-5), key
    torch.testing.assert_close(hs_f.grad, hs_r.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ws_f.grad, ws_r.grad, rtol=1e-5, atol=1e-5)


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


# -- DITTO -------------------------------------------------------------------------------------

ENDS = frozenset({7, 9, 11})  # token ids whose text ends with '.'
STOPS = {2, 0}  # eos, pad


def test_ditto_instruction_row():
    ids = [1, 10, 11, 12, 20, 21, 22, 2]
    labels = [-100, -100, -100, -100, 20, 21, 22, 2]
    assert prefix_and_unit(ids, labels, ENDS, STOPS, 16) == ([1, 10, 11, 12], [20, 21, 22])
    batch = {"input_ids": torch.tensor([ids + [0, 0]]), "labels": torch.tensor([labels + [-100, -100]]),
             "attention_mask": torch.tensor([[1] * 8 + [0, 0]])}
    rows = pseudo_rows(batch, ENDS, 16, 0, STOPS)
    assert rows["input_ids"][0].tolist() == [1, 10, 11, 12] + [20, 21, 22] * 4
    assert rows["labels"][0].tolist() == [-100] * 4 + [20, 21, 22] * 4
    assert rows["unit_len"].tolist() == [3] and rows["prefix_len"] == [4] and rows["lengths"] == [16]
    # a long output is cut so that two copies fit: (16 - 4) // 2 = 6 tokens
    long_ids = [1, 10, 11, 12] + list(range(30, 40)) + [2]
    assert prefix_and_unit(long_ids, [-100] * 4 + long_ids[4:], ENDS, STOPS, 16)[1] == list(range(30, 36))


def test_ditto_plain_text_rows_and_fallbacks():
    ids = [1, 5, 6, 7, 8, 9, 10, 11, 2]
    assert prefix_and_unit(ids, ids, ENDS, STOPS, 20) == ([1, 5, 6, 7], [8, 9])
    # one sentence end then a tail: the unit is the tail
    assert prefix_and_unit([1, 5, 7, 8, 10, 2], [1, 5, 7, 8, 10, 2], ENDS, STOPS, 20) == ([1, 5, 7], [8, 10])
    # no sentence end, or nothing after the only one: prefix = first token, unit = the rest
    assert prefix_and_unit([1, 5, 6, 8], [1, 5, 6, 8], ENDS, STOPS, 20) == ([1], [5, 6, 8])
    assert prefix_and_unit([1, 5, 6, 7, 2], [-100, 5, 6, 7, 2], ENDS, STOPS, 20) == ([1], [5, 6, 7])
    # no room for two copies of anything / nothing labelled
    assert prefix_and_unit([1, 5, 6, 7, 8], [1, 5, 6, 7, 8], ENDS, STOPS, 5) is None
    assert prefix_and_unit([1, 5], [-100, -100], ENDS, STOPS, 20) is None


def test_pseudo_rows_skip_unlabelled_and_split_packed_rows():
    # row 0: a RePAIR-style row without labels; row 1: two packed plain-text sequences
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 0, 0], [1, 5, 7, 8, 9, 1, 6, 7]])
    labels = torch.tensor([[-100] * 8, [1, 5, 7, 8, 9, 1, 6, 7]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 0], [0, 1, 2, 3, 4, 0, 1, 2]])
    rows = pseudo_rows({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                        "position_ids": positions}, ENDS, 9, 0, STOPS)
    assert rows["prefix_len"] == [3, 1] and rows["unit_len"].tolist() == [2, 2]
    assert rows["input_ids"][0].tolist() == [1, 5, 7, 8, 9, 8, 9, 8, 9]
    assert rows["input_ids"][1].tolist() == [1, 6, 7, 6, 7, 6, 7, 6, 7]


def test_sentence_end_ids_from_a_tokenizer():
    from axolotl_focus.micro import build_tokenizer

    tokenizer = build_tokenizer(["It was late. He left. The end ."] * 20, vocab_size=300)
    ends = sentence_end_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids(".") in ends
    assert all(tokenizer.decode([i]).rstrip().endswith(".") for i in ends)
    assert tokenizer.convert_tokens_to_ids("It") not in ends


def test_ditto_by_hand_and_off_by_one():
    """Unit of 2 tokens, copies [0.3, 0.6], [0.5, 0.9], [0.7]: the second copy's FIRST token is
    compared too (DITTO's reference code skips it)."""
    p = torch.tensor([0.3, 0.6, 0.5, 0.9, 0.7])
    previous = ditto_previous_index(torch.zeros(5, dtype=torch.long), torch.tensor([2]))
    assert previous.tolist() == [-1, -1, 0, 1, 2]
    total, count = ditto_loss(-p.log(), previous, 0.5)
    expected = -(math.log(1 - abs(0.5 - 0.15)) + math.log(1 - abs(0.9 - 0.3)) + math.log(1 - abs(0.7 - 0.25)))
    assert count == 3 and total.item() == pytest.approx(expected, rel=1e-6)
    # p equal to lambda * p_prev + 1 would give log(0): clamped at 1e-20
    clamped, _ = ditto_loss(-torch.tensor([0.0, 1.0]).log(), torch.tensor([-1, 0]), 0.0)
    assert clamped.item() == pytest.approx(-math.log(1e-20), rel=1e-6)


def test_fused_ditto_frozen_head_saturated_and_empty():
    """LoRA (frozen lm_head): only the hidden states get a gradient, equal to the chunked path's; a
    token whose gold probability is ~1 after a ~0 one (lambda 0) is clamped at 1e-20 with a zero
    gradient in both; no token at all is a zero loss that still back-propagates."""
    g = torch.Generator().manual_seed(1)
    head = torch.randn(11, 4, generator=g)
    hidden = torch.randn(9, 4, generator=g)
    hidden[4] = head[3] * 40.0  # p(target 3) ~ 1
    hidden = hidden.requires_grad_()
    targets = torch.tensor([1, 2, 3, 4, 3, 5, 6, 7, 8])
    previous = torch.tensor([-1, -1, -1, -1, 2, 1, 2, 3, 4])  # token 4 repeats token 2
    got, count = fused_ditto_loss(hidden, head, targets, previous, 0.0, chunk_size=4)
    got.backward()
    fused_grad, hidden.grad = hidden.grad.clone(), None
    want, want_count = ditto_loss(chunked_token_nll(hidden, head, targets, 4), previous, 0.0)
    want.backward()
    assert count == want_count == 5 and got.item() == pytest.approx(want.item(), rel=1e-6)
    assert got.item() > -math.log(1e-20) - 1  # the clamped term is in
    torch.testing.assert_close(fused_grad, hidden.grad, rtol=1e-5, atol=1e-7)
    assert fused_grad[4].abs().max() == 0
    empty = torch.zeros(0, 4, requires_grad=True)
    zero, n = fused_ditto_loss(empty, head, targets[:0], previous[:0], 0.5)
    zero.backward()
    assert n == 0 and zero.item() == 0 and empty.grad.shape == (0, 4)


@pytest.mark.parametrize("fused", [False, True], ids=["chunked-nll", "fused"])
@pytest.mark.parametrize("chunk", [3, 5, 64])
def test_ditto_chunked_matches_dense_reference(fused, chunk):
    g = torch.Generator().manual_seed(0)
    ids = [[1, 10, 11, 12, 20, 21, 22, 2, 0, 0], [1, 5, 6, 7, 8, 9, 10, 11, 2, 0]]
    labels = [[-100] * 4 + [20, 21, 22, 2, -100, -100], [1, 5, 6, 7, 8, 9, 10, 11, 2, -100]]
    rows = pseudo_rows({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                        "attention_mask": (torch.tensor(labels) != -100) | (torch.tensor(ids) == 1)},
                       ENDS, 17, 0, STOPS)
    b, t = rows["input_ids"].shape
    v, h = 30, 8
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)
    head = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.nn.functional.pad(rows["labels"], (0, 1), value=-100)[:, 1:]
    valid = targets != -100
    previous = ditto_previous_index(valid.nonzero()[:, 0], rows["unit_len"])
    if fused:
        got, count = fused_ditto_loss(hidden[valid], head, targets[valid], previous, 0.5, chunk_size=chunk)
    else:
        got, count = ditto_loss(chunked_token_nll(hidden[valid], head, targets[valid], chunk_size=chunk), previous, 0.5)
    (got / count).backward()
    grads = hidden.grad.clone(), head.grad.clone()
    hidden.grad = head.grad = None
    want, want_count = reference_ditto(hidden @ head.T, rows["input_ids"], rows["lengths"], rows["prefix_len"],
                                       rows["unit_len"].tolist(), 0.5)
    (want / want_count).backward()
    assert count == want_count == sum(n - pre - u for n, pre, u in
                                      zip(rows["lengths"], rows["prefix_len"], rows["unit_len"].tolist()))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], head.grad, rtol=1e-5, atol=1e-6)


def test_ditto_step_decision_is_per_step_and_seeded():
    draws = [is_ditto_step(0, step, 0.5) for step in range(40)]
    assert draws == [is_ditto_step(0, step, 0.5) for step in range(40)]  # reproducible (all ranks agree)
    assert 10 < sum(draws) < 30
    assert all(is_ditto_step(3, s, 1.0) for s in range(10)) and not any(is_ditto_step(3, s, 0.0) for s in range(10))


# -- config ------------------------------------------------------------------------------------


def _validate(value):
    from axolotl_focus.config import FocusArgs

    return FocusArgs.model_validate({"focus_distill": "none", "focus_aux_losses": value}).focus_aux_losses


def test_config_defaults_list_and_mapping():
    cfg = _validate(["unlikelihood", "ditto"])
    assert cfg.unlikelihood.alpha == 0.5 and cfg.ditto.lambda_ == 0.5 and cfg.ditto.probability == 0.5
    cfg = _validate({"scalegrad": True, "tailr": False, "unlikelihood": None, "ditto": {"lambda": 0.3}})
    assert cfg.scalegrad.gamma == 0.5 and cfg.tailr is None and cfg.unlikelihood is None and cfg.ditto.lambda_ == 0.3
    assert cfg.aux_spec() == AuxSpec(scalegrad=0.5)
    assert _validate({"tailr": {}}).aux_spec() == AuxSpec(tailr=(0.1, 0.2))
    assert _validate({"ditto": {}}).aux_spec() is None  # DITTO is not part of the fused pass
    # the dumped dict (as axolotl passes it on) validates again
    from axolotl_focus.config import FocusAuxLosses

    assert FocusAuxLosses.model_validate(cfg.model_dump()) == cfg


@pytest.mark.parametrize("value,match", [
    ({"unlikelihod": {}}, r"focus_aux_losses\.unlikelihod"),
    ({"unlikelihood": {"beta": 1}}, r"focus_aux_losses\.unlikelihood\.beta"),
    ({"unlikelihood": {"alpha": -1}}, r"focus_aux_losses\.unlikelihood\.alpha"),
    ({"scalegrad": {"gamma": 0}}, r"focus_aux_losses\.scalegrad\.gamma"),
    ({"tailr": {"min_weight": 2}}, r"focus_aux_losses\.tailr\.min_weight"),
    ({"ditto": {"probability": 1.5}}, r"focus_aux_losses\.ditto\.probability"),
    ({"scalegrad": {}, "tailr": {}}, "scalegrad and tailr both replace"),
    (["ul"], r"unknown term\(s\) \['ul'\]"),
])
def test_config_errors_name_the_key(value, match):
    with pytest.raises(ValueError, match=match):
        _validate(value)


def test_config_through_axolotl_and_plugin(tiny_pair, tmp_path, plugin_manager):
    from test_plugin import load, tiny_config

    cfg = load(tiny_config(tiny_pair, tmp_path, focus_aux_losses={"unlikelihood": {"alpha": 0.25},
                                                                  "ditto": {"lambda": 0.4}}), tmp_path)
    args = plugin_manager.plugins["axolotl_focus.FocusPlugin"].get_training_args(cfg)
    assert type(args["focus_aux_losses"]) is dict
    assert args["focus_aux_losses"]["unlikelihood"] == {"alpha": 0.25}
    assert args["focus_ditto_max_length"] == cfg.sequence_len == 128
    with pytest.raises(Exception, match="focus_aux_losses"):
        load(tiny_config(tiny_pair, tmp_path, focus_aux_losses={"scalegrad": {}, "tailr": {}}), tmp_path)
    with pytest.raises(Exception, match="focus_aux_losses"):
        load(tiny_config(tiny_pair, tmp_path, focus_aux_losses={"bogus": {}}), tmp_path)


# -- trainer -----------------------------------------------------------------------------------


def _tiny_dir(tiny_pair):
    return os.path.dirname(tiny_pair["student"])


@pytest.mark.parametrize("aux,distill", [
    ({"unlikelihood": {"alpha": 0.5}}, "focus"),
    ({"scalegrad": {"gamma": 0.5}}, "kd"),
    ({"tailr": {}}, "focus"),
    ({"unlikelihood": {}, "tailr": {}}, "kd"),
])
def test_trainer_step_logs_the_terms(tiny_pair, tmp_path, aux, distill):
    trainer = focus_step.make_trainer(_tiny_dir(tiny_pair), str(tmp_path), per_device=2, accum=2, distill=distill,
                                      focus_aux_losses=aux)
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    names = {"unlikelihood": "ul", "scalegrad": "scalegrad", "tailr": "tailr"}
    assert {"loss/ce", f"loss/{distill}"} | {f"loss/{names[k]}" for k in aux} <= log.keys()
    assert all(math.isfinite(v) for k, v in log.items() if k.startswith("loss"))
    metrics = trainer.evaluate()
    assert {f"eval_loss/{names[k]}" for k in aux} <= metrics.keys()


def test_trainer_step_is_exact_under_accumulation(tiny_pair, tmp_path):
    """UL + ScaleGrad + FOCUS, 2 x 2 micro-batches: one SGD step equals the dense global-mean step."""
    from focus_step import LR, assert_params_equal, expected_params

    tiny_dir = _tiny_dir(tiny_pair)
    want, want_loss = expected_params(tiny_dir, aux=AuxSpec(unlikelihood=0.5, scalegrad=0.5))
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=2, accum=2, lr=LR,
                                      focus_aux_losses={"unlikelihood": {"alpha": 0.5}, "scalegrad": {"gamma": 0.5}})
    trainer.train()
    assert_params_equal({k: p.detach() for k, p in trainer.model.named_parameters()}, want)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(want_loss, rel=1e-3)


def test_ditto_step_value_and_alternation(tiny_pair, tmp_path):
    tiny_dir = _tiny_dir(tiny_pair)
    # forced DITTO step: the logged loss is the DITTO mean over the pseudo rows of the 4 rows
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path / "a"), per_device=4, distill="none",
                                      focus_aux_losses={"ditto": {"probability": 1.0}}, focus_ditto_max_length=48)
    from transformers import DataCollatorForSeq2Seq

    batch = DataCollatorForSeq2Seq(trainer.processing_class, padding=True)(focus_step.rows(trainer.processing_class))
    rows = trainer._pseudo_rows(batch)
    assert rows["prefix_len"] == [2, 3, 4, 5] and all(n == 48 for n in rows["lengths"])  # instruction rows
    with torch.no_grad():
        logits = trainer.model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    want, count = reference_ditto(logits, rows["input_ids"], rows["lengths"], rows["prefix_len"],
                                  rows["unit_len"].tolist(), 0.5)
    trainer.train()
    log = trainer.state.log_history[0]
    assert set(k for k in log if k.startswith("loss/")) == {"loss/ditto"}
    assert log["loss"] == pytest.approx(want.item() / count, rel=1e-4)
    assert log["loss/ditto"] == pytest.approx(want.item() / count, abs=1e-5)  # logged with 5 digits

    # probability 0.5 over 6 steps (seed 0): both kinds happen, each step logs its own terms
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path / "b"), per_device=2, accum=2, distill="kd",
                                      lr=0.01, max_steps=6, focus_aux_losses={"ditto": {}, "unlikelihood": {}},
                                      focus_ditto_max_length=48)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    kinds = [is_ditto_step(0, step, 0.5) for step in range(6)]
    assert len(logs) == 6 and any(kinds) and not all(kinds)
    for log, ditto in zip(logs, kinds):
        assert ("loss/ditto" in log) == ditto
        assert ("loss/ce" in log and "loss/ul" in log and "loss/kd" in log) == (not ditto)


def test_aux_terms_with_repair_pairs(tiny_pair, tmp_path):
    """UL + TaiLr + FOCUS on a mixed SFT + RePAIR batch equals the dense reference (pair rows add
    nothing to the token terms); a DITTO step builds pseudo rows from the SFT row only."""
    import torch.nn.functional as F
    from axolotl.utils.dict import DictDefault
    from focus_step import pair_rows

    from axolotl_focus.config import DittoArgs
    from axolotl_focus.train.pair_dataset import RepairCollator, load

    aux = {"unlikelihood": {"alpha": 0.5}, "tailr": {"gamma": 0.2, "min_weight": 0.3}}
    trainer = focus_step.make_trainer(_tiny_dir(tiny_pair), str(tmp_path), per_device=3, focus_aux_losses=aux)
    trainer.focus_args.focus_repair_margin = 5.0  # keep both pairs active
    tokenizer, model = trainer.processing_class, trainer.model.train()
    strategy = load(tokenizer, DictDefault(sequence_len=64), None)
    sft = focus_step.rows(tokenizer, 1)[0]
    batch = RepairCollator(tokenizer, padding=True)([strategy.tokenize_prompt(r) for r in pair_rows()] + [sft])
    loss = trainer.compute_loss(model, dict(batch))

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        t_logits = trainer.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = batch["labels"][:, 1:].reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    _, focus = reference_ce_distill(flat, t_logits.reshape(flat.shape), labels, DistillSpec())
    terms = reference_aux_terms(flat, labels, torch.arange(ids.shape[0]).repeat_interleave(logits.shape[1]),
                                AuxSpec(unlikelihood=0.5, tailr=(0.2, 0.3)))
    rl = batch["repair_labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), rl.clamp(min=0), reduction="none") * (rl != -100)
    mean = nll.sum(1) / (rl != -100).sum(1).clamp(min=1)
    hinge = (5.0 + mean[batch["repair_chosen"]] - mean[batch["repair_rejected"]]).clamp(min=0).mean()
    want = (terms["tailr"] + 0.5 * terms["ul"] + 0.05 * focus) / (labels != -100).sum() + hinge
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)

    trainer.ditto = DittoArgs(probability=1.0)
    rows = trainer._pseudo_rows(dict(batch))
    assert rows["input_ids"].shape[0] == 1 and rows["prefix_len"] == [2]
    ditto = trainer.compute_loss(model, dict(batch))
    assert torch.isfinite(ditto) and ditto.item() != pytest.approx(loss.item())


@pytest.mark.slow
def test_axolotl_train_with_aux_losses(tiny_pair, tmp_path):
    """The real `axolotl train` CLI with unlikelihood + ScaleGrad + DITTO: every step logs its terms."""
    from test_e2e_axolotl import axolotl_train, logged_dicts
    from test_plugin import tiny_config

    cfg = tiny_config(tiny_pair, tmp_path, dataset_prepared_path=str(tmp_path / "prepared"), max_steps=4,
                      focus_aux_losses={"unlikelihood": {"alpha": 0.5}, "scalegrad": {"gamma": 0.5},
                                        "ditto": {"probability": 0.5}})
    logs = logged_dicts(axolotl_train(cfg, tmp_path, "aux"))
    kinds = [is_ditto_step(cfg["seed"], step, 0.5) for step in range(4)]
    assert len(logs) == 4 and any(kinds) and not all(kinds), (kinds, logs)
    for log, ditto in zip(logs, kinds):
        want = {"loss/ditto"} if ditto else {"loss/ce", "loss/focus", "loss/ul", "loss/scalegrad"}
        assert want <= log.keys() and all(math.isfinite(log[k]) for k in want), log
