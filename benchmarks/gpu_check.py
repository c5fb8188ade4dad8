"""The GPU check: everything users run on a GPU, checked and measured in one prepared run.

Run on the GPU machine (one H100 or H200; PyTorch, transformers, Triton, no axolotl, pydantic,
datasets or trl, no package index), from the repository root, with the one wheel it needs carried:

    # here, once: the wheel into the ignored folder .whl/ (liger-kernel: pure Python + Triton, 0.5 MB)
    python -m pip download --no-deps -d .whl liger-kernel==0.8.1
    # there (device tool: carry [".whl"], timeout_s 570):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_check.py --out $OUT

Expected time on one H100: about 4 minutes (an estimate: it has not run on a GPU yet), at most 8:
the sections' time limits add up to ``--budget`` (450 s), plus ~10 s of start-up and at most one
running item past each limit. Without the wheel, Liger is skipped and said so. ``--sections``
reruns a subset (e.g. ``--sections train_step,generate``). The CPU rehearsal (CI,
``tests/test_benchmarks.py``) is the same script at tiny shapes, ~15-25 s on 2 cores:

    python benchmarks/gpu_check.py --device cpu --tiny --threads 1 --out /tmp/gpu_check

Sections, in this order, each under its own time limit (:data:`LIMITS`, seconds; shortened to
what is left of ``--budget``). A section stops starting items at its limit and records that
(``status``: ``done``, ``time limit after N items`` or ``error``); an item already running ends
first (each is seconds long), the subprocess of ``loss_speed`` is killed at the limit.

1. ``correctness``: every fused loss in fp32 and bf16 on the device against its dense reference
   in float64 on the CPU (``axolotl_focus/train/losses``: ``reference_ce_distill``,
   ``reference_ce_distill_sparse``, ``reference_aux_terms``, ``repair_margin_loss`` on a dense
   NLL, ``reference_ditto``): CE + FOCUS / KD against a dense teacher, against a teacher cache
   (top-k ids, ``log q`` and tail as the cache stores them: int64 / fp32 / fp32) with k = 64 and
   k = V, UL / ScaleGrad / TaiLr, the RePAIR margin on the chunked NLL, DITTO. The inputs are
   rounded to bf16 once, so fp32 and bf16 runs and the float64 reference see the same numbers.
   Values (total and sums) and the gradients of the student's hidden states and head are compared
   by relative error (Frobenius for gradients) with :data:`TOLERANCES` (per dtype; looser for
   the sums of probabilities, UL and DITTO, whose relative error is the logits' absolute error);
   one ``ok`` / ``OFF`` line each. Distillation and UL have weight 1 here, so that their
   gradients count. Shapes: 4 rows x 128 tokens, hidden 256, V = 32,000, chunks of 200 rows
   (uneven last chunk).
2. ``loss_speed``: ``benchmarks/distill_loss.py`` (its own subprocess and workers) at N = 8192,
   H = 4096, V = 32,768 and 128,256, bf16, CE + FOCUS: fused vs plain (dense logits + autograd)
   vs Liger's ``LigerFusedLinearJSDLoss`` (JSD, compiled with ``torch.compile`` on CUDA;
   ``compiled=False`` on CPU, said in the output): time, peak memory, plain == fused.
3. ``train_step``: one forward + backward (no optimizer) of a LLaMA-3.2-1B-shaped student with
   random weights (V = 128,256, hidden 2048, 16 layers, GQA 32/8, tied head), bf16, batch
   4 x 2048, sdpa attention, all weights trained: CE through the model's own loss (HF logits +
   loss), fused CE, FOCUS with the teacher in memory (a second random model of the same shape,
   its decoder under ``no_grad``), FOCUS on plain logits (both models' full logits +
   ``reference_ce_distill`` + autograd), FOCUS from a top-512 cache (built from the teacher
   beforehand, on the CPU as the trainer gets it); the trainer's path (final hidden states with
   ``logits_to_keep=1``, ``FusedCEDistillLoss``, alpha 0.05). Time (median of 2 after 1 warm-up)
   and peak memory as ratios to CE, beside the FLOP limit ``1 + teacher forward / (student
   forward + backward)`` (counted: 2 FLOP per weight and token, causal attention, backward = 2 x
   forward) and the measured ``1 + teacher forward time / CE time``. Plain logits run last: their
   peak may not fit (then the line says out of memory).
4. ``prune``: width pruning of a 1B-shaped random model in fp32 with first-order Taylor (gradient)
   importance on 10 x 64 random calibration tokens: the importance pass with gradient hooks (the
   default), the same holding every gradient (LLM-Pruner's way), and the whole ``prune_width``:
   time and peak memory (model included; ratio hooks / all gradients). The settings are
   ``PruneSettings``' defaults as a plain object (:func:`prune_settings`; pydantic is absent).
5. ``generate``: greedy generation on the 1B shape (bf16) at batch 64, prompts of 32-64 tokens,
   per-row budgets 8..128 (rows end at different steps, as in mining): the row-dropping
   ``generate_batch`` vs HF ``generate`` (finished rows kept as padding; same per-row stopping
   through ``RowStopper``): tokens/s, steps, row-steps, rows with equal tokens.

Output: ``gpu_check.json`` and ``gpu_check.md`` in ``--out``, both rewritten after every item, with
the device, versions and matmul settings; one progress line per item on stdout. The exit status is
1 if a correctness line or distill_loss.py's plain == fused check is OFF, or a section failed.

The GPU machine lacks axolotl, pydantic, datasets and trl; run as a script, this file makes them
unimportable (``sys.modules[name] = None``, as if absent) before anything else is imported, so the
CPU rehearsal fails wherever the check would need them; ``blocked_imports`` in the JSON says so.
The one import of a subprocess beyond torch and the losses, Liger's, is made here too
(``loss_speed``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ABSENT_ON_GPU_MACHINE = ("axolotl", "datasets", "pydantic", "trl")
if __name__ == "__main__":  # before any other import: as if not installed (import fails, find_spec is None)
    sys.modules.update(dict.fromkeys(ABSENT_ON_GPU_MACHINE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # axolotl_focus from this checkout (not installed on the GPU machine)
sys.path.insert(0, str(BENCH))

from aux_losses import make_targets  # noqa: E402
from cpu import cpu_name  # noqa: E402
from distill_loss import make_inputs  # noqa: E402
from peak_rss import reset_peak, status_kb  # noqa: E402

SECTIONS = ("correctness", "loss_speed", "train_step", "prune", "generate")
LIMITS = {"correctness": 60, "loss_speed": 180, "train_step": 90, "prune": 50, "generate": 70}  # seconds
# Relative error bounds against float64, 4-56x the CPU's errors at the full check shapes
# (docs/results.md). Values are sums of log-probabilities (CE, FOCUS / KD, ScaleGrad, TaiLr,
# margin) or of probabilities (UL, DITTO: their relative error is the absolute error of the
# logits, ~1e-5 in fp32 and ~0.03 in bf16, whose matmuls round the logits and gradients to bf16).
TOLERANCES = {torch.float32: {"values": 1e-5, "probabilities": 1e-3, "grads": 1e-4},
              torch.bfloat16: {"values": 5e-3, "probabilities": 1e-1, "grads": 1e-1}}
PROBABILITY_SUMS = ("ul", "ditto")
TAU, UL_WEIGHT, MARGIN, DITTO_LAMBDA, TRAIN_ALPHA = 2.0, 1.0, 10.0, 0.5, 0.05

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072)
SIZES = {
    "full": dict(
        check=dict(rows=4, seq=128, hidden=256, vocab=32000, chunk=200, prefix=16, unit=32, k=64),
        loss=dict(tokens=8192, hidden=4096, vocabs=(32768, 128256), repeats=2, chunk=None),
        model=LLAMA_1B,
        train=dict(batch=4, seq=2048, k=512, repeats=2),
        prune=dict(samples=10, seq=64),
        generate=dict(batch=64, prompt=(32, 64), budgets=(8, 128)),
    ),
    "tiny": dict(
        check=dict(rows=4, seq=24, hidden=32, vocab=500, chunk=40, prefix=4, unit=6, k=64),
        loss=dict(tokens=256, hidden=32, vocabs=(512,), repeats=1, chunk=64),
        model=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=8, tie_word_embeddings=True),
        train=dict(batch=2, seq=32, k=64, repeats=1),
        prune=dict(samples=4, seq=16),
        generate=dict(batch=8, prompt=(4, 8), budgets=(2, 12)),
    ),
}
GIB = 2**30


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, warmup: int = 1, repeats: int = 1) -> tuple[dict, object]:
    """Median time of ``repeats`` calls of ``fn`` after ``warmup`` calls, and the peak memory they
    added over what was held before (CUDA: ``max_memory_allocated``; CPU: peak RSS, VmHWM reset).
    Returns ``({"time_s", "times_s", "peak_bytes"}, last result)``."""
    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = (status_kb("VmRSS") or 0) * 1024 if reset_peak() else None
    times, out = [], None
    for i in range(warmup + repeats):
        out = None
        start = time.perf_counter()
        out = fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = None if base is None else status_kb("VmHWM") * 1024 - base
    return {"time_s": statistics.median(times), "times_s": times, "peak_bytes": peak}, out


def build_llama(shape: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """A LlamaForCausalLM of ``shape`` with random weights (HF's init, seeded), built on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def forward_flops(config, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward pass (lm_head on every token, causal attention)."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = config.hidden_size * (2 * q + 2 * kv) + 3 * config.hidden_size * config.intermediate_size
    weights = config.num_hidden_layers * per_layer + config.vocab_size * config.hidden_size
    attention = config.num_hidden_layers * 2 * batch * seq * seq * q  # QK^T and PV, half of the square
    return 2.0 * batch * seq * weights + attention


def prune_settings(samples: int, seq: int) -> SimpleNamespace:
    """What ``prune_width`` / ``compute_importance`` read of their settings: ``PruneSettings()``'s
    defaults (LLM-Pruner width pruning, ratio 0.25 in layers [4, L-2), first-order Taylor
    importance, whole GQA groups), as a plain object: pydantic is absent on the GPU machine.
    ``tests/test_benchmarks.py`` checks it against ``PruneSettings()``."""
    return SimpleNamespace(method="width", ratio=0.25, target_param_reduction=None, importance="param_first",
                           attn_layers=None, mlp_layers=None, gqa_mode="group", uniform=False, seed=0,
                           calib_samples=samples, calib_seq_len=seq,
                           layer_ranges=lambda layers: ((4, layers - 2), (4, layers - 2)),
                           validate=lambda config: None)


def mem(nbytes) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / GIB:.2f} GiB" if abs(nbytes) >= GIB else f"{nbytes / 2**20:.1f} MiB"


def rel(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-30)


# --------------------------------------------------------------------------------------------
# 1. correctness
# --------------------------------------------------------------------------------------------


def ditto_rows(rows: int, seq: int, prefix: int, unit: int, vocab: int, g: torch.Generator):
    """Pseudo-repetition rows (a prefix, then copies of a unit) and their shifted targets, -100
    before the first copy: the layout of ``reference_ditto`` and of the trainer's DITTO rows."""
    copies = torch.randint(0, vocab, (rows, unit), generator=g).repeat(1, (seq - prefix) // unit + 1)
    ids = torch.cat([torch.randint(0, vocab, (rows, prefix), generator=g), copies[:, : seq - prefix]], 1)
    targets = F.pad(ids, (0, 1), value=-100)[:, 1:].clone()
    targets[:, : prefix - 1] = -100
    return ids, targets


def check_inputs(L, c: dict) -> dict:
    """The correctness section's inputs (CPU): hidden states and heads rounded to bf16 once,
    Zipf targets by row, teacher caches, DITTO rows."""
    n, vocab = c["rows"] * c["seq"], c["vocab"]
    h, w, ht, wt, _ = make_inputs(n, c["hidden"], vocab, seed=0)
    labels, sequence = make_targets(n, vocab, c["seq"], "ul", seed=0)
    h, w, ht, wt = (x.bfloat16().float() for x in (h, w, ht, wt))
    teacher_logits = ht.double() @ wt.double().T

    def cache(k):  # as a teacher cache stores and the reader returns it: ids int64, log q / tail fp32
        s = L.sparse_teacher_from_logits(teacher_logits, k, TAU)
        return L.SparseTeacher(s.ids.long(), s.logq.float(), s.log_tail.float(), TAU)

    g = torch.Generator().manual_seed(1)
    ditto_ids, ditto_targets = ditto_rows(c["rows"], c["seq"], c["prefix"], c["unit"], vocab, g)
    ditto_valid = ditto_targets != -100
    previous = L.ditto_previous_index(ditto_valid.nonzero()[:, 0], torch.full((c["rows"],), c["unit"]))
    rows = torch.arange(c["rows"])
    return dict(h=h, w=w, ht=ht, wt=wt, labels=labels, sequence=sequence,
                caches={"k": cache(c["k"]), "V": cache(vocab)}, chosen=rows[0::2], rejected=rows[1::2],
                ditto_ids=ditto_ids, ditto_targets=ditto_targets, ditto_valid=ditto_valid, ditto_previous=previous)


def loss_cases(L, c: dict) -> dict:
    """name -> ``case(x, ref) -> (total, {sum name: value})``: the fused loss on ``x``'s device,
    or with ``ref`` its dense reference (float64 on the CPU). ``total`` is differentiated."""
    n, rows, chunk = c["rows"] * c["seq"], c["rows"], c["chunk"]
    none = L.DistillSpec("none")

    def distill(mode: str, teacher: str | None):
        spec = L.DistillSpec(mode, temperature=TAU)

        def case(x, ref):
            cache = x.caches[teacher] if teacher else None
            if ref:
                logits = x.h @ x.w.T
                ce, d = (L.reference_ce_distill_sparse(logits, x.labels, cache, spec) if cache else
                         L.reference_ce_distill(logits, x.ht @ x.wt.T, x.labels, spec))
                return (ce + d) / n, {"ce": ce, "distill": d}
            return L.FusedCEDistillLoss(spec, ce_weight=1 / n, distill_weight=1 / n, chunk_size=chunk)(
                x.h, x.w, x.labels, teacher_hidden=None if cache else x.ht, teacher_head=None if cache else x.wt,
                teacher=cache)

        return case

    def aux(term: str, spec):
        def case(x, ref):
            if ref:
                logits = x.h @ x.w.T
                value = L.reference_aux_terms(logits, x.labels, x.sequence, spec)[term]
                ce = F.cross_entropy(logits, x.labels, reduction="sum")
                return ((ce + UL_WEIGHT * value) if term == "ul" else value) / n, {"ce": ce, term: value}
            total, sums = L.FusedCEDistillLoss(none, aux=spec, distill_weight=0.0, chunk_size=chunk)(
                x.h, x.w, x.labels, sequence=x.sequence, scale=1 / n)
            return total, {"ce": sums["ce"], term: sums[term]}

        return case

    def margin(x, ref):
        nll = (F.cross_entropy(x.h @ x.w.T, x.labels, reduction="none") if ref else
               L.chunked_token_nll(x.h, x.w, x.labels, chunk))
        loss, _ = L.repair_margin_loss(nll, x.sequence, x.chosen, x.rejected, rows, MARGIN)
        return loss, {"nll": nll.sum(), "margin": loss}

    def ditto(x, ref):
        h = x.h.view(rows, c["seq"], -1)
        if ref:
            total, count = L.reference_ditto(h @ x.w.T, x.ditto_ids, [c["seq"]] * rows, [c["prefix"]] * rows,
                                             [c["unit"]] * rows, DITTO_LAMBDA)
        else:
            total, count = L.fused_ditto_loss(h[x.ditto_valid], x.w, x.ditto_targets[x.ditto_valid], x.ditto_previous,
                                              DITTO_LAMBDA, chunk)
        return total / count, {"ditto": total}

    k = c["k"]
    return {
        "CE + FOCUS, dense teacher": distill("focus", None),
        "CE + KD, dense teacher": distill("kd", None),
        f"CE + FOCUS, cache k={k}": distill("focus", "k"),
        f"CE + KD, cache k={k}": distill("kd", "k"),
        "CE + FOCUS, cache k=V": distill("focus", "V"),
        "CE + unlikelihood": aux("ul", L.AuxSpec(unlikelihood=UL_WEIGHT)),
        "ScaleGrad": aux("scalegrad", L.AuxSpec(scalegrad=0.5)),
        "TaiLr": aux("tailr", L.AuxSpec(tailr=(0.1, 0.2))),
        "RePAIR margin, chunked NLL": margin,
        "DITTO": ditto,
    }


def run_case(case, inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Values and student gradients of one case: the hidden states and heads in ``dtype`` on
    ``device`` (the student's require grad), everything else moved as it is; caches stay on the
    CPU (the trainer's fused pass moves their rows)."""
    x = SimpleNamespace(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()})
    for name in ("h", "w", "ht", "wt"):
        setattr(x, name, inputs[name].to(device, dtype, copy=True).requires_grad_(name in ("h", "w")))
    total, values = case(x, dtype == torch.float64)
    total.backward()
    return {"total": float(total.detach()), **{k: float(v.detach()) for k, v in values.items()},
            "grad_h": x.h.grad.double().cpu(), "grad_w": x.w.grad.double().cpu()}


def correctness(ctx, deadline):
    from axolotl_focus.train import losses as L

    c = ctx.sizes["check"]
    inputs = check_inputs(L, c)
    for name, case in loss_cases(L, c).items():
        ref = run_case(case, inputs, torch.device("cpu"), torch.float64)
        for dtype in (torch.float32, torch.bfloat16):
            got = run_case(case, inputs, ctx.device, dtype)
            errors = {k: rel(got[k], ref[k]) for k in ref if not k.startswith("grad_")}
            errors |= {k: float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
                       for k in ("grad_h", "grad_w")}
            tol = TOLERANCES[dtype]
            bound = {k: tol["grads" if k.startswith("grad_") else "probabilities" if k in PROBABILITY_SUMS
                            else "values"] for k in errors}
            bound["total"] = max(b for k, b in bound.items() if not k.startswith("grad_"))  # of its parts
            ok = all(e <= bound[k] for k, e in errors.items())
            worst = max((k for k in errors if not k.startswith("grad_")), key=lambda k: errors[k] / bound[k])
            line = (f"{'ok ' if ok else 'OFF'} {name:28s} {str(dtype)[6:]:8s} values rel {errors[worst]:.1e} "
                    f"(tol {bound[worst]:g}), grad_h {errors['grad_h']:.1e} grad_w {errors['grad_w']:.1e} "
                    f"(tol {tol['grads']:g})")
            yield {"loss": name, "dtype": str(dtype)[6:], "ok": ok, "errors": errors, "tolerance": bound,
                   "worst": worst,
                   "values": {k: got[k] for k in errors if not k.startswith("grad_")},
                   "reference": {k: ref[k] for k in errors if not k.startswith("grad_")}, "line": line}


# --------------------------------------------------------------------------------------------
# 2. loss speed (benchmarks/distill_loss.py)
# --------------------------------------------------------------------------------------------


def run_group(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """``(exit status, stderr)`` of ``cmd`` in its own process group, the whole group killed at
    ``timeout`` (status None): distill_loss.py's workers are its children."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, proc.communicate()[1]


def loss_speed(ctx, deadline):
    try:  # the import of distill_loss.py's Liger worker, made here where the absent modules are blocked
        import liger_kernel.chunked_loss  # noqa: F401

        impls, liger = "plain,fused,liger", "compiled" if ctx.device.type == "cuda" else "not compiled on CPU"
    except ImportError as exc:
        impls, liger = "plain,fused", f"skipped: {exc!r} (carry the liger-kernel wheel, see the docstring)"
    c = ctx.sizes["loss"]
    for vocab in c["vocabs"]:
        path = Path(ctx.tmp) / f"distill_loss_{vocab}.json"
        cmd = [sys.executable, str(BENCH / "distill_loss.py"), "--device", ctx.device.type, "--dtype", "bfloat16",
               "--tokens", str(c["tokens"]), "--hidden", str(c["hidden"]), "--vocabs", str(vocab), "--modes", "focus",
               "--impls", impls, "--repeats", str(c["repeats"]), "--json", str(path)]
        cmd += ["--chunk-size", str(c["chunk"])] if c["chunk"] else []
        cmd += ["--threads", str(ctx.threads)] if ctx.threads else []
        status, log = run_group(cmd, max(1.0, deadline - time.monotonic()))
        item = {"vocab": vocab, "tokens": c["tokens"], "hidden": c["hidden"], "dtype": "bfloat16",
                "liger": liger, "exit_status": status,
                "progress": [line for line in log.splitlines() if line.startswith("[")]}
        if status is None or not path.exists():
            item["error"] = "time limit: killed" if status is None else log[-2000:] or f"exit status {status}"
            item["line"] = f"V={vocab}: {item['error'].strip().splitlines()[-1]}; reached: {item['progress']}"
        else:
            data = json.loads(path.read_text())
            item["results"] = [{k: r.get(k) for k in ("impl", "mode", "peak_bytes", "time_s", "times_s", "method",
                                                      "total", "error")} for r in data["results"]]
            item["checks"] = data["checks"]
            item["line"] = f"V={vocab}: " + "; ".join(item["progress"])
        yield item


# --------------------------------------------------------------------------------------------
# 3. one training step
# --------------------------------------------------------------------------------------------


def train_step(ctx, deadline):
    from axolotl_focus.train import losses as L

    c, device = ctx.sizes["train"], ctx.device
    student = build_llama(ctx.sizes["model"], device, torch.bfloat16, seed=0).train()
    teacher = build_llama(ctx.sizes["model"], device, torch.bfloat16, seed=1).eval().requires_grad_(False)
    config = student.config
    ids = torch.randint(0, config.vocab_size, (c["batch"], c["seq"]), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    targets = F.pad(ids, (0, 1), value=-100)[:, 1:]
    valid = targets != -100
    n = int(valid.sum())
    head, t_head = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    focus, none = L.DistillSpec("focus", temperature=TAU), L.DistillSpec("none")
    chunk = 1024

    def hidden():  # the trainer's student pass
        return student(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states[-1]

    def teacher_hidden():  # the trainer's in-process teacher
        with torch.no_grad():
            return teacher.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state

    with torch.no_grad():  # the top-k cache of this batch, as the cache builder makes it and the reader returns it
        t_h = teacher_hidden()[valid]
        parts = [L.sparse_teacher_from_logits((t_h[i:i + chunk] @ t_head.T).float(), c["k"], TAU)
                 for i in range(0, n, chunk)]
        cache = L.SparseTeacher(torch.cat([p.ids for p in parts]).cpu(), torch.cat([p.logq for p in parts]).cpu(),
                                torch.cat([p.log_tail for p in parts]).cpu(), TAU)
        del t_h, parts

    def plain():
        logits = student(input_ids=ids, use_cache=False).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        ce, d = L.reference_ce_distill(logits.flatten(0, 1), t_logits.flatten(0, 1), targets.flatten(), focus)
        return (ce + TRAIN_ALPHA * d) / n

    ce_loss = L.FusedCEDistillLoss(none, ce_weight=1 / n, distill_weight=0.0, chunk_size=chunk)
    focus_loss = L.FusedCEDistillLoss(focus, ce_weight=1 / n, distill_weight=TRAIN_ALPHA / n, chunk_size=chunk)
    variants = {
        "CE, the model's own loss": lambda: student(input_ids=ids, labels=ids, use_cache=False).loss,
        "CE, fused": lambda: ce_loss(hidden()[valid], head, targets[valid]).total,
        "FOCUS, teacher in memory": lambda: focus_loss(
            hidden()[valid], head, targets[valid], teacher_hidden=teacher_hidden()[valid], teacher_head=t_head).total,
        f"FOCUS, top-{c['k']} cache": lambda: focus_loss(hidden()[valid], head, targets[valid],
                                                         teacher=cache.rows(0, n, device)).total,
        "teacher forward alone": teacher_hidden,
        "FOCUS, plain logits": plain,  # last: the largest peak, may not fit
    }
    flops_student, flops_teacher = (forward_flops(config, c["batch"], c["seq"]),) * 2  # the same shape
    limit = 1 + flops_teacher / (3 * flops_student)
    base = None
    for name, fn in variants.items():
        def step(fn=fn):
            try:
                loss = fn()
                if loss.requires_grad:
                    loss.backward()
                return loss.detach()
            finally:  # no optimizer: the gradients are dropped (also after an out-of-memory error)
                for p in student.parameters():
                    p.grad = None

        item = {"variant": name, "tokens": n, "flop_limit": limit if "teacher" in name or "plain" in name else 1.0}
        try:
            m, loss = measure(step, device, warmup=1, repeats=c["repeats"])
            item |= m
            if loss.numel() == 1:
                item["loss"] = float(loss)
        except torch.OutOfMemoryError as exc:
            item["error"] = f"out of memory: {str(exc).splitlines()[0][:200]}"
        base = base or (item if "error" not in item else None)
        if base and "error" not in item:
            item["time_over_ce"] = item["time_s"] / base["time_s"]
            item["memory_over_ce"] = item["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None
            if name == "teacher forward alone":
                item["flop_limit"] = limit
                item["measured_limit"] = 1 + item["time_over_ce"]
        item["line"] = f"{name}: " + (item.get("error") or (
            f"{item['time_s']:.3f} s, peak {mem(item['peak_bytes'])}, time/CE {item.get('time_over_ce', 0):.2f} "
            f"(FLOP limit {item['flop_limit']:.2f})"))
        yield item


# --------------------------------------------------------------------------------------------
# 4. pruning
# --------------------------------------------------------------------------------------------


def prune(ctx, deadline):
    from axolotl_focus.prune.importance import compute_importance
    from axolotl_focus.prune.width import prune_width

    c, device = ctx.sizes["prune"], ctx.device
    model = build_llama(ctx.sizes["model"], device, torch.float32, seed=0)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (c["samples"], c["seq"]),
                        generator=torch.Generator().manual_seed(0))
    settings = prune_settings(c["samples"], c["seq"])
    passes = (("importance, gradient hooks", lambda: compute_importance(model, None, ids, settings), 1),
              ("importance, all gradients held", lambda: compute_importance(model, None, ids, settings,
                                                                             hold_grads=True), 1),
              ("prune_width (importance + slicing)", lambda: prune_width(model, None, ids, settings,
                                                                            source_model="random weights"), 0))
    peaks = {}
    for name, fn, warmup in passes:  # prune_width last: it slices the model in place
        m, out = measure(fn, device, warmup=warmup, repeats=1)
        item = {"pass": name, "model_bytes": model_bytes, **m,
                "peak_with_model_bytes": None if m["peak_bytes"] is None else model_bytes + m["peak_bytes"]}
        peaks[name] = item["peak_with_model_bytes"]
        if name.startswith("prune_width"):
            item |= {"params_before": out.params_before, "params_after": out.params_after}
        if name == "importance, all gradients held" and peaks[passes[0][0]] and peaks[name]:
            item["hooks_over_all_grads"] = peaks[passes[0][0]] / peaks[name]
        item["line"] = (f"{name}: {m['time_s']:.2f} s, peak {mem(item['peak_with_model_bytes'])} with the model "
                        f"({mem(model_bytes)})" + (f", hooks / all gradients {item['hooks_over_all_grads']:.2f}"
                                                    if "hooks_over_all_grads" in item else ""))
        yield item


# --------------------------------------------------------------------------------------------
# 5. generation
# --------------------------------------------------------------------------------------------


def generate(ctx, deadline):
    from transformers import StoppingCriteriaList

    from axolotl_focus.generation import RowStopper, generate_batch

    c, device = ctx.sizes["generate"], ctx.device
    model = build_llama(ctx.sizes["model"], device, torch.bfloat16, seed=0).eval()
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    tokenizer = SimpleNamespace(eos_token_id=eos, pad_token_id=pad)  # all generate_batch reads of one
    g = torch.Generator().manual_seed(0)
    lo, hi = c["prompt"]
    prompts = [torch.randint(3, model.config.vocab_size, (int(length),), generator=g).tolist()
               for length in torch.randint(lo, hi + 1, (c["batch"],), generator=g)]
    budgets = torch.linspace(*c["budgets"], c["batch"]).round().int()[torch.randperm(c["batch"], generator=g)].tolist()
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    def ours(budgets=budgets):
        return generate_batch(model, tokenizer, prompts, budgets, do_sample=False)

    def hf(budgets=budgets):
        stopper = RowStopper(budgets, [eos])
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(budgets), do_sample=False,
                           stopping_criteria=StoppingCriteriaList([stopper]), pad_token_id=pad, eos_token_id=eos)
        return stopper

    tokens = {}
    for name, fn in (("generate_batch (rows leave the batch)", ours), ("HF generate (ended rows padded)", hf)):
        fn([2] * c["batch"])  # warm-up
        m, stopper = measure(fn, device, warmup=0, repeats=1)
        tokens[name] = stopper.tokens
        generated = sum(map(len, stopper.tokens))
        item = {"loop": name, "batch": c["batch"], "tokens": generated, "tokens_per_s": generated / m["time_s"],
                "steps": stopper.steps, "row_steps": stopper.row_steps, "padded_row_steps": stopper.padded_row_steps,
                "stops": {r: stopper.reason.count(r) for r in sorted(set(stopper.reason))}, **m}
        if len(tokens) == 2:
            first = next(iter(tokens.values()))
            item["rows_equal_to_generate_batch"] = sum(a == b for a, b in zip(first, stopper.tokens))
        item["line"] = (f"{name}: {generated} tokens in {m['time_s']:.2f} s = {item['tokens_per_s']:.0f} tokens/s, "
                        f"{stopper.row_steps} row-steps of {stopper.padded_row_steps}")
        yield item


# --------------------------------------------------------------------------------------------
# running, output
# --------------------------------------------------------------------------------------------


def run_section(name: str, fn, ctx, result: dict, write) -> None:
    """Run one section's items under its time limit, recording each item as it comes."""
    limit = max(0.0, min(LIMITS[name], ctx.budget_end - time.monotonic()))
    start = time.monotonic()
    record = result["sections"][name] = {"status": "running", "limit_s": round(limit), "items": []}
    if limit < 1:
        record["status"] = "skipped: no time left of --budget"
        print(f"[{ctx.clock():7.1f} s] {name}: {record['status']}", flush=True)
        return write()
    print(f"[{ctx.clock():7.1f} s] {name}: started (limit {limit:.0f} s)", flush=True)
    items = fn(ctx, start + limit)
    try:
        for item in items:
            record["items"].append(item)
            print(f"[{ctx.clock():7.1f} s] {name} | {item.get('line', '')}", flush=True)
            write()
            if time.monotonic() - start > limit:
                record["status"] = f"time limit after {len(record['items'])} items"
                break
        else:
            record["status"] = "done"
    except Exception:
        record["status"] = "error"
        record["error"] = traceback.format_exc()[-3000:]
        print(record["error"], flush=True)
    finally:
        items.close()
        record["elapsed_s"] = round(time.monotonic() - start, 1)
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[{ctx.clock():7.1f} s] {name}: {record['status']} ({record['elapsed_s']} s)", flush=True)
        write()


def header(args, device: torch.device) -> dict:
    import transformers

    try:
        from importlib.metadata import version

        liger = version("liger-kernel")
    except Exception:
        liger = None
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU: {cpu_name()}",
        "tiny": args.tiny, "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "liger_kernel": liger, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "cuda_bf16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction if cuda else None,
        "blocked_imports": [n for n in ABSENT_ON_GPU_MACHINE if n in sys.modules and sys.modules[n] is None],
        "model": ("LLaMA-3.2-1B shape" if not args.tiny else "tiny LLaMA") + ", random weights",
        "budget_s": args.budget, "limits_s": LIMITS,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:],
    }


def markdown(result: dict) -> str:
    """The Markdown report: one table per section, from the JSON."""
    h = result["header"]
    lines = [f"GPU check on **{h['device']}**{' (tiny shapes: CPU rehearsal)' if h['tiny'] else ''}; torch "
             f"{h['torch']}, CUDA {h['cuda']}, transformers {h['transformers']}, liger-kernel {h['liger_kernel']}; "
             f"{result.get('elapsed_s', '-')} s in all.", "",
             "| section | status | s | limit s |", "|---|---|---|---|"]
    sections = result["sections"]
    for name in SECTIONS:
        s = sections.get(name)
        lines.append(f"| {name} | {s['status'] if s else 'not run'} | {s.get('elapsed_s', '-') if s else '-'} | "
                     f"{s['limit_s'] if s else '-'} |")

    def table(name: str, title: str, head: list[str], row) -> None:
        items = sections.get(name, {}).get("items", [])
        if items:
            lines.extend(["", title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
            lines.extend("| " + " | ".join(str(x) for x in row(it)) + " |" for it in items)

    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    def ratio(a, b) -> str:
        return "-" if not a or not b else f"{a / b:.2f}"

    def cell(text: str) -> str:  # the last line of an error, fit for a table cell
        return (text.strip().splitlines() or ["-"])[-1].replace("|", "/")[:100]

    table("correctness", "1. Fused losses on the device vs the dense float64 reference (relative errors)",
          ["loss", "dtype", "ok", "worst value", "grad hidden", "grad head", "tolerance value / grads"],
          lambda it: [it["loss"], it["dtype"], "ok" if it["ok"] else "**OFF**",
                      f"{it['errors'][it['worst']]:.1e} ({it['worst']})", f"{it['errors']['grad_h']:.1e}",
                      f"{it['errors']['grad_w']:.1e}",
                      f"{it['tolerance'][it['worst']]:g} / {it['tolerance']['grad_h']:g}"])
    speed_rows = []
    for it in sections.get("loss_speed", {}).get("items", []):
        reached = "reached: " + ("; ".join(it["progress"]) or "-")
        results = it.get("results") or [{"impl": reached, "error": it["error"]}]
        plain = next((r for r in results if r["impl"] == "plain" and not r.get("error")), {})
        for r in results:
            name = r["impl"] + (f" ({it['liger']})" if r["impl"] == "liger" else "")
            if r.get("error"):
                speed_rows.append([it["vocab"], name, cell(r["error"]), "-", "-", "-"])
                continue
            speed_rows.append([it["vocab"], name, f"{r['time_s'] * 1e3:.1f}", mem(r["peak_bytes"]),
                               ratio(r["time_s"], plain.get("time_s")),
                               ratio(r["peak_bytes"], plain.get("peak_bytes"))])
        speed_rows.extend([[it["vocab"], f"check: {c['detail']}", "ok" if c["ok"] else "**OFF**", "", "", ""]
                           for c in it.get("checks", [])])
    if speed_rows:
        it0 = sections["loss_speed"]["items"][0]
        lines.extend(["", f"2. CE + FOCUS loss, forward + backward, N={it0['tokens']}, H={it0['hidden']}, bf16 "
                      f"(Liger: JSD + CE, not FOCUS; {it0['liger']})", "",
                      "| V | implementation | ms | peak | time / plain | memory / plain |",
                      "|---|---|---|---|---|---|"])
        lines.extend("| " + " | ".join(str(x) for x in r) + " |" for r in speed_rows)
    tokens = (sections.get("train_step", {}).get("items") or [{}])[0].get("tokens")
    table("train_step", f"3. One training step (forward + backward, no optimizer), {h['model']}, bf16, "
                        f"{tokens} trained tokens",
          ["variant", "s", "peak", "time / CE", "memory / CE", "FLOP limit", "loss"],
          lambda it: [it["variant"], num(it.get("time_s"), ".3f") if "error" not in it else cell(it["error"]),
                      mem(it.get("peak_bytes")), num(it.get("time_over_ce"), ".2f"),
                      num(it.get("memory_over_ce"), ".2f"),
                      f"{it['flop_limit']:.2f}" + (f" (time: {it['measured_limit']:.2f})" if "measured_limit" in it
                                                    else ""), num(it.get("loss"), ".4f")])
    table("prune", f"4. Width pruning, {h['model']}, fp32, gradient importance",
          ["pass", "s", "peak with model", "model", "hooks / all gradients", "params after / before"],
          lambda it: [it["pass"], f"{it['time_s']:.2f}", mem(it["peak_with_model_bytes"]), mem(it["model_bytes"]),
                      num(it.get("hooks_over_all_grads"), ".2f"),
                      f"{it['params_after']:,} / {it['params_before']:,}" if "params_after" in it else "-"])
    table("generate", f"5. Greedy generation, {h['model']}, bf16",
          ["loop", "batch", "tokens", "s", "tokens/s", "steps", "row-steps / rows x steps", "rows equal"],
          lambda it: [it["loop"], it["batch"], it["tokens"], f"{it['time_s']:.2f}", f"{it['tokens_per_s']:.0f}",
                      it["steps"], f"{it['row_steps']} / {it['padded_row_steps']}",
                      it.get("rows_equal_to_generate_batch", "-")])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU rehearsal)")
    parser.add_argument("--out", default=str(BENCH / "results" / "gpu_check"), help="folder of the JSON and Markdown")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in order")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all sections together")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = {"header": header(args, device), "sections": {}}

    def write():
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        (out / "gpu_check.md").write_text(markdown(result))

    print(f"GPU check on {result['header']['device']}: sections {', '.join(sections)}; output {out}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = SimpleNamespace(device=device, sizes=SIZES["tiny" if args.tiny else "full"], threads=args.threads,
                              tmp=tmp, budget_end=started + args.budget, clock=lambda: time.monotonic() - started)
        functions = {"correctness": correctness, "loss_speed": loss_speed, "train_step": train_step,
                     "prune": prune, "generate": generate}
        for name in sections:
            run_section(name, functions[name], ctx, result, write)
    write()
    print("\n" + markdown(result), flush=True)
    failed = [n for n, s in result["sections"].items() if s["status"] == "error"]
    off = [i["line"] for i in result["sections"].get("correctness", {}).get("items", []) if not i["ok"]]
    off += [c["detail"] for i in result["sections"].get("loss_speed", {}).get("items", []) for c in i.get("checks", [])
            if not c["ok"]]
    print(f"wrote {out / 'gpu_check.json'} and gpu_check.md in {result['elapsed_s']} s; "
          f"{len(off)} checks OFF, sections failed: {failed or 'none'}", flush=True)
    return 1 if failed or off else 0


if __name__ == "__main__":
    sys.exit(main())
