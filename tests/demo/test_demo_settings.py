"""`axolotl-focus demo` settings (axolotl_focus/demo/settings.py): the presets and the generated
axolotl configs of every run."""


import pytest

from axolotl_focus.demo import RUNS, DemoSettings, demo_settings, train_configs


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
