"""``axolotl-focus prune``: run only the ``focus_prune:`` step of a config (into the pruning cache,
options overriding its block), or prune a model without a config (``--model``, ``--output``); one
option per :class:`~axolotl_focus.prune.settings.PruneSettings` field."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from pydantic import ValidationError

from .. import prune  # the stage's public API, imported on first use: `prune --help` loads no torch
from ..account import validation_messages
from ..config_file import read_config
from ..locations import resolve_model
from ..logs import show_package_logs
from ..options import add_options, given, resolve_device
from .settings import PruneSettings

__all__ = ["add_prune_arguments", "run_prune_cli"]

LOG = logging.getLogger(__name__)


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``axolotl-focus prune``: a config, or ``--model`` / ``--output``, and the settings."""
    parser.add_argument("config", nargs="?", help="axolotl config with base_model and focus_prune:")
    parser.add_argument("--model", help="hub id or path of the model to prune (without a config)")
    parser.add_argument("--output", help="output folder (without a config)")
    add_options(parser, PruneSettings)


def _settings(args: argparse.Namespace) -> tuple[str, PruneSettings]:
    """The model to prune and the settings: a config's ``base_model`` and ``focus_prune:`` block
    (the options override it), or ``--model`` and the options."""
    options = given(args, PruneSettings)
    if args.config:
        if args.model or args.output:
            raise ValueError("--model/--output prune without a config; a CONFIG.yml prunes its base_model into "
                             "the cache")
        cfg = read_config(args.config)[0]
        if not cfg.get("focus_prune") or not cfg.get("base_model"):
            raise ValueError(f"{args.config}: needs `base_model` and a `focus_prune:` block")
        source, block = cfg["base_model"], {**cfg["focus_prune"], **options}  # options override the block
    else:
        if not (args.model and args.output):
            raise ValueError("give a CONFIG.yml, or --model and --output")
        source, block = args.model, options
    try:
        return source, PruneSettings.model_validate(block)
    except ValidationError as exc:
        messages = validation_messages(exc, "focus_prune", PruneSettings)
        raise ValueError("; ".join(f"{k}: {m}" for k, m in messages)) from None


def run_prune_cli(args: argparse.Namespace) -> int:
    """``axolotl-focus prune``: prune (a config: into the cache, or reuse it), print the checkpoint
    and the parameter counts."""
    source, spec = _settings(args)
    resolve_model(source, "base_model" if args.config else "--model")  # a missing or damaged model: one line
    resolve_device(spec.device, "--device")  # gpu0, or cuda on a machine without CUDA: before any work
    undo = show_package_logs()
    try:
        if args.config:
            plan = prune.plan_prune(source, spec)  # the source's fingerprint is computed once, here
            path = prune.ensure_pruned(source, spec, plan["fingerprint"])
            report = json.loads((path / prune.REPORT_FILE).read_text())
            if plan["cached"]:  # pruned by an earlier run: show what that run logged
                names = {f.name for f in dataclasses.fields(prune.PruneReport)}
                fields = {name: value for name, value in report.items() if name in names}
                LOG.info("%s", prune.PruneReport(**{**fields, "model": None}).summary())
        else:
            path, report = args.output, prune.run_prune(source, spec, args.output)
    finally:
        undo()
    print(f"pruned checkpoint: {path}")
    print(f"params {report['params_before']:,} -> {report['params_after']:,} (requested "
          f"{prune.requested(report['metadata'])}; achieved reduction {report['achieved_reduction']:.2%} of all "
          "parameters)")
    return 0
