"""``axolotl-focus eval``: its options (:func:`add_eval_arguments`), the :class:`EvalConfig` they
make and the entry point."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from ..locations import looks_local
from .config import DECODINGS, METRICS, TASKS, EvalConfig
from .orchestrate import evaluate_models, model_specs
from .runner import get_ranks


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``axolotl-focus eval`` (every one maps to an :class:`EvalConfig` field)."""
    d = EvalConfig()
    parser.add_argument("models", nargs="+", metavar="MODEL", help="model path or NAME=PATH (any number)")
    a = parser.add_argument
    a("--output-dir", default=d.output_dir, help="results, generations and plots")
    a("--tasks", nargs="+", choices=TASKS, default=list(d.tasks), help="open-ended WikiText continuation and/or "
      "instruction following")
    a("--metrics", nargs="+", choices=METRICS, default=list(d.metrics), help="metric families to compute")
    a("--skip", nargs="+", choices=METRICS, default=[], help="metrics to leave out")
    a("--decodings", nargs="+", choices=DECODINGS, default=list(d.decodings), help="top-p sampling and/or greedy")
    a("--seeds", nargs="+", type=int, default=list(d.seeds), help="top-p generation seeds")
    a("--top-p", type=float, default=d.top_p, help="nucleus of top-p sampling")
    a("--temperature", type=float, default=d.temperature, help="sampling temperature of top-p decoding")
    a("--batch-size", type=int, default=d.batch_size, help="prompts per generation batch")
    a("--threshold", type=float, default=d.threshold, help="CREP coverage threshold")
    _add_generation_arguments(parser, d)
    _add_metric_arguments(parser, d)
    g = parser.add_argument_group("run control")
    g.add_argument("--metrics-only", action="store_true", help="never generate nor load a model: saved files only")
    g.add_argument("--regenerate", action="store_true", help="ignore saved generations and caches")
    g.add_argument("--device", help="one process only (several: each rank uses its own device)")
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def _add_generation_arguments(parser: argparse.ArgumentParser, d: EvalConfig) -> None:
    """The options of the two generation tasks' prompts."""
    g = parser.add_argument_group("open-ended generation")
    g.add_argument("--documents", help="local text/JSONL file or hub dataset id (default: Salesforce/wikitext "
                   "wikitext-103-raw-v1 test from the hub; offline: the embedded WikiText-2 test slice; `embedded`: "
                   "that slice always)")
    g.add_argument("--documents-config", help="hub dataset configuration of --documents")
    g.add_argument("--documents-split", default=d.documents_split, help="hub split of --documents")
    g.add_argument("--text-field", help="JSONL/hub field holding the text (default: text / prompt / instruction)")
    g.add_argument("--num-documents", type=int, default=d.num_documents, help="documents to continue (seeded sample)")
    g.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the document sample")
    g.add_argument("--prefix-tokens", type=int, default=d.prefix_tokens,
                   help="prompt = the first N tokens of a document")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="continuation length (paper Table 3: 100)")
    g = parser.add_argument_group("instruction-based generation")
    g.add_argument("--instructions", help="Self-Instruct style JSONL or hub dataset id "
                   "(default: the embedded 252 user-oriented Self-Instruct instructions)")
    g.add_argument("--instructions-config", help="hub dataset configuration of --instructions")
    g.add_argument("--instructions-split", default=d.instructions_split, help="hub split of --instructions")
    g.add_argument("--num-instructions", type=int, default=d.num_instructions, help="instructions to answer (at most)")
    g.add_argument("--instruction-max-new-tokens", type=int, default=d.instruction_max_new_tokens,
                   help="answer length")
    g.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=d.chat_template,
                   help="render instructions with the tokenizer's chat template when it has one")


def _add_metric_arguments(parser: argparse.ArgumentParser, d: EvalConfig) -> None:
    """The options of perplexity, MAUVE, BERTScore, zero-shot, the distribution study and the plots."""
    g = parser.add_argument_group("perplexity")
    g.add_argument("--ppl-data", help="text/JSONL file, hub dataset id or `embedded` (default: as --documents)")
    g.add_argument("--ppl-config", help="hub dataset configuration of --ppl-data")
    g.add_argument("--ppl-split", default=d.ppl_split, help="hub split of --ppl-data")
    g.add_argument("--ppl-text-field", default=d.ppl_text_field, help="field holding the text")
    g.add_argument("--ppl-window", type=int, default=d.ppl_window,
                   help="tokens per window (capped by the model's context)")
    g.add_argument("--ppl-stride", type=int, default=d.ppl_stride, help="sliding-window stride")
    g.add_argument("--ppl-max-tokens", type=int, help="score at most N tokens (default: all)")
    g = parser.add_argument_group("MAUVE / BERTScore / zero-shot")
    g.add_argument("--mauve-featurizer", default=d.mauve_featurizer, help="local path or hub id")
    g.add_argument("--mauve-seeds", nargs="+", type=int, default=list(d.mauve_seeds),
                   help="MAUVE k-means seeds (mean +- std)")
    g.add_argument("--mauve-max-text-length", type=int, default=d.mauve_max_text_length,
                   help="featurizer tokens per text")
    g.add_argument("--mauve-scaling-factor", type=float, default=d.mauve_scaling_factor, help="MAUVE's c")
    g.add_argument("--bertscore-model", default=d.bertscore_model, help="local path or hub id")
    g.add_argument("--bertscore-layer", type=int, help="hidden layer (default: bert-score's table for the model)")
    g.add_argument("--bertscore-rescale", action=argparse.BooleanOptionalAction, default=d.bertscore_rescale,
                   help="rescale with the baseline")
    g.add_argument("--bertscore-baseline", help="baseline .tsv for rescaling a local model")
    g.add_argument("--zero-shot-tasks", nargs="+", default=list(d.zero_shot_tasks), help="lm-evaluation-harness tasks")
    g.add_argument("--zero-shot-batch-size", default=d.zero_shot_batch_size, help="lm-eval batch size or auto")
    g.add_argument("--zero-shot-limit", type=float, help="examples per task (a fraction if < 1; default: all)")
    g.add_argument("--zero-shot-include", help="folder of extra lm-eval task YAMLs (e.g. offline copies)")
    g = parser.add_argument_group("distribution study and plots")
    g.add_argument("--teacher", help="unpruned teacher (default: the first model's recorded focus_source_model)")
    g.add_argument("--distribution-samples", type=int, default=d.distribution_samples,
                   help="positions sampled for the teacher-probability study")
    g.add_argument("--head-top-p", type=float, default=d.head_top_p, help="nucleus defining the head tokens")
    g.add_argument("--plots", action=argparse.BooleanOptionalAction, default=d.plots, help="write the plots")
    g.add_argument("--focus-params", nargs="+", default=[], metavar="NAME=BETA,GAMMA",
                   help="FOCUS beta/gamma per model for the beta/gamma plot (else read from the name)")
    g.add_argument("--focus-toy", nargs="+", default=[f"{b:g},{c:g}" for b, c in d.focus_toy], metavar="BETA,GAMMA",
                   help="(beta, gamma) curves of the weight-function plot")


def _pair(text: str) -> tuple[float, float]:
    beta, _, gamma = text.partition(",")
    return float(beta), float(gamma or 1.0)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """An :class:`EvalConfig` from parsed :func:`add_eval_arguments` options."""
    names = {f.name for f in fields(EvalConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    for key in ("tasks", "decodings", "seeds", "mauve_seeds", "zero_shot_tasks"):
        if key in kw:
            kw[key] = tuple(kw[key])
    kw["metrics"] = tuple(m for m in kw.get("metrics", METRICS) if m not in (args.skip or []))
    kw["focus_params"] = {n: _pair(v) for n, _, v in (s.partition("=") for s in args.focus_params or [])}
    kw["focus_toy"] = tuple(_pair(s) for s in args.focus_toy) if args.focus_toy else EvalConfig().focus_toy
    return EvalConfig(**kw)


def run_eval_cli(args: argparse.Namespace) -> int:
    """Entry point of ``axolotl-focus eval``: evaluate, print the Markdown report; 2 on bad options."""
    main = get_ranks().rank == 0  # several processes: only rank 0 logs progress and prints the report
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args).validate()
        specs = model_specs(args.models)
    except (ValueError, TypeError) as err:
        print(f"axolotl-focus eval: {err}", file=sys.stderr)
        return 2
    missing = [p for _, p in specs if looks_local(p) and not os.path.isdir(p)]
    if missing:
        print(f"axolotl-focus eval: model directory not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    evaluate_models(dict(specs), cfg)
    if not main:
        return 0
    report = Path(cfg.output_dir) / "results.md"
    print(report.read_text(encoding="utf-8"))
    print(f"results: {cfg.output_dir}/<model>/results.json, {report}"
          + (f", {cfg.output_dir}/plots/" if cfg.plots else ""))
    return 0
