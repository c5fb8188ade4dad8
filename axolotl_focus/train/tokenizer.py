"""The student's tokenizer as ``axolotl train`` loads it, from tokenizer and config files only: the
checks before training measure RePAIR prompts with it and compare a teacher cache's tokenizer to it."""

from __future__ import annotations

import copy
from typing import Mapping

from ..account import Account
from ..locations import ModelLocation

__all__ = ["measuring_tokenizer", "student_tokenizer"]


def student_tokenizer(cfg: Mapping, student: ModelLocation):
    """The student's tokenizer as ``axolotl train`` loads it (axolotl's ``load_tokenizer``: pad token,
    ``special_tokens`` of the config), from tokenizer and config files only; the plain
    ``AutoTokenizer`` where axolotl's loader cannot run on the raw config."""
    from transformers import AutoTokenizer  # heavy: loaded when a check reads a tokenizer

    base = cfg.get("base_model")
    source = cfg.get("tokenizer_config") if cfg.get("tokenizer_config") not in (None, base) else student.folder
    try:
        from axolotl.loaders import load_tokenizer  # heavy: axolotl, as `axolotl train` loads it
        from axolotl.utils.dict import DictDefault

        raw = DictDefault(copy.deepcopy(dict(cfg)))
        raw.update(base_model=student.folder, tokenizer_config=source)
        if raw.get("base_model_config") in (None, base):
            raw["base_model_config"] = student.folder
        return load_tokenizer(raw)
    except Exception:  # noqa: BLE001 - an unusual config: the tokenizer files as they are
        return AutoTokenizer.from_pretrained(source)


def measuring_tokenizer(cfg: Mapping, account: Account):
    """The student's tokenizer (as axolotl loads it) to measure RePAIR prompts against sequence_len,
    or None when the student's files cannot be read here."""
    student = account.student
    if student is None or not student.readable or not cfg.get("sequence_len"):
        return None
    try:
        return student_tokenizer(cfg, student)
    except (OSError, ValueError):
        return None
