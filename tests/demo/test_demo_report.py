"""The experiment's verdicts and the demo report on a synthetic finished run
(axolotl_focus/demo/experiment.py, report.py, plots.py): every stage record and every model's
generations are written by hand with known effects, so the verdicts are known in advance."""

import json
import random

import numpy as np
import pytest

from axolotl_focus.demo import experiment, plots
from axolotl_focus.demo.pipeline import Context, stage_dir
from axolotl_focus.demo.report import View, effect_panels, repetition_panels, seeds_needed, write_report
from axolotl_focus.demo.settings import demo_settings, run_id, run_label
from axolotl_focus.demo.stages import TABLE
from axolotl_focus.demo.stages.eval import REFERENCES, eval_config
from axolotl_focus.evaluate import model_dir

DOCS = 40
# share of looping continuations per model (per seed: +-3 points of seed noise); RePAIR cuts CE's and
# FOCUS's loops by 60% (b: holds), DPO loops as much as RePAIR (c: not decided / refuted), the CE model
# loops 3x as often as the teacher (a: holds)
LOOPS = {"ce": 0.5, "kd": 0.5, "focus": 0.5, "ce-repair": 0.2, "focus-repair": 0.2, "dpo": 0.2}
REF_LOOPS = {"teacher (unpruned)": 0.15, "width pruned": 0.2, "depth pruned": 0.3}
PPL = {"ce": 50.0, "kd": 50.0, "focus": 51.0, "ce-repair": 52.0, "focus-repair": 52.5, "dpo": 50.5}


def _text(rng: random.Random, loop: bool) -> list[int]:
    if loop:
        unit = [rng.randrange(100, 200) for _ in range(5)]
        return [rng.randrange(300, 400) for _ in range(10)] + unit * 18
    return [rng.randrange(1000, 9000) for _ in range(100)]


def _write_model(cfg, name: str, share: float, ppl: float, rng: random.Random) -> None:
    folder = model_dir(cfg, name)
    (folder / "generations").mkdir(parents=True)
    files = [f"open_ended.top_p0.9.seed{s}.jsonl" for s in cfg.seeds] + ["open_ended.greedy.jsonl"]
    for file in files:
        loops = set(rng.sample(range(DOCS), round(share * DOCS)))
        with open(folder / "generations" / file, "w") as handle:
            for d in range(DOCS):
                handle.write(json.dumps({"id": str(d), "tokens": _text(rng, d in loops)}) + "\n")
    mean = {"crep": 100 * share, "rep-3": 50 * share, "mauve": 0.5}
    (folder / "results.json").write_text(json.dumps({
        "model": name, "perplexity": {"ppl": ppl},
        "open_ended": {"prompts": DOCS, "decodings": {"top_p0.9": {"mean": mean}, "greedy": {"mean": mean}}}}))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A synthetic finished full-preset run: stage records, generations, results, diagnostics."""
    out = tmp_path_factory.mktemp("demo")
    s = demo_settings(preset="full")
    ctx = Context(out, threads=1, jobs=2, progress=False, echo=lambda m: None)
    rng = random.Random(0)

    def done(name, data):
        folder = stage_dir(out, TABLE, name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "done.json").write_text(json.dumps({"key": "k", "id": name, "summary": "ok", "data": data,
                                                      "elapsed_s": 60.0, "threads": 1}))

    logs = [{"loss": 4.0 - 0.1 * i, "loss/ce": 4.0 - 0.1 * i} for i in range(s.train_steps)]
    run = {"logs": logs, "final_loss": 3.0, "elapsed_s": 100.0, "model": "/m"}
    done("teacher", {"path": str(out / "teacher"), "params": 134_515_008, "record": {"wheel": "w"}})
    done("prune", {"width": {"path": "/w", "params_before": 100, "params_after": 75, "reduction": 0.25},
                   "depth": {"path": "/d", "removed_blocks": [5, 6], "reduction": 0.23}})
    done("table1", {"in_eval": True})
    done("sft", {"sft_file": "/s.jsonl", "sft_rows": 1000, "runs": {run_id("ce", k): run for k in s.train_seeds}})
    done("pairs", {"skipped": True})
    done("train", {"teacher_cache": None, "runs": {run_id(a, k): run for a in s.arms if a != "ce"
                                                   for k in s.train_seeds}})
    cfg = eval_config(s, ctx, stage_dir(out, TABLE, "eval"), str(out / "teacher"))
    names = {}
    for name, share in REF_LOOPS.items():
        _write_model(cfg, name, share, 30.0, rng)
        names[name] = "/ref"
    for arm in s.arms:
        for k in s.train_seeds:
            noise = rng.uniform(-0.03, 0.03)
            _write_model(cfg, run_label(arm, k), LOOPS[arm] + noise, PPL[arm] * (1 + noise / 10), rng)
            names[run_label(arm, k)] = "/run"
    margins = {name: [0.5 if "RePAIR" in name else -0.2] * 6 for name in names}
    loops = {name: {"texts": DOCS, "degenerate": 10, "top": [["the the", 6, [1, 2]], [" ,", 4, [3]]]}
             for name in names}
    (stage_dir(out, TABLE, "eval") / "diagnostics.json").write_text(json.dumps({"margins": margins, "loops": loops}))
    done("eval", {"models": names, "documents": DOCS, "unavailable": []})
    return s, ctx, cfg


def test_the_verdicts_follow_from_the_intervals(finished):
    s, ctx, cfg = finished
    result = experiment.measure(s, cfg)
    rows = {(r["comparison"], r["metric"], r["primary"]): r for r in result["rows"]}
    assert len(result["rows"]) == 5 * 2 * 2  # 5 comparisons x rep-3 / CREP x 2 conditions
    for row in result["rows"]:
        assert len(row["per_seed"]) == len(s.train_seeds) == row["seeds"]
        assert row["lower"] <= row["mean"] <= row["upper"]  # a t interval around the mean of the seeds
        assert row["mean"] == pytest.approx(np.mean(row["per_seed"]))
        assert row["verdict"] == experiment.verdict(row["lower"], row["upper"], row["effect"])
    crep = rows[("CE + RePAIR vs CE", "crep", True)]
    assert crep["mean"] == pytest.approx(-0.6, abs=0.08) and crep["verdict"] == "holds"
    assert crep["bootstrap"][0] < crep["mean"] < crep["bootstrap"][1]
    assert rows[("FOCUS + RePAIR vs KD", "crep", True)]["verdict"] == "holds"
    assert rows[("CE vs teacher (unpruned)", "crep", True)]["verdict"] == "holds"
    assert rows[("CE + RePAIR vs DPO after SFT", "crep", True)]["verdict"] in ("refuted", "not decided")
    assert set(result["gates"]) == {"ce-repair", "focus-repair"}
    assert result["gates"]["ce-repair"]["state"] == "passes"  # +4% PPL: within +10%
    assert result["claims"]["a"] == "holds" and result["claims"]["b"] == "holds"
    assert result["claims"]["c"] in ("refuted", "not decided")


def test_the_report_has_every_section_and_the_plots_are_readable(finished):
    s, ctx, cfg = finished
    path = write_report(s, ctx, {"eval": "ran"}, 3600.0)
    report = path.read_text()
    for heading in ("## The paper's claims: verdicts", "### Per training seed", "### PPL beside repetition",
                    "## Held-out pair margins", "## Loop kinds", "## Tables 3 and 5 as measured", "## Wall time",
                    "## Plots"):
        assert heading in report, heading
    assert "| (b) Table 3: RePAIR cuts repetition" in report and "| **holds** |" in report
    assert report.count("seed 3: A / B (effect)") == 1
    assert "| CE + RePAIR | 0.500, 0.500, 0.500, 0.500 | 0.500 [" in report  # margins per seed
    assert "`the the` (24)" in report  # loop units pooled over an arm's 4 seeds
    saved = json.loads((ctx.out / "experiment.json").read_text())
    assert saved["claims"] == experiment.measure(s, cfg)["claims"]
    for name in ("repetition", "effects", "training_loss"):
        assert (ctx.out / "plots" / f"{name}.png").stat().st_size > 5000


def test_plots_show_the_judged_conditions_with_intervals_and_no_label_collides(finished):
    """From matplotlib's own text boxes: no two tick labels of an axis overlap; every judged
    condition is a panel; every arm and reference is a row with an interval."""
    s, ctx, cfg = finished
    view = View(s, ctx, TABLE)
    panels = repetition_panels(view)
    fig = plots.repetition_figure(panels)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["rep-3, top-p 0.9, T=0.6", "CREP, top-p 0.9, T=0.6", "rep-3, greedy", "CREP, greedy"]
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [experiment.ARMS[a].label for a in s.arms] + list(REFERENCES)
    assert all(row["lower"] < row["mean"] < row["upper"] for _, rows in panels for row in rows if row["seeds"])
    assert plots.overlapping_labels(fig) == []
    result = experiment.measure(s, cfg)
    effects = plots.effects_figure(effect_panels(result))
    assert [ax.get_title() for ax in effects.axes] == ["top-p 0.9, T=0.6", "greedy"]
    assert plots.overlapping_labels(effects) == []
    runs = {run_id(a, k): [{"loss": 1.0, "loss/ce": 1.0 - 0.01 * i} for i in range(30)]
            for a in s.arms for k in s.train_seeds}
    training = plots.training_figure(runs, {r: r.rsplit("-s", 1)[0] for r in runs})
    assert "loss/ce" in training.axes[0].get_title() and plots.overlapping_labels(training) == []


def test_overlap_check_catches_colliding_labels():
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.bar(range(4), [1, 2, 3, 4])
    ax.set_xticks(range(4), ["teacher (unpruned)", "width pruned", "depth pruned", "FOCUS + RePAIR"])
    assert plots.overlapping_labels(fig)  # the old vertical bar layout's defect


def test_seeds_needed_for_the_papers_effect():
    row = {"per_seed": [-0.1, -0.3, 0.0, -0.2], "effect": -0.3}  # sd 0.129
    need = seeds_needed(row)
    assert need is not None and 4 <= need <= 8
    assert seeds_needed({"per_seed": [-0.1], "effect": -0.3}) is None
