"""JSON files and the cache of model-dependent numbers.

The generations are saved with a ``.meta.json`` of the settings they were made with
(:mod:`axolotl_focus.evaluate.generation`). Model-dependent numbers are cached the same way
(``perplexity.json``, ``zero_shot.json``, ``distribution.json``, ``_teacher/distribution_samples.*``).
A rerun reuses every file whose meta matches and loads a model only when something is missing;
``metrics_only`` never generates nor loads a model (missing pieces are reported as unavailable);
``regenerate`` ignores the caches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .. import files
from ..files import read_json
from .config import EvalConfig, MetricUnavailable


def jsonable(value):
    return json.loads(json.dumps(value))


def write_json(path: Path, data) -> None:
    """An evaluation file, atomically (:func:`axolotl_focus.files.write_json`), non-ASCII kept."""
    files.write_json(path, data, indent=2, ensure_ascii=False)


def cached(path: Path, meta: dict, compute: Callable[[], Any], cfg: EvalConfig, what: str):
    """``compute()`` unless ``path`` holds a value made with the same ``meta``."""
    meta = jsonable(meta)
    old = None if cfg.regenerate else read_json(path)
    if old is not None and old.get("meta") == meta:
        return old["value"]
    if cfg.metrics_only:
        raise MetricUnavailable(f"{what}: not computed yet and --metrics-only forbids loading the model")
    value = jsonable(compute())
    write_json(path, {"meta": meta, "value": value})
    return value
