"""RePAIR's loss formulas: the chunked token NLL against cross-entropy (also on the shared grid of
loss_grid.py) and the margin loss by hand."""

import pytest
import torch
import torch.nn.functional as F
from loss_grid import DTYPES, IGNORED, SHAPE_IDS, SHAPES, assert_grads, assert_values, leaves, problem

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


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("ignored", IGNORED)
def test_grid_chunked_token_nll_matches_cross_entropy(shape, dtype, tol, ignored):
    """Per-token values and the gradients of a weighted sum, against fp32 cross-entropy of the logits."""
    x = problem(shape, dtype, ignored)
    upstream = torch.rand(int(x.valid.sum()), generator=torch.Generator().manual_seed(1))
    h, w = leaves(x.hs, x.ws)
    nll = chunked_token_nll(h[x.valid], w, x.labels[x.valid], chunk_size=shape[4])
    (nll * upstream).sum().backward()
    h_ref, w_ref = leaves(x.hs, x.ws)
    ref = F.cross_entropy((h_ref @ w_ref.T).float(), x.labels, reduction="none")[x.valid]
    (ref * upstream).sum().backward()
    assert_values({"nll": nll}, {"nll": ref}, tol)
    assert_grads([h.grad, w.grad], [h_ref.grad, w_ref.grad], tol)


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

