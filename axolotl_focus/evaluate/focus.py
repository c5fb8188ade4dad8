"""FOCUS's reweighted target on the paper's toy distribution (Figure 2a) and the (beta, gamma)
of a FOCUS run (Figure 3a), for the plots."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..config import TRAINING_RECORD
from ..files import read_json
from ..train.losses import focus_weights


def reweighted(q: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """FOCUS's effective target ``q~ = w q / sum(w q)``, ``w = q^beta + (1-q)^gamma`` (appendix A)."""
    wq = focus_weights(q, beta, gamma) * q
    return wq / wq.sum(-1, keepdim=True)


def toy_zipf(vocab: int = 50, top: tuple[float, float] = (0.8, 0.1), exponent: float = 1.0) -> torch.Tensor:
    """The paper's toy distribution: top two tokens 0.8 / 0.1, the rest Zipf over the tail."""
    tail = torch.tensor([1.0 / (r ** exponent) for r in range(3, vocab + 1)], dtype=torch.float64)
    tail = tail / tail.sum() * (1.0 - sum(top))
    return torch.cat([torch.tensor(top, dtype=torch.float64), tail])


def focus_params_of(name: str, path: str | None = None, mapping: dict | None = None) -> tuple[float, float] | None:
    """(beta, gamma) of a FOCUS run, from the first of:

    1. ``mapping[name]`` (``--focus-params``);
    2. ``<path>/focus_training.json`` (the trainer's record in its ``output_dir``), then
       ``<path>/../focus_training.json`` (a LoRA-merged model saved under ``<output_dir>/merged``):
       ``focus_beta`` / ``focus_gamma``; a record whose ``focus_distill`` is not ``focus`` (a KD or
       CE run) gives None;
    3. ``focus_beta`` / ``focus_gamma`` in the checkpoint's config.json;
    4. ``beta<x>`` / ``gamma<y>`` in the name (``-``, ``_`` or ``=`` allowed).

    A missing gamma means the default 1.0."""
    if mapping and name in mapping:
        return tuple(map(float, mapping[name]))
    if path and os.path.isdir(path):
        record = None
        for folder in (Path(path), Path(path).resolve().parent):  # the first record found is the run's
            try:
                record = read_json(folder / TRAINING_RECORD)
            except (OSError, ValueError):  # unreadable / not JSON: as if absent
                record = None
            if isinstance(record, dict):
                break
        if isinstance(record, dict):
            if record.get("focus_distill", "focus") != "focus":
                return None
            if record.get("focus_beta") is not None:
                gamma = record.get("focus_gamma")
                return float(record["focus_beta"]), float(1.0 if gamma is None else gamma)
        conf = read_json(Path(path) / "config.json")
        if conf and "focus_beta" in conf:
            return float(conf["focus_beta"]), float(conf.get("focus_gamma", 1.0))
    num = r"[-_=]?(\d+(?:\.\d+)?|\.\d+)"
    beta = re.search(r"beta" + num, name, re.I)
    if not beta:
        return None
    gamma = re.search(r"gamma" + num, name, re.I)
    return float(beta.group(1)), float(gamma.group(1)) if gamma else 1.0
