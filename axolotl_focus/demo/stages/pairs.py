"""Stage 5, ``pairs``: RePAIR pair mining, and the held-out split.

The student is the model being repaired: with ``mine_from: tuned`` (the default) the CE run of the
first training seed (stage ``sft``), whose loops are the ones the fine-tuned arms make; with
``pruned`` the width-pruned checkpoint before fine-tuning. The teacher is the student's recorded
source (the unpruned model). Prompts: the training slice (WikiText-2 valid, cleaned with
``clean_text``). A seeded share ``heldout_share`` of the mined pairs is kept out of training
(``pairs.heldout.jsonl``: the held-out margin diagnostic); the rest is ``pairs.train.jsonl``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ... import mine  # the stage's public API, imported on first use: the demo's --help stays light
from ...micro import corpus_documents
from ...mine.config import MiningConfig
from ..pipeline import Context
from ..settings import SFT_ARM, DemoError, DemoSettings, run_id


def source_model(s: DemoSettings, records: dict) -> str:
    """The student the pairs are mined from."""
    if s.mine_from == "tuned":
        return records["sft"]["runs"][run_id(SFT_ARM, s.train_seeds[0])]["model"]
    if s.mine_from == "pruned":
        return records["prune"]["width"]["path"]
    raise ValueError(f"mine_from: tuned or pruned (got {s.mine_from!r})")


def split_heldout(rows: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, heldout)``: the ``round(share * n)`` rows (at least one when ``share > 0`` and
    there are two rows or more) with the smallest ``blake2b(seed:source_id)``, in file order."""
    n_held = min(len(rows) - 1, max(1, round(share * len(rows)))) if share > 0 and len(rows) > 1 else 0
    rank = sorted(range(len(rows)), key=lambda i: hashlib.blake2b(
        f"{seed}:{rows[i].get('source_id', i)}".encode(), digest_size=8).hexdigest())
    held = set(rank[:n_held])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def run(s: DemoSettings, ctx: Context, folder: Path, records: dict) -> tuple[dict, str]:
    if not s.needs_pairs:
        return {"skipped": True}, "no arm of this preset trains on pairs"
    prompts = folder / "prompts.jsonl"
    _write_rows(prompts, [{"id": f"wikitext2-valid-{i}", "text": doc} for i, doc in
                          enumerate(corpus_documents("valid", clean=s.clean_text)[: s.mining_prompts])])
    extra = {}
    if s.mining_teacher_temperature is not None:
        extra["teacher_temperature"] = s.mining_teacher_temperature
    student = source_model(s, records)
    cfg = MiningConfig(prompts=str(prompts), output=str(folder / "pairs.jsonl"), student=student, id_field="id",
                       prefix_tokens=s.mining_prefix_tokens, max_new_tokens=s.mining_new_tokens,
                       temperature=s.mining_temperature, top_p=0.9, seed=s.seed, target_pairs=s.target_pairs,
                       batch_size=32, device=ctx.device, progress=ctx.progress, **extra)
    summary = mine.run_mining(cfg)
    if summary.pairs_total == 0:
        raise DemoError(f"pair mining kept no pairs ({summary.prompts_tried} prompts tried, "
                        f"{summary.degenerate} degenerate); see {cfg.output}.summary.json")
    with open(cfg.output, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    train, held = split_heldout(rows, s.heldout_share, s.seed)
    _write_rows(folder / "pairs.train.jsonl", train)
    _write_rows(folder / "pairs.heldout.jsonl", held)
    data = summary.to_dict() | {
        "teacher": cfg.teacher_path(), "student": student, "mine_from": s.mine_from, "pairs_file": cfg.output,
        "train_file": str(folder / "pairs.train.jsonl"), "heldout_file": str(folder / "pairs.heldout.jsonl"),
        "train_pairs": len(train), "heldout_pairs": len(held),
        "settings": {k: getattr(cfg, k) for k in ("prefix_tokens", "max_new_tokens", "top_p", "temperature",
                                                  "threshold", "target_pairs", "positive_attempts", "seed")}
        | {"teacher_temperature": getattr(cfg, "teacher_temperature", None)}}
    text = (f"{summary.pairs_total} pairs from {summary.prompts_tried} prompts of the {s.mine_from} student "
            f"({summary.degenerate_share:.0%} of its samples degenerate, "
            f"{summary.pairs_dropped_no_positive + summary.negatives_dropped} dropped): {len(train)} for training, "
            f"{len(held)} held out")
    return data, text
