"""argparse types shared by the commands (re-exported by :mod:`axolotl_focus.options`); no pydantic,
so that modules the pruning code imports (``micro``, for the ``tiny`` command) run without it."""

from __future__ import annotations

import argparse
import math

__all__ = ["finite_float", "positive_int"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (``inf`` and ``nan`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value
