"""Checks before any work: what `axolotl-focus validate` reports, and what `axolotl train` runs
first (in the plugin's ``register`` hook, before axolotl validates, prunes, tokenizes or loads).

:func:`check_config` loads no weights and writes nothing. It reads the YAML (with the line of
every key, so errors say ``config.yml:LINE: key: ...``) and checks, collecting every problem:

- the plugin's keys: an unknown top-level ``focus_*`` key, or an unknown key inside
  ``focus_prune:`` / ``focus_aux_losses:``, is an error that suggests the nearest valid key
  (axolotl drops keys no schema declares, so a typo would silently train with the default);
  values against :class:`axolotl_focus.config.FocusArgs`;
- ``base_model``, the teacher (``focus_teacher_model``, else the ``focus_prune`` source, else the
  ``focus_source_model`` a pruned ``base_model`` records) and the pruning source: a local path
  must be a model folder, a hub id must exist when the hub can be asked (offline and not in the
  local hub cache: said so, and ``axolotl train`` stops there, since it could not load it);
- teacher vs student vocabulary, from tokenizer files and configs only;
- ``focus_teacher_cache`` (instead of the teacher): the folder is a complete teacher cache
  (``cache.json`` and its shard folders; no shard is read), built at ``focus_temperature`` for the
  student's vocabulary size and tokenizer (its digest, the tokenizer loaded as axolotl loads it);
  no teacher is resolved then, and packing, ``rl`` and ``focus_distill: none`` are refused with it;
- ``focus_prune:`` against the model's config (layer ranges, GQA groups, the parameter cut it
  reaches) and whether the pruned checkpoint is cached (keyed by the source's weights);
- the rows of local RePAIR pair files (``type: axolotl_focus.repair``) and of local DPO pair files
  (``rl: dpo`` datasets without a ``type``): ``file:line`` of the first bad row, or a missing file;
- ``validate`` only: axolotl's own schema with the plugin merged (GPU capability checks only where
  a GPU is present: they run again at ``axolotl train`` on the training machine).

It returns an :class:`Account`: the errors, and what ``train`` would do (student, teacher or
teacher cache, pruning cache hit or miss, loss terms, datasets).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from .config import FocusArgs, FocusAuxLosses, focus_default, source_model_of
from .files import read_lines, read_text
from .locations import ModelLocation, looks_local, resolve_model
from .prune.settings import PruneSettings
from .vocabulary import check_teacher_before_loading

PLUGIN = "axolotl_focus.FocusPlugin"
REPAIR_TYPE = "axolotl_focus.repair"
_NESTED = {"focus_prune": PruneSettings, "focus_aux_losses": FocusAuxLosses,
           **{f"focus_aux_losses.{name}": next(a for a in info.annotation.__args__ if a is not type(None))
              for name, info in FocusAuxLosses.model_fields.items()}}


@dataclass
class Account:
    """What a config would do, and what is wrong with it."""

    config: str
    errors: list[str] = field(default_factory=list)
    lines: list[tuple[str, str]] = field(default_factory=list)  # (topic, what train would do)
    student: ModelLocation | None = field(default=None, repr=False)  # base_model, once resolved

    def error(self, key: str, message: str, where: Mapping[str, int] | None = None, line_of: str = "") -> None:
        """Record ``file:line: key: message`` (the line of ``key``, or of ``line_of`` when the key is
        not in the file)."""
        message = message.removeprefix(f"{key}: ")
        where = where or {}
        head = key.split(".")[0]
        line = where.get(key) or where.get(head) or where.get(head.split("[")[0]) or where.get(line_of)
        prefix = f"{self.config}:{line}: " if line else (f"{self.config}: " if self.config else "")
        self.errors.append(f"{prefix}{key}: {message}")

    def say(self, topic: str, text: str) -> None:
        self.lines.append((topic, text))

    def raise_errors(self) -> None:
        if self.errors:
            raise ValueError("; ".join(self.errors))

    def render(self) -> str:
        head = f"{self.config}: " + (f"INVALID ({len(self.errors)} problem{'s' * (len(self.errors) > 1)})"
                                     if self.errors else "valid")
        out = [head + " - dry check: no weights loaded, nothing written"]
        out += [f"  error: {e}" for e in self.errors]
        out += [f"  {topic:<12} {text}" for topic, text in self.lines]
        return "\n".join(out)


def nearest(name: str, known) -> str:
    """`did you mean X?` for the closest known name, or a list of the known names."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"


def duplicate_keys(node, path: str) -> None:
    """Raise ``ValueError("<path>:<line>: duplicate key <key> (first at line N) ...")`` for the first
    key that a mapping of the YAML node tree holds twice (YAML loaders keep the last one silently)."""
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in first:
                    raise ValueError(f"{path}:{key.start_mark.line + 1}: duplicate key {key.value} (first at line "
                                     f"{first[key.value]}); YAML would keep the last value silently - remove one")
                first[key.value] = key.start_mark.line + 1
            duplicate_keys(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            duplicate_keys(item, path)


def key_lines(path: str, text: str | None = None) -> dict[str, int]:
    """1-based line of each top-level key and of each key one level down (``focus_prune.ratio``)
    (``text``: the file's content, when read already). A key given twice in one mapping raises
    (:func:`duplicate_keys`)."""
    root = yaml.compose(read_text(path, "config") if text is None else text)
    duplicate_keys(root, path)
    lines: dict[str, int] = {}
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            lines[str(key.value)] = key.start_mark.line + 1
            if isinstance(value, yaml.MappingNode):
                for sub, _ in value.value:
                    lines[f"{key.value}.{sub.value}"] = sub.start_mark.line + 1
            elif isinstance(value, yaml.SequenceNode):
                for i, item in enumerate(value.value):
                    lines[f"{key.value}[{i}]"] = item.start_mark.line + 1
    return lines


def read_config(path: str) -> tuple[dict, dict[str, int]]:
    """The YAML mapping of ``path`` and its key lines; ``ValueError`` naming file:line otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such config file")
    text = read_text(path, "config")  # not UTF-8: the line of the first bad byte
    try:
        cfg = yaml.safe_load(text)
        lines = key_lines(path, text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ValueError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(cfg).__name__}")
    return cfg, lines


def validation_messages(exc, prefix: str = "") -> list[tuple[str, str]]:
    """``(key, message)`` per pydantic error; unknown keys get the nearest valid one."""
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join([prefix] * bool(prefix) + loc) or prefix or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = ".".join(([prefix] * bool(prefix) + loc)[:-1])
            model = _NESTED.get(parent) or _NESTED.get(parent.split(".", 1)[-1])
            msg = f"unknown key; {nearest(loc[-1], model.model_fields)}" if model else "unknown key"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        out.append((key, msg))
    return out


def _nonfinite_values(cfg: Mapping, account: Account, lines) -> None:
    """Every number in the config is finite: ``.inf`` / ``.nan`` in any key (axolotl's too; the
    ``focus_*`` keys are checked by their schema) is an error."""
    def walk(value, key: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            account.error(key, f"must be a finite number (got {value})", lines)
        elif isinstance(value, Mapping):
            for sub, item in value.items():
                walk(item, f"{key}.{sub}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{key}[{i}]")

    for key, value in cfg.items():
        if not str(key).startswith("focus_"):
            walk(value, str(key))


def _unknown_focus_keys(cfg: Mapping, account: Account, lines) -> None:
    known = FocusArgs.model_fields
    for key in cfg:
        if isinstance(key, str) and key.startswith("focus_") and key not in known:
            account.error(key, f"unknown axolotl_focus key; {nearest(key, known)}", lines)


def _focus_args(cfg: Mapping, account: Account, lines) -> tuple[FocusArgs | None, PruneSettings | None]:
    """The validated FocusArgs and `focus_prune` settings (None where invalid, the errors recorded).
    `focus_prune` is validated once, on its own, so that its errors are said even when a check of
    FocusArgs' own fails first."""
    from pydantic import ValidationError

    keys = set(FocusArgs.model_fields) | {"base_model", "rl", "datasets", "sample_packing", "eval_sample_packing",
                                          "context_parallel_size", "sequence_parallel_degree",
                                          "liger_fused_linear_cross_entropy", "cut_cross_entropy",
                                          "chunked_cross_entropy"}
    data = {k: v for k, v in cfg.items() if k in keys}
    if data.get("focus_prune") and not data.get("focus_teacher_model"):  # as apply_to_config sets it
        data["focus_teacher_model"] = data.get("base_model")
    spec, prune_errors = None, []
    if data.get("focus_prune"):
        try:
            spec = data["focus_prune"] = PruneSettings.model_validate(data["focus_prune"])
        except ValidationError as exc:
            prune_errors = validation_messages(exc, "focus_prune")
            del data["focus_prune"]
    args = None
    try:
        args = FocusArgs.model_validate(data)
    except ValidationError as exc:
        for key, msg in validation_messages(exc):
            if key == "config":  # a model-level check: its message starts with the key
                key, _, msg = msg.partition(": ")
            account.error(key, msg, lines)
    for key, msg in prune_errors:
        account.error(key, msg, lines)
    return args, spec


def _resolve(name: str, key: str, account: Account, lines, train: bool) -> ModelLocation | None:
    try:
        where = resolve_model(str(name), key)
    except ValueError as exc:
        account.error(key, str(exc).removeprefix(f"{key}: "), lines)
        return None
    if where.kind == "unchecked" and train:
        account.error(key, f"{name}: {where.note}, so it cannot be loaded; download it first or unset "
                      "HF_HUB_OFFLINE", lines)
    return where


def _teacher_name(cfg: Mapping, args: FocusArgs | None) -> tuple[str | None, str]:
    """The teacher and where it comes from (None: no teacher needed)."""
    if cfg.get("rl") and cfg.get("focus_dpo_reference", "teacher") == "student":
        return None, "DPO reference = the initial student; no teacher"
    if not cfg.get("rl") and (cfg.get("focus_distill") or focus_default("focus_distill")) == "none":
        return None, "focus_distill: none; no teacher"
    if cfg.get("focus_teacher_model"):
        return cfg["focus_teacher_model"], "focus_teacher_model"
    if cfg.get("focus_prune") and cfg.get("base_model"):
        return cfg["base_model"], "the unpruned source of focus_prune"
    recorded = source_model_of(cfg.get("base_model"))  # None: FocusArgs' validation says what to set
    return recorded, f"focus_source_model recorded by {cfg.get('base_model')}"


def _check_models(cfg: Mapping, args: FocusArgs | None, spec: PruneSettings | None, account: Account, lines,
                  train: bool) -> None:
    base = cfg.get("base_model")
    if not base:
        account.error("base_model", "is required", lines)
        return
    student = account.student = _resolve(base, "base_model", account, lines, train)
    if spec is not None and not cfg.get("focus_pruned_from") and student is not None:
        _plan(base, spec, account, lines)
    distill = cfg.get("focus_distill") or focus_default("focus_distill")
    if cfg.get("focus_teacher_cache") and not cfg.get("rl") and distill != "none":
        _check_teacher_cache(cfg, args, student, account, lines)
        return
    teacher, origin = _teacher_name(cfg, args)
    if teacher is None:
        if not origin.startswith("focus_source_model"):
            account.say("teacher", origin)
        return
    key = "focus_teacher_model"
    if origin.startswith("focus_source_model") and looks_local(teacher) and not os.path.isdir(teacher):
        account.error(key, f"not set, and the focus_source_model {teacher} recorded by base_model {base} does not "
                      "exist (moved?); set focus_teacher_model to the unpruned model", lines, line_of="base_model")
        return
    teacher_at = _resolve(teacher, key, account, lines, train)
    if teacher_at is None:
        return
    account.say("teacher", f"{teacher} ({origin}; {teacher_at.note or teacher_at.kind})")
    if student is None:
        return
    if not (student.readable and teacher_at.readable):
        account.say("vocabulary", "not checked (a model's files are not readable offline)")
        return
    tokenizer = cfg.get("tokenizer_config")
    try:
        check_teacher_before_loading(student.folder, tokenizer if tokenizer and tokenizer != base else None,
                                     teacher_at.folder)
    except (ValueError, OSError) as exc:
        account.error(key, str(exc).removeprefix(f"{key}: "), lines)
    else:
        account.say("vocabulary", "teacher and student share one tokenizer and vocabulary size")


def _student_tokenizer(cfg: Mapping, student: ModelLocation):
    """The student's tokenizer as ``axolotl train`` loads it (axolotl's ``load_tokenizer``: pad token,
    ``special_tokens`` of the config), from tokenizer and config files only; the plain
    ``AutoTokenizer`` where axolotl's loader cannot run on the raw config."""
    from transformers import AutoTokenizer

    base = cfg.get("base_model")
    source = cfg.get("tokenizer_config") if cfg.get("tokenizer_config") not in (None, base) else student.folder
    try:
        from axolotl.loaders import load_tokenizer
        from axolotl.utils.dict import DictDefault

        raw = DictDefault(copy.deepcopy(dict(cfg)))
        raw.update(base_model=student.folder, tokenizer_config=source)
        if raw.get("base_model_config") in (None, base):
            raw["base_model_config"] = student.folder
        return load_tokenizer(raw)
    except Exception:  # noqa: BLE001 - an unusual config: the tokenizer files as they are
        return AutoTokenizer.from_pretrained(source)


def _check_teacher_cache(cfg: Mapping, args: FocusArgs | None, student: ModelLocation | None, account: Account,
                         lines) -> None:
    """``focus_teacher_cache``: a complete cache (its cache.json and shard folders; no shard is
    read) built at ``focus_temperature`` for the student's vocabulary size and tokenizer."""
    from .train.teacher_cache.format import (
        FORMAT,
        META_FILE,
        VERSION,
        other_data,
        other_teacher,
        read_meta,
        shard_problems,
        tokenizer_digest,
    )

    key = "focus_teacher_cache"
    path = str(cfg[key])
    build = f"axolotl-focus teacher-cache CONFIG --output {path} --k 512"
    if not os.path.exists(path):
        account.error(key, f"{path} does not exist; build the teacher cache first: {build}", lines)
        return
    meta = read_meta(path) if os.path.isdir(path) else None
    if meta is None:
        account.error(key, f"{path} is not a teacher cache (no {META_FILE} of format {FORMAT}); build one: {build}",
                      lines)
        return
    if meta.version != VERSION:
        account.error(key, f"{path}: teacher cache version {meta.version} (this axolotl_focus reads version "
                      f"{VERSION}); rebuild it: {build} --restart", lines)
        return
    damaged = shard_problems(path, meta)  # sizes of the files each shard was written with; no data read
    if not meta.complete:
        done = sum(os.path.isdir(os.path.join(path, f"shard-{i:05d}")) for i in range(meta.shards))
        account.error(key, f"{path}: the teacher cache is incomplete ({done} of {meta.shards} shards); finish it by "
                      "running axolotl-focus teacher-cache again with the same settings", lines)
        return
    if damaged:
        account.error(key, f"{path}: the teacher cache is damaged ({'; '.join(damaged[:3])}); rerun axolotl-focus "
                      "teacher-cache with the same settings to write those shards again", lines)
        return
    account.say("teacher", f"cache {path} (k={meta.k}, teacher {meta.teacher}, {meta.sequences} sequences, "
                f"{meta.positions} positions); no teacher weights loaded")
    if args is not None and float(meta.temperature) != float(args.focus_temperature):
        account.error(key, f"{path} was built at temperature {meta.temperature}, but focus_temperature is "
                      f"{args.focus_temperature}; rebuild it with --temperature {args.focus_temperature} (or set "
                      f"focus_temperature: {meta.temperature})", lines)
    problem = other_data(meta, cfg)  # dataset file digests and sequence_len, as recorded at build time
    teacher = cfg.get("focus_teacher_model") or (cfg.get("base_model") if cfg.get("focus_prune") else None)
    if teacher and (os.path.isdir(str(teacher)) or not looks_local(str(teacher))):
        problem = problem or other_teacher(meta, str(teacher))
    if problem:
        account.error(key, f"{path} {problem}; rebuild it from this config: {build} --restart", lines)
    if student is None:
        return
    if not student.readable:
        account.say("vocabulary", "not checked against the teacher cache (the student's files are not readable "
                    "offline)")
        return
    from transformers import AutoConfig

    problems = []
    # axolotl writes a tokenizer with added_tokens_overrides into output_dir: compared by the trainer only
    compare_tokenizer = meta.tokenizer_digest is not None and not cfg.get("added_tokens_overrides")
    try:
        vocab = AutoConfig.from_pretrained(student.folder, trust_remote_code=True).vocab_size
        if meta.vocab_size is not None and vocab is not None and int(vocab) != int(meta.vocab_size):
            problems.append(f"vocabulary {meta.vocab_size} (the student's is {vocab})")
        if compare_tokenizer and tokenizer_digest(_student_tokenizer(cfg, student)) != meta.tokenizer_digest:
            problems.append("another tokenizer (vocabulary or special tokens differ from the student's)")
    except (OSError, ValueError) as exc:
        account.error(key, f"the student's tokenizer / config could not be read to check the cache: {exc}", lines)
        return
    if problems:
        account.error(key, f"{path} was built for {' and '.join(problems)}; rebuild it from this config: {build} "
                      "--restart", lines)
    elif compare_tokenizer:
        account.say("vocabulary", "the teacher cache was built for the student's tokenizer and vocabulary size")
    else:
        account.say("vocabulary", "the teacher cache was built for the student's vocabulary size (its tokenizer is "
                    "compared by the trainer, before step one)")


def _plan(source: str, spec: PruneSettings, account: Account, lines) -> None:
    from .prune.cache import plan_prune

    try:
        plan = plan_prune(source, spec)
    except ValueError as exc:
        message = str(exc).removeprefix("focus_prune: ")
        first = re.match(r"[\w.]+", message)
        key = first.group(0).removeprefix("focus_prune.") if first else ""
        if key in spec.model_fields:
            account.error(f"focus_prune.{key}", message.removeprefix(f"focus_prune.{key}: ").removeprefix(f"{key}: "),
                          lines)
        else:
            account.error("focus_prune", message, lines)
        return
    what = f"{spec.method} pruning of {source}"
    if plan.get("params_after"):
        what += (f": {plan['params_before']:,} -> {plan['params_after']:,} parameters "
                 f"(-{plan['reduction']:.1%})")
    elif plan.get("note"):
        what += f" ({plan['note']})"
    cache = "cache hit, reused" if plan["cached"] else "cache miss: `axolotl train` prunes it first"
    account.say("student", f"{what}; {cache} ({plan['cache_path']})")


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


def _pair_tokenizer(cfg: Mapping, account: Account):
    """The student's tokenizer (as axolotl loads it) to measure RePAIR prompts against sequence_len,
    or None when the student's files cannot be read here."""
    student = account.student
    if student is None or not student.readable or not cfg.get("sequence_len"):
        return None
    try:
        return _student_tokenizer(cfg, student)
    except (OSError, ValueError):
        return None


def _dataset_files(cfg: Mapping, account: Account, lines) -> None:
    from .train.pair_dataset import check_pair_file

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
            account.error(f"{key}.path", f"{path} does not exist{hint}", lines)
            continue
        if os.path.isdir(path):
            found = [n for n in sorted(os.listdir(path)) if n.endswith(_DATA_SUFFIXES) or n == "dataset_info.json"]
            if not found:
                account.error(f"{key}.path", f"{path} is a folder without data files" + (
                    " (give the .jsonl file axolotl-focus pairs wrote)" if pairs else ""), lines)
            else:
                account.say("dataset", f"[{i}] {path} ({label}): local folder, loaded by axolotl")
            continue
        try:
            if pairs and path.endswith(".jsonl"):  # RePAIR prompts measured as the dataset type will measure them
                measure = kind == REPAIR_TYPE and (tokenizer := tokenizer or _pair_tokenizer(cfg, account))
                bad = check_pair_file(path, skip, tokenizer if measure else None, cfg.get("sequence_len"))
                rows = sum(1 for line in read_lines(path) if line.strip())
                measured = f", prompts measured against sequence_len {cfg.get('sequence_len')}" if measure else ""
                account.say("dataset", f"[{i}] {path} ({label}): {rows} rows checked{measured}"
                            + (f", {bad} bad ones skipped" if bad else ""))
                continue
            problem = _json_lines_problem(path) if path.endswith((".jsonl", ".json")) else None
        except ValueError as exc:
            account.error(f"{key}.path", str(exc), lines)
            continue
        if problem:
            account.error(f"{key}.path", problem, lines)
        else:
            account.say("dataset", f"[{i}] {path} ({label}): local, loaded by axolotl")


def _pair_stream(cfg: Mapping, account: Account, lines) -> None:
    """``focus_repair_pairs``: a local pairs file must exist and its rows pass the dataset type's checks."""
    from .train.pair_dataset import check_pair_file

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
        account.error("focus_repair_pairs", f"{path} {what} (mine it first: axolotl-focus pairs)", lines)
        return
    tokenizer = _pair_tokenizer(cfg, account)  # prompts measured as the trainer fits them
    try:
        bad = check_pair_file(path, bool(cfg.get("focus_repair_skip_bad_rows")), tokenizer, cfg.get("sequence_len"))
        rows = sum(1 for line in read_lines(path) if line.strip())
    except ValueError as exc:
        account.error("focus_repair_pairs", str(exc), lines)
        return
    measured = f", prompts measured against sequence_len {cfg.get('sequence_len')}" if tokenizer else ""
    account.say("pairs", f"{path}: {rows - bad} pairs checked{measured}"
                + (f" ({bad} bad ones skipped)" if bad else "") + f", drawn {per_step} per optimizer step apart from "
                "the SFT data")


def _loss(cfg: Mapping, args: FocusArgs) -> str:
    if cfg.get("rl"):
        return f"{cfg['rl']} (axolotl/TRL) on the pairs, reference model = {args.focus_dpo_reference}"
    from .train.pair_dataset import uses_repair

    terms = [f"CE x{args.focus_ce_alpha}"]
    cached = " from the teacher cache" if args.focus_teacher_cache else ""
    if args.focus_distill == "focus":
        terms.append(f"FOCUS x{args.focus_alpha} (tau {args.focus_temperature}, beta {args.focus_beta}, "
                     f"gamma {args.focus_gamma}){cached}")
    elif args.focus_distill == "kd":
        terms.append(f"KD x{args.focus_alpha} (T {args.focus_temperature}){cached}")
    if uses_repair(cfg) or args.focus_repair_pairs:
        stream = f", {args.focus_repair_pairs_per_step} pairs per step" if args.focus_repair_pairs else ""
        terms.append(f"RePAIR x{args.focus_repair_alpha} (margin {args.focus_repair_margin}{stream})")
    aux = args.focus_aux_losses
    for name in FocusAuxLosses.model_fields:
        term = getattr(aux, name, None) if aux else None
        if term is not None:
            terms.append(f"{name} {term.model_dump(by_alias=True)}")
    return " + ".join(terms)


def check_config(cfg: Mapping, path: str = "", *, train: bool, lines: Mapping[str, int] | None = None) -> Account:
    """Every check of the module docstring that needs no weights, on a raw config mapping.

    ``train``: as run by ``axolotl train`` (a hub model that cannot be loaded offline is an error,
    not a note; axolotl validates its own schema afterwards). Returns the :class:`Account`."""
    account = Account(path)
    lines = lines or {}
    if PLUGIN not in (cfg.get("plugins") or []) and not train:
        account.error("plugins", f"does not list {PLUGIN}; the focus_* keys would be ignored", lines)
    _unknown_focus_keys(cfg, account, lines)
    _nonfinite_values(cfg, account, lines)
    args, spec = _focus_args(cfg, account, lines)
    _check_models(cfg, args, spec, account, lines, train)
    _dataset_files(cfg, account, lines)
    _pair_stream(cfg, account, lines)
    if args is not None:
        account.say("loss", _loss(cfg, args))
    return account


def axolotl_schema_errors(cfg: Mapping, lines: Mapping[str, int]) -> list[tuple[str, str]]:
    """axolotl's own validation of the config with the plugins' schemas merged, run without the
    plugin's pruning (``focus_prune`` is planned, not run). ``(key, message)`` per problem."""
    import torch
    from axolotl.integrations.base import PluginManager
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault
    from pydantic import ValidationError

    cfg = DictDefault(copy.deepcopy(dict(cfg)))
    manager = PluginManager.get_instance()
    for name in cfg.get("plugins") or []:
        manager.register(name)
        plugin = manager.plugins.get(name)
        if plugin is not None and name != PLUGIN:
            plugin.register(cfg)
    if cfg.get("focus_prune") and cfg.get("base_model"):  # what apply_to_config would set
        cfg["focus_pruned_from"] = cfg["base_model"]
        cfg["focus_teacher_model"] = cfg.get("focus_teacher_model") or cfg["base_model"]
    capabilities = {}
    if torch.cuda.is_available():
        from axolotl.cli.config import gpu_capabilities

        capabilities = dict(zip(("capabilities", "env_capabilities"), gpu_capabilities()))
    try:
        validate_config(cfg, **capabilities)
    except ValidationError as exc:
        return [(key if key != "config" else "axolotl", msg) for key, msg in validation_messages(exc)]
    except ValueError as exc:
        return [("axolotl", str(exc))]
    return []


def validate_file(path: str) -> Account:
    """`axolotl-focus validate CONFIG.yml`: :func:`check_config` plus axolotl's schema."""
    import torch

    cfg, lines = read_config(path)
    account = check_config(cfg, path, train=False, lines=lines)
    if PLUGIN in (cfg.get("plugins") or []):
        for key, msg in axolotl_schema_errors(cfg, lines):
            if not any(f": {key}: " in e for e in account.errors):  # already said by our own checks
                account.error(key, msg, lines)
        gpu = "" if torch.cuda.is_available() else "; GPU capability checks (bf16, flash attention) run at train time"
        account.say("axolotl", "schema checked with the plugin merged" + gpu)
    return account


def check_before_training(cfg: Any) -> None:
    """The plugin's ``register`` hook under ``axolotl train``: raise one ``ValueError`` with every
    problem, before axolotl validates, prunes, tokenizes or loads anything."""
    import logging

    path = str(cfg.get("axolotl_config_path") or "")
    lines = {}
    if path and os.path.isfile(path):
        try:
            lines = key_lines(path)  # a key given twice raises here (axolotl loaded the file keeping the last)
        except yaml.YAMLError:
            pass
    account = check_config(cfg, path, train=True, lines=lines)
    account.raise_errors()
    log = logging.getLogger(__name__)
    for topic, text in account.lines:
        log.info("axolotl_focus %s: %s", topic, text)
