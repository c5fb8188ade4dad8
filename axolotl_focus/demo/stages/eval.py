"""Stage 6, ``eval``: every model through :func:`axolotl_focus.evaluate.evaluate_models`."""

from __future__ import annotations

from pathlib import Path

from ..report import decoding_key, flat_metrics
from ..settings import (
    RUNS,
    write_json,
)


class EvalStage:
    """Stage 6 of :class:`axolotl_focus.demo.stages.Demo`."""

    def eval_models(self) -> dict[str, str]:
        models = {"teacher (unpruned)": self.teacher, "width pruned": self.pruned("width"),
                  "depth pruned": self.pruned("depth")}
        for run in self.s.runs:
            models[RUNS[run][0]] = self.trained(run)
        return models

    def eval_config(self, folder: Path):
        from ...evaluate import EvalConfig

        s = self.s
        return EvalConfig(
            output_dir=str(folder), tasks=("open_ended",), metrics=("ppl", "repetition", "mauve"),
            documents="embedded", ppl_data="embedded",  # offline whatever HF_HUB_OFFLINE says
            decodings=("top_p", "greedy"), seeds=tuple(s.seed + k for k in s.eval_seeds), batch_size=32,
            num_documents=s.eval_documents,
            data_seed=s.seed, prefix_tokens=s.eval_prefix_tokens, max_new_tokens=s.eval_new_tokens,
            ppl_window=256, ppl_stride=128, ppl_max_tokens=s.ppl_max_tokens, mauve_featurizer=self.teacher,
            mauve_seeds=tuple(s.mauve_seeds), mauve_max_text_length=256, device=self.device, progress=self.progress,
        )

    def low_eval_config(self, folder: Path):
        """Top-p 0.9 at ``eval_low_temperature`` (repetition and MAUVE only), or None."""
        from dataclasses import replace

        t = self.s.eval_low_temperature
        if not t:
            return None
        return replace(self.eval_config(folder), output_dir=str(folder / f"temperature{t:g}"),
                       metrics=("repetition", "mauve"), decodings=("top_p",), temperature=t, plots=False,
                       seeds=tuple(self.s.seed + k for k in self.s.eval_low_seeds))

    def _run_eval(self, folder: Path):
        from ...evaluate import evaluate_models
        from ...evaluate.table1 import measure

        s = self.s
        results = evaluate_models(self.eval_models(), self.eval_config(folder))
        low = self.low_eval_config(folder)
        low_results = evaluate_models(self.eval_models(), low) if low else []
        # Table 1's condition in the paper: the pruned model after fine-tuning (here: the CE run)
        extra = []
        if "ce" in s.runs and s.table1_prompts:
            extra = measure({"width pruned + CE fine-tuning": self.run_dir("ce")}, self._table1_prompts(),
                            s.table1_new_tokens, seed=s.seed, batch=32, progress=self.progress)
        write_json(folder / "table1_finetuned.json", {"rows": extra})
        methods = [RUNS[r][0] for r in s.runs]
        parts = []
        for label, res in (("T=1", results), (f"T={s.eval_low_temperature:g}", low_results)):
            if res:
                flat = {r["model"]: flat_metrics(r, decoding_key(res)) for r in res}
                parts.append(f"top-p {label} CREP % " + ", ".join(
                    f"{m} {flat[m].get('crep', float('nan')):.1f}" for m in methods if m in flat))
        unavailable = sorted({k for r in results + low_results for k in r.get("unavailable", {})})
        summary = f"{len(results)} models, {results[0]['open_ended']['prompts']} documents; " + "; ".join(parts)
        summary = summary.replace("top-p T=1", f"top-p T=1 (seeds {list(s.eval_seeds)})").replace(
            f"top-p T={s.eval_low_temperature:g}",
            f"top-p T={s.eval_low_temperature:g} (seeds {list(s.eval_low_seeds)})")
        if unavailable:
            summary += f"; unavailable: {', '.join(unavailable)}"
        return {"models": self.eval_models(), "unavailable": unavailable}, summary

