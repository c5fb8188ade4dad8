"""The check of a config's ``datasets:`` before training: every local file exists and reads as
axolotl's loaders read it (UTF-8, JSON lines), and the rows of local RePAIR pair files (``type:
axolotl_focus.repair``) and DPO pair files (``rl: dpo`` datasets without a ``type``) pass the dataset
type's checks (``file:line`` of the first bad row; RePAIR prompts measured against
``sequence_len`` with the student's tokenizer)."""

from __future__ import annotations

import json
import os
from typing import Mapping

from ..account import Account
from ..config import REPAIR_TYPE
from ..files import read_lines, read_text
from ..locations import looks_local
from .pair_dataset import check_pair_file
from .tokenizer import measuring_tokenizer

__all__ = ["check"]

_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".txt")
_READ_LIMIT = 256 << 20  # local JSON datasets up to this size are parsed by validate


def _json_lines_problem(path: str) -> str | None:
    """Why a local JSON-lines / JSON dataset file cannot be read as axolotl's JSON loader reads it
    (not UTF-8, a line that is not JSON), with ``file:line``; None when it can, or is too large to
    be read here."""
    if os.path.getsize(path) > _READ_LIMIT:
        return None
    text = read_text(path)  # raises naming file:line for bytes that are not UTF-8
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"{path}:{err.lineno}: not valid JSON ({err.msg})"
        return None
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{lineno}: not valid JSON ({err.msg})"
    return None


def check(cfg: Mapping, account: Account) -> None:
    """Every dataset of ``datasets:`` (see the module docstring)."""
    skip = bool(cfg.get("focus_repair_skip_bad_rows"))
    tokenizer = None
    for i, ds in enumerate(cfg.get("datasets") or []):
        key = f"datasets[{i}]"
        if not isinstance(ds, Mapping) or not ds.get("path"):
            continue
        path, kind = str(ds["path"]), ds.get("type")
        pairs = kind == REPAIR_TYPE or (cfg.get("rl") == "dpo" and not kind)
        label = "RePAIR pairs" if kind == REPAIR_TYPE else "DPO pairs" if pairs else f"type {kind}"
        if not looks_local(path):
            account.say("dataset", f"[{i}] {path} ({label}): hub dataset, loaded by axolotl")
            continue
        if not os.path.exists(path):
            hint = " (mine it first: axolotl-focus pairs)" if pairs else ""
            account.error(f"{key}.path", f"{path} does not exist{hint}")
            continue
        if os.path.isdir(path):
            found = [n for n in sorted(os.listdir(path)) if n.endswith(_DATA_SUFFIXES) or n == "dataset_info.json"]
            if not found:
                account.error(f"{key}.path", f"{path} is a folder without data files" + (
                    " (give the .jsonl file axolotl-focus pairs wrote)" if pairs else ""))
            else:
                account.say("dataset", f"[{i}] {path} ({label}): local folder, loaded by axolotl")
            continue
        try:
            if pairs and path.endswith(".jsonl"):  # RePAIR prompts measured as the dataset type will measure them
                measure = kind == REPAIR_TYPE and (tokenizer := tokenizer or measuring_tokenizer(cfg, account))
                bad = check_pair_file(path, skip, tokenizer if measure else None, cfg.get("sequence_len"))
                rows = sum(1 for line in read_lines(path) if line.strip())
                measured = f", prompts measured against sequence_len {cfg.get('sequence_len')}" if measure else ""
                account.say("dataset", f"[{i}] {path} ({label}): {rows} rows checked{measured}"
                            + (f", {bad} bad ones skipped" if bad else ""))
                continue
            problem = _json_lines_problem(path) if path.endswith((".jsonl", ".json")) else None
        except ValueError as exc:
            account.error(f"{key}.path", str(exc))
            continue
        if problem:
            account.error(f"{key}.path", problem)
        else:
            account.say("dataset", f"[{i}] {path} ({label}): local, loaded by axolotl")
