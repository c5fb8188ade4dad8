"""Writing a teacher cache (:mod:`axolotl_focus.train.teacher_cache.format`) shard by shard.

Building is resumable: a rerun with the same settings (teacher fingerprint, k, temperature, dtype,
shard size, dataset and tokenizer digests) keeps the shard folders already written; with other
settings it refuses in one line (``<cache>: built with k=32 (now k=64); use --restart or another
--output``). ``restart=True`` deletes the folder first, but only a folder that is a teacher cache
(its cache.json has this FORMAT); a non-empty folder that is not one is never touched.

Shards are written atomically (a temporary folder, then renamed), ``cache.json`` says
``complete`` only once every shard is written. Used by both builders
(:mod:`~axolotl_focus.train.teacher_cache.build`, :mod:`~axolotl_focus.train.teacher_cache.kd_import`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ...files import exclusive_lock, other_job
from ..losses import SparseTeacher
from .format import (
    FORMAT,
    META_FILE,
    SHARD_PREFIX,
    CacheMeta,
    read_meta,
    shard_dir,
    shard_features,
    shard_file_sizes,
    shard_problem,
    shard_problems,
)

LOG = logging.getLogger(__name__)

_SETTINGS = ("version", "teacher_fingerprint", "k", "temperature", "dtype", "shard_size", "dataset_digest",
             "tokenizer_digest")


def _fingerprint_label(meta: dict) -> str:
    text = json.dumps(meta.get("teacher_fingerprint"), sort_keys=True, default=str)
    return f"{meta.get('teacher')}#{hashlib.blake2b(text.encode(), digest_size=4).hexdigest()}"


def _setting_label(name: str, meta: dict) -> str:
    if name == "teacher_fingerprint":
        return f"teacher={_fingerprint_label(meta)}"
    if name in ("dataset_digest", "tokenizer_digest"):
        value = meta.get(name)
        short = value[:12] if isinstance(value, str) else value
        extra = f" ({meta.get('sequences')} sequences)" if name == "dataset_digest" else ""
        return f"{name.split('_')[0]} digest {short}{extra}"
    return f"{name}={meta.get(name)}"


def _prepare_folder(folder: Path, planned: CacheMeta, restart: bool) -> CacheMeta | None:
    """Check ``folder`` against the planned settings; returns the existing meta to resume, or None
    for a fresh build. Deletes the folder on ``restart`` only if it is a teacher cache."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder; choose another --output")
    existing = read_meta(folder) if folder.is_dir() else None
    if folder.is_dir() and existing is None and any(folder.iterdir()):
        raise ValueError(f"{folder}: exists and is not a teacher cache (no {META_FILE} of format {FORMAT}); "
                         "choose another --output (it is never deleted, not even with --restart)")
    if existing is None:
        return None
    if restart:
        LOG.info("teacher cache: --restart, deleting %s", folder)
        shutil.rmtree(folder)
        return None
    other_job(folder, existing.to_dict(), planned.to_dict(), keys=_SETTINGS, label=_setting_label)
    return existing


def _shard_complete(shard: Path, keys: list[str]) -> bool:
    """Whether ``shard`` exists and holds exactly ``keys`` in order (checks the key column only)."""
    if not shard.is_dir():
        return False
    import datasets  # heavy: only when a shard is checked

    try:
        stored = datasets.load_from_disk(str(shard)).data.column("key").to_pylist()
    except Exception as exc:  # noqa: BLE001 - unreadable: written again
        LOG.warning("teacher cache: %s is unreadable (%s); writing it again", shard, exc)
        return False
    if stored != keys:
        LOG.warning("teacher cache: %s does not hold the expected sequences; writing it again", shard)
        return False
    return True


def _write_shard(shard: Path, keys: list[str], counts: list[int], parts: list[SparseTeacher], k: int) -> None:
    """One shard folder, atomically: save_to_disk into a temporary folder, then rename."""
    import datasets  # heavy: only when a shard is written
    import pyarrow as pa

    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(np.asarray(counts, dtype=np.int64), out=offsets[1:])
    if parts:
        ids = torch.cat([p.ids for p in parts]).to(torch.int32).numpy().reshape(-1)
        logq = torch.cat([p.logq for p in parts]).to(torch.float32).numpy().reshape(-1)
        log_tail = torch.cat([p.log_tail for p in parts]).to(torch.float32).numpy().reshape(-1)
    else:
        ids = np.zeros(0, np.int32)
        logq = log_tail = np.zeros(0, np.float32)

    def lists(values: np.ndarray, width: int):
        return pa.LargeListArray.from_arrays(pa.array(offsets * width), pa.array(values)).cast(
            pa.list_(pa.from_numpy_dtype(values.dtype)))

    columns = {"key": keys, "positions": pa.array(np.asarray(counts, dtype=np.int32)),
               "ids": lists(ids, k), "logq": lists(logq, k), "log_tail": lists(log_tail, 1)}
    tmp = shard.with_name(f".{shard.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    quiet = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per shard would interleave with ours
    try:
        datasets.Dataset.from_dict(columns, features=shard_features()).save_to_disk(str(tmp))
    except BaseException:  # a full disk, an interrupt: no temporary folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    if shard.exists():
        shutil.rmtree(shard)
    os.replace(tmp, shard)


def write_cache(folder: Path, planned: CacheMeta, keys: list[str], counts: list[int],
                compute: Callable[[int, int], list[SparseTeacher]], restart: bool,
                skipped: Callable[[int], object] = lambda n: None) -> CacheMeta:
    """Write the cache ``planned`` describes into ``folder`` shard by shard: ``compute(lo, hi)``
    gives the rows of the unique sequences ``keys[lo:hi]`` (called only for a shard not yet
    complete; ``skipped(n)`` is told of the ``n`` sequences of a shard kept from an earlier run).
    A folder with other settings is refused; ``cache.json`` says ``complete`` only at the end. No
    sequence at all is an error; the folder's lock is held throughout (:func:`exclusive_lock`); a
    damaged shard (:func:`shard_problem`) is written again, in a complete cache too; a build that
    fails before any shard exists removes the ``cache.json`` (and the folder) it created."""
    if not keys:
        raise ValueError(f"{folder}: no training sequence has a trained position (every row was dropped - axolotl "
                         "drops rows longer than sequence_len - or has no trained label); nothing to cache: check "
                         "sequence_len and the datasets")
    with exclusive_lock(folder):
        existing = _prepare_folder(folder, planned, restart)
        if existing is not None:
            planned.created = existing.created or planned.created
            planned.vocab_size = planned.vocab_size or existing.vocab_size
            planned.shard_files = dict(existing.shard_files or {})
            damaged = shard_problems(folder, existing)
            if existing.complete and not damaged:
                return existing
            for problem in damaged if existing.complete else []:
                LOG.warning("teacher cache %s: %s; writing it again", folder, problem)
        created = not folder.exists()
        try:
            _write_shards(folder, planned, keys, counts, compute, skipped)
        except BaseException:
            if existing is None and not any(shard_dir(folder, i).is_dir() for i in range(planned.shards)):
                (folder / META_FILE).unlink(missing_ok=True)  # nothing written: leave nothing behind
                if created and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            raise
    return planned


def _write_shards(folder: Path, planned: CacheMeta, keys: list[str], counts: list[int],
                  compute: Callable[[int, int], list[SparseTeacher]], skipped: Callable[[int], object]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{SHARD_PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    planned.shard_files = planned.shard_files or {}
    planned.write(folder)
    for index in range(planned.shards):
        lo, hi = index * planned.shard_size, min((index + 1) * planned.shard_size, len(keys))
        shard = shard_dir(folder, index)
        if shard_problem(folder, planned, index) is None and (
                shard.name in planned.shard_files or _shard_complete(shard, keys[lo:hi])):
            skipped(hi - lo)
            continue
        planned.shard_files.pop(shard.name, None)
        _write_shard(shard, keys[lo:hi], counts[lo:hi], compute(lo, hi), planned.k)
        planned.shard_files[shard.name] = shard_file_sizes(shard)
        planned.write(folder)
    planned.complete = True
    planned.write(folder)


