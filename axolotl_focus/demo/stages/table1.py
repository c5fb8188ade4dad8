"""Stage 3, ``table1``: the paper's Table 1 measured before and after pruning (micro model; on the
real model the evaluation stage measures the same models on the same documents)."""

from __future__ import annotations

from pathlib import Path

from ... import evaluate  # the stage's public API, imported on first use: the demo's --help stays light
from ..pipeline import Context
from ..settings import DemoSettings, write_json


def prompts(s: DemoSettings, teacher: str):
    """Table 1's prefixes (also the evaluation's fine-tuned Table 1 row's)."""
    from transformers import AutoTokenizer  # heavy: only when the stage runs

    return evaluate.table1.prefixes(AutoTokenizer.from_pretrained(teacher), s.table1_prompts, s.table1_prefix_tokens)


def run(s: DemoSettings, ctx: Context, folder: Path, records: dict) -> tuple[dict, str]:
    if not s.table1_prompts:
        return {"in_eval": True}, "measured in the evaluation stage (same documents, every decoding and seed)"
    teacher = records["teacher"]["path"]
    models = {"unpruned": teacher, "width pruned": records["prune"]["width"]["path"],
              "depth pruned": records["prune"]["depth"]["path"]}
    prefixes = prompts(s, teacher)
    rows = evaluate.table1.measure(models, prefixes, s.table1_new_tokens, seed=s.seed, batch=32, progress=ctx.progress)
    data = {"prompts": len(prefixes), "prefix_tokens": s.table1_prefix_tokens, "new_tokens": s.table1_new_tokens,
            "rows": rows}
    write_json(folder / "table1.json", data)
    crep = {(r["model"], r["decoding"]): r["crep"] for r in rows}
    summary = "CREP % greedy / top-p: " + ", ".join(
        f"{m} {crep[(m, 'greedy')]:.0f} / {crep[(m, 'top-p 0.9')]:.0f}" for m in models)
    return data, summary
