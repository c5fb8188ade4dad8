"""Calibration data of pruning: the texts (`load_calibration_texts`) and the token windows cut
from them (`build_calibration`, `calibration_ids`) that importance and block scores are computed on.

Texts: the embedded WikiText-2 valid slice by default, a local .txt (one paragraph per line) or
.jsonl file (`calibration_field` of each object), or a hub dataset, streamed (a seeded shuffle
buffer of `STREAM_BUFFER` rows, at most `STREAM_MAX_ROWS` read). Windows: `calib_samples` seeded
random windows of `calib_seq_len` tokens, one per text long enough, the rest cut from all texts
concatenated. The module imports torch only inside the functions that build windows.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..files import read_lines
from ..micro import corpus_documents
from ..sources import load_hub_dataset, missing_file

if TYPE_CHECKING:
    import torch

    from .settings import PruneSettings

log = logging.getLogger(__name__)

# hub calibration datasets are streamed: seeded shuffle in a buffer of this many rows, then rows are
# read until enough texts are long enough for the windows (at most STREAM_MAX_ROWS)
STREAM_BUFFER = 10_000
STREAM_MAX_ROWS = 100_000


def load_calibration_texts(spec: PruneSettings) -> tuple[list[str], str]:
    """Calibration texts and a description: the embedded WikiText-2 slice by default, a local
    .txt (one paragraph per line) / .jsonl file, or a hub dataset (`datasets.load_dataset` with
    `calibration_config`, streamed: a seeded shuffle buffer, then non-empty texts are read until
    `calib_samples` of them have at least `calib_seq_len` words, so at least as many tokens)."""
    kind, path = calibration_source(spec)
    if kind == "embedded":
        return corpus_documents("valid"), "embedded WikiText-2 valid slice (CC BY-SA 3.0)"
    if kind == "file" and path.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(read_lines(path, "focus_prune.calibration"), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)[spec.calibration_field])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"focus_prune.calibration: {path}:{lineno}: expected a JSON object with a "
                    f"{spec.calibration_field!r} field ({exc})"
                ) from None
        return texts, f"{path} (field {spec.calibration_field})"
    if kind == "file":
        lines = [line.strip() for line in read_lines(path, "focus_prune.calibration")]
        return [line for line in lines if line], str(path)
    source = spec.calibration  # a hub dataset id
    name = f"{source} ({spec.calibration_config})" if spec.calibration_config else source
    data = load_hub_dataset(source, spec.calibration_config, spec.calibration_split, streaming=True)
    data = data.shuffle(seed=spec.seed, buffer_size=STREAM_BUFFER).take(STREAM_MAX_ROWS)
    texts, long_enough = [], 0
    for row in data:
        if spec.calibration_field not in row:
            raise ValueError(f"focus_prune.calibration_field: {name} [{spec.calibration_split}] has no "
                             f"{spec.calibration_field!r} column (columns: {', '.join(row)})")
        text = row[spec.calibration_field]
        if isinstance(text, str) and text.strip():
            texts.append(text)
            long_enough += len(text.split()) >= spec.calib_seq_len
            if long_enough >= spec.calib_samples:
                break
    if not texts:
        raise ValueError(f"focus_prune.calibration: {name} [{spec.calibration_split}] field "
                         f"{spec.calibration_field!r} holds no text")
    return texts, (f"{name} [{spec.calibration_split}] field {spec.calibration_field}: {len(texts)} texts "
                   f"streamed (shuffle seed {spec.seed}, buffer {STREAM_BUFFER})")


def calibration_source(spec: PruneSettings) -> tuple[str, Path | None]:
    """("embedded" | "file" | "hub", the file); a local file that does not exist is an error."""
    source = spec.calibration
    if not source:
        return "embedded", None
    path = Path(source)
    if path.is_file():
        return "file", path
    if missing_file(source):
        raise ValueError(f"focus_prune.calibration: file {source} does not exist")
    return "hub", None


def build_calibration(
    tokenizer, texts: Sequence[str], num_samples: int = 10, seq_len: int = 64, seed: int = 0
) -> tuple[torch.Tensor, dict]:
    """`num_samples` random windows of `seq_len` tokens (seeded), one per text long enough, taken
    in a seeded random order; if too few texts are long enough, the rest are windows of all texts
    concatenated. Returns (input_ids [num_samples, seq_len], description for the metadata)."""
    import torch  # heavy: reading calibration texts needs no torch

    if not texts:
        raise ValueError("calibration texts: none given (gradient-based importance needs calibration text)")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    tokenized: dict[int, list[int]] = {}
    samples, windows = [], []
    for i in order:
        ids = tokenized[i] = tokenizer(texts[i])["input_ids"]
        if len(ids) >= seq_len:
            start = rng.randint(0, len(ids) - seq_len)
            samples.append(ids[start : start + seq_len])
            windows.append([i, start])
            if len(samples) == num_samples:
                break
    concatenated = 0
    if len(samples) < num_samples:
        eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
        stream = [t for i in range(len(texts)) for t in (tokenized.get(i) or tokenizer(texts[i])["input_ids"]) + eos]
        if len(stream) < seq_len:
            raise ValueError(
                f"calib_seq_len={seq_len}: the calibration texts hold only {len(stream)} tokens in total"
            )
        while len(samples) < num_samples:
            start = rng.randint(0, len(stream) - seq_len)
            samples.append(stream[start : start + seq_len])
            windows.append(["concat", start])
            concatenated += 1
        log.warning("calibration: %d of %d windows cut from the concatenated texts (texts too short)",
                    concatenated, num_samples)
    info = {
        "num_texts": len(texts),
        "samples": num_samples,
        "seq_len": seq_len,
        "seed": seed,
        "windows": windows,  # [text index, start token] per sample ("concat": from all texts joined)
        "from_concatenation": concatenated,
    }
    return torch.tensor(samples, dtype=torch.long), info


def calibration_ids(tokenizer, texts, cfg: PruneSettings, calibration_name: str | None) -> tuple[torch.Tensor, dict]:
    """The calibration input_ids [samples, seq_len] and their description: `texts` are windowed per
    cfg.calib_* (`build_calibration`), or already a tensor of token ids."""
    import torch  # heavy: reading calibration texts needs no torch

    if isinstance(texts, torch.Tensor):
        ids = texts.long()
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"calibration input_ids: expected [samples, seq_len >= 2], got {tuple(ids.shape)}")
        info = {"samples": ids.shape[0], "seq_len": ids.shape[1], "source": "pre-tokenized input_ids"}
    else:
        if tokenizer is None:
            raise ValueError("tokenizer: needed to tokenize the calibration texts")
        ids, info = build_calibration(tokenizer, list(texts or []), cfg.calib_samples, cfg.calib_seq_len, cfg.seed)
    if calibration_name:
        info["dataset"] = calibration_name
    return ids, info


