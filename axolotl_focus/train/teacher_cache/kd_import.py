"""A teacher cache from axolotl KD's offline top-k logprob datasets (no teacher model at all).

    axolotl-focus teacher-cache kd.yml --output DIR --from-kd-logprobs

``kd.yml`` is an axolotl config whose datasets use axolotl's KD dataset types
(``type: axolotl.integrations.kd.chat_template`` for rows with ``target_token_ids`` and float
logprobs, or ``...kd.chat_template.load_legacy`` for vLLM's ``{"token": "token_id:N", "logprob":
x}`` entries; ``logprobs_field``, ``temperature`` = the generation temperature ``T1``). axolotl's
own loader tokenizes them (:func:`axolotl_focus.train.teacher_cache.rows.rows_from_config`) into
``input_ids``, ``labels``, ``target_token_ids`` ``[L, k]`` and ``target_logprobs`` ``[L, k]``;
its KD strategy has already renormalized each row over its k tokens at ``T1`` and rescaled it to
``T2 = kd_temperature`` (``q^(T1/T2)`` renormalized; ``T2 = 1`` when the config has no
``kd_temperature``). The strategy right-aligns the logprob rows with the sequence and fills the
rows before them with ``-inf`` (``input_padding_len``).

Field mapping (per SFT sequence; RePAIR pair rows are skipped as in every teacher cache):

    cache key        sequence_key(input_ids, labels)  - the same as for the plain chat_template
                     dataset: the KD strategy is axolotl's chat_template strategy plus the target
                     columns, so a FOCUS config that trains the same data with ``type:
                     chat_template`` (and ``focus_teacher_cache: DIR``) finds every row
    trained position t (labels[t + 1] != -100, as in the cache)  <-  KD row t + 1
    ids[t]           target_token_ids[t + 1], reordered by decreasing probability
    logq[t]          log of the KD row's distribution rescaled from T2 to tau: (T2 / tau) *
                     target_logprobs[t + 1], renormalized over the k ids (log-sum-exp)
    log_tail[t]      -inf: the format keeps no tail mass (axolotl drops it when it renormalizes)
    temperature      tau (``--temperature``, default the config's focus_temperature, else 2.0)

Alignment: row j of a KD dataset is the teacher's distribution of token j given the tokens before
it (vLLM's logprobs of the generated tokens, and the only reading under which the KD strategy's
``target_mask[j] = labels[j] != -100`` marks exactly the trained tokens). The cache stores at
position t the distribution of token t + 1, hence row t + 1. (axolotl's own fused KD loss pairs
hidden state t with row t; this importer does not copy that pairing.) A trained position whose row
is a ``-inf`` padding row, holds a non-finite logprob or repeated ids is an error naming the
sequence and the token; rows must all have the same k.

Exactness: the k ids keep their relative teacher probabilities exactly (``p ~ exp(z / T)`` for
every T), but the teacher mass outside them is unknown, so the cached distribution is the
teacher's renormalized over its top k. With ``log_tail = -inf`` the loss is the full-vocabulary one
against that renormalized teacher (the tail tokens get only the student-side gradient).

The other direction (a cache as an axolotl KD dataset) is not offered: axolotl's KD dataset types
are chat-template strategies that tokenize conversations themselves, so they take no
pre-tokenized rows (completion text, RePAIR pairs), and they would drop the tail mass the cache
keeps.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...config import focus_default
from ...config_file import read_config
from ..losses import SparseTeacher
from .format import (
    DEFAULT_SHARD_SIZE,
    CacheMeta,
    data_sources,
    dataset_digest,
    sequence_key,
    tokenizer_digest,
    trained_positions,
)
from .rows import rows_from_config
from .shards import write_cache

SOURCE = "axolotl KD logprobs"
KD_COLUMNS = ("target_token_ids", "target_logprobs")


def sparse_from_kd_row(input_ids, labels, target_token_ids, target_logprobs, *, kd_temperature: float,
                       temperature: float, where: str = "row") -> SparseTeacher | None:
    """The cache rows of one tokenized KD sequence (see the module docstring), or None when it has
    no trained position. ``where`` names the sequence in errors."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    positions = trained_positions(labels)
    if not positions:
        return None
    try:
        ids = np.asarray(target_token_ids, dtype=np.int64)
        logp = np.asarray(target_logprobs, dtype=np.float64)
    except ValueError:
        raise ValueError(f"{where}: target_token_ids / target_logprobs rows differ in length (k must be the same "
                         "at every position)") from None
    if ids.ndim != 2 or ids.shape != logp.shape:
        raise ValueError(f"{where}: target_token_ids {list(ids.shape)} and target_logprobs {list(logp.shape)} must "
                         "both be [positions, k]")
    if ids.shape[0] != len(labels):
        raise ValueError(f"{where}: {ids.shape[0]} KD rows for {len(labels)} tokens (axolotl's KD strategy writes one "
                         "row per token)")
    rows = np.asarray(positions) + 1
    ids, logp = ids[rows], logp[rows]
    bad = ~np.isfinite(logp).all(axis=1)
    if bad.any():
        token = int(rows[np.argmax(bad)])
        raise ValueError(f"{where}: token {token} is trained (labels != -100) but its KD row has no finite teacher "
                         f"logprobs (padding before the logprobs start, or -inf values); the logprobs must cover "
                         f"every trained token")
    ordered = np.sort(ids, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        token = int(rows[np.argmax((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))])
        raise ValueError(f"{where}: the KD row of token {token} repeats a token id")
    scaled = logp * (float(kd_temperature) / float(temperature))
    scaled -= np.logaddexp.reduce(scaled, axis=1, keepdims=True)
    order = np.argsort(-scaled, axis=1, kind="stable")
    return SparseTeacher(torch.from_numpy(np.take_along_axis(ids, order, 1)),
                         torch.from_numpy(np.take_along_axis(scaled, order, 1).astype(np.float32)),
                         torch.full((len(rows),), -float("inf")), float(temperature))


def import_kd_rows(rows: Sequence, path: str | os.PathLike, *, kd_temperature: float, temperature: float,
                   vocab_size: int, tokenizer, source: str, shard_size: int = DEFAULT_SHARD_SIZE,
                   restart: bool = False, source_config: str | None = None, data: dict | None = None) -> CacheMeta:
    """Write the teacher cache of tokenized KD ``rows`` ``(input_ids, labels, target_token_ids,
    target_logprobs)`` into ``path``. ``vocab_size``: the student's vocabulary (ids are checked
    against it); ``source``: what the logprobs came from (recorded as the teacher). Every row is
    converted and checked before anything is written."""
    keys, parts, seen, k = [], [], set(), None
    digest = hashlib.blake2b(digest_size=16)
    for index, row in enumerate(rows):
        input_ids, labels, target_ids, target_logprobs = row
        part = sparse_from_kd_row(input_ids, labels, target_ids, target_logprobs, kd_temperature=kd_temperature,
                                  temperature=temperature, where=f"sequence {index}")
        if part is None:
            continue
        key = sequence_key(input_ids, labels)
        if key in seen:
            continue
        if k is not None and part.ids.shape[1] != k:
            raise ValueError(f"sequence {index}: k = {part.ids.shape[1]} logprobs per token, earlier sequences {k} "
                             "(the cache needs one k)")
        k = int(part.ids.shape[1])
        if int(part.ids.max()) >= vocab_size or int(part.ids.min()) < 0:
            raise ValueError(f"sequence {index}: token id {int(part.ids.max())} in target_token_ids is outside the "
                             f"vocabulary ({vocab_size}); were the logprobs made with another tokenizer?")
        seen.add(key)
        keys.append(key)
        parts.append(part)
        digest.update(part.ids.numpy().astype("<i4").tobytes())
        digest.update(part.logq.numpy().astype("<f4").tobytes())
    if not keys:
        raise ValueError("the KD datasets have no sequence with a trained token")
    shards = (len(keys) + shard_size - 1) // shard_size
    planned = CacheMeta(
        teacher=source, teacher_fingerprint={"source": SOURCE, "logprobs_digest": digest.hexdigest(),
                                             "kd_temperature": float(kd_temperature)},
        vocab_size=int(vocab_size), k=k, temperature=float(temperature), dtype=None, sequences=len(keys),
        positions=sum(int(p.ids.shape[0]) for p in parts), dataset_digest=dataset_digest(keys),
        tokenizer_digest=tokenizer_digest(tokenizer),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        source_config=None if source_config is None else str(source_config), data_sources=data, shards=shards,
        shard_size=shard_size)
    return write_cache(Path(path), planned, keys, [int(p.ids.shape[0]) for p in parts],
                       lambda lo, hi: parts[lo:hi], restart)


def check_kd_datasets(config_path: str | os.PathLike, raw: dict) -> None:
    """One-line ValueError unless every dataset of the config ``raw`` (the YAML as read, checked
    before anything is loaded) is an axolotl KD dataset (its ``type`` under
    ``axolotl.integrations.kd``)."""
    datasets = raw.get("datasets")
    if not datasets:
        raise ValueError(f"{config_path}: datasets: none given")
    for i, ds in enumerate(datasets):
        kind = ds.get("type") if isinstance(ds, dict) else None
        if not (isinstance(kind, str) and kind.startswith("axolotl.integrations.kd")):
            raise ValueError(f"{config_path}: datasets[{i}].type: {kind!r} is not an axolotl KD dataset; "
                             "--from-kd-logprobs reads type: axolotl.integrations.kd.chat_template (with "
                             "logprobs_field and target_token_ids)")


def run_import_cli(args) -> CacheMeta:
    """``axolotl-focus teacher-cache CONFIG --from-kd-logprobs``: see the module docstring."""
    from axolotl.loaders import load_tokenizer  # heavy: axolotl and transformers only once the command runs
    from transformers import AutoConfig

    rows, cfg = rows_from_config(args.config, extra_columns=KD_COLUMNS,
                                 check_raw=lambda raw: check_kd_datasets(args.config, raw))
    temperature = args.temperature if args.temperature is not None else (
        cfg.get("focus_temperature") or focus_default("focus_temperature"))
    kd_temperature = cfg.get("kd_temperature") or 1.0  # what axolotl's KD strategy rescaled the rows to
    tokenizer = load_tokenizer(cfg)
    vocab_size = int(AutoConfig.from_pretrained(str(cfg.base_model)).vocab_size)  # the student's lm_head rows
    shard_size = args.shard_size or DEFAULT_SHARD_SIZE
    return import_kd_rows(rows, args.output, kd_temperature=kd_temperature, temperature=temperature,
                          vocab_size=vocab_size, tokenizer=tokenizer, source=f"{SOURCE} of {args.config}",
                          shard_size=shard_size, restart=args.restart, source_config=str(args.config),
                          data=data_sources(read_config(str(args.config))[0]))
