"""`axolotl-focus eval` under torchrun with 2 processes (gloo, CPU): the generation batches are
shared out between the ranks and gathered on rank 0, and every generation file equals the one of
a 1-process run with the same seeds; rank 0 alone writes the files and prints the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from axolotl_focus.evaluate import EvalConfig, evaluate_models

MODELS = ("teacher", "student")


def _instructions(path: Path) -> str:
    rows = [{"instruction": "Rewrite the sentence more simply.", "input": "The game was released early.",
             "output": "x"},
            {"instruction": "Name two rivers in the state.", "output": "The Ohio and the Miami."},
            {"instruction": "Describe the church.", "output": "It is old."},
            {"instruction": "Say what the album is.", "output": "A record."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _settings(micro, instructions: str) -> dict:
    # 5 documents / 4 instructions / 3 teacher samples in batches of 2: 3 / 2 / 2 batches, so the
    # split between 2 ranks is uneven for the open-ended prompts
    return dict(metrics=("ppl", "repetition", "distribution"), seeds=(0, 1), num_documents=5, prefix_tokens=16,
                max_new_tokens=12, batch_size=2, instructions=instructions, instruction_max_new_tokens=8,
                ppl_window=64, ppl_stride=32, ppl_max_tokens=200, distribution_samples=3, plots=False,
                progress=False, dtype="float32")


def _argv(models: dict, out: Path, s: dict) -> list[str]:
    return [f"{n}={p}" for n, p in models.items()] + [
        "--output-dir", str(out), "--metrics", *s["metrics"], "--seeds", *map(str, s["seeds"]),
        "--num-documents", str(s["num_documents"]), "--prefix-tokens", str(s["prefix_tokens"]),
        "--max-new-tokens", str(s["max_new_tokens"]), "--batch-size", str(s["batch_size"]),
        "--instructions", s["instructions"], "--instruction-max-new-tokens", str(s["instruction_max_new_tokens"]),
        "--ppl-window", str(s["ppl_window"]), "--ppl-stride", str(s["ppl_stride"]),
        "--ppl-max-tokens", str(s["ppl_max_tokens"]), "--distribution-samples", str(s["distribution_samples"]),
        "--no-plots", "--no-progress", "--dtype", s["dtype"]]


def _files(out: Path) -> dict[str, list[dict]]:
    """Every generation file (the models' and the teacher samples), relative path -> rows."""
    found = sorted(out.glob("*/generations/*.jsonl")) + sorted(out.glob("_teacher/*.jsonl"))
    return {str(p.relative_to(out)): [json.loads(line) for line in p.read_text().splitlines()] for p in found}


@pytest.mark.slow
def test_two_processes_generate_what_one_process_does(one_thread, looping_micro, tmp_path):
    micro = looping_micro
    models = {n: micro[f"{n}_path"] for n in MODELS}
    s = _settings(micro, _instructions(tmp_path / "instr.jsonl"))
    one = evaluate_models(models, EvalConfig(output_dir=str(tmp_path / "one"), **s))

    out = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", AXOLOTL_DO_NOT_TRACK="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "axolotl_focus.cli", "eval", *_argv(models, out, s)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # ~30 s
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "2 processes: generation batches are shared out" in proc.stderr

    want, got = _files(tmp_path / "one"), _files(out)
    # 2 models x 2 tasks x (2 seeds + greedy), and the teacher's distribution samples
    assert len(want) == 13 and sorted(got) == sorted(want)
    for name, rows in want.items():
        assert got[name] == rows, name
    assert any(r["tokens"] for rows in want.values() for r in rows)
    # rank 0 alone printed the report; its numbers equal the 1-process run's
    assert proc.stdout.count("### Open-ended generation (Table 3): greedy") == 1
    for res in one:
        two = json.loads((out / res["model"] / "results.json").read_text())
        assert two["processes"] == 2 and res["processes"] == 1
        for key in ("perplexity", "open_ended", "instruction", "distribution", "data"):
            assert two.get(key) == json.loads(json.dumps(res.get(key))), (res["model"], key)
