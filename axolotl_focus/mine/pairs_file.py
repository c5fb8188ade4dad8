"""The RePAIR pairs file (JSON lines) and the files beside it: appends with fsync, repair of a
partial last line, reading and validating rows, rank shards and their merge, the run record
(refusing an output mined with other settings) and ``restart``. Its rows are what the dataset type
``axolotl_focus.repair`` reads for training.

Output rows (JSONL)
-------------------
``prompt`` (shared context text), ``chosen``, ``rejected`` (continuation texts, decoded with
``skip_special_tokens=True``), ``source_id``, ``onset``, ``coverage_rejected`` (of the rejected
tokens), ``coverage_chosen`` (of the chosen tokens), ``coverage_output`` (of ``y_hat``, the
selection criterion), ``student``, ``teacher``, ``seed`` (the run's seed: with the source id it
gives the student's and the positives' row seeds, see above), ``top_p``, ``temperature`` (the
student's), ``teacher_temperature`` (the positives', resolved), ``chosen_attempt`` (0-based),
``student_stop`` (why the student row ended: ``loop`` = early stop, ``budget``, ``eos``), and the exact token
ids ``prompt_tokens`` (prompt + prefix), ``rejected_tokens``, ``chosen_tokens``.
``len(prompt_tokens) - onset`` is the length of the original prompt.

Text boundary: every text is cut from ONE decode of the whole sequence: ``rejected`` is
``decode(context + rejected)[k:]`` with ``k`` the length of the common prefix with
``decode(context)``, so ``prompt + rejected`` equals the decoded full sequence and no character
is lost or doubled at the boundary (SentencePiece leading spaces included). In chat-template mode
``prompt`` starts with the rendered template (its markup kept, so the prompt re-tokenizes to the
model input; a DPO trainer must then not add a second BOS); generated text never contains
special tokens. The token-id fields are exact and need no re-tokenization.

Files and resume
----------------
``output`` gets the kept pairs; ``output + ".state"`` lists the tried prompts that produced no
pair (``{"source_id", "status"}`` with status ``not_degenerate``, ``no_positive`` or
``dropped``); ``output + ".summary.json"`` the last run's ``MiningSummary``. Each batch is
appended with one ``write`` + ``fsync`` per file (pairs first, then state); this is not atomic:
a kill mid-write can leave a partial last line. On start such a line is dropped (truncated), and
every source id with a complete line in the output or the state file is skipped, so a rerun never
duplicates rows nor retries those prompts (the others of the interrupted batch are mined again),
and a kill loses at most the batch in flight. Pairs already in the file count toward
``target_pairs``; mining stops once it is reached (a batch's surplus pairs are not written, and
their prompts stay untried). The seeds depend only on ``(seed, source_id)``, so a resumed run
writes the pairs of an uninterrupted one (bit for bit when its batches hold the same prompts,
e.g. after a kill between batches; otherwise up to the float rounding of a forward pass under
different padding).

One writer per output: rank 0 holds ``<output>.lock`` (:func:`output_lock`) for the whole run; a
second process mining into the same output is refused with the first one's PID (two writers would
both skip and both append the same prompts).

``output + ".run.json"`` records what decides the pairs (:meth:`MiningConfig.run_record`: student
and teacher names, the student's config ``vocab_size``, the prompt source (a local file by the
digest of its bytes), how prompts are read and rendered, the sampling settings); it is written
(atomically) when the output has no rows yet. A start whose record differs from it while the output
or its state file holds rows is refused before any weights are loaded, with one ``ValueError``
listing each differing setting, old and new; for files of older versions without the record, the
settings of the first pair row (``student``, ``teacher``, ``seed``, ``top_p``, ``temperature``,
``teacher_temperature``) are compared and the record is written. A rerun with the same settings
resumes and leaves the record untouched. An ``output`` whose first line is not a pairs row (a JSON
object with a ``source_id``) is never appended to (nor removed). ``restart`` (``pairs --restart``)
removes the output, its state, summary, record and leftover rank shards, then mines from scratch.
Before any weights are loaded, :func:`~axolotl_focus.mine.run.run_mining` also requires the teacher
to share the student's vocabulary (tokenizers and config ``vocab_size``) and the prompt source to
hold at least one prompt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

from ..files import exclusive_lock, other_job, read_lines, write_json
from .config import MiningConfig

LOG = logging.getLogger(__name__)

__all__ = [
    "append_rows",
    "discard_new_record",
    "has_rows",
    "first_line",
    "merge_shards",
    "output_lock",
    "parse_row",
    "prepare_output",
    "read_rows",
    "record_path",
    "repair_tail",
    "shard_files",
    "shard_path",
    "shard_paths",
    "state_path",
]


def repair_tail(path: str) -> int:
    """Truncate a partial last line (no trailing newline); return the bytes removed."""
    if not os.path.isfile(path):
        return 0
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb+") as handle:
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            chunk = handle.read(end - start)
            if end == size and chunk.endswith(b"\n"):
                return 0
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    LOG.warning("%s: removed a partial last line (%d bytes) left by an interrupted run", path, size - keep)
    return size - keep


def append_rows(path: str, rows: Sequence[dict]) -> None:
    """Append complete JSON lines with one ``write`` call, then fsync (nothing if no rows)."""
    if not rows:
        return
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_row(line: str) -> tuple[dict | None, str]:
    """``(row, "")`` for a line of a pairs / state file (a JSON object with a ``source_id``),
    else ``(None, why)``."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"invalid JSON: {err}"
    if not isinstance(row, dict) or "source_id" not in row:
        return None, "not a JSON object with a source_id"
    return row, ""


def read_rows(path: str) -> list[dict]:
    """The rows of a pairs / state file (none if it does not exist); a bad line raises a
    ``ValueError`` naming ``path:line``."""
    if not os.path.isfile(path):
        return []
    rows = []
    for lineno, line in enumerate(read_lines(path, "output"), 1):
        if line.strip():
            row, why = parse_row(line)
            if row is None:
                raise ValueError(f"output: {path}:{lineno} is not a pairs row ({why}); remove that line, "
                                 "or pick another --output")
            rows.append(row)
    return rows


def first_line(path: str) -> tuple[int, str, bool] | None:
    """``(line number, text, complete)`` of the first non-empty line of ``path`` (``complete``: it
    ends with a newline, else it is a partial last line that the start truncates), or None."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                return lineno, line, line.endswith("\n")
    return None


def state_path(output: str) -> str:
    return output + ".state"


def shard_path(output: str, rank: int) -> str:
    base = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return f"{base}.rank{rank}.jsonl"


def record_path(output: str) -> str:
    return output + ".run.json"


def shard_paths(output: str) -> list[str]:
    """Shard files ``<stem>.rank<i>.jsonl`` of ``output`` present on disk."""
    folder = os.path.dirname(os.path.abspath(output))
    name = os.path.basename(output)
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    pattern = re.escape(stem) + r"\.rank\d+\.jsonl"
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(os.path.join(folder, n) for n in names if re.fullmatch(pattern, n))


def shard_files(output: str) -> list[str]:
    """The shards of ``output`` and their state files (those present or not)."""
    return [path for shard in shard_paths(output) for path in (shard, state_path(shard))]


def merge_shards(output: str, target: int) -> None:
    """Move shard rows/states into ``output`` (dedup by source id, at most ``target`` rows)."""
    shards = shard_paths(output)
    if not shards:
        return
    for path in [output, state_path(output)] + shard_files(output):
        repair_tail(path)
    have = {r["source_id"] for r in read_rows(output)}
    tried = {r["source_id"] for r in read_rows(state_path(output))}
    rows, states = [], []
    for shard in shards:
        for row in read_rows(shard):
            if row["source_id"] not in have and len(have) < target:
                have.add(row["source_id"])
                rows.append(row)
        for row in read_rows(state_path(shard)):
            if row["source_id"] not in tried and row["source_id"] not in have:
                tried.add(row["source_id"])
                states.append(row)
    append_rows(output, rows)
    append_rows(state_path(output), states)
    for path in shard_files(output):
        if os.path.exists(path):
            os.remove(path)
    LOG.info("merged %d shard files into %s (+%d pairs)", len(shards), output, len(rows))


_ROW_SETTINGS = ("student", "teacher", "seed", "top_p", "temperature", "teacher_temperature")  # in every pair row


def output_lock(output: str, state):
    """The exclusive lock of ``output`` (:func:`axolotl_focus.files.exclusive_lock`, ``<output>.lock``),
    taken by rank 0 for the whole run: a second ``axolotl-focus pairs`` on the same output is refused
    naming the PID of the first."""
    return exclusive_lock(output) if state.is_main_process else contextlib.nullcontext()


def has_rows(output: str) -> bool:
    """Whether the output, its rank shards or their state files hold a complete line."""
    pair_files = [output] + shard_paths(output)
    return any((line := first_line(path)) and line[2] for path in pair_files + [state_path(p) for p in pair_files])


def discard_new_record(output: str) -> None:
    """After a run that failed before writing any row: remove the run record it wrote, so that a
    corrected rerun (other settings) is not refused."""
    if not has_rows(output) and os.path.isfile(record_path(output)):
        os.remove(record_path(output))


def prepare_output(cfg: MiningConfig, record: dict, state) -> bool:
    """Before mining; every rank reads, rank 0 writes, then all wait. Refuse an ``output`` that is
    not a pairs file, and (unless ``cfg.restart``) one whose rows were mined with settings other
    than ``record``: the ``.run.json`` record, or for files of older versions what their first
    pair row records. Then on rank 0: with ``restart`` remove the output's files; keep ``record``
    in ``<output>.run.json``. Returns whether the output holds no rows yet (then a run that fails
    before its first row calls :func:`discard_new_record`)."""
    output, run_path = cfg.output, record_path(cfg.output)
    first = first_line(output)
    if first and (first[2] or not first[1].startswith("{")):  # a partial "{..." line only: repaired later
        why = parse_row(first[1])[1]
        if why:
            raise ValueError(f"output: {output}:{first[0]} is not a RePAIR pairs file written by axolotl-focus pairs "
                             f"({why}); refusing to append to it - pick another --output")
    pair_files = [output] + shard_paths(output)
    lines = {path: first_line(path) for path in pair_files + [state_path(path) for path in pair_files]}
    rows = any(line and line[2] for line in lines.values())
    try:
        saved = json.loads(Path(run_path).read_text(encoding="utf-8")) if os.path.isfile(run_path) else None
    except json.JSONDecodeError as err:
        raise ValueError(f"output: {run_path} is not valid JSON ({err}); rerun with --restart to start "
                         f"{output} over, or pick another --output") from None
    stored = saved
    if stored is None:  # written before run records: what the first pair row records
        pair = next((parse_row(lines[path][1])[0] for path in pair_files if lines[path] and lines[path][2]), None)
        stored = {k: pair[k] for k in _ROW_SETTINGS if k in pair} if pair else None
    if rows and not cfg.restart:
        other_job(output, stored, record, field="output")
    if state.is_main_process:
        if cfg.restart:
            removed = [path for path in [output, state_path(output), output + ".summary.json", run_path]
                       + shard_files(output) if os.path.exists(path)]
            for path in removed:
                os.remove(path)
            LOG.warning("restart: removed %s", ", ".join(removed) if removed else "nothing (no files yet)")
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        if cfg.restart or saved != record:
            write_json(run_path, record, indent=2)
    state.wait_for_everyone()
    return cfg.restart or not rows
