"""RePAIR's loss formulas: the chunked token NLL against cross-entropy and the margin loss by hand."""

import pytest
import torch
import torch.nn.functional as F

from axolotl_focus.train.losses import chunked_token_nll, repair_margin_loss


def test_chunked_token_nll_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 8, generator=g, requires_grad=True)
    w = torch.randn(40, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 40, (23,), generator=g)
    upstream = torch.rand(23, generator=g)
    (chunked_token_nll(h, w, y, chunk_size=5) * upstream).sum().backward()
    got = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    nll = F.cross_entropy(h @ w.T, y, reduction="none")
    (nll * upstream).sum().backward()
    torch.testing.assert_close(chunked_token_nll(h, w, y, 7), nll.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], w.grad, rtol=1e-5, atol=1e-6)


def test_margin_loss_by_hand():
    # rows 0/1 = pair A (chosen mean 1.0, rejected mean 3.0), rows 2/3 = pair B (2.0 vs 1.5)
    nll = torch.tensor([1.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0], requires_grad=True)
    row = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    loss, stats = repair_margin_loss(nll, row, torch.tensor([0, 2]), torch.tensor([1, 3]), 4, margin=1.0)
    # A: max(0, 1 + 1.0 - 3.0) = 0 ; B: max(0, 1 + 2.0 - 1.5) = 1.5 ; mean = 0.75
    assert loss.item() == pytest.approx(0.75)
    assert stats["active"].item() == pytest.approx(0.5)
    loss.backward()
    # only pair B is active: d/dnll = 0.5 * (+1/1 for chosen row 2, -1/2 for each rejected token of row 3)
    assert nll.grad.tolist() == pytest.approx([0, 0, 0, 0, 0.5, -0.25, -0.25])

