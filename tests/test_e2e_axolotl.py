"""The shipped tiny example through the real `axolotl train` CLI, in a subprocess."""

import ast
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


@pytest.mark.slow
def test_axolotl_train_logs_terms_and_focus_falls(tiny_pair, tmp_path):
    cfg = tiny_config(tiny_pair, tmp_path, dataset_prepared_path=str(tmp_path / "prepared"))
    path = tmp_path / "focus.yml"
    path.write_text(yaml.safe_dump(cfg))
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", PATH=bindir + os.pathsep + os.environ["PATH"])
    axolotl = shutil.which("axolotl", path=env["PATH"])
    proc = subprocess.run([axolotl, "train", str(path)], env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
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
