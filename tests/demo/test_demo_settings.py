"""`axolotl-focus demo` settings (axolotl_focus/demo/settings.py): the presets, the experiment's runs
and the axolotl config of every arm."""

import pytest

from axolotl_focus.demo import ARMS, DemoSettings, demo_settings, run_config
from axolotl_focus.demo.settings import SFT_ARM, run_id


def test_the_full_real_preset_is_the_experiment():
    full = demo_settings(preset="full")
    assert set(full.runs) == {"ce", "kd", "focus", "ce-repair", "focus-repair", "dpo"}
    assert len(full.train_seeds) >= 4 and full.mine_from == "tuned" and full.clean_text
    assert full.eval_temperature == 0.6 and 0 < full.heldout_share <= 0.2
    sft, train = full.runs_of("sft"), full.runs_of("train")
    assert set(sft) == {run_id("ce", k) for k in full.train_seeds}
    assert len(train) == 5 * len(full.train_seeds) and not set(sft) & set(train)
    for preset in ("quick", "smoke", "cache"):
        s = demo_settings(preset=preset)
        assert set(s.runs) <= set(ARMS) and SFT_ARM in s.arms
        for name in ("train_steps", "mining_prompts", "eval_documents"):
            assert getattr(s, name) <= getattr(full, name), (preset, name)
    assert len(demo_settings(preset="quick").train_seeds) >= 2
    assert not demo_settings(preset="cache").needs_pairs and full.needs_pairs
    assert {"focus-cached", "ce-repair", "dpo"} <= set(demo_settings(preset="smoke").runs)  # CI: every new path
    micro_full, micro_quick = demo_settings(False, model="micro"), demo_settings(True, model="micro")
    assert micro_full.runs == full.runs and {"ce-repair", "dpo"} <= set(micro_quick.runs)
    assert demo_settings(True, seed=3, model="micro").seed == 3
    with pytest.raises(ValueError, match="real model only"):
        demo_settings(model="micro", preset="smoke")


def test_stage_keys_follow_the_settings_they_depend_on():
    s = demo_settings(preset="full")
    other = demo_settings(preset="full")
    other.pairs_per_step += 1  # a train setting: not the sft stage's
    assert other.stage_settings("sft") == s.stage_settings("sft")
    assert other.stage_settings("train") != s.stage_settings("train")
    other.clean_text = False  # the text changes every stage that reads it
    assert all(other.stage_settings(st) != s.stage_settings(st) for st in ("sft", "pairs", "train", "eval"))


def test_every_arm_is_an_axolotl_config_and_arms_differ_only_in_their_method(tmp_path):
    s = demo_settings(preset="full")
    paths = dict(student="/m/width", sft="/d/sft.jsonl", work=tmp_path, pairs="/d/pairs.train.jsonl",
                 sft_model="/s/ce-s1/merged")
    cfgs = {arm: run_config(s, arm, 1, **paths) for arm in ARMS}
    for arm, cfg in cfgs.items():
        assert cfg["plugins"] == ["axolotl_focus.FocusPlugin"] and "focus_teacher_model" not in cfg
        assert cfg["output_dir"] == str(tmp_path / f"{arm}-s1") and cfg["seed"] == s.seed + 1
        assert cfg["dataset_prepared_path"] == str(tmp_path / "prepared")  # shared: same data prepared once
        assert cfg["bf16"] is False and cfg["fp16"] is False and cfg["sample_packing"] is False
        assert cfg["adapter"] == "lora" and cfg["lora_r"] == s.train_lora_r
    assert cfgs["ce"]["focus_distill"] == "none" and cfgs["kd"]["focus_distill"] == "kd"
    sft_only = [{"path": "/d/sft.jsonl", "ds_type": "json", "type": "completion"}]
    for arm in ("ce", "kd", "focus", "ce-repair", "focus-repair", "kd-cached", "focus-cached"):
        assert cfgs[arm]["base_model"] == "/m/width" and cfgs[arm]["datasets"] == sft_only  # the same SFT data
    for arm in ("ce-repair", "focus-repair"):  # the pairs as the stream: the SFT sampler never sees them
        assert cfgs[arm]["focus_repair_pairs"] == "/d/pairs.train.jsonl"
        assert cfgs[arm]["focus_repair_pairs_per_step"] == s.pairs_per_step
    strip = ("focus_distill", "focus_repair_pairs", "focus_repair_pairs_per_step", "focus_teacher_cache", "output_dir")
    same = {arm: {k: v for k, v in cfg.items() if k not in strip} for arm, cfg in cfgs.items() if arm != "dpo"}
    assert all(c == same["ce"] for c in same.values())  # seed, steps, lr, batch, LoRA: all shared
    dpo = cfgs["dpo"]
    assert dpo["rl"] == "dpo" and dpo["focus_dpo_reference"] == "teacher" and "focus_distill" not in dpo
    assert dpo["base_model"] == "/s/ce-s1/merged"  # after the SFT of the same seed
    assert dpo["datasets"] == [{"path": "/d/pairs.train.jsonl", "ds_type": "json", "split": "train"}]
    assert dpo["max_steps"] * dpo["micro_batch_size"] == s.train_steps * s.pairs_per_step  # as many pair visits
    assert cfgs["focus-cached"]["focus_teacher_cache"] == str(tmp_path / "teacher_cache_k512")
    with pytest.raises(ValueError, match="unknown"):
        run_config(DemoSettings(), "nope", 0, **paths)
    with pytest.raises(ValueError, match="CE run of the same seed"):
        run_config(s, "dpo", 0, **(paths | {"sft_model": None}))
