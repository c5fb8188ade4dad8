"""The RePAIR pair stream: ``focus_repair_pairs`` drawn apart from the SFT data.

With ``focus_repair_pairs: FILE`` (a pairs file written by ``axolotl-focus pairs``, or a hub dataset
id) and ``focus_repair_pairs_per_step: N``, every optimizer step adds the margin loss over exactly N
pairs, whatever the size of the SFT datasets, and the SFT data are sampled exactly as in a run
without pairs: the pairs are not a dataset of the config, so axolotl's dataset preparation, its
shuffle and the trainer's SFT sampler never see them.

**Order.** Pair ``j`` of the stream (``j = step * N + i``, ``i < N``) is row
``perm_e[j mod P]`` of the ``P`` usable pair rows, with ``e = j // P`` and ``perm_e`` the permutation
``numpy.random.default_rng([seed, e]).permutation(P)``: every pair once per pass over the file, a
new order each pass, computed from numbers alone - no torch random state is read or advanced, so a
resumed run draws the pairs the uninterrupted run would have drawn at the same step.

**Placement.** The N pairs of a step are shared out over its micro-batches (gradient accumulation)
and data-parallel ranks: pair ``i`` goes to slot ``i mod (A * W)`` where micro-batch ``a`` of rank
``r`` is slot ``a * W + r`` (``A`` = the step's micro-batches, ``W`` = the world size). The trainer
appends each slot's pairs to its micro-batch as rows ``prompt + chosen`` and ``prompt + rejected``
(:func:`append_pairs`, the layout of :class:`~axolotl_focus.train.pair_dataset.RepairCollator`), so
they run in the same forward pass as the SFT rows (one forward and one backward per micro-batch, as
DDP and DeepSpeed require), add nothing to CE or to its token count, and the margin loss is the mean
over the N pairs of the step (:meth:`FocusTrainer._pair_weight`): gradient accumulation and DDP give
the gradient of one step over all N pairs at once.

**Rows.** Each pair is tokenized as the dataset type tokenizes it (:func:`~axolotl_focus.train.pair_dataset.pair_ids`:
the recorded token ids when the row has them) and both continuations are cut to fit ``sequence_len``
(:func:`~axolotl_focus.train.pair_dataset.fit_pair`). Bad rows stop the run with ``file:line``
(or are skipped and counted with ``focus_repair_skip_bad_rows``); a file without a usable pair is an error.
:func:`check` reads a local file's rows that way before training (``validate``, the plugin's ``register``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import numpy as np
import torch

from ..account import Account
from ..config import focus_default
from ..files import read_lines
from ..locations import looks_local
from ..pair_rows import fit_pair, pair_ids
from .losses import IGNORE_INDEX
from .pair_dataset import check_pair_file, check_rows, dataset_rows, file_rows, pair_problem
from .tokenizer import measuring_tokenizer

Pair = tuple[list[int], list[int], list[int]]  # prompt, chosen, rejected token ids


@lru_cache(maxsize=4)
def pair_order(pairs: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the ``pairs`` rows used in pass ``epoch`` over the file."""
    return np.random.default_rng([seed, epoch]).permutation(pairs)


def slots(per_step: int, micro_batches: int, world_size: int) -> list[list[int]]:
    """Which of the step's ``per_step`` pairs each slot gets (slot ``a * world_size + rank``)."""
    count = micro_batches * world_size
    return [list(range(slot, per_step, count)) for slot in range(count)]


@dataclass
class PairStream:
    """The usable pair rows of ``source`` and the stream's ``per_step`` and ``seed``."""

    pairs: list[Pair]
    per_step: int
    seed: int
    source: str = ""
    skipped: int = 0

    def __post_init__(self):
        if not self.pairs:
            raise ValueError(f"focus_repair_pairs: {self.source} holds no usable RePAIR pair")
        if self.per_step < 1:
            raise ValueError(f"focus_repair_pairs_per_step: must be at least 1 (got {self.per_step})")

    @classmethod
    def load(cls, source: str, tokenizer, sequence_len: int | None, per_step: int, seed: int,
             skip_bad_rows: bool = False) -> "PairStream":
        """Read, check and tokenize every pair row of ``source``: a local JSON-lines file, or the
        train split of what axolotl's dataset loader reads for ``path: source`` (hub id, folder).
        ``sequence_len`` None: the pairs are not cut."""
        if os.path.isfile(source):
            rows = list(file_rows(source))
        else:
            rows = dataset_rows({}, {"path": source, "split": "train"})
            if rows is None:
                raise ValueError(f"focus_repair_pairs: cannot load {source} (a local JSON-lines pairs file written "
                                 "by `axolotl-focus pairs`, or a hub dataset / folder with a train split)")
            rows = list(rows)
        skipped = check_rows(rows, source, tokenizer, sequence_len, skip_bad_rows)
        pairs = [fit_pair(*pair_ids(tokenizer, row), sequence_len or 2**62) for _, row, _ in rows
                 if pair_problem(row, tokenizer, sequence_len) is None]
        return cls(pairs, per_step, seed, source, skipped)

    def step_pairs(self, step: int) -> list[int]:
        """Indices (into :attr:`pairs`) of the ``per_step`` pairs of optimizer step ``step``."""
        n = len(self.pairs)
        out = []
        for j in range(step * self.per_step, (step + 1) * self.per_step):
            out.append(int(pair_order(n, self.seed, j // n)[j % n]))
        return out

    def for_micro_batch(self, step: int, micro: int, micro_batches: int, rank: int = 0,
                        world_size: int = 1) -> list[Pair]:
        """The pairs of micro-batch ``micro`` (of ``micro_batches``) on ``rank`` at ``step``."""
        chosen = self.step_pairs(step)
        return [self.pairs[chosen[i]] for i in slots(self.per_step, micro_batches, world_size)[micro * world_size
                                                                                               + rank]]


def append_pairs(batch: dict, pairs: list[Pair], pad_id: int, padding_side: str = "right") -> dict:
    """``batch`` (a collated micro-batch) with each pair appended as two rows, ``prompt + chosen``
    and ``prompt + rejected``, whose targets go to ``repair_labels`` (the keys of
    :class:`~axolotl_focus.train.pair_dataset.RepairCollator`; pairs a batch already holds are kept).
    Every row is padded to the widest one on ``padding_side``; tensors stay on the batch's device."""
    if not pairs:
        return batch
    ids = batch["input_ids"]
    rows, labels, count = [], [], ids.shape[0]
    chosen, rejected = [], []
    for prompt, good, bad in pairs:
        for cont, sink in ((good, chosen), (bad, rejected)):
            sink.append(count + len(rows))
            rows.append(list(prompt) + list(cont))
            labels.append([IGNORE_INDEX] * len(prompt) + list(cont))
    width = max(ids.shape[1], max(map(len, rows)))
    left = padding_side == "left"

    def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
        extra = width - tensor.shape[1]
        return torch.nn.functional.pad(tensor, (extra, 0) if left else (0, extra), value=value)

    def new(values: list[list[int]], value: int) -> torch.Tensor:
        out = [([value] * (width - len(v)) + v) if left else (v + [value] * (width - len(v))) for v in values]
        return torch.tensor(out, dtype=torch.long, device=ids.device)

    out = dict(batch)
    out["input_ids"] = torch.cat([pad(ids, pad_id), new(rows, pad_id)])
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    out["attention_mask"] = torch.cat([pad(mask, 0), new([[1] * len(r) for r in rows], 0)])
    if "labels" in batch:
        out["labels"] = torch.cat([pad(batch["labels"], IGNORE_INDEX), new([[IGNORE_INDEX] * len(r) for r in rows],
                                                                           IGNORE_INDEX)])
    if "position_ids" in batch:
        out["position_ids"] = torch.cat([pad(batch["position_ids"], 0), new([list(range(len(r))) for r in rows], 0)])
    old = batch.get("repair_labels")
    old = torch.full_like(ids, IGNORE_INDEX) if old is None else old
    out["repair_labels"] = torch.cat([pad(old, IGNORE_INDEX), new(labels, IGNORE_INDEX)])
    for key, new_rows in (("repair_chosen", chosen), ("repair_rejected", rejected)):
        before = batch.get(key)
        before = ids.new_zeros(0) if before is None else before
        out[key] = torch.cat([before, torch.tensor(new_rows, dtype=torch.long, device=ids.device)])
    return out


def check(cfg: Mapping, account: Account) -> None:
    """``focus_repair_pairs`` before training: a local pairs file exists and its rows pass the dataset
    type's checks (prompts measured against ``sequence_len`` with the student's tokenizer)."""
    path = cfg.get("focus_repair_pairs")
    if not path:
        return
    path = str(path)
    per_step = cfg.get("focus_repair_pairs_per_step") or focus_default("focus_repair_pairs_per_step")
    if not looks_local(path):
        account.say("pairs", f"{path}: hub dataset (train split), {per_step} pairs per optimizer step")
        return
    if not os.path.isfile(path):
        what = "is a directory; give the JSON-lines pairs file" if os.path.isdir(path) else "does not exist"
        account.error("focus_repair_pairs", f"{path} {what} (mine it first: axolotl-focus pairs)")
        return
    tokenizer = measuring_tokenizer(cfg, account)  # prompts measured as the trainer fits them
    try:
        bad = check_pair_file(path, bool(cfg.get("focus_repair_skip_bad_rows")), tokenizer, cfg.get("sequence_len"))
        rows = sum(1 for line in read_lines(path) if line.strip())
    except ValueError as exc:
        account.error("focus_repair_pairs", str(exc))
        return
    measured = f", prompts measured against sequence_len {cfg.get('sequence_len')}" if tokenizer else ""
    account.say("pairs", f"{path}: {rows - bad} pairs checked{measured}"
                + (f" ({bad} bad ones skipped)" if bad else "") + f", drawn {per_step} per optimizer step apart from "
                "the SFT data")
