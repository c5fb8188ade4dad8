"""RePAIR pair mining (paper section 4.2.1 and appendix B): degenerate negatives from the pruned
student, non-degenerate positives from the unpruned teacher, both continuing the same prefix.

Procedure, per prompt
---------------------
1. Prompt. Open-ended mode: the first ``prefix_tokens`` (paper: 50) tokens of the document,
   decoded and re-encoded with the tokenizer's special tokens (BOS), so that the prompt text and
   the prompt ids agree. Instruction mode: the whole prompt (``instruction`` + ``"\\n\\n"`` +
   ``input`` when present), rendered with the tokenizer's chat template when it has one and
   ``chat_template`` is on.
2. Negative. The student samples a continuation ``y_hat`` (top-p, temperature, at most
   ``max_new_tokens``; a row ends at EOS, which is not part of ``y_hat``). With ``early_stop`` a
   :class:`~axolotl_focus.degeneration.LoopDetector` per row stops the row as soon as the loop
   is confirmed (which implies ``coverage(y_hat) >= threshold``); the metrics below are computed
   on what was generated. In a batch a stopped row only stops producing tokens: it still takes
   part (as padding) in every forward pass until all rows of the batch have stopped, so compute
   is saved only by the decoding steps the whole batch skips (``student_steps_skipped`` in the
   summary; ``tokens_not_generated`` counts the stopped rows' unused budget). The prompt is
   degenerate when ``coverage(y_hat) >= threshold``: the coverage domain is the generated continuation only (the paper's model output ``y_hat``), never
   the prompt. ``onset`` = index in ``y_hat`` where the second copy of the repeated segment
   starts; the shared prefix is ``prompt + y_hat[:onset]`` (the text before the loop plus one
   full copy of the segment) and the rejected continuation is ``y_hat[onset:]``.
3. Positive. The teacher continues ``prompt + y_hat[:onset]`` with the same sampling, at most
   ``len(rejected)`` new tokens (or ``chosen_max_new_tokens``). It is kept if non-empty and
   ``coverage(chosen) < threshold`` (coverage of the chosen tokens only); otherwise it is
   re-sampled with a new seed, up to ``positive_attempts`` tries in all; then the pair is dropped.

Before the teacher runs, a negative is also dropped when its rejected text is blank, or (with
``require_rejected_degenerate``, the default; the paper only checks ``y_hat``) when
``coverage(rejected) < threshold``: the rejected part must be a loop on its own, i.e. hold at
least two copies of the segment. ``y_hat`` with exactly two copies (prefix = junk + copy 1,
rejected = copy 2 + a partial copy) passes the paper's test but not this one; a row stopped
early (3 clean copies by default) normally keeps 2 copies in rejected and passes.

Generation is batched (``batch_size`` prompts) with the KV cache and LEFT padding built by hand
(the shared tokenizer's ``padding_side`` is never touched); per-row EOS, budgets and loop
detection run in one :class:`RowStopper`. Sampling is pure top-p (``top_k=0``; the models' own
generation defaults such as a repetition penalty are overridden) under a fixed torch seed, with
the caller's RNG state restored afterwards.

Output rows (JSONL)
-------------------
``prompt`` (shared context text), ``chosen``, ``rejected`` (continuation texts, decoded with
``skip_special_tokens=True``), ``source_id``, ``onset``, ``coverage_rejected`` (of the rejected
tokens), ``coverage_chosen`` (of the chosen tokens), ``coverage_output`` (of ``y_hat``, the
selection criterion), ``student``, ``teacher``, ``seed`` (torch seed of the student sampling;
the accepted positive used ``seed + 1 + chosen_attempt``), ``chosen_attempt``, ``student_stop``
(why the student row ended: ``loop`` = early stop, ``budget``, ``eos``), and the exact token
ids ``prompt_tokens`` (prompt + prefix), ``rejected_tokens``, ``chosen_tokens``.
``len(prompt_tokens) - onset`` is the length of the original prompt.

Text boundary: every text is cut from ONE decode of the whole sequence: ``rejected`` is
``decode(context + rejected)[k:]`` with ``k`` the length of the common prefix with
``decode(context)``, so ``prompt + rejected`` equals the decoded full sequence and no character
is lost or doubled at the boundary (SentencePiece leading spaces included). In chat-template mode
``prompt`` starts with the rendered template (its markup kept, so the prompt re-tokenizes to the
model input; a DPO trainer must then not add a second BOS); generated text never contains
special tokens. The token-id fields are exact and need no re-tokenization.

Files and resume
----------------
``output`` gets the kept pairs; ``output + ".state"`` lists the tried prompts that produced no
pair (``{"source_id", "status"}`` with status ``not_degenerate``, ``no_positive`` or
``dropped``); ``output + ".summary.json"`` the last run's :class:`MiningSummary`. Each batch is
appended with one ``write`` + ``fsync`` per file (pairs first, then state); this is not atomic:
a kill mid-write can leave a partial last line. On start such a line is dropped (truncated), and
every source id with a complete line in the output or the state file is skipped, so a rerun never
duplicates rows nor retries those prompts (the others of the interrupted batch are mined again),
and a kill loses at most the batch in flight. Pairs already in the file count toward
``target_pairs``; mining stops once it is reached (a batch's surplus pairs are not written, and
their prompts stay untried). Changing the
sampling settings between runs is not detected.

Several processes (``accelerate launch``): the remaining prompts are split with
``PartialState().split_between_processes``; rank ``i`` writes ``<output stem>.rank{i}.jsonl``
(and its ``.state``) and rank 0 merges the shards into ``output`` at the end (deduplicated by
source id, capped at the target) and deletes them. Leftover shards of a crashed run are merged
when the next run starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .degeneration import DEFAULT_THRESHOLD, LoopDetector, coverage

LOG = logging.getLogger(__name__)

__all__ = [
    "MiningConfig",
    "MiningSummary",
    "Prompt",
    "RowStopper",
    "load_prompts",
    "encode_prompt",
    "generate_batch",
    "mine_pairs",
    "run_mining",
]

MODES = ("open_ended", "instruction")
TEXT_UNITS = ("paragraph", "line")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TEXT_FIELDS = ("text", "prompt", "instruction")  # tried in this order when text_field is None
_LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".text")


# --------------------------------------------------------------------------------------------
# Configuration and summary
# --------------------------------------------------------------------------------------------


@dataclass
class MiningConfig:
    """Settings of a mining run (defaults: the paper's; see the module docstring)."""

    prompts: str = ""  # local .jsonl / text file, or a hub dataset id
    output: str = "repair_pairs.jsonl"
    student: str | None = None  # path or hub id (run_mining only)
    teacher: str | None = None  # default: the student's recorded focus_source_model
    mode: str = "open_ended"  # "open_ended" | "instruction"
    text_field: str | None = None  # None: the first of text / prompt / instruction present
    input_field: str | None = "input"  # appended (after a blank line) when present and non-empty
    id_field: str | None = None  # None: line number (files) or row index (hub)
    text_unit: str = "paragraph"  # plain text files: "paragraph" (blank-line separated) | "line"
    dataset_config: str | None = None  # hub: configuration name (e.g. wikitext-103-raw-v1)
    split: str = "train"  # hub: split
    max_prompts: int | None = None  # use only the first N prompts
    prefix_tokens: int = 50  # k: open-ended prompt length in tokens
    max_new_tokens: int = 200  # student budget (paper Table 1: 200)
    chosen_max_new_tokens: int | None = None  # teacher budget; None: len(rejected continuation)
    top_p: float = 0.9
    temperature: float = 1.0
    seed: int = 0
    threshold: float = DEFAULT_THRESHOLD
    target_pairs: int = 12000  # paper: 12k pairs
    batch_size: int = 16
    positive_attempts: int = 3  # teacher samples per negative before the pair is dropped
    require_rejected_degenerate: bool = True  # also need coverage(rejected) >= threshold (stricter than the paper)
    early_stop: bool = True  # stop a student row once its loop is confirmed
    detector_min_tokens: int = 16
    detector_min_repeats: int = 3
    chat_template: bool = True  # instruction mode: use the tokenizer's chat template if any
    dtype: str = "auto"  # run_mining: model weights dtype
    device: str | None = None  # run_mining: default the process's accelerator (or CPU)
    trust_remote_code: bool = False
    progress: bool = True

    def validate(self, *, models: bool = False, prompts: bool = True) -> "MiningConfig":
        """Check every field; raise one ``ValueError`` naming each bad field. Loads nothing.

        ``prompts``: also check the prompt source (a local-looking path must exist);
        ``models``: also check that a student is given and a teacher is given or recorded.
        """
        errors: list[str] = []

        def bad(name: str, msg: str) -> None:
            errors.append(f"{name}: {msg} (got {getattr(self, name)!r})")

        if self.mode not in MODES:
            bad("mode", f"must be one of {MODES}")
        if self.text_unit not in TEXT_UNITS:
            bad("text_unit", f"must be one of {TEXT_UNITS}")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}")
        if not 0.0 < self.threshold < 1.0:
            bad("threshold", "must be in (0, 1)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not self.temperature > 0:
            bad("temperature", "must be > 0")
        for name in ("prefix_tokens", "max_new_tokens", "target_pairs", "batch_size", "positive_attempts",
                     "detector_min_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(name, "must be an integer > 0")
        for name in ("max_prompts", "chosen_max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                bad(name, "must be None or an integer > 0")
        if not isinstance(self.detector_min_repeats, int) or self.detector_min_repeats < 2:
            bad("detector_min_repeats", "must be an integer >= 2")
        if not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        self._check_output(bad)
        if prompts:
            if not self.prompts:
                bad("prompts", "is required (a .jsonl or text file, or a hub dataset id)")
            elif _looks_local(self.prompts) and not os.path.isfile(self.prompts):
                bad("prompts", "file not found")
        if models:
            if not self.student:
                bad("student", "is required")
            elif _looks_local(self.student) and not os.path.isdir(self.student):
                bad("student", "model directory not found")
            if self.student and not self.teacher_path():
                bad("teacher", "not given and the student records no focus_source_model in config.json")
            elif self.teacher and _looks_local(self.teacher) and not os.path.isdir(self.teacher):
                bad("teacher", "model directory not found")
        if errors:
            raise ValueError("invalid MiningConfig:\n  " + "\n  ".join(errors))
        return self

    def _check_output(self, bad) -> None:
        if not self.output:
            bad("output", "is required")
            return
        path = Path(self.output)
        if path.is_dir():
            bad("output", "is a directory; give a .jsonl file path")
            return
        parent = path.absolute().parent
        while not parent.exists():  # created on start; the nearest existing ancestor must be writable
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            bad("output", f"directory {parent} is not writable")
        elif path.exists() and not os.access(path, os.W_OK):
            bad("output", "file is not writable")

    def teacher_path(self) -> str | None:
        """The teacher: ``teacher`` or the ``focus_source_model`` recorded by the student."""
        if self.teacher:
            return self.teacher
        from .config import source_model_of

        return source_model_of(self.student)


@dataclass
class MiningSummary:
    """What a run did (counts are this run's, except ``pairs_total``)."""

    output: str = ""
    prompts_available: int = 0  # prompts given
    prompts_skipped_resume: int = 0  # already in the output or the state file
    prompts_tried: int = 0
    degenerate: int = 0  # student continuations with coverage >= threshold
    pairs_kept: int = 0
    pairs_total: int = 0  # rows in the output file after the run
    positives_rejected_looping: int = 0  # teacher samples with coverage >= threshold
    positives_rejected_empty: int = 0  # teacher samples that were empty / blank text
    pairs_dropped_no_positive: int = 0  # every teacher attempt was rejected
    negatives_dropped: int = 0  # rejected part not itself degenerate, or blank text
    early_stopped: int = 0  # student rows stopped by the loop detector
    # sum of max_new_tokens - generated over early-stopped rows: tokens they did not produce; NOT
    # compute saved, as a stopped row still rides along (padded) until its whole batch stops
    tokens_not_generated: int = 0
    student_tokens: int = 0  # tokens the student generated
    student_batches: int = 0  # batched student generate calls
    student_steps: int = 0  # decoding steps (batched forward passes) those calls ran
    # sum over student batches of max_new_tokens - steps run: the steps skipped because every row
    # of the batch had stopped (loop detector or EOS) early; the compute actually saved
    student_steps_skipped: int = 0
    teacher_tokens: int = 0  # tokens the teacher generated (all attempts)
    target_reached: bool = False
    elapsed_s: float = 0.0

    @property
    def degenerate_share(self) -> float:
        """Share of tried prompts whose student continuation was degenerate."""
        return self.degenerate / self.prompts_tried if self.prompts_tried else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"degenerate_share": self.degenerate_share}

    def merge(self, other: "MiningSummary") -> None:
        """Add another process's counts into this one (integers summed, elapsed maxed)."""
        for f in fields(self):
            value = getattr(other, f.name)
            if f.name == "elapsed_s":
                self.elapsed_s = max(self.elapsed_s, value)
            elif isinstance(value, int) and not isinstance(value, bool) and f.name != "pairs_total":
                setattr(self, f.name, getattr(self, f.name) + value)


def _looks_local(path: str) -> bool:
    """Whether ``path`` names a local file/folder rather than a hub id."""
    return (
        os.path.exists(path)
        or path.endswith(_LOCAL_SUFFIXES)
        or path.startswith(("/", "./", "../", "~"))
        or path.count("/") > 1
    )


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One prompt: a stable ``source_id`` (resume key) and its raw text."""

    source_id: str
    text: str


def _row_prompt(row: dict, where: str, text_field: str | None, input_field: str | None) -> str:
    name = text_field or next((k for k in TEXT_FIELDS if k in row), None)
    if name is None or name not in row:
        wanted = text_field or " / ".join(TEXT_FIELDS)
        raise ValueError(f"text_field: {where} has no field {wanted!r} (fields: {sorted(row)})")
    text = str(row[name] or "")
    extra = row.get(input_field) if input_field else None
    return f"{text}\n\n{extra}" if extra else text


def load_prompts(
    source: str,
    *,
    text_field: str | None = None,
    input_field: str | None = "input",
    id_field: str | None = None,
    text_unit: str = "paragraph",
    split: str = "train",
    dataset_config: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Prompts from a JSONL file, a plain text file, or a hub dataset (``datasets.load_dataset``).

    JSONL (``.jsonl``/``.json``, one object per line, or a JSON array): text from ``text_field``
    (default: the first of ``text``, ``prompt``, ``instruction`` present) plus
    ``"\\n\\n" + input_field`` when non-empty; source id from ``id_field`` or the 1-based line
    number (array: the 0-based position). Plain text: one document
    per paragraph (blank-line separated) or per line (``text_unit``), id = its first line number.
    Hub: same fields, id = ``id_field`` or the row index. Empty prompts are skipped; duplicate ids
    raise. ``limit`` keeps the first N prompts.
    """
    out: list[Prompt] = []

    def add(source_id: Any, text: str) -> bool:
        if text.strip():
            out.append(Prompt(str(source_id), text))
        return limit is not None and len(out) >= limit

    def row_id(row: dict, default: Any, where: str) -> Any:
        if not id_field:
            return default
        if id_field not in row:
            raise ValueError(f"id_field: {where} has no field {id_field!r}")
        return row[id_field]

    if os.path.isfile(source) and source.endswith((".jsonl", ".json")):
        with open(source, encoding="utf-8") as handle:
            content = handle.read()
        if content.lstrip().startswith("["):  # a JSON array: ids are 0-based positions
            records = [(i, f"{source}[{i}]", row) for i, row in enumerate(json.loads(content))]
        else:
            records = []
            for lineno, line in enumerate(content.split("\n"), 1):
                if line.strip():
                    try:
                        records.append((lineno, f"{source}:{lineno}", json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"prompts: {source}:{lineno} is not valid JSON ({err})") from None
        for default_id, where, row in records:
            if add(row_id(row, default_id, where), _row_prompt(row, where, text_field, input_field)):
                break
    elif os.path.isfile(source):
        with open(source, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        start, buf = None, []
        for lineno, line in enumerate(lines + [""], 1):
            if line.strip():
                start = start or lineno
                buf.append(line.strip())
            if (text_unit == "line" or not line.strip()) and buf:
                if add(start, " ".join(buf)):
                    break
                start, buf = None, []
    else:
        import datasets

        data = datasets.load_dataset(source, dataset_config, split=split)
        for index, row in enumerate(data):
            where = f"{source}[{split}][{index}]"
            if add(row_id(row, index, where), _row_prompt(row, where, text_field, input_field)):
                break
    ids = [p.source_id for p in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"id_field: duplicate source id {dup!r} in {source}")
    return out


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def encode_prompt(tokenizer, text: str, cfg: MiningConfig) -> tuple[str, list[int]]:
    """``(prompt_text, input_ids)`` of one prompt for ``cfg.mode`` (see the module docstring)."""
    if cfg.mode == "open_ended":
        head = tokenizer(text, add_special_tokens=False)["input_ids"][: cfg.prefix_tokens]
        ids = tokenizer(_decode(tokenizer, head))["input_ids"]
        return _decode(tokenizer, ids), list(ids)
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return rendered, list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return text, list(tokenizer(text)["input_ids"])


def _continuation_text(tokenizer, context: Sequence[int], segment: Sequence[int]) -> str:
    """Text of ``segment`` after ``context``, cut from one decode of ``context + segment``."""
    before = _decode(tokenizer, context)
    full = _decode(tokenizer, list(context) + list(segment))
    return full[len(os.path.commonprefix([before, full])) :]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


class RowStopper(StoppingCriteria):
    """Per-row stopping for batched ``generate``: EOS, a per-row token budget, and optionally a
    :class:`LoopDetector` per row. Returns a per-row bool tensor (rows already finished stay
    finished; ``generate`` pads them). Keeps each row's generated tokens (EOS and padding
    excluded) in :attr:`tokens` and why it ended in :attr:`reason` (``eos``/``loop``/``budget``).
    :attr:`steps` counts the calls, i.e. the decoding steps ``generate`` ran (one per new token
    position of the batch, finished rows included as padding).
    """

    def __init__(self, budgets: Sequence[int], eos_ids: Iterable[int], detector_kwargs: dict | None = None):
        self.budgets = list(budgets)
        self.eos_ids = set(eos_ids)
        self.tokens: list[list[int]] = [[] for _ in self.budgets]
        self.reason: list[str | None] = [None] * len(self.budgets)
        self.detectors = None if detector_kwargs is None else [LoopDetector(**detector_kwargs) for _ in self.budgets]
        self._done = torch.zeros(len(self.budgets), dtype=torch.bool)
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if self._done[row]:
                continue
            if token in self.eos_ids:
                self.reason[row] = "eos"
            else:
                self.tokens[row].append(token)
                if self.detectors is not None and self.detectors[row].update(token):
                    self.reason[row] = "loop"
                elif len(self.tokens[row]) >= self.budgets[row]:
                    self.reason[row] = "budget"
            self._done[row] = self.reason[row] is not None
        return self._done.to(input_ids.device).clone()


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch's RNG (sampling in ``generate``) without disturbing the caller's RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    budgets: Sequence[int],
    *,
    seed: int = 0,
    do_sample: bool = True,
    top_p: float = 0.9,
    temperature: float = 1.0,
    detector_kwargs: dict | None = None,
) -> RowStopper:
    """Generate for a batch of prompt ids at once: left padding, KV cache, per-row budgets.

    Pure top-p sampling (``top_k=0``; the model's own sampling defaults such as a repetition
    penalty are overridden) or greedy. Returns the :class:`RowStopper` holding each row's tokens.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    eos_ids = _eos_ids(model, tokenizer)
    stopper = RowStopper(budgets, eos_ids, detector_kwargs)
    sampling = (
        dict(do_sample=True, top_p=top_p, top_k=0, temperature=temperature, typical_p=1.0)
        if do_sample
        else dict(do_sample=False)
    )
    with _seeded(seed, model.device), torch.inference_mode():
        model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max(budgets),
            min_new_tokens=0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            use_cache=True,
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
            stopping_criteria=StoppingCriteriaList([stopper]),
            **sampling,
        )
    return stopper


# --------------------------------------------------------------------------------------------
# Files: appends with fsync, tail repair, resume, shards
# --------------------------------------------------------------------------------------------


def _repair_tail(path: str) -> int:
    """Truncate a partial last line (no trailing newline); return the bytes removed."""
    if not os.path.isfile(path):
        return 0
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb+") as handle:
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            chunk = handle.read(end - start)
            if end == size and chunk.endswith(b"\n"):
                return 0
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    LOG.warning("%s: removed a partial last line (%d bytes) left by an interrupted run", path, size - keep)
    return size - keep


def _append_rows(path: str, rows: Sequence[dict]) -> None:
    """Append complete JSON lines with one ``write`` call, then fsync (nothing if no rows)."""
    if not rows:
        return
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _state_path(output: str) -> str:
    return output + ".state"


def _shard_path(output: str, rank: int) -> str:
    base = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return f"{base}.rank{rank}.jsonl"


def _shards(output: str) -> list[str]:
    """Shard files ``<stem>.rank<i>.jsonl`` of ``output`` present on disk."""
    folder = os.path.dirname(os.path.abspath(output))
    name = os.path.basename(output)
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    pattern = re.escape(stem) + r"\.rank\d+\.jsonl"
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if re.fullmatch(pattern, n))


def _merge_shards(output: str, target: int) -> None:
    """Move shard rows/states into ``output`` (dedup by source id, at most ``target`` rows)."""
    shards = _shards(output)
    if not shards:
        return
    for path in [output, _state_path(output)] + shards + [_state_path(s) for s in shards]:
        _repair_tail(path)
    have = {r["source_id"] for r in _read_rows(output)}
    tried = {r["source_id"] for r in _read_rows(_state_path(output))}
    rows, states = [], []
    for shard in shards:
        for row in _read_rows(shard):
            if row["source_id"] not in have and len(have) < target:
                have.add(row["source_id"])
                rows.append(row)
        for row in _read_rows(_state_path(shard)):
            if row["source_id"] not in tried and row["source_id"] not in have:
                tried.add(row["source_id"])
                states.append(row)
    _append_rows(output, rows)
    _append_rows(_state_path(output), states)
    for shard in shards:
        for path in (shard, _state_path(shard)):
            if os.path.exists(path):
                os.remove(path)
    LOG.info("merged %d shard files into %s (+%d pairs)", len(shards), output, len(rows))


def _write_summary(output: str, summary: MiningSummary) -> None:
    tmp = output + ".summary.json.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(summary.to_dict(), handle, indent=2)
    os.replace(tmp, output + ".summary.json")


# --------------------------------------------------------------------------------------------
# Mining
# --------------------------------------------------------------------------------------------


def _partial_state():
    """accelerate's process state. Without an accelerator, ask for CPU explicitly: otherwise
    ``PartialState()`` ignores a torchrun/``accelerate launch`` world and runs every rank alone."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available())


def _as_prompts(prompts: Sequence[Prompt | str]) -> list[Prompt]:
    return [p if isinstance(p, Prompt) else Prompt(str(i), p) for i, p in enumerate(prompts)]


def _model_name(model, given: str | None) -> str:
    return given or getattr(model, "name_or_path", "") or type(model).__name__


@dataclass
class _Negative:
    """A degenerate student continuation and, once found, the teacher's positive for it."""

    prompt: Prompt
    text: str  # prompt text (as rendered)
    ids: list[int]  # prompt ids
    out: list[int]  # the student's continuation y_hat
    stop: str  # why the student row ended: loop / budget / eos
    onset: int
    coverage: float  # of y_hat
    rejected_coverage: float
    rejected_text: str
    chosen: tuple[list[int], str, float, int] | None = None  # tokens, text, coverage, attempt

    @property
    def context(self) -> list[int]:
        return self.ids + self.out[: self.onset]

    @property
    def rejected(self) -> list[int]:
        return self.out[self.onset :]


def _student_pass(student, tokenizer, batch: list[Prompt], cfg: MiningConfig, seed: int,
                  summary: MiningSummary, states: list[dict]) -> list[_Negative]:
    """Sample the student on a batch; return the usable negatives, record the others in ``states``."""
    encoded = [encode_prompt(tokenizer, p.text, cfg) for p in batch]
    detector = None
    if cfg.early_stop:
        detector = dict(threshold=cfg.threshold, min_tokens=cfg.detector_min_tokens,
                        min_repeats=cfg.detector_min_repeats)
    gen = generate_batch(student, tokenizer, [ids for _, ids in encoded], [cfg.max_new_tokens] * len(batch),
                         seed=seed, top_p=cfg.top_p, temperature=cfg.temperature, detector_kwargs=detector)
    summary.student_batches += 1
    summary.student_steps += gen.steps
    summary.student_steps_skipped += cfg.max_new_tokens - gen.steps
    negatives = []
    for prompt, (text, ids), out, stop in zip(batch, encoded, gen.tokens, gen.reason):
        summary.prompts_tried += 1
        summary.student_tokens += len(out)
        if stop == "loop":
            summary.early_stopped += 1
            summary.tokens_not_generated += cfg.max_new_tokens - len(out)
        res = coverage(out, threshold=cfg.threshold)
        if not res.is_degenerate:
            states.append({"source_id": prompt.source_id, "status": "not_degenerate"})
            continue
        summary.degenerate += 1
        rejected = out[res.onset :]
        neg = _Negative(prompt, text, ids, out, stop, res.onset, res.coverage,
                        coverage(rejected, threshold=cfg.threshold).coverage,
                        _continuation_text(tokenizer, ids + out[: res.onset], rejected))
        if not neg.rejected_text.strip() or (cfg.require_rejected_degenerate and neg.rejected_coverage < cfg.threshold):
            summary.negatives_dropped += 1
            states.append({"source_id": prompt.source_id, "status": "dropped"})
            continue
        negatives.append(neg)
    return negatives


def _teacher_pass(teacher, tokenizer, negatives: list[_Negative], cfg: MiningConfig, seed: int,
                  summary: MiningSummary) -> None:
    """Sample positives for ``negatives`` (``neg.chosen``), re-sampling rejected ones with new seeds."""
    for attempt in range(cfg.positive_attempts):
        todo = [n for n in negatives if n.chosen is None]
        if not todo:
            return
        budgets = [cfg.chosen_max_new_tokens or len(n.rejected) for n in todo]
        gen = generate_batch(teacher, tokenizer, [n.context for n in todo], budgets, seed=seed + attempt,
                             top_p=cfg.top_p, temperature=cfg.temperature)
        for neg, toks in zip(todo, gen.tokens):
            summary.teacher_tokens += len(toks)
            text = _continuation_text(tokenizer, neg.context, toks)
            cov = coverage(toks, threshold=cfg.threshold)
            if not text.strip():
                summary.positives_rejected_empty += 1
            elif cov.is_degenerate:
                summary.positives_rejected_looping += 1
            else:
                neg.chosen = (toks, text, cov.coverage, attempt)


def _pair_row(neg: _Negative, tokenizer, names: tuple[str, str], seed: int) -> dict:
    """The output row of a negative with its positive (fields: see the module docstring)."""
    toks, text, cov_chosen, attempt = neg.chosen
    return {
        "prompt": neg.text + _continuation_text(tokenizer, neg.ids, neg.out[: neg.onset]),
        "chosen": text,
        "rejected": neg.rejected_text,
        "source_id": neg.prompt.source_id,
        "onset": neg.onset,
        "coverage_rejected": neg.rejected_coverage,
        "coverage_chosen": cov_chosen,
        "coverage_output": neg.coverage,
        "student": names[0],
        "teacher": names[1],
        "seed": seed,
        "chosen_attempt": attempt,
        "student_stop": neg.stop,
        "prompt_tokens": neg.context,
        "rejected_tokens": neg.rejected,
        "chosen_tokens": toks,
    }


def _mine_local(student, teacher, tokenizer, prompts: list[Prompt], cfg: MiningConfig, path: str,
                target: int, seed: int, show: bool) -> MiningSummary:
    """Mine ``prompts`` batch by batch into ``path`` (+ its state file) until ``target`` new pairs."""
    from tqdm.auto import tqdm

    summary = MiningSummary(output=path)
    teacher_name = cfg.teacher_path() if cfg.student else cfg.teacher
    names = (_model_name(student, cfg.student), _model_name(teacher, teacher_name))
    bar = tqdm(total=len(prompts), desc="RePAIR pairs", unit="prompt", disable=not show)
    for b in range(0, len(prompts), cfg.batch_size):
        if summary.pairs_kept >= target:
            break
        batch = prompts[b : b + cfg.batch_size]
        batch_seed = seed + (b // cfg.batch_size) * (cfg.positive_attempts + 1)  # student, then teacher tries
        states: list[dict] = []
        negatives = _student_pass(student, tokenizer, batch, cfg, batch_seed, summary, states)
        _teacher_pass(teacher, tokenizer, negatives, cfg, batch_seed + 1, summary)
        rows = []
        for neg in negatives:
            if neg.chosen is None:
                summary.pairs_dropped_no_positive += 1
                states.append({"source_id": neg.prompt.source_id, "status": "no_positive"})
            else:
                rows.append(_pair_row(neg, tokenizer, names, batch_seed))
        rows = rows[: target - summary.pairs_kept]  # the surplus stays untried
        _append_rows(path, rows)  # pairs first: a kill in between only means retrying this batch
        _append_rows(_state_path(path), states)
        summary.pairs_kept += len(rows)
        bar.update(len(batch))
        bar.set_postfix(degenerate=f"{summary.degenerate_share:.0%}", pairs=summary.pairs_kept)
    bar.close()
    summary.target_reached = summary.pairs_kept >= target
    return summary


def mine_pairs(student, teacher, tokenizer, prompts: Sequence[Prompt | str], cfg: MiningConfig) -> MiningSummary:
    """Mine RePAIR pairs from ``prompts`` into ``cfg.output`` (resumable; see module docstring).

    ``student``/``teacher``: causal LMs sharing ``tokenizer``, already on their devices.
    ``prompts``: :class:`Prompt` objects (or plain strings, whose ids are their indices).
    Under several processes every rank calls this with the same prompts. Returns the summary
    (on rank 0: all ranks' counts), also logged and written to ``<output>.summary.json``.
    """
    from accelerate.utils import gather_object

    cfg.validate(prompts=False)
    start = time.perf_counter()
    state = _partial_state()
    output = cfg.output
    if state.is_main_process:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        _merge_shards(output, cfg.target_pairs)  # leftovers of an interrupted multi-process run
        _repair_tail(output)
        _repair_tail(_state_path(output))
    state.wait_for_everyone()

    prompts = _as_prompts(prompts)
    have = _read_rows(output)
    done = {r["source_id"] for r in have} | {r["source_id"] for r in _read_rows(_state_path(output))}
    todo = [p for p in prompts if p.source_id not in done]
    need = max(0, cfg.target_pairs - len(have))
    show = cfg.progress and state.is_main_process
    for model in (student, teacher):
        model.eval()

    if state.num_processes == 1:
        summary = _mine_local(student, teacher, tokenizer, todo, cfg, output, need, cfg.seed, show)
    else:
        shard = _shard_path(output, state.process_index)
        with state.split_between_processes(todo) as mine:
            seed = cfg.seed + 1_000_003 * state.process_index
            summary = _mine_local(student, teacher, tokenizer, list(mine), cfg, shard,
                                  math.ceil(need / state.num_processes), seed, show)
        state.wait_for_everyone()
        summaries = gather_object([summary])
        if state.is_main_process:
            _merge_shards(output, cfg.target_pairs)
            for other in summaries[1:]:
                summary.merge(other)
        state.wait_for_everyone()

    summary.output = output
    summary.prompts_available = len(prompts)
    summary.prompts_skipped_resume = len(prompts) - len(todo)
    summary.pairs_total = len(_read_rows(output))
    summary.target_reached = summary.pairs_total >= cfg.target_pairs
    summary.elapsed_s = round(time.perf_counter() - start, 3)
    if state.is_main_process:
        _write_summary(output, summary)
        LOG.info(
            "RePAIR mining: %d prompts tried (%d skipped on resume), %.1f%% degenerate, %d pairs kept "
            "(%d in %s), %d positives rejected for looping, %d pairs dropped; student early stopping: "
            "%d rows stopped, %d budget tokens not generated, %d of %d batched decoding steps skipped "
            "(a batch runs until all its rows have stopped)",
            summary.prompts_tried, summary.prompts_skipped_resume, 100 * summary.degenerate_share,
            summary.pairs_kept, summary.pairs_total, output, summary.positives_rejected_looping,
            summary.pairs_dropped_no_positive + summary.negatives_dropped, summary.early_stopped,
            summary.tokens_not_generated, summary.student_steps_skipped,
            summary.student_batches * cfg.max_new_tokens,
        )
    return summary


def run_mining(cfg: MiningConfig) -> MiningSummary:
    """Validate ``cfg``, load the prompts, the tokenizer (the student's) and both models
    (``AutoModelForCausalLM.from_pretrained``; teacher default: the student's recorded
    ``focus_source_model``) onto this process's device, and call :func:`mine_pairs`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import modeling_pruned_llama  # noqa: F401  (registers pruned_llama with the Auto classes)

    cfg.validate(models=True)
    prompts = load_prompts(
        cfg.prompts, text_field=cfg.text_field, input_field=cfg.input_field, id_field=cfg.id_field,
        text_unit=cfg.text_unit, split=cfg.split, dataset_config=cfg.dataset_config, limit=cfg.max_prompts,
    )
    teacher_path = cfg.teacher_path()
    device = torch.device(cfg.device) if cfg.device else _partial_state().device
    dtype = cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    tokenizer = AutoTokenizer.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code)

    def load(path: str):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        return model.to(device).eval()

    student, teacher = load(cfg.student), load(teacher_path)
    sizes = (student.get_input_embeddings().num_embeddings, teacher.get_input_embeddings().num_embeddings)
    if sizes[0] != sizes[1] or sizes[0] < len(tokenizer):
        raise ValueError(
            f"teacher: vocabulary of {teacher_path} ({sizes[1]}) does not match the student's ({sizes[0]}, "
            f"tokenizer {len(tokenizer)}); RePAIR needs one shared tokenizer"
        )
    return mine_pairs(student, teacher, tokenizer, prompts, cfg)
