"""The DITTO loss: by hand (the first token of the second copy included), the fused pass with a
frozen head, saturated and empty inputs, and chunked / fused against the dense reference (also on
the shared grid of loss_grid.py)."""

import math

import pytest
import torch
from loss_grid import DTYPES, SHAPE_IDS, SHAPES, assert_grads, assert_values, leaves

from axolotl_focus.train.ditto import pseudo_rows
from axolotl_focus.train.losses import (
    chunked_token_nll,
    ditto_loss,
    ditto_previous_index,
    fused_ditto_loss,
    reference_ditto,
)

ENDS = frozenset({7, 9, 11})  # token ids whose text ends with '.' (as in tests/train/test_aux_terms.py)
STOPS = {2, 0}  # eos, pad


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



def _pseudo_batch(shape, layout, seed=0):
    """Pseudo-repetition rows of ``shape``: a prefix (BOS only, or a prompt of 2 + b tokens), copies of
    a unit of 2 + b % 4 tokens, then right padding (none, or 3 b tokens); labels -100 outside the copies."""
    b, t, h, v, _ = shape
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, v, (b, t), generator=g)
    labels = torch.full((b, t), -100)
    lengths, prefix, unit = [], [], []
    for r in range(b):
        pre, pad, u = (1, 0, 2 + r % 4) if layout == "bos-only" else (2 + r, 3 * r, 2 + r % 4)
        for i in range(pre + u, t - pad):
            ids[r, i] = ids[r, i - u]
        ids[r, t - pad:] = 0
        labels[r, pre: t - pad] = ids[r, pre: t - pad]
        lengths.append(t - pad), prefix.append(pre), unit.append(u)
    return ids, labels, lengths, prefix, unit


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("layout", ["bos-only", "prompt-padding"])
def test_grid_fused_matches_dense_reference(shape, dtype, tol, layout):
    """The fused DITTO sum and its gradients (hidden, head) against the position-by-position reference."""
    b, t, h, v, chunk = shape
    ids, labels, lengths, prefix, unit = _pseudo_batch(shape, layout)
    g = torch.Generator().manual_seed(1)
    hidden0 = torch.randn(b, t, h, generator=g).to(dtype)
    head0 = (torch.randn(v, h, generator=g) * 2 / h**0.5).to(dtype)
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    valid = targets != -100
    previous = ditto_previous_index(valid.nonzero()[:, 0], torch.tensor(unit))
    hidden, head = leaves(hidden0, head0)
    got, count = fused_ditto_loss(hidden[valid], head, targets[valid], previous, 0.5, chunk_size=chunk)
    got.backward()
    hidden_ref, head_ref = leaves(hidden0, head0)
    want, want_count = reference_ditto(hidden_ref @ head_ref.T, ids, lengths, prefix, unit, 0.5)
    want.backward()
    assert count == want_count > 0
    assert_values({"ditto": got}, {"ditto": want}, tol)
    assert_grads([hidden.grad, head.grad], [hidden_ref.grad, head_ref.grad], tol)
