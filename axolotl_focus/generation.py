"""Batched generation shared by RePAIR mining, the evaluation and the Table 1 measurement: our own
KV-cache decoding loop (:func:`generate_batch`), its per-row stopping (:class:`RowStopper`), pure
top-p sampling (:func:`sample_top_p`), stable row seeds (:func:`row_seed`), the text of a
continuation (:func:`continuation_text`; ids are decoded by
:func:`axolotl_focus.prompt_format.decode_text`) and the accelerate process state the callers run
under (:func:`process_state`).

Decoding: the prompts (token ids) are LEFT padded by hand (a shared tokenizer's ``padding_side``
is never touched), with an attention mask and ``position_ids = cumsum(mask) - 1``; per-row EOS,
budgets and an optional :class:`~axolotl_focus.degeneration.LoopDetector` per row run in one
:class:`RowStopper`, and rows that ended are removed from the batch (and its KV cache). Sampling
is pure top-p (``top_k=0``; the models' own generation defaults such as a repetition penalty play
no part), or greedy. Every row draws from its own CPU ``torch.Generator`` seeded by
``row_seed(seed, row_seeds[i])``, so a row's continuation depends only on its prompt and seeds,
not on the other rows of its batch (up to float rounding of a forward pass under different
padding); the global torch RNG is not used. How the callers seed their rows: RePAIR mining by
source id (:mod:`axolotl_focus.mine.run`), the evaluation by batch
(:mod:`axolotl_focus.evaluate.generation`), Table 1 by prompt index
(:mod:`axolotl_focus.evaluate.table1`).

Text boundary: :func:`continuation_text` cuts a continuation's text from ONE decode of the whole
sequence (``decode(context + segment)[k:]``, ``k`` the length of the common prefix with
``decode(context)``), so context text + continuation text equals the decoded full sequence and no
character is lost or doubled at the boundary (SentencePiece leading spaces included); special
tokens are skipped.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from typing import Iterable, Sequence

import torch
from transformers import StoppingCriteria

from .degeneration import LoopDetector
from .prompt_format import decode_text

__all__ = [
    "RowStopper",
    "continuation_text",
    "generate_batch",
    "process_state",
    "row_seed",
    "sample_top_p",
]


def continuation_text(tokenizer, context: Sequence[int], segment: Sequence[int]) -> str:
    """Text of ``segment`` after ``context``, cut from one decode of ``context + segment``."""
    before = decode_text(tokenizer, context)
    full = decode_text(tokenizer, list(context) + list(segment))
    return full[len(os.path.commonprefix([before, full])) :]


def row_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from ``parts`` (ints and strings): the same on every machine, process
    and Python run (no ``hash()``), and unrelated for different parts (no ``seed + i`` overlaps)."""
    digest = hashlib.blake2b(json.dumps(list(parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RowStopper(StoppingCriteria):
    """Per-row stopping and bookkeeping of a batched generation: EOS, a per-row token budget, and
    optionally a :class:`LoopDetector` per row. Keeps each row's generated tokens (EOS excluded) in
    :attr:`tokens` and why it ended in :attr:`reason` (``eos``/``loop``/``budget``; a row with a
    budget ``<= 0`` ends before it starts, as ``budget``, with no tokens).

    :meth:`update` takes one new token for each of the given live rows (one forward pass) and
    says which of them ended; :func:`generate_batch` then drops those rows from the batch.
    :attr:`steps` counts the forward passes (decoding steps: one per new token position, the
    prefill included), :attr:`row_steps` the rows those passes computed (the sum over steps of
    the live rows), :attr:`padded_row_steps` (rows x steps) what a loop computes that keeps
    finished rows as padding until the whole batch has ended (HF ``generate``).

    Calling the object with the whole batch's ``input_ids`` (the ``StoppingCriteria`` interface
    of HF ``generate``) still works: it returns a per-row bool tensor, finished rows stay
    finished, and every row counts as computed (``generate`` pads them).
    """

    def __init__(self, budgets: Sequence[int], eos_ids: Iterable[int], detector_kwargs: dict | None = None):
        self.budgets = list(budgets)
        self.eos_ids = set(eos_ids)
        self.tokens: list[list[int]] = [[] for _ in self.budgets]
        self.reason: list[str | None] = ["budget" if b <= 0 else None for b in self.budgets]
        self.detectors = None if detector_kwargs is None else [LoopDetector(**detector_kwargs) for _ in self.budgets]
        self.steps = 0
        self.row_steps = 0

    @property
    def padded_row_steps(self) -> int:
        """Rows x steps: the cost when finished rows stay in the batch as padding."""
        return len(self.budgets) * self.steps

    def _push(self, row: int, token: int) -> bool:
        if self.reason[row] is None:
            if token in self.eos_ids:
                self.reason[row] = "eos"
            else:
                self.tokens[row].append(token)
                if self.detectors is not None and self.detectors[row].update(token):
                    self.reason[row] = "loop"
                elif len(self.tokens[row]) >= self.budgets[row]:
                    self.reason[row] = "budget"
        return self.reason[row] is not None

    def update(self, rows: Sequence[int], new_tokens: Sequence[int]) -> list[bool]:
        """One decoding step: ``new_tokens[j]`` is row ``rows[j]``'s token. Returns, per given
        row, whether it has ended (now or before)."""
        self.steps += 1
        self.row_steps += len(rows)
        return [self._push(row, int(token)) for row, token in zip(rows, new_tokens)]

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        done = self.update(range(len(self.budgets)), input_ids[:, -1].tolist())
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


_NUCLEUS_FIRST_K = 256  # candidates tried first for the nucleus (grown x8 until it fits, up to the vocabulary)


def sample_top_p(logits: torch.Tensor, generators: Sequence[torch.Generator], *, top_p: float,
                 temperature: float) -> torch.Tensor:
    """One token per row of ``logits`` ``[rows, vocab]``: ``softmax(logits / temperature)``,
    restricted to the top-p nucleus, then one draw from the renormalised nucleus.

    Nucleus: the smallest set of most probable tokens whose cumulative probability reaches
    ``top_p`` (a token is kept when the probability of the tokens ranked above it is ``< top_p``;
    the top token always), the rule of HF's ``TopPLogitsWarper`` (with ``top_k=0``); ``top_p >= 1``
    keeps the whole vocabulary. The draw is by inverse CDF with one uniform number from
    ``generators[row]`` (a CPU ``torch.Generator``) per row, so a row's token depends only on its
    own logits and generator, not on the other rows. The nucleus is searched among the top
    256 tokens first (x8 until it fits): exact, without sorting the whole vocabulary.
    """
    rows, vocab = logits.shape
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(logits.device)
    if top_p >= 1.0:
        cand_probs, cand_ids = probs.double(), None
        kept = torch.full((rows,), vocab, device=logits.device)
    else:
        k = min(vocab, _NUCLEUS_FIRST_K)
        while True:
            cand_probs, cand_ids = probs.topk(k, dim=-1)  # sorted, most probable first
            cand_probs = cand_probs.double()
            cum = cand_probs.cumsum(-1)
            # mass above the k-th candidate < top_p would let a (k+1)-th token in: need more candidates
            if k == vocab or bool((cum[:, -1] >= top_p).all()):
                break
            k = min(vocab, k * 8)
        keep = (cum - cand_probs) < top_p
        keep[:, 0] = True
        cand_probs = cand_probs * keep
        kept = keep.sum(-1)
    cdf = cand_probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    pick = torch.minimum(pick, kept - 1)  # u * total rounding up to total
    return pick if cand_ids is None else cand_ids.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


def _select_rows(cache, index: torch.Tensor) -> None:
    """Keep only the batch rows ``index`` of a KV cache (``DynamicCache``), in place."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(index)
        return
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"generate_batch: cannot drop rows from a {type(cache).__name__} KV cache")
    for layer in layers:
        layer.keys, layer.values = layer.keys[index], layer.values[index]


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    budgets: Sequence[int],
    *,
    seed: int = 0,
    row_seeds: Sequence[int] | None = None,
    do_sample: bool = True,
    top_p: float = 0.9,
    temperature: float = 1.0,
    detector_kwargs: dict | None = None,
    shrink: bool = True,
) -> RowStopper:
    """Generate for a batch of prompt ids at once: left padding, KV cache, per-row budgets; rows
    that end (EOS, budget, loop detector) leave the batch, so a step costs only the live rows.

    Our own decoding loop (not HF ``generate``; the model's generation defaults such as a
    repetition penalty play no part): the prompts are left padded with an attention mask and
    ``position_ids = cumsum(mask) - 1`` (0 on padding), as HF does; after each step the rows that
    ended are index-selected out of the next input, the mask, the positions and the KV cache.
    Greedy (``do_sample=False``) takes the argmax; sampling is :func:`sample_top_p` (temperature,
    top-p nucleus, one draw). Row ``i`` draws from its own CPU ``torch.Generator`` seeded with
    ``row_seed(seed, row_seeds[i])`` (default ``row_seeds[i] = i``), so its continuation depends
    on ``(seed, row_seeds[i])`` and its own prompt only, not on the other rows of the batch or
    when they stop (up to float rounding: a forward pass on a padded batch may differ from the
    unpadded one in the last bits). The global torch RNG is never used.

    ``shrink=False`` keeps ended rows in the batch as padding until every row has ended (what HF
    ``generate`` does; same tokens, for measuring the saving): then ``row_steps ==
    padded_row_steps``.

    Returns the :class:`RowStopper` with each row's tokens, stop reason, ``steps`` and
    ``row_steps`` (vs ``padded_row_steps``).
    """
    if len(budgets) != len(prompts):
        raise ValueError(f"generate_batch: {len(prompts)} prompts but {len(budgets)} budgets")
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"generate_batch: {len(prompts)} prompts but {len(row_seeds)} row seeds")
    eos_ids = _eos_ids(model, tokenizer)
    stopper = RowStopper(budgets, eos_ids, detector_kwargs)
    live = [i for i, reason in enumerate(stopper.reason) if reason is None]
    if not live:
        return stopper
    if any(len(prompts[i]) == 0 for i in live):
        raise ValueError("generate_batch: empty prompt (at least one token, e.g. BOS, is needed)")
    device = model.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(prompts[i]) for i in live)
    ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + list(prompts[i]) for i in live], device=device)
    mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in live], device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    generators = {}
    if do_sample:
        for i in live:
            generators[i] = torch.Generator().manual_seed(row_seed(seed, i if row_seeds is None else int(row_seeds[i])))
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache = None
    with torch.inference_mode():
        while True:
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, **extra)
            cache = out.past_key_values
            logits = out.logits[:, -1, :]
            if do_sample:
                new = sample_top_p(logits, [generators[i] for i in live], top_p=top_p, temperature=temperature)
            else:
                new = logits.float().argmax(-1)
            ended = stopper.update(live, new.tolist())
            if all(ended):
                return stopper
            if shrink and any(ended):
                keep = [j for j, e in enumerate(ended) if not e]
                index = torch.tensor(keep, device=device)
                live = [live[j] for j in keep]
                new, mask, positions = new[index], mask[index], positions[index]
                _select_rows(cache, index)
            ids = new.unsqueeze(-1)
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=-1)
            positions = positions[:, -1:] + 1


def process_state():
    """accelerate's process state. Without an accelerator, ask for CPU explicitly: otherwise
    ``PartialState()`` ignores a torchrun/``accelerate launch`` world and runs every rank alone."""
    from accelerate import PartialState  # heavy: only when a process state is asked for

    return PartialState(cpu=not torch.accelerator.is_available())
