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
   on what was generated. In a batch a row that stopped (loop, EOS or budget) leaves the batch:
   the later forward passes compute only the live rows (``student_row_steps`` in the summary,
   vs ``student_row_steps_padded`` = rows x steps, the cost with stopped rows kept as padding;
   ``tokens_not_generated`` counts the early-stopped rows' unused budget, ``student_steps_skipped``
   the decoding steps no row of its batch needed). The prompt is degenerate when
   ``coverage(y_hat) >= threshold``: the coverage domain is the generated continuation only (the
   paper's model output ``y_hat``), never the prompt. ``onset`` = index in ``y_hat`` where the
   second copy of the repeated segment starts; the shared prefix is ``prompt + y_hat[:onset]``
   (the text before the loop plus one full copy of the segment) and the rejected continuation is
   ``y_hat[onset:]``.
3. Positive. The teacher continues ``prompt + y_hat[:onset]`` with the same top-p at
   ``teacher_temperature`` (default: ``temperature``; a small student may loop only at a low
   temperature, where the teacher loops too, so the positive can be sampled at e.g. 1.0), at most
   ``len(rejected)`` new tokens (or ``chosen_max_new_tokens``). It is kept if non-empty and
   ``coverage(chosen) < threshold`` (coverage of the chosen tokens only); otherwise it is
   re-sampled with a new seed, up to ``positive_attempts`` tries in all; then the pair is dropped.

Before the teacher runs, a negative is also dropped when its rejected text is blank, or (with
``require_rejected_degenerate``, the default; the paper only checks ``y_hat``) when
``coverage(rejected) < threshold``: the rejected part must be a loop on its own, i.e. hold at
least two copies of the segment. ``y_hat`` with exactly two copies (prefix = junk + copy 1,
rejected = copy 2 + a partial copy) passes the paper's test but not this one; a row stopped
early (3 clean copies by default) normally keeps 2 copies in rejected and passes.

Generation is batched (``batch_size`` prompts) by :func:`generate_batch`, our own KV-cache
decoding loop with LEFT padding built by hand (the shared tokenizer's ``padding_side`` is never
touched); per-row EOS, budgets and loop detection run in one :class:`RowStopper`, and rows that
ended are removed from the batch (and its KV cache). Sampling is pure top-p (``top_k=0``; the
models' own generation defaults such as a repetition penalty play no part). Seeds: every row
draws from its own ``torch.Generator``; the student's sample of a prompt is seeded by
``(seed, source_id)`` and the teacher's ``attempt``-th positive by ``(seed, source_id, attempt)``
(:func:`student_row_seed`, :func:`teacher_row_seed`), never by the batch, so a pair does not
depend on which prompts share its batch, on ``batch_size``, on the number of processes, or on a
resume (up to float rounding of the forward pass under different padding). The global torch RNG
is not used.

Output rows (JSONL)
-------------------
``prompt`` (shared context text), ``chosen``, ``rejected`` (continuation texts, decoded with
``skip_special_tokens=True``), ``source_id``, ``onset``, ``coverage_rejected`` (of the rejected
tokens), ``coverage_chosen`` (of the chosen tokens), ``coverage_output`` (of ``y_hat``, the
selection criterion), ``student``, ``teacher``, ``seed`` (the run's seed: with the source id it
gives the student's and the positives' row seeds, see above), ``top_p``, ``temperature`` (the
student's), ``teacher_temperature`` (the positives', resolved), ``chosen_attempt`` (0-based),
``student_stop`` (why the student row ended: ``loop`` = early stop, ``budget``, ``eos``), and the exact token
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
their prompts stay untried). The seeds depend only on ``(seed, source_id)``, so a resumed run
writes the pairs of an uninterrupted one (bit for bit when its batches hold the same prompts,
e.g. after a kill between batches; otherwise up to the float rounding of a forward pass under
different padding).

``output + ".run.json"`` records what decides the pairs (:meth:`MiningConfig.run_record`: student
and teacher names, the student's config ``vocab_size``, how prompts are read and rendered, the
sampling settings); it is written (atomically) when the output has no rows yet. A start whose
record differs from it while the output or its state file holds rows is refused before any
weights are loaded, with one ``ValueError`` listing each differing setting, old and new; for
files of older versions without the record, the settings of the first pair row (``student``,
``teacher``, ``seed``, ``top_p``, ``temperature``, ``teacher_temperature``) are compared and the
record is written. A rerun with the same settings resumes and leaves the record untouched. An
``output`` whose first line is not a pairs row (a JSON object with a ``source_id``) is never
appended to (nor removed). ``restart`` (``pairs --restart``) removes the output, its state,
summary, record and leftover rank shards, then mines from scratch. Before any weights are
loaded, :func:`run_mining` also requires the teacher to share the student's vocabulary
(tokenizers and config ``vocab_size``) and the prompt source to hold at least one prompt.

Several processes (``accelerate launch``): the remaining prompts are split with
``PartialState().split_between_processes``; rank ``i`` writes ``<output stem>.rank{i}.jsonl``
(and its ``.state``) and rank 0 merges the shards into ``output`` at the end (deduplicated by
source id, capped at the target) and deletes them. Leftover shards of a crashed run are merged
when the next run starts.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from transformers import StoppingCriteria

from .degeneration import DEFAULT_THRESHOLD, LoopDetector, coverage
from .files import write_json
from .locations import looks_local

LOG = logging.getLogger(__name__)

__all__ = [
    "MiningConfig",
    "MiningSummary",
    "Prompt",
    "RowStopper",
    "load_prompts",
    "encode_prompt",
    "generate_batch",
    "row_seed",
    "sample_top_p",
    "mine_pairs",
    "run_mining",
]

MODES = ("open_ended", "instruction")
TEXT_UNITS = ("paragraph", "line")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TEXT_FIELDS = ("text", "prompt", "instruction")  # tried in this order when text_field is None


# --------------------------------------------------------------------------------------------
# Configuration and summary
# --------------------------------------------------------------------------------------------


def _opt(default: Any, text: str, **extra: Any) -> Any:
    """A dataclass field with its ``--help`` text (and ``choices``) in the metadata (TRL style)."""
    return field(default=default, metadata={"help": text, **extra})


@dataclass
class MiningConfig:
    """Settings of a mining run (defaults: the paper's; see the module docstring). Each field's
    ``metadata["help"]`` (and ``metadata["choices"]``) is its ``axolotl-focus pairs --help`` text."""

    prompts: str = _opt("", "Prompt source: a local JSON-lines (.jsonl) or JSON-array (.json) file, a plain text "
                        "file (split by --text-unit), or a Hugging Face hub dataset id (datasets.load_dataset).")
    output: str = _opt("repair_pairs.jsonl", "Pairs file (JSON lines), appended to batch by batch and resumed on a "
                       "rerun. Beside it: <output>.state (tried prompts without a pair), <output>.summary.json (the "
                       "last run's counts) and <output>.run.json (the settings that decide the pairs; a rerun with "
                       "other settings is refused, see --restart).")
    student: str | None = _opt(None, "The pruned student (model folder or hub id): samples the looping negatives; "
                               "its tokenizer is the one both models share.")
    teacher: str | None = _opt(None, "The unpruned teacher (model folder or hub id) that samples the positives; it "
                               "must share the student's vocabulary. Default: the focus_source_model recorded in "
                               "the student's config.json.")
    mode: str = _opt("open_ended", "open_ended: the prompt is the first --prefix-tokens tokens of each text "
                     "(decoded and re-encoded with BOS), which the student continues; instruction: the whole text "
                     "(plus --input-field) is one instruction, rendered with the tokenizer's chat template when it "
                     "has one and --chat-template is on, else the raw text with BOS.", choices=MODES)
    text_field: str | None = _opt(None, "JSON / hub rows: the field holding the prompt text. Default: the first of "
                                  "text, prompt, instruction that the row has.")
    input_field: str | None = _opt("input", "JSON / hub rows: a field appended to the text after a blank line when "
                                   "the row has it non-empty (an instruction's input); empty string: none.")
    id_field: str | None = _opt(None, "JSON / hub rows: the field holding a stable id per prompt (the resume key). "
                                "Default: the 1-based line number (JSON lines, text files), the 0-based position "
                                "(JSON array) or the row index (hub).")
    text_unit: str = _opt("paragraph", "How a plain text file is split into prompts: paragraph = each run of "
                          "non-blank lines up to the next blank line, joined with spaces; line = each non-blank "
                          "line. Lines are stripped; the source id is the prompt's first line number.",
                          choices=TEXT_UNITS)
    dataset_config: str | None = _opt(None, "Hub dataset: configuration name (e.g. wikitext-103-raw-v1).")
    split: str = _opt("train", "Hub dataset: split.")
    max_prompts: int | None = _opt(None, "Use only the first N non-empty prompts of the source. Default: all.")
    prefix_tokens: int = _opt(50, "open_ended mode: prompt length k in tokens (paper: 50).")
    max_new_tokens: int = _opt(200, "The student's token budget per sample (paper: 200).")
    chosen_max_new_tokens: int | None = _opt(None, "The teacher's token budget per positive. Default: the length of "
                                             "the rejected continuation it replaces.")
    top_p: float = _opt(0.9, "Nucleus (top-p) sampling of student and teacher (no top-k).")
    temperature: float = _opt(1.0, "The student's sampling temperature.")
    teacher_temperature: float | None = _opt(None, "The teacher's sampling temperature for the positives. Default: "
                                             "--temperature.")
    seed: int = _opt(0, "Run seed: with a prompt's source id it seeds the student's sample and the teacher's "
                     "attempts, so a pair does not depend on batching, processes or resuming.")
    threshold: float = _opt(DEFAULT_THRESHOLD, "Coverage threshold: a continuation is degenerate (loops) when the "
                            "share of it covered by repeats is at least this.")
    target_pairs: int = _opt(12000, "Stop once the output holds this many pairs (paper: 12000); pairs already in "
                             "it count.")
    batch_size: int = _opt(16, "Prompts the student samples together (and negatives the teacher continues "
                           "together).")
    positive_attempts: int = _opt(3, "Teacher samples per negative (each with a new seed) before the pair is "
                                  "dropped.")
    require_rejected_degenerate: bool = _opt(True, "Also require the rejected part (from the loop onset on) to be "
                                             "degenerate on its own, i.e. hold two copies of the loop (stricter "
                                             "than the paper, which tests the whole continuation only).")
    early_stop: bool = _opt(True, "Stop a student sample as soon as its loop is confirmed (--detector-min-repeats "
                            "clean copies) instead of generating the whole budget.")
    detector_min_tokens: int = _opt(16, "Early stop: generated tokens needed before a loop can be confirmed.")
    detector_min_repeats: int = _opt(3, "Early stop: consecutive copies of the repeated segment that confirm a "
                                     "loop (>= 2).")
    chat_template: bool = _opt(True, "instruction mode: render the prompt with the tokenizer's chat template when "
                               "it has one (--no-chat-template: the raw text with BOS).")
    dtype: str = _opt("auto", "Weights dtype of both models (auto: the checkpoint's).", choices=DTYPES)
    device: str | None = _opt(None, "Device of both models. Default: this process's accelerator, else CPU.")
    trust_remote_code: bool = _opt(False, "Allow custom model / tokenizer code shipped with the checkpoints.")
    progress: bool = _opt(True, "Show a progress bar.")
    restart: bool = _opt(False, "Start the output over: delete it and its .state, .summary.json, .run.json and "
                         "leftover rank shards before mining (only when it is a pairs file). Needed to change the "
                         "settings of an output that already holds rows.")

    def validate(self, *, models: bool = False, prompts: bool = True) -> "MiningConfig":
        """Check every field; raise one one-line ``ValueError`` naming each bad field
        (``field: msg (got x); field2: msg (got y)``). Loads nothing.

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
        if self.teacher_temperature is not None and not self.teacher_temperature > 0:
            bad("teacher_temperature", "must be None or > 0")
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
            elif looks_local(self.prompts) and not os.path.isfile(self.prompts):
                bad("prompts", "file not found")
        if models:
            if not self.student:
                bad("student", "is required")
            elif looks_local(self.student) and not os.path.isdir(self.student):
                bad("student", "model directory not found")
            if self.student and not self.teacher_path():
                bad("teacher", "not given and the student records no focus_source_model in config.json")
            elif self.teacher and looks_local(self.teacher) and not os.path.isdir(self.teacher):
                bad("teacher", "model directory not found")
        if errors:
            raise ValueError("; ".join(errors))
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

    @property
    def positive_temperature(self) -> float:
        """The teacher's sampling temperature: ``teacher_temperature``, else ``temperature``."""
        return self.temperature if self.teacher_temperature is None else self.teacher_temperature

    def sampling_settings(self) -> dict[str, Any]:
        """The settings that decide what is sampled (recorded in the summary)."""
        return {"top_p": self.top_p, "temperature": self.temperature,
                "teacher_temperature": self.positive_temperature, "seed": self.seed,
                "prefix_tokens": self.prefix_tokens, "max_new_tokens": self.max_new_tokens,
                "chosen_max_new_tokens": self.chosen_max_new_tokens, "threshold": self.threshold,
                "positive_attempts": self.positive_attempts, "early_stop": self.early_stop,
                "detector_min_tokens": self.detector_min_tokens, "detector_min_repeats": self.detector_min_repeats}

    def run_record(self, student_name: str, teacher_name: str, vocab_size: int | None) -> dict[str, Any]:
        """What decides the pairs of an output (kept in ``<output>.run.json``; a rerun that differs
        is refused): the models (names as given / resolved; ``vocab_size`` = the student's config
        ``vocab_size``), how prompts are read and rendered, and :meth:`sampling_settings`."""
        return {"student": student_name, "teacher": teacher_name, "vocab_size": vocab_size,
                **{k: getattr(self, k) for k in ("mode", "chat_template", "text_field", "input_field", "id_field",
                                                 "text_unit", "dataset_config", "split",
                                                 "require_rejected_degenerate")},
                **self.sampling_settings()}

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
    # sum of max_new_tokens - generated over early-stopped rows: the budget they did not use
    tokens_not_generated: int = 0
    student_tokens: int = 0  # tokens the student generated
    student_batches: int = 0  # batched student generate calls
    student_steps: int = 0  # decoding steps (batched forward passes) those calls ran
    # sum over student batches of max_new_tokens - steps run: the steps skipped because every row
    # of the batch had stopped (loop detector or EOS) early
    student_steps_skipped: int = 0
    # rows the student's forward passes computed (per step, the rows still live: a row that ended
    # leaves the batch) vs rows x steps, what the passes would cost with ended rows kept as padding
    student_row_steps: int = 0
    student_row_steps_padded: int = 0
    teacher_tokens: int = 0  # tokens the teacher generated (all attempts)
    target_reached: bool = False
    elapsed_s: float = 0.0
    settings: dict = field(default_factory=dict)  # MiningConfig.sampling_settings() of this run

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
    raise, and so does a source without any prompt. ``limit`` keeps the first N prompts.
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
        why = f"all {len(records)} rows have an empty text" if records else "no JSON rows"
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
        why = "the file holds only blank lines" if lines != [""] else "the file is empty"
    else:
        import datasets

        data = datasets.load_dataset(source, dataset_config, split=split)
        for index, row in enumerate(data):
            where = f"{source}[{split}][{index}]"
            if add(row_id(row, index, where), _row_prompt(row, where, text_field, input_field)):
                break
        why = f"split {split!r}: " + (f"all {len(data)} rows have an empty text" if len(data) else "no rows")
    if not out:
        raise ValueError(f"prompts: {source} holds no prompts ({why})")
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


def continuation_text(tokenizer, context: Sequence[int], segment: Sequence[int]) -> str:
    """Text of ``segment`` after ``context``, cut from one decode of ``context + segment``."""
    before = _decode(tokenizer, context)
    full = _decode(tokenizer, list(context) + list(segment))
    return full[len(os.path.commonprefix([before, full])) :]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


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


def _parse_row(line: str) -> tuple[dict | None, str]:
    """``(row, "")`` for a line of a pairs / state file (a JSON object with a ``source_id``),
    else ``(None, why)``."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"invalid JSON: {err}"
    if not isinstance(row, dict) or "source_id" not in row:
        return None, "not a JSON object with a source_id"
    return row, ""


def _read_rows(path: str) -> list[dict]:
    """The rows of a pairs / state file (none if it does not exist); a bad line raises a
    ``ValueError`` naming ``path:line``."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                row, why = _parse_row(line)
                if row is None:
                    raise ValueError(f"output: {path}:{lineno} is not a pairs row ({why}); remove that line, "
                                     "or pick another --output")
                rows.append(row)
    return rows


def _first_line(path: str) -> tuple[int, str, bool] | None:
    """``(line number, text, complete)`` of the first non-empty line of ``path`` (``complete``: it
    ends with a newline, else it is a partial last line that the start truncates), or None."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                return lineno, line, line.endswith("\n")
    return None


def _state_path(output: str) -> str:
    return output + ".state"


def _shard_path(output: str, rank: int) -> str:
    base = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return f"{base}.rank{rank}.jsonl"


def _run_path(output: str) -> str:
    return output + ".run.json"


def _shards(output: str) -> list[str]:
    """Shard files ``<stem>.rank<i>.jsonl`` of ``output`` present on disk."""
    folder = os.path.dirname(os.path.abspath(output))
    name = os.path.basename(output)
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    pattern = re.escape(stem) + r"\.rank\d+\.jsonl"
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(os.path.join(folder, n) for n in names if re.fullmatch(pattern, n))


def _shard_files(output: str) -> list[str]:
    """The shards of ``output`` and their state files (those present or not)."""
    return [path for shard in _shards(output) for path in (shard, _state_path(shard))]


def _merge_shards(output: str, target: int) -> None:
    """Move shard rows/states into ``output`` (dedup by source id, at most ``target`` rows)."""
    shards = _shards(output)
    if not shards:
        return
    for path in [output, _state_path(output)] + _shard_files(output):
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
    for path in _shard_files(output):
        if os.path.exists(path):
            os.remove(path)
    LOG.info("merged %d shard files into %s (+%d pairs)", len(shards), output, len(rows))


_ROW_SETTINGS = ("student", "teacher", "seed", "top_p", "temperature", "teacher_temperature")  # in every pair row


def _prepare_output(cfg: MiningConfig, record: dict, state) -> None:
    """Before mining; every rank reads, rank 0 writes, then all wait. Refuse an ``output`` that is
    not a pairs file, and (unless ``cfg.restart``) one whose rows were mined with settings other
    than ``record``: the ``.run.json`` record, or for files of older versions what their first
    pair row records. Then on rank 0: with ``restart`` remove the output's files; keep ``record``
    in ``<output>.run.json``."""
    output, run_path = cfg.output, _run_path(cfg.output)
    first = _first_line(output)
    if first and (first[2] or not first[1].startswith("{")):  # a partial "{..." line only: repaired later
        why = _parse_row(first[1])[1]
        if why:
            raise ValueError(f"output: {output}:{first[0]} is not a RePAIR pairs file written by axolotl-focus pairs "
                             f"({why}); refusing to append to it - pick another --output")
    pair_files = [output] + _shards(output)
    lines = {path: _first_line(path) for path in pair_files + [_state_path(path) for path in pair_files]}
    has_rows = any(line and line[2] for line in lines.values())
    try:
        saved = json.loads(Path(run_path).read_text(encoding="utf-8")) if os.path.isfile(run_path) else None
    except json.JSONDecodeError as err:
        raise ValueError(f"output: {run_path} is not valid JSON ({err}); rerun with --restart to start "
                         f"{output} over, or pick another --output") from None
    stored = saved
    if stored is None:  # written before run records: what the first pair row records
        pair = next((_parse_row(lines[path][1])[0] for path in pair_files if lines[path] and lines[path][2]), None)
        stored = {k: pair[k] for k in _ROW_SETTINGS if k in pair} if pair else None
    diff = [k for k in record if k in (stored or {}) and stored[k] != record[k]]
    if has_rows and diff and not cfg.restart:
        was, now = (", ".join(f"{k}={r[k]}" for k in diff) for r in (stored, record))
        raise ValueError(f"output: {output} was mined with {was} (now {now}); rerun with --restart to start it "
                         "over, or pick another --output")
    if state.is_main_process:
        if cfg.restart:
            removed = [path for path in [output, _state_path(output), output + ".summary.json", run_path]
                       + _shard_files(output) if os.path.exists(path)]
            for path in removed:
                os.remove(path)
            LOG.warning("restart: removed %s", ", ".join(removed) if removed else "nothing (no files yet)")
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        if cfg.restart or saved != record:
            write_json(run_path, record, indent=2)
    state.wait_for_everyone()


# --------------------------------------------------------------------------------------------
# Mining
# --------------------------------------------------------------------------------------------


def process_state():
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


def student_row_seed(source_id: str) -> int:
    """Row seed of the student's sample of a prompt (with ``cfg.seed``: see :func:`generate_batch`)."""
    return row_seed("student", source_id)


def teacher_row_seed(source_id: str, attempt: int) -> int:
    """Row seed of the teacher's ``attempt``-th positive for a prompt (0-based)."""
    return row_seed("teacher", source_id, attempt)


def _student_pass(student, tokenizer, batch: list[Prompt], cfg: MiningConfig,
                  summary: MiningSummary, states: list[dict]) -> list[_Negative]:
    """Sample the student on a batch; return the usable negatives, record the others in ``states``."""
    encoded = [encode_prompt(tokenizer, p.text, cfg) for p in batch]
    detector = None
    if cfg.early_stop:
        detector = dict(threshold=cfg.threshold, min_tokens=cfg.detector_min_tokens,
                        min_repeats=cfg.detector_min_repeats)
    gen = generate_batch(student, tokenizer, [ids for _, ids in encoded], [cfg.max_new_tokens] * len(batch),
                         seed=cfg.seed, row_seeds=[student_row_seed(p.source_id) for p in batch], top_p=cfg.top_p,
                         temperature=cfg.temperature, detector_kwargs=detector)
    summary.student_batches += 1
    summary.student_steps += gen.steps
    summary.student_steps_skipped += cfg.max_new_tokens - gen.steps
    summary.student_row_steps += gen.row_steps
    summary.student_row_steps_padded += gen.padded_row_steps
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
                        continuation_text(tokenizer, ids + out[: res.onset], rejected))
        if not neg.rejected_text.strip() or (cfg.require_rejected_degenerate and neg.rejected_coverage < cfg.threshold):
            summary.negatives_dropped += 1
            states.append({"source_id": prompt.source_id, "status": "dropped"})
            continue
        negatives.append(neg)
    return negatives


def _teacher_pass(teacher, tokenizer, negatives: list[_Negative], cfg: MiningConfig, summary: MiningSummary) -> None:
    """Sample positives for ``negatives`` (``neg.chosen``), re-sampling rejected ones with new seeds."""
    for attempt in range(cfg.positive_attempts):
        todo = [n for n in negatives if n.chosen is None]
        if not todo:
            return
        budgets = [cfg.chosen_max_new_tokens or len(n.rejected) for n in todo]
        gen = generate_batch(teacher, tokenizer, [n.context for n in todo], budgets, seed=cfg.seed,
                             row_seeds=[teacher_row_seed(n.prompt.source_id, attempt) for n in todo],
                             top_p=cfg.top_p, temperature=cfg.positive_temperature)
        for neg, toks in zip(todo, gen.tokens):
            summary.teacher_tokens += len(toks)
            text = continuation_text(tokenizer, neg.context, toks)
            cov = coverage(toks, threshold=cfg.threshold)
            if not text.strip():
                summary.positives_rejected_empty += 1
            elif cov.is_degenerate:
                summary.positives_rejected_looping += 1
            else:
                neg.chosen = (toks, text, cov.coverage, attempt)


def _pair_row(neg: _Negative, tokenizer, names: tuple[str, str], cfg: MiningConfig) -> dict:
    """The output row of a negative with its positive (fields: see the module docstring)."""
    toks, text, cov_chosen, attempt = neg.chosen
    return {
        "prompt": neg.text + continuation_text(tokenizer, neg.ids, neg.out[: neg.onset]),
        "chosen": text,
        "rejected": neg.rejected_text,
        "source_id": neg.prompt.source_id,
        "onset": neg.onset,
        "coverage_rejected": neg.rejected_coverage,
        "coverage_chosen": cov_chosen,
        "coverage_output": neg.coverage,
        "student": names[0],
        "teacher": names[1],
        "seed": cfg.seed,
        "top_p": cfg.top_p,
        "temperature": cfg.temperature,
        "teacher_temperature": cfg.positive_temperature,
        "chosen_attempt": attempt,
        "student_stop": neg.stop,
        "prompt_tokens": neg.context,
        "rejected_tokens": neg.rejected,
        "chosen_tokens": toks,
    }


def _mine_local(student, teacher, tokenizer, prompts: list[Prompt], cfg: MiningConfig, names: tuple[str, str],
                path: str, target: int, show: bool) -> MiningSummary:
    """Mine ``prompts`` batch by batch into ``path`` (+ its state file) until ``target`` new pairs."""
    from tqdm.auto import tqdm

    summary = MiningSummary(output=path)
    bar = tqdm(total=len(prompts), desc="RePAIR pairs", unit="prompt", disable=not show)
    for b in range(0, len(prompts), cfg.batch_size):
        if summary.pairs_kept >= target:
            break
        batch = prompts[b : b + cfg.batch_size]
        states: list[dict] = []
        negatives = _student_pass(student, tokenizer, batch, cfg, summary, states)
        _teacher_pass(teacher, tokenizer, negatives, cfg, summary)
        rows = []
        for neg in negatives:
            if neg.chosen is None:
                summary.pairs_dropped_no_positive += 1
                states.append({"source_id": neg.prompt.source_id, "status": "no_positive"})
            else:
                rows.append(_pair_row(neg, tokenizer, names, cfg))
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
    An output that is not a pairs file, or that holds rows mined with other settings (models,
    vocabulary size, prompt reading, sampling: :meth:`MiningConfig.run_record`, kept in
    ``<output>.run.json``), raises ``ValueError`` before anything is written, unless
    ``cfg.restart`` (which starts a pairs file over).
    """
    from accelerate.utils import gather_object

    cfg.validate(prompts=False)
    start = time.perf_counter()
    state = process_state()
    output = cfg.output
    names = (_model_name(student, cfg.student),
             _model_name(teacher, cfg.teacher_path() if cfg.student else cfg.teacher))
    _prepare_output(cfg, cfg.run_record(*names, _config_vocab(getattr(student, "config", None))), state)
    if state.is_main_process:
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
        summary = _mine_local(student, teacher, tokenizer, todo, cfg, names, output, need, show)
    else:
        shard = _shard_path(output, state.process_index)
        with state.split_between_processes(todo) as mine:
            summary = _mine_local(student, teacher, tokenizer, list(mine), cfg, names, shard,
                                  math.ceil(need / state.num_processes), show)
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
    summary.settings = cfg.sampling_settings()
    if state.is_main_process:
        write_json(output + ".summary.json", summary.to_dict(), indent=2)
        LOG.info(
            "RePAIR mining: %d prompts tried (%d skipped on resume), %.1f%% degenerate, %d pairs kept "
            "(%d in %s), %d positives rejected for looping, %d pairs dropped; student early stopping: "
            "%d rows stopped, %d budget tokens not generated, %d of %d batched decoding steps skipped, "
            "%d row-steps computed of %d with ended rows kept as padding",
            summary.prompts_tried, summary.prompts_skipped_resume, 100 * summary.degenerate_share,
            summary.pairs_kept, summary.pairs_total, output, summary.positives_rejected_looping,
            summary.pairs_dropped_no_positive + summary.negatives_dropped, summary.early_stopped,
            summary.tokens_not_generated, summary.student_steps_skipped,
            summary.student_batches * cfg.max_new_tokens, summary.student_row_steps,
            summary.student_row_steps_padded,
        )
    return summary


def _config_vocab(config) -> int | None:
    """The vocabulary size a model config records (a composite model's: its text config's); the
    run record's ``vocab_size`` (the student's), read before loading weights and after."""
    if config is None:
        return None
    return getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", None)


def _check_vocab(cfg: MiningConfig, teacher_path: str):
    """Student and teacher must share one vocabulary: compared from their tokenizer files and
    configs only (no weights), with :func:`axolotl_focus.teacher.check_vocab_compat`. Returns the
    student's tokenizer and config vocabulary size."""
    from transformers import AutoConfig, AutoTokenizer

    from .teacher import check_vocab_compat

    paths, kw = (cfg.student, teacher_path), dict(trust_remote_code=cfg.trust_remote_code)
    tokenizers = [AutoTokenizer.from_pretrained(path, **kw) for path in paths]
    sizes = [_config_vocab(AutoConfig.from_pretrained(path, **kw)) for path in paths]
    try:
        check_vocab_compat(*tokenizers, *sizes)
    except ValueError as err:
        found = re.search(r"\((.*)\)\. ", str(err))  # its list of differences
        raise ValueError(f"teacher: {teacher_path}: does not share the student's vocabulary "
                         f"({found.group(1) if found else err}); RePAIR feeds the student's token ids to the "
                         "teacher, so use the model the student was pruned from (same tokenizer)") from None
    if sizes[0] is not None and sizes[0] < len(tokenizers[0]):
        raise ValueError(f"student: {cfg.student}: config vocab_size {sizes[0]} is below its tokenizer's "
                         f"{len(tokenizers[0])} tokens")
    return tokenizers[0], sizes[0]


def run_mining(cfg: MiningConfig) -> MiningSummary:
    """Validate ``cfg``, load the prompts (none: ``ValueError``), check before loading any weights
    that the teacher (default: the student's recorded ``focus_source_model``) shares the student's
    vocabulary and that ``cfg.output`` may be resumed with these settings (or, with ``restart``,
    start it over), then load both models (``AutoModelForCausalLM.from_pretrained``) onto this
    process's device and call :func:`mine_pairs` with the student's tokenizer."""
    from transformers import AutoModelForCausalLM

    from . import modeling_pruned_llama  # noqa: F401  (registers pruned_llama with the Auto classes)

    cfg.validate(models=True)
    prompts = load_prompts(
        cfg.prompts, text_field=cfg.text_field, input_field=cfg.input_field, id_field=cfg.id_field,
        text_unit=cfg.text_unit, split=cfg.split, dataset_config=cfg.dataset_config, limit=cfg.max_prompts,
    )
    teacher_path = cfg.teacher_path()
    tokenizer, vocab_size = _check_vocab(cfg, teacher_path)
    state = process_state()
    _prepare_output(cfg, cfg.run_record(cfg.student, teacher_path, vocab_size), state)
    device = torch.device(cfg.device) if cfg.device else state.device
    dtype = cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)

    def load(path: str):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        return model.to(device).eval()

    student, teacher = load(cfg.student), load(teacher_path)
    return mine_pairs(student, teacher, tokenizer, prompts, replace(cfg, restart=False))  # restarted above
