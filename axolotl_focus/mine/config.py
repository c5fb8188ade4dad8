"""Settings and counts of a RePAIR mining run: :class:`MiningConfig` (each field's
``metadata["help"]`` and ``metadata["choices"]`` are its ``axolotl-focus pairs`` flag's help and
choices; :meth:`MiningConfig.validate` checks every field at once; :meth:`MiningConfig.run_record`
is what decides the pairs) and :class:`MiningSummary` (what a run did, written to
``<output>.summary.json``). The procedure they configure: :mod:`axolotl_focus.mine.run`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import source_model_of
from ..degeneration import DEFAULT_THRESHOLD
from ..files import input_identity
from ..locations import check_weight_files, looks_local
from ..options import nonfinite_fields, opt
from ..prompt_format import MODES
from ..sources import TEXT_UNITS

__all__ = ["DTYPES", "MODES", "MiningConfig", "MiningSummary"]

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class MiningConfig:
    """Settings of a mining run (defaults: the paper's; see :mod:`axolotl_focus.mine.run`). Each field's
    ``metadata["help"]`` (and ``metadata["choices"]``) is its ``axolotl-focus pairs --help`` text."""

    prompts: str = opt("", "Prompt source: a local JSON-lines (.jsonl) or JSON-array (.json) file, a plain text "
                        "file (split by --text-unit), or a Hugging Face hub dataset id (datasets.load_dataset).")
    output: str = opt("repair_pairs.jsonl", "Pairs file (JSON lines), appended to batch by batch and resumed on a "
                       "rerun. Beside it: <output>.state (tried prompts without a pair), <output>.summary.json (the "
                       "last run's counts) and <output>.run.json (the settings that decide the pairs; a rerun with "
                       "other settings is refused, see --restart).")
    student: str | None = opt(None, "The pruned student (model folder or hub id): samples the looping negatives; "
                               "its tokenizer is the one both models share.")
    teacher: str | None = opt(None, "The unpruned teacher (model folder or hub id) that samples the positives; it "
                               "must share the student's vocabulary. Default: the focus_source_model recorded in "
                               "the student's config.json.")
    mode: str = opt("open_ended", "open_ended: the prompt is the first --prefix-tokens tokens of each text "
                     "(decoded and re-encoded with BOS), which the student continues; instruction: the whole text "
                     "(plus --input-field) is one instruction, rendered with the tokenizer's chat template when it "
                     "has one and --chat-template is on, else the raw text with BOS.", choices=MODES)
    text_field: str | None = opt(None, "JSON / hub rows: the field holding the prompt text. Default: the first of "
                                  "text, prompt, instruction that the row has.")
    input_field: str | None = opt("input", "JSON / hub rows: a field appended to the text after a blank line when "
                                   "the row has it non-empty (an instruction's input); empty string: none.")
    id_field: str | None = opt(None, "JSON / hub rows: the field holding a stable id per prompt (the resume key). "
                                "Default: the 1-based line number (JSON lines, text files), the 0-based position "
                                "(JSON array) or the row index (hub).")
    text_unit: str = opt("paragraph", "How a plain text file is split into prompts: paragraph = each run of "
                          "non-blank lines up to the next blank line, joined with spaces; line = each non-blank "
                          "line. Lines are stripped; the source id is the prompt's first line number.",
                          choices=TEXT_UNITS)
    dataset_config: str | None = opt(None, "Hub dataset: configuration name (e.g. wikitext-103-raw-v1).")
    split: str = opt("train", "Hub dataset: split.")
    max_prompts: int | None = opt(None, "Use only the first N non-empty prompts of the source. Default: all.")
    prefix_tokens: int = opt(50, "open_ended mode: prompt length k in tokens (paper: 50).")
    max_new_tokens: int = opt(200, "The student's token budget per sample (paper: 200).")
    chosen_max_new_tokens: int | None = opt(None, "The teacher's token budget per positive. Default: the length of "
                                             "the rejected continuation it replaces.")
    top_p: float = opt(0.9, "Nucleus (top-p) sampling of student and teacher (no top-k).")
    temperature: float = opt(1.0, "The student's sampling temperature.")
    teacher_temperature: float | None = opt(None, "The teacher's sampling temperature for the positives. Default: "
                                             "--temperature.")
    seed: int = opt(0, "Run seed: with a prompt's source id it seeds the student's sample and the teacher's "
                     "attempts, so a pair does not depend on batching, processes or resuming.")
    threshold: float = opt(DEFAULT_THRESHOLD, "Coverage threshold: a continuation is degenerate (loops) when the "
                            "share of it covered by repeats is at least this.")
    target_pairs: int = opt(12000, "Stop once the output holds this many pairs (paper: 12000); pairs already in "
                             "it count.")
    batch_size: int = opt(16, "Prompts the student samples together (and negatives the teacher continues "
                           "together).")
    positive_attempts: int = opt(3, "Teacher samples per negative (each with a new seed) before the pair is "
                                  "dropped.")
    require_rejected_degenerate: bool = opt(True, "Also require the rejected part (from the loop onset on) to be "
                                             "degenerate on its own, i.e. hold two copies of the loop (stricter "
                                             "than the paper, which tests the whole continuation only).")
    early_stop: bool = opt(True, "Stop a student sample as soon as its loop is confirmed (--detector-min-repeats "
                            "clean copies) instead of generating the whole budget.")
    detector_min_tokens: int = opt(16, "Early stop: generated tokens needed before a loop can be confirmed.")
    detector_min_repeats: int = opt(3, "Early stop: consecutive copies of the repeated segment that confirm a "
                                     "loop (>= 2).")
    chat_template: bool = opt(True, "instruction mode: render the prompt with the tokenizer's chat template when "
                               "it has one (--no-chat-template: the raw text with BOS).")
    dtype: str = opt("auto", "Weights dtype of both models (auto: the checkpoint's).", choices=DTYPES)
    device: str | None = opt(None, "Device of both models. Default: this process's accelerator, else CPU.")
    trust_remote_code: bool = opt(False, "Allow custom model / tokenizer code shipped with the checkpoints.")
    progress: bool = opt(True, "Show a progress bar.")
    restart: bool = opt(False, "Start the output over: delete it and its .state, .summary.json, .run.json and "
                         "leftover rank shards before mining (only when it is a pairs file). Needed to change the "
                         "settings of an output that already holds rows.")

    def validate(self, *, models: bool = False, prompts: bool = True) -> "MiningConfig":
        """Check every field; raise one one-line ``ValueError`` naming each bad field
        (``field: msg (got x); field2: msg (got y)``). Loads nothing.

        ``prompts``: also check the prompt source (a local-looking path must exist);
        ``models``: also check that a student is given and a teacher is given or recorded.
        """
        errors: list[str] = nonfinite_fields(self)

        def bad(name: str, msg: str) -> None:
            if not any(e.startswith(f"{name}: ") for e in errors):
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
            for name in ("student", "teacher"):
                path = self.student if name == "student" else self.teacher_path()
                if path and os.path.isdir(path) and not any(e.startswith(f"{name}: ") for e in errors):
                    try:
                        check_weight_files(path, name)
                    except ValueError as err:
                        errors.append(str(err))
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
        is refused, :func:`axolotl_focus.files.other_job`): the models (names as given / resolved;
        ``vocab_size`` = the student's config ``vocab_size``), the prompt source (a local file by the
        digest of its bytes, a hub dataset by its id: :func:`~axolotl_focus.files.input_identity`),
        how prompts are read and rendered, and :meth:`sampling_settings`."""
        return {"student": student_name, "teacher": teacher_name, "vocab_size": vocab_size,
                "prompts": input_identity(self.prompts) if self.prompts else None,
                **{k: getattr(self, k) for k in ("mode", "chat_template", "text_field", "input_field", "id_field",
                                                 "text_unit", "dataset_config", "split",
                                                 "require_rejected_degenerate")},
                **self.sampling_settings()}

    def teacher_path(self) -> str | None:
        """The teacher: ``teacher`` or the ``focus_source_model`` recorded by the student."""
        if self.teacher:
            return self.teacher
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
