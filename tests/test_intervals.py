"""axolotl_focus.intervals: per-document values agree with the corpus metrics, and the bootstrap
intervals have their closed forms on degenerate inputs."""

import math
import random

import numpy as np
import pytest

from axolotl_focus.degeneration import crep, rep_n
from axolotl_focus.intervals import bootstrap_ci, document_values, paired_difference, paired_reduction


def _rows(seed: int, docs: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for d in range(docs):
        if d % 3 == 0:  # a loop
            out.append([rng.randrange(50) for _ in range(5)] + [7, 8, 9, 10] * 12)
        else:
            out.append([rng.randrange(400) for _ in range(rng.randrange(2, 60))])
    return out


def test_document_values_pool_to_the_corpus_metrics_over_seeds():
    seeds = [_rows(s) for s in range(3)]
    pooled = [row for rows in seeds for row in rows]
    assert np.mean(document_values(seeds, "crep")) == pytest.approx(crep(pooled))
    # rep-3 pools exactly when every continuation has a value (all have >= 3 tokens here)
    assert np.mean(document_values(seeds, "rep-3")) == pytest.approx(rep_n(pooled, 3))
    single = document_values(seeds[:1], "crep")
    assert set(single[::3]) == {100.0}


def test_short_continuations_have_no_rep_value():
    values = document_values([[[1, 2], [1, 2, 3, 1, 2, 3]]], "rep-3")
    assert math.isnan(values[0]) and values[1] == pytest.approx(100 * (1 - 3 / 4))
    with pytest.raises(ValueError, match="crep or rep-N"):
        document_values([[[1, 2, 3]]], "mauve")
    with pytest.raises(ValueError, match="same documents"):
        document_values([[[1]], [[1], [2]]], "crep")


def test_intervals_closed_forms():
    assert bootstrap_ci(np.full(20, 3.0)) == (3.0, 3.0)
    b = np.linspace(10, 40, 25)
    red, lo, hi = paired_reduction(0.5 * b, b)  # A is exactly half of B on every document
    assert (red, lo, hi) == pytest.approx((0.5, 0.5, 0.5))
    d, lo, hi = paired_difference(b + 2.0, b)
    assert (d, lo, hi) == pytest.approx((2.0, 2.0, 2.0))
    red, *_ = paired_reduction(np.ones(4), np.zeros(4))
    assert math.isnan(red)


def test_bootstrap_interval_covers_the_mean_and_is_seeded():
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 2.0, size=200)
    lo, hi = bootstrap_ci(x)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 * x.std() / math.sqrt(200), rel=0.2)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
