"""The teacher cache's check before training (``focus_teacher_cache`` instead of a teacher): the
folder is a complete cache (its ``cache.json`` and shard folders; no shard is read), built at
``focus_temperature`` from this config's data and teacher, for the student's vocabulary size and
tokenizer (its digest, the tokenizer loaded as axolotl loads it)."""

from __future__ import annotations

import os
from typing import Mapping

from ...account import Account
from ...locations import looks_local
from ..tokenizer import student_tokenizer
from .format import FORMAT, META_FILE, VERSION, other_data, other_teacher, read_meta, shard_problems, tokenizer_digest

__all__ = ["check"]


def check(cfg: Mapping, account: Account) -> None:
    """``focus_teacher_cache``: complete, undamaged, built at ``focus_temperature`` from this config's
    data and teacher for the student's vocabulary and tokenizer (see the module docstring)."""
    key = "focus_teacher_cache"
    path = str(cfg[key])
    build = f"axolotl-focus teacher-cache CONFIG --output {path} --k 512"
    if not os.path.exists(path):
        account.error(key, f"{path} does not exist; build the teacher cache first: {build}")
        return
    meta = read_meta(path) if os.path.isdir(path) else None
    if meta is None:
        account.error(key, f"{path} is not a teacher cache (no {META_FILE} of format {FORMAT}); build one: {build}")
        return
    if meta.version != VERSION:
        account.error(key, f"{path}: teacher cache version {meta.version} (this axolotl_focus reads version "
                      f"{VERSION}); rebuild it: {build} --restart")
        return
    damaged = shard_problems(path, meta)  # sizes of the files each shard was written with; no data read
    if not meta.complete:
        done = sum(os.path.isdir(os.path.join(path, f"shard-{i:05d}")) for i in range(meta.shards))
        account.error(key, f"{path}: the teacher cache is incomplete ({done} of {meta.shards} shards); finish it by "
                      "running axolotl-focus teacher-cache again with the same settings")
        return
    if damaged:
        account.error(key, f"{path}: the teacher cache is damaged ({'; '.join(damaged[:3])}); rerun axolotl-focus "
                      "teacher-cache with the same settings to write those shards again")
        return
    account.say("teacher", f"cache {path} (k={meta.k}, teacher {meta.teacher}, {meta.sequences} sequences, "
                f"{meta.positions} positions); no teacher weights loaded")
    args = account.focus
    if args is not None and float(meta.temperature) != float(args.focus_temperature):
        account.error(key, f"{path} was built at temperature {meta.temperature}, but focus_temperature is "
                      f"{args.focus_temperature}; rebuild it with --temperature {args.focus_temperature} (or set "
                      f"focus_temperature: {meta.temperature})")
    problem = other_data(meta, cfg)  # dataset file digests and sequence_len, as recorded at build time
    teacher = cfg.get("focus_teacher_model") or (cfg.get("base_model") if cfg.get("focus_prune") else None)
    if teacher and (os.path.isdir(str(teacher)) or not looks_local(str(teacher))):
        problem = problem or other_teacher(meta, str(teacher))
    if problem:
        account.error(key, f"{path} {problem}; rebuild it from this config: {build} --restart")
    _check_vocabulary(cfg, account, meta, path, build)


def _check_vocabulary(cfg: Mapping, account: Account, meta, path: str, build: str) -> None:
    """The cache's vocabulary size and tokenizer digest are the student's."""
    key, student = "focus_teacher_cache", account.student
    if student is None:
        return
    if not student.readable:
        account.say("vocabulary", "not checked against the teacher cache (the student's files are not readable "
                    "offline)")
        return
    from transformers import AutoConfig  # heavy: only when a cache is checked against a readable student

    problems = []
    # axolotl writes a tokenizer with added_tokens_overrides into output_dir: compared by the trainer only
    compare_tokenizer = meta.tokenizer_digest is not None and not cfg.get("added_tokens_overrides")
    try:
        vocab = AutoConfig.from_pretrained(student.folder, trust_remote_code=True).vocab_size
        if meta.vocab_size is not None and vocab is not None and int(vocab) != int(meta.vocab_size):
            problems.append(f"vocabulary {meta.vocab_size} (the student's is {vocab})")
        if compare_tokenizer and tokenizer_digest(student_tokenizer(cfg, student)) != meta.tokenizer_digest:
            problems.append("another tokenizer (vocabulary or special tokens differ from the student's)")
    except (OSError, ValueError) as exc:
        account.error(key, f"the student's tokenizer / config could not be read to check the cache: {exc}")
        return
    if problems:
        account.error(key, f"{path} was built for {' and '.join(problems)}; rebuild it from this config: {build} "
                      "--restart")
    elif compare_tokenizer:
        account.say("vocabulary", "the teacher cache was built for the student's tokenizer and vocabulary size")
    else:
        account.say("vocabulary", "the teacher cache was built for the student's vocabulary size (its tokenizer is "
                    "compared by the trainer, before step one)")
