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
   top-p 0.9 (:mod:`axolotl_focus.evaluate.table1`). With ``table1_prompts = 0`` (the real-model presets)
   Table 1 is read from stage 6, which evaluates the same models on the same documents anyway.
4. ``pairs`` - RePAIR pair mining: the width-pruned student continues prefixes of the WikiText-2
   valid slice, the teacher regenerates from each loop's onset (:func:`axolotl_focus.mine.run.run_mining`).
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

The package, one concept per module: :mod:`.settings` (stages, runs, presets, axolotl configs),
:mod:`.runs` (``axolotl train`` subprocesses, their logs, the run scheduler), :mod:`.stages` (the
:class:`Demo` pipeline), :mod:`.report` (``demo_report.md``), :mod:`.claims` (the paper's checks),
:mod:`.plots` and :mod:`.cli` (the command).
"""

from ..files import read_json
from .cli import add_demo_arguments, run_demo_cli
from .runs import auto_jobs, auto_threads, logged_dicts, run_concurrently
from .settings import CACHE_PAIRS, RUNS, STAGES, DemoError, DemoSettings, cache_dir, demo_settings, train_configs
from .stages import Demo

__all__ = ["CACHE_PAIRS", "RUNS", "STAGES", "Demo", "DemoError", "DemoSettings", "add_demo_arguments", "auto_jobs",
           "auto_threads", "cache_dir", "demo_settings", "logged_dicts", "read_json", "run_concurrently",
           "run_demo_cli", "train_configs"]
