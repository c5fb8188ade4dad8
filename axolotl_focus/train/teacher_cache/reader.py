"""Reading a finished teacher cache: :class:`TeacherCache`, looked up by the rows of a batch.

:meth:`TeacherCache.open` memory-maps the shards (``datasets.load_from_disk``) and keeps
in memory only a dict key -> row and the position counts. Packed batches are not supported: a
packed row is several sequences whose concatenation is not a cached key, so the cache requires
``sample_packing: false`` (and no ``shift_labels`` / sequence parallelism).

Format: :mod:`axolotl_focus.train.teacher_cache.format`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..losses import IGNORE_INDEX, SparseTeacher
from .format import (
    FORMAT,
    META_FILE,
    REBUILD,
    VERSION,
    CacheMeta,
    as_int_array,
    other_teacher,
    sequence_key,
    shard_dir,
    shard_features,
    shard_problems,
    tokenizer_digest,
)

REPAIR = "rerun axolotl-focus teacher-cache with the same settings to write the damaged shards again"


class TeacherCache:
    """A finished teacher cache, memory-mapped (see the module docstring)."""

    def __init__(self, path: Path, meta: CacheMeta, dataset):
        self.path = path
        self.meta = meta
        self._table = dataset.data.table  # pyarrow, memory-mapped
        keys = self._table.column("key").to_pylist()
        self._index = {key: row for row, key in enumerate(keys)}
        self._positions = np.asarray(self._table.column("positions").to_numpy(), dtype=np.int64)

    @classmethod
    def open(cls, path: str | os.PathLike) -> TeacherCache:
        """Open the complete cache in ``path``; one-line ValueError if it is not one."""
        folder = Path(path)
        meta_path = folder / META_FILE
        try:
            data = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{folder}: not a teacher cache (no {META_FILE}); build one with "
                             "axolotl-focus teacher-cache CONFIG --output DIR") from None
        except ValueError as exc:
            raise ValueError(f"{meta_path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{folder}: not a teacher cache ({META_FILE} has format "
                             f"{data.get('format') if isinstance(data, dict) else None!r}, expected {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ValueError(f"{folder}: teacher cache version {data.get('version')} (this axolotl_focus reads "
                             f"version {VERSION}); {REBUILD} --restart")
        meta = CacheMeta.from_dict(data)
        if not meta.complete:
            done = sum(shard_dir(folder, i).is_dir() for i in range(meta.shards))
            raise ValueError(f"{folder}: the teacher cache is incomplete ({done} of {meta.shards} shards); "
                             "finish it by running axolotl-focus teacher-cache again with the same settings")
        import datasets  # heavy: only when a cache is opened

        damaged = shard_problems(folder, meta)
        if damaged:
            raise ValueError(f"{folder}: the teacher cache is damaged ({'; '.join(damaged[:3])}); {REPAIR}")
        parts = []
        for i in range(meta.shards):
            shard = shard_dir(folder, i)
            try:
                parts.append(datasets.load_from_disk(str(shard)))
            except Exception as exc:  # noqa: BLE001 - an unreadable shard of an earlier version's cache
                raise ValueError(f"{folder}: shard {shard.name} cannot be read ({type(exc).__name__}: "
                                 f"{str(exc)[:200]}); {REPAIR}") from None
        dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else (
            parts[0] if parts else datasets.Dataset.from_dict(
                {"key": [], "positions": [], "ids": [], "logq": [], "log_tail": []}, features=shard_features()))
        if dataset.num_rows != meta.sequences:
            raise ValueError(f"{folder}: the shards hold {dataset.num_rows} sequences, {META_FILE} says "
                             f"{meta.sequences}; {REBUILD}")
        return cls(folder, meta, dataset)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def _take(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = int(self.meta.k)
        if not rows:
            return (torch.zeros((0, k), dtype=torch.long), torch.zeros((0, k)), torch.zeros(0))
        part = self._table.take(rows)

        def flat(name: str) -> np.ndarray:
            column = part.column(name)
            column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
            return np.array(column.flatten().to_numpy(zero_copy_only=False))

        ids = torch.from_numpy(flat("ids").astype(np.int64)).view(-1, k)
        logq = torch.from_numpy(flat("logq")).view(-1, k)
        log_tail = torch.from_numpy(flat("log_tail"))
        return ids, logq, log_tail

    def entry(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids [n, k] long, logq [n, k] float32, log_tail [n] float32)`` of a sequence key."""
        if key not in self._index:
            raise KeyError(f"sequence {key} is not in the teacher cache {self.path}")
        return self._take([self._index[key]])

    def sparse_for_batch(self, input_ids: torch.Tensor, labels: torch.Tensor,
                         attention_mask: torch.Tensor | None = None) -> SparseTeacher:
        """The :class:`SparseTeacher` of a padded (not packed) batch: rows of every batch row with a
        valid shifted target, in the trainer's row-major order of ``shifted_labels != -100``."""
        ids = input_ids.detach().cpu().numpy()
        lab = labels.detach().cpu().numpy()
        mask = None if attention_mask is None else attention_mask.detach().cpu().numpy()
        if ids.shape != lab.shape or (mask is not None and mask.shape != ids.shape):
            raise ValueError(f"sparse_for_batch: input_ids {list(ids.shape)}, labels {list(lab.shape)} and "
                             f"attention_mask {None if mask is None else list(mask.shape)} must have one shape")
        counts = (lab[:, 1:] != IGNORE_INDEX).sum(1)
        rows = []
        for b in np.flatnonzero(counts):
            keep = slice(None) if mask is None else mask[b] != 0
            seq, seq_labels = ids[b][keep], lab[b][keep]
            first = int(np.argmax(mask[b] != 0)) if mask is not None else 0
            if first > 0 and lab[b, first] != IGNORE_INDEX and lab[b, first - 1] == IGNORE_INDEX:
                raise ValueError(f"sequence {_preview(seq)} of the batch is left-padded and its first token is "
                                 "labelled: the pad position before it is a trained position the teacher cache "
                                 f"{self.path} does not have (pad on the right)")
            row = self._index.get(sequence_key(seq, seq_labels))
            if row is None:
                raise ValueError(f"sequence {_preview(seq)} of the batch is not in the teacher cache {self.path}: it "
                                 f"was built for other data or settings ({REBUILD})")
            if self._positions[row] != counts[b]:
                raise ValueError(f"sequence {_preview(seq)} of the batch has {int(counts[b])} trained positions, its "
                                 f"entry in the teacher cache {self.path} {int(self._positions[row])}: the batch is "
                                 "packed or padded differently (the cache requires sample_packing: false and labels "
                                 "padded with -100)")
            rows.append(int(row))
        teacher_ids, logq, log_tail = self._take(rows)
        return SparseTeacher(teacher_ids, logq, log_tail, float(self.meta.temperature))

    def check_rows(self, rows: Iterable) -> None:
        """Raise a one-line ValueError unless every (input_ids, labels) with a trained position is in
        the cache with the same number of positions."""
        missing = wrong = checked = 0
        first = None
        for index, (input_ids, labels) in enumerate(rows):
            input_ids, labels = as_int_array(input_ids), as_int_array(labels)
            count = int(np.count_nonzero(labels[1:] != IGNORE_INDEX))
            if not count:
                continue
            checked += 1
            row = self._index.get(sequence_key(input_ids, labels))
            if row is None:
                missing += 1
            elif self._positions[row] != count:
                wrong += 1
            else:
                continue
            if first is None:
                first = (index, "missing" if row is None else
                         f"{count} trained positions, cached {int(self._positions[row])}")
        if first is not None:
            raise ValueError(f"teacher cache {self.path}: {missing + wrong} of {checked} training sequences do not "
                             f"match it ({missing} missing, {wrong} with another position count; first: row "
                             f"{first[0]}, {first[1]}): it was built for other data or settings ({REBUILD})")

    def check_compatible(self, *, temperature: float | None = None, vocab_size: int | None = None,
                         tokenizer=None, teacher: str | None = None) -> None:
        """One-line ValueError unless the cache fits a training run's temperature, vocabulary size
        (the student's lm_head rows), tokenizer (the digest is compared when both exist) and teacher
        (``focus_teacher_model`` when the config names one: its fingerprint)."""
        meta, problems = self.meta, []
        if teacher and (problem := other_teacher(meta, teacher)):
            raise ValueError(f"teacher cache {self.path} {problem}; {REBUILD} --restart (focus_teacher_model is "
                             f"{teacher})")
        if temperature is not None and float(temperature) != float(meta.temperature):
            problems.append(f"temperature {meta.temperature} (focus_temperature is {temperature})")
        if vocab_size is not None and meta.vocab_size is not None and int(vocab_size) != int(meta.vocab_size):
            problems.append(f"vocabulary {meta.vocab_size} (the student's is {vocab_size})")
        if (tokenizer is not None and meta.tokenizer_digest is not None
                and tokenizer_digest(tokenizer) != meta.tokenizer_digest):
            problems.append("another tokenizer")
        if problems:
            raise ValueError(f"teacher cache {self.path}: built with {', '.join(problems)}; {REBUILD} --restart")


def _preview(ids: np.ndarray, n: int = 8) -> str:
    head = ", ".join(str(int(i)) for i in ids[:n])
    return f"[{head}{', ...' if len(ids) > n else ''}] ({len(ids)} tokens)"


