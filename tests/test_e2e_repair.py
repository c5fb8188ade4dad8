"""Mine RePAIR pairs with tiny local models, then train one RePAIR run (mixed with SFT data) and
one DPO run from the same file, both through the real `axolotl train` CLI."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_e2e_axolotl import axolotl_train, logged_dicts  # noqa: E402

BASE = {
    "sequence_len": 128, "micro_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
    "optimizer": "adamw_torch", "bf16": False, "fp16": False, "tf32": False, "logging_steps": 1,
    "save_strategy": "no", "val_set_size": 0, "seed": 0,
}


@pytest.mark.slow
def test_mine_then_repair_and_dpo_from_the_same_file(looping_micro, tmp_path):
    from axolotl_focus.cli import main
    from axolotl_focus.micro import corpus_documents

    pairs = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--student", looping_micro["student_path"], "--prompts", looping_micro["prompts_file"],
                 "--id-field", "id", "--output", str(pairs), "--prefix-tokens", "24", "--max-new-tokens", "80",
                 "--batch-size", "8", "--target-pairs", "8", "--no-progress"]) == 0
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(rows) >= 4 and all(r["prompt"] and r["chosen"] and r["rejected"] for r in rows)

    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_documents("valid")[:64]))
    common = {**BASE, "base_model": looping_micro["student_path"], "plugins": ["axolotl_focus.FocusPlugin"]}

    repair_cfg = {**common, "output_dir": str(tmp_path / "out-repair"), "max_steps": 4,
                  "dataset_prepared_path": str(tmp_path / "prep-repair"),
                  "datasets": [{"path": str(sft), "ds_type": "json", "type": "completion"},
                               {"path": str(pairs), "ds_type": "json", "type": "axolotl_focus.repair"}]}
    logs = logged_dicts(axolotl_train(repair_cfg, tmp_path, "repair"))
    assert len(logs) == 4
    assert all({"loss/ce", "loss/focus"} <= log.keys() for log in logs)
    assert any("loss/repair" in log for log in logs)  # batches holding pairs log the margin term

    dpo_cfg = {**common, "rl": "dpo", "output_dir": str(tmp_path / "out-dpo"), "max_steps": 2,
               "dataset_prepared_path": str(tmp_path / "prep-dpo"),
               "datasets": [{"path": str(pairs), "ds_type": "json", "split": "train"}]}
    output = axolotl_train(dpo_cfg, tmp_path, "dpo")
    assert "DPO reference model = teacher" in output
    assert len(logged_dicts(output)) == 2
