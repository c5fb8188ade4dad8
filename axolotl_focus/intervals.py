"""Seeds and intervals for generation metrics: per-document values, document bootstrap, paired
relative differences.

The demo's claims compare models that continued the *same* held-out prefixes, each under the
same generation seeds. A document's value is the mean over the seeds of its per-continuation
metric: ``crep`` = 100 x [coverage >= threshold] (CREP is their mean), ``rep-n`` = 100 x
(1 - unique/total n-grams) of the continuation (rep-n is their mean; a continuation shorter than
n has no value and is left out, as in :func:`axolotl_focus.degeneration.rep_n`). So the mean of
the document values is the metric pooled over seeds, and resampling documents (all seeds of a
document together) gives a cluster bootstrap that respects the pairing by prefix.

- :func:`bootstrap_ci`: percentile interval of a metric's mean (``resamples`` draws of the
  documents with replacement, numpy ``default_rng(seed)``).
- :func:`paired_difference`: ``mean(A) - mean(B)`` on the same documents, with its interval.
- :func:`paired_reduction`: the relative reduction ``1 - mean(A) / mean(B)`` of model A against
  model B on the same documents, with its percentile interval from the same resampled documents
  for both (draws where ``mean(B) == 0`` are left out; when B's mean is 0 the reduction is
  undefined and returned as ``nan``).

Across training seeds (the experiment of :mod:`axolotl_focus.demo.experiment`): model A and B are
trained once per seed, and ``a[s, d]`` / ``b[s, d]`` are the document values of seed ``s``'s models
on the same documents ``d``.

- :func:`seed_effects`: per seed, ``mean_d(a) - mean_d(b)`` (``relative``: ``mean_d(a) / mean_d(b) - 1``),
  means over the documents where both have a value.
- :func:`t_interval`: the mean of the per-seed effects and its two-sided Student-t interval,
  ``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)`` (sd with ``n - 1``): the interval across seeds.
- :func:`two_level_bootstrap`: the cross-check: ``resamples`` draws of ``n`` seeds with replacement,
  then, within each drawn seed, of its documents with replacement (the same documents for A and B);
  the statistic of a draw is the mean over the drawn seeds of their effects; percentile interval.
- :func:`min_detectable_effect`: the effect a two-sided t-test at ``1 - level`` detects with
  probability ``power`` from ``n`` seeds with that sd, ``(t_{(1+level)/2, n-1} + t_{power, n-1}) * sd / sqrt(n)``.
- :func:`verdict`: the rule fixed before the run: **holds** when the interval excludes 0 on the
  side of the paper's effect; else **refuted** when it excludes the paper's effect (it lies wholly
  on the other side of it, towards or past 0); else **not decided**.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

from .degeneration import DEFAULT_THRESHOLD, coverage, sequence_rep


def document_values(seed_rows: Sequence[Sequence[Sequence[int]]], metric: str,
                    threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Per-document values (mean over seeds) of ``metric`` (``crep`` or ``rep-N``);
    ``seed_rows[s][d]`` = the token ids generated for document ``d`` under seed ``s``; ``nan``
    where no seed gives a value."""
    if not seed_rows:
        return np.zeros(0)
    docs = len(seed_rows[0])
    if any(len(rows) != docs for rows in seed_rows):
        raise ValueError("every seed must cover the same documents")
    values = np.full((len(seed_rows), docs), np.nan)
    for s, rows in enumerate(seed_rows):
        for d, toks in enumerate(rows):
            if metric == "crep":
                values[s, d] = 100.0 * coverage(list(toks), threshold=threshold).is_degenerate
            elif metric.startswith("rep-"):
                v = sequence_rep(list(toks), int(metric[4:]))
                values[s, d] = np.nan if v is None else 100.0 * v
            else:
                raise ValueError(f"metric: crep or rep-N, got {metric!r}")
    with np.errstate(invalid="ignore"):
        counts = np.sum(~np.isnan(values), axis=0)
        sums = np.nansum(values, axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(values: np.ndarray, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``nanmean(values)`` over documents resampled with replacement."""
    values = np.asarray(values, dtype=float)
    if values.size == 0 or np.all(np.isnan(values)):
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw of only nan documents
        means = np.nanmean(values[_draws(values.size, resamples, seed)], axis=1)
    means = means[~np.isnan(means)]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_reduction(a: np.ndarray, b: np.ndarray, resamples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """``(1 - mean(a)/mean(b), lower, upper)`` on the documents where both have a value."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same documents ({a.shape} vs {b.shape})")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size == 0 or b.mean() == 0:
        return math.nan, math.nan, math.nan
    idx = _draws(a.size, resamples, seed)
    ma, mb = a[idx].mean(axis=1), b[idx].mean(axis=1)
    ok = mb > 0
    ratios = 1.0 - ma[ok] / mb[ok]
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(1.0 - a.mean() / b.mean()), float(lo), float(hi)


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """``(mean(a) - mean(b), lower, upper)`` on the documents where both have a value."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same documents ({a.shape} vs {b.shape})")
    diff = (a - b)[~(np.isnan(a) | np.isnan(b))]
    if diff.size == 0:
        return math.nan, math.nan, math.nan
    means = diff[_draws(diff.size, resamples, seed)].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(diff.mean()), float(lo), float(hi)


def seed_effects(a: np.ndarray, b: np.ndarray, relative: bool = True) -> np.ndarray:
    """Per seed (rows of ``a`` / ``b``, documents as columns): the effect of A against B."""
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same seeds and documents ({a.shape} vs {b.shape})")
    keep = ~(np.isnan(a) | np.isnan(b))
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        ma, mb = np.nanmean(np.where(keep, a, np.nan), axis=1), np.nanmean(np.where(keep, b, np.nan), axis=1)
        return np.where(mb > 0, ma / mb - 1.0, np.nan) if relative else ma - mb


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lower, upper)`` of the finite ``values`` (Student t, ``n - 1`` degrees of freedom);
    the bounds are ``nan`` with fewer than two values."""
    from scipy import stats  # heavy: only for an interval

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def min_detectable_effect(values, level: float = 0.95, power: float = 0.8) -> float:
    """The smallest effect (in the values' unit) the seeds ``values`` detect with ``power`` (nan
    with fewer than two finite values)."""
    from scipy import stats  # heavy: only for this estimate

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return math.nan
    df = v.size - 1
    return float((stats.t.ppf((1 + level) / 2, df) + stats.t.ppf(power, df)) * v.std(ddof=1) / math.sqrt(v.size))


def two_level_bootstrap(a: np.ndarray, b: np.ndarray, relative: bool = True, resamples: int = 2000,
                        level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean per-seed effect, resampling seeds, then documents within each
    drawn seed (module docstring)."""
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same seeds and documents ({a.shape} vs {b.shape})")
    seeds, docs = a.shape
    if seeds == 0 or docs == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, seeds, size=(resamples, seeds))
    rows = rng.integers(0, docs, size=(resamples, seeds, docs))
    ra, rb = a[pick[..., None], rows], b[pick[..., None], rows]
    keep = ~(np.isnan(ra) | np.isnan(rb))
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        ma, mb = np.nanmean(np.where(keep, ra, np.nan), axis=2), np.nanmean(np.where(keep, rb, np.nan), axis=2)
        effect = np.where(mb > 0, ma / mb - 1.0, np.nan) if relative else ma - mb
        stat = np.nanmean(effect, axis=1)
    stat = stat[np.isfinite(stat)]
    if stat.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(stat, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


VERDICTS = ("holds", "refuted", "not decided")


def verdict(lower: float, upper: float, effect: float) -> str:
    """The verdict on a claimed effect ``effect`` (signed; e.g. -0.3 for a 30% cut) from the interval
    ``[lower, upper]`` of the measured effect (module docstring)."""
    if not (math.isfinite(lower) and math.isfinite(upper)) or effect == 0:
        return "not decided"
    if (upper < 0) if effect < 0 else (lower > 0):
        return "holds"
    if (lower > effect) if effect < 0 else (upper < effect):
        return "refuted"
    return "not decided"
