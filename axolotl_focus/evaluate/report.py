"""The Markdown report (``results.md``): the paper's tables across models, method rows, metric
columns, best per column in bold, and notes on the settings."""

from __future__ import annotations

import math

from .config import ZERO_SHOT_TASKS
from .metrics import REP_KEYS, columns, get

# the columns of each table: (label, key, higher_is_better (None: no ranking), decimals) from the registry
_SERVING = ("serving_rate", "serving_token_share")
_OPEN = columns("ppl", "zero_shot", "mauve", "crep", *REP_KEYS, *_SERVING)
_INSTR = columns("ppl", "zero_shot", "crep", "ead", "bertscore", *_SERVING, "eos_rate", "mean_length")
_DIST = columns("ar_head", "ar_tail", "cor_head", "cor_tail", "count_head", "count_head_teacher")

def _markdown_table(title: str, rows: list[tuple[str, dict]], cols: list[tuple],
                    extra: list[tuple[str, dict]] = ()) -> str:
    """Rows = models; the best value per ranked column in bold (ties all bold); ``extra`` rows
    (the human reference) are shown but never ranked."""
    head = [f"{h} ({get(key).arrow})" if hib is not None else h for h, key, hib, _ in cols]
    lines = [f"### {title}", "", "| Method | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    best = {}
    for _, key, hib, dec in cols:
        vals = [round(v[key], dec) for _, v in rows if isinstance(v.get(key), (int, float)) and math.isfinite(v[key])]
        if hib is not None and len(vals) > 1:
            best[key] = max(vals) if hib else min(vals)
    for label, vals, ranked in [(lbl, v, True) for lbl, v in rows] + [(lbl, v, False) for lbl, v in extra]:
        cells = []
        for _, key, _, dec in cols:
            v, text = vals.get(key), get(key).format(vals.get(key))
            cells.append(f"**{text}**" if ranked and key in best and text != "-" and round(v, dec) == best[key]
                         else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def flat_metrics(res: dict, task: str, decoding: str) -> dict:
    out = dict(res.get(task, {}).get("decodings", {}).get(decoding, {}).get("mean", {}))
    if "perplexity" in res:
        out["ppl"] = res["perplexity"]["ppl"]
    if res.get("zero_shot", {}).get("average") is not None:
        out["zero_shot"] = res["zero_shot"]["average"]
    return out


def markdown_report(results: list[dict]) -> str:
    """The paper's tables across models: method rows, metric columns, best per column in bold."""
    if not results:
        return "No results.\n"
    parts = ["# Evaluation results", ""] + _generation_tables(results)
    zs = [r for r in results if r.get("zero_shot")]
    if zs:
        parts.append(_zero_shot_table(zs))
    dist = [(r["model"], r["distribution"]) for r in results if r.get("distribution")]
    if dist:
        parts.append(_markdown_table(f"Distribution study vs the teacher (section 6, head = top-p "
                                     f"{results[0]['settings']['head_top_p']})", dist, _DIST))
    unavailable = {f"{r['model']}: {k}": v for r in results for k, v in r.get("unavailable", {}).items()}
    parts.append("Notes:\n\n" + "\n".join(f"- {n}" for n in _notes(results)) + "\n")
    if unavailable:
        parts.append("Unavailable:\n\n" + "\n".join(f"- {k}: {v}" for k, v in unavailable.items()) + "\n")
    return "\n".join(parts)


def _generation_tables(results: list[dict]) -> list[str]:
    """Tables 3 and 4: one table per task and decoding (the human reference row under open-ended)."""
    parts = []
    first = results[0]
    settings = first["settings"]
    for task, cols, title in (("open_ended", _OPEN, "Open-ended generation (Table 3)"),
                              ("instruction", _INSTR, "Instruction-based generation (Table 4)")):
        decodings = []
        for r in results:
            decodings += [d for d in r.get(task, {}).get("decodings", {}) if d not in decodings]
        for dec in decodings:
            rows = [(r["model"], flat_metrics(r, task, dec)) for r in results]
            seeds = "" if dec == "greedy" else f", mean over seeds {settings['seeds']}"
            human = task == "open_ended" and "reference" in first.get(task, {})
            extra = [("Reference (human)", first[task]["reference"])] if human else []
            parts.append(_markdown_table(f"{title}: {dec}{seeds}", rows, cols, extra))
    return parts


def _zero_shot_table(zs: list[dict]) -> str:
    tasks = [t for t in ZERO_SHOT_TASKS if any(t in r["zero_shot"]["tasks"] for r in zs)]
    cols = columns(*[t for t in tasks if t != "truthfulqa_mc2"], "average")
    cols += columns("truthfulqa_mc2") if "truthfulqa_mc2" in tasks else []
    rows = [(r["model"], {t: v["value"] for t, v in r["zero_shot"]["tasks"].items()} | r["zero_shot"]) for r in zs]
    return _markdown_table("Zero-shot accuracy (Table 6)", rows, cols)


def _notes(results: list[dict]) -> list[str]:
    """The report's notes: the metrics' definitions and the settings they were computed with."""
    first = results[0]
    settings = first["settings"]
    ppl = first.get("perplexity", {})
    bs = next((r["bertscore_settings"] for r in results if r.get("bertscore_settings")), None)
    notes = [
        "↓ lower is better, ↑ higher is better; best per column in **bold** (ties all bold; the reference row is "
        "not ranked).",
        f"CREP: % of continuations with coverage >= {settings['threshold']} (r = 4..16). rep-n: 100 x mean over "
        "continuations of (1 - unique n-grams / n-grams), model tokens (the paper's 'unique n-gram'; lower = more "
        "diverse).",
        f"EAD-1: corpus-level, V = len(tokenizer) = {first.get('ead_vocab_size')}.",
        f"Open-ended: {settings['prefix_tokens']}-token prefix, {settings['max_new_tokens']} new tokens, top-p "
        f"{settings['top_p']} (top_k = 0) and greedy. Paper's WikiText-103 human row: 2.62 / 1.10 / 0.52 / 0.24 "
        "(n = 3..6).",
    ]
    docs = first.get("data", {}).get("open_ended")
    if docs:
        notes.append(f"Open-ended documents: {docs['source']}" + (f" (fallback: {docs['fallback']})"
                                                                 if docs.get("fallback") else "") + ".")
    if ppl:
        notes.append(f"PPL: {ppl.get('data')}, window {ppl['window']}, stride {ppl['stride']}, {ppl['scored']} "
                     "tokens scored.")
    decodings = [(r, d) for r in results for d in r.get("open_ended", {}).get("decodings", {})]
    if any("mauve" in flat_metrics(r, "open_ended", d) for r, d in decodings):
        notes.append(f"MAUVE: p = reference continuations, q = generations, featurizer {settings['mauve_featurizer']}, "
                     f"mean over compute_mauve seeds {settings['mauve_seeds']}.")
    if bs:
        notes.append(f"BERTScore: F1, {bs['bertscore_model']} layer {bs['bertscore_layer']}, "
                     f"{'rescaled with baseline' if bs['bertscore_rescaled'] else 'not rescaled'}.")
    return notes
