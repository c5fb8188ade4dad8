"""``axolotl-focus pairs``: mine RePAIR pairs (student loops -> teacher regenerates from the onset);
one option per :class:`~axolotl_focus.mine.config.MiningConfig` field."""

from __future__ import annotations

import argparse
import json
import logging

from .. import mine  # the stage's public API, imported on first use: `pairs --help` loads no torch
from ..options import add_options, given
from .config import MiningConfig

__all__ = ["add_pairs_arguments", "run_pairs_cli"]


def add_pairs_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``axolotl-focus pairs``."""
    add_options(parser, MiningConfig)


def run_pairs_cli(args: argparse.Namespace) -> int:
    """``axolotl-focus pairs``: mine (everything is validated before a model is loaded), print the
    run's counts as JSON."""
    logging.basicConfig(level=logging.INFO)
    summary = mine.run_mining(MiningConfig(**given(args, MiningConfig)))
    print(json.dumps(summary.to_dict(), indent=2))
    return 0
