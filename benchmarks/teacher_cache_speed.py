"""What training FOCUS from a teacher-logit cache costs, next to the in-process teacher, on the real model.

Everything is measured side by side in one run:

* teacher: SmolLM2-135M-Instruct (:func:`axolotl_focus.embedded_model.materialize`, vocabulary
  49,152, fp32); student: its width-pruned copy of the demo (the settings of
  ``benchmarks/teacher_cache_fidelity.py``'s :func:`prune_spec`: LLM-Pruner, 25% of all parameters,
  q heads inside every KV group, layers 3-27, 10 calibration windows, seed 0) through
  :func:`axolotl_focus.prune.cache.ensure_pruned` (reused when already in the pruning cache);
* data: the embedded WikiText-2 valid slice (:func:`axolotl_focus.micro.corpus_documents`), each
  document tokenized with the model's tokenizer, all concatenated and cut into full windows of
  ``--seq-len`` (256) tokens; labels = input_ids, attention mask all ones (no padding). Step i
  trains on the i-th batch of ``--batch`` windows; the caches hold exactly the windows trained on.

(1) Cache build: :func:`axolotl_focus.train.teacher_cache.build.build_cache` (teacher already loaded, batches of
    ``--build-batch``) for each k of ``--ks`` (32, 512) over the training windows, and for k = V
    over the first ``--v-sequences`` (2) windows only (a full-vocabulary cache is ~393 kB per
    position; build only, no training step; 0 skips it). Reported: build time per 1,000 trained
    positions (teacher forward, top-k, arrow write), the folder's size on disk
    (:func:`axolotl_focus.train.teacher_cache.cli.folder_size`: every file, cache.json and the datasets
    metadata included) per position and per million positions, next to the format's ``8k + 4``
    bytes per position.
(2) One optimizer step (full fine-tuning of every student weight in fp32, AdamW lr 1e-5; no LoRA,
    nothing frozen) on the trainer's loss path (``FocusTrainer.compute_loss`` without axolotl:
    the student's last hidden states with ``logits_to_keep=1``, then
    :class:`axolotl_focus.train.losses.FusedCEDistillLoss` over the valid positions with the trainer's
    defaults: alpha 0.05, CE weight 1, tau 2, beta 15, gamma 1, chunks of 1024, per-token mean):

    - ``ce``: CE only (``focus_distill: none``; no teacher at all): the limit;
    - ``teacher``: FOCUS with the in-process teacher (loaded in the worker, frozen): its decoder's
      last hidden states under ``no_grad`` on the batch's rows, then the fused loss with the
      teacher hidden states and lm_head;
    - ``cache k``: FOCUS from the cache (``TeacherCache.open`` once, then per step
      ``sparse_for_batch(input_ids, labels, attention_mask)`` and the fused loss with
      ``teacher=sparse``); the teacher is never loaded.

    Each variant runs in its own subprocess (same imports in all, glibc's mmap threshold pinned as
    in ``benchmarks/prune_memory.py`` so that freed tensors leave the RSS): ``--warmup`` (1) steps,
    then ``--steps`` (3) timed steps; reported: the median step time and its phases (student
    forward, teacher forward or cache lookup, fused loss, backward, optimizer), the ratio to the
    CE-only worker's median, the CE and distillation terms of the first step (same weights, same
    batch in every variant), and the subprocess's peak RSS (VmHWM over its whole life: imports, the
    student, the in-process teacher or the memory-mapped cache, AdamW states, activations), next
    to its RSS after the imports, after loading and after the warm-up step(s) (anonymous + file
    pages: ``from_pretrained`` memory-maps fp32 safetensors, so weights become resident on first use).

    Each FOCUS worker also runs a CE-only step on the same batch next to each of its own steps
    (the two alternate which goes first; ``--no-paired`` turns this off): the ratio to that
    same-process median is paired, so a load change on a shared machine between the workers does
    not enter it. These CE-only steps train the same student too (the FOCUS warm-up step runs first,
    on the initial weights); they need less memory than a FOCUS step, so they do not raise the peak.

The machine may be shared: compare only numbers from one run (the load average is printed).

    python benchmarks/teacher_cache_speed.py                       # real model (minutes)
    python benchmarks/teacher_cache_speed.py --batch 2 --steps 2 --json out.json
    python benchmarks/teacher_cache_speed.py --quick               # micro LLaMA (CI, < 1 min)

``--quick``: a micro LLaMA teacher from :mod:`axolotl_focus.micro` (byte-level BPE vocabulary of
384, 8 layers, hidden 512, GQA 8/4, 2 pretraining steps: about 100 MB of fp32 weights, so that the
teacher's weights stand out of the RSS noise), width-pruned with ``run_prune`` at the micro demo's
settings, windows of 64 tokens, batch 2, k = 8 and 64 (V = 384 on 4 windows), 1 + 2 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from cpu import cpu_name  # noqa: E402
from peak_rss import status_kb  # noqa: E402

MIB = 2**20
ALPHA, CE_ALPHA, TEMPERATURE, BETA, GAMMA, CHUNK, LR = 0.05, 1.0, 2.0, 15.0, 1.0, 1024, 1e-5
QUICK_SIZE = {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 4, "intermediate": 1536}
PHASES = ("student_forward", "teacher", "loss", "backward", "optimizer")


def _heavy_imports():
    """The same modules in every worker (so that their RSS after imports is comparable)."""
    import datasets  # noqa: F401  (the cache reader's; imported by every variant alike)
    import numpy  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import axolotl_focus  # noqa: F401  (registers the pruned LLaMA classes)
    from axolotl_focus.train import losses  # noqa: F401
    from axolotl_focus.train.teacher_cache import build, reader  # noqa: F401

    return torch


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, tied tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------
# Worker: one variant's training steps in its own process
# --------------------------------------------------------------------------------------------


def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    load_start = [round(x, 2) for x in os.getloadavg()]
    torch = _heavy_imports()
    import numpy as np
    from transformers import AutoModelForCausalLM

    from axolotl_focus.train.losses import IGNORE_INDEX, DistillSpec, FusedCEDistillLoss
    from axolotl_focus.train.teacher_cache.reader import TeacherCache

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    rss_imports = status_kb("VmRSS")
    variant = spec["variant"]
    started = time.perf_counter()
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    student.requires_grad_(True)
    student.train()
    student_load_s = time.perf_counter() - started
    teacher = cache = None
    started = time.perf_counter()
    if variant == "teacher":
        teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32).eval()
        teacher.requires_grad_(False)
    elif variant == "cache":
        cache = TeacherCache.open(spec["cache"])
    teacher_load_s = time.perf_counter() - started
    rss_loaded = status_kb("VmRSS")
    data = np.load(spec["data"])
    batch, steps, warmup = spec["batch"], spec["steps"], spec["warmup"]
    head = student.get_output_embeddings().weight
    t_head = teacher.get_output_embeddings().weight if teacher is not None else None
    mode = "none" if variant == "ce" else "focus"
    losses = {focus: FusedCEDistillLoss(DistillSpec(mode if focus else "none", TEMPERATURE, BETA, GAMMA),
                                        ce_weight=CE_ALPHA, distill_weight=ALPHA, chunk_size=CHUNK)
              for focus in (False, True)}
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR)

    def step(index: int, focus: bool) -> dict:
        rows = data[index * batch: (index + 1) * batch]
        input_ids = torch.from_numpy(rows.astype(np.int64))
        labels = input_ids.clone()
        attention_mask = torch.ones_like(input_ids)
        t0 = time.perf_counter()
        targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        out = student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                      logits_to_keep=1, use_cache=False)
        hidden = out.hidden_states[-1]
        valid = targets != IGNORE_INDEX
        tokens = int(valid.sum())
        scale = 1.0 / max(tokens, 1)
        t1 = time.perf_counter()
        t_hidden = sparse = None
        if focus and teacher is not None:
            sft_rows = valid.any(-1)
            with torch.no_grad():
                t_hidden = teacher.get_decoder()(input_ids=input_ids[sft_rows], attention_mask=attention_mask[sft_rows],
                                                 use_cache=False).last_hidden_state[valid[sft_rows]]
        elif focus and cache is not None:
            sparse = cache.sparse_for_batch(input_ids, labels, attention_mask)
        t2 = time.perf_counter()
        loss, sums = losses[focus](hidden[valid], head, targets[valid], teacher_hidden=t_hidden,
                                   teacher_head=t_head if t_hidden is not None else None, teacher=sparse, scale=scale)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        times = dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True))
        return {"seconds": t5 - t0, "phases": times, "tokens": tokens, "loss": float(loss.detach()),
                "ce": float(sums["ce"]) / tokens, "distill": float(sums["distill"]) / tokens}

    # FOCUS workers also time CE-only steps, interleaved with theirs (same process, same load): the
    # paired ratio; warm-up FOCUS first, so that the first FOCUS step sees the initial weights
    focus = variant != "ce"
    paired = focus and spec["paired"]
    runs, ce_runs = [], []
    for i in range(warmup):
        runs.append(step(i, focus))
        if paired:
            ce_runs.append(step(i, False))
    rss_warm = {key: status_kb(key) * 1024 for key in ("VmRSS", "RssAnon", "RssFile")}
    for i in range(warmup, warmup + steps):
        kinds = ((True, False) if i % 2 == 0 else (False, True)) if paired else (focus,)
        for kind in kinds:  # alternating which goes first
            (runs if kind == focus else ce_runs).append(step(i, kind))
    timed = runs[warmup:] or runs
    ce_timed = ce_runs[warmup:] or ce_runs
    result = {
        "variant": variant, "k": spec.get("k"), "teacher_loaded": teacher is not None,
        "cache_opened": cache is not None, "student_load_s": student_load_s, "teacher_or_cache_load_s": teacher_load_s,
        "rss_after_imports": rss_imports * 1024, "rss_after_load": rss_loaded * 1024,
        "rss_after_warmup": rss_warm["VmRSS"], "rss_anon_after_warmup": rss_warm["RssAnon"],
        "rss_file_after_warmup": rss_warm["RssFile"],
        "peak_rss": status_kb("VmHWM") * 1024, "peak_method": "VmHWM (whole process)",
        "median_s": statistics.median(r["seconds"] for r in timed),
        "phases_median_s": {p: statistics.median(r["phases"][p] for r in timed) for p in PHASES},
        "steps": runs, "warmup": warmup, "tokens_per_step": runs[0]["tokens"],
        "paired_ce_median_s": statistics.median(r["seconds"] for r in ce_timed) if ce_timed else None,
        "paired_ce_steps": ce_runs,
        "first": {k: runs[0][k] for k in ("loss", "ce", "distill")},
        "finite": all(math.isfinite(r[k]) for r in runs + ce_runs for k in ("loss", "ce", "distill")),
        "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "load_at_start": load_start,
    }
    Path(spec["out"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


# --------------------------------------------------------------------------------------------
# Main process: models, data, cache builds, workers
# --------------------------------------------------------------------------------------------


def models(args, workdir: Path) -> dict:
    """Paths of the teacher and its demo-pruned student, and their descriptions."""
    from teacher_cache_fidelity import prune_spec  # the demo's pruning settings
    from transformers import AutoConfig

    from axolotl_focus.prune.cache import REPORT_FILE, ensure_pruned, run_prune

    started = time.perf_counter()
    if args.quick:
        from axolotl_focus.micro import build_micro_teacher

        teacher_path, _ = build_micro_teacher(workdir / "teacher", steps=2, seed=0, vocab_size=384, progress=False,
                                              **QUICK_SIZE)
        name = (f"micro LLaMA ({QUICK_SIZE['layers']} layers, hidden {QUICK_SIZE['hidden']}, GQA "
                f"{QUICK_SIZE['heads']}/{QUICK_SIZE['kv_heads']}, byte-level BPE vocab 384, 2 pretraining steps)")
    else:
        from axolotl_focus.embedded_model import materialize

        teacher_path = str(materialize())
        name = "SmolLM2-135M-Instruct"
    layers = AutoConfig.from_pretrained(teacher_path).num_hidden_layers
    spec = prune_spec("width", args.quick, layers)
    if args.quick:
        student_path = workdir / "student"
        run_prune(teacher_path, spec, student_path)
    else:
        student_path = ensure_pruned(teacher_path, spec)
    report = json.loads((Path(student_path) / REPORT_FILE).read_text(encoding="utf-8"))
    return {"teacher": name, "teacher_path": str(teacher_path), "student_path": str(student_path),
            "params_teacher": report["params_before"], "params_student": report["params_after"],
            "pruning": spec.model_dump(exclude={"cache_dir", "wait_timeout"}),
            "setup_s": time.perf_counter() - started}


def windows(tokenizer, seq_len: int, count: int):
    """``count`` full windows of ``seq_len`` tokens of the concatenated, tokenized valid slice."""
    import numpy as np

    from axolotl_focus.micro import corpus_documents

    ids = []
    for doc in corpus_documents("valid"):
        ids += tokenizer(doc)["input_ids"]
        if len(ids) >= count * seq_len:
            return np.asarray(ids[: count * seq_len], dtype=np.int32).reshape(count, seq_len)
    raise SystemExit(f"the slice has {len(ids)} tokens: fewer than {count} windows of {seq_len}")


def build(teacher, tokenizer, teacher_path: str, data, k: int, folder: Path, build_batch: int) -> dict:
    from axolotl_focus.train.teacher_cache.build import build_cache
    from axolotl_focus.train.teacher_cache.cli import folder_size

    rows = [(r.tolist(), r.tolist()) for r in data]
    started = time.perf_counter()
    meta = build_cache(teacher, rows, folder, k=k, temperature=TEMPERATURE, batch_size=build_batch,
                       progress=False, teacher_name=teacher_path, tokenizer=tokenizer)
    seconds = time.perf_counter() - started
    size = folder_size(folder)
    data_bytes = (8 * k + 4) * meta.positions
    return {"k": k, "sequences": meta.sequences, "positions": meta.positions, "shards": meta.shards,
            "build_s": seconds, "s_per_1k_positions": seconds / meta.positions * 1000, "bytes": size,
            "format_bytes": data_bytes, "overhead_bytes": size - data_bytes,
            "bytes_per_position": size / meta.positions, "format_bytes_per_position": 8 * k + 4,
            "mb_per_million_positions": size / meta.positions, "ratio_to_format": size / data_bytes}


def run_worker(spec: dict, workdir: Path, label: str) -> dict:
    spec_path = workdir / f"worker-{label}.json"
    spec["out"] = str(workdir / f"result-{label}.json")
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    # glibc's dynamic mmap threshold keeps freed large blocks resident (benchmarks/prune_memory.py)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(spec_path)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode or not Path(spec["out"]).is_file():
        raise SystemExit(f"worker {label} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    result = json.loads(Path(spec["out"]).read_text(encoding="utf-8"))
    result["wall_s"] = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f}"


def _size(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def label_of(r: dict) -> str:
    names = {"ce": "CE only (limit)", "teacher": "FOCUS, in-process teacher"}
    return names.get(r["variant"], f"FOCUS, cache k={r['k']}")


def markdown(result: dict) -> str:
    h = result["header"]
    lines = [
        "# Teacher cache vs in-process teacher: build cost, size, training step time and peak RSS",
        "",
        f"- model: teacher {h['teacher']} ({h['params_teacher'] / 1e6:.2f} M parameters, fp32 weights "
        f"{h['teacher_weight_bytes'] / MIB:,.0f} MiB); student: its demo width-pruned copy "
        f"({h['params_student'] / 1e6:.2f} M parameters), vocabulary {h['vocab']:,}",
        f"- training: full fine-tuning of all {h['trainable_parameters'] / 1e6:.2f} M student weights, fp32, AdamW "
        f"(lr {LR:g}); FOCUS tau {TEMPERATURE:g}, beta {BETA:g}, gamma {GAMMA:g}, alpha {ALPHA:g}, loss chunks "
        f"{CHUNK}; batch {h['batch']} x seq len {h['seq_len']} ({h['tokens_per_step']} trained positions per step); "
        f"{h['warmup']} warm-up + {h['steps']} timed steps per variant, each variant in its own subprocess",
        f"- data: WikiText-2 valid slice (embedded), {h['windows']} windows of {h['seq_len']} tokens, labels = "
        f"input_ids; ks {h['ks']} (k = V = {h['vocab']:,} built on {h['v_sequences']} windows only"
        f"{', skipped' if not h['v_sequences'] else ''})",
        f"- threads {h['threads']}; torch {h['torch']}; {h['cpu']}; load average {h['load_before']} -> "
        f"{h['load_after']}; wall time {h['wall_s']:.0f} s (setup {h['setup_s']:.0f} s)",
        "",
        f"## Cache build (teacher loaded; build_cache batches of {h['build_batch']} sequences)",
        "",
        "| k | sequences | positions | build s | s per 1k positions | size on disk | B per position | 8k+4 B "
        "| measured / (8k+4) | MB per million positions |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in result["build"]:
        lines.append(f"| {b['k']:,} | {b['sequences']} | {b['positions']:,} | {b['build_s']:.2f} | "
                     f"{b['s_per_1k_positions']:.2f} | {_size(b['bytes'])} | {b['bytes_per_position']:,.1f} | "
                     f"{b['format_bytes_per_position']:,} | {b['ratio_to_format']:.4f} | "
                     f"{b['mb_per_million_positions']:,.0f} |")
    ce = next(r for r in result["train"] if r["variant"] == "ce")
    lines += [
        "",
        "## One optimizer step (median of the timed steps; seconds)",
        "",
        "| variant | step s | / CE-only worker | CE step s, same worker | / same-worker CE | student fwd "
        "| teacher fwd / cache lookup | fused loss | backward | AdamW | peak RSS MiB | - CE-only peak "
        "| RSS after imports | RSS after load | RSS after warm-up (anon + file) | CE (1st step) | distill (1st step) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["train"]:
        p = r["phases_median_s"]
        distill = "-" if r["variant"] == "ce" else f"{r['first']['distill']:.5f}"
        paired = "- | -" if not r["paired_ce_median_s"] else \
            f"{r['paired_ce_median_s']:.3f} | {r['median_s'] / r['paired_ce_median_s']:.3f}"
        lines.append(
            f"| {label_of(r)} | {r['median_s']:.3f} | {r['median_s'] / ce['median_s']:.3f} | {paired} | "
            f"{p['student_forward']:.3f} | {p['teacher']:.4f} | {p['loss']:.3f} | {p['backward']:.3f} | "
            f"{p['optimizer']:.3f} | {_mib(r['peak_rss'])} | {(r['peak_rss'] - ce['peak_rss']) / MIB:+,.0f} | "
            f"{_mib(r['rss_after_imports'])} | {_mib(r['rss_after_load'])} | {_mib(r['rss_after_warmup'])} "
            f"({_mib(r['rss_anon_after_warmup'])} + {_mib(r['rss_file_after_warmup'])}) | {r['first']['ce']:.5f} | "
            f"{distill} |")
    teacher = next((r for r in result["train"] if r["variant"] == "teacher"), None)
    def times(steps: list[dict]) -> str:
        return ", ".join(f"{s['seconds']:.2f}" for s in steps)

    lines += ["", "Every step time of each variant, warm-up first (with the same worker's CE-only steps): " + "; ".join(
        f"{label_of(r)}: {times(r['steps'])}"
        + (f" (CE: {times(r['paired_ce_steps'])})" if r["paired_ce_steps"] else "")
        for r in result["train"])]
    if teacher is not None:
        saved = [f"k={r['k']}: {(teacher['peak_rss'] - r['peak_rss']) / MIB:,.0f} MiB "
                 f"({(teacher['peak_rss'] - r['peak_rss']) / h['teacher_weight_bytes']:.2f} x the teacher's weights)"
                 for r in result["train"] if r["variant"] == "cache"]
        lines += ["", "Peak RSS saved by the cache vs the in-process teacher: " + "; ".join(saved) + "."]
    lines += ["", "Peak RSS = the worker's VmHWM over its whole life (imports, weights, AdamW states, activations); "
              "RSS in MiB; from_pretrained memory-maps the fp32 safetensors, so the weights become resident (file "
              "pages, then anonymous once AdamW writes the student's) only when first used: little of them is in "
              "the RSS after load, all of them after the warm-up step. MiB = 2^20 bytes, MB = 10^6 bytes; sizes "
              "on disk include cache.json and the datasets metadata.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="micro LLaMA, tiny sizes (CI, < 1 min)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (main process and every worker)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; quick 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256; quick 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 3; quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (AdamW allocates its state)")
    parser.add_argument("--ks", type=int, nargs="+", default=None,
                        help="cache k trained from (default 32 512; quick 8 64)")
    parser.add_argument("--v-sequences", type=int, default=None,
                        help="windows of the k = V cache build (default 2; quick 4; 0 skips it)")
    parser.add_argument("--build-batch", type=int, default=8, help="build_cache batch_size")
    parser.add_argument("--workdir", default=None,
                        help="folder for the caches and worker files (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--no-paired", action="store_true",
                        help="FOCUS workers time only their own steps (no interleaved CE-only steps)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq_len = args.seq_len or (64 if args.quick else 256)
    args.steps = args.steps or (2 if args.quick else 3)
    args.ks = sorted(set(args.ks or ([8, 64] if args.quick else [32, 512])))
    args.v_sequences = (4 if args.quick else 2) if args.v_sequences is None else args.v_sequences
    if min(args.threads, args.batch, args.seq_len, args.steps, args.build_batch) < 1 or args.warmup < 0:
        parser.error("--threads, --batch, --seq-len, --steps and --build-batch must be >= 1, --warmup >= 0")
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    torch = _heavy_imports()
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="teacher_cache_speed-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        info = models(args, workdir)
        tokenizer = AutoTokenizer.from_pretrained(info["teacher_path"])
        teacher = AutoModelForCausalLM.from_pretrained(info["teacher_path"], dtype=torch.float32).eval()
        vocab = int(teacher.get_output_embeddings().weight.shape[0])
        if any(k < 1 or k > vocab for k in args.ks):
            parser.error(f"--ks: each k must be in [1, {vocab}]")
        count = args.batch * (args.warmup + args.steps)
        data = windows(tokenizer, args.seq_len, max(count, args.v_sequences))
        data_path = workdir / "windows.npy"
        np.save(data_path, data[:count])
        print(f"{info['teacher']} -> student {info['student_path']}; {count} windows of {args.seq_len}; "
              f"ks {args.ks}; {args.threads} thread(s)", flush=True)
        builds = []
        for k in args.ks:
            builds.append(build(teacher, tokenizer, info["teacher_path"], data[:count], k, workdir / f"cache-k{k}",
                                args.build_batch))
            print(f"  build k={k}: {builds[-1]['build_s']:.1f} s, {_size(builds[-1]['bytes'])}", flush=True)
        if args.v_sequences:
            folder = workdir / "cache-kV"
            builds.append(build(teacher, tokenizer, info["teacher_path"], data[: args.v_sequences], vocab, folder,
                                args.build_batch))
            print(f"  build k=V: {builds[-1]['build_s']:.1f} s, {_size(builds[-1]['bytes'])}", flush=True)
            import shutil

            shutil.rmtree(folder)
        teacher_bytes = weight_bytes(teacher)
        del teacher
        base = {"student": info["student_path"], "teacher": info["teacher_path"], "data": str(data_path),
                "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                "paired": not args.no_paired}
        variants = [("ce", {"variant": "ce"}), ("teacher", {"variant": "teacher"})] + [
            (f"cache-k{k}", {"variant": "cache", "k": k, "cache": str(workdir / f"cache-k{k}")}) for k in args.ks]
        train = []
        for label, extra in variants:
            train.append(run_worker({**base, **extra}, workdir, label))
            r = train[-1]
            print(f"  {label}: step {r['median_s']:.3f} s, peak RSS {_mib(r['peak_rss'])} MiB "
                  f"({r['wall_s']:.0f} s)", flush=True)
    ce = train[0]["median_s"]
    result = {
        "header": {
            **{k: v for k, v in info.items() if k != "setup_s"}, "quick": args.quick, "vocab": vocab,
            "teacher_weight_bytes": teacher_bytes, "trainable_parameters": train[0]["trainable_parameters"],
            "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
            "windows": count, "tokens_per_step": train[0]["tokens_per_step"], "ks": args.ks,
            "v_sequences": args.v_sequences, "build_batch": args.build_batch, "threads": args.threads,
            "torch": torch.__version__, "cpu": cpu_name(), "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()], "setup_s": info["setup_s"],
            "wall_s": time.perf_counter() - started,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        },
        "build": builds,
        "train": train,
        "ratios": {(r["variant"] if r["variant"] != "cache" else f"cache k={r['k']}"): r["median_s"] / ce
                   for r in train},
        "paired_ratios": {(r["variant"] if r["variant"] != "cache" else f"cache k={r['k']}"):
                          r["median_s"] / r["paired_ce_median_s"] for r in train if r["paired_ce_median_s"]},
    }
    print(markdown(result), flush=True)
    if args.json:
        from axolotl_focus.files import write_json

        write_json(args.json, result, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
