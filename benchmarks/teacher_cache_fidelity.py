"""What a top-k sparse teacher (a teacher-logit cache) costs in fidelity, on the real model.

A cached teacher keeps, per position, its top-k token ids with their ``log q`` at the training
temperature and the log of the remaining mass (:class:`axolotl_focus.train.losses.SparseTeacher`); the
loss is then the *bucketed* divergence (the k ids individually, every other token one tail bucket,
:func:`axolotl_focus.train.losses.reference_sparse_distill_per_token`). This script compares it with the
full-vocabulary objective (:func:`axolotl_focus.train.losses.reference_distill_per_token`) on the
teacher and a pruned student of the demo:

* teacher: SmolLM2-135M-Instruct (:func:`axolotl_focus.embedded_model.materialize`, vocabulary
  49,152); student: the teacher width-pruned as the demo's ``prune`` stage does (LLM-Pruner,
  25% of all parameters, q heads inside every KV group, layers 3-27, 10 calibration windows, seed
  0) through :func:`axolotl_focus.prune.cache.ensure_pruned` (``run_prune`` into the package's
  pruning cache, reused when present; ``--prune depth``: the demo's 9-block depth pruning);
* data: the demo's SFT text, the embedded WikiText-2 valid slice
  (:func:`axolotl_focus.micro.corpus_documents`), each document tokenized with the model's
  tokenizer and cut into sequences of at most ``--seq-len`` (256) tokens, taken in order until
  ``--positions`` predicted positions (T - 1 per sequence of T tokens) are collected;
* teacher and student forward in fp32 under ``torch.no_grad``; the losses per chunk of
  ``--chunk`` positions (``[chunk, V]`` fp32 buffers), their gradients w.r.t. the student logits
  by autograd on the per-token losses (the student logits are a leaf only there).

Reported for FOCUS (tau 2, beta 15, gamma 1) and KD (tau 2), for each k of ``--ks``:

* ``|L_k - L_full| / L_full`` of the loss summed over all positions;
* the per-token relative error ``|l_k - l_full| / l_full``: median and 95th percentile;
* ``||g_k - g_full||_F / ||g_full||_F`` and the cosine of g_k and g_full, g = d(sum of the
  per-token losses) / d(student logits) over all positions;
* the teacher mass the top-k covers, ``1 - r``, at tau 2 (mean, 5th percentile over positions)
  and at tau 1;
* the analytic cache size per million positions: int32 ids + float32 logq + float32 log_tail
  (``8k + 4`` bytes), with float16 logq (``6k + 4``), and, since V < 65,536, uint16 ids + float16
  logq (``4k + 4``); next to the dense bf16 logits (``2V``).

By the log-sum inequality the bucketed KD is <= the full KD, and top-k sets are nested, so the KD
loss error can only shrink as k grows; with k = V (``--ks ... V``) both objectives are the same
function (errors at fp32 rounding).

    python benchmarks/teacher_cache_fidelity.py                         # real model, 4096 positions
    python benchmarks/teacher_cache_fidelity.py --ks 8 32 128 512 V --json out.json
    python benchmarks/teacher_cache_fidelity.py --quick                 # tiny local LLaMA (CI, seconds)

``--quick`` builds a micro LLaMA teacher (byte-level BPE vocabulary of 384, 4 layers, pretrained
300 steps on the same slice) in a temporary folder, width-prunes it with ``run_prune`` (the micro
demo's settings: whole KV groups, layers 1-2) and measures 512 positions with k = 4, 16, 64 and
V: the same code path as the full run, small enough for CI, independent of the real model's wheel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu import cpu_name  # noqa: E402

from axolotl_focus.files import write_json  # noqa: E402
from axolotl_focus.train.losses import (  # noqa: E402
    DistillSpec,
    reference_distill_per_token,
    reference_sparse_distill_per_token,
    sparse_teacher_from_logits,
)

MODES = ("focus", "kd")
MASS_TEMPERATURES = (2.0, 1.0)
FULL_KS = ("8", "32", "128", "512")
QUICK_KS = ("4", "16", "64", "V")


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


def prune_spec(kind: str, quick: bool, layers: int):
    """The demo's pruning settings (:meth:`axolotl_focus.demo.stages.Demo._run_prune`) for the real
    model, or for the micro model with ``quick``."""
    from axolotl_focus.prune.settings import PruneSettings

    if kind == "depth":
        return PruneSettings(method="depth", num_blocks=1 if quick else 9, protected_first=1, protected_last=1,
                              calib_samples=4 if quick else 10, seed=0, device="cpu")
    span = [1, layers - 1] if quick else [3, 28]
    return PruneSettings(target_param_reduction=0.25, attn_layers=span, mlp_layers=span,
                          gqa_mode="group" if quick else "q_within_group", calib_samples=4 if quick else 10,
                          seed=0, device="cpu")


def load_models(args, workdir: Path):
    """``(teacher, student, tokenizer, info)``: fp32, eval mode, on CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import axolotl_focus  # noqa: F401  (registers the pruned LLaMA classes)
    from axolotl_focus.prune.cache import REPORT_FILE, ensure_pruned, run_prune

    started = time.perf_counter()
    if args.quick:
        from axolotl_focus.micro import build_micro_teacher

        teacher_path, _ = build_micro_teacher(workdir / "teacher", steps=300, seed=0, vocab_size=384,
                                              progress=False, layers=4)
        teacher_name = "micro LLaMA (4 layers, hidden 64, GQA 4/2, byte-level BPE vocab 384, 300 steps on the slice)"
    else:
        from axolotl_focus.embedded_model import materialize

        teacher_path = str(materialize())
        teacher_name = f"SmolLM2-135M-Instruct ({teacher_path})"
    teacher_s = time.perf_counter() - started
    layers = AutoConfig.from_pretrained(teacher_path).num_hidden_layers
    spec = prune_spec(args.prune, args.quick, layers)
    started = time.perf_counter()
    if args.quick:
        student_path = workdir / f"student-{args.prune}"
        run_prune(teacher_path, spec, student_path)
    else:
        student_path = ensure_pruned(teacher_path, spec)
    prune_s = time.perf_counter() - started
    report = json.loads((Path(student_path) / REPORT_FILE).read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32).eval()
    info = {
        "teacher": teacher_name,
        "teacher_path": str(teacher_path),
        "student_path": str(student_path),
        "vocab": int(teacher.config.vocab_size),
        "pruning": {"method": args.prune, "spec": spec.model_dump(exclude={"cache_dir", "wait_timeout"}),
                    "params_before": report["params_before"], "params_after": report["params_after"],
                    "reduction": report["achieved_reduction"], "removed_blocks": report.get("removed_blocks")},
        "teacher_s": teacher_s,
        "prune_or_reuse_s": prune_s,
    }
    if student.config.vocab_size != teacher.config.vocab_size:
        raise SystemExit("student and teacher vocabularies differ")
    return teacher, student, tokenizer, info


def sequences(tokenizer, positions: int, seq_len: int, min_len: int = 16) -> list[list[int]]:
    """The valid slice's documents tokenized (the tokenizer's own special tokens) and cut into
    sequences of <= ``seq_len`` tokens, in order, until ``positions`` predicted positions; the
    last sequence is shortened to hit ``positions`` exactly."""
    from axolotl_focus.micro import corpus_documents

    out, total = [], 0
    for doc in corpus_documents("valid"):
        ids = tokenizer(doc)["input_ids"]
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len]
            if len(piece) < min_len:
                continue
            piece = piece[: positions - total + 1]
            out.append(piece)
            total += len(piece) - 1
            if total >= positions:
                return out
    raise SystemExit(f"the slice has only {total} positions in sequences of >= {min_len} tokens; asked {positions}")


def parse_ks(values: list[str], vocab: int) -> list[int]:
    ks = sorted({vocab if str(v).lower() in ("v", "vocab") else int(v) for v in values})
    if not ks or ks[0] < 1 or ks[-1] > vocab:
        raise SystemExit(f"--ks: each k must be in [1, {vocab}] (or V), got {values}")
    return ks


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _grad(loss_fn, zs: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-token loss [c], d sum / d logits [c, V])`` of ``loss_fn(logits, *args)``, the student
    logits the only leaf."""
    leaf = zs.detach().clone().requires_grad_(True)
    per_token = loss_fn(leaf, *args)
    (grad,) = torch.autograd.grad(per_token.sum(), leaf)
    return per_token.detach(), grad


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sum(a.double() * b.double()))


def measure(teacher, student, seqs: list[list[int]], ks: list[int], specs: dict[str, DistillSpec], chunk: int,
            timings: dict) -> dict:
    """Stream the sequences through both models and accumulate every statistic."""
    tau = next(iter(specs.values())).temperature
    full_tok = {m: [] for m in specs}
    sparse_tok = {m: {k: [] for k in ks} for m in specs}
    sums = {m: {"g_full2": 0.0, **{k: {"diff2": 0.0, "dot": 0.0, "g2": 0.0} for k in ks}} for m in specs}
    mass = {t: {k: [] for k in ks} for t in MASS_TEMPERATURES}
    for key in ("forward_s", "full_loss_s", "sparse_teacher_s", "sparse_loss_s"):
        timings.setdefault(key, 0.0)
    for ids in seqs:
        x = torch.tensor([ids])
        start = time.perf_counter()
        with torch.no_grad():
            zt_all = teacher(input_ids=x, use_cache=False).logits[0, :-1].float()
            zs_all = student(input_ids=x, use_cache=False).logits[0, :-1].float()
        timings["forward_s"] += time.perf_counter() - start
        for lo in range(0, zt_all.shape[0], chunk):
            zt, zs = zt_all[lo : lo + chunk], zs_all[lo : lo + chunk]
            start = time.perf_counter()
            with torch.no_grad():
                sparse = {k: sparse_teacher_from_logits(zt, k, tau) for k in ks}
                for t in MASS_TEMPERATURES:
                    for k in ks:
                        log_tail = sparse[k].log_tail if t == tau else sparse_teacher_from_logits(zt, k, t).log_tail
                        mass[t][k].append((-torch.expm1(log_tail.double())).float())  # 1 - r
            timings["sparse_teacher_s"] += time.perf_counter() - start
            for mode, spec in specs.items():
                start = time.perf_counter()
                l_full, g_full = _grad(reference_distill_per_token, zs, zt, spec)
                timings["full_loss_s"] += time.perf_counter() - start
                full_tok[mode].append(l_full)
                sums[mode]["g_full2"] += _dot(g_full, g_full)
                start = time.perf_counter()
                for k in ks:
                    l_k, g_k = _grad(reference_sparse_distill_per_token, zs, sparse[k], spec)
                    sparse_tok[mode][k].append(l_k)
                    acc = sums[mode][k]
                    acc["diff2"] += _dot(g_k - g_full, g_k - g_full)
                    acc["dot"] += _dot(g_k, g_full)
                    acc["g2"] += _dot(g_k, g_k)
                    del g_k
                timings["sparse_loss_s"] += time.perf_counter() - start
                del g_full
    rows, coverage = [], []
    for mode in specs:
        l_full = torch.cat(full_tok[mode]).double()
        total_full = float(l_full.sum())
        for k in ks:
            l_k = torch.cat(sparse_tok[mode][k]).double()
            rel = ((l_k - l_full).abs() / l_full.clamp(min=1e-30)).numpy()
            acc = sums[mode][k]
            g_full_norm = math.sqrt(sums[mode]["g_full2"])
            rows.append({
                "mode": mode, "k": k, "loss_full": total_full, "loss_k": float(l_k.sum()),
                "loss_rel_err": abs(float(l_k.sum()) - total_full) / total_full,
                "token_rel_err_median": float(np.quantile(rel, 0.5)),
                "token_rel_err_p95": float(np.quantile(rel, 0.95)),
                "grad_rel_err": math.sqrt(acc["diff2"]) / g_full_norm,
                "grad_cosine": acc["dot"] / (math.sqrt(acc["g2"]) * g_full_norm),
                "bucketed_le_full_tokens": float((l_k <= l_full * (1 + 1e-5) + 1e-7).double().mean()),
            })
    for k in ks:
        entry = {"k": k}
        for t in MASS_TEMPERATURES:
            m = torch.cat(mass[t][k]).double().numpy()
            entry[f"tau{t:g}_mean"] = float(m.mean())
            entry[f"tau{t:g}_p5"] = float(np.quantile(m, 0.05))
            entry[f"tau{t:g}_min"] = float(m.min())
        coverage.append(entry)
    return {"fidelity": rows, "coverage": coverage}


def cache_sizes(ks: list[int], vocab: int) -> list[dict]:
    """Bytes per position -> MB (10^6 bytes) per million positions = bytes per position."""
    rows = [{"k": k, "int32_fp32_fp32": 8 * k + 4, "int32_fp16_fp32": 6 * k + 4,
             "uint16_fp16_fp32": 4 * k + 4 if vocab <= 65536 else None} for k in ks]
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def _mb(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes:,} MB" if nbytes < 10_000 else f"{nbytes / 1000:,.1f} GB"


def report(result: dict) -> str:
    h, lines = result["header"], []
    p = h["pruning"]
    lines += [
        "# Teacher-cache fidelity: top-k sparse teacher vs full vocabulary",
        "",
        f"- teacher: {h['teacher']}; vocabulary {h['vocab']:,}",
        f"- student: {p['method']}-pruned teacher ({p['params_before'] / 1e6:.2f} M -> {p['params_after'] / 1e6:.2f} M "
        f"parameters, {p['reduction']:.1%} fewer"
        + (f", blocks {p['removed_blocks']} removed" if p.get("removed_blocks") else "")
        + f"); spec: {json.dumps({k: v for k, v in p['spec'].items() if v is not None}, sort_keys=True)}",
        f"- data: WikiText-2 valid slice (embedded), {h['sequences']} sequences of <= {h['seq_len']} tokens, "
        f"{h['positions']:,} positions; fp32; loss chunks of {h['chunk']} positions",
        f"- losses: FOCUS (tau {h['temperature']:g}, beta {h['beta']:g}, gamma {h['gamma']:g}), KD (tau "
        f"{h['temperature']:g}); bucketed (top-k + one tail bucket, tail weight 1) vs full vocabulary",
        f"- threads {h['threads']}; seed {h['seed']}; torch {h['torch']}; {h['cpu']}; load average "
        f"{h['load_before']} -> {h['load_after']}; wall time {h['wall_s']:.1f} s "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in h['timings'].items())})",
        "",
        "## Teacher mass covered by the top-k (1 - r)",
        "",
        "| k | tau 2 mean | tau 2 p5 | tau 2 min | tau 1 mean | tau 1 p5 | tau 1 min |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["coverage"]:
        lines.append(f"| {c['k']} | {c['tau2_mean']:.4f} | {c['tau2_p5']:.4f} | {c['tau2_min']:.4f} | "
                     f"{c['tau1_mean']:.4f} | {c['tau1_p5']:.4f} | {c['tau1_min']:.4f} |")
    lines += [
        "",
        "## Fidelity of the bucketed loss and its gradient w.r.t. the student logits",
        "",
        "| loss | k | summed loss rel. err | per-token rel. err median | per-token p95 | grad rel. err (Frobenius) "
        "| grad cosine |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["fidelity"]:
        lines.append(f"| {r['mode'].upper() if r['mode'] == 'kd' else 'FOCUS'} | {r['k']} | "
                     f"{_fmt(r['loss_rel_err'])} | "
                     f"{_fmt(r['token_rel_err_median'])} | {_fmt(r['token_rel_err_p95'])} | {_fmt(r['grad_rel_err'])} "
                     f"| {r['grad_cosine']:.6f} |")
    full = {r["mode"]: r["loss_full"] for r in result["fidelity"]}
    lines += ["", "Full-vocabulary sums over all positions: "
              + ", ".join(f"{m.upper() if m == 'kd' else 'FOCUS'} {v:.6g} ({v / h['positions']:.4g} per position)"
                          for m, v in full.items()), ""]
    lines += [
        "## Cache size per million positions (analytic; MB = 10^6 bytes)",
        "",
        "| k | int32 ids + fp32 logq + fp32 log_tail (8k+4 B) | int32 + fp16 logq + fp32 (6k+4 B) "
        "| uint16 ids + fp16 logq + fp32 (4k+4 B) |",
        "|---:|---:|---:|---:|",
    ]
    for c in result["cache_sizes"]:
        lines.append(f"| {c['k']} | {_mb(c['int32_fp32_fp32'])} | {_mb(c['int32_fp16_fp32'])} | "
                     f"{_mb(c['uint16_fp16_fp32'])} |")
    lines += ["", f"Dense teacher logits for comparison: bf16 {_mb(2 * h['vocab'])}, fp32 {_mb(4 * h['vocab'])} "
              "per million positions (uint16 ids need V <= 65,536).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny local LLaMA, 512 positions, k = 4 16 64 V (CI)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--positions", type=int, default=None, help="predicted positions (default 4096; quick 512)")
    parser.add_argument("--ks", nargs="+", default=None,
                        help="top-k sizes; 'V' = the whole vocabulary (default 8 32 128 512; quick 4 16 64 V)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (at most)")
    parser.add_argument("--chunk", type=int, default=256, help="positions per loss chunk ([chunk, V] fp32 buffers)")
    parser.add_argument("--prune", choices=("width", "depth"), default="width",
                        help="the student: the demo's width (default) or depth pruning of the teacher")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--beta", type=float, default=15.0)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.chunk < 1:
        parser.error("--threads and --chunk must be >= 1")
    args.positions = args.positions or (512 if args.quick else 4096)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="teacher_cache_fidelity-") as tmp:
        teacher, student, tokenizer, info = load_models(args, Path(tmp))
    ks = parse_ks(args.ks or list(QUICK_KS if args.quick else FULL_KS), info["vocab"])
    seqs = sequences(tokenizer, args.positions, args.seq_len)
    specs = {m: DistillSpec(mode=m, temperature=args.temperature, beta=args.beta, gamma=args.gamma) for m in MODES}
    timings = {"teacher_load_s": info.pop("teacher_s"), "prune_or_reuse_s": info.pop("prune_or_reuse_s")}
    print(f"{info['teacher']}; student {info['student_path']}; {len(seqs)} sequences, {args.positions} positions, "
          f"k = {ks}, {args.threads} thread(s)", flush=True)
    result = measure(teacher, student, seqs, ks, specs, args.chunk, timings)
    result["cache_sizes"] = cache_sizes(ks, info["vocab"])
    result["header"] = {
        **info, "quick": args.quick, "positions": sum(len(s) - 1 for s in seqs), "sequences": len(seqs),
        "seq_len": args.seq_len, "chunk": args.chunk, "ks": ks, "threads": args.threads, "seed": args.seed,
        "temperature": args.temperature, "beta": args.beta, "gamma": args.gamma, "torch": torch.__version__,
        "cpu": cpu_name(), "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": time.perf_counter() - started, "timings": {k: round(v, 2) for k, v in timings.items()},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    print(report(result), flush=True)
    if args.json:
        write_json(args.json, result, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
