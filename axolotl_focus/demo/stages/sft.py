"""Stage 4, ``sft``: the CE run of every training seed (the SFT rows written once). Each is the
experiment's CE arm, the start of that seed's DPO run, and (the first seed's) the SFT-tuned student
the pairs are mined from: the model being repaired."""

from __future__ import annotations

from pathlib import Path

from ..pipeline import Context
from ..settings import SFT_ARM, DemoSettings, run_config
from .train import train_runs, write_sft


def run(s: DemoSettings, ctx: Context, folder: Path, records: dict) -> tuple[dict, str]:
    sft = folder / "sft.jsonl"
    rows = write_sft(s, records["teacher"]["path"], sft)
    student = records["prune"]["width"]["path"]
    configs = {rid: run_config(s, arm, k, student=student, sft=str(sft), work=folder)
               for rid, (arm, k) in s.runs_of("sft").items()}
    runs = train_runs(s, ctx, folder, configs)
    ce = [r["final_loss"] for r in runs.values()]
    data = {"sft_file": str(sft), "sft_rows": rows, "runs": runs}
    summary = (f"{SFT_ARM.upper()} under {len(runs)} training seed(s), {s.train_steps} steps of {s.micro_batch_size} "
               "of "
               f"{rows} SFT rows each; final CE {min(ce):.3f}-{max(ce):.3f}")
    return data, summary
