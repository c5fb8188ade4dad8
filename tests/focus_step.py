"""One optimizer step of FocusTrainer on a fixed 4-row batch; run in-process or under torchrun.

    torchrun --nproc_per_node 2 tests/focus_step.py TINY_DIR OUT.pt --per-device 2 --accum 1
    ... --teacher-cache DIR    # the teacher from a teacher-logit cache of the rows (none loaded)
    ... --pairs FILE --pairs-per-step 3   # plus the RePAIR pair stream (margin 5)

Writes the updated parameters and the logged losses to OUT.pt (rank 0).
"""

import argparse
import os
import sys

import torch

LR = 0.5  # the learning rate of expected_params' SGD step


def rows(tokenizer, n=4):
    """Rows of different lengths and prompt masks, so token counts differ across micro-batches."""
    from axolotl_focus.micro import corpus_documents

    docs = corpus_documents("valid")
    out = []
    for i in range(n):
        ids = tokenizer(docs[i], add_special_tokens=True)["input_ids"][: 12 + 9 * i]
        labels = list(ids)
        labels[: 2 + i] = [-100] * (2 + i)  # a "prompt" of varying length
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def pair_rows():
    """Two RePAIR pair rows (prompt, chosen, rejected), one with a source_id."""
    return [
        {"prompt": "The cemetery is", "chosen": " a quiet place near the river .",
         "rejected": " designed to be a peaceful place . The cemetery is designed to be", "source_id": "a"},
        {"prompt": "In 1990 the band", "chosen": " released its second album",
         "rejected": " the band the band the band"},
    ]


def reference_batch_terms(model, teacher, batch, margin, alpha=0.05):
    """Dense reference of one collated batch (SFT rows + RePAIR pair rows): the summed
    ``CE + alpha * FOCUS`` over its valid tokens, their count, and each pair's hinge."""
    import torch.nn.functional as F

    from axolotl_focus.train.losses import DistillSpec, reference_ce_distill

    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    ce, d = reference_ce_distill(logits.reshape(-1, logits.shape[-1]), t_logits.reshape(-1, logits.shape[-1]),
                                 labels.reshape(-1), DistillSpec())
    rl = batch["repair_labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), rl.clamp(min=0), reduction="none") * (rl != -100)
    mean = nll.sum(1) / (rl != -100).sum(1).clamp(min=1)
    hinges = (margin + mean[batch["repair_chosen"]] - mean[batch["repair_rejected"]]).clamp(min=0)
    return ce + alpha * d, int((labels != -100).sum()), hinges


def pair_hinges(model, pairs, margin):
    """Dense reference of RePAIR's hinge per pair: ``max(0, m + l+ - l-)`` with ``l+`` / ``l-`` the
    model's mean token NLL of the chosen / rejected continuation after the prompt, one pair at a time
    (``pairs``: (prompt, chosen, rejected) token ids)."""
    import torch.nn.functional as F

    out = []
    for prompt, chosen, rejected in pairs:
        nll = []
        for cont in (chosen, rejected):
            ids = torch.tensor([list(prompt) + list(cont)])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
            nll.append(F.cross_entropy(logits, torch.tensor(cont)))
        out.append((margin + nll[0] - nll[1]).clamp(min=0))
    return torch.stack(out)


def expected_params(tiny_dir, distill="focus", alpha=0.05, student=None, aux=None, cache=None, pairs=None,
                    margin=1.0):
    """One SGD step on the dense reference loss averaged over all valid tokens of the 4 rows
    (``aux``: an AuxSpec whose terms replace / add to CE, see reference_aux_terms; ``cache``: a
    TeacherCache whose sparse rows replace the teacher's full distribution; ``pairs``: the step's
    RePAIR pairs as token ids, whose mean hinge (margin ``margin``, alpha_2 1) is added)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from axolotl_focus.train.losses import (
        DistillSpec,
        reference_aux_terms,
        reference_ce_distill,
        reference_ce_distill_sparse,
    )

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "student"))
    if student is None:
        student = AutoModelForCausalLM.from_pretrained(os.path.join(tiny_dir, "student"), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(tiny_dir, "teacher"), dtype=torch.float32)
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True)(rows(tokenizer))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    zs = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        zt = teacher(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    if cache is not None:
        sparse = cache.sparse_for_batch(batch["input_ids"], batch["labels"], batch["attention_mask"])
        ce, d = reference_ce_distill_sparse(zs.reshape(-1, zs.shape[-1]), labels.reshape(-1), sparse,
                                            DistillSpec(mode=distill))
    else:
        ce, d = reference_ce_distill(zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1]),
                                     labels.reshape(-1), DistillSpec(mode=distill))
    if aux is not None:
        row_of = torch.arange(labels.shape[0]).repeat_interleave(labels.shape[1])
        terms = reference_aux_terms(zs.reshape(-1, zs.shape[-1]), labels.reshape(-1), row_of, aux)
        ce = terms.get("scalegrad", terms.get("tailr", ce)) + (aux.unlikelihood or 0.0) * terms.get("ul", 0.0)
    n_tokens = (labels != -100).sum()
    loss = (ce + alpha * d) / n_tokens
    if pairs:
        loss = loss + pair_hinges(student, pairs, margin).mean()
    loss.backward()
    params = {k: (p - LR * p.grad).detach() for k, p in student.named_parameters() if p.requires_grad}
    return params, loss.item()


def assert_params_equal(got, want, atol=2e-6):
    """Parameter dicts equal key by key to float tolerance."""
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")


def make_trainer(tiny_dir, out_dir, per_device=4, accum=1, distill="focus", lr=0.5, lora=False, max_steps=1,
                 **focus_kwargs):
    """FocusTrainer on the tiny student/teacher and the fixed 4 rows; SGD, no clipping.
    ``focus_kwargs``: further FocusTrainingArgsMixin fields (e.g. focus_aux_losses); with
    ``focus_teacher_cache`` no teacher model is loaded (the trainer reads the cache)."""
    from axolotl.core.training_args import AxolotlTrainingArguments
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from axolotl_focus.config import FocusTrainingArgsMixin
    from axolotl_focus.train.trainer import FocusTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "student"))
    student = AutoModelForCausalLM.from_pretrained(os.path.join(tiny_dir, "student"), dtype=torch.float32)
    teacher = None
    if not focus_kwargs.get("focus_teacher_cache"):
        teacher = AutoModelForCausalLM.from_pretrained(os.path.join(tiny_dir, "teacher"), dtype=torch.float32)
        teacher.requires_grad_(False).eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(
            student, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    args = AxolotlTrainingArguments(
        output_dir=os.path.join(out_dir, "trainer_out"),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=accum,
        max_steps=max_steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        optim="sgd",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    data = Dataset.from_list(rows(tokenizer))
    return FocusTrainer(
        model=student,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        eval_data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        processing_class=tokenizer,
        teacher_model=teacher,
        focus_args=FocusTrainingArgsMixin(focus_distill=distill, focus_chunk_size=7, **focus_kwargs),
    )


def write_pairs(path):
    """:func:`pair_rows` as a JSON-lines pairs file (plus a third pair); returns ``path``."""
    import json

    rows = pair_rows() + [{"prompt": "The album was", "chosen": " well received by critics",
                           "rejected": " released released released released"}]
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def stream_kwargs(pairs_file, per_step, margin=5.0):
    """FocusTrainingArgsMixin fields of a pair stream (margin 5: every tiny pair's hinge is active)."""
    return {"focus_repair_pairs": pairs_file, "focus_repair_pairs_per_step": per_step, "focus_repair_margin": margin,
            "focus_sequence_len": 64}


def stream_step_pairs(tiny_dir, pairs_file, per_step, step=0):
    """Token ids of the pairs the stream draws at ``step`` (training seed 0), for the reference."""
    from transformers import AutoTokenizer

    from axolotl_focus.train.pair_stream import PairStream

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "student"))
    stream = PairStream.load(pairs_file, tokenizer, 64, per_step, seed=0)
    return [stream.pairs[i] for i in stream.step_pairs(step)]


def run(tiny_dir, out_path, per_device, accum, distill="focus", lr=0.5, teacher_cache=None, pairs_file=None,
        pairs_per_step=3):
    extra = {"focus_teacher_cache": teacher_cache} if teacher_cache else {}
    if pairs_file:
        extra |= stream_kwargs(pairs_file, pairs_per_step)
    trainer = make_trainer(tiny_dir, os.path.dirname(out_path), per_device, accum, distill, lr, **extra)
    trainer.train()
    if trainer.accelerator.is_main_process:
        logs = [h for h in trainer.state.log_history if "loss" in h]
        params = {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
        torch.save({"params": params, "logs": logs}, out_path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("tiny_dir")
    parser.add_argument("out")
    parser.add_argument("--per-device", type=int, default=4)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--distill", default="focus")
    parser.add_argument("--teacher-cache", default=None)
    parser.add_argument("--pairs", default=None, help="a pairs file drawn as the RePAIR pair stream")
    parser.add_argument("--pairs-per-step", type=int, default=3)
    a = parser.parse_args()
    sys.exit(run(a.tiny_dir, a.out, a.per_device, a.accum, a.distill, teacher_cache=a.teacher_cache,
                 pairs_file=a.pairs, pairs_per_step=a.pairs_per_step))
