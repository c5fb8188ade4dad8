"""The `axolotl-focus` command line. Subcommands:

    axolotl-focus validate CONFIG.yml    check an axolotl config with the plugin loaded
    axolotl-focus tiny [--out DIR]       build the tiny offline example models and data
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__


def _offline_env() -> None:
    # axolotl's telemetry retries for minutes without network; never let it block a command.
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")


def cmd_validate(args) -> int:
    _offline_env()
    from axolotl.cli.config import load_cfg

    from .config import TRAINING_ARG_KEYS

    cfg = load_cfg(args.config)
    if "axolotl_focus.FocusPlugin" not in (cfg.plugins or []):
        print(f"{args.config}: `plugins:` does not list axolotl_focus.FocusPlugin", file=sys.stderr)
        return 1
    print(f"{args.config}: valid")
    for key in TRAINING_ARG_KEYS:
        print(f"  {key}: {cfg.get(key)}")
    return 0


def cmd_tiny(args) -> int:
    from .micro import build_tiny_pair

    paths = build_tiny_pair(args.out, steps=args.steps)
    for key in ("teacher", "student", "train"):
        print(f"{key}: {paths[key]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="axolotl-focus", description="FOCUS / RePAIR for pruned LLMs")
    parser.add_argument("--version", action="version", version=f"axolotl-focus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="validate an axolotl config with the plugin loaded")
    p.add_argument("config")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("tiny", help="build the tiny offline example (teacher, student, data)")
    p.add_argument("--out", default="examples/tiny/build")
    p.add_argument("--steps", type=int, default=200, help="teacher pretraining steps")
    p.set_defaults(func=cmd_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
