"""Small file helpers shared by every stage: atomic writes, JSON records, content digests.

* :func:`write_text` writes ``path`` atomically: the text goes to ``.<name>.tmp-<pid>`` in the same
  folder (created if missing), which then replaces ``path`` (``os.replace``), so a reader sees the
  old file or the new one, never a part; a crash leaves at most the temporary file.
* :func:`write_json` is :func:`write_text` of ``json.dumps(data, **options)`` (each caller keeps
  its own formatting, so the files are byte-for-byte what they were).
* :func:`read_json` returns the parsed file, or None when it is missing or not valid JSON (a
  record half-written by an older version counts as absent).
* :func:`digest` is the first ``length`` hex digits of the SHA-256 of ``json.dumps(obj,
  sort_keys=True, default=str)``: a key that depends on the content, not on dict order;
  :func:`file_digest` the SHA-256 of a file's bytes.
* :func:`input_identity` and :func:`other_job` are the one run-identity rule of the resumable
  outputs (the pairs file's ``.run.json``, the teacher cache's ``cache.json``): a run records what
  identifies its inputs (a local file or folder by the digest of its bytes, not its path; anything
  else, such as a hub id, by its name), and a later run on the same output whose record differs in
  a key both records have is another job, refused with ``--restart`` named.
* :func:`read_text` is the one way an input file is read: UTF-8 (a leading BOM dropped); bytes
  that are not UTF-8 raise a one-line ``ValueError`` naming ``path:line`` and the byte.
* :func:`exclusive_lock` is the one lock every writer of an output takes (pairs, teacher cache,
  pruned checkpoint): ``<output>.lock`` holding the writer's PID, locked with ``flock``. A second
  writer is refused with a line naming the holder's PID; a lock left by a killed process is
  released by the kernel and simply taken over; the file is removed when the lock is released.

Whole folders (a pruned checkpoint, the embedded model, a teacher-cache shard) are written the
same way one level up: into a temporary sibling folder, then renamed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        raise


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


def file_digest(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the bytes of ``path``."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def input_identity(source: str | os.PathLike | None) -> str | None:
    """``sha256:<16 hex>`` of a local file (of its files' names and digests for a folder), else
    ``name:<source>`` (a hub id), None for None (see the module docstring)."""
    if source is None:
        return None
    path = Path(os.path.expanduser(os.fspath(source)))
    if path.is_file():
        return f"sha256:{file_digest(path)[:16]}"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return "sha256:" + digest([[str(p.relative_to(path)), file_digest(p)] for p in files])
    return f"name:{source}"


def other_job(output: str | os.PathLike, stored: dict | None, now: dict, *, keys=None,
              label=lambda key, record: None, field: str = "") -> None:
    """Raise ``ValueError`` when ``stored`` (an output's record) differs from ``now`` in a key both
    have (of ``keys``, default all of ``now``'s): ``[field: ]<output> was made with k=old (now
    k=new): another job; rerun with --restart to start it over, or pick another --output``.
    ``label(key, record)`` may render a key (None: ``key=value``)."""
    diff = [k for k in (now if keys is None else keys) if k in now and k in (stored or {}) and stored[k] != now[k]]
    if diff:
        was, new = (", ".join(label(k, r) or f"{k}={r[k]}" for k in diff) for r in (stored, now))
        raise ValueError(f"{field + ': ' if field else ''}{output} was made with {was} (now {new}): another job; "
                         "rerun with --restart to start it over, or pick another --output")


def read_text(path: str | os.PathLike, what: str = "") -> str:
    """The text of the UTF-8 file ``path`` (a leading BOM dropped). Bytes that are not UTF-8 raise
    ``ValueError("<what>: <path>:<line>: not UTF-8 text (byte 0xe9 at column 7); ...")``."""
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        prefix = f"{what}: " if what else ""
        raise ValueError(f"{prefix}{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
                         "save the file as UTF-8") from None


def read_lines(path: str | os.PathLike, what: str = "") -> list[str]:
    """:func:`read_text` split at ``\\n`` (line ``i`` of the file is ``lines[i - 1]``)."""
    return read_text(path, what).split("\n")


_HELD: set[str] = set()  # lock files this process holds (a nested take of the same lock is a no-op)


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike, option: str = "--output") -> Iterator[None]:
    """Hold the exclusive lock of the output ``target`` (``<target>.lock``; see the module
    docstring) while the block runs. Raises ``ValueError`` naming the holder's PID when another
    process holds it; ``option`` is the option a user would change to write elsewhere."""
    path = Path(os.path.abspath(os.fspath(target).rstrip("/\\") + ".lock"))
    if str(path) in _HELD:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"{target}: another process (PID {holder}) is writing it (lock {path}); wait for it "
                             f"to finish, or pick another {option}") from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:  # else the holder before us removed the file on release: lock the new one
            break
        os.close(fd)
    _HELD.add(str(path))
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _HELD.discard(str(path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)  # releases the flock
