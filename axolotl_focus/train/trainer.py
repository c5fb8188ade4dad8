"""FocusTrainer: axolotl's trainer with ``L = a_ce * CE + alpha_1 * (FOCUS | KD)`` from a teacher.

The student runs through the (possibly DDP/DeepSpeed/PEFT-wrapped) model as usual, but asks for
hidden states and only the last position's logits; CE and the distillation term are then computed
together by :class:`axolotl_focus.train.losses.FusedCEDistillLoss` from the final hidden states and the
lm_head weights, chunk by chunk, over the valid (label != -100) positions only.

Teacher: an in-process model (``focus_teacher_model``, loaded once and placed for DDP / DeepSpeed),
or, with ``focus_teacher_cache: DIR``, a precomputed teacher-logit cache
(:mod:`axolotl_focus.train.teacher_cache`) and no teacher model at all. The cache is opened once at
init, checked against the run (``focus_temperature``, the student's lm_head rows, the tokenizer)
and against the data: every SFT row of the train and eval datasets (RePAIR pair rows aside) must
be in it, or the trainer stops before step one. Each micro-batch's rows are then looked up by
their tokens (:meth:`TeacherCache.sparse_for_batch`, before the labels leave the inputs) and fed
to the fused pass as a :class:`axolotl_focus.train.losses.SparseTeacher` (top-k ``log q`` + tail
bucket; with k = V the same loss as the in-process teacher). Everything else below is the same
for both.

Normalization: the loss of a micro-batch is ``sum over its valid tokens / num_items_in_batch``,
where the HF Trainer counts ``num_items_in_batch`` over all micro-batches of the optimizer step
and (with ``average_tokens_across_devices``) over all data-parallel ranks, and multiplies by the
number of processes because DDP averages gradients. The resulting gradient is exactly that of the
per-token mean over the global batch, whatever the accumulation steps and world size. The baseline
terms of ``focus_aux_losses`` (unlikelihood, ScaleGrad, TaiLr) are token sums in the same fused
pass and normalize the same way. The RePAIR margin loss is the mean over all pairs of the
optimizer step on all ranks (counted in :meth:`FocusTrainer.get_batch_samples`), so micro-batches
without pairs do not dilute alpha_2. Logged terms (``loss/ce``, ``loss/focus``, ``loss/repair``...)
are exact per-token (per-pair) means over the logging window.

DITTO (``focus_aux_losses: {ditto: ...}``) maps onto axolotl's batches as follows: each optimizer
step (``gradient_accumulation_steps`` micro-batches of ``micro_batch_size`` rows on every rank) is,
with the configured probability, a DITTO-only step (:func:`axolotl_focus.train.ditto.is_ditto_step`,
seeded by ``(seed, global_step)``: all micro-batches and ranks agree). In a DITTO step every
micro-batch is replaced by the pseudo-repetition rows built from its own SFT sequences
(:func:`axolotl_focus.train.ditto.pseudo_rows`; RePAIR pair rows are left out) and its loss is the DITTO
loss only (no CE, distillation or RePAIR), the mean over that micro-batch's DITTO tokens divided by
the accumulation steps: each micro-batch weighs the same, and DDP averages the ranks' gradients.
A micro-batch without any SFT sequence has a zero loss in a DITTO step (it still runs forward and
backward, so that the ranks stay in step). Evaluation never uses DITTO.

Non-finite guard: training stops (:class:`NonFiniteTraining`) at the first micro-batch whose loss
or one of its terms is inf / nan, and at the first optimizer step whose gradient norm is (except
under fp16, where the loss scaler skips such steps by design), before the optimizer updates the
weights: one line names the step and the loss term, the model keeps its last finite weights and
nothing is saved (axolotl saves only after training returns).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import datasets
import torch
import torch.nn.functional as F
from axolotl.core.trainers.base import AxolotlTrainer
from transformers import AutoTokenizer

from ..config import TRAINING_RECORD, FocusAuxLosses, FocusTrainingArgsMixin
from ..files import write_json
from ..vocabulary import check_vocab_compat
from .ditto import is_ditto_step, pseudo_rows, sentence_end_ids
from .losses import (
    IGNORE_INDEX,
    DistillSpec,
    FusedCEDistillLoss,
    chunked_token_nll,
    ditto_previous_index,
    fused_ditto_loss,
    repair_margin_loss,
)
from .pair_stream import PairStream, append_pairs
from .teacher import gathered, load_teacher, place_teacher, resolve_dtype, unwrap
from .teacher_cache.reader import TeacherCache
from .teacher_cache.rows import dataset_sft_rows

LOG = logging.getLogger(__name__)
_COUNT = "#count"  # suffix of the stored count that goes with a term's stored sum (see FocusTrainer.log)


class NonFiniteTraining(RuntimeError):
    """The loss, a loss term or the gradient norm of a training step is inf / nan (see the module docstring)."""


def shifted_labels(inputs: dict) -> torch.Tensor:
    """Next-token targets aligned with the positions that predict them (CE's shift)."""
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"]
    return F.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]


def sequence_ids(inputs: dict, shape: torch.Size) -> torch.Tensor:
    """An id per position, distinct per sequence: one per row, and packed rows split where
    ``position_ids`` restart at 0 (the "earlier targets" of unlikelihood / ScaleGrad stay inside
    one sequence)."""
    positions = inputs.get("position_ids")
    if positions is None or positions.shape != shape:
        starts = torch.zeros(shape, dtype=torch.long)
    else:
        starts = (positions == 0).long().cpu()
    starts[:, 0] = 1
    return starts.flatten().cumsum(0).view(shape)


def write_training_record(output_dir: str, focus_args) -> str:
    """``<output_dir>/focus_training.json``: the ``focus_*`` settings of a training run."""
    record = {f.name: getattr(focus_args, f.name) for f in dataclasses.fields(focus_args)}
    path = os.path.join(output_dir, TRAINING_RECORD)
    write_json(path, record, indent=2, sort_keys=True, default=str)
    return path


class FocusTrainer(AxolotlTrainer):
    """Trainer for the FOCUS / KD / CE objectives of the paper (section 4.1)."""

    _FOCUS_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")

    def __init__(
        self,
        *args,
        teacher_model: torch.nn.Module | None = None,
        focus_args: FocusTrainingArgsMixin | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.focus_args = focus_args or FocusTrainingArgsMixin(
            **{
                f.name: getattr(self.args, f.name, f.default)
                for f in dataclasses.fields(FocusTrainingArgsMixin)
            }
        )
        fa = self.focus_args
        self.distill_spec = DistillSpec(fa.focus_distill, fa.focus_temperature, fa.focus_beta, fa.focus_gamma)
        aux = FocusAuxLosses.model_validate(fa.focus_aux_losses or {})
        self.aux_spec = aux.aux_spec()
        self.fused_loss = FusedCEDistillLoss(self.distill_spec, aux=self.aux_spec, ce_weight=fa.focus_ce_alpha,
                                             distill_weight=fa.focus_alpha, chunk_size=fa.focus_chunk_size)
        self.ditto = aux.ditto
        self._sentence_ends = None
        # We normalize by num_items_in_batch ourselves: make the HF Trainer count it.
        self.model_accepts_loss_kwargs = True
        self.teacher = None
        self.teacher_cache = None
        if self.distill_spec.mode != "none" and fa.focus_teacher_cache:
            if teacher_model is not None:
                LOG.warning("axolotl_focus: focus_teacher_cache is set; the teacher model given is not used")
            self.teacher_cache = self._open_teacher_cache(fa.focus_teacher_cache)
        elif self.distill_spec.mode != "none":
            self.teacher = self._prepare_teacher(teacher_model)
        self.pair_stream = None
        if fa.focus_repair_pairs:
            self.pair_stream = PairStream.load(fa.focus_repair_pairs, self.processing_class, fa.focus_sequence_len,
                                               fa.focus_repair_pairs_per_step, self.args.seed,
                                               fa.focus_repair_skip_bad_rows)
            LOG.info("axolotl_focus: RePAIR pair stream %s: %d pairs, %d per optimizer step", fa.focus_repair_pairs,
                     len(self.pair_stream.pairs), fa.focus_repair_pairs_per_step)

    # -- saving -------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save as usual, plus ``focus_training.json`` next to the weights: the objective the
        model was trained with (every ``focus_*`` setting), which evaluation reads (Figure 3a)."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            write_training_record(output_dir or self.args.output_dir, self.focus_args)

    # -- teacher ------------------------------------------------------------------------------
    def _prepare_teacher(self, teacher: torch.nn.Module | None) -> torch.nn.Module:
        fa = self.focus_args
        if teacher is None:
            if not fa.focus_teacher_model:
                raise ValueError(
                    "focus_teacher_model: not set; FOCUS/KD need the unpruned teacher "
                    "(or set focus_distill: none)"
                )
            # tokenizers first: a mismatch must not wait for the teacher's weights to load
            check_vocab_compat(self.processing_class, AutoTokenizer.from_pretrained(fa.focus_teacher_model))
            dtype = resolve_dtype(fa.focus_teacher_dtype, self.args.bf16, self.args.fp16)
            teacher = load_teacher(fa.focus_teacher_model, dtype)
        check_vocab_compat(
            student_vocab=unwrap(self.model).get_output_embeddings().weight.shape[0],
            teacher_vocab=teacher.get_output_embeddings().weight.shape[0],
        )
        return place_teacher(teacher, self.accelerator)

    def _open_teacher_cache(self, path: str):
        """Open the teacher cache once, check that it fits this run (temperature, the student's
        lm_head rows, the tokenizer) and that it holds every SFT row of the train and eval data."""
        cache = TeacherCache.open(path)
        cache.check_compatible(temperature=self.focus_args.focus_temperature,
                               vocab_size=unwrap(self.model).get_output_embeddings().weight.shape[0],
                               tokenizer=self.processing_class, teacher=self.focus_args.focus_teacher_model)
        self._check_cached_rows(cache)
        meta = cache.meta
        LOG.info("axolotl_focus: teacher cache %s (k=%s, teacher %s): no teacher model loaded", path, meta.k,
                 meta.teacher)
        return cache

    def _check_cached_rows(self, cache) -> None:
        """Every SFT row of ``train_dataset`` and ``eval_dataset`` (RePAIR pair rows aside) must be in
        the cache, so that a missing sequence stops the run before step one, not in the middle."""
        splits = [("train", self.train_dataset)]
        evals = self.eval_dataset
        splits += [(f"eval {name}", d) for name, d in evals.items()] if isinstance(evals, dict) else [("eval", evals)]
        for name, dataset in splits:
            if dataset is None:
                continue
            if isinstance(dataset, (datasets.IterableDataset, torch.utils.data.IterableDataset)):
                LOG.warning("axolotl_focus: the %s dataset is streamed: its rows are looked up in the teacher cache "
                            "batch by batch only", name)
                continue
            try:
                cache.check_rows(dataset_sft_rows(dataset))
            except ValueError as exc:
                raise ValueError(f"{name} dataset: {exc}") from None

    def _teacher_hidden(self, inputs: dict, rows: torch.Tensor) -> torch.Tensor:
        decoder = unwrap(self.teacher).get_decoder()
        with torch.no_grad():
            out = decoder(**{k: inputs[k][rows] for k in self._FOCUS_INPUT_KEYS if k in inputs}, use_cache=False)
        return out.last_hidden_state

    # -- loss ---------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.ditto is not None and model.training and is_ditto_step(
                self.args.seed, self.state.global_step, self.ditto.probability):
            return self._ditto_step(model, inputs, return_outputs, num_items_in_batch)
        targets = shifted_labels(inputs)
        cached = None
        if self.teacher_cache is not None:  # the teacher's rows of this batch, looked up by their tokens (CPU)
            cached = self.teacher_cache.sparse_for_batch(inputs["input_ids"], inputs["labels"],
                                                         inputs.get("attention_mask"))
        repair = {k: inputs.pop(k) for k in ("repair_labels", "repair_chosen", "repair_rejected") if k in inputs}
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        outputs = model(**model_inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        hidden = outputs.hidden_states[-1]
        valid = targets != IGNORE_INDEX
        local_tokens = int(valid.sum())

        scale = 1.0 / max(local_tokens, 1)
        if num_items_in_batch is not None:
            scale = 1.0 / max(float(num_items_in_batch), 1.0)
            if self.args.average_tokens_across_devices:
                scale *= self.accelerator.num_processes

        student_head = self._student_head(model)
        teacher_hidden = teacher_head = gather_teacher = sparse = None
        sft_rows = valid.any(-1)
        if cached is not None:
            if local_tokens:
                sparse = cached.rows(0, cached.ids.shape[0], device=hidden.device)
        elif self.teacher is not None:
            head = unwrap(self.teacher).get_output_embeddings().weight
            if local_tokens:
                teacher_hidden = self._teacher_hidden(inputs, sft_rows)[valid[sft_rows]]
                teacher_head = gather_teacher = head
            elif hasattr(head, "ds_id"):
                # ZeRO-3: the teacher's layers and head are gathered collectively, so a rank
                # without SFT tokens still runs the teacher (one row, output unused) and the gather
                self._teacher_hidden(inputs, torch.arange(sft_rows.numel(), device=sft_rows.device) == 0)
                gather_teacher = head
        sequence = None
        if self.aux_spec is not None and self.aux_spec.needs_seen:
            sequence = sequence_ids(inputs, valid.shape)[valid.cpu()].to(valid.device)
        metrics = {}
        with gathered(student_head, gather_teacher):
            loss, sums = self.fused_loss(
                hidden[valid],
                student_head,
                targets[valid],
                teacher_hidden=teacher_hidden,
                teacher_head=teacher_head,
                teacher=sparse,
                sequence=sequence,
                scale=scale,
            )
            pairs = int(repair["repair_chosen"].numel()) if repair else 0
            if pairs:
                repair_loss, stats = self._repair_loss(hidden, student_head, repair)
                loss = loss + self.focus_args.focus_repair_alpha * repair_loss * self._pair_weight(
                    model, num_items_in_batch, pairs)
                metrics = {"repair": repair_loss.detach(), **stats}
        distill = sums.pop("distill")
        if self.distill_spec.mode != "none":
            sums[self.distill_spec.mode] = distill
        terms = self._log_terms(sums, local_tokens, model.training, {k: v * pairs for k, v in metrics.items()}, pairs)
        if model.training:
            self._stop_unless_finite(loss, terms)
        if return_outputs:
            return loss, {"loss": loss, "logits": outputs.logits}
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """HF's prefetch of an optimizer step's micro-batches (the SFT rows, counted for
        ``num_items_in_batch``); then the step's pairs of the pair stream are appended to them
        (:mod:`.pair_stream`), and the RePAIR pairs of the whole step on every rank are counted
        (``self._pairs_in_step``), for the margin loss's mean."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.pair_stream is not None and batch_samples:
            tokenizer, count = self.processing_class, len(batch_samples)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            batch_samples = [
                append_pairs(batch, self.pair_stream.for_micro_batch(self.state.global_step, micro, count,
                                                                     self.args.process_index, self.args.world_size),
                             pad, tokenizer.padding_side)
                for micro, batch in enumerate(batch_samples)]
        pairs = sum(int(b["repair_chosen"].numel()) for b in batch_samples if "repair_chosen" in b)
        if self.args.world_size > 1:
            pairs = int(self.accelerator.gather(torch.tensor([pairs], device=device)).sum())
        self._pairs_in_step = pairs
        return batch_samples, num_items_in_batch

    def _pair_weight(self, model, num_items_in_batch, pairs: int) -> float:
        """Weight of this micro-batch's mean hinge so that the optimizer step gets the mean over
        all pairs of the step on all ranks (eq. 1 over the global batch): ``pairs / pairs_in_step``,
        times the number of processes since DDP/DeepSpeed average the ranks' gradients. Without a
        step count (evaluation, a custom loop) the micro-batch mean is used."""
        total = getattr(self, "_pairs_in_step", None)
        if model.training and num_items_in_batch is not None and total:
            return pairs / total * self.accelerator.num_processes
        return 1.0 / self._mean_divisor(model, num_items_in_batch)

    def _mean_divisor(self, model, num_items_in_batch) -> int:
        """For per-micro-batch means (RePAIR, DITTO): HF divides the loss by the accumulation
        steps only when it does not get num_items_in_batch, so do it here in that case."""
        return self.args.gradient_accumulation_steps if (model.training and num_items_in_batch is not None) else 1

    def _student_head(self, model) -> torch.Tensor:
        head = unwrap(self.accelerator.unwrap_model(model)).get_output_embeddings().weight
        if hasattr(head, "ds_id") and head.requires_grad:
            raise ValueError(
                "axolotl_focus: a trainable lm_head under DeepSpeed ZeRO-3 is not supported by the "
                "fused loss; train with LoRA (lm_head frozen) or use ZeRO-1/2."
            )
        return head

    def _pseudo_rows(self, inputs: dict) -> dict | None:
        """DITTO's pseudo-repetition rows from the micro-batch's SFT sequences (RePAIR rows skipped)."""
        tokenizer = self.processing_class
        if self._sentence_ends is None:
            self._sentence_ends = sentence_end_ids(tokenizer)
        sft = {k: v for k, v in inputs.items() if k in ("input_ids", "labels", "attention_mask", "position_ids")}
        max_length = self.focus_args.focus_sequence_len or inputs["input_ids"].shape[1]
        stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return pseudo_rows(sft, self._sentence_ends, max_length, pad_id, stop_ids)

    def _ditto_step(self, model, inputs: dict, return_outputs: bool, num_items_in_batch):
        """DITTO-only loss of a micro-batch: mean over its DITTO tokens / accumulation steps.

        A micro-batch without SFT sequences still runs forward and backward (a zero loss), so
        that data-parallel ranks stay in step."""
        pseudo = self._pseudo_rows(inputs) or {
            "input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"),
            "labels": torch.full_like(inputs["input_ids"], IGNORE_INDEX),
            "unit_len": inputs["input_ids"].new_zeros(inputs["input_ids"].shape[0])}
        outputs = model(input_ids=pseudo["input_ids"], attention_mask=pseudo["attention_mask"],
                        output_hidden_states=True, logits_to_keep=1, use_cache=False)
        targets = shifted_labels({"labels": pseudo["labels"]})
        valid = targets != IGNORE_INDEX
        student_head = self._student_head(model)
        previous = ditto_previous_index(valid.nonzero()[:, 0], pseudo["unit_len"])
        with gathered(student_head):
            total, count = fused_ditto_loss(outputs.hidden_states[-1][valid], student_head, targets[valid],
                                            previous, self.ditto.lambda_, self.focus_args.focus_chunk_size)
        loss = total / max(count, 1) / self._mean_divisor(model, num_items_in_batch)
        terms = self._log_terms({"ditto": total.detach()}, count, model.training, skip_empty=True)
        if model.training:
            self._stop_unless_finite(loss, terms)
        if return_outputs:
            return loss, {"loss": loss, "logits": outputs.logits}
        return loss

    def _repair_loss(self, hidden, head, repair: dict):
        """RePAIR margin loss (eq. 1) over the pair rows the collator added to the batch."""
        labels = F.pad(repair["repair_labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]
        where = labels != IGNORE_INDEX
        token_nll = chunked_token_nll(hidden[where], head, labels[where], self.focus_args.focus_chunk_size)
        rows = where.nonzero()[:, 0]
        return repair_margin_loss(token_nll, rows, repair["repair_chosen"], repair["repair_rejected"],
                                  hidden.shape[0], self.focus_args.focus_repair_margin)

    def _stop_unless_finite(self, loss: torch.Tensor, terms: dict[str, float]) -> None:
        """Raise :class:`NonFiniteTraining` when this micro-batch's loss or a term of it is not finite."""
        self._last_terms = terms
        bad = [name for name, value in terms.items() if not math.isfinite(value)]
        if bad or not bool(torch.isfinite(loss.detach()).all()):
            what = f"{bad[0]} is {terms[bad[0]]}" if bad else f"the loss is {float(loss.detach().float().sum())}"
            self._stop_training(what, "before the backward pass")

    def _get_grad_norm(self, model, grad_norm=None):
        """HF's gradient norm of the step (computed before every optimizer step), checked: not
        finite stops training before the update (not under fp16, whose loss scaler skips such steps)."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not self.args.fp16 and not math.isfinite(float(grad_norm)):
            self._stop_training(f"the gradient norm is {float(grad_norm)}", "before the optimizer step")
        return grad_norm

    def _stop_training(self, what: str, when: str) -> None:
        terms = ", ".join(f"{k} {v:.4g}" for k, v in (getattr(self, "_last_terms", None) or {}).items())
        message = (f"axolotl_focus: step {self.state.global_step + 1}: {what}" + (f" (this micro-batch: {terms})"
                   if terms else "") + f"; training stopped {when}: the weights were not updated and no model is "
                   "saved. Check the loss settings (focus_temperature, focus_alpha, the focus_aux_losses), the "
                   "learning rate and the data of this step")
        LOG.error("%s", message)
        raise NonFiniteTraining(message)

    def _log_terms(self, sums: dict, tokens: int, training: bool, pair_sums: dict | None = None,
                   pairs: int = 0, skip_empty: bool = False) -> dict[str, float]:
        """Store each term's sum over this micro-batch with its count (``loss/<name>``: valid tokens
        of every rank; ``loss/repair*``: this rank's pairs); :meth:`log` divides the sums by the
        counts over the logging window, so the logged values are exact per-token / per-pair means
        whatever the gradient accumulation. Nothing is stored with ``skip_empty`` when no rank had
        a token. Returns each term's name and its mean over this micro-batch (all ranks; RePAIR terms:
        this rank's pairs), for the non-finite guard."""
        names = list(sums)
        values = [sums[k].detach().float().reshape(()) for k in names]
        stats = torch.stack(values + [values[0].new_tensor(float(tokens))])
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats.to(self.accelerator.device), reduction="sum")
        *totals, count = (float(x) for x in stats.cpu())
        if skip_empty and not count:
            return {}
        prefix = "loss/" if training else "eval_loss/"
        metrics, means = {}, {}
        for name, total in zip(names, totals):
            metrics[prefix + name] = (total, "sum")
            metrics[prefix + name + _COUNT] = (count, "sum")
            means[prefix + name] = total / max(count, 1.0)
        for key, value in (pair_sums or {}).items():
            name = prefix + (key if key == "repair" else f"repair_{key}")
            metrics[name] = (float(value), "sum")
            metrics[name + _COUNT] = (float(pairs), "sum")
            means[name] = float(value) / max(pairs, 1)
        self.store_metrics(metrics, train_eval="train" if training else "eval")
        return means

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Turn the stored (sum, count) pairs of :meth:`_log_terms` into means, then log."""
        stored = self._stored_metrics["train" if "loss" in logs else "eval"]
        for key in [k for k in stored if k.endswith(_COUNT)]:
            count = sum(stored.pop(key)["values"])
            base = key[: -len(_COUNT)]
            if base in stored:
                stored[base] = {"values": [sum(stored[base]["values"]) / max(count, 1.0)], "reduction": "mean"}
        return super().log(logs, start_time)
