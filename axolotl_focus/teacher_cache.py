"""Teacher-logit cache: the teacher's top-k distribution at every trained position, computed once.

FOCUS / KD need, at each trained position of each SFT sequence, the teacher's distribution at the
training temperature tau. Instead of running the teacher in every training step, ``axolotl-focus
teacher-cache CONFIG --output DIR`` runs it once over the tokenized training data (exactly as
``axolotl train`` tokenizes it) and stores, per position, a :class:`axolotl_focus.losses.SparseTeacher`
row: the k ids of highest teacher probability, their ``log q`` and the log of the mass of all other
tokens. A training config then sets ``focus_teacher_cache: DIR`` (and loads no teacher): ``validate``
/ ``axolotl train`` check the folder's ``cache.json`` first (:mod:`axolotl_focus.preflight`), the
trainer opens it once, checks that every SFT row of its datasets is in it
(:func:`dataset_sft_rows`, :meth:`TeacherCache.check_rows`), looks each batch row up by its tokens
(:meth:`TeacherCache.sparse_for_batch`) and feeds the fused loss the bucketed objective (see
"Sparse teacher" in :mod:`axolotl_focus.losses`). The cache can be built from the config that
names it (that key is ignored while building) or from the same config without it.

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
    teacher_fingerprint axolotl_focus.prune.cache.source_fingerprint(teacher) (config / tokenizer
                        sha256 and sampled weight hashes for a local folder; hub id + commit sha)
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
    shards              number of shard folders
    shard_size          unique sequences per shard (S)
    complete            true only once every shard is written

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

The teacher's logits are those the in-process teacher of the trainer would use: the decoder's
last hidden state (``get_decoder()``) times the lm_head weight, in the teacher's dtype, then fp32;
sequences are run in batches (sorted by length within a shard, right padding, attention mask), and
only the hidden states of trained positions go through the lm_head, a bounded chunk at a time.

Building is resumable: a rerun with the same settings (teacher fingerprint, k, temperature, dtype,
shard size, dataset and tokenizer digests) keeps the shard folders already written; with other
settings it refuses in one line (``<cache>: built with k=32 (now k=64); use --restart or another
--output``). ``restart=True`` deletes the folder first, but only a folder that is a teacher cache
(its cache.json has this FORMAT); a non-empty folder that is not one is never touched.

Reading: :meth:`TeacherCache.open` memory-maps the shards (``datasets.load_from_disk``) and keeps
in memory only a dict key -> row and the position counts. Packed batches are not supported: a
packed row is several sequences whose concatenation is not a cached key, so the cache requires
``sample_packing: false`` (and no ``shift_labels`` / sequence parallelism).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from .files import write_json
from .losses import IGNORE_INDEX, SparseTeacher, sparse_teacher_from_logits

LOG = logging.getLogger(__name__)

FORMAT = "axolotl_focus.teacher_cache"
VERSION = 1
META_FILE = "cache.json"
SHARD_PREFIX = "shard-"
DEFAULT_SHARD_SIZE = 1024
# fp32 elements of one [chunk, V] teacher-logit block (sparse_teacher_from_logits needs ~3 of them)
LOGIT_CHUNK_ELEMENTS = 1 << 25
_REBUILD = "rebuild: axolotl-focus teacher-cache CONFIG"
# settings that must match for a rerun to reuse the shards already written
_SETTINGS = ("version", "teacher_fingerprint", "k", "temperature", "dtype", "shard_size", "dataset_digest",
             "tokenizer_digest")


def _as_int_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)


def sequence_key(input_ids, labels) -> str:
    """Hex blake2b (16-byte digest) over ``input_ids`` then ``labels`` as int32 little-endian."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(_as_int_array(input_ids).astype("<i4").tobytes())
    digest.update(_as_int_array(labels).astype("<i4").tobytes())
    return digest.hexdigest()


def trained_positions(labels) -> list[int]:
    """Positions ``t < len(labels) - 1`` with ``labels[t + 1] != -100``, increasing."""
    labels = _as_int_array(labels)
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
    """:func:`axolotl_focus.prune.cache.source_fingerprint` of a teacher path or hub id."""
    from .prune.cache import source_fingerprint

    return source_fingerprint(str(teacher))


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
    shards: int = 0
    shard_size: int = DEFAULT_SHARD_SIZE
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


def _shard_dir(folder: Path, index: int) -> Path:
    return folder / f"{SHARD_PREFIX}{index:05d}"


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


def _differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    changed = [n for n in _SETTINGS if old.get(n) != new.get(n)]
    return [_setting_label(n, old) for n in changed], [_setting_label(n, new) for n in changed]


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
    old, new = _differences(existing.to_dict(), planned.to_dict())
    if old:
        raise ValueError(f"{folder}: built with {', '.join(old)} (now {', '.join(new)}); use --restart or "
                         "another --output")
    return existing


def _shard_features():
    import datasets

    return datasets.Features({
        "key": datasets.Value("string"),
        "positions": datasets.Value("int32"),
        "ids": datasets.List(datasets.Value("int32")),
        "logq": datasets.List(datasets.Value("float32")),
        "log_tail": datasets.List(datasets.Value("float32")),
    })


def _shard_complete(shard: Path, keys: list[str]) -> bool:
    """Whether ``shard`` exists and holds exactly ``keys`` in order (checks the key column only)."""
    if not shard.is_dir():
        return False
    import datasets

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
    import datasets
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
        datasets.Dataset.from_dict(columns, features=_shard_features()).save_to_disk(str(tmp))
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    if shard.exists():
        shutil.rmtree(shard)
    os.replace(tmp, shard)


def _unwrap(module):
    return module.module if hasattr(module, "module") else module


def _teacher_hidden(teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state ``[B, T, H]`` of the teacher, as the trainer's in-process teacher gets it."""
    model = _unwrap(teacher)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and decoder is not model:
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


def _sparse_rows(teacher, head: torch.Tensor, batch: list[tuple[np.ndarray, list[int]]], k: int,
                 temperature: float, device: torch.device, pad_id: int) -> list[SparseTeacher]:
    """The sparse teacher rows of each sequence of ``batch`` (tokens, trained positions), on CPU."""
    length = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    rows, cols = [], []
    for b, (ids, positions) in enumerate(batch):
        input_ids[b, : len(ids)] = torch.from_numpy(ids)
        attention_mask[b, : len(ids)] = 1
        rows += [b] * len(positions)
        cols += positions
    hidden = _teacher_hidden(teacher, input_ids.to(device), attention_mask.to(device))
    selected = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    del hidden
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // head.shape[0])
    pieces = []
    for start in range(0, selected.shape[0], chunk):
        h = selected[start: start + chunk]
        logits = (h @ head.T).float()
        part = sparse_teacher_from_logits(logits, k, temperature)
        pieces.append((part.ids.to(torch.int32).cpu(), part.logq.cpu(), part.log_tail.cpu()))
    ids = torch.cat([p[0] for p in pieces])
    logq = torch.cat([p[1] for p in pieces])
    log_tail = torch.cat([p[2] for p in pieces])
    out, start = [], 0
    for _, positions in batch:
        end = start + len(positions)
        out.append(SparseTeacher(ids[start:end], logq[start:end], log_tail[start:end], float(temperature)))
        start = end
    return out


def _unique_sequences(rows: Iterable) -> tuple[list[str], list[np.ndarray], list[list[int]]]:
    """Keys, tokens and trained positions of the unique sequences with a trained position, in
    first-seen order."""
    keys, tokens, positions, seen = [], [], [], set()
    for index, row in enumerate(rows):
        try:
            input_ids, labels = row
        except (TypeError, ValueError):
            raise ValueError(f"rows[{index}]: expected (input_ids, labels)") from None
        input_ids, labels = _as_int_array(input_ids), _as_int_array(labels)
        if input_ids.shape != labels.shape:
            raise ValueError(f"rows[{index}]: input_ids ({input_ids.size}) and labels ({labels.size}) differ in length")
        pos = trained_positions(labels)
        if not pos:
            continue
        key = sequence_key(input_ids, labels)
        if key in seen:
            continue
        seen.add(key)
        keys.append(key)
        tokens.append(input_ids)
        positions.append(pos)
    return keys, tokens, positions


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def build_cache(teacher, rows: Sequence, path: str | os.PathLike, *, k: int, temperature: float,
                batch_size: int = 8, device: str | torch.device = "cpu", progress: bool = True,
                teacher_name: str, tokenizer, shard_size: int = DEFAULT_SHARD_SIZE, restart: bool = False,
                source_config: str | None = None, dtype: str | torch.dtype | None = None) -> CacheMeta:
    """Build (or finish) the teacher cache of ``rows`` in ``path``; returns its :class:`CacheMeta`.

    ``teacher``: a causal LM (put in eval mode and moved to ``device``; run without grad), or a
    function without arguments returning one, called only if a shard must be computed (then
    ``dtype``, its compute dtype, must be given; a module's own dtype is recorded otherwise).
    ``rows``: the (input_ids, labels) of the SFT sequences (not RePAIR pair rows); duplicates and
    rows without a trained position are skipped. ``teacher_name``: its path or hub id (for the
    fingerprint). ``tokenizer``: the tokenizer that tokenized ``rows`` (for the digest; None: no
    digest). See the module docstring for the format and resuming.
    """
    folder = Path(path)
    k, shard_size, batch_size = int(k), int(shard_size), int(batch_size)
    temperature = float(temperature)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be at least 1, got {shard_size} and {batch_size}")
    lazy = callable(teacher) and not isinstance(teacher, torch.nn.Module)
    model = None if lazy else teacher
    if model is not None:
        dtype = next(_unwrap(model).parameters()).dtype
        vocab = _unwrap(model).get_output_embeddings().weight.shape[0]
        if k > vocab:
            raise ValueError(f"k={k} exceeds the teacher's vocabulary ({vocab})")
    elif dtype is None:
        raise ValueError("build_cache: give dtype= with a teacher that is loaded lazily")
    keys, tokens, positions = _unique_sequences(rows)
    shards = (len(keys) + shard_size - 1) // shard_size
    planned = CacheMeta(
        teacher=str(teacher_name), teacher_fingerprint=teacher_fingerprint(teacher_name),
        vocab_size=None if model is None else int(vocab), k=k, temperature=temperature,
        dtype=_dtype_name(dtype), sequences=len(keys), positions=sum(len(p) for p in positions),
        dataset_digest=dataset_digest(keys), tokenizer_digest=tokenizer_digest(tokenizer),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        source_config=None if source_config is None else str(source_config), shards=shards,
        shard_size=shard_size, complete=False)
    state = {"model": model, "head": None}

    def compute(lo: int, hi: int) -> list[SparseTeacher]:
        if state["head"] is None:
            if state["model"] is None:
                state["model"] = teacher()
                loaded = _dtype_name(next(_unwrap(state["model"]).parameters()).dtype)
                if loaded != planned.dtype:
                    raise ValueError(f"the teacher loaded as {loaded}, expected dtype {planned.dtype}")
            state["model"].eval()
            state["model"].to(device)
            state["head"] = _unwrap(state["model"]).get_output_embeddings().weight
            if k > state["head"].shape[0]:
                raise ValueError(f"k={k} exceeds the teacher's vocabulary ({state['head'].shape[0]})")
            if planned.vocab_size is None:  # a lazily loaded teacher: record it before any shard
                planned.vocab_size = int(state["head"].shape[0])
                planned.write(folder)
        order = sorted(range(lo, hi), key=lambda i: -len(tokens[i]))  # stable: ties in dataset order
        results: dict[int, SparseTeacher] = {}
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chosen = order[start: start + batch_size]
                # right padding under the attention mask: the pad id (0) is never attended to
                parts = _sparse_rows(state["model"], state["head"], [(tokens[i], positions[i]) for i in chosen],
                                     k, temperature, device, 0)
                results.update(zip(chosen, parts))
                bar.update(len(chosen))
        return [results[i] for i in range(lo, hi)]

    from tqdm.auto import tqdm

    device = torch.device(device)
    bar = tqdm(total=len(keys), unit="seq", desc="teacher cache", disable=not progress)
    try:
        return write_cache(folder, planned, keys, [len(p) for p in positions], compute, restart,
                           skipped=bar.update)
    finally:
        bar.close()


def write_cache(folder: Path, planned: CacheMeta, keys: list[str], counts: list[int],
                compute: Callable[[int, int], list[SparseTeacher]], restart: bool,
                skipped: Callable[[int], object] = lambda n: None) -> CacheMeta:
    """Write the cache ``planned`` describes into ``folder`` shard by shard: ``compute(lo, hi)``
    gives the rows of the unique sequences ``keys[lo:hi]`` (called only for a shard not yet
    complete; ``skipped(n)`` is told of the ``n`` sequences of a shard kept from an earlier run).
    A folder with other settings is refused; ``cache.json`` says ``complete`` only at the end."""
    existing = _prepare_folder(folder, planned, restart)
    if existing is not None:
        planned.created = existing.created or planned.created
        planned.vocab_size = planned.vocab_size or existing.vocab_size
        if existing.complete and all(_shard_dir(folder, i).is_dir() for i in range(planned.shards)):
            return existing
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{SHARD_PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    planned.write(folder)
    for index in range(planned.shards):
        lo, hi = index * planned.shard_size, min((index + 1) * planned.shard_size, len(keys))
        shard = _shard_dir(folder, index)
        if _shard_complete(shard, keys[lo:hi]):
            skipped(hi - lo)
            continue
        _write_shard(shard, keys[lo:hi], counts[lo:hi], compute(lo, hi), planned.k)
    planned.complete = True
    planned.write(folder)
    return planned


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
                             f"version {VERSION}); {_REBUILD} --restart")
        meta = CacheMeta.from_dict(data)
        if not meta.complete:
            done = sum(_shard_dir(folder, i).is_dir() for i in range(meta.shards))
            raise ValueError(f"{folder}: the teacher cache is incomplete ({done} of {meta.shards} shards); "
                             "finish it by running axolotl-focus teacher-cache again with the same settings")
        import datasets

        parts = []
        for i in range(meta.shards):
            shard = _shard_dir(folder, i)
            if not shard.is_dir():
                raise ValueError(f"{folder}: shard {shard.name} is missing; {_REBUILD}")
            parts.append(datasets.load_from_disk(str(shard)))
        dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else (
            parts[0] if parts else datasets.Dataset.from_dict(
                {"key": [], "positions": [], "ids": [], "logq": [], "log_tail": []}, features=_shard_features()))
        if dataset.num_rows != meta.sequences:
            raise ValueError(f"{folder}: the shards hold {dataset.num_rows} sequences, {META_FILE} says "
                             f"{meta.sequences}; {_REBUILD}")
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
                                 f"was built for other data or settings ({_REBUILD})")
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
            input_ids, labels = _as_int_array(input_ids), _as_int_array(labels)
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
                             f"{first[0]}, {first[1]}): it was built for other data or settings ({_REBUILD})")

    def check_compatible(self, *, temperature: float | None = None, vocab_size: int | None = None,
                         tokenizer=None) -> None:
        """One-line ValueError unless the cache fits a training run's temperature, vocabulary size
        (the student's lm_head rows) and tokenizer (the digest is compared when both exist)."""
        meta, problems = self.meta, []
        if temperature is not None and float(temperature) != float(meta.temperature):
            problems.append(f"temperature {meta.temperature} (focus_temperature is {temperature})")
        if vocab_size is not None and meta.vocab_size is not None and int(vocab_size) != int(meta.vocab_size):
            problems.append(f"vocabulary {meta.vocab_size} (the student's is {vocab_size})")
        if (tokenizer is not None and meta.tokenizer_digest is not None
                and tokenizer_digest(tokenizer) != meta.tokenizer_digest):
            problems.append("another tokenizer")
        if problems:
            raise ValueError(f"teacher cache {self.path}: built with {', '.join(problems)}; {_REBUILD} --restart")


def _preview(ids: np.ndarray, n: int = 8) -> str:
    head = ", ".join(str(int(i)) for i in ids[:n])
    return f"[{head}{', ...' if len(ids) > n else ''}] ({len(ids)} tokens)"


def is_pair_row(attention_mask) -> bool:
    """A RePAIR pair row (segments marked 2 / 3 in the attention mask, see axolotl_focus.repair)."""
    if attention_mask is None:
        return False
    return bool((_as_int_array(attention_mask) >= 2).any())


def _list_column(column) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets [n + 1] starting at 0, values)`` of an Arrow list column (chunked or not)."""
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    offsets = np.asarray(column.offsets, dtype=np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values


def dataset_sft_rows(dataset, batch_size: int = 8192) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """The ``(input_ids, labels)`` of the rows of a tokenized dataset, RePAIR pair rows (attention
    mask values 2 / 3, see :func:`is_pair_row`) skipped. A ``datasets.Dataset`` is read as Arrow
    columns, ``batch_size`` rows at a time (numpy slices, no Python lists); any other dataset
    (a ``torch`` map-style dataset, a list of rows) row by row."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        columns = [c for c in ("input_ids", "labels", "attention_mask") if c in dataset.column_names]
        if "input_ids" not in columns or "labels" not in columns:
            raise ValueError(f"the tokenized dataset has no input_ids/labels columns (columns: {dataset.column_names})")
        arrow = dataset.select_columns(columns).with_format("arrow")
        for start in range(0, len(arrow), batch_size):
            table = arrow[start: start + batch_size]
            ids_at, ids = _list_column(table.column("input_ids"))
            labels_at, labels = _list_column(table.column("labels"))
            pair = np.zeros(len(ids_at) - 1, dtype=bool)
            if "attention_mask" in columns:
                mask_at, mask = _list_column(table.column("attention_mask"))
                marked = np.concatenate([[0], np.cumsum(mask >= 2)])
                pair = marked[mask_at[1:]] > marked[mask_at[:-1]]
            for row in np.flatnonzero(~pair):
                yield ids[ids_at[row]: ids_at[row + 1]], labels[labels_at[row]: labels_at[row + 1]]
        return
    for row in dataset:
        if not is_pair_row(row.get("attention_mask")):
            yield row["input_ids"], row["labels"]


def rows_from_config(config_path: str | os.PathLike, *, include_eval: bool = True,
                     extra_columns: Sequence[str] = ()) -> tuple[list, object]:
    """The (input_ids, labels) of the SFT rows of an axolotl config's tokenized datasets, as
    ``axolotl train`` loads them (``load_cfg`` with the plugin's register hook, then the datasets);
    RePAIR pair rows are skipped. A config with ``focus_teacher_cache`` (which may not exist yet)
    is loaded without that key, i.e. with the teacher it would load otherwise. The eval split
    follows the train rows when ``include_eval`` (the trainer computes the loss on it too). A row
    is ``(input_ids, labels, *extra_columns)``. Returns ``(rows, cfg)``."""
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    import yaml
    from axolotl.cli.config import load_cfg

    def refuse_packing(config) -> None:
        for key in ("sample_packing", "eval_sample_packing"):
            if config.get(key):
                raise ValueError(f"{config_path}: {key}: true is not supported by the teacher cache (a packed row "
                                 f"is not one cached sequence); set {key}: false")

    try:
        with open(config_path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ValueError(f"{config_path}: no such config file") from None
    overrides = {}
    if isinstance(raw, dict):
        refuse_packing(raw)  # before axolotl validates the config and prepares anything
        if raw.get("focus_teacher_cache"):  # the cache this config trains from: load it as the config without
            overrides["focus_teacher_cache"] = None  # it (same data, teacher as the plugin resolves it)
    cfg = load_cfg(str(config_path), **overrides)
    refuse_packing(cfg)
    if cfg.get("rl"):
        raise ValueError(f"{config_path}: rl: {cfg.rl} trains without the FOCUS/KD teacher; no teacher cache needed")
    dataset_meta = None
    if cfg.get("plugins"):
        from axolotl.integrations.base import PluginManager

        dataset_meta = PluginManager.get_instance().load_datasets(cfg, preprocess=False)
    if dataset_meta is None:
        from axolotl.common.datasets import load_datasets

        dataset_meta = load_datasets(cfg=cfg)
    rows = []
    splits = [dataset_meta.train_dataset] + ([dataset_meta.eval_dataset] if include_eval else [])
    for dataset in splits:
        if dataset is None:
            continue
        wanted = ("input_ids", "labels", *extra_columns)
        missing = [c for c in wanted if c not in dataset.column_names]
        if missing:
            raise ValueError(f"{config_path}: the tokenized dataset has no {'/'.join(missing)} column(s) "
                             f"(columns: {dataset.column_names})")
        columns = [*wanted] + (["attention_mask"] if "attention_mask" in dataset.column_names else [])
        for batch in dataset.select_columns(columns).with_format(None).iter(batch_size=1024):
            masks = batch.get("attention_mask") or [None] * len(batch["input_ids"])
            for values in zip(*(batch[c] for c in wanted), masks):
                if not is_pair_row(values[-1]):
                    rows.append(values[:-1])
    return rows, cfg


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_teacher_cache_cli(args, load_teacher_fn: Callable | None = None) -> int:
    """``axolotl-focus teacher-cache``: see :mod:`axolotl_focus.cli`."""
    started = time.monotonic()
    if getattr(args, "from_kd_logprobs", False):
        from .kd_import import run_import_cli

        meta = run_import_cli(args)
    else:
        meta = _build_from_teacher(args, load_teacher_fn)
    size = folder_size(args.output)
    print(f"teacher cache: {args.output}")
    print(f"sequences {meta.sequences:,}, positions {meta.positions:,}, k {meta.k}, temperature {meta.temperature}, "
          f"teacher {meta.teacher} ({meta.dtype})")
    print(f"size {size / 2**20:.1f} MiB ({size / max(meta.positions, 1):.0f} B per position), "
          f"{time.monotonic() - started:.1f} s")
    return 0


def _build_from_teacher(args, load_teacher_fn: Callable | None) -> CacheMeta:
    from axolotl.loaders import load_tokenizer

    from .locations import resolve_model
    from .teacher import check_vocab_compat, load_teacher, resolve_dtype

    rows, cfg = rows_from_config(args.config)
    teacher_name = args.teacher or cfg.get("focus_teacher_model")
    if not teacher_name:
        raise ValueError(f"--teacher: not given and {args.config} has no focus_teacher_model")
    resolve_model(str(teacher_name), "--teacher" if args.teacher else "focus_teacher_model")
    temperature = args.temperature if args.temperature is not None else (cfg.get("focus_temperature") or 2.0)
    if args.dtype:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    else:
        dtype = resolve_dtype(cfg.get("focus_teacher_dtype") or "auto", bool(cfg.get("bf16")), bool(cfg.get("fp16")))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    tokenizer = load_tokenizer(cfg)
    from transformers import AutoTokenizer

    check_vocab_compat(tokenizer, AutoTokenizer.from_pretrained(str(teacher_name)))
    existing = read_meta(args.output)
    shard_size = args.shard_size or (existing.shard_size if existing is not None else DEFAULT_SHARD_SIZE)
    return build_cache(lambda: (load_teacher_fn or load_teacher)(str(teacher_name), dtype), rows, args.output,
                       k=args.k, temperature=temperature, batch_size=args.batch_size, device=device,
                       progress=not args.no_progress, teacher_name=str(teacher_name), tokenizer=tokenizer,
                       shard_size=shard_size, restart=args.restart, source_config=str(args.config),
                       dtype=dtype)
