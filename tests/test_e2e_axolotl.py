"""The shipped tiny example through the real `axolotl train` CLI, in a subprocess."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from test_plugin import tiny_config  # noqa: E402


def logged_dicts(text):
    """The dicts the HF Trainer prints at each logging step."""
    out = []
    for match in re.finditer(r"\{'loss': [^{}]*\}", text):
        out.append({k: float(v) for k, v in ast.literal_eval(match.group(0)).items()})
    return out


def axolotl_train(cfg: dict, tmp_path, name: str) -> str:
    """Write ``cfg`` as ``<name>.yml`` and run the real ``axolotl train`` on it in a subprocess
    (telemetry off, offline); returns stdout + stderr after asserting success."""
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run([shutil.which("axolotl", path=env["PATH"]), "train", str(path)], env=env,
                          capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.mark.slow
def test_axolotl_train_logs_terms_and_focus_falls(tiny_pair, tmp_path):
    cfg = tiny_config(tiny_pair, tmp_path, dataset_prepared_path=str(tmp_path / "prepared"))
    output = axolotl_train(cfg, tmp_path, "focus")
    assert "Plugin loaded successfully: axolotl_focus.FocusPlugin" in output
    logs = logged_dicts(output)
    assert len(logs) == cfg["max_steps"]
    for log in logs:
        assert {"loss", "loss/ce", "loss/focus"} <= log.keys()
        # the logged total is CE + alpha_1 * FOCUS (per-token means over the optimizer step)
        assert log["loss"] == pytest.approx(log["loss/ce"] + 0.05 * log["loss/focus"], rel=0.02)
    focus = [log["loss/focus"] for log in logs]
    early, late = sum(focus[:3]) / 3, sum(focus[-10:]) / 10
    assert late < 0.8 * early, focus
    assert os.path.isfile(os.path.join(cfg["output_dir"], "model.safetensors"))


@pytest.mark.slow
def test_axolotl_train_prunes_then_lora_distills(tiny_pair, tmp_path):
    """`focus_prune:` + LoRA: axolotl prunes the unpruned base model, the teacher defaults to it,
    and LoRA (targets by name) trains the pruned_llama student with FOCUS."""
    cfg = tiny_config(
        tiny_pair, tmp_path,
        base_model=tiny_pair["teacher"], tokenizer_config=tiny_pair["teacher"],
        dataset_prepared_path=str(tmp_path / "prepared"), max_steps=6,
        focus_prune={"ratio": 0.5, "attn_layers": [1, 3], "mlp_layers": [1, 3], "calib_samples": 4,
                     "cache_dir": str(tmp_path / "cache")},
        adapter="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True,
        lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False,
    )
    output = axolotl_train(cfg, tmp_path, "prune-lora")
    assert "focus_prune: pruning" in output
    cached = [p for p in (tmp_path / "cache").iterdir()]
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    logs = logged_dicts(output)
    assert len(logs) == 6 and all("loss/focus" in log for log in logs)
    assert os.path.isfile(os.path.join(cfg["output_dir"], "adapter_model.safetensors"))
    adapter_cfg = json.loads(open(os.path.join(cfg["output_dir"], "adapter_config.json")).read())
    assert {"q_proj", "down_proj"} <= set(adapter_cfg["target_modules"])
