"""Building a teacher cache from a teacher model: teacher forward -> top-k sparse rows -> shards.

The teacher's logits are those the in-process teacher of the trainer would use: the decoder's
last hidden state (``get_decoder()``) times the lm_head weight, in the teacher's dtype, then fp32;
sequences are run in batches (sorted by length within a shard, right padding, attention mask), and
only the hidden states of trained positions go through the lm_head, a bounded chunk at a time.

The shards are written by :func:`axolotl_focus.train.teacher_cache.shards.write_cache`
(resumable); the format is :mod:`axolotl_focus.train.teacher_cache.format`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..losses import SparseTeacher, sparse_teacher_from_logits
from ..teacher import unwrap
from .format import (
    DEFAULT_SHARD_SIZE,
    CacheMeta,
    as_int_array,
    dataset_digest,
    sequence_key,
    teacher_fingerprint,
    tokenizer_digest,
    trained_positions,
)
from .shards import write_cache

# fp32 elements of one [chunk, V] teacher-logit block (sparse_teacher_from_logits needs ~3 of them)
LOGIT_CHUNK_ELEMENTS = 1 << 25


def _teacher_hidden(teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state ``[B, T, H]`` of the teacher, as the trainer's in-process teacher gets it."""
    model = unwrap(teacher)
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
        input_ids, labels = as_int_array(input_ids), as_int_array(labels)
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
                source_config: str | None = None, dtype: str | torch.dtype | None = None,
                data: dict | None = None) -> CacheMeta:
    """Build (or finish) the teacher cache of ``rows`` in ``path``; returns its :class:`CacheMeta`.

    ``teacher``: a causal LM (put in eval mode and moved to ``device``; run without grad), or a
    function without arguments returning one, called only if a shard must be computed (then
    ``dtype``, its compute dtype, must be given; a module's own dtype is recorded otherwise).
    ``rows``: the (input_ids, labels) of the SFT sequences (not RePAIR pair rows); duplicates and
    rows without a trained position are skipped. ``teacher_name``: its path or hub id (for the
    fingerprint). ``tokenizer``: the tokenizer that tokenized ``rows`` (for the digest; None: no
    digest). ``data``: :func:`~axolotl_focus.train.teacher_cache.format.data_sources` of the config the
    rows come from (recorded for ``validate``). See the module docstring for the format and resuming.
    """
    folder = Path(path)
    k, shard_size, batch_size = int(k), int(shard_size), int(batch_size)
    temperature = float(temperature)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be at least 1, got {shard_size} and {batch_size}")
    lazy = callable(teacher) and not isinstance(teacher, torch.nn.Module)
    model = None if lazy else teacher
    if model is not None:
        dtype = next(unwrap(model).parameters()).dtype
        vocab = unwrap(model).get_output_embeddings().weight.shape[0]
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
        source_config=None if source_config is None else str(source_config), data_sources=data, shards=shards,
        shard_size=shard_size, complete=False)
    state = {"model": model, "head": None}

    def compute(lo: int, hi: int) -> list[SparseTeacher]:
        if state["head"] is None:
            if state["model"] is None:
                state["model"] = teacher()
                loaded = _dtype_name(next(unwrap(state["model"]).parameters()).dtype)
                if loaded != planned.dtype:
                    raise ValueError(f"the teacher loaded as {loaded}, expected dtype {planned.dtype}")
            state["model"].eval()
            state["model"].to(device)
            state["head"] = unwrap(state["model"]).get_output_embeddings().weight
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

    device = torch.device(device)
    bar = tqdm(total=len(keys), unit="seq", desc="teacher cache", disable=not progress)
    try:
        return write_cache(folder, planned, keys, [len(p) for p in positions], compute, restart,
                           skipped=bar.update)
    finally:
        bar.close()


