"""`axolotl-focus demo`: stage caching and config generation (fast), and the whole quick pipeline
through the real CLI, `axolotl train` included (slow)."""

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

from axolotl_focus.demo import (
    RUNS,
    STAGES,
    Demo,
    DemoSettings,
    add_demo_arguments,
    claims,
    demo_settings,
    logged_dicts,
    read_json,
    train_configs,
)

# --------------------------------------------------------------------------------------------
# fast: config generation
# --------------------------------------------------------------------------------------------


def test_presets_run_the_same_stages_and_the_required_methods():
    full, quick = demo_settings(False, model="micro"), demo_settings(True, model="micro")
    assert not full.quick and quick.quick
    for s in (full, quick):
        assert {"ce", "kd", "focus", "focus-repair", "dpo"} <= set(s.runs)
        assert set(s.runs) <= set(RUNS)
    assert "ce-repair" in full.runs
    # quick is smaller everywhere it matters for time
    for name in ("teacher_steps", "train_steps", "dpo_steps", "mining_prompts", "eval_documents", "table1_prompts"):
        assert getattr(quick, name) < getattr(full, name), name
    assert demo_settings(True, seed=3, model="micro").seed == 3


def test_train_configs_are_axolotl_configs_for_each_method(tmp_path):
    s = demo_settings(quick=False, model="micro")
    cfgs = train_configs(s, "/m/width", "/d/sft.jsonl", "/d/pairs.jsonl", tmp_path)
    assert list(cfgs) == list(s.runs)
    for run, cfg in cfgs.items():
        assert cfg["base_model"] == "/m/width"  # fine-tuning starts from the pruned checkpoint
        assert cfg["plugins"] == ["axolotl_focus.FocusPlugin"]
        assert "focus_teacher_model" not in cfg  # inferred from the checkpoint's focus_source_model
        assert cfg["output_dir"] == str(tmp_path / run)
        assert cfg["dataset_prepared_path"] == str(tmp_path / "prepared")  # shared: same data prepared once
        assert cfg["bf16"] is False and cfg["fp16"] is False and cfg["tf32"] is False  # CPU
        assert cfg["sample_packing"] is False  # RePAIR pair rows need one pair per row
        assert cfg["save_strategy"] == "no" and cfg["logging_steps"] == 1
    types = {run: [d.get("type") for d in cfg["datasets"]] for run, cfg in cfgs.items()}
    assert cfgs["ce"]["focus_distill"] == "none" and types["ce"] == ["completion"]
    assert cfgs["kd"]["focus_distill"] == "kd" and types["kd"] == ["completion"]
    assert cfgs["focus"]["focus_distill"] == "focus" and types["focus"] == ["completion"]
    assert cfgs["focus-repair"]["focus_distill"] == "focus"
    assert types["focus-repair"] == ["completion", "axolotl_focus.repair"]
    assert cfgs["ce-repair"]["focus_distill"] == "none"
    assert types["ce-repair"] == ["completion", "axolotl_focus.repair"]
    dpo = cfgs["dpo"]
    assert dpo["rl"] == "dpo" and dpo["focus_dpo_reference"] == "teacher" and "focus_distill" not in dpo
    assert dpo["datasets"] == [{"path": "/d/pairs.jsonl", "ds_type": "json", "split": "train"}]
    assert dpo["max_steps"] == s.dpo_steps and cfgs["ce"]["max_steps"] == s.train_steps
    for run in ("focus-repair", "ce-repair"):
        assert cfgs[run]["datasets"][1]["path"] == "/d/pairs.jsonl"
    with pytest.raises(ValueError, match="unknown"):
        train_configs(DemoSettings(runs=("ce", "nope")), "/m", "/s", "/p", tmp_path)


def test_cached_runs_share_one_cache_and_match_their_in_process_twins(tmp_path):
    from axolotl_focus.demo import CACHE_PAIRS, cache_dir

    full, quick, smoke = (demo_settings(preset=p) for p in ("full", "quick", "smoke"))
    assert {"kd-cached", "focus-cached", "focus-seed1"} <= set(full.runs)
    assert {"focus", "focus-cached"} <= set(smoke.runs)  # CI's run trains from a cache too
    assert not any(r.endswith("cached") for r in quick.runs)  # quick stays quick: no cache build
    assert (full.cache_k, quick.cache_k, smoke.cache_k) == (512, 512, 32)
    cfgs = train_configs(full, "/m/width", "/d/sft.jsonl", "/d/pairs.jsonl", tmp_path)
    cache = str(tmp_path / "teacher_cache_k512")
    assert cache_dir(full, tmp_path) == tmp_path / "teacher_cache_k512"
    assert cfgs["kd-cached"]["focus_teacher_cache"] == cfgs["focus-cached"]["focus_teacher_cache"] == cache
    for run, twin in CACHE_PAIRS:  # the same config but for the cache (or the seed) and the output folder
        a = {k: v for k, v in cfgs[run].items() if k not in ("output_dir", "focus_teacher_cache", "seed")}
        b = {k: v for k, v in cfgs[twin].items() if k not in ("output_dir", "focus_teacher_cache", "seed")}
        assert a == b, run
        assert "focus_teacher_cache" not in cfgs[twin]
    assert cfgs["focus-seed1"]["seed"] == cfgs["focus"]["seed"] + 1 and cfgs["focus-cached"]["seed"] == full.seed
    # a changed k is another stage key and another cache folder (a finished run is never reused for it)
    other = demo_settings(preset="full")
    other.cache_k = 32
    assert other.stage_settings("train") != full.stage_settings("train")
    assert train_configs(other, "/m", "/s", "/p", tmp_path)["focus-cached"]["focus_teacher_cache"] != cache


def test_logged_dicts_reads_axolotl_string_values():
    text = ("junk {'loss': '4.776', 'grad_norm': '1.5', 'learning_rate': '0.001', 'loss/ce': '4.7', 'epoch': '0.1'}\n"
            "\r 50%|#####| {'loss': 3.5, 'loss/focus': 0.25, 'note': 'x'} more\n"
            "{'train_runtime': '0.575', 'train_loss': '4.776'}\n")
    rows = logged_dicts(text)
    assert rows == [{"loss": 4.776, "grad_norm": 1.5, "learning_rate": 0.001, "loss/ce": 4.7, "epoch": 0.1},
                    {"loss": 3.5, "loss/focus": 0.25}]


def test_long_commands_take_a_thread_count():
    import torch

    from axolotl_focus.cli import THREADED, build_parser, set_threads

    for command in THREADED:
        extra = {"prune": [], "pairs": [], "eval": ["a=b"], "model": [],
                 "teacher-cache": ["cfg.yml", "--output", "x"]}[command]
        assert build_parser().parse_args([command, *extra, "--threads", "3"]).threads == 3
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, *extra, "--threads", "0"])
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert 1 <= set_threads(None) <= (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)


def test_cli_parses_demo_options():
    from axolotl_focus.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--out", "x"])
    assert args.quick and args.out == "x" and args.force is None and args.progress
    assert build_parser().parse_args(["demo", "--force"]).force == []
    assert build_parser().parse_args(["demo", "--force", "train", "eval"]).force == ["train", "eval"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--force", "nonsense"])


# --------------------------------------------------------------------------------------------
# fast: stage caching with stand-in stages
# --------------------------------------------------------------------------------------------


class FakeDemo(Demo):
    """Every stage writes one file and counts its calls; ``fail`` makes a stage raise once."""

    def __init__(self, *args, calls, fail=None, **kwargs):
        super().__init__(*args, progress=False, threads=1, echo=self.lines.append, **kwargs)
        self.calls, self.fail = calls, fail

    lines: list = []

    def write_report(self, total_s=None):
        path = self.out / "demo_report.md"
        path.write_text("report\n")
        return path


def _fake_stage(stage):
    def run(self, folder):
        self.calls[stage] = self.calls.get(stage, 0) + 1
        (folder / "output.txt").write_text(f"{stage} {self.calls[stage]}")
        if self.fail == stage:
            self.fail = None
            raise RuntimeError(f"{stage} crashed")
        return {"n": self.calls[stage]}, f"{stage} ok"
    return run


for _stage in STAGES:
    setattr(FakeDemo, f"_run_{_stage}", _fake_stage(_stage))


def _run(tmp_path, calls, settings=None, **kwargs):
    FakeDemo.lines = []
    d = FakeDemo(tmp_path / "out", settings or demo_settings(quick=True, model="micro"), calls=calls, **kwargs)
    d.run()
    return d


def test_stages_run_once_then_are_reused(tmp_path):
    calls = {}
    d = _run(tmp_path, calls)
    assert calls == {stage: 1 for stage in STAGES}
    assert d.status == {stage: "ran" for stage in STAGES}
    for stage in STAGES:
        done = read_json(d.dir(stage) / "done.json")
        assert done["key"] == d.key(stage) and done["summary"] == f"{stage} ok" and done["data"] == {"n": 1}
        assert d.dir(stage).name == f"{STAGES.index(stage) + 1}_{stage}"
    d = _run(tmp_path, calls)
    assert calls == {stage: 1 for stage in STAGES}
    assert d.status == {stage: "reused" for stage in STAGES}
    assert sum(": reused (" in line for line in FakeDemo.lines) == len(STAGES)
    assert "6 of 6 stages reused" in FakeDemo.lines[-1]


def test_force_redoes_a_stage_and_everything_downstream(tmp_path):
    calls = {}
    _run(tmp_path, calls)
    d = _run(tmp_path, calls, force=("pairs",))
    assert calls == {"teacher": 1, "prune": 1, "table1": 1, "pairs": 2, "train": 2, "eval": 2}
    assert d.status["table1"] == "reused" and d.status["train"] == "ran"
    _run(tmp_path, calls, force=True)
    assert calls == {"teacher": 2, "prune": 2, "table1": 2, "pairs": 3, "train": 3, "eval": 3}
    with pytest.raises(ValueError, match="unknown stage"):
        FakeDemo(tmp_path / "x", demo_settings(True, model="micro"), calls={}, force=("bogus",))
    with pytest.raises(ValueError, match="--jobs must be at least 1, got -1"):
        FakeDemo(tmp_path / "x", demo_settings(True, model="micro"), calls={}, jobs=-1)
    import argparse

    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    assert parser.parse_args(["--jobs", "2", "--threads", "1"]).jobs == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--threads", "0"])
    assert not (tmp_path / "x").exists()  # nothing written before the settings were checked


def test_changed_settings_redo_only_the_affected_stages(tmp_path):
    calls = {}
    s = demo_settings(quick=True, model="micro")
    _run(tmp_path, calls, s)
    s.train_steps += 1  # a train setting: train and eval (which reads it) redo
    _run(tmp_path, calls, s)
    assert calls == {"teacher": 1, "prune": 1, "table1": 1, "pairs": 1, "train": 2, "eval": 2}
    s.table1_prompts += 1
    _run(tmp_path, calls, s)
    assert calls == {"teacher": 1, "prune": 1, "table1": 2, "pairs": 1, "train": 2, "eval": 3}
    _run(tmp_path, calls, demo_settings(quick=False, model="micro"))  # the other preset: every stage
    assert calls == {"teacher": 2, "prune": 2, "table1": 3, "pairs": 2, "train": 3, "eval": 4}


def test_a_crashed_stage_leaves_no_marker_and_is_redone(tmp_path):
    calls = {}
    with pytest.raises(RuntimeError, match="pairs crashed"):
        _run(tmp_path, calls, fail="pairs")
    out = tmp_path / "out"
    assert (out / "4_pairs" / "output.txt").is_file()  # partial output ...
    assert not (out / "4_pairs" / "done.json").exists()  # ... but no marker
    assert not (out / "5_train").exists()
    d = _run(tmp_path, calls)
    assert calls == {"teacher": 1, "prune": 1, "table1": 1, "pairs": 2, "train": 1, "eval": 1}
    assert d.status["pairs"] == "ran" and d.status["prune"] == "reused"
    assert (out / "4_pairs" / "output.txt").read_text() == "pairs 2"


def test_stale_outputs_of_other_settings_are_removed(tmp_path):
    calls = {}
    s = demo_settings(quick=True, model="micro")
    _run(tmp_path, calls, s)
    stray = tmp_path / "out" / "4_pairs" / "stale.jsonl"
    stray.write_text("old")
    s.target_pairs += 1
    _run(tmp_path, calls, s)
    assert not stray.exists()


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


def test_run_concurrently_keeps_shared_datasets_apart_until_prepared():
    """At most `jobs` runs at once; a run sharing its dataset with a running one waits until a run
    with that dataset has finished (it prepared axolotl's dataset cache); results come back whole."""
    import threading

    from axolotl_focus.demo import run_concurrently

    lock, log, active = threading.Lock(), [], set()
    items = [("ce", "sft"), ("kd", "sft"), ("focus", "sft"), ("repair", "pairs"), ("dpo", "dpo")]

    def work(name, key, slot):
        with lock:
            assert len(active) < 2 and slot not in {s for _, s in active}
            log.append(("start", name, {n for n, _ in active}))
            active.add((name, slot))
        time.sleep(0.05)
        with lock:
            active.discard((name, slot))
        return name.upper()

    done = list(run_concurrently(items, work, 2, dataset_key=lambda item: item[1]))
    assert sorted(done) == sorted((n, n.upper()) for n, _ in items)
    started = [(name, others) for _, name, others in log]
    assert started[0] == ("ce", set()) and started[1] == ("repair", {"ce"})  # kd waits for ce's cache
    assert max(len(others) for _, others in started) == 1
    assert dict(started)["kd"] != {"ce"} and "ce" not in dict(started)["focus"]
    assert [name for name, _ in run_concurrently(items, lambda n, k, s: n, 1, lambda i: i[1])] == [n for n, _ in items]
