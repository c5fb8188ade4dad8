"""Stage 7, ``eval``: every model through :func:`axolotl_focus.evaluate.evaluate_models`, and the
experiment's two diagnostics.

Models: the teacher, the width- and depth-pruned checkpoints, and every run (arm x training
seed). Conditions: top-p 0.9 at ``eval_temperature`` under ``eval_seeds`` (primary: the decoding the
claims are judged on, chosen on the valid split) and greedy decoding (secondary); PPL and MAUVE
(the teacher as featurizer) beside them. The documents are the held-out WikiText-2 test slice,
cleaned like the training text (``documents.jsonl``, and ``ppl.txt`` for perplexity).

Diagnostics (``diagnostics.json``): the held-out pair margin of every model
(:mod:`axolotl_focus.evaluate.pair_margin` on ``pairs.heldout.jsonl``), and the loop kinds: the
loop units (:func:`axolotl_focus.degeneration.loop_unit`) of the training pairs' rejected
continuations and of every model's primary-condition generations, counted and decoded.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from ... import evaluate  # the stage's public API, imported on first use: the demo's --help stays light
from ...degeneration import coverage, loop_unit
from ...micro import corpus_documents
from ..pipeline import Context
from ..settings import ARMS, DemoSettings, run_id, run_label, write_json
from . import table1

REFERENCES = ("teacher (unpruned)", "width pruned", "depth pruned")
TOP_LOOPS = 8  # loop units kept per model


def models(s: DemoSettings, records: dict) -> dict[str, str]:
    """``{name: path}`` of every evaluated model: the references, then each arm's runs by seed."""
    out = {"teacher (unpruned)": records["teacher"]["path"], "width pruned": records["prune"]["width"]["path"],
           "depth pruned": records["prune"]["depth"]["path"]}
    runs = {**records["sft"]["runs"], **(records.get("train") or {}).get("runs", {})}
    for arm in s.arms:
        for k in s.train_seeds:
            out[run_label(arm, k)] = runs[run_id(arm, k)]["model"]
    return out


def eval_config(s: DemoSettings, ctx: Context, folder: Path, teacher: str):
    docs, ppl = (str(folder / "documents.jsonl"), str(folder / "ppl.txt")) if s.clean_text else ("embedded",) * 2
    return evaluate.EvalConfig(
        output_dir=str(folder), tasks=("open_ended",), metrics=("ppl", "repetition", "mauve"), documents=docs,
        ppl_data=ppl, decodings=("top_p", "greedy"), seeds=tuple(s.seed + k for k in s.eval_seeds),
        temperature=s.eval_temperature, batch_size=48, num_documents=s.eval_documents, data_seed=s.seed,
        prefix_tokens=s.eval_prefix_tokens, max_new_tokens=s.eval_new_tokens, ppl_window=256, ppl_stride=128,
        ppl_max_tokens=s.ppl_max_tokens, mauve_featurizer=teacher, mauve_seeds=tuple(s.mauve_seeds),
        mauve_max_text_length=256, plots=False, device=ctx.device, progress=ctx.progress,
    )


def _write_documents(folder: Path) -> None:
    docs = corpus_documents("test", clean=True)
    with open(folder / "documents.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"id": f"wikitext2-test-{i}", "text": d}) + "\n" for i, d in enumerate(docs))
    (folder / "ppl.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def _read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def generations(cfg, name: str, decoding: str) -> list[list[dict]]:
    """The saved generations of model ``name`` under ``decoding`` (``top_p``: one list per seed)."""
    folder = evaluate.model_dir(cfg, name) / "generations"
    if decoding == "greedy":
        return [_read_jsonl(folder / "open_ended.greedy.jsonl")]
    return [_read_jsonl(folder / f"open_ended.top_p0.9.seed{seed}.jsonl") for seed in cfg.seeds]


def loop_counts(token_lists) -> tuple[Counter, dict, int]:
    """``(Counter of loop units, {unit: its segment as first generated}, number of texts)``: a unit
    is :func:`axolotl_focus.degeneration.loop_unit` (one rotation for every phase of a loop); it is
    shown as the segment the text actually repeated."""
    units, shown, n = Counter(), {}, 0
    for toks in token_lists:
        n += 1
        unit = loop_unit(toks)
        if unit is not None:
            units[unit] += 1
            shown.setdefault(unit, coverage(toks).segment)
    return units, shown, n


def top_loops(units: Counter, shown: dict, n: int, tokenizer) -> dict:
    return {"texts": n, "degenerate": sum(units.values()),
            "top": [[tokenizer.decode(list(shown[u])), c, list(u)] for u, c in units.most_common(TOP_LOOPS)]}


def diagnostics(s: DemoSettings, cfg, names: dict[str, str], records: dict, progress: bool) -> dict:
    """Held-out pair margins and loop kinds (module docstring)."""
    import torch  # heavy: only once the stage runs
    from transformers import AutoModelForCausalLM, AutoTokenizer


    pairs = records.get("pairs") or {}
    tokenizer = AutoTokenizer.from_pretrained(names["teacher (unpruned)"])
    out = {"margins": {}, "loops": {}}
    if pairs.get("train_file"):
        counted = loop_counts(r["rejected_tokens"] for r in _read_jsonl(pairs["train_file"]))
        out["loops"]["training pairs (rejected)"] = top_loops(*counted, tokenizer)
    for name in names:
        counted = loop_counts(r["tokens"] for rows in generations(cfg, name, "top_p") for r in rows)
        out["loops"][name] = top_loops(*counted, tokenizer)
    held = _read_jsonl(pairs["heldout_file"]) if pairs.get("heldout_file") else []
    if held:
        for name, path in tqdm(names.items(), desc="held-out pair margins", disable=not progress):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            out["margins"][name] = evaluate.pair_margins(model, tokenizer, held)
            del model
    return out


def run(s: DemoSettings, ctx: Context, folder: Path, records: dict) -> tuple[dict, str]:
    teacher = records["teacher"]["path"]
    if s.clean_text:
        _write_documents(folder)
    cfg = eval_config(s, ctx, folder, teacher)
    names = models(s, records)
    results = evaluate.evaluate_models(names, cfg)
    diag = diagnostics(s, cfg, names, records, ctx.progress)
    write_json(folder / "diagnostics.json", diag)
    if s.table1_prompts:  # the micro Table 1's fine-tuned row: the CE run of the first seed
        tuned = records["sft"]["runs"][run_id("ce", s.train_seeds[0])]["model"]
        rows = evaluate.table1.measure({"width pruned + CE fine-tuning": tuned}, table1.prompts(s, teacher),
                                       s.table1_new_tokens, seed=s.seed, batch=32, progress=ctx.progress)
        write_json(folder / "table1_finetuned.json", {"rows": rows})
    unavailable = sorted({k for r in results for k in r.get("unavailable", {})})
    data = {"models": names, "documents": results[0]["open_ended"]["prompts"], "unavailable": unavailable,
            "arms": {arm: ARMS[arm].label for arm in s.arms}}
    summary = (f"{len(results)} models ({len(s.arms)} arms x {len(s.train_seeds)} seeds + 3 references), "
               f"{data['documents']} documents, top-p 0.9 at T {s.eval_temperature:g} (seeds "
               f"{list(cfg.seeds)}) and greedy; held-out margins on {len(next(iter(diag['margins'].values()), []))} "
               "pairs" + (f"; unavailable: {', '.join(unavailable)}" if unavailable else ""))
    return data, summary

