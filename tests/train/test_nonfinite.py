"""The non-finite guard of FocusTrainer: training stops at the first inf / nan loss term or gradient
norm, with one line naming the step and the term, before the optimizer updates the weights, and
nothing is saved."""

import os

import focus_step
import pytest
import torch
from transformers import TrainerCallback

from axolotl_focus.train.trainer import NonFiniteTraining


def _params(trainer) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in trainer.model.named_parameters()}


def _unchanged(before: dict, trainer) -> bool:
    return all(torch.equal(before[k], p.detach()) for k, p in trainer.model.named_parameters())


def test_an_infinite_temperature_stops_at_step_one_naming_the_term(tiny_pair, tmp_path, caplog):
    """focus_temperature inf (the schema refuses it; here it reaches the trainer directly): the FOCUS
    term is nan; the step is not taken and nothing is written to output_dir."""
    tiny_dir = os.path.dirname(tiny_pair["student"])
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=4, focus_temperature=float("inf"))
    before = _params(trainer)
    with pytest.raises(NonFiniteTraining, match=r"step 1: loss/focus is nan") as err:
        trainer.train()
    assert "\n" not in str(err.value) and "no model is saved" in str(err.value)
    assert _unchanged(before, trainer)
    out = tmp_path / "trainer_out"
    assert not out.exists() or not any(out.iterdir())
    assert "step 1: loss/focus is nan" in caplog.text


def test_a_nan_gradient_stops_before_the_optimizer_step(tiny_pair, tmp_path):
    """A finite loss whose gradient is nan in the second step: step 1 is taken, step 2 is not."""
    tiny_dir = os.path.dirname(tiny_pair["student"])
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=4, max_steps=3)
    calls = []
    weight = trainer.model.get_input_embeddings().weight
    weight.register_hook(lambda grad: grad * float("nan") if calls.append(1) or len(calls) >= 2 else grad)
    after_one = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            after_one.update(_params(trainer))

    trainer.add_callback(Snapshot())
    with pytest.raises(NonFiniteTraining, match=r"step 2: the gradient norm is nan \(this micro-batch: loss/ce"):
        trainer.train()
    assert trainer.state.global_step == 1 and after_one
    assert _unchanged(after_one, trainer)


def test_a_finite_run_is_untouched(tiny_pair, tmp_path):
    tiny_dir = os.path.dirname(tiny_pair["student"])
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=2, accum=2, max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2

