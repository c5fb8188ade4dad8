"""Small file helpers shared by every stage: atomic writes, JSON records, content digests.

* :func:`write_text` writes ``path`` atomically: the text goes to ``.<name>.tmp-<pid>`` in the same
  folder (created if missing), which then replaces ``path`` (``os.replace``), so a reader sees the
  old file or the new one, never a part; a crash leaves at most the temporary file.
* :func:`write_json` is :func:`write_text` of ``json.dumps(data, **options)`` (each caller keeps
  its own formatting, so the files are byte-for-byte what they were).
* :func:`read_json` returns the parsed file, or None when it is missing or not valid JSON (a
  record half-written by an older version counts as absent).
* :func:`digest` is the first ``length`` hex digits of the SHA-256 of ``json.dumps(obj,
  sort_keys=True, default=str)``: a key that depends on the content, not on dict order.

Whole folders (a pruned checkpoint, the embedded model, a teacher-cache shard) are written the
same way one level up: into a temporary sibling folder, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, data: Any, *, newline: bool = False, **options) -> None:
    """Write ``json.dumps(data, **options)`` (plus a final newline when ``newline``) atomically."""
    write_text(path, json.dumps(data, **options) + ("\n" if newline else ""))


def read_json(path: str | os.PathLike) -> Any:
    """The parsed JSON of ``path``; None when it is missing, unreadable or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def digest(obj: Any, length: int = 16) -> str:
    """Hex SHA-256 prefix of ``obj`` as sorted-key JSON (non-JSON values by their ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
