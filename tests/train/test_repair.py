"""RePAIR: the pair dataset type and collator, and the trainer's combined loss on a mixed SFT + pair
batch against a dense reference (the loss formulas: tests/train/losses/test_margin.py)."""

import json
import logging
import os

import pytest
import torch
from focus_step import pair_rows


@pytest.fixture
def tokenizer(tiny_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_pair["student"])


def test_strategy_and_collator_mix_sft_and_pairs(tokenizer):
    from axolotl.utils.dict import DictDefault

    from axolotl_focus.train.pair_dataset import RepairCollator, load

    strategy = load(tokenizer, DictDefault(sequence_len=64), {"path": "in-memory"})
    encoded = [strategy.tokenize_prompt(r) for r in pair_rows()]
    row0 = pair_rows()[0]
    p = tokenizer(row0["prompt"])["input_ids"]
    c = tokenizer(row0["chosen"], add_special_tokens=False)["input_ids"]
    r = tokenizer(row0["rejected"], add_special_tokens=False)["input_ids"]
    assert encoded[0]["input_ids"] == p + c + r
    assert encoded[0]["attention_mask"] == [1] * len(p) + [2] * len(c) + [3] * len(r)

    sft = {"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4, "labels": [-100, 6, 7, 8]}
    batch = RepairCollator(tokenizer, padding=True)([encoded[0], sft, encoded[1]])
    assert batch["input_ids"].shape[0] == 5  # 1 SFT row + 2 rows per pair
    assert batch["repair_chosen"].tolist() == [1, 3] and batch["repair_rejected"].tolist() == [2, 4]
    assert batch["labels"][0].tolist()[:4] == [-100, 6, 7, 8]
    assert (batch["labels"][1:] == -100).all()  # pair rows add nothing to CE / token counts
    assert batch["input_ids"][1, : len(p + c)].tolist() == p + c
    assert batch["input_ids"][2, : len(p + r)].tolist() == p + r
    assert batch["repair_labels"][2, : len(p + r)].tolist() == [-100] * len(p) + r
    assert batch["attention_mask"].max() == 1


def test_long_prompt_and_truncation(tokenizer):
    from axolotl.utils.dict import DictDefault

    from axolotl_focus.repair import load

    strategy = load(tokenizer, DictDefault(sequence_len=12), None)
    with pytest.raises(ValueError, match="leaves no room"):
        strategy.tokenize_prompt({"prompt": "word " * 40, "chosen": "a", "rejected": "b"})
    out = strategy.tokenize_prompt({"prompt": "Hi", "chosen": " one two three four five six seven",
                                    "rejected": " eight nine ten eleven twelve thirteen"})
    assert len(out["input_ids"]) <= 12 and out["attention_mask"].count(2) == out["attention_mask"].count(3)


def test_bad_rows_name_file_and_line(tokenizer, tmp_path):
    from axolotl.utils.dict import DictDefault

    from axolotl_focus.repair import load

    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(pair_rows()[0]), "", json.dumps({"prompt": "x", "chosen": "y"}),
             json.dumps({"prompt": "x", "chosen": "  ", "rejected": "z"})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: RePAIR pair row: missing field 'rejected'"):
        load(tokenizer, DictDefault(sequence_len=64), {"path": str(path)})
    strategy = load(tokenizer, DictDefault(sequence_len=64, focus_repair_skip_bad_rows=True), {"path": str(path)})
    assert strategy.filter_rows({"prompt": "x", "chosen": "y"}) is False
    assert strategy.filter_rows(pair_rows()[0]) is True


def test_long_prompt_is_caught_before_tokenization_with_file_and_line(tokenizer, tmp_path):
    """The pre-check measures the prompt as tokenize_prompt does: tokenized text (with BOS), or
    prompt_tokens when the row has the token-id fields (even if the prompt text is short)."""
    from axolotl.utils.dict import DictDefault

    from axolotl_focus.repair import load

    path = tmp_path / "pairs.jsonl"
    long_text = dict(pair_rows()[1], prompt="word " * 40)
    long_ids = dict(pair_rows()[1], prompt="x", prompt_tokens=list(range(5, 20)), chosen_tokens=[7],
                    rejected_tokens=[8])
    path.write_text("\n".join(json.dumps(r) for r in (pair_rows()[1], long_text)) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: RePAIR pair row: prompt of \d+ tokens leaves no room"):
        load(tokenizer, DictDefault(sequence_len=16), {"path": str(path)})
    path.write_text("\n".join(json.dumps(r) for r in (pair_rows()[1], pair_rows()[1], long_ids)) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:3: RePAIR pair row: prompt of 15 tokens"):
        load(tokenizer, DictDefault(sequence_len=16), {"path": str(path)})
    load(tokenizer, DictDefault(sequence_len=17), {"path": str(path)})  # 15 + 2 continuation tokens fit


def test_skipped_rows_are_counted_in_one_warning_and_filtered(tokenizer, tmp_path, caplog):
    from axolotl.datasets import TokenizedPromptDataset
    from axolotl.utils.dict import DictDefault
    from datasets import Dataset

    from axolotl_focus.repair import load

    rows = [pair_rows()[0], {"prompt": "x", "chosen": "y"}, dict(pair_rows()[1], prompt="word " * 40),
            pair_rows()[1], dict(pair_rows()[1], rejected=" ")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DictDefault(sequence_len=24, focus_repair_skip_bad_rows=True)
    with caplog.at_level(logging.WARNING, logger="axolotl_focus.train.pair_dataset"):
        strategy = load(tokenizer, cfg, {"path": str(path)})
    warnings = [r.getMessage() for r in caplog.records if r.name == "axolotl_focus.train.pair_dataset"]
    assert len(warnings) == 1
    assert f"skipping 3 bad RePAIR rows of {path} (focus_repair_skip_bad_rows)" in warnings[0]
    assert f"{path}:2 (missing field 'rejected')" in warnings[0]
    # the same check drops them in axolotl's dataset wrapper; the kept rows tokenize
    data = Dataset.from_list([{k: r.get(k) for k in ("prompt", "chosen", "rejected")} for r in rows])
    out = TokenizedPromptDataset(strategy, data, process_count=1)
    assert len(out) == 2 and all(max(m) == 3 for m in out["attention_mask"])

    path.write_text(json.dumps(pair_rows()[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: RePAIR pair row: invalid JSON"):
        load(tokenizer, cfg, {"path": str(path)})  # the JSON loader could not read it: never skipped


def test_dataset_inputs_name_path_and_row_index(tokenizer, tmp_path, caplog):
    """Not a single JSON-lines file (here a saved dataset directory): the pre-check names
    path[index]; the tokenize-time fallback names the dataset and the row's source_id."""
    from axolotl.utils.dict import DictDefault
    from datasets import Dataset

    from axolotl_focus.repair import load

    folder = tmp_path / "pairs_ds"
    rows = [dict(pair_rows()[0], source_id="a"), dict(pair_rows()[1], source_id="b"),
            dict(pair_rows()[1], prompt="word " * 40, source_id="c")]
    Dataset.from_list(rows).save_to_disk(str(folder))
    with pytest.raises(ValueError, match=rf"{folder}\[2\]: RePAIR pair row: prompt of \d+ tokens"):
        load(tokenizer, DictDefault(sequence_len=24), {"path": str(folder)})
    with caplog.at_level(logging.WARNING, logger="axolotl_focus.train.pair_dataset"):
        load(tokenizer, DictDefault(sequence_len=24, focus_repair_skip_bad_rows=True), {"path": str(folder)})
    assert any(f"skipping 1 bad RePAIR rows of {folder}" in r.getMessage() for r in caplog.records)

    strategy = load(tokenizer, DictDefault(sequence_len=24), {"path": "org/not-downloaded"})  # no pre-check
    with pytest.raises(ValueError, match=r"org/not-downloaded \(row with source_id 'c'\): RePAIR pair row: prompt"):
        strategy.tokenize_prompt(rows[2])


def test_trainer_loss_on_mixed_batch_matches_dense_reference(tiny_pair, tmp_path, tokenizer):
    """CE + alpha_1 FOCUS over the SFT row + alpha_2 * margin loss over the pairs, values and grads."""
    import focus_step
    from axolotl.utils.dict import DictDefault

    from axolotl_focus.train.pair_dataset import RepairCollator, load

    tiny_dir = os.path.dirname(tiny_pair["student"])
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=3)
    trainer.focus_args.focus_repair_margin = 5.0  # keep both pairs active
    model = trainer.model
    strategy = load(tokenizer, DictDefault(sequence_len=64), None)
    sft = focus_step.rows(tokenizer, 1)[0]
    batch = RepairCollator(tokenizer, padding=True)([strategy.tokenize_prompt(r) for r in pair_rows()] + [sft])

    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    total, n, hinges = focus_step.reference_batch_terms(model, trainer.teacher, batch, margin=5.0)
    want = total / n + 1.0 * hinges.mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    want.backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
