"""JSON files and the cache of model-dependent numbers.

The generations are saved with a ``.meta.json`` of the settings they were made with
(:mod:`axolotl_focus.evaluate.generation`). Model-dependent numbers are cached the same way
(``perplexity.json``, ``zero_shot.json``, ``distribution.json``, ``_teacher/distribution_samples.*``).
A rerun reuses every file whose meta matches and loads a model only when something is missing;
``metrics_only`` never generates nor loads a model (missing pieces are reported as unavailable);
``regenerate`` ignores the caches.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from .config import EvalConfig, MetricUnavailable


def jsonable(value):
    return json.loads(json.dumps(value))


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


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


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
