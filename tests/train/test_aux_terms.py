"""The paper's baselines as extra loss terms in the trainer: DITTO's pseudo-repetition rows, the
config of the terms and their trainer steps (the loss formulas: tests/train/losses/)."""

import math
import os

import focus_step  # tests/ is on sys.path (tests/conftest.py)
import pytest
import torch

from axolotl_focus.train.ditto import is_ditto_step, prefix_and_unit, pseudo_rows, sentence_end_ids
from axolotl_focus.train.losses import (
    AuxSpec,
    DistillSpec,
    reference_aux_terms,
    reference_ce_distill,
    reference_ditto,
)

# -- DITTO -------------------------------------------------------------------------------------

ENDS = frozenset({7, 9, 11})  # token ids whose text ends with '.'
STOPS = {2, 0}  # eos, pad


def test_ditto_instruction_row():
    ids = [1, 10, 11, 12, 20, 21, 22, 2]
    labels = [-100, -100, -100, -100, 20, 21, 22, 2]
    assert prefix_and_unit(ids, labels, ENDS, STOPS, 16) == ([1, 10, 11, 12], [20, 21, 22])
    batch = {"input_ids": torch.tensor([ids + [0, 0]]), "labels": torch.tensor([labels + [-100, -100]]),
             "attention_mask": torch.tensor([[1] * 8 + [0, 0]])}
    rows = pseudo_rows(batch, ENDS, 16, 0, STOPS)
    assert rows["input_ids"][0].tolist() == [1, 10, 11, 12] + [20, 21, 22] * 4
    assert rows["labels"][0].tolist() == [-100] * 4 + [20, 21, 22] * 4
    assert rows["unit_len"].tolist() == [3] and rows["prefix_len"] == [4] and rows["lengths"] == [16]
    # a long output is cut so that two copies fit: (16 - 4) // 2 = 6 tokens
    long_ids = [1, 10, 11, 12] + list(range(30, 40)) + [2]
    assert prefix_and_unit(long_ids, [-100] * 4 + long_ids[4:], ENDS, STOPS, 16)[1] == list(range(30, 36))


def test_ditto_plain_text_rows_and_fallbacks():
    ids = [1, 5, 6, 7, 8, 9, 10, 11, 2]
    assert prefix_and_unit(ids, ids, ENDS, STOPS, 20) == ([1, 5, 6, 7], [8, 9])
    # one sentence end then a tail: the unit is the tail
    assert prefix_and_unit([1, 5, 7, 8, 10, 2], [1, 5, 7, 8, 10, 2], ENDS, STOPS, 20) == ([1, 5, 7], [8, 10])
    # no sentence end, or nothing after the only one: prefix = first token, unit = the rest
    assert prefix_and_unit([1, 5, 6, 8], [1, 5, 6, 8], ENDS, STOPS, 20) == ([1], [5, 6, 8])
    assert prefix_and_unit([1, 5, 6, 7, 2], [-100, 5, 6, 7, 2], ENDS, STOPS, 20) == ([1], [5, 6, 7])
    # no room for two copies of anything / nothing labelled
    assert prefix_and_unit([1, 5, 6, 7, 8], [1, 5, 6, 7, 8], ENDS, STOPS, 5) is None
    assert prefix_and_unit([1, 5], [-100, -100], ENDS, STOPS, 20) is None


def test_pseudo_rows_skip_unlabelled_and_split_packed_rows():
    # row 0: a RePAIR-style row without labels; row 1: two packed plain-text sequences
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 0, 0], [1, 5, 7, 8, 9, 1, 6, 7]])
    labels = torch.tensor([[-100] * 8, [1, 5, 7, 8, 9, 1, 6, 7]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 0], [0, 1, 2, 3, 4, 0, 1, 2]])
    rows = pseudo_rows({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                        "position_ids": positions}, ENDS, 9, 0, STOPS)
    assert rows["prefix_len"] == [3, 1] and rows["unit_len"].tolist() == [2, 2]
    assert rows["input_ids"][0].tolist() == [1, 5, 7, 8, 9, 8, 9, 8, 9]
    assert rows["input_ids"][1].tolist() == [1, 6, 7, 6, 7, 6, 7, 6, 7]


def test_sentence_end_ids_from_a_tokenizer():
    from axolotl_focus.micro import build_tokenizer

    tokenizer = build_tokenizer(["It was late. He left. The end ."] * 20, vocab_size=300)
    ends = sentence_end_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids(".") in ends
    assert all(tokenizer.decode([i]).rstrip().endswith(".") for i in ends)
    assert tokenizer.convert_tokens_to_ids("It") not in ends


def test_ditto_step_decision_is_per_step_and_seeded():
    draws = [is_ditto_step(0, step, 0.5) for step in range(40)]
    assert draws == [is_ditto_step(0, step, 0.5) for step in range(40)]  # reproducible (all ranks agree)
    assert 10 < sum(draws) < 30
    assert all(is_ditto_step(3, s, 1.0) for s in range(10)) and not any(is_ditto_step(3, s, 0.0) for s in range(10))


# -- config ------------------------------------------------------------------------------------


def _validate(value):
    from axolotl_focus.config import FocusArgs

    return FocusArgs.model_validate({"focus_distill": "none", "focus_aux_losses": value}).focus_aux_losses


def test_config_defaults_list_and_mapping():
    cfg = _validate(["unlikelihood", "ditto"])
    assert cfg.unlikelihood.alpha == 0.5 and cfg.ditto.lambda_ == 0.5 and cfg.ditto.probability == 0.5
    cfg = _validate({"scalegrad": True, "tailr": False, "unlikelihood": None, "ditto": {"lambda": 0.3}})
    assert cfg.scalegrad.gamma == 0.5 and cfg.tailr is None and cfg.unlikelihood is None and cfg.ditto.lambda_ == 0.3
    assert cfg.aux_spec() == AuxSpec(scalegrad=0.5)
    assert _validate({"tailr": {}}).aux_spec() == AuxSpec(tailr=(0.1, 0.2))
    assert _validate({"ditto": {}}).aux_spec() is None  # DITTO is not part of the fused pass
    # the dumped dict (as axolotl passes it on) validates again
    from axolotl_focus.config import FocusAuxLosses

    assert FocusAuxLosses.model_validate(cfg.model_dump()) == cfg


@pytest.mark.parametrize("value,match", [
    ({"unlikelihod": {}}, r"focus_aux_losses\.unlikelihod"),
    ({"unlikelihood": {"beta": 1}}, r"focus_aux_losses\.unlikelihood\.beta"),
    ({"unlikelihood": {"alpha": -1}}, r"focus_aux_losses\.unlikelihood\.alpha"),
    ({"scalegrad": {"gamma": 0}}, r"focus_aux_losses\.scalegrad\.gamma"),
    ({"tailr": {"min_weight": 2}}, r"focus_aux_losses\.tailr\.min_weight"),
    ({"ditto": {"probability": 1.5}}, r"focus_aux_losses\.ditto\.probability"),
    ({"scalegrad": {}, "tailr": {}}, "scalegrad and tailr both replace"),
    (["ul"], r"unknown term\(s\) \['ul'\]"),
])
def test_config_errors_name_the_key(value, match):
    with pytest.raises(ValueError, match=match):
        _validate(value)


def test_config_through_axolotl_and_plugin(tiny_pair, tmp_path, plugin_manager):
    from test_plugin import load, tiny_config

    cfg = load(tiny_config(tiny_pair, tmp_path, focus_aux_losses={"unlikelihood": {"alpha": 0.25},
                                                                  "ditto": {"lambda": 0.4}}), tmp_path)
    args = plugin_manager.plugins["axolotl_focus.FocusPlugin"].get_training_args(cfg)
    assert type(args["focus_aux_losses"]) is dict
    assert args["focus_aux_losses"]["unlikelihood"] == {"alpha": 0.25}
    assert args["focus_sequence_len"] == cfg.sequence_len == 128
    with pytest.raises(Exception, match="focus_aux_losses"):
        load(tiny_config(tiny_pair, tmp_path, focus_aux_losses={"scalegrad": {}, "tailr": {}}), tmp_path)
    with pytest.raises(Exception, match="focus_aux_losses"):
        load(tiny_config(tiny_pair, tmp_path, focus_aux_losses={"bogus": {}}), tmp_path)


# -- trainer -----------------------------------------------------------------------------------


def _tiny_dir(tiny_pair):
    return os.path.dirname(tiny_pair["student"])


@pytest.mark.parametrize("aux,distill", [
    ({"unlikelihood": {"alpha": 0.5}}, "focus"),
    ({"scalegrad": {"gamma": 0.5}}, "kd"),
    ({"tailr": {}}, "focus"),
    ({"unlikelihood": {}, "tailr": {}}, "kd"),
])
def test_trainer_step_logs_the_terms(tiny_pair, tmp_path, aux, distill):
    trainer = focus_step.make_trainer(_tiny_dir(tiny_pair), str(tmp_path), per_device=2, accum=2, distill=distill,
                                      focus_aux_losses=aux)
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    names = {"unlikelihood": "ul", "scalegrad": "scalegrad", "tailr": "tailr"}
    assert {"loss/ce", f"loss/{distill}"} | {f"loss/{names[k]}" for k in aux} <= log.keys()
    assert all(math.isfinite(v) for k, v in log.items() if k.startswith("loss"))
    metrics = trainer.evaluate()
    assert {f"eval_loss/{names[k]}" for k in aux} <= metrics.keys()


def test_trainer_step_is_exact_under_accumulation(tiny_pair, tmp_path):
    """UL + ScaleGrad + FOCUS, 2 x 2 micro-batches: one SGD step equals the dense global-mean step."""
    from focus_step import LR, assert_params_equal, expected_params

    tiny_dir = _tiny_dir(tiny_pair)
    want, want_loss = expected_params(tiny_dir, aux=AuxSpec(unlikelihood=0.5, scalegrad=0.5))
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=2, accum=2, lr=LR,
                                      focus_aux_losses={"unlikelihood": {"alpha": 0.5}, "scalegrad": {"gamma": 0.5}})
    trainer.train()
    assert_params_equal({k: p.detach() for k, p in trainer.model.named_parameters()}, want)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(want_loss, rel=1e-3)


def test_ditto_step_value_and_alternation(tiny_pair, tmp_path):
    tiny_dir = _tiny_dir(tiny_pair)
    # forced DITTO step: the logged loss is the DITTO mean over the pseudo rows of the 4 rows
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path / "a"), per_device=4, distill="none",
                                      focus_aux_losses={"ditto": {"probability": 1.0}}, focus_sequence_len=48)
    from transformers import DataCollatorForSeq2Seq

    batch = DataCollatorForSeq2Seq(trainer.processing_class, padding=True)(focus_step.rows(trainer.processing_class))
    rows = trainer._pseudo_rows(batch)
    assert rows["prefix_len"] == [2, 3, 4, 5] and all(n == 48 for n in rows["lengths"])  # instruction rows
    with torch.no_grad():
        logits = trainer.model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    want, count = reference_ditto(logits, rows["input_ids"], rows["lengths"], rows["prefix_len"],
                                  rows["unit_len"].tolist(), 0.5)
    trainer.train()
    log = trainer.state.log_history[0]
    assert set(k for k in log if k.startswith("loss/")) == {"loss/ditto"}
    assert log["loss"] == pytest.approx(want.item() / count, rel=1e-4)
    assert log["loss/ditto"] == pytest.approx(want.item() / count, abs=1e-5)  # logged with 5 digits

    # probability 0.5 over 6 steps (seed 0): both kinds happen, each step logs its own terms
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path / "b"), per_device=2, accum=2, distill="kd",
                                      lr=0.01, max_steps=6, focus_aux_losses={"ditto": {}, "unlikelihood": {}},
                                      focus_sequence_len=48)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    kinds = [is_ditto_step(0, step, 0.5) for step in range(6)]
    assert len(logs) == 6 and any(kinds) and not all(kinds)
    for log, ditto in zip(logs, kinds):
        assert ("loss/ditto" in log) == ditto
        assert ("loss/ce" in log and "loss/ul" in log and "loss/kd" in log) == (not ditto)


def test_aux_terms_with_repair_pairs(tiny_pair, tmp_path):
    """UL + TaiLr + FOCUS on a mixed SFT + RePAIR batch equals the dense reference (pair rows add
    nothing to the token terms); a DITTO step builds pseudo rows from the SFT row only."""
    import torch.nn.functional as F
    from axolotl.utils.dict import DictDefault
    from focus_step import pair_rows

    from axolotl_focus.config import DittoArgs
    from axolotl_focus.train.pair_dataset import RepairCollator, load

    aux = {"unlikelihood": {"alpha": 0.5}, "tailr": {"gamma": 0.2, "min_weight": 0.3}}
    trainer = focus_step.make_trainer(_tiny_dir(tiny_pair), str(tmp_path), per_device=3, focus_aux_losses=aux)
    trainer.focus_args.focus_repair_margin = 5.0  # keep both pairs active
    tokenizer, model = trainer.processing_class, trainer.model.train()
    strategy = load(tokenizer, DictDefault(sequence_len=64), None)
    sft = focus_step.rows(tokenizer, 1)[0]
    batch = RepairCollator(tokenizer, padding=True)([strategy.tokenize_prompt(r) for r in pair_rows()] + [sft])
    loss = trainer.compute_loss(model, dict(batch))

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        t_logits = trainer.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = batch["labels"][:, 1:].reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    _, focus = reference_ce_distill(flat, t_logits.reshape(flat.shape), labels, DistillSpec())
    terms = reference_aux_terms(flat, labels, torch.arange(ids.shape[0]).repeat_interleave(logits.shape[1]),
                                AuxSpec(unlikelihood=0.5, tailr=(0.2, 0.3)))
    rl = batch["repair_labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), rl.clamp(min=0), reduction="none") * (rl != -100)
    mean = nll.sum(1) / (rl != -100).sum(1).clamp(min=1)
    hinge = (5.0 + mean[batch["repair_chosen"]] - mean[batch["repair_rejected"]]).clamp(min=0).mean()
    want = (terms["tailr"] + 0.5 * terms["ul"] + 0.05 * focus) / (labels != -100).sum() + hinge
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)

    trainer.ditto = DittoArgs(probability=1.0)
    rows = trainer._pseudo_rows(dict(batch))
    assert rows["input_ids"].shape[0] == 1 and rows["prefix_len"] == [2]
    ditto = trainer.compute_loss(model, dict(batch))
    assert torch.isfinite(ditto) and ditto.item() != pytest.approx(loss.item())


@pytest.mark.slow
def test_axolotl_train_with_aux_losses(tiny_pair, tmp_path):
    """The real `axolotl train` CLI with unlikelihood + ScaleGrad + DITTO: every step logs its terms."""
    from test_e2e_axolotl import axolotl_train, logged_dicts
    from test_plugin import tiny_config

    cfg = tiny_config(tiny_pair, tmp_path, dataset_prepared_path=str(tmp_path / "prepared"), max_steps=4,
                      focus_aux_losses={"unlikelihood": {"alpha": 0.5}, "scalegrad": {"gamma": 0.5},
                                        "ditto": {"probability": 0.5}})
    logs = logged_dicts(axolotl_train(cfg, tmp_path, "aux"))
    kinds = [is_ditto_step(cfg["seed"], step, 0.5) for step in range(4)]
    assert len(logs) == 4 and any(kinds) and not all(kinds), (kinds, logs)
    for log, ditto in zip(logs, kinds):
        want = {"loss/ditto"} if ditto else {"loss/ce", "loss/focus", "loss/ul", "loss/scalegrad"}
        assert want <= log.keys() and all(math.isfinite(log[k]) for k in want), log

