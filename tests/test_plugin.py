"""The plugin through axolotl's own config loading: schema, defaults, teacher inference, errors."""

import os

import pytest
import yaml

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny", "focus.yml")


def tiny_config(tiny_pair, tmp_path, **overrides):
    """The shipped example config, pointed at the test's tiny models."""
    with open(EXAMPLE, encoding="utf-8") as handle:
        cfg = yaml.safe_load(handle)
    build = os.path.dirname(tiny_pair["student"])
    text = yaml.safe_dump(cfg).replace("examples/tiny/build", build)
    cfg = yaml.safe_load(text)
    cfg["output_dir"] = str(tmp_path / "out")
    cfg.update(overrides)
    for key, value in list(cfg.items()):
        if value is None:
            del cfg[key]
    return cfg


def load(cfg, tmp_path):
    from axolotl.cli.config import load_cfg

    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return load_cfg(str(path))


def test_two_lines_suffice_and_paper_defaults(tiny_pair, tmp_path, plugin_manager):
    cfg = load(tiny_config(tiny_pair, tmp_path), tmp_path)
    assert cfg.plugins == ["axolotl_focus.FocusPlugin"]
    assert cfg.focus_distill == "focus"
    assert (cfg.focus_alpha, cfg.focus_temperature, cfg.focus_beta, cfg.focus_gamma) == (0.05, 2.0, 15.0, 1.0)
    # inferred from the student checkpoint's recorded source model
    assert os.path.samefile(cfg.focus_teacher_model, tiny_pair["teacher"])

    plugin = plugin_manager.plugins["axolotl_focus.FocusPlugin"]
    from axolotl_focus.train.trainer import FocusTrainer

    assert plugin.get_trainer_cls(cfg) is FocusTrainer
    args = plugin.get_training_args(cfg)
    assert args["focus_alpha"] == 0.05 and args["focus_distill"] == "focus"
    assert os.path.samefile(args["focus_teacher_model"], tiny_pair["teacher"])


def test_explicit_keys_override(tiny_pair, tmp_path, plugin_manager):
    cfg = load(tiny_config(tiny_pair, tmp_path, focus_distill="kd", focus_temperature=1.5,
                           focus_teacher_model=tiny_pair["teacher"]), tmp_path)
    assert cfg.focus_distill == "kd" and cfg.focus_temperature == 1.5


def test_missing_teacher_names_the_key(tiny_pair, tmp_path, plugin_manager):
    cfg = tiny_config(tiny_pair, tmp_path, base_model=tiny_pair["teacher"], tokenizer_config=tiny_pair["teacher"])
    with pytest.raises(ValueError, match="focus_teacher_model"):
        load(cfg, tmp_path)


def test_ce_only_needs_no_teacher(tiny_pair, tmp_path, plugin_manager):
    cfg = tiny_config(tiny_pair, tmp_path, base_model=tiny_pair["teacher"], tokenizer_config=tiny_pair["teacher"],
                      focus_distill="none")
    assert load(cfg, tmp_path).focus_distill == "none"


@pytest.mark.parametrize("overrides,match", [
    ({"focus_distill": "jsd"}, "focus_distill"),
    ({"focus_alpha": -1}, "focus_alpha"),
    ({"focus_temperature": 0}, "focus_temperature"),
    ({"liger_fused_linear_cross_entropy": True}, "liger_fused_linear_cross_entropy"),
])
def test_bad_values_are_rejected_with_the_key(tiny_pair, tmp_path, plugin_manager, overrides, match):
    with pytest.raises(Exception, match=match):
        load(tiny_config(tiny_pair, tmp_path, **overrides), tmp_path)


def test_preference_training_keeps_axolotl_trainer(plugin_manager):
    from axolotl.utils.dict import DictDefault

    from axolotl_focus.plugin import FocusPlugin

    assert FocusPlugin().get_trainer_cls(DictDefault({"rl": "dpo"})) is None


def test_cli_validate(tiny_pair, tmp_path, plugin_manager, capsys):
    from axolotl_focus.cli import main

    path = tmp_path / "ok.yml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_pair, tmp_path)))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert ": valid - dry check" in out and "CE x1.0 + FOCUS x0.05 (tau 2.0, beta 15.0, gamma 1.0)" in out
    assert f"teacher      {tiny_pair['teacher']} (focus_source_model recorded by" in out


def test_pre_model_load_checks_vocab_before_weights(tiny_pair, tmp_path):
    """A teacher with another tokenizer is refused in pre_model_load, before any model loads."""
    from axolotl.utils.dict import DictDefault
    from transformers import AutoTokenizer

    from axolotl_focus.plugin import FocusPlugin

    other = tmp_path / "other-teacher"
    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    tok.add_tokens(["<extra_token_a>", "<extra_token_b>"])
    tok.save_pretrained(other)
    (other / "config.json").write_text(open(os.path.join(tiny_pair["teacher"], "config.json")).read())
    cfg = DictDefault(base_model=tiny_pair["student"], focus_distill="focus", focus_teacher_model=str(other))
    with pytest.raises(ValueError, match="tokenizer length: student 1024, teacher 1026"):
        FocusPlugin().pre_model_load(cfg)
    FocusPlugin().pre_model_load(DictDefault(base_model=tiny_pair["student"], focus_distill="focus",
                                             focus_teacher_model=tiny_pair["teacher"]))


def test_source_model_of_local_and_hub_checkpoints(tmp_path, monkeypatch):
    """The recorded teacher is found in a local folder and, through the hub cache, for a hub id;
    an unreachable hub id gives None (validation then names focus_teacher_model)."""
    import json

    import huggingface_hub

    from axolotl_focus.config import source_model_of

    (tmp_path / "config.json").write_text(json.dumps({"focus_source_model": "meta-llama/Llama-3.1-8B"}))
    assert source_model_of(str(tmp_path)) == "meta-llama/Llama-3.1-8B"
    fetched = []

    def fake_download(repo_id, filename):
        fetched.append((repo_id, filename))
        if repo_id == "org/pruned":
            return str(tmp_path / "config.json")
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert source_model_of("org/pruned") == "meta-llama/Llama-3.1-8B"
    assert source_model_of("org/unreachable") is None
    assert fetched == [("org/pruned", "config.json"), ("org/unreachable", "config.json")]
    assert source_model_of(str(tmp_path / "missing" / "dir")) is None and len(fetched) == 2
