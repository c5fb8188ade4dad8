"""The RePAIR pair dataset type (`type: axolotl_focus.repair`) and its collator.

A pair row (as written by `axolotl-focus pairs`, and read as-is by TRL's DPO trainer) is
``{"prompt": str, "chosen": str, "rejected": str, ...metadata}``. Axolotl concatenates all datasets
of a config into one table with the columns ``input_ids``, ``attention_mask`` and ``labels``, so a
pair is stored in those columns: ``input_ids = prompt + chosen + rejected`` and the attention mask
marks the segments with 1 (prompt), 2 (chosen) and 3 (rejected). Continuation tokens carry labels
(axolotl drops rows without any), but :class:`RepairCollator` moves them out of ``labels``: it
turns each pair into two batch rows, ``prompt + chosen`` and ``prompt + rejected``, whose targets
go to ``repair_labels``. So pair rows add nothing to CE/FOCUS or to the token count that
normalizes them, and ordinary SFT rows (alpaca etc.) can be mixed in the same config and batch.

Bad rows (missing or non-string field, empty continuation, a prompt that leaves no room for the
continuations within ``sequence_len``) stop the run before training with the file and line, or,
with ``focus_repair_skip_bad_rows: true``, are skipped with a counted warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from axolotl.prompt_tokenizers import PromptTokenizingStrategy
from axolotl.utils.collators import DataCollatorForSeq2Seq

LOG = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROMPT, CHOSEN, REJECTED = 1, 2, 3
FIELDS = ("prompt", "chosen", "rejected")
MIN_CONTINUATION = 1


def row_problem(row, sequence_len: int | None = None, prompt_len: int | None = None) -> str | None:
    """Why a pair row is unusable, or None."""
    if not isinstance(row, Mapping):
        return "not a JSON object"
    for field in FIELDS:
        if field not in row:
            return f"missing field {field!r}"
        if not isinstance(row[field], str):
            return f"field {field!r} is not a string"
    for field in ("chosen", "rejected"):
        if not row[field].strip():
            return f"empty {field} continuation"
    if sequence_len is not None and prompt_len is not None and prompt_len + 2 * MIN_CONTINUATION > sequence_len:
        return f"prompt of {prompt_len} tokens leaves no room for the continuations (sequence_len {sequence_len})"
    return None


def check_pair_file(path: str, skip_bad_rows: bool) -> set[int]:
    """Validate every line of a local JSONL pair file before tokenization.

    Returns the 0-based indices of non-empty rows to skip; raises ``ValueError`` naming the file
    and line of the first bad row unless ``skip_bad_rows``.
    """
    bad, index = set(), 0
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                problem = row_problem(json.loads(line))
            except json.JSONDecodeError as exc:
                problem = f"invalid JSON ({exc.msg})"
            if problem:
                if not skip_bad_rows:
                    raise ValueError(
                        f"{path}:{lineno}: RePAIR pair row: {problem} (rows need string fields "
                        f"{', '.join(FIELDS)}; set `focus_repair_skip_bad_rows: true` to skip bad rows)"
                    )
                bad.add(index)
            index += 1
    if bad:
        LOG.warning("%s: skipping %d bad RePAIR pair rows", path, len(bad))
    return bad


class RepairPairStrategy(PromptTokenizingStrategy):
    """Tokenizes ``prompt`` / ``chosen`` / ``rejected`` into one segment-marked row."""

    def __init__(self, tokenizer, sequence_len: int, skip_bad_rows: bool = False):
        super().__init__(None, tokenizer, train_on_inputs=False, sequence_len=sequence_len)
        self.skip_bad_rows = skip_bad_rows
        self.skipped = 0

    def _ids(self, row):
        """The exact token ids the miner recorded (``prompt_tokens`` etc.) when present - no
        re-tokenization at the prompt/continuation boundary - else the tokenized strings."""
        if all(isinstance(row.get(f"{k}_tokens"), list) for k in FIELDS):
            return row["prompt_tokens"], row["chosen_tokens"], row["rejected_tokens"]
        prompt = self.tokenizer(row.get("prompt") or "", add_special_tokens=True)["input_ids"]
        return (prompt, *(self.tokenizer(row.get(k) or "", add_special_tokens=False)["input_ids"]
                          for k in ("chosen", "rejected")))

    def tokenize_prompt(self, row):
        prompt, chosen, rejected = self._ids(row)
        problem = row_problem(row, self.sequence_len, len(prompt))
        if problem:
            if not self.skip_bad_rows:
                raise ValueError(f"RePAIR pair row: {problem}")
            self.skipped += 1
            return {"input_ids": [], "attention_mask": [], "labels": []}
        room = (self.sequence_len - len(prompt)) // 2
        chosen, rejected = list(chosen[:room]), list(rejected[:room])
        prompt = list(prompt)
        return {
            "input_ids": prompt + chosen + rejected,
            "attention_mask": [PROMPT] * len(prompt) + [CHOSEN] * len(chosen) + [REJECTED] * len(rejected),
            "labels": [IGNORE_INDEX] * len(prompt) + chosen + rejected,
        }


def load(tokenizer, cfg, ds_cfg=None):
    """Axolotl dataset-type entry point for ``type: axolotl_focus.repair``."""
    skip = bool(cfg.get("focus_repair_skip_bad_rows"))
    path = (ds_cfg or {}).get("path") if isinstance(ds_cfg, dict) else getattr(ds_cfg, "path", None)
    if path and os.path.isfile(path):
        check_pair_file(path, skip)
    strategy = RepairPairStrategy(tokenizer, cfg.sequence_len, skip_bad_rows=skip)
    strategy.filter_rows = lambda row: row_problem(row) is None if skip else True
    return strategy


def _split(feature: dict) -> tuple[list[int], list[int], list[int]]:
    ids, marks = feature["input_ids"], feature["attention_mask"]
    seg = {m: [t for t, k in zip(ids, marks) if k == m] for m in (PROMPT, CHOSEN, REJECTED)}
    return seg[PROMPT], seg[CHOSEN], seg[REJECTED]


def is_pair(feature: dict) -> bool:
    return max(feature["attention_mask"], default=0) > 1


@dataclass
class RepairCollator(DataCollatorForSeq2Seq):
    """Pads SFT rows as usual and expands each pair into a chosen row and a rejected row.

    Extra batch keys: ``repair_labels`` (targets of the pair rows, -100 elsewhere),
    ``repair_chosen`` / ``repair_rejected`` (row indices of each pair's two rows).
    """

    def __call__(self, features, return_tensors=None):
        rows, repair_labels, chosen_rows, rejected_rows = [], [], [], []
        pairs = []
        for feature in features:
            if is_pair(feature):
                pairs.append(_split(feature))
                continue
            rows.append({k: feature[k] for k in ("input_ids", "attention_mask", "labels")})
            repair_labels.append([IGNORE_INDEX] * len(feature["input_ids"]))
        for prompt, chosen, rejected in pairs:
            for cont, sink in ((chosen, chosen_rows), (rejected, rejected_rows)):
                sink.append(len(rows))
                ids = prompt + cont
                rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(ids)})
                repair_labels.append([IGNORE_INDEX] * len(prompt) + cont)
        batch = super().__call__(rows, return_tensors="pt")
        width = batch["input_ids"].shape[1]
        left = self.tokenizer.padding_side == "left"
        padded = [
            ([IGNORE_INDEX] * (width - len(r)) + r) if left else (r + [IGNORE_INDEX] * (width - len(r)))
            for r in repair_labels
        ]
        batch["repair_labels"] = torch.tensor(padded, dtype=torch.long)
        batch["repair_chosen"] = torch.tensor(chosen_rows, dtype=torch.long)
        batch["repair_rejected"] = torch.tensor(rejected_rows, dtype=torch.long)
        return batch


def uses_repair(cfg) -> bool:
    """Whether any dataset of the config is a RePAIR pair dataset."""
    return any(
        (d.get("type") if isinstance(d, dict) else getattr(d, "type", None)) == "axolotl_focus.repair"
        for d in (cfg.get("datasets") or [])
    )
