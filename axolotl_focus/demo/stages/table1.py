"""Stage 3, ``table1``: the paper's Table 1 measured before and after pruning."""

from __future__ import annotations

from pathlib import Path

from ..settings import (
    write_json,
)


class Table1Stage:
    """Stage 3 of :class:`axolotl_focus.demo.stages.Demo` (its prompts are also stage 6's)."""

    def _table1_prompts(self):
        from transformers import AutoTokenizer

        from ...evaluate.table1 import prefixes

        tokenizer = AutoTokenizer.from_pretrained(self.teacher)
        return prefixes(tokenizer, self.s.table1_prompts, self.s.table1_prefix_tokens)

    def _run_table1(self, folder: Path):
        from ...evaluate.table1 import measure

        s = self.s
        if not s.table1_prompts:
            return {"in_eval": True}, "measured in the evaluation stage (same documents, every decoding and seed)"
        prompts = self._table1_prompts()
        models = {"unpruned": self.teacher, "width pruned": self.pruned("width"), "depth pruned": self.pruned("depth")}
        rows = measure(models, prompts, s.table1_new_tokens, seed=s.seed, batch=32, progress=self.progress)
        data = {"prompts": len(prompts), "prefix_tokens": s.table1_prefix_tokens, "new_tokens": s.table1_new_tokens,
                "rows": rows}
        write_json(folder / "table1.json", data)
        crep = {(r["model"], r["decoding"]): r["crep"] for r in rows}
        summary = "CREP % greedy / top-p: " + ", ".join(
            f"{m} {crep[(m, 'greedy')]:.0f} / {crep[(m, 'top-p 0.9')]:.0f}" for m in models)
        return data, summary

