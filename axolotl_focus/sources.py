"""Where texts come from: a local file (JSON lines, a JSON array, plain text) or a Hugging Face hub
dataset, and which column holds the text. Shared by RePAIR mining's prompts and the evaluation's
documents, instructions and perplexity text.

* :func:`load_prompts`: :class:`Prompt` rows (stable source id + text) from any of these sources
  (the rules: its docstring).
* :func:`read_json_rows`: the rows of a JSON-lines file (1-based line numbers) or a JSON array
  (0-based positions).
* :func:`load_hub_dataset`: ``datasets.load_dataset(name, config, split=split)`` (optionally
  streamed), the one place a hub dataset is loaded (so tests can replace it).
* :func:`missing_file`: whether a name is meant as a local file that is not there (then the
  caller says so instead of asking the hub).
* :func:`offline_env`: which of ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set, if any.

The embedded WikiText-2 slices (the default documents when the hub cannot be used) are in
:mod:`axolotl_focus.micro` (``corpus_documents``, ``corpus_text``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .files import read_lines, read_text
from .locations import hub_unreachable_reason, went_offline

__all__ = ["Prompt", "TEXT_FIELDS", "TEXT_UNITS", "load_hub_dataset", "load_prompts", "missing_file", "offline_env",
           "read_json_rows"]

TEXT_UNITS = ("paragraph", "line")  # how a plain text file is split into prompts
TEXT_FIELDS = ("text", "prompt", "instruction")  # tried in this order when text_field is None
FILE_SUFFIXES = (".txt", ".jsonl", ".json")  # a source name ending so is a local file, never a hub id
_TRUE = ("1", "ON", "YES", "TRUE")


def missing_file(source: str) -> bool:
    """Whether ``source`` is no existing file but names one: a :data:`FILE_SUFFIXES` suffix or a
    path starting with ``/``, ``./`` or ``../`` (a hub dataset id has neither)."""
    return not os.path.isfile(source) and (source.endswith(FILE_SUFFIXES) or source.startswith(("/", "./", "../")))


def offline_env() -> str | None:
    """Why hub datasets are not used: the set ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` variable,
    or that the hub cannot be reached (:func:`axolotl_focus.locations.hub_offline`), else None."""
    if went_offline():  # the variables below were set by this process, not by the user
        return f"the hub cannot be reached ({went_offline()})"
    set_by_user = next((v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                        if os.environ.get(v, "").strip().upper() in _TRUE), None)
    if set_by_user:
        return set_by_user
    why = hub_unreachable_reason()
    return f"the hub cannot be reached ({why})" if why else None


def load_hub_dataset(name: str, config: str | None, split: str, *, streaming: bool = False):
    """``datasets.load_dataset(name, config, split=split)`` (one place, so tests can replace it);
    ``streaming=True``: the ``IterableDataset`` (rows read lazily, nothing downloaded up front)."""
    import datasets  # heavy: only for a hub dataset

    if streaming:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    return datasets.load_dataset(name, config, split=split)


def read_json_rows(path: str, field: str) -> list[tuple[int, str, Any]]:
    """``(default id, where, row)`` of each row of a JSON array (0-based position, ``path[i]``) or
    of each non-blank line of a JSON-lines file (1-based line number, ``path:line``). A line that
    is not valid JSON raises ``ValueError("<field>: <path>:<line> is not valid JSON (...)")``."""
    content = read_text(path, field)
    if content.lstrip().startswith("["):  # a JSON array: ids are 0-based positions
        try:
            rows = json.loads(content)
        except json.JSONDecodeError as err:
            raise ValueError(f"{field}: {path}:{err.lineno} is not valid JSON ({err.msg})") from None
        return [(i, f"{path}[{i}]", row) for i, row in enumerate(rows)]
    records = []
    for lineno, line in enumerate(content.split("\n"), 1):
        if line.strip():
            try:
                records.append((lineno, f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{field}: {path}:{lineno} is not valid JSON ({err})") from None
    return records


@dataclass(frozen=True)
class Prompt:
    """One prompt: a stable ``source_id`` (resume key) and its raw text."""

    source_id: str
    text: str


def _row_prompt(row: dict, where: str, text_field: str | None, input_field: str | None, field: str) -> str:
    """The prompt text of a JSON / hub row: a JSON object whose text field (and input field) holds a
    string; anything else raises one short line naming the row (a row that is a string, a text that
    is an object: never mined as its Python repr)."""
    if not isinstance(row, dict):
        raise ValueError(f"{field}: {where} is a JSON {type(row).__name__}, not an object with a text field "
                         '(one {"text": "..."} per line)')
    name = text_field or next((k for k in TEXT_FIELDS if k in row), None)
    if name is None or name not in row:
        wanted = text_field or " / ".join(TEXT_FIELDS)
        names = sorted(map(str, row))
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} fields)" if len(names) > 8 else "")
        raise ValueError(f"text_field: {where} has no field {wanted!r} (fields: {shown})")
    extra = row.get(input_field) if input_field else None
    for key, value in ((name, row[name]), (input_field, extra)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{field}: {where}: field {key!r} is a JSON {type(value).__name__}, not a string")
    text = row[name] or ""
    return f"{text}\n\n{extra}" if extra else text


def load_prompts(
    source: str,
    *,
    text_field: str | None = None,
    input_field: str | None = "input",
    id_field: str | None = None,
    text_unit: str = "paragraph",
    split: str = "train",
    dataset_config: str | None = None,
    limit: int | None = None,
    field: str = "prompts",
) -> list[Prompt]:
    """Prompts from a JSONL file, a plain text file, or a hub dataset (``datasets.load_dataset``).

    JSONL (``.jsonl``/``.json``, one object per line, or a JSON array): text from ``text_field``
    (default: the first of ``text``, ``prompt``, ``instruction`` present) plus
    ``"\\n\\n" + input_field`` when non-empty; source id from ``id_field`` or the 1-based line
    number (array: the 0-based position). Plain text: one document
    per paragraph (blank-line separated) or per line (``text_unit``), id = its first line number.
    Hub: same fields, id = ``id_field`` or the row index. Empty prompts are skipped; duplicate ids
    raise, and so does a source without any prompt. ``limit`` keeps the first N prompts. ``field``:
    the option named by errors about the source (``prompts``, ``documents``, ...).
    """
    out: list[Prompt] = []

    def add(source_id: Any, text: str) -> bool:
        if text.strip():
            out.append(Prompt(str(source_id), text))
        return limit is not None and len(out) >= limit

    def row_id(row: dict, default: Any, where: str) -> Any:
        if not id_field or not isinstance(row, dict):  # not an object: _row_prompt says so
            return default
        if id_field not in row:
            raise ValueError(f"id_field: {where} has no field {id_field!r}")
        return row[id_field]

    if os.path.isfile(source) and source.endswith((".jsonl", ".json")):
        records = read_json_rows(source, field)
        for default_id, where, row in records:
            if add(row_id(row, default_id, where), _row_prompt(row, where, text_field, input_field, field)):
                break
        why = f"all {len(records)} rows have an empty text" if records else "no JSON rows"
    elif os.path.isfile(source):
        lines = read_lines(source, field)
        start, buf = None, []
        for lineno, line in enumerate(lines + [""], 1):
            if line.strip():
                start = start or lineno
                buf.append(line.strip())
            if (text_unit == "line" or not line.strip()) and buf:
                if add(start, " ".join(buf)):
                    break
                start, buf = None, []
        why = "the file holds only blank lines" if lines != [""] else "the file is empty"
    else:
        data = load_hub_dataset(source, dataset_config, split)
        for index, row in enumerate(data):
            where = f"{source}[{split}][{index}]"
            if add(row_id(row, index, where), _row_prompt(row, where, text_field, input_field, field)):
                break
        why = f"split {split!r}: " + (f"all {len(data)} rows have an empty text" if len(data) else "no rows")
    if not out:
        raise ValueError(f"{field}: {source} holds no prompts ({why})")
    ids = [p.source_id for p in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"id_field: duplicate source id {dup!r} in {source}")
    return out
