"""`axolotl-focus demo`: its arguments and the command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..options import positive_int
from .settings import MODELS, PRESETS, STAGES, DemoError, demo_settings
from .stages import Demo


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
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: the cores not busy by the 1-minute load average, minus one, "
                        "at least 1)")
    parser.add_argument("--jobs", type=positive_int, default=None,
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
