"""The experiment's verdicts: the paper's claims as comparisons fixed before the run, and their
measurement across training seeds (:func:`measure`).

The claims (:data:`COMPARISONS`), each a comparison of arm A with arm B (or the unpruned teacher)
and the paper's effect on repetition it is tested against, relative (``mean(A) / mean(B) - 1``):

* (a) Table 1: the pruned and fine-tuned model (CE) repeats more than the unpruned one; the paper
  measured CREP 5.9% -> 12.4% under top-p sampling: tested against +100%.
* (b) Table 3: FOCUS + RePAIR cuts degeneration "~30-60%" against FOCUS and against KD, and
  RePAIR alone against CE (Table 5: rep-3 12.88 -> 8.28, -36%), at no more than +10% PPL against
  CE: tested against -30%.
* (c) Table 5: RePAIR repeats less than DPO trained on the same pairs after the same SFT (rep-3
  9.76 -> 8.28, -15%): tested against -15%.

**Protocol.** Metrics: rep-3 and CREP (:mod:`axolotl_focus.intervals` document values, the mean
over a document's generation seeds); the primary condition is top-p 0.9 at the temperature chosen
on the valid split, greedy decoding is secondary (reported, not part of a claim's verdict). Per
training seed, the effect of A against B on the same documents and generation seeds
(:func:`~axolotl_focus.intervals.seed_effects`); across the seeds its mean with the 95% Student-t
interval (:func:`~axolotl_focus.intervals.t_interval`), cross-checked by the two-level bootstrap
(seeds, then documents); the effect the run could have detected (80% power,
:func:`~axolotl_focus.intervals.min_detectable_effect`). Verdict
(:func:`~axolotl_focus.intervals.verdict` on the t interval): **holds** when the interval excludes 0
in the paper's direction; **refuted** when it excludes the paper's effect; **not decided** otherwise.
(b)'s PPL gate: the per-seed ratio ``PPL(A) / PPL(CE) - 1`` with its t interval passes when the
interval's upper end is at most +10%, fails when its lower end is above +10%. A claim's verdict:
**refuted** when any of its primary rows is refuted or its gate fails; **holds** when every primary
row holds and every gate passes; else **not decided**.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import evaluate
from ..evaluate import metrics
from ..files import write_json
from ..intervals import (
    document_values,
    min_detectable_effect,
    seed_effects,
    t_interval,
    two_level_bootstrap,
    verdict,
)
from .settings import ARMS, DemoSettings, run_label
from .stages.eval import generations

TEACHER = "teacher (unpruned)"
METRICS = ("rep-3", "crep")
PPL_GATE = 0.10


@dataclass(frozen=True)
class Comparison:
    claim: str  # "a" / "b" / "c"
    a: str  # an arm
    b: str  # an arm, or TEACHER
    size: float  # the paper's effect: the relative change of the metric, as a magnitude
    better: bool  # the paper says A is better than B on the metric (else worse)
    ppl_gate: bool = False  # (b): A's PPL within +10% of CE's

    def label(self) -> str:
        return f"{ARMS[self.a].label} vs {self.b if self.b == TEACHER else ARMS[self.b].label}"

    def effect(self, metric: str) -> float:
        """The paper's relative effect on ``metric``, signed by the metric registry's direction
        (:mod:`axolotl_focus.evaluate.metrics`): better on a lower-is-better metric is a cut."""
        return self.size if self.better == metrics.get(metric).higher_is_better else -self.size


COMPARISONS = (
    Comparison("a", "ce", TEACHER, 1.00, better=False),
    Comparison("b", "focus-repair", "focus", 0.30, better=True, ppl_gate=True),
    Comparison("b", "focus-repair", "kd", 0.30, better=True, ppl_gate=True),
    Comparison("b", "ce-repair", "ce", 0.30, better=True, ppl_gate=True),
    Comparison("c", "ce-repair", "dpo", 0.15, better=True),
)
CLAIMS = {
    "a": "(a) Table 1: the pruned, fine-tuned model repeats more than the unpruned one",
    "b": "(b) Table 3: RePAIR cuts repetition by ~30% or more (with FOCUS vs FOCUS and KD; alone vs CE) at <= +10% "
         "PPL vs CE",
    "c": "(c) Table 5: RePAIR repeats less than DPO on the same pairs after the same SFT",
}


def conditions(s: DemoSettings) -> list[tuple[str, str, bool]]:
    """``(key, label, primary)`` of the decoding conditions."""
    return [("top_p", f"top-p 0.9, T={s.eval_temperature:g}", True), ("greedy", "greedy", False)]


def _doc_matrix(cfg, names: list[str], decoding: str, metric: str) -> np.ndarray | None:
    """``[len(names), documents]`` document values of ``metric`` (None when a generation is missing)."""
    out = []
    for name in names:
        try:
            seed_rows = [[r["tokens"] for r in rows] for rows in generations(cfg, name, decoding)]
        except FileNotFoundError:
            return None
        out.append(document_values(seed_rows, metric))
    return np.array(out)


def _ppl(cfg, name: str) -> float | None:
    path = evaluate.model_dir(cfg, name) / "results.json"
    if not path.is_file():
        return None
    return ((json.loads(path.read_text(encoding="utf-8")).get("perplexity")) or {}).get("ppl")


def _stats(effects: np.ndarray, a: np.ndarray, b: np.ndarray, relative: bool = True) -> dict:
    mean, lo, hi = t_interval(effects)
    boot = two_level_bootstrap(a, b, relative=relative)
    return {"per_seed": [None if not math.isfinite(x) else float(x) for x in effects], "mean": mean, "lower": lo,
            "upper": hi, "half_width": (hi - lo) / 2 if math.isfinite(hi) else math.nan, "bootstrap": list(boot),
            "mde": min_detectable_effect(effects), "seeds": int(np.isfinite(effects).sum())}


def ppl_gate(cfg, s: DemoSettings, arm: str) -> dict | None:
    """The PPL of ``arm`` against CE's, per seed (``PPL(arm) / PPL(CE) - 1``), and the gate."""
    pa = [_ppl(cfg, run_label(arm, k)) for k in s.train_seeds]
    pb = [_ppl(cfg, run_label("ce", k)) for k in s.train_seeds]
    if any(p is None for p in pa + pb):
        return None
    ratios = np.array([x / y - 1.0 for x, y in zip(pa, pb)])
    mean, lo, hi = t_interval(ratios)
    state = "passes" if hi <= PPL_GATE else "fails" if lo > PPL_GATE else "undecided"
    if not math.isfinite(hi):
        state = "undecided"
    return {"arm": arm, "ppl": pa, "ppl_ce": pb, "per_seed": ratios.tolist(), "mean": mean, "lower": lo, "upper": hi,
            "state": state}


def measure(s: DemoSettings, cfg) -> dict:
    """Every comparison of :data:`COMPARISONS` whose arms ran, under every condition and metric,
    and the claims' verdicts (module docstring). ``cfg``: the evaluation's config."""
    rows, gates = [], {}
    seeds = list(s.train_seeds)
    for comp in COMPARISONS:
        if comp.a not in s.arms or (comp.b != TEACHER and comp.b not in s.arms):
            continue
        a_names = [run_label(comp.a, k) for k in seeds]
        b_names = [TEACHER] * len(seeds) if comp.b == TEACHER else [run_label(comp.b, k) for k in seeds]
        if comp.ppl_gate and comp.a not in gates:
            gates[comp.a] = ppl_gate(cfg, s, comp.a)
        for decoding, label, primary in conditions(s):
            for metric in METRICS:
                a, b = _doc_matrix(cfg, a_names, decoding, metric), _doc_matrix(cfg, b_names, decoding, metric)
                if a is None or b is None:
                    continue
                effects = seed_effects(a, b, relative=True)
                stats = _stats(effects, a, b)
                effect = comp.effect(metric)
                rows.append({"claim": comp.claim, "comparison": comp.label(), "a": comp.a, "b": comp.b,
                             "metric": metric, "condition": label, "primary": primary, "effect": effect,
                             "a_mean": float(np.nanmean(a)), "b_mean": float(np.nanmean(b)),
                             "a_per_seed": np.nanmean(a, axis=1).tolist(), "b_per_seed": np.nanmean(b, axis=1).tolist(),
                             "verdict": verdict(stats["lower"], stats["upper"], effect), **stats})
    claims = {}
    for claim in CLAIMS:
        primary = [r for r in rows if r["claim"] == claim and r["primary"]]
        if not primary:
            continue
        gated = [gates.get(c.a) for c in COMPARISONS if c.claim == claim and c.ppl_gate and c.a in gates]
        if any(r["verdict"] == "refuted" for r in primary) or any(g and g["state"] == "fails" for g in gated):
            word = "refuted"
        elif all(r["verdict"] == "holds" for r in primary) and all(g and g["state"] == "passes" for g in gated):
            word = "holds"
        else:
            word = "not decided"
        claims[claim] = word
    return {"rows": rows, "gates": {k: v for k, v in gates.items() if v}, "claims": claims, "seeds": seeds}


def write(s: DemoSettings, cfg, path: Path) -> dict:
    """:func:`measure`, also written to ``path`` (JSON)."""
    result = measure(s, cfg)
    write_json(path, result, indent=2, default=str)
    return result
