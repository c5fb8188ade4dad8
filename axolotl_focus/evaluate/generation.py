"""Generation of a task's prompts under one decoding, saved and reused, and the metrics of the
generated token ids.

Decodings: top-p (0.9, pure nucleus, ``top_k=0``) under each seed of ``seeds``, and greedy.
Generation is batched with the KV cache through :func:`~axolotl_focus.generation.generate_batch`
(batch ``b`` = prompts ``b * batch_size ...``; under seed ``s`` row ``i`` of batch ``b`` samples from
its own generator seeded by ``row_seed(s * 100003 + b, i)``); a row ends at EOS (excluded) or at its
budget and then leaves the batch (the decoding loop drops ended rows). Several processes share
the batches out (:mod:`axolotl_focus.evaluate.runner`).

Files: ``<model>/generations/<task>.<decoding>.jsonl`` (decoding ``top_p0.9.seed<s>`` or ``greedy``)
and its ``.meta.json`` (the settings the file was made with; written last, so a file without its
meta is never reused): one row per prompt with ``id``,
``prompt``, ``prompt_tokens``, ``tokens`` (generated ids, EOS excluded), ``text``, ``stop``
(``eos``/``budget``), ``reference`` (and ``reference_tokens`` for open-ended).

Metrics: CREP (threshold 0.3, r 4..16), rep-n n = 3..6 (per continuation ``1 - unique/total`` on model
tokens, averaged, x100), EAD-1 with ``V = len(tokenizer)`` (corpus level), degeneration in
serving: all from :mod:`axolotl_focus.degeneration` on the saved token ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..degeneration import DEFAULT_THRESHOLD, repetition_metrics, serving_degeneration
from ..files import read_json
from ..generation import continuation_text
from .config import REP_NS, EvalConfig, MetricUnavailable
from .files import jsonable, write_json
from .runner import get_ranks


def decoding_key(decoding: str, top_p: float) -> str:
    return f"top_p{top_p:g}" if decoding == "top_p" else "greedy"


def generate_items(model, tokenizer, items: list[dict], budget: int, *, do_sample: bool, seed: int, top_p: float,
                    temperature: float, batch_size: int, desc: str, progress: bool,
                    paths: tuple[str, str] | None = None) -> list[dict]:
    """Rows of generations for ``items``: batches of ``batch_size`` consecutive items, batch ``b``
    under torch seed ``seed * 100003 + b``. Under several processes the batches are shared out
    (:class:`~axolotl_focus.evaluate.runner.Ranks`; ``paths`` = the model's and the tokenizer's, for the
    other ranks to load)."""
    job = {"prompts": [it["prompt_tokens"] for it in items], "budget": budget, "do_sample": do_sample, "seed": seed,
           "top_p": top_p, "temperature": temperature, "batch_size": batch_size}
    gen = get_ranks().generate(model, tokenizer, job, paths, desc=desc, progress=progress)
    rows = []
    for it, (toks, stop) in zip(items, gen, strict=True):
        rows.append({**{k: it[k] for k in ("id", "prompt", "prompt_tokens")}, "tokens": toks,
                     "text": continuation_text(tokenizer, it["prompt_tokens"], toks), "stop": stop or "budget",
                     **{k: it[k] for k in ("reference", "reference_tokens") if k in it}})
    return rows


def saved_generations(path: Path, meta: dict, make: Callable[[], list[dict]], cfg: EvalConfig) -> list[dict]:
    """Rows of ``path`` when its ``.meta.json`` equals ``meta``; else ``make()`` and save both."""
    meta_path = path.with_name(path.name + ".meta.json")
    meta = jsonable(meta)
    if not cfg.regenerate and path.is_file() and read_json(meta_path) == meta:
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    if cfg.metrics_only:
        raise MetricUnavailable(f"generations {path} missing or made with other settings (--metrics-only)")
    rows = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    if meta_path.exists():
        meta_path.unlink()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)
    write_json(meta_path, meta)
    return rows


def generation_metrics(rows: list[dict], vocab_size: int, max_new_tokens: int,
                       threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """CREP, rep-3..6, EAD-1 (:func:`repetition_metrics`), serving degeneration, lengths."""
    toks = [r["tokens"] for r in rows]
    out = repetition_metrics(toks, vocab_size, threshold, REP_NS)
    serving = serving_degeneration(toks, max_new_tokens, threshold)
    out.update(serving_rate=serving.rate_pct, serving_token_share=serving.token_share_pct,
               serving_stoppable_tokens=serving.stoppable_tokens,
               mean_length=sum(map(len, toks)) / len(toks) if toks else 0.0,
               eos_rate=100.0 * sum(r["stop"] == "eos" for r in rows) / len(rows) if rows else 0.0)
    return out


def mean_dicts(dicts: list[dict]) -> dict:
    keys = [k for k in dicts[0] if all(isinstance(d.get(k), (int, float)) for d in dicts)] if dicts else []
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in keys}
