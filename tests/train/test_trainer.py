"""FocusTrainer normalization: gradient accumulation and 2-process DDP give the exact global-mean
gradient of the reference loss (one SGD step compared parameter by parameter).

The teacher is the in-process model (``model``) or a teacher-logit cache of the 4 rows built from
the same teacher (``cache-V``: k = V, the full distribution, compared with the in-process
teacher's dense reference to float tolerance; ``cache-8``: top-8 + tail bucket, compared with the
dense sparse-teacher reference of the same cached rows, as exactly as the in-process teacher)."""

import contextlib
import os
import subprocess
import sys

import focus_step
import pytest
import torch
from focus_step import LR, assert_params_equal, expected_params

TEACHERS = ["model", "cache-V", "cache-8"]


def cache_inputs(tiny_pair):
    """``(teacher, rows, build_cache options)`` of the caches built here: the tiny teacher (fp32,
    eval), focus_step's 4 rows as (input_ids, labels), its name and the student's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_dir = os.path.dirname(tiny_pair["student"])
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "student"))
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(tiny_dir, "teacher"), dtype=torch.float32).eval()
    rows = [(r["input_ids"], r["labels"]) for r in focus_step.rows(tokenizer)]
    options = {"progress": False, "teacher_name": os.path.join(tiny_dir, "teacher"), "tokenizer": tokenizer}
    return teacher, rows, options


@pytest.fixture(scope="module")
def teacher_caches(tiny_pair, tmp_path_factory):
    """Teacher-logit caches of focus_step's 4 rows from the tiny teacher (fp32): k = V and k = 8."""
    from axolotl_focus.train.teacher_cache.build import build_cache

    teacher, rows, options = cache_inputs(tiny_pair)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    root = tmp_path_factory.mktemp("teacher-caches")
    caches = {}
    for name, k in (("cache-V", vocab), ("cache-8", 8)):
        build_cache(teacher, rows, root / name, k=k, temperature=2.0, batch_size=1, **options)
        caches[name] = str(root / name)
    return caches


def teacher_setup(kind, caches):
    """``(make_trainer keyword arguments, expected_params keyword arguments)`` of a TEACHERS kind."""
    if kind == "model":
        return {}, {}
    from axolotl_focus.train.teacher_cache.reader import TeacherCache

    # k = V is the full distribution: the in-process teacher's dense reference; k < V: the bucketed
    # reference on the very rows the trainer reads from the cache
    want = {} if kind == "cache-V" else {"cache": TeacherCache.open(caches[kind])}
    return {"focus_teacher_cache": caches[kind]}, want


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("per_device,accum", [(4, 1), (2, 2), (1, 4)])
def test_gradient_accumulation_is_exact(tiny_pair, teacher_caches, tmp_path, per_device, accum, teacher):
    tiny_dir = os.path.dirname(tiny_pair["student"])
    run_kwargs, want_kwargs = teacher_setup(teacher, teacher_caches)
    want, want_loss = expected_params(tiny_dir, **want_kwargs)
    out = tmp_path / "step.pt"
    focus_step.run(tiny_dir, str(out), per_device, accum, lr=LR, teacher_cache=run_kwargs.get("focus_teacher_cache"))
    result = torch.load(out)
    assert_params_equal(result["params"], want)
    if teacher == "cache-8":  # the bucketed top-8 objective is not the full teacher's: the test is not vacuous
        dense, _ = expected_params(tiny_dir)
        assert any(not torch.allclose(result["params"][k], dense[k], rtol=1e-5, atol=2e-5) for k in dense)
    log = result["logs"][0]
    assert log["loss"] == pytest.approx(want_loss, rel=1e-3)
    assert {"loss/ce", "loss/focus"} <= log.keys()
    assert log["loss/ce"] + 0.05 * log["loss/focus"] == pytest.approx(want_loss, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", TEACHERS)
def test_two_process_ddp_matches_single_process(tiny_pair, teacher_caches, tmp_path, teacher):
    """torchrun --nproc_per_node 2 (gloo): per-device 2 gives the same step as 1 process x 4 rows."""
    tiny_dir = os.path.dirname(tiny_pair["student"])
    run_kwargs, want_kwargs = teacher_setup(teacher, teacher_caches)
    want, want_loss = expected_params(tiny_dir, **want_kwargs)
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    port = str(29517 + TEACHERS.index(teacher))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           focus_step.__file__, tiny_dir, str(out), "--per-device", "2"]
    if run_kwargs:
        cmd += ["--teacher-cache", run_kwargs["focus_teacher_cache"]]
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


def test_repair_mean_over_the_step_not_diluted_by_pairless_micro_batches(tiny_pair, tmp_path):
    """Two micro-batches of one optimizer step, pairs only in the first: the accumulated gradient is
    that of (CE + alpha_1 FOCUS) / all tokens + alpha_2 * mean hinge over all pairs of the step."""
    from axolotl.utils.dict import DictDefault
    from transformers import AutoTokenizer

    from axolotl_focus.train.pair_dataset import RepairCollator, load

    tiny_dir = os.path.dirname(tiny_pair["student"])
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "student"))
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=3, accum=2, focus_repair_margin=5.0)
    model = trainer.model.train()
    strategy = load(tokenizer, DictDefault(sequence_len=64), None)
    pairs = [{"prompt": "The river", "chosen": " flows to the sea", "rejected": " the river the river"},
             {"prompt": "In 1990 the", "chosen": " band released an album", "rejected": " the the the the"}]
    sft = focus_step.rows(tokenizer, 2)
    collate = RepairCollator(tokenizer, padding=True)
    batches = [collate([strategy.tokenize_prompt(p) for p in pairs] + [sft[0]]), collate([sft[1]])]
    samples, num_items = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    assert trainer._pairs_in_step == 2
    for batch in samples:
        trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items).backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    ce_total, hinges, n_tokens = 0.0, [], 0
    for batch in batches:
        total, n, pair_hinges = focus_step.reference_batch_terms(model, trainer.teacher, batch, margin=5.0)
        ce_total, n_tokens = ce_total + total, n_tokens + n
        hinges.append(pair_hinges)
    assert int(num_items) == n_tokens
    want = ce_total / n_tokens + torch.cat(hinges).mean()
    want.backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_logged_terms_are_exact_means_under_accumulation(tiny_pair, tmp_path):
    """loss/ce and loss/focus are per-token means over the whole step (not means of the
    micro-batch means), so loss = loss/ce + alpha_1 * loss/focus holds with accumulation too."""
    tiny_dir = os.path.dirname(tiny_pair["student"])
    _, want_loss = expected_params(tiny_dir)
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=1, accum=4)
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][0]
    assert log["loss"] == pytest.approx(want_loss, rel=1e-3)
    assert log["loss/ce"] + 0.05 * log["loss/focus"] == pytest.approx(want_loss, rel=1e-4)


def test_saved_model_records_its_objective(tiny_pair, tmp_path):
    """save_model writes focus_training.json (every focus_* setting) next to the weights."""
    import json

    tiny_dir = os.path.dirname(tiny_pair["student"])
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=4, focus_beta=7.0, focus_gamma=0.5)
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    record = json.loads((out / "focus_training.json").read_text())
    assert (out / "model.safetensors").is_file()
    assert record["focus_distill"] == "focus" and record["focus_alpha"] == 0.05
    assert record["focus_beta"] == 7.0 and record["focus_gamma"] == 0.5


def test_zero3_teacher_runs_on_ranks_without_tokens(tiny_pair, tmp_path, monkeypatch):
    """Under ZeRO-3 (a partitioned teacher head: ``ds_id``) a micro-batch without SFT tokens
    still runs the teacher forward and enters the parameter gather, or the other ranks would wait
    forever in the teacher's collectives; with a plain teacher it skips both."""
    import axolotl_focus.train.trainer as trainer_mod

    tiny_dir = os.path.dirname(tiny_pair["student"])
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=2)
    batch = trainer.data_collator(focus_step.rows(trainer.processing_class, 2))
    batch["labels"][:] = -100  # no SFT token on this rank
    calls, gathers = [], []
    real_hidden = trainer._teacher_hidden
    monkeypatch.setattr(trainer, "_teacher_hidden", lambda inputs, rows: calls.append(int(rows.sum())) or
                        real_hidden(inputs, rows))
    monkeypatch.setattr(trainer_mod, "gathered", lambda *params: gathers.append(params) or contextlib.nullcontext())
    trainer.compute_loss(trainer.model, dict(batch))
    assert calls == [] and gathers[-1][1] is None
    head = trainer.teacher.get_output_embeddings().weight
    head.ds_id = 0
    try:
        loss = trainer.compute_loss(trainer.model, dict(batch))
    finally:
        del head.ds_id
    assert calls == [1] and gathers[-1][1] is head and float(loss.detach()) == 0.0


@pytest.mark.parametrize("teacher", ["cache-V", "cache-8"])
def test_kd_step_from_the_cache(tiny_pair, teacher_caches, tmp_path, teacher):
    tiny_dir = os.path.dirname(tiny_pair["student"])
    run_kwargs, want_kwargs = teacher_setup(teacher, teacher_caches)
    want, _ = expected_params(tiny_dir, distill="kd", **want_kwargs)
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), 2, 2, distill="kd", **run_kwargs)
    trainer.train()
    assert_params_equal({k: p.detach() for k, p in trainer.model.named_parameters()}, want)
    assert "loss/kd" in trainer.state.log_history[0] and "loss/focus" not in trainer.state.log_history[0]


def test_training_from_the_cache_loads_no_teacher(tiny_pair, teacher_caches, tmp_path, monkeypatch):
    """With focus_teacher_cache the teacher is never loaded (not even with focus_teacher_model set):
    load_teacher raises, and from_pretrained sees the student only."""
    import transformers

    import axolotl_focus.train.teacher as teacher_mod
    import axolotl_focus.train.trainer as trainer_mod

    tiny_dir = os.path.dirname(tiny_pair["student"])
    teacher_dir = os.path.join(tiny_dir, "teacher")

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(trainer_mod, "load_teacher", refuse)
    monkeypatch.setattr(teacher_mod, "load_teacher", refuse)
    real, loaded = transformers.AutoModelForCausalLM.from_pretrained, []

    def tracked(path, *args, **kwargs):
        loaded.append(str(path))
        if os.path.realpath(str(path)) == os.path.realpath(teacher_dir):
            refuse()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tracked)
    said = []
    monkeypatch.setattr(trainer_mod.LOG, "info", lambda msg, *args: said.append(msg % args))
    trainer = focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=2, accum=2, focus_teacher_model=teacher_dir,
                                      focus_teacher_cache=teacher_caches["cache-8"])
    trainer.train()
    assert trainer.teacher is None and loaded == [os.path.join(tiny_dir, "student")]
    assert f"axolotl_focus: teacher cache {teacher_caches['cache-8']} (k=8, teacher {teacher_dir}): no teacher model " \
           "loaded" in said
    log = trainer.state.log_history[0]
    assert {"loss/ce", "loss/focus"} <= log.keys()
    assert log["loss/ce"] + 0.05 * log["loss/focus"] == pytest.approx(log["loss"], rel=1e-4)


def test_cache_must_fit_the_run_and_hold_every_row(tiny_pair, unfit_caches, tmp_path):
    """The trainer refuses, before step one, a cache missing a training row (here one of the 4)
    or built at another temperature."""
    tiny_dir = os.path.dirname(tiny_pair["student"])
    partial, cold = unfit_caches
    with pytest.raises(ValueError, match=r"train dataset: teacher cache .*: 1 of 4 training sequences do not match "
                                         r"it \(1 missing"):
        focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=2, focus_teacher_cache=partial)
    with pytest.raises(ValueError, match=r"built with temperature 1.0 \(focus_temperature is 2.0\)"):
        focus_step.make_trainer(tiny_dir, str(tmp_path), per_device=2, focus_teacher_cache=cold)


@pytest.fixture(scope="module")
def unfit_caches(tiny_pair, tmp_path_factory):
    """Two caches that do not fit focus_step's run: one of its first 3 rows only, one at tau 1."""
    from axolotl_focus.train.teacher_cache.build import build_cache

    teacher, rows, options = cache_inputs(tiny_pair)
    root = tmp_path_factory.mktemp("unfit-caches")
    build_cache(teacher, rows[:3], root / "partial", k=8, temperature=2.0, **options)
    build_cache(teacher, rows, root / "cold", k=8, temperature=1.0, **options)
    return str(root / "partial"), str(root / "cold")
