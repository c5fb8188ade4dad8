"""The teacher-cache format: what identifies a sequence and how a cache folder is laid out.

Identifying a sequence
----------------------
``sequence_key(input_ids, labels)`` = hex of ``blake2b(digest_size=16)`` over the bytes of
``input_ids`` as int32 little-endian, followed by the bytes of ``labels`` as int32 little-endian
(-100 kept). A key names one SFT sequence as it is trained: same tokens, same masking. The key is
of the *unpadded* sequence; in a padded batch the row's tokens are those where ``attention_mask !=
0`` (right or left padding; the whole row without a mask).

Trained positions: ``trained_positions(labels)`` = the positions ``t < len - 1`` with
``labels[t + 1] != -100``, increasing; these are the rows the trainer gives the fused loss (its
shifted target at t is ``labels[t + 1]``, the last position has none). A sequence's entry holds
one row per trained position, in this order. Sequences without a trained position are not stored
(nothing to distill on them); duplicates (same key) are stored once.

Folder layout (``<cache>``)
---------------------------
``<cache>/cache.json``: :class:`CacheMeta` as a JSON object (written atomically: a temporary file,
then ``os.replace``)::

    format              "axolotl_focus.teacher_cache" (FORMAT)
    version             1 (VERSION)
    teacher             the teacher's path or hub id, as given
    teacher_fingerprint axolotl_focus.fingerprints.source_fingerprint(teacher) (config / tokenizer
                        sha256 and sampled weight hashes for a local folder; hub id + commit sha).
                        A cache imported from axolotl KD logprobs (kd_import) has instead
                        {"source": "axolotl KD logprobs", "logprobs_digest": hex blake2b
                        (digest_size=16) over, for each stored sequence in order, its ids as
                        int32 little-endian then its logq as float32 little-endian,
                        "kd_temperature": T2, the temperature axolotl's KD strategy scaled the
                        rows to}; its teacher is "axolotl KD logprobs of CONFIG", its dtype null
                        and its vocab_size the student's
    vocab_size          rows of the teacher's lm_head (V)
    k                   ids kept per position, 1 <= k <= V (k = V: log_tail is -inf everywhere)
    temperature         tau of logq / log_tail
    dtype               the teacher's compute dtype ("float32", "bfloat16", ...)
    sequences           unique sequences stored (those with at least one trained position)
    positions           trained positions stored (sum over the unique sequences)
    dataset_digest      hex blake2b(digest_size=16) over the 16-byte binary digests of the keys of
                        the unique sequences (with a trained position) in first-seen dataset order
    tokenizer_digest    hex blake2b(digest_size=16) of the UTF-8 JSON (sorted keys, separators
                        "," ":", non-ASCII kept) of {"vocab": sorted(get_vocab().items()) as
                        [token, id] pairs, "special_tokens": special_tokens_map}; null without one
    created             ISO-8601 UTC time the cache was started
    source_config       the axolotl config it was built from, or null
    data_sources        :func:`data_sources` of that config ({"sequence_len", "datasets": the
                        digest of each SFT dataset file, or its hub id}): what ``validate`` compares
                        with a training config without tokenizing anything (null in caches of
                        earlier versions; the trainer compares the tokenized rows either way)
    shards              number of shard folders
    shard_size          unique sequences per shard (S)
    shard_files         {shard folder name: {file name: size in bytes}} of every shard written so
                        far (recorded as each shard is written; absent in caches of earlier
                        versions, whose shards are checked for existence only)
    complete            true only once every shard is written

A shard folder that is missing, lacks a recorded file or holds one of another size is damaged
(:func:`shard_problems`; sizes only, no data is read): ``validate`` and the trainer refuse the
cache naming the shard, and rerunning ``axolotl-focus teacher-cache`` with the same settings
writes that shard again (also in a cache marked complete).

``<cache>/shard-00000/``, ``shard-00001/``, ...: shard i holds the unique sequences ``[i*S,
(i+1)*S)`` in dataset order, one row per sequence, written by ``datasets.Dataset.from_dict(...)
.save_to_disk`` into a temporary folder and renamed to its final name (so a shard folder that
exists is complete). Columns:

    key        string            sequence_key
    positions  int32             n = number of trained positions
    ids        list<int32>       n*k ids, row-major [n, k]: position j's ids at [j*k, (j+1)*k),
                                 in decreasing teacher probability
    logq       list<float32>     n*k, log softmax(z / tau) at those ids, same layout
    log_tail   list<float32>     n, log of the teacher mass outside the k ids (-inf when k = V)

Size: ``8k + 4`` bytes per trained position (k = 32: 260 B), plus ~60 B per sequence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ...files import input_identity, write_json
from ...fingerprints import source_fingerprint
from ..losses import IGNORE_INDEX

FORMAT = "axolotl_focus.teacher_cache"  # a name, not a module path: kept so that caches built earlier load
VERSION = 1
META_FILE = "cache.json"
SHARD_PREFIX = "shard-"
DEFAULT_SHARD_SIZE = 1024
# fp32 elements of one [chunk, V] teacher-logit block (sparse_teacher_from_logits needs ~3 of them)
LOGIT_CHUNK_ELEMENTS = 1 << 25

REBUILD = "rebuild: axolotl-focus teacher-cache CONFIG"


def as_int_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)


def sequence_key(input_ids, labels) -> str:
    """Hex blake2b (16-byte digest) over ``input_ids`` then ``labels`` as int32 little-endian."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(as_int_array(input_ids).astype("<i4").tobytes())
    digest.update(as_int_array(labels).astype("<i4").tobytes())
    return digest.hexdigest()


def trained_positions(labels) -> list[int]:
    """Positions ``t < len(labels) - 1`` with ``labels[t + 1] != -100``, increasing."""
    labels = as_int_array(labels)
    return np.flatnonzero(labels[1:] != IGNORE_INDEX).tolist()


def dataset_digest(keys: Iterable[str]) -> str:
    """Hex blake2b (16 bytes) over the binary digests of ``keys`` (unique, in first-seen order)."""
    digest = hashlib.blake2b(digest_size=16)
    for key in keys:
        digest.update(bytes.fromhex(key))
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str | None:
    """Hash of a tokenizer's vocabulary and special tokens (see the module docstring)."""
    if tokenizer is None:
        return None
    payload = {"vocab": sorted([token, int(i)] for token, i in tokenizer.get_vocab().items()),
               "special_tokens": tokenizer.special_tokens_map}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def teacher_fingerprint(teacher: str) -> dict:
    """:func:`axolotl_focus.fingerprints.source_fingerprint` of a teacher path or hub id."""
    return source_fingerprint(str(teacher))


def other_teacher(meta: CacheMeta, teacher: str) -> str | None:
    """Why a cache was not built by ``teacher`` (its fingerprint differs from the one recorded), or
    None (the same teacher, a cache imported from KD logprobs, or a hub teacher whose revision
    cannot be known offline)."""
    recorded = meta.teacher_fingerprint or {}
    if not recorded or "source" in recorded:
        return None
    now = teacher_fingerprint(teacher)
    if now == recorded or ("hub" in now and now.get("revision") is None):
        return None
    return f"was built by the teacher {meta.teacher}, not by {teacher} (their fingerprints differ)"


def data_sources(cfg) -> dict:
    """What a config trains on, for ``cache.json``'s ``data_sources``: ``sequence_len`` and, in
    order, :func:`axolotl_focus.files.input_identity` of the path of each dataset that is not a
    RePAIR pair dataset (the cache holds the other rows only)."""
    sets = [d for d in (cfg.get("datasets") or []) if hasattr(d, "get") and d.get("type") != "axolotl_focus.repair"]
    return {"sequence_len": cfg.get("sequence_len"),
            "datasets": [input_identity(str(d["path"])) if d.get("path") else None for d in sets]}


def other_data(meta: CacheMeta, cfg) -> str | None:
    """Why a cache was built from other data than the config ``cfg`` names (per :func:`data_sources`;
    a value one side does not record is not compared), or None."""
    if not meta.data_sources:
        return None
    now, was = data_sources(cfg), meta.data_sources
    diff = [k for k in now if now[k] is not None and was.get(k) is not None and now[k] != was[k]]
    if not diff:
        return None
    return "was built from other data (" + ", ".join(f"{k} {was[k]} - now {now[k]}" for k in diff) + ")"


@dataclasses.dataclass
class CacheMeta:
    """The contents of ``<cache>/cache.json`` (fields: see the module docstring)."""

    format: str = FORMAT
    version: int = VERSION
    teacher: str | None = None
    teacher_fingerprint: dict | None = None
    vocab_size: int | None = None
    k: int = 32
    temperature: float = 2.0
    dtype: str | None = None
    sequences: int = 0
    positions: int = 0
    dataset_digest: str | None = None
    tokenizer_digest: str | None = None
    created: str | None = None
    source_config: str | None = None
    data_sources: dict | None = None
    shards: int = 0
    shard_size: int = DEFAULT_SHARD_SIZE
    shard_files: dict | None = None
    complete: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CacheMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def write(self, folder: str | os.PathLike) -> None:
        """Write ``cache.json`` atomically."""
        write_json(Path(folder) / META_FILE, self.to_dict(), indent=2, sort_keys=True, newline=True)


def read_meta(folder: str | os.PathLike) -> CacheMeta | None:
    """The :class:`CacheMeta` of ``folder`` if it is a teacher cache (cache.json of our FORMAT),
    else None."""
    path = Path(folder) / META_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return CacheMeta.from_dict(data)


def shard_dir(folder: Path, index: int) -> Path:
    return Path(folder) / f"{SHARD_PREFIX}{index:05d}"


def shard_file_sizes(shard: Path) -> dict[str, int]:
    """``{file name: size}`` of the files of a shard folder (what ``shard_files`` records)."""
    return {p.name: p.stat().st_size for p in sorted(Path(shard).iterdir()) if p.is_file()}


def shard_problem(folder: str | os.PathLike, meta: CacheMeta, index: int) -> str | None:
    """Why shard ``index`` of the cache in ``folder`` is not as it was written (missing, a file
    missing or of another size than ``meta.shard_files`` records), or None."""
    shard = shard_dir(Path(folder), index)
    if not shard.is_dir():
        return f"{shard.name} is missing"
    recorded = (meta.shard_files or {}).get(shard.name)
    if recorded is None:
        return None  # written by an earlier version: existence only
    for name, size in recorded.items():
        path = shard / name
        if not path.is_file():
            return f"{shard.name}/{name} is missing"
        if path.stat().st_size != int(size):
            return (f"{shard.name}/{name} has {path.stat().st_size:,} bytes, {META_FILE} records {int(size):,} "
                    "(truncated?)")
    return None


def shard_problems(folder: str | os.PathLike, meta: CacheMeta) -> list[str]:
    """:func:`shard_problem` of every shard of the cache that has one."""
    return [p for p in (shard_problem(folder, meta, i) for i in range(meta.shards)) if p]

def shard_features():
    import datasets  # heavy: only when shards are written or read

    return datasets.Features({
        "key": datasets.Value("string"),
        "positions": datasets.Value("int32"),
        "ids": datasets.List(datasets.Value("int32")),
        "logq": datasets.List(datasets.Value("float32")),
        "log_tail": datasets.List(datasets.Value("float32")),
    })


