"""Every benchmark runs at a tiny size in CI, so that none rots between `make bench` runs.

Only what a tiny size can show is checked: the scripts finish, their fused implementations equal
the plain/dense ones (the checks each script makes itself), and the metrics they time are sane.
Speed and memory ratios need the full sizes (`make bench`) and are not asserted here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def bench(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, f"{script} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.parametrize("script", ["distill_loss.py", "aux_losses.py"])
def test_fused_loss_benchmarks_check_against_dense(script, tmp_path):
    path = tmp_path / "out.json"
    bench(script, "--quick", "--repeats", "1", "--json", str(path))
    result = json.loads(path.read_text())
    modes = {(c.get("term") or c.get("mode")) for c in result["checks"]}
    assert modes == ({"focus", "kd"} if script == "distill_loss.py" else {"ul", "scalegrad", "tailr", "ditto"})
    assert all(c["ok"] for c in result["checks"]), result["checks"]
    assert not [r for r in result["results"] if "error" in r and not r["error"].startswith("skipped")]


def test_prune_memory_benchmark_runs():
    out = bench("prune_memory.py", "--hidden", "64", "--intermediate", "128", "--layers", "8", "--heads", "4",
                "--kv-heads", "2", "--vocab", "512", "--samples", "2", "--seq-len", "16", "--threads", "1")
    peaks = re.findall(r"^\| (?:post-accumulate|all \.grad)[^|]*\| (\d+) \|", out, re.M)
    assert len(peaks) == 2 and all(int(p) > 0 for p in peaks), out
    assert "hooks / all-grads peak ratio" in out


def test_metric_benchmarks_run_and_measure_sane_values():
    out = bench("degeneration_speed.py", "--texts", "200", "--length", "200", "--repeats", "1")
    # half of the synthetic texts are noisy loops, half i.i.d. Zipf draws over 32k ids (no loop):
    # CREP (% of texts ending in a loop) at most 50, and most of the loops are caught
    crep = float(re.search(r"CREP = ([\d.]+)", out).group(1))
    assert 25 <= crep <= 50, out
    out = bench("metric_speed.py", "--vocab", "1000", "--positions", "16", "--chunk", "8", "--texts", "60",
                "--dim", "16", "--seeds", "1")
    mauve = float(re.search(r"values \[([\d.]+)", out).group(1))
    assert 0 < mauve <= 1, out


def test_real_model_speed_quick(tmp_path):
    """The real-model benchmark at its tiny size (a local looping LLaMA): every part runs, the
    ratios are the measured numbers' ratios, bf16 agrees with fp32, and the shrinking loop
    computes fewer row-steps than rows x steps while giving each row the same tokens."""
    path = tmp_path / "speed.json"
    out = bench("real_model_speed.py", "--quick", "--threads", "1", "--json", str(path))
    r = json.loads(path.read_text())
    assert r["quick"] and "Ratios (this run)" in out
    gen = [g for g in r["generation"] if "error" not in g]
    assert {(g["mode"], g["batch"]) for g in gen} >= {("fp32", 1), ("fp32", 4), ("bf16", 4)}
    assert all(g["tokens_per_s"] > 0 and g["tokens"] > 0 for g in gen)
    by = {(g["mode"], g["batch"]): g["tokens_per_s"] for g in gen}
    assert r["ratios"]["gen bf16/fp32 tokens/s, batch 4, 1 thread(s)"] == by[("bf16", 4)] / by[("fp32", 4)]
    for check in r["bf16_check"]:
        assert "error" in check or check["argmax_agreement"] > 0.9
    t = r["train_step"]
    assert t["ce_loss"] > 0 and t["focus_distill"] > 0
    assert abs(t["ce_loss"] - t["focus_ce_loss"]) < 1e-4 * t["ce_loss"]  # same student, same CE
    assert r["ratios"]["train FOCUS/CE step time"] == t["focus_s"] / t["ce_s"]
    assert r["ratios"]["train limit 1 + teacher forward/CE step"] == 1 + t["teacher_forward_s"] / t["ce_s"]
    runs = r["mining"]["runs"]
    b, padded, one = runs["batched"], runs["batched_padded"], runs["one_at_a_time"]
    assert b["row_steps"] < b["padded_row_steps"] == padded["row_steps"] == padded["padded_row_steps"]
    assert b["stops"].get("loop", 0) > 0 and b["tokens"] == padded["tokens"] == one["tokens"]
    assert padded["rows_equal_to_batched"] == one["rows_equal_to_batched"] == r["mining"]["prompts"]
    assert r["ratios"]["mining row-steps computed/padded"] == b["row_steps"] / b["padded_row_steps"]


def test_teacher_cache_fidelity_quick(tmp_path):
    """The top-k teacher-cache fidelity benchmark at its tiny size (a micro LLaMA, vocabulary 384,
    width-pruned by run_prune; k = 4, 16, 64 and V): the bucketed KD loss, its gradient and the
    covered teacher mass all approach the full-vocabulary values as k grows, the bucketed KD is never
    above the full KD (log-sum inequality), and k = V reproduces the full objectives."""
    path = tmp_path / "fidelity.json"
    out = bench("teacher_cache_fidelity.py", "--quick", "--threads", "1", "--json", str(path))
    r = json.loads(path.read_text())
    h = r["header"]
    assert h["quick"] and h["positions"] == 512 and h["vocab"] == 384 and h["ks"] == [4, 16, 64, 384]
    assert h["pruning"]["method"] == "width" and h["pruning"]["params_after"] < h["pruning"]["params_before"]
    assert "## Fidelity of the bucketed loss" in out and "| KD | 64 |" in out
    rows = {(f["mode"], f["k"]): f for f in r["fidelity"]}
    kd = [rows[("kd", k)] for k in h["ks"]]
    for small, large in zip(kd, kd[1:]):
        assert large["loss_rel_err"] < small["loss_rel_err"] and large["grad_rel_err"] < small["grad_rel_err"]
        assert large["grad_cosine"] > small["grad_cosine"] and large["loss_k"] > small["loss_k"]
    assert all(f["bucketed_le_full_tokens"] == 1.0 and f["loss_k"] <= f["loss_full"] * (1 + 1e-6) for f in kd)
    assert kd[0]["loss_rel_err"] > 0.1  # k = 4 of 384 tokens is a real approximation
    for mode in ("focus", "kd"):
        exact = rows[(mode, 384)]
        assert exact["loss_rel_err"] < 1e-6 and exact["token_rel_err_p95"] < 1e-4, exact
        assert exact["grad_rel_err"] < 1e-5 and exact["grad_cosine"] > 1 - 1e-6, exact
        assert rows[(mode, 4)]["grad_rel_err"] > 100 * exact["grad_rel_err"] + 1e-3
    cover = r["coverage"]
    for small, large in zip(cover, cover[1:]):
        assert large["tau2_mean"] > small["tau2_mean"] and large["tau1_mean"] > small["tau1_mean"]
    assert all(c["tau1_mean"] >= c["tau2_mean"] and c["tau2_p5"] <= c["tau2_mean"] for c in cover)
    assert abs(cover[-1]["tau2_mean"] - 1) < 1e-6 and abs(cover[-1]["tau1_p5"] - 1) < 1e-6
    assert [(c["k"], c["int32_fp32_fp32"], c["int32_fp16_fp32"]) for c in r["cache_sizes"]] == \
        [(k, 8 * k + 4, 6 * k + 4) for k in h["ks"]]


def test_teacher_cache_speed_quick(tmp_path):
    """The teacher-cache training-cost benchmark at its tiny size (a micro LLaMA teacher of ~100 MB
    fp32 weights, width-pruned by run_prune; k = 8 and 64, k = V built on 4 windows): the caches'
    sizes on disk are 8k + 4 bytes per position plus a small fixed overhead, every variant's steps
    ran with finite losses and the same CE on the same initial weights, and the cache variants never
    load the teacher: their subprocess peak RSS is below the in-process teacher's by most of the
    teacher's weight bytes (and close to the CE-only worker's)."""
    path = tmp_path / "speed.json"
    out = bench("teacher_cache_speed.py", "--quick", "--threads", "1", "--json", str(path))
    r = json.loads(path.read_text())
    h = r["header"]
    assert h["quick"] and h["vocab"] == 384 and h["ks"] == [8, 64] and h["batch"] == 2 and h["seq_len"] == 64
    assert "## Cache build" in out and "| FOCUS, cache k=64 |" in out and "| FOCUS, in-process teacher |" in out
    assert h["params_student"] < h["params_teacher"] and h["teacher_weight_bytes"] > 90 * 2**20
    builds = {b["k"]: b for b in r["build"]}
    assert sorted(builds) == [8, 64, 384] and builds[384]["sequences"] == 4
    for k, b in builds.items():
        assert b["positions"] == b["sequences"] * (h["seq_len"] - 1) and b["build_s"] > 0
        assert b["format_bytes"] == (8 * k + 4) * b["positions"]
        # cache.json + the datasets metadata of one shard + the key column: a few kB
        assert 0 < b["overhead_bytes"] <= 16384 * b["shards"] + 128 * b["sequences"], b
    variants = {(t["variant"], t["k"]): t for t in r["train"]}
    assert sorted(variants, key=str) == sorted([("ce", None), ("teacher", None), ("cache", 8), ("cache", 64)], key=str)
    ce, teacher = variants[("ce", None)], variants[("teacher", None)]
    for t in r["train"]:
        assert t["finite"] and len(t["steps"]) == h["warmup"] + h["steps"] and t["median_s"] > 0
        assert t["tokens_per_step"] == h["batch"] * (h["seq_len"] - 1)
        assert abs(t["first"]["ce"] - ce["first"]["ce"]) < 1e-5 * ce["first"]["ce"]  # same student, same batch
        assert t["teacher_loaded"] == (t["variant"] == "teacher") and t["cache_opened"] == (t["variant"] == "cache")
        if t["variant"] != "ce":
            assert t["first"]["distill"] > 0 and len(t["paired_ce_steps"]) == h["warmup"] + h["steps"]
            assert r["paired_ratios"][t["variant"] if t["k"] is None else f"cache k={t['k']}"] == \
                t["median_s"] / t["paired_ce_median_s"]
        assert r["ratios"][t["variant"] if t["k"] is None else f"cache k={t['k']}"] == t["median_s"] / ce["median_s"]
    for k in h["ks"]:
        cached = variants[("cache", k)]
        assert cached["peak_rss"] <= teacher["peak_rss"] - 0.75 * h["teacher_weight_bytes"], (cached, teacher)
        assert cached["peak_rss"] <= ce["peak_rss"] + 0.25 * h["teacher_weight_bytes"], (cached, ce)
        # not a transient peak: the in-process teacher's weights stay resident while training
        assert cached["rss_after_warmup"] <= teacher["rss_after_warmup"] - 0.75 * h["teacher_weight_bytes"]


def test_gpu_check_cpu_rehearsal(tmp_path):
    """The GPU check (benchmarks/gpu_check.py) as CI rehearses it: the same script at tiny shapes on
    the CPU, with axolotl, pydantic, datasets and trl unimportable as on the GPU machine. Every
    section runs to its end, every fused loss is within tolerance of its float64 reference in fp32
    and bf16, and the measurements are those of the variants the check names."""
    bench("gpu_check.py", "--device", "cpu", "--tiny", "--threads", "1", "--out", str(tmp_path))
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["header"]["tiny"] and r["header"]["blocked_imports"] == ["axolotl", "datasets", "pydantic", "trl"]
    sections = r["sections"]
    assert list(sections) == ["correctness", "loss_speed", "train_step", "prune", "generate"]
    assert all(s["status"] == "done" for s in sections.values()), {k: s["status"] for k, s in sections.items()}
    checks = sections["correctness"]["items"]
    assert len({c["loss"] for c in checks}) == 10 and len(checks) == 20
    assert all(c["ok"] for c in checks), [c["line"] for c in checks if not c["ok"]]
    (speed,) = sections["loss_speed"]["items"]
    assert [x["impl"] for x in speed["results"] if not x.get("error")] == ["plain", "fused", "liger"]
    assert speed["checks"] and all(c["ok"] for c in speed["checks"])
    train = {t["variant"]: t for t in sections["train_step"]["items"]}
    assert len(train) == 6 and not [t for t in train.values() if "error" in t]
    assert train["CE, fused"]["loss"] == pytest.approx(train["CE, the model's own loss"]["loss"], rel=1e-2)
    assert train["FOCUS, plain logits"]["loss"] == pytest.approx(train["FOCUS, teacher in memory"]["loss"], rel=1e-2)
    assert train["FOCUS, teacher in memory"]["flop_limit"] == pytest.approx(4 / 3)  # same-shape teacher
    prune = {p["pass"]: p for p in sections["prune"]["items"]}
    assert len(prune) == 3 and prune["prune_width (importance + slicing)"]["params_after"] < \
        prune["prune_width (importance + slicing)"]["params_before"]
    ours, hf = sections["generate"]["items"]
    assert ours["tokens"] == hf["tokens"] > 0 and ours["row_steps"] < ours["padded_row_steps"] == hf["row_steps"]
    assert "| correctness | done |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_prune_settings_are_prune_settings_defaults():
    """The GPU check prunes with a plain object (no pydantic there): it must be PruneSettings()."""
    sys.path.insert(0, BENCH)
    from gpu_check import prune_settings

    from axolotl_focus.prune.settings import PruneSettings

    ours, defaults = prune_settings(10, 64), PruneSettings()
    for key, value in vars(ours).items():
        if not callable(value):
            assert getattr(defaults, key) == value, key
    assert ours.layer_ranges(16) == defaults.layer_ranges(16)
