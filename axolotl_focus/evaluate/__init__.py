"""`axolotl-focus eval`: the paper's evaluation (Tables 3/4, section 6) for any number of models.

Tasks (paper section 5.1; the exact rules: :mod:`axolotl_focus.evaluate.data`)
------------------------------------------------------------------------------
* ``open_ended``: the first ``prefix_tokens`` (50) tokens of WikiText documents (default: WikiText-103
  test from the hub, offline the embedded WikiText-2 test slice) as prompts, the next
  ``max_new_tokens`` (100) document tokens as the reference continuation.
* ``instruction``: Self-Instruct style instructions (default: the embedded 252 user-oriented ones),
  their outputs as references.

Decodings: top-p (0.9, pure nucleus, ``top_k=0``) under each seed of ``seeds``, and greedy;
batched generation with a generator per row (:mod:`axolotl_focus.evaluate.generation`), shared
out between the processes under ``torchrun`` / ``accelerate launch``
(:mod:`axolotl_focus.evaluate.runner`).

Files (``output_dir``)
----------------------
* ``<model>/generations/<task>.<decoding>.jsonl`` and its ``.meta.json``: the generations, reused
  when the settings match (:mod:`axolotl_focus.evaluate.generation`);
* ``<model>/perplexity.json``, ``zero_shot.json``, ``distribution.json`` and
  ``_teacher/distribution_samples.*``: model-dependent numbers, cached the same way
  (:mod:`axolotl_focus.evaluate.files`);
* ``<model>/results.json`` (:mod:`axolotl_focus.evaluate.orchestrate`), ``results.md``
  (:mod:`axolotl_focus.evaluate.report`) and ``plots/*.png`` (:mod:`axolotl_focus.evaluate.plots`).

Metrics
-------
* CREP, rep-n, EAD-1 and degeneration in serving (:mod:`axolotl_focus.evaluate.generation`);
* perplexity (:mod:`axolotl_focus.evaluate.ppl`);
* MAUVE and BERTScore (:mod:`axolotl_focus.evaluate.similarity`);
* zero-shot accuracy through lm-evaluation-harness (:mod:`axolotl_focus.evaluate.lm_harness`);
* the distribution study of section 6 (:mod:`axolotl_focus.evaluate.distribution`); FOCUS's
  reweighting and (beta, gamma) for the plots (:mod:`axolotl_focus.evaluate.focus`).

A metric whose package, model or data is missing is reported under ``unavailable`` with what to
install or pass; the other metrics still run. Settings: :class:`EvalConfig`
(:mod:`axolotl_focus.evaluate.config`); the command line: :mod:`axolotl_focus.evaluate.cli`.

The public API below is imported from its module on first use (:mod:`axolotl_focus.exports`), so
that ``axolotl-focus eval --help`` and ``import axolotl_focus.evaluate.config`` stay light.
"""

from ..exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "cli": ("add_eval_arguments", "config_from_args", "run_eval_cli"),
    "config": ("EvalConfig", "MetricUnavailable"),
    "data": ("check_local_data", "default_wikitext", "embedded_instructions", "load_instructions",
             "open_ended_items"),
    "distribution": ("distribution_stats", "distribution_study", "top_p_mask"),
    "focus": ("focus_params_of", "reweighted", "toy_zipf"),
    "generation": ("generation_metrics",),
    "lm_harness": ("zero_shot",),
    "models": ("eval_device", "load_model"),
    "orchestrate": ("evaluate_model", "evaluate_models", "model_dir", "model_specs"),
    "pair_margin": ("pair_margins",),
    "plots": ("make_plots",),
    "ppl": ("perplexity",),
    "report": ("markdown_report",),
    "runner": ("get_ranks",),
    "similarity": ("bertscore_f1", "mauve_score"),
}, modules=("metrics", "table1"))
