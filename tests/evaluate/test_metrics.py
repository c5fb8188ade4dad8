"""The metric registry (axolotl_focus/evaluate/metrics.py): each metric's direction agrees with
its definition, and the evaluation report, the demo report and the demo's paper checks take their
columns, formats and directions from it."""

import dataclasses
import random

import pytest

from axolotl_focus.degeneration import repetition_metrics, serving_degeneration
from axolotl_focus.demo import experiment
from axolotl_focus.evaluate import metrics
from axolotl_focus.evaluate.config import REP_NS, ZERO_SHOT_TASKS, EvalConfig
from axolotl_focus.evaluate.report import flat_metrics, markdown_report


def test_every_metric_is_registered_once_with_a_known_aggregation():
    keys = ["ppl", "zero_shot", "mauve", "crep", "ead", "bertscore", "serving_rate", "serving_token_share",
            "eos_rate", "mean_length", "ar_head", "ar_tail", "cor_head", "cor_tail", "count_head",
            "count_head_teacher", "average", *[f"rep-{n}" for n in REP_NS], *ZERO_SHOT_TASKS]
    assert sorted(keys) == sorted(metrics.METRICS)
    for key, m in metrics.METRICS.items():
        assert m.key == key and m.label and m.aggregation in metrics.AGGREGATIONS and m.decimals >= 0
    with pytest.raises(ValueError, match="registered already"):
        metrics.register(metrics.get("crep"))
    with pytest.raises(KeyError, match="unknown metric"):
        metrics.get("nope")


def test_directions_match_the_definitions():
    """Repetition metrics rank a looping text as worse than a diverse one, EAD the other way."""
    rng = random.Random(0)
    diverse = [[rng.randrange(500) for _ in range(120)] for _ in range(8)]
    looping = [list(range(6)) * 20 for _ in range(8)]
    good, bad = repetition_metrics(diverse, 500), repetition_metrics(looping, 500)
    for key in ("crep", *metrics.REP_KEYS, "ead"):
        assert metrics.get(key).better(good[key], bad[key]), key
    serving_good = serving_degeneration(diverse, 120)
    serving_bad = serving_degeneration(looping, 120)
    assert metrics.get("serving_rate").better(serving_good.rate_pct, serving_bad.rate_pct)
    assert metrics.get("serving_token_share").better(serving_good.token_share_pct, serving_bad.token_share_pct)
    # by definition: perplexity lower is better; similarity to the human text / teacher and accuracy higher
    assert metrics.get("ppl").higher_is_better is False
    for key in ("mauve", "bertscore", "zero_shot", "average", "ar_head", "ar_tail", "cor_head", "cor_tail",
                *ZERO_SHOT_TASKS):
        assert metrics.get(key).higher_is_better is True, key
    for key in ("eos_rate", "mean_length", "count_head", "count_head_teacher"):  # descriptive, never ranked
        assert metrics.get(key).higher_is_better is None and metrics.get(key).arrow == ""
        with pytest.raises(ValueError):
            metrics.get(key).better(1.0, 2.0)
    # the demo's claims are about repetition: less is better on each of their metrics
    assert all(metrics.get(m).higher_is_better is False for m in experiment.METRICS)


def test_format_uses_the_metric_decimals():
    assert metrics.get("mauve").format(0.61) == "0.610" and metrics.get("crep").format(7.3) == "7.30"
    assert metrics.get("eos_rate").format(50) == "50.0"
    assert metrics.get("crep").format(float("nan")) == "-" and metrics.get("crep").format(None) == "-"


def _result(name, crep, mauve):
    mean = {"crep": crep, "mauve": mauve, "rep-3": 1.0, "rep-4": 1.0, "rep-5": 0.5, "rep-6": 0.25, "ead": 0.3,
            "serving_rate": 0.0, "serving_token_share": 0.0}
    return {"model": name, "settings": EvalConfig().__dict__ | {"seeds": [0]}, "ead_vocab_size": 10,
            "perplexity": {"ppl": 20.0, "window": 8, "stride": 4, "scored": 9, "data": "x"},
            "open_ended": {"decodings": {"top_p0.9": {"mean": mean}}}}


def test_evaluation_report_columns_come_from_the_registry(monkeypatch):
    md = markdown_report([_result("KD", 7.3, 0.61), _result("FOCUS", 1.7, 0.64)])
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    keys = ["ppl", "zero_shot", "mauve", "crep", *metrics.REP_KEYS, "serving_rate", "serving_token_share"]
    assert header == "| Method | " + " | ".join(f"{metrics.label(k)} ({metrics.get(k).arrow})" for k in keys) + " |"
    # the cells are the registry's formats
    monkeypatch.setitem(metrics.METRICS, "mauve", dataclasses.replace(metrics.get("mauve"), decimals=1))
    kd = next(line for line in markdown_report([_result("KD", 7.3, 0.61)]).splitlines() if line.startswith("| KD"))
    assert "| 0.6 |" in kd


def test_demo_tables_and_claims_ask_the_registry(monkeypatch):
    flat = flat_metrics(_result("KD", 7.3, 0.61), "open_ended", "top_p0.9")
    assert flat["ppl"] == 20.0 and flat["crep"] == 7.3
    # the paper's effects take their sign from the registry: RePAIR better on CREP = a cut
    repair = next(c for c in experiment.COMPARISONS if c.a == "ce-repair" and c.b == "ce")
    pruning = next(c for c in experiment.COMPARISONS if c.claim == "a")
    assert repair.effect("crep") == -0.30 and pruning.effect("crep") == +1.0
    assert experiment.verdict(-0.5, -0.35, repair.effect("crep")) == "holds"
    monkeypatch.setitem(metrics.METRICS, "crep", dataclasses.replace(metrics.get("crep"), higher_is_better=True))
    assert repair.effect("crep") == +0.30 and pruning.effect("crep") == -1.0
    assert experiment.verdict(-0.5, -0.35, repair.effect("crep")) == "refuted"
