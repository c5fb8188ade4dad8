"""`axolotl-focus demo`: the whole quick micro pipeline through the real CLI, `axolotl train` included
(slow), then reused."""

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from axolotl_focus.demo import STAGES, demo_settings
from axolotl_focus.files import read_json

# --------------------------------------------------------------------------------------------
# slow: the real quick pipeline through the CLI, twice
# --------------------------------------------------------------------------------------------


def md_tables(text: str) -> list[dict]:
    """Markdown tables with their `## ` / `### ` heading and the paragraph line just above each."""
    lines, out, section, caption = text.splitlines(), [], None, None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(("## ", "### ")):
            section = line.lstrip("#").strip()
        elif line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            out.append({"section": section, "caption": caption, "header": header, "rows": rows})
            continue
        elif line.strip():
            caption = line.strip()
        i += 1
    return out


def _number(cell: str) -> float:
    value = float(cell.strip("*"))
    assert math.isfinite(value)
    return value


def _demo(out: Path) -> tuple[subprocess.CompletedProcess, float]:
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PATH=bindir + os.pathsep + os.environ["PATH"])
    exe = shutil.which("axolotl-focus", path=env["PATH"])
    start = time.perf_counter()
    proc = subprocess.run([exe, "demo", "--model", "micro", "--quick", "--out", str(out), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=1200)
    return proc, time.perf_counter() - start


@pytest.mark.slow
def test_quick_demo_end_to_end_then_reused(tmp_path):
    out = tmp_path / "demo"
    proc, first_s = _demo(out)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for i, stage in enumerate(STAGES, 1):
        assert f"[{i}/{len(STAGES)}] {stage}: done in" in proc.stdout
    report = (out / "demo_report.md").read_text()
    tables = md_tables(report)
    s = demo_settings(quick=True, model="micro")

    # Table 1 (micro): every model x decoding with numbers, including the CE-fine-tuned student
    t1 = [t for t in tables if t["section"].startswith("Table 1")]
    assert len(t1) == 1 and t1[0]["header"][:3] == ["model", "decoding", "CREP (%)"]
    assert {(r[0], r[1]) for r in t1[0]["rows"]} == {
        (m, d) for m in ("unpruned", "width pruned", "depth pruned", "width pruned + CE fine-tuning")
        for d in ("greedy", "top-p 0.9")}

    # the verdicts: one word of three per claim, every row with its interval, per-seed numbers
    verdicts = [t for t in tables if t["section"] == "The paper's claims: verdicts"]
    assert [r[1].strip("*") for r in verdicts[0]["rows"]] and all(
        r[1].strip("*") in ("holds", "refuted", "not decided") for r in verdicts[0]["rows"])
    rows = verdicts[1]["rows"]
    assert {r[1] for r in rows} == {"CE vs teacher (unpruned)", "CE + RePAIR vs CE", "CE + RePAIR vs DPO after SFT"}
    assert all(r[-1] in ("holds", "refuted", "not decided") and "[" in r[5] for r in rows)
    per_seed = [t for t in tables if t["section"] == "Per training seed (primary condition)"]
    assert per_seed and per_seed[0]["header"][2:] == [f"seed {k}: A / B (effect)" for k in s.train_seeds]

    # the methods' table: every arm with PPL, MAUVE, CREP, rep-n and EAD numbers
    methods = [t for t in tables if t["section"].startswith("Tables 3 and 5")]
    assert len(methods) == 2
    for table in methods:
        assert table["header"][:4] == ["model", "PPL ↓", "MAUVE ↑", "CREP ↓"] and "EAD-1 ↑" in table["header"]
        names = [r[0] for r in table["rows"]]
        assert names == ["CE", "CE + RePAIR", "DPO after SFT", "teacher (unpruned)", "width pruned", "depth pruned"]
    assert "## Held-out pair margins" in report and "## Loop kinds" in report and "## Wall time" in report

    # plots: every linked image exists
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"plots/repetition.png", "plots/effects.png", "plots/training_loss.png"} <= set(images)
    for image in images:
        assert (out / image).stat().st_size > 1000

    # the real axolotl runs: configs, logs, models; the RePAIR arm drew its pairs from the stream
    for stage, runs in (("4_sft", s.runs_of("sft")), ("6_train", s.runs_of("train"))):
        for run in runs:
            assert (out / stage / f"{run}.yml").is_file() and (out / stage / run / "model.safetensors").is_file()
            assert "Plugin loaded successfully: axolotl_focus.FocusPlugin" in (out / stage / f"{run}.log").read_text()
    assert "DPO reference model = teacher" in (out / "6_train" / "dpo-s0.log").read_text()
    rec = read_json(out / "6_train" / "ce-repair-s0.done.json")
    assert any("loss/repair" in row for row in rec["logs"])
    ce = read_json(out / "4_sft" / "ce-s0.done.json")["logs"]
    assert rec["logs"][0]["loss/ce"] == pytest.approx(ce[0]["loss/ce"], rel=1e-4)  # same init, same first batch
    pairs = read_json(out / "5_pairs" / "done.json")["data"]
    assert pairs["pairs_total"] > 0 and pairs["mine_from"] == "tuned" and pairs["heldout_pairs"] >= 1

    # second run: every stage reused, quickly, same numbers
    proc2, second_s = _demo(out)
    assert proc2.returncode == 0, (proc2.stdout + proc2.stderr)[-4000:]
    for i, stage in enumerate(STAGES, 1):
        assert f"[{i}/{len(STAGES)}] {stage}: reused" in proc2.stdout
    assert f"{len(STAGES)} of {len(STAGES)} stages reused" in proc2.stdout
    assert second_s < min(90.0, first_s / 2), (first_s, second_s)
    report2 = (out / "demo_report.md").read_text()
    assert [t["rows"] for t in md_tables(report2) if t["section"].startswith("Table")] == \
        [t["rows"] for t in tables if t["section"].startswith("Table")]
