"""`axolotl-focus demo` stage caching (axolotl_focus/demo/pipeline.py) with a table of stand-in stages."""

import argparse

import pytest

from axolotl_focus.demo import STAGES, TABLE, Demo, Stage, add_demo_arguments, demo_settings
from axolotl_focus.files import read_json


def fake_table(calls: dict, fail: dict):
    """The demo's table (names, titles, needs) with stages that write one file and count calls;
    ``fail[stage]`` makes that stage raise once. Each records what it was given."""

    def make(name):
        def run(s, ctx, folder, records):
            calls[name] = calls.get(name, 0) + 1
            (folder / "output.txt").write_text(f"{name} {calls[name]}")
            if fail.pop(name, None):
                raise RuntimeError(f"{name} crashed")
            return {"n": calls[name], "saw": sorted(records)}, f"{name} ok"
        return run

    return tuple(Stage(st.name, st.title, st.needs, make(st.name), st.resumable) for st in TABLE)


def _run(tmp_path, calls, settings=None, fail=None, **kwargs):
    lines = []
    table = fake_table(calls, fail or {})
    d = Demo(tmp_path / "out", settings or demo_settings(quick=True, model="micro"), table,
             report=lambda s, ctx, status, total: (ctx.out / "demo_report.md").write_text("r") and ctx.out,
             progress=False, threads=1, echo=lines.append, **kwargs)
    d.run()
    return d, lines


def test_stages_run_once_in_table_order_then_are_reused(tmp_path):
    calls = {}
    d, _ = _run(tmp_path, calls)
    assert calls == {stage: 1 for stage in STAGES} and d.status == {stage: "ran" for stage in STAGES}
    for i, stage in enumerate(STAGES):
        done = read_json(d.dir(stage) / "done.json")
        assert done["summary"] == f"{stage} ok" and done["data"]["n"] == 1
        assert done["data"]["saw"] == sorted(STAGES[:i])  # a stage reads the records of the stages before it
        assert d.dir(stage).name == f"{i + 1}_{stage}"
    d, lines = _run(tmp_path, calls)
    assert calls == {stage: 1 for stage in STAGES} and d.status == {stage: "reused" for stage in STAGES}
    assert f"{len(STAGES)} of {len(STAGES)} stages reused" in lines[-1]


def test_force_redoes_a_stage_and_what_reads_it(tmp_path):
    calls = {}
    _run(tmp_path, calls)
    d, _ = _run(tmp_path, calls, force=("pairs",))
    assert calls == {"teacher": 1, "prune": 1, "table1": 1, "sft": 1, "pairs": 2, "train": 2, "eval": 2}
    assert d.status["sft"] == "reused" and d.status["train"] == "ran"
    _run(tmp_path, calls, force=("sft",))  # pairs (mined from the CE run), train and eval read it
    assert calls == {"teacher": 1, "prune": 1, "table1": 1, "sft": 2, "pairs": 3, "train": 3, "eval": 3}
    with pytest.raises(ValueError, match="unknown stage"):
        Demo(tmp_path / "x", demo_settings(True, model="micro"), TABLE, report=None, force=("bogus",))
    with pytest.raises(ValueError, match="--jobs must be at least 1, got -1"):
        Demo(tmp_path / "x", demo_settings(True, model="micro"), TABLE, report=None, jobs=-1)
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
    s.pairs_per_step += 1  # the train stage's: train and eval redo, the CE runs and the pairs stay
    _run(tmp_path, calls, s)
    assert calls == {"teacher": 1, "prune": 1, "table1": 1, "sft": 1, "pairs": 1, "train": 2, "eval": 2}
    s.train_steps += 1  # the CE runs too: and so the pairs mined from them
    _run(tmp_path, calls, s)
    assert calls == {"teacher": 1, "prune": 1, "table1": 1, "sft": 2, "pairs": 2, "train": 3, "eval": 3}


def test_a_crashed_stage_leaves_no_marker_and_is_redone(tmp_path):
    calls = {}
    with pytest.raises(RuntimeError, match="pairs crashed"):
        _run(tmp_path, calls, fail={"pairs": True})
    out = tmp_path / "out"
    assert (out / "5_pairs" / "output.txt").is_file() and not (out / "5_pairs" / "done.json").exists()
    assert not (out / "6_train").exists()
    d, _ = _run(tmp_path, calls)
    assert calls["pairs"] == 2 and calls["sft"] == 1 and d.status["sft"] == "reused"
    assert (out / "5_pairs" / "output.txt").read_text() == "pairs 2"


def test_resumable_stages_keep_their_finished_parts_others_start_clean(tmp_path):
    calls = {}
    with pytest.raises(RuntimeError):
        _run(tmp_path, calls, fail={"train": True, "pairs": False})
    out = tmp_path / "out"
    (out / "6_train" / "finished-run.done.json").write_text("{}")  # a run finished before the crash
    (out / "5_pairs" / "stray.jsonl").write_text("old")
    _run(tmp_path, calls, force=("pairs",))
    assert not (out / "5_pairs" / "stray.jsonl").exists()
    assert not (out / "6_train" / "finished-run.done.json").exists()  # redone for new pairs: another key
    with pytest.raises(RuntimeError):
        _run(tmp_path, calls, fail={"train": True}, force=("train",))
    (out / "6_train" / "finished-run.done.json").write_text("{}")
    _run(tmp_path, calls)  # the same key: the resumable stage keeps what it finished
    assert (out / "6_train" / "finished-run.done.json").is_file()
