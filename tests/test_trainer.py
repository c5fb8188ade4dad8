"""FocusTrainer normalization: gradient accumulation and 2-process DDP give the exact global-mean
gradient of the reference loss (one SGD step compared parameter by parameter)."""

import os
import subprocess
import sys

import pytest
import torch

from axolotl_focus.losses import DistillSpec, reference_aux_terms, reference_ce_distill

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
import focus_step  # noqa: E402

LR = 0.5


def expected_params(tiny_dir, distill="focus", alpha=0.05, student=None, aux=None):
    """One SGD step on the dense reference loss averaged over all valid tokens of the 4 rows
    (``aux``: an AuxSpec whose terms replace / add to CE, see reference_aux_terms)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "student"))
    if student is None:
        student = AutoModelForCausalLM.from_pretrained(os.path.join(tiny_dir, "student"), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(tiny_dir, "teacher"), dtype=torch.float32)
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True)(focus_step.rows(tokenizer))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    zs = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        zt = teacher(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    ce, d = reference_ce_distill(zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1]),
                                 labels.reshape(-1), DistillSpec(mode=distill))
    if aux is not None:
        rows = torch.arange(labels.shape[0]).repeat_interleave(labels.shape[1])
        terms = reference_aux_terms(zs.reshape(-1, zs.shape[-1]), labels.reshape(-1), rows, aux)
        ce = terms.get("scalegrad", terms.get("tailr", ce)) + (aux.unlikelihood or 0.0) * terms.get("ul", 0.0)
    n_tokens = (labels != -100).sum()
    loss = (ce + alpha * d) / n_tokens
    loss.backward()
    params = {k: (p - LR * p.grad).detach() for k, p in student.named_parameters() if p.requires_grad}
    return params, loss.item()


def assert_params_equal(got, want, atol=2e-6):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("per_device,accum", [(4, 1), (2, 2), (1, 4)])
def test_gradient_accumulation_is_exact(tiny_pair, tmp_path, per_device, accum):
    tiny_dir = os.path.dirname(tiny_pair["student"])
    want, want_loss = expected_params(tiny_dir)
    out = tmp_path / "step.pt"
    focus_step.run(tiny_dir, str(out), per_device, accum, lr=LR)
    result = torch.load(out)
    assert_params_equal(result["params"], want)
    log = result["logs"][0]
    assert log["loss"] == pytest.approx(want_loss, rel=1e-3)
    assert {"loss/ce", "loss/focus"} <= log.keys()
    assert log["loss/ce"] + 0.05 * log["loss/focus"] == pytest.approx(want_loss, rel=1e-3) or accum > 1


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tiny_pair, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): per-device 2 gives the same step as 1 process x 4 rows."""
    tiny_dir = os.path.dirname(tiny_pair["student"])
    want, want_loss = expected_params(tiny_dir)
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           os.path.join(HERE, "focus_step.py"), tiny_dir, str(out), "--per-device", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = torch.load(out)
    assert_params_equal(result["params"], want)
    assert result["logs"][0]["loss"] == pytest.approx(want_loss, rel=1e-3)


@pytest.mark.parametrize("distill", ["kd", "none"])
def test_kd_and_ce_only_steps(tiny_pair, tmp_path, distill):
    tiny_dir = os.path.dirname(tiny_pair["student"])
    want, want_loss = expected_params(tiny_dir, distill=distill)
    out = tmp_path / "step.pt"
    focus_step.run(tiny_dir, str(out), 2, 2, distill=distill, lr=LR)
    result = torch.load(out)
    assert_params_equal(result["params"], want)
    assert ("loss/kd" in result["logs"][0]) == (distill == "kd")
    assert "loss/focus" not in result["logs"][0]


def test_evaluate_reports_reference_loss_and_terms(tiny_pair, tmp_path):
    tiny_dir = os.path.dirname(tiny_pair["student"])
    _, want_loss = expected_params(tiny_dir)
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=4)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(want_loss, rel=1e-5)
    assert metrics["eval_loss/ce"] > 0 and metrics["eval_loss/focus"] > 0


def test_lora_student_step_matches_reference(tiny_pair, tmp_path):
    """PEFT-wrapped student: only adapters train, lm_head stays frozen, the step is exact."""
    import copy

    tiny_dir = os.path.dirname(tiny_pair["student"])
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=2, accum=2, lora=True)
    reference_student = copy.deepcopy(trainer.model)
    want, _ = expected_params(tiny_dir, student=reference_student)
    assert all("lora_" in k for k in want)
    trainer.train()
    got = {k: p.detach() for k, p in trainer.model.named_parameters() if p.requires_grad}
    assert_params_equal(got, want)
    assert trainer.teacher.get_output_embeddings().weight.grad is None
