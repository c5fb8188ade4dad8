"""The demo report's checks of the paper's claims: the micro-model checks on the measured means
(:func:`paper_checks`), the real-model Table 1 and claims with paired document-bootstrap intervals
(:func:`real_claims`) and the teacher-cache comparison (:func:`cache_comparison`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..evaluate import metrics
from ..files import read_json
from .settings import CACHE_PAIRS, RUNS, DemoSettings, fmt_time

if TYPE_CHECKING:
    from .stages import Demo


# (claim, model A, model B, metrics where A should be better than B: the registry's direction, here
# less repetition)
_CLAIMS = [
    ("FOCUS repeats less than KD", "FOCUS", "KD", ("crep", "rep-3")),
    ("RePAIR reduces repetition (FOCUS + RePAIR vs FOCUS)", "FOCUS + RePAIR", "FOCUS", ("crep", "rep-3")),
    ("RePAIR reduces repetition (CE + RePAIR vs CE)", "CE + RePAIR", "CE", ("crep", "rep-3")),
    ("DPO reduces repetition vs CE", "DPO", "CE", ("rep-3",)),
    ("RePAIR repeats less than DPO", "CE + RePAIR", "DPO", ("rep-3",)),
    ("RePAIR repeats less than DPO (with FOCUS)", "FOCUS + RePAIR", "DPO", ("rep-3",)),
]


def _verdict(a: float, b: float, metric: str, dec: int | None = None, a_better: bool = True) -> str:
    """``holds`` when A is better than B on ``metric`` (the registry's direction; with
    ``a_better=False``: when A is worse), ``tie`` when equal at ``dec`` decimals (default: the metric's)."""
    m = metrics.get(metric)
    dec = m.decimals if dec is None else dec
    if round(a, dec) == round(b, dec):
        return "tie"
    return "holds" if m.better(a, b) == a_better else "does not hold"


def paper_checks(conds: dict[str, dict[str, dict]], t1: dict | None) -> list[str]:
    """Table rows ``| claim | metric | condition | measured | verdict |`` from the measured numbers."""
    rows = []
    if t1:
        crep = {(r["model"], r["decoding"]): r["crep"] for r in t1["rows"]}
        for pruned in ("width pruned", "depth pruned", "width pruned + CE fine-tuning"):
            for dec in ("top-p 0.9", "greedy"):
                a, b = crep.get((pruned, dec)), crep.get(("unpruned", dec))
                if a is not None and b is not None:
                    verdict = _verdict(a, b, "crep", dec=1, a_better=False)  # at Table 1's precision
                    rows.append(f"| pruning increases repetition (Table 1) | CREP | {pruned}, {dec} | "
                                f"{a:.1f} vs unpruned {b:.1f} | {verdict} |")
    for claim, a_name, b_name, keys in _CLAIMS:
        for cond, flat in conds.items():
            a, b = flat.get(a_name), flat.get(b_name)
            if not a or not b:
                continue
            for metric in keys:
                va, vb, dec = a.get(metric), b.get(metric), metrics.get(metric).decimals
                if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                    rows.append(f"| {claim} | {metrics.label(metric)} | {cond} | {a_name} {va:.{dec}f} vs "
                                f"{b_name} {vb:.{dec}f} | {_verdict(va, vb, metric)} |")
    return rows


# the real-model conditions: (label, which eval config, decoding key, seed offsets attribute)
_CONDITIONS = (("top-p 0.9, T={low}", "low", "top_p0.9", "eval_low_seeds"), ("top-p 0.9, T=1", "main", "top_p0.9",
               "eval_seeds"), ("greedy", "main", "greedy", None))
TABLE1_MODELS = (("unpruned", "teacher (unpruned)"), ("width pruned", "width pruned"), ("depth pruned", "depth pruned"),
                 ("width pruned + CE fine-tuning", "CE"))
CLAIM_METRICS = ("crep", "rep-3")
MIN_REDUCTION = 0.30  # Table 3 claim: FOCUS + RePAIR cuts CREP and rep-3 by at least 30% ...
MAX_PPL_INCREASE = 0.10  # ... at no more than +10% PPL


def _doc_values(demo: Demo, which: str, model: str, key: str, seeds: list[int | None], metric: str):
    """Per-document values of ``metric`` for ``model`` under one condition (see
    :mod:`axolotl_focus.intervals`), read from the evaluation's generation files; None if missing."""
    from ..intervals import document_values

    folder = _model_dir_of(demo, which, model) / "generations"
    seed_rows = []
    for seed in seeds:
        path = folder / (f"open_ended.{key}.jsonl" if seed is None else f"open_ended.{key}.seed{seed}.jsonl")
        if not path.is_file():
            return None
        with open(path, encoding="utf-8") as handle:
            seed_rows.append([json.loads(line)["tokens"] for line in handle if line.strip()])
    return document_values(seed_rows, metric)


def _conditions(s: DemoSettings) -> list[tuple[str, str, str, list[int | None]]]:
    out = []
    for label, which, key, seeds_attr in _CONDITIONS:
        if which == "low" and not s.eval_low_temperature:
            continue
        seeds = [None] if seeds_attr is None else [s.seed + k for k in getattr(s, seeds_attr)]
        out.append((label.format(low=f"{s.eval_low_temperature:g}"), which, key, seeds))
    return out


def _ci(lo: float, hi: float, dec: int = 1, pct: bool = False) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "[-]"
    f = (lambda v: f"{100 * v:+.0f}%") if pct else (lambda v: f"{v:.{dec}f}")
    return f"[{f(lo)}, {f(hi)}]"


def real_claims(demo: Demo) -> tuple[list[str], list[str]]:
    """The real-model report's Table 1 (from the evaluation's generations) and the paper's three
    claims checked with seeds and intervals: (a) Table 1, pruned + fine-tuned repeats more than
    unpruned; (b) Table 3, FOCUS + RePAIR cuts CREP and rep-3 by >= 30% relative vs KD and vs CE at
    <= +10% PPL; (c) Table 5, RePAIR at or below DPO's rep-3 on the same pairs."""
    s = demo.s
    conds = _conditions(s)
    ppl = {}
    for name in demo.eval_models():
        res = read_json(_model_dir_of(demo, "main", name) / "results.json") or {}
        ppl[name] = (res.get("perplexity") or {}).get("ppl")
    table = _real_table1(demo, conds)
    rows = _claim_a(demo, conds) + _claim_b(demo, conds, ppl) + _claim_c(demo, conds, ppl)
    if not rows:
        return table, []
    claims = ["## The paper's claims on this real model", "",
              "Each claim checked on this run's generations: paired by document (the same prefixes and generation "
              "seeds for both models), with the 95% bootstrap interval of the difference (points) or of the "
              "relative change in brackets. \"holds\" needs the paper's direction with an interval that "
              f"excludes 0 (and for (b) a cut of at least {MIN_REDUCTION:.0%} at no more than "
              f"+{MAX_PPL_INCREASE:.0%} PPL); one training seed per method, so training noise is not in the "
              "intervals.", "", "| paper's claim | metric | condition | measured | verdict |", "|---|---|---|---|---|"]
    return table, claims + rows + [""]



def _values(demo: Demo, name: str, which: str, key: str, seeds: list[int | None], metric: str):
    return _doc_values(demo, which, name, key, seeds, metric)


def _real_table1(demo: Demo, conds: list) -> list[str]:
    """The real model's Table 1 rows: CREP and rep-3 with bootstrap intervals per model and condition."""
    from ..intervals import bootstrap_ci

    s = demo.s
    n_docs = s.eval_documents
    table = ["## Table 1 (real model): repetition before and after pruning", "",
             f"{n_docs} held-out WikiText-2 test prefixes of {s.eval_prefix_tokens} tokens, {s.eval_new_tokens} new "
             "tokens; CREP (%) and rep-3 (x100): mean over the documents and generation seeds, 95% bootstrap "
             "interval over documents in brackets. The paper's Table 1 pruned rows are fine-tuned; here 'width "
             "pruned + CE fine-tuning' is the CE run of stage 5 (the paper's condition), the other pruned rows "
             "are measured right after pruning.", "",
             "| model | decoding | seeds | CREP (%) | rep-3 |", "|---|---|---|---|---|"]
    for label, model in TABLE1_MODELS:
        for cond, which, key, seeds in conds:
            cells = []
            for metric in CLAIM_METRICS:
                v = _values(demo, model, which, key, seeds, metric)
                cells.append("-" if v is None else f"{np.nanmean(v):.1f} {_ci(*bootstrap_ci(v))}")
            if cells != ["-", "-"]:
                table.append(f"| {label} | {cond} | {len([x for x in seeds if x is not None]) or 1} | "
                             + " | ".join(cells) + " |")
    table.append("")
    return table


def _verdict_more(d: float, lo: float, hi: float) -> str:
    """Claim (a)'s verdict: A repeats more than B by ``d`` points, interval ``[lo, hi]``."""
    if not math.isfinite(d):
        return "n/a"
    if d > 0:
        return "holds" if lo > 0 else "holds in direction (interval includes 0)"
    return "does not hold" if hi < 0 or d < 0 else "tie"


def _claim_a(demo: Demo, conds: list) -> list[str]:
    """Claim (a), Table 1: the pruned + fine-tuned (CE) model repeats more than the unpruned one."""
    from ..intervals import paired_difference

    rows = []
    for cond, which, key, seeds in conds:
        for metric in CLAIM_METRICS:
            a = _values(demo, "CE", which, key, seeds, metric)
            b = _values(demo, "teacher (unpruned)", which, key, seeds, metric)
            if a is None or b is None:
                continue
            d, lo, hi = paired_difference(a, b)
            rows.append("| (a) Table 1: pruned + fine-tuned repeats more than unpruned | "
                        f"{metrics.label(metric)} "
                        f"| {cond} | CE-tuned {np.nanmean(a):.1f} vs unpruned {np.nanmean(b):.1f}: {d:+.1f} "
                        f"{_ci(lo, hi)} | {_verdict_more(d, lo, hi)} |")
    return rows


def _claim_b(demo: Demo, conds: list, ppl: dict) -> list[str]:
    """Claim (b), Table 3: FOCUS + RePAIR cuts CREP and rep-3 by >= 30% vs KD and CE at <= +10% PPL."""
    from ..intervals import paired_reduction

    rows = []
    for cond, which, key, seeds in conds:
        for ref in ("KD", "CE"):
            for metric in CLAIM_METRICS:
                a = _values(demo, "FOCUS + RePAIR", which, key, seeds, metric)
                b = _values(demo, ref, which, key, seeds, metric)
                if a is None or b is None:
                    continue
                red, lo, hi = paired_reduction(a, b)
                pa, pb = ppl.get("FOCUS + RePAIR"), ppl.get(ref)
                dppl = (pa / pb - 1) if pa and pb else math.nan
                if not math.isfinite(red):
                    verdict = f"n/a ({ref} has {metrics.label(metric)} 0)"
                elif red >= MIN_REDUCTION and lo > 0 and dppl <= MAX_PPL_INCREASE:
                    verdict = "holds"
                elif red > 0:
                    verdict = ("direction only: " + ", ".join(
                        x for x, bad in ((f"below {MIN_REDUCTION:.0%}", red < MIN_REDUCTION),
                                         ("interval includes 0", lo <= 0),
                                         (f"PPL {dppl:+.1%}", not dppl <= MAX_PPL_INCREASE)) if bad))
                else:
                    verdict = "does not hold"
                rows.append(f"| (b) Table 3: FOCUS + RePAIR cuts repetition >= 30% vs {ref}, PPL <= +10% | "
                            f"{metrics.label(metric)} | {cond} | {np.nanmean(a):.1f} vs "
                            f"{np.nanmean(b):.1f}: "
                            f"{-red:+.0%} {_ci(-hi, -lo, pct=True)}; PPL {dppl:+.1%} | {verdict} |")
    return rows


def _claim_c(demo: Demo, conds: list, ppl: dict) -> list[str]:
    """Claim (c), Table 5: RePAIR at or below DPO's rep-3 on the same pairs."""
    from ..intervals import paired_difference

    rows = []
    for cond, which, key, seeds in conds:
        for name in ("CE + RePAIR", "FOCUS + RePAIR"):
            a, b = _values(demo, name, which, key, seeds, "rep-3"), _values(demo, "DPO", which, key, seeds, "rep-3")
            if a is None or b is None:
                continue
            d, lo, hi = paired_difference(a, b)
            verdict = ("holds" if hi < 0 else "holds in direction (interval includes 0)") if d <= 0 else \
                ("does not hold" if lo > 0 else "does not hold in direction (interval includes 0)")
            pa, pb = ppl.get(name), ppl.get("DPO")
            cost = f"; PPL {pa:.1f} vs DPO {pb:.1f}" if pa and pb else ""
            rows.append(f"| (c) Table 5: {name} at or below DPO's rep-3 (same pairs) | rep-3 | {cond} | "
                        f"{np.nanmean(a):.1f} vs DPO {np.nanmean(b):.1f}: {d:+.1f} {_ci(lo, hi)}{cost} | {verdict} |")
    return rows

def final_term(record: dict, term: str) -> float | None:
    """Mean of a logged term over the last 10% of a run's steps (None if never logged)."""
    values = [row[term] for row in record.get("logs", []) if term in row]
    if not values:
        return None
    tail = values[-max(1, len(values) // 10):]
    return sum(tail) / len(tail)


def cache_comparison(demo: Demo) -> list[str]:
    """The report section comparing the ``*-cached`` runs with their in-process twins (same data,
    seeds and steps) next to the training-noise reference (FOCUS with seed + 1): final training CE,
    held-out PPL, and CREP / rep-3 per condition, paired by document with 95% bootstrap intervals."""
    from ..intervals import paired_difference

    s, tr = demo.s, ((demo.marker("train") or {}).get("data") or {})
    pairs = [(a, b) for a, b in CACHE_PAIRS if a in s.runs and b in s.runs]
    cache = tr.get("teacher_cache")
    if not pairs or not demo.marker("eval"):
        return []
    ppl = {}
    for run in {r for pair in pairs for r in pair}:
        res = read_json(_model_dir_of(demo, "main", RUNS[run][0]) / "results.json") or {}
        ppl[run] = (res.get("perplexity") or {}).get("ppl")
    lines = ["## FOCUS and KD from the teacher cache vs the in-process teacher", ""]
    if cache:
        lines += [f"One cache (`{Path(cache['path']).name}`, built by `axolotl-focus teacher-cache` in "
                  f"{fmt_time(cache['elapsed_s'])} on {cache['threads']} thread(s)): the teacher's top-{cache['k']} "
                  f"`log q` at tau {cache['temperature']:g} plus the tail mass at {cache['positions']:,} trained "
                  f"positions of {cache['sequences']:,} SFT sequences, {cache['size_bytes'] / 2**20:.1f} MiB; "
                  f"read by {', '.join(RUNS[r][0] for r in cache['runs'])} with no teacher model loaded. Each "
                  "cached run has the same data, seed and steps as its in-process twin; 'FOCUS (seed +1)' vs "
                  "FOCUS is the same method with another training seed, the scale of training noise the "
                  "cached rows are judged by. Generation metrics are paired by document (95% bootstrap "
                  "interval of the difference in points); 'within noise' = the interval includes 0.", ""]
    lines += ["| comparison | metric | condition | measured | verdict |", "|---|---|---|---|---|"]
    conds = _conditions(s)
    for a, b in pairs:
        la, lb = RUNS[a][0], RUNS[b][0]
        ra, rb = (tr.get("runs") or {}).get(a), (tr.get("runs") or {}).get(b)
        ca, cb = (final_term(ra, "loss/ce") if ra else None), (final_term(rb, "loss/ce") if rb else None)
        if ca is not None and cb is not None:
            lines.append(f"| {la} vs {lb} | training CE (last 10% of steps) | train | {ca:.3f} vs {cb:.3f}: "
                         f"{ca - cb:+.3f} | - |")
        if ppl.get(a) and ppl.get(b):
            lines.append(f"| {la} vs {lb} | PPL | held-out | {ppl[a]:.2f} vs {ppl[b]:.2f}: "
                         f"{ppl[a] / ppl[b] - 1:+.1%} | - |")
        for cond, which, key, seeds in conds:
            for metric in CLAIM_METRICS:
                va, vb = (_doc_values(demo, which, la, key, seeds, metric),
                          _doc_values(demo, which, lb, key, seeds, metric))
                if va is None or vb is None:
                    continue
                d, lo, hi = paired_difference(va, vb)
                verdict = "n/a" if not math.isfinite(d) else "within noise" if lo <= 0 <= hi else "differs"
                lines.append(f"| {la} vs {lb} | {metrics.label(metric)} | {cond} | {np.nanmean(va):.1f} "
                             f"vs {np.nanmean(vb):.1f}: {d:+.1f} {_ci(lo, hi)} | {verdict} |")
    return lines + [""]


def _model_dir_of(demo: Demo, which: str, name: str) -> Path:
    from ..evaluate import model_dir

    cfg = demo.eval_config(demo.dir("eval")) if which == "main" else demo.low_eval_config(demo.dir("eval"))
    return model_dir(cfg, name)
