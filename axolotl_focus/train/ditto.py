"""DITTO (Xu et al., 2022): pseudo-repetition rows built from the SFT rows of a micro-batch.

A pseudo-repetition row is ``prefix + unit + unit + ...`` up to the maximum length (axolotl's
``sequence_len``, passed to the trainer as ``focus_sequence_len``; without it, the width of the
micro-batch), the last copy cut short. Labels cover the copies, not the prefix; the DITTO loss
(:func:`axolotl_focus.train.losses.ditto_loss`) compares every token of copy k >= 2 with the same token
of copy k - 1. Per sequence of the micro-batch (rows of packed batches are split where
``position_ids`` restart at 0):

* instruction rows (the first two labels are -100: a prompt): prefix = the prompt (instruction +
  input), unit = the labelled output up to its last labelled token, trailing EOS/pad removed (the
  paper's variant for instruction data);
* plain-text rows: prefix = the tokens up to and including the first sentence end (a token whose
  text ends with '.'), unit = the following tokens through the next sentence end. Fallbacks: no
  second sentence end -> the unit is the rest of the row; no sentence end at all, or nothing after
  the first one -> prefix = the first token (BOS), unit = the rest of the row.

The unit is cut to ``(max_length - len(prefix)) // 2`` tokens so that at least two copies fit;
sequences with no room for a 1-token unit twice, or with an empty unit, give no row.

"Half of the updates" (the paper) is decided per optimizer step by :func:`is_ditto_step`, the same
for every gradient-accumulation micro-batch and every rank.
"""

from __future__ import annotations

import random

import torch

from .losses import IGNORE_INDEX


def sentence_end_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens whose decoded text ends with '.' (trailing whitespace ignored)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return frozenset(i for i, text in enumerate(texts) if text.rstrip().endswith("."))


def is_ditto_step(seed: int, global_step: int, probability: float) -> bool:
    """Whether optimizer step ``global_step`` is a DITTO-only update: a draw seeded by (seed, step),
    so every micro-batch of the step and every rank decide alike."""
    return random.Random(seed * 1_000_003 + global_step).random() < probability


def split_sequences(inputs: dict) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of every sequence in the batch: attended tokens only, packed rows
    split where ``position_ids`` restart at 0."""
    ids, labels = inputs["input_ids"].tolist(), inputs["labels"].tolist()
    mask = inputs["attention_mask"].tolist() if inputs.get("attention_mask") is not None else None
    positions = inputs["position_ids"].tolist() if inputs.get("position_ids") is not None else None
    out = []
    for b, row in enumerate(ids):
        keep = [i for i in range(len(row)) if mask is None or mask[b][i] > 0]
        starts = [k for k, i in enumerate(keep) if k == 0 or (positions is not None and positions[b][i] == 0)]
        for s, e in zip(starts, starts[1:] + [len(keep)]):
            out.append(([row[i] for i in keep[s:e]], [labels[b][i] for i in keep[s:e]]))
    return out


def prefix_and_unit(ids: list[int], labels: list[int], ends: frozenset[int], stop_ids: set[int],
                    max_length: int) -> tuple[list[int], list[int]] | None:
    """The prefix and the repeated unit of one sequence (see the module docstring), or None."""
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not labelled:
        return None
    if len(labels) > 1 and labels[0] == labels[1] == IGNORE_INDEX:  # instruction row
        prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        prefix, unit = ids[:prompt], ids[prompt:labelled[-1] + 1]
    else:
        text = list(ids)
        while text and text[-1] in stop_ids:
            text.pop()
        stops = [i for i, token in enumerate(text) if token in ends]
        if stops and stops[0] + 1 < len(text):
            cut = stops[0] + 1
            unit_end = stops[1] + 1 if len(stops) > 1 else len(text)
            prefix, unit = text[:cut], text[cut:unit_end]
        else:
            prefix, unit = text[:1], text[1:]
    while unit and unit[-1] in stop_ids:
        unit.pop()
    unit = unit[: max(0, (max_length - len(prefix)) // 2)]
    return (prefix, unit) if unit else None


def pseudo_rows(inputs: dict, ends: frozenset[int], max_length: int, pad_id: int,
                stop_ids: set[int]) -> dict | None:
    """The pseudo-repetition batch of a micro-batch's SFT sequences, right-padded, or None.

    Keys: ``input_ids``, ``attention_mask``, ``labels`` (``[R, T]``), ``unit_len`` (``[R]``), and
    the lists ``prefix_len`` and ``lengths``.
    """
    rows, units, prefixes = [], [], []
    for ids, labels in split_sequences(inputs):
        parts = prefix_and_unit(ids, labels, ends, stop_ids, max_length)
        if parts is None:
            continue
        prefix, unit = parts
        room = max_length - len(prefix)
        rows.append(prefix + (unit * (room // len(unit) + 1))[:room])
        units.append(len(unit))
        prefixes.append(len(prefix))
    if not rows:
        return None
    width = max(len(r) for r in rows)
    device = inputs["input_ids"].device
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (row, prefix) in enumerate(zip(rows, prefixes)):
        ids[b, : len(row)] = torch.tensor(row)
        labels[b, prefix : len(row)] = ids[b, prefix : len(row)]
        mask[b, : len(row)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "unit_len": torch.tensor(units, device=device), "prefix_len": prefixes,
            "lengths": [len(r) for r in rows]}
