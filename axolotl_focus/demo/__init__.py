"""`axolotl-focus demo`: the whole FOCUS / RePAIR pipeline, offline, on a real pretrained model, and
the experiment that decides the paper's claims on it.

    axolotl-focus demo [--out demo_out] [--quick | --preset full|quick|smoke|cache] [--model smollm2|micro]
                       [--device cpu|cuda] [--threads N] [--jobs N] [--force [STAGE ...]]

The default model is SmolLM2-135M-Instruct (LLaMA architecture, GQA; :mod:`axolotl_focus.embedded_model`);
``--model micro`` runs the same stages on a micro LLaMA pretrained in stage 1 (too small for the
paper's effects). The stages (:data:`.stages.TABLE`, each cached in its own folder of ``--out``):

1. ``teacher`` - the real model materialized into the package cache (or the micro teacher pretrained).
2. ``prune`` - LLM-Pruner width pruning (25% of all parameters; q heads inside every KV group on
   SmolLM2) and depth pruning (whole blocks), through :func:`axolotl_focus.prune.cache.run_prune`.
3. ``table1`` - the micro model's Table 1 (on the real model Table 1 is read from stage 7).
4. ``sft`` - the CE arm under every training seed through the real ``axolotl train`` (LoRA on the
   real model, merged): the CE rows of the experiment, DPO's start, the model being repaired.
5. ``pairs`` - RePAIR mining from the SFT-tuned student (``mine_from``), the teacher's positives;
   a seeded share of the pairs held out.
6. ``train`` - every other arm (KD, FOCUS, CE + RePAIR, FOCUS + RePAIR through the pair stream,
   DPO after the SFT; the ``cache`` preset: KD / FOCUS from a teacher cache) under every seed.
7. ``eval`` - every model: PPL, CREP, rep-n, EAD, MAUVE at the primary decoding (top-p 0.9 at the
   temperature chosen on the valid split) and greedy; held-out pair margins; loop kinds.

Then ``demo_report.md``, ``experiment.json`` and ``plots/`` (:mod:`.report`): the verdict on every
claim by the rule of :mod:`.experiment`, with intervals across training seeds and the effect the run
could detect. The package: :mod:`.settings` (arms, presets, axolotl configs), :mod:`.pipeline` (the
stage table's runner and cache), :mod:`.runs` (``axolotl train`` subprocesses), :mod:`.stages`,
:mod:`.experiment`, :mod:`.report`, :mod:`.plots` and :mod:`.cli`. The public API below is
imported from its module on first use (:mod:`axolotl_focus.exports`).
"""

from ..exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "cli": ("add_demo_arguments", "run_demo_cli"),
    "pipeline": ("Context", "Demo", "Stage"),
    "report": ("write_report",),
    "runs": ("auto_jobs", "auto_threads", "logged_dicts", "run_concurrently"),
    "settings": ("ARMS", "CACHE_PAIRS", "DemoError", "DemoSettings", "cache_dir", "demo_settings", "run_config",
                 "run_id"),
    "stages": ("STAGES", "TABLE"),
})
