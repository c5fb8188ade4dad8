"""`axolotl-focus demo`: its arguments and the command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Literal

from .. import demo  # the package's public API, imported on first use: `demo --help` loads no numpy
from ..options import add_options, opt, positive_int
from .pipeline import Demo
from .settings import MODELS, PRESETS, DemoError, demo_settings
from .stages import STAGES, TABLE


@dataclass
class DemoOptions:
    """Options of ``axolotl-focus demo`` (the sizes of each preset are :class:`DemoSettings`); each
    field's help is its ``--help`` text (:mod:`axolotl_focus.options`)."""

    out: str = opt("demo_out", "output folder")
    model: Literal[MODELS] = opt("smollm2", "smollm2: the embedded real model SmolLM2-135M-Instruct (default); "
                                 "micro: a micro LLaMA pretrained in stage 1 (minutes; the paper's effects do not show "
                                 "at that size)")
    quick: bool = opt(False, "the small preset: same stages, 2 training seeds (real model: <= 12 min on 2 cores)",
                      action="store_true")
    preset: Literal[PRESETS] | None = opt(None, "full: the experiment; quick; smoke: the smallest real-model run of "
                                          "every stage, as CI runs it; cache: KD and FOCUS from the teacher cache "
                                          "beside their in-process twins. Overrides --quick")
    device: Literal["cpu", "cuda"] = opt("cpu", "where pruning, mining, evaluation and axolotl train run")
    force: tuple[str, ...] | None = opt(None, "redo every stage, or only the named ones (and what depends on them): "
                                        f"{', '.join(STAGES)}", nargs="*", metavar="STAGE", choices=STAGES)
    until: str | None = opt(None, "run the stages up to this one, then write the report of what has finished",
                            metavar="STAGE", choices=STAGES)
    seed: int = opt(0, "seed of calibration, mining and the held-out split; the training seeds are seed + the "
                    "preset's offsets (micro model: also the teacher and Table 1)")
    threads: int | None = opt(None, "torch threads (default: the cores not busy by the 1-minute load average, minus "
                              "one, at least 1)", type=positive_int)
    jobs: int | None = opt(None, "axolotl train runs at a time (default: 2 with two cores or more, else 1)",
                           type=positive_int)
    progress: bool = opt(True, "progress bars")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, DemoOptions, defaults=True)


def run_demo_cli(args: argparse.Namespace) -> int:
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        import transformers  # heavy: only once the demo runs

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
    pipeline = Demo(args.out, settings, TABLE, report=demo.write_report, force=force, until=args.until,
                    progress=args.progress, threads=args.threads, jobs=args.jobs, device=args.device)
    try:
        pipeline.run()
    except DemoError as err:
        print(f"axolotl-focus demo: {err}", file=sys.stderr)
        return 1
    return 0
