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


# ------------------------------------------------------------------------------------------
# across training seeds: per-seed effects, the t interval, the two-level bootstrap, the verdict
# ------------------------------------------------------------------------------------------
from axolotl_focus.intervals import (  # noqa: E402
    min_detectable_effect,
    seed_effects,
    t_interval,
    two_level_bootstrap,
    verdict,
)


def test_seed_effects_are_per_seed_relative_or_absolute_differences_of_means():
    a = np.array([[1.0, 3.0, np.nan], [2.0, 2.0, 2.0]])
    b = np.array([[2.0, 2.0, 9.0], [4.0, 4.0, np.nan]])
    # seed 0: documents 0-1 (the nan pairs out): 2 vs 2; seed 1: documents 0-1: 2 vs 4
    assert seed_effects(a, b).tolist() == [0.0, -0.5]
    assert seed_effects(a, b, relative=False).tolist() == [0.0, -2.0]
    assert math.isnan(seed_effects([[1.0]], [[0.0]])[0])  # relative to 0: undefined


def test_t_interval_closed_forms():
    # two values x, y: mean +- t_{0.975, 1} * |x - y| / 2, t_{0.975, 1} = 12.7062
    mean, lo, hi = t_interval([1.0, 3.0])
    assert (mean, hi - mean) == pytest.approx((2.0, 12.7062047))
    mean, lo, hi = t_interval([0.1, 0.2, 0.3, 0.4])  # sd 0.12910, t_{0.975, 3} = 3.18245
    assert (hi - lo) / 2 == pytest.approx(3.182446 * 0.1290994 / 2, rel=1e-5)
    assert math.isnan(t_interval([5.0])[1]) and t_interval([5.0])[0] == 5.0
    assert t_interval([1.0, float("nan"), 3.0])[0] == 2.0  # unusable seeds left out
    # the detectable effect: (t_{0.975, 3} + t_{0.8, 3}) * sd / 2, t_{0.8, 3} = 0.97847
    assert min_detectable_effect([0.1, 0.2, 0.3, 0.4]) == pytest.approx((3.182446 + 0.978472) * 0.1290994 / 2, rel=1e-5)


def test_two_level_bootstrap_reduces_to_its_levels():
    rng = np.random.default_rng(1)
    b = rng.uniform(10, 20, size=(4, 30))
    # no document noise (every document of a seed alike): only the seeds are resampled
    flat_a = np.repeat(np.array([[8.0], [9.0], [7.0], [8.5]]), 30, axis=1)
    flat_b = np.full((4, 30), 10.0)
    lo, hi = two_level_bootstrap(flat_a, flat_b)
    assert -0.30 <= lo < hi <= -0.10
    assert two_level_bootstrap(flat_a, flat_a) == (0.0, 0.0)
    # one seed: the document bootstrap of the relative change
    lo, hi = two_level_bootstrap(b[:1] * 0.5, b[:1])
    assert lo == pytest.approx(-0.5) and hi == pytest.approx(-0.5)
    lo, hi = two_level_bootstrap(b[:1] * 0.7 + rng.normal(0, 1, size=(1, 30)), b[:1])
    assert lo < -0.3 < hi


@pytest.mark.parametrize("effect", [-0.30, +1.0])
def test_verdict_on_synthetic_effects_inside_outside_and_across_the_interval(effect):
    """A synthetic A = B x (1 + true) per seed, with seed noise: the paper's effect inside the
    interval -> holds; an effect far smaller than the paper's (interval excludes it) -> refuted; a
    noisy effect whose interval spans both 0 and the paper's effect -> not decided."""
    rng = np.random.default_rng(0)
    base = rng.uniform(20, 40, size=(4, 48))

    def judged(true, noise):
        a = base * (1 + true) * (1 + rng.normal(0, noise, size=(4, 1)))
        mean, lo, hi = t_interval(seed_effects(a, base))
        return verdict(lo, hi, effect)

    assert judged(effect, 0.02) == "holds"  # the paper's effect, measured tightly
    assert judged(0.0, 0.02) == "refuted"  # no effect, tight enough to exclude the paper's
    assert judged(effect / 2, 0.6) == "not decided"  # too noisy to tell either
    # the rule at the edges, by hand
    assert verdict(-0.5, -0.1, -0.3) == "holds" and verdict(0.2, 0.9, 0.5) == "holds"
    assert verdict(-0.2, 0.1, -0.3) == "refuted" and verdict(-0.1, 0.3, 0.5) == "refuted"
    assert verdict(-0.4, 0.1, -0.3) == "not decided" and verdict(-0.1, 0.6, 0.5) == "not decided"
    assert verdict(0.1, 0.4, -0.3) == "refuted"  # the opposite direction, excluding 0 too
    assert verdict(float("nan"), float("nan"), -0.3) == "not decided"
