"""The RePAIR pair row, the file format shared by mining (which writes it), training (the pair
dataset type and the pair stream) and evaluation (the held-out pair margins).

A row is ``{"prompt": str, "chosen": str, "rejected": str, ...}``; rows written by
``axolotl-focus pairs`` also carry the exact token ids (``prompt_tokens``, ``chosen_tokens``,
``rejected_tokens``) and metadata (source id, onset, coverages, models, seed).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["FIELDS", "MIN_CONTINUATION", "fit_pair", "pair_ids", "row_problem"]

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
    if row["chosen"].strip() == row["rejected"].strip():
        return "chosen and rejected are the same text (the margin loss would push nothing apart)"
    if sequence_len is not None and prompt_len is not None and prompt_len + 2 * MIN_CONTINUATION > sequence_len:
        return f"prompt of {prompt_len} tokens leaves no room for the continuations (sequence_len {sequence_len})"
    return None


def pair_ids(tokenizer, row) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected token ids of a row: the exact ids the miner recorded
    (``prompt_tokens`` etc.) when present - no re-tokenization at the prompt/continuation
    boundary - else the tokenized strings (the prompt with the tokenizer's special tokens)."""
    if all(isinstance(row.get(f"{k}_tokens"), list) for k in FIELDS):
        return row["prompt_tokens"], row["chosen_tokens"], row["rejected_tokens"]
    prompt = tokenizer(row.get("prompt") or "", add_special_tokens=True)["input_ids"]
    return (prompt, *(tokenizer(row.get(k) or "", add_special_tokens=False)["input_ids"]
                      for k in ("chosen", "rejected")))


def fit_pair(prompt, chosen, rejected, sequence_len: int) -> tuple[list[int], list[int], list[int]]:
    """The pair cut to fit ``sequence_len``: each continuation keeps at most
    ``(sequence_len - len(prompt)) // 2`` tokens, so ``prompt + chosen + rejected`` fits one row."""
    room = (sequence_len - len(prompt)) // 2
    return list(prompt), list(chosen[:room]), list(rejected[:room])
