"""`axolotl-focus demo` stage caching (axolotl_focus/demo/stages/) with stand-in stages."""


import pytest

from axolotl_focus.demo import STAGES, Demo, add_demo_arguments, demo_settings, read_json


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
