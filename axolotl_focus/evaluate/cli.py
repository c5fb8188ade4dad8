"""``axolotl-focus eval``: its options (:func:`add_eval_arguments`), the :class:`EvalConfig` they
make and the entry point."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from .. import evaluate  # the stage's public API, imported on first use: `eval --help` loads no torch
from ..locations import check_weight_files, looks_local
from ..options import add_options
from .config import METRICS, EvalConfig


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``axolotl-focus eval``: the models, ``--skip``, and one option per :class:`EvalConfig`
    field."""
    parser.add_argument("models", nargs="+", metavar="MODEL", help="model path or NAME=PATH (any number)")
    parser.add_argument("--skip", nargs="+", choices=METRICS, default=[], help="metrics to leave out")
    add_options(parser, EvalConfig, defaults=True)


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
    kw["focus_toy"] = tuple(_pair(s) if isinstance(s, str) else tuple(s) for s in args.focus_toy or ()) \
        or EvalConfig().focus_toy
    return EvalConfig(**kw)


def _check_context(cfg: EvalConfig, name: str, path: str) -> None:
    """Open-ended prompts and continuations fit the model's context (``max_position_embeddings`` of
    its config.json)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            context = json.load(handle).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return
    if "open_ended" in cfg.tasks and context and cfg.prefix_tokens + cfg.max_new_tokens > int(context):
        raise ValueError(f"max_new_tokens: --prefix-tokens {cfg.prefix_tokens} + --max-new-tokens {cfg.max_new_tokens} "
                         f"exceed the context of {name} ({context} tokens, max_position_embeddings)")


def run_eval_cli(args: argparse.Namespace) -> int:
    """Entry point of ``axolotl-focus eval``: evaluate, print the Markdown report; 2 on bad options."""
    main = evaluate.get_ranks().rank == 0  # several processes: only rank 0 logs progress and prints the report
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args).validate()
        specs = evaluate.model_specs(args.models)
        missing = [p for _, p in specs if looks_local(p) and not os.path.isdir(p)]
        if missing:
            raise ValueError(f"model directory not found: {', '.join(missing)}")
        for name, path in specs + ([("--teacher", cfg.teacher)] if cfg.teacher else []):
            if os.path.isdir(path):
                check_weight_files(path, name)
                _check_context(cfg, name, path)
        if not cfg.metrics_only and evaluate.get_ranks().size == 1:
            evaluate.eval_device(cfg)  # --device gpu0 / cuda without CUDA: said before any work
        evaluate.check_local_data(cfg)  # local documents / instructions / PPL text: read before any model work
    except (ValueError, TypeError) as err:
        print(f"axolotl-focus eval: {err}", file=sys.stderr)
        return 2
    evaluate.evaluate_models(dict(specs), cfg)
    if not main:
        return 0
    report = Path(cfg.output_dir) / "results.md"
    print(report.read_text(encoding="utf-8"))
    print(f"results: {cfg.output_dir}/<model>/results.json, {report}"
          + (f", {cfg.output_dir}/plots/" if cfg.plots else ""))
    return 0
