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
