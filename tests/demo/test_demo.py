"""`axolotl-focus demo` report checks (axolotl_focus/demo/claims.py, fast), and the whole quick
pipeline through the real CLI, `axolotl train` included (slow)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from axolotl_focus.demo import STAGES, claims, demo_settings, read_json


def test_paper_checks_compare_in_the_papers_direction():
    conds = {"T=1": {"FOCUS": {"crep": 1.0, "rep-3": 2.0}, "KD": {"crep": 3.0, "rep-3": 2.0},
                     "DPO": {"rep-3": 1.0}, "CE": {"rep-3": 0.5}}}
    t1 = {"rows": [{"model": "unpruned", "decoding": "greedy", "crep": 10.0},
                   {"model": "width pruned", "decoding": "greedy", "crep": 20.0}]}
    rows = claims.paper_checks(conds, t1)
    text = "\n".join(rows)
    assert ("| pruning increases repetition (Table 1) | CREP | width pruned, greedy | "
            "20.0 vs unpruned 10.0 | holds |") in text
    assert "| FOCUS repeats less than KD | CREP | T=1 | FOCUS 1.00 vs KD 3.00 | holds |" in text
    assert "| FOCUS repeats less than KD | rep-3 | T=1 | FOCUS 2.00 vs KD 2.00 | tie |" in text
    assert "| DPO reduces repetition vs CE | rep-3 | T=1 | DPO 1.00 vs CE 0.50 | does not hold |" in text
    assert not any("RePAIR" in r for r in rows)  # models that did not run are left out


# --------------------------------------------------------------------------------------------
# slow: the real quick pipeline through the CLI, twice
# --------------------------------------------------------------------------------------------


def md_tables(text: str) -> list[dict]:
    """Markdown tables with the `## ` section and the paragraph line just above each."""
    lines, out, section, caption = text.splitlines(), [], None, None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
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

    # Table 1: every model x decoding with numbers, including the CE-fine-tuned student
    t1 = [t for t in tables if t["section"].startswith("Table 1")]
    assert len(t1) == 1 and t1[0]["header"][:3] == ["model", "decoding", "CREP (%)"]
    assert {(r[0], r[1]) for r in t1[0]["rows"]} == {
        (m, d) for m in ("unpruned", "width pruned", "depth pruned", "width pruned + CE fine-tuning")
        for d in ("greedy", "top-p 0.9")}
    for row in t1[0]["rows"]:
        assert all(0 <= _number(c) <= 100 for c in row[2:])

    # Table 3 (three decodings): the method rows have PPL, MAUVE, CREP, rep-n and EAD numbers
    t3 = [t for t in tables if t["section"].startswith("Table 3")]
    assert len(t3) == 3
    for table in t3:
        assert table["header"][:4] == ["Method", "PPL ↓", "MAUVE ↑", "CREP ↓"] and "EAD-1 ↑" in table["header"]
        rows = {r[0]: r for r in table["rows"]}
        for method in ("CE", "KD", "FOCUS", "FOCUS + RePAIR", "teacher (unpruned)", "width pruned"):
            values = [_number(c) for c in rows[method][1:]]
            assert values[0] > 1 and 0 <= values[1] <= 1 and all(v >= 0 for v in values[2:])
    assert "temperature 1 (the paper's decoding)" in t3[0]["caption"]

    # Table 5: CE, DPO and FOCUS + RePAIR side by side, with numbers
    t5 = [t for t in tables if t["section"].startswith("Table 5")]
    assert len(t5) == 3
    for table in t5:
        rows = {r[0]: r for r in table["rows"]}
        assert {"CE", "DPO", "FOCUS + RePAIR"} <= set(rows)
        for method in ("CE", "DPO", "FOCUS + RePAIR"):
            assert all(_number(c) >= 0 for c in rows[method][1:])

    # the sizes, seeds and the micro-scale caveat are stated
    assert "parameters" in report and "Seeds" in report and "may not reproduce" in report
    verdicts = [t for t in tables if t["section"].startswith("Does the paper")]
    assert verdicts and all(r[-1] in ("holds", "does not hold", "tie") for r in verdicts[0]["rows"])

    # plots: every linked image exists
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"plots/table1.png", "plots/training_loss.png", "plots/repetition.png"} <= set(images)
    for image in images:
        assert (out / image).stat().st_size > 1000

    # the real axolotl runs: configs, logs, models
    train = out / "5_train"
    for run in demo_settings(quick=True, model="micro").runs:
        assert (train / f"{run}.yml").is_file() and (train / run / "model.safetensors").is_file()
        log = (train / f"{run}.log").read_text()
        assert "Plugin loaded successfully: axolotl_focus.FocusPlugin" in log
    assert "DPO reference model = teacher" in (train / "dpo.log").read_text()
    rec = read_json(train / "focus-repair.done.json")
    assert any("loss/repair" in row for row in rec["logs"])
    assert json.loads((out / "4_pairs" / "done.json").read_text())["data"]["pairs_total"] > 0

    # second run: every stage reused, quickly, same numbers
    proc2, second_s = _demo(out)
    assert proc2.returncode == 0, (proc2.stdout + proc2.stderr)[-4000:]
    for i, stage in enumerate(STAGES, 1):
        assert f"[{i}/{len(STAGES)}] {stage}: reused" in proc2.stdout
    assert "6 of 6 stages reused" in proc2.stdout
    assert second_s < min(60.0, first_s / 2), (first_s, second_s)
    report2 = (out / "demo_report.md").read_text()
    assert [t["rows"] for t in md_tables(report2) if t["section"].startswith("Table")] == \
        [t["rows"] for t in tables if t["section"].startswith("Table")]
