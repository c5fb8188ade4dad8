"""The RePAIR pair dataset type (`type: axolotl_focus.repair`, entry module :mod:`axolotl_focus.repair`)
and its collator.

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
two continuations within ``sequence_len``: ``len(prompt) + 2 > sequence_len``, the prompt
measured as it is tokenized, i.e. ``prompt_tokens`` when the row has the token-id fields, else the
tokenized ``prompt`` with BOS) are found by a pre-check in :func:`load`, before tokenization and
training. The error names the row: ``file:line`` for a local JSON-lines file, else
``path[split][index]`` of the dataset as axolotl's own loader returns it (hub dataset, directory,
``data_files``, JSON array). With ``focus_repair_skip_bad_rows: true`` the bad rows are dropped
instead (by the strategy's ``filter_rows``, same check) and one warning gives their count and the
first one. Invalid JSON is always an error (the JSON loader could not read the file anyway). If
the pre-check cannot load the dataset (or it is streamed), the same check runs at tokenization,
where the error names the dataset and the row's ``source_id`` (or the start of its prompt):
``datasets.map`` does not pass row indices to a strategy.
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

from ..files import read_lines
from ..pair_rows import FIELDS, MIN_CONTINUATION, fit_pair, pair_ids, row_problem
from .losses import IGNORE_INDEX

LOG = logging.getLogger(__name__)


PROMPT, CHOSEN, REJECTED = 1, 2, 3
HINT = (f"rows need string fields {', '.join(FIELDS)} with non-empty continuations and a prompt of at most "
        f"sequence_len - {2 * MIN_CONTINUATION} tokens; set `focus_repair_skip_bad_rows: true` to skip bad rows")


def pair_problem(row, tokenizer, sequence_len: int | None) -> str | None:
    """:func:`row_problem` including the prompt length, measured as :meth:`RepairPairStrategy.tokenize_prompt`
    measures it (so a row passing here never fails there)."""
    problem = row_problem(row)
    if problem or sequence_len is None:
        return problem
    return row_problem(row, sequence_len, len(pair_ids(tokenizer, row)[0]))


def check_rows(rows, source: str, tokenizer, sequence_len: int | None, skip_bad_rows: bool) -> int:
    """Check ``(where, row, parse_error)`` triples; raise on the first bad row unless
    ``skip_bad_rows`` (a parse error always raises), else log one warning with the count of bad
    rows. Returns that count."""
    bad, first, seen, count = 0, None, {}, 0
    for where, row, parse_error in rows:
        count += 1
        problem = parse_error or pair_problem(row, tokenizer, sequence_len)
        source_id = row.get("source_id") if isinstance(row, Mapping) else None
        if not problem and source_id is not None:
            if source_id in seen:
                problem = (f"duplicate source_id {source_id!r} (also at {seen[source_id]}; two runs appended to one "
                           "file?)")
            seen.setdefault(source_id, where)
        if problem:
            if not skip_bad_rows or parse_error:
                raise ValueError(f"{where}: RePAIR pair row: {problem} ({HINT})")
            bad += 1
            first = first or f"{where} ({problem})"
    if count == bad:
        raise ValueError(f"{source}: holds no usable RePAIR pair row ("
                         + (f"all {count} rows are bad; the first: {first}" if count else "the file is empty")
                         + "); mine pairs with axolotl-focus pairs")
    if bad:
        LOG.warning("skipping %d bad RePAIR rows of %s (focus_repair_skip_bad_rows); the first: %s",
                    bad, source, first)
    return bad


def file_rows(path: str):
    """``(path:line, row, parse error)`` of every non-blank line of a JSON-lines file."""
    for lineno, line in enumerate(read_lines(path, "RePAIR pairs"), 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line), None
            except json.JSONDecodeError as exc:
                yield f"{path}:{lineno}", None, f"invalid JSON ({exc.msg})"


def check_pair_file(path: str, skip_bad_rows: bool, tokenizer=None, sequence_len: int | None = None) -> int:
    """Validate every line of a local JSON-lines pair file before tokenization (the prompt length
    too when ``tokenizer`` and ``sequence_len`` are given).

    Raises ``ValueError`` naming ``path:line`` of the first bad row unless ``skip_bad_rows`` (invalid
    JSON always raises); else logs one warning with the count. Returns the number of bad rows.
    """
    return check_rows(file_rows(path), path, tokenizer, sequence_len if tokenizer is not None else None,
                       skip_bad_rows)


def _is_json_lines(path: str) -> bool:
    """A local file whose first non-blank character opens a JSON object (one object per line)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for chunk in iter(lambda: handle.read(4096), ""):
            text = chunk.lstrip()
            if text:
                return text.startswith("{")
    return False


def dataset_rows(cfg, ds_cfg: Mapping):
    """``(where, row, None)`` over the dataset axolotl's own loader returns for ``ds_cfg``, or None when
    it cannot be loaded here (then the tokenize-time check applies) or the split is ambiguous."""
    if cfg.get("streaming") or ds_cfg.get("streaming"):
        return None
    try:
        from axolotl.utils.data.shared import load_dataset_with_config  # heavy: only for a hub dataset or folder
        from axolotl.utils.dict import DictDefault
        from datasets import DatasetDict

        data = load_dataset_with_config(DictDefault(dict(ds_cfg)), cfg.get("hf_use_auth_token"))
    except Exception as exc:  # noqa: BLE001 - the pre-check is best effort; tokenization checks again
        LOG.info("RePAIR pre-check: could not load %s here (%s); rows are checked at tokenization",
                 ds_cfg.get("path"), exc)
        return None
    path, split = ds_cfg.get("path"), ds_cfg.get("split")
    if isinstance(data, DatasetDict):
        if split not in data:
            in_train = any(d == ds_cfg for d in (cfg.get("datasets") or []))
            split = next(iter(data)) if len(data) == 1 else ("train" if in_train and "train" in data else None)
        if split is None:
            LOG.info("RePAIR pre-check: %s has splits %s and no `split:`; rows are checked at tokenization",
                     path, list(data))
            return None
        data = data[split]
    if not hasattr(data, "__len__"):
        return None
    label = f"{path}[{split}]" if split else str(path)
    return ((f"{label}[{i}]", row, None) for i, row in enumerate(data))


class RepairPairStrategy(PromptTokenizingStrategy):
    """Tokenizes ``prompt`` / ``chosen`` / ``rejected`` into one segment-marked row."""

    def __init__(self, tokenizer, sequence_len: int, skip_bad_rows: bool = False, source: str | None = None):
        super().__init__(None, tokenizer, train_on_inputs=False, sequence_len=sequence_len)
        self.skip_bad_rows = skip_bad_rows
        self.source = source or "the RePAIR dataset"
        self.skipped = 0  # rows skipped at tokenization (in this process)

    @property
    def filter_rows(self):
        """What axolotl filters the dataset with before tokenizing: drops bad rows when skipping
        (None: no filter pass)."""
        return self.keep_row if self.skip_bad_rows else None

    def keep_row(self, row) -> bool:
        return pair_problem(row, self.tokenizer, self.sequence_len) is None

    def _where(self, row) -> str:
        if isinstance(row, Mapping) and row.get("source_id") is not None:
            return f"{self.source} (row with source_id {row['source_id']!r})"
        prompt = row.get("prompt") if isinstance(row, Mapping) else None
        return f"{self.source} (row with prompt {str(prompt)[:40]!r})"

    def tokenize_prompt(self, row):
        problem = row_problem(row)
        prompt, chosen, rejected = pair_ids(self.tokenizer, row) if problem is None else ([], [], [])
        problem = problem or row_problem(row, self.sequence_len, len(prompt))
        if problem:
            if not self.skip_bad_rows:
                raise ValueError(f"{self._where(row)}: RePAIR pair row: {problem} ({HINT})")
            self.skipped += 1
            LOG.warning("skipping a bad RePAIR row of %s: %s (%d skipped at tokenization in this process; "
                        "focus_repair_skip_bad_rows)", self._where(row), problem, self.skipped)
            return {"input_ids": [], "attention_mask": [], "labels": []}
        prompt, chosen, rejected = fit_pair(prompt, chosen, rejected, self.sequence_len)
        return {
            "input_ids": prompt + chosen + rejected,
            "attention_mask": [PROMPT] * len(prompt) + [CHOSEN] * len(chosen) + [REJECTED] * len(rejected),
            "labels": [IGNORE_INDEX] * len(prompt) + chosen + rejected,
        }


def load(tokenizer, cfg, ds_cfg=None):
    """Axolotl dataset-type entry point for ``type: axolotl_focus.repair``: runs the pre-check
    (module docstring) and returns the strategy."""
    skip = bool(cfg.get("focus_repair_skip_bad_rows"))
    if ds_cfg is not None and not isinstance(ds_cfg, Mapping):
        ds_cfg = {k: getattr(ds_cfg, k, None) for k in ("path", "split", "name", "data_files", "ds_type")}
    path = (ds_cfg or {}).get("path")
    if path and os.path.isfile(path) and _is_json_lines(path):
        check_pair_file(path, skip, tokenizer, cfg.sequence_len)
    elif path:
        rows = dataset_rows(cfg, ds_cfg)
        if rows is not None:
            check_rows(rows, str(path), tokenizer, cfg.sequence_len, skip)
    return RepairPairStrategy(tokenizer, cfg.sequence_len, skip_bad_rows=skip, source=path)


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
