"""The metric registry: every metric the reports show, registered once with its result key, its
label, its direction, how it is aggregated over the evaluated texts and its display decimals.

The evaluation report (:mod:`axolotl_focus.evaluate.report`) takes its columns and formats from
here, the demo report (:mod:`axolotl_focus.demo.report`) its Table 3 / 5 columns, and the demo's
verdicts on the paper's claims (:mod:`axolotl_focus.demo.experiment`) their metric names, precision and
which direction is better. ``higher_is_better`` is ``None`` for descriptive columns that are never
ranked (counts, lengths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import REP_NS, ZERO_SHOT_AVERAGE

AGGREGATIONS = ("mean", "share", "corpus", "sliding_window", "average", "accuracy")


@dataclass(frozen=True)
class Metric:
    """One reported metric.

    ``key``: its key in ``results.json`` (and the flat rows the reports build); ``label``: its column
    name; ``aggregation``: ``mean`` (mean of per-text values), ``share`` (% of texts that meet a
    condition), ``corpus`` (one value from all texts together), ``sliding_window`` (PPL over a
    token stream), ``accuracy`` (a zero-shot task's accuracy, %) or ``average`` (mean over the
    zero-shot tasks); ``decimals``: the digits every table shows."""

    key: str
    label: str
    higher_is_better: bool | None
    aggregation: str
    decimals: int
    description: str = ""

    @property
    def arrow(self) -> str:
        """``↑`` / ``↓`` for ranked metrics, ``""`` for descriptive ones."""
        return "" if self.higher_is_better is None else "↑" if self.higher_is_better else "↓"

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b`` (ValueError for an unranked metric)."""
        if self.higher_is_better is None:
            raise ValueError(f"metric {self.key!r} has no direction")
        return a > b if self.higher_is_better else a < b

    def format(self, value) -> str:
        """``value`` at the metric's decimals; ``-`` for a missing or non-finite value."""
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        return f"{value:.{self.decimals}f}" if ok else "-"


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add ``metric`` to :data:`METRICS` (each key once)."""
    if metric.key in METRICS:
        raise ValueError(f"metric {metric.key!r} is registered already")
    if metric.aggregation not in AGGREGATIONS:
        raise ValueError(f"metric {metric.key!r}: aggregation must be one of {AGGREGATIONS}")
    METRICS[metric.key] = metric
    return metric


def get(key: str) -> Metric:
    """The registered metric ``key`` (KeyError names the known ones)."""
    try:
        return METRICS[key]
    except KeyError:
        raise KeyError(f"unknown metric {key!r}; registered: {sorted(METRICS)}") from None


def label(key: str) -> str:
    return get(key).label


def columns(*keys: str) -> list[tuple[str, str, bool | None, int]]:
    """``(label, key, higher_is_better, decimals)`` of each metric, in order: a report's columns."""
    return [(m.label, m.key, m.higher_is_better, m.decimals) for m in map(get, keys)]


REP_KEYS = tuple(f"rep-{n}" for n in REP_NS)

for _metric in [
    Metric("ppl", "PPL", False, "sliding_window", 2, "perplexity of held-out text (sliding window)"),
    Metric("zero_shot", "0-shot", True, "average", 2, "mean zero-shot accuracy (%) over the averaged tasks"),
    Metric("mauve", "MAUVE", True, "corpus", 3, "MAUVE of the generations against the human continuations"),
    Metric("crep", "CREP", False, "share", 2, "% of continuations with a repeated span's coverage >= threshold"),
    *[Metric(k, k, False, "mean", 2, f"100 x mean(1 - unique / total {k[4:]}-grams)") for k in REP_KEYS],
    Metric("ead", "EAD-1", True, "corpus", 3, "expectation-adjusted distinct unigrams, corpus level"),
    Metric("bertscore", "BERTScore", True, "mean", 3, "BERTScore F1 against the reference answers"),
    Metric("serving_rate", "Serving deg. %", False, "share", 2, "% of generations the serving detector flags"),
    Metric("serving_token_share", "Serving tokens %", False, "share", 2,
           "% of generated tokens inside flagged degenerate spans"),
    Metric("eos_rate", "EOS %", None, "share", 1, "% of generations that end with EOS"),
    Metric("mean_length", "mean length", None, "mean", 1, "mean generated tokens"),
    Metric("ar_head", "AR_head", True, "mean", 3,
           "|H_q & H_p| / |H_q|: the share of the teacher's top-p head in the student's"),
    Metric("ar_tail", "AR_tail", True, "mean", 3, "|T_q & T_p| / |T_q|: the same for the tails"),
    Metric("cor_head", "COR_head", True, "mean", 3, "Pearson correlation of q and p over the teacher's head"),
    Metric("cor_tail", "COR_tail", True, "mean", 3, "Pearson correlation of q and p over the teacher's tail"),
    Metric("count_head", "count_head", None, "mean", 1, "mean |H_p|: the student's top-p head size"),
    Metric("count_head_teacher", "count_head (teacher)", None, "mean", 1, "mean |H_q|: the teacher's top-p head size"),
    Metric("arc_challenge", "Arc.c", True, "accuracy", 2),
    Metric("piqa", "PIQA", True, "accuracy", 2),
    Metric("boolq", "BoolQ", True, "accuracy", 2),
    Metric("openbookqa", "OpenQA", True, "accuracy", 2),
    Metric("hellaswag", "Hellaswag", True, "accuracy", 2),
    Metric("winogrande", "Winogrande", True, "accuracy", 2),
    Metric("truthfulqa_mc2", "TruthfulQA-MC2", True, "accuracy", 2),
    Metric("average", "Average", True, "average", 2, f"mean accuracy over {', '.join(ZERO_SHOT_AVERAGE)}"),
]:
    register(_metric)
