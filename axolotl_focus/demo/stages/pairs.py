"""Stage 4, ``pairs``: RePAIR pair mining with the width-pruned student."""

from __future__ import annotations

import json
from pathlib import Path

from ..settings import (
    DemoError,
)


class PairsStage:
    """Stage 4 of :class:`axolotl_focus.demo.stages.Demo`."""

    def _run_pairs(self, folder: Path):
        from ...micro import corpus_documents
        from ...mine.config import MiningConfig
        from ...mine.run import run_mining

        s = self.s
        prompts = folder / "prompts.jsonl"
        with open(prompts, "w", encoding="utf-8") as handle:
            for i, doc in enumerate(corpus_documents("valid")[: s.mining_prompts]):
                handle.write(json.dumps({"id": f"wikitext2-valid-{i}", "text": doc}) + "\n")
        extra = {}
        if s.mining_teacher_temperature is not None:
            extra["teacher_temperature"] = s.mining_teacher_temperature
        cfg = MiningConfig(prompts=str(prompts), output=self.pairs_file, student=self.pruned("width"), id_field="id",
                           prefix_tokens=s.mining_prefix_tokens, max_new_tokens=s.mining_new_tokens,
                           temperature=s.mining_temperature, top_p=0.9, seed=s.seed, target_pairs=s.target_pairs,
                           batch_size=32, device=self.device, progress=self.progress, **extra)
        summary = run_mining(cfg)
        if summary.pairs_total == 0:
            raise DemoError(f"pair mining kept no pairs ({summary.prompts_tried} prompts tried, "
                            f"{summary.degenerate} degenerate); see {self.pairs_file}.summary.json")
        data = summary.to_dict() | {"teacher": cfg.teacher_path(), "student": cfg.student,
                                    "settings": {k: getattr(cfg, k) for k in (
                                        "prefix_tokens", "max_new_tokens", "top_p", "temperature", "threshold",
                                        "target_pairs", "positive_attempts", "seed")}
                                    | {"teacher_temperature": getattr(cfg, "teacher_temperature", None)}}
        text = (f"{summary.pairs_total} pairs from {summary.prompts_tried} prompts "
                f"({summary.degenerate_share:.0%} of the student's samples degenerate, "
                f"{summary.pairs_dropped_no_positive + summary.negatives_dropped} dropped)")
        return data, text

