"""The ``axolotl-focus teacher-cache`` command (its options: :class:`TeacherCacheOptions`): a cache from
a teacher model (:mod:`~axolotl_focus.train.teacher_cache.build`) or from axolotl KD logprobs
(:mod:`~axolotl_focus.train.teacher_cache.kd_import`), then a summary.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ... import train  # the stages' public API, imported on first use: `teacher-cache --help` loads no torch
from ...config import focus_default, source_model_of
from ...config_file import read_config
from ...files import exclusive_lock
from ...locations import resolve_model
from ...options import add_options, opt, positive_int, resolve_device
from ...vocabulary import check_vocab_compat
from .. import teacher_cache


@dataclass
class TeacherCacheOptions:
    """Options of ``axolotl-focus teacher-cache`` (besides the config); each field's help is its
    ``--help`` text (:mod:`axolotl_focus.options`)."""

    output: str = opt(None, "the cache folder (created; resumed when it holds an unfinished cache of the same "
                      "settings)", required=True)
    k: int = opt(512, "teacher tokens kept per position (default: 512, the k whose training effect the demo "
                 "measured)", type=positive_int)
    teacher: str | None = opt(None, "teacher path or hub id (default: the config's focus_teacher_model, as the "
                              "plugin resolves it)")
    temperature: float | None = opt(None, "distillation temperature tau (default: the config's focus_temperature, "
                                    "2.0)")
    batch_size: int = opt(8, "sequences per teacher forward", type=positive_int)
    dtype: Literal["float32", "bfloat16", "float16"] | None = opt(None, "teacher compute dtype (default: the config's "
                                                                  "focus_teacher_dtype; auto = the training dtype)")
    device: Literal["cpu", "cuda"] | None = opt(None, "where the teacher runs (default: cuda when available, else cpu)")
    shard_size: int | None = opt(None, "sequences per shard folder, the unit of resuming (default: the existing "
                                 "cache's, else 1024)", type=positive_int)
    restart: bool = opt(False, "delete an existing teacher cache in --output and build it again (a folder that is "
                        "not a teacher cache is never deleted)", action="store_true")
    from_kd_logprobs: bool = opt(False, "no teacher: convert the top-k teacher logprobs of the config's axolotl KD "
                                 "datasets (type: axolotl.integrations.kd.chat_template...) into the cache, k = "
                                 "theirs; field mapping and temperatures: "
                                 "axolotl_focus/train/teacher_cache/kd_import.py", action="store_true")
    progress: bool = opt(True, "progress bar")


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def add_teacher_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``axolotl-focus teacher-cache``: the config, then :class:`TeacherCacheOptions`."""
    parser.add_argument("config", help="the axolotl config (.yml) with plugins: [axolotl_focus.FocusPlugin]")
    add_options(parser, TeacherCacheOptions, defaults=True)


def run_teacher_cache_cli(args, load_teacher_fn: Callable | None = None) -> int:
    """``axolotl-focus teacher-cache``: build (or resume) the cache, print a summary."""
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # axolotl's telemetry retries for minutes offline
    started = time.monotonic()
    with exclusive_lock(args.output):  # before the data is tokenized: a second writer is refused at once
        if getattr(args, "from_kd_logprobs", False):
            meta = teacher_cache.run_import_cli(args)
        else:
            meta = _build_from_teacher(args, load_teacher_fn)
    size = folder_size(args.output)
    print(f"teacher cache: {args.output}")
    print(f"sequences {meta.sequences:,}, positions {meta.positions:,}, k {meta.k}, temperature {meta.temperature}, "
          f"teacher {meta.teacher} ({meta.dtype})")
    print(f"size {size / 2**20:.1f} MiB ({size / max(meta.positions, 1):.0f} B per position), "
          f"{time.monotonic() - started:.1f} s")
    return 0


def _build_from_teacher(args, load_teacher_fn: Callable | None) -> teacher_cache.CacheMeta:
    import torch  # heavy: torch, transformers and axolotl only once the command runs
    from axolotl.loaders import load_tokenizer
    from transformers import AutoConfig, AutoTokenizer

    # everything the options decide is checked before the data is tokenized (which writes axolotl's
    # dataset_prepared_path) and before anything is written to --output
    device = resolve_device(args.device, "--device")
    raw = read_config(str(args.config))[0]
    teacher_name = args.teacher or raw.get("focus_teacher_model") or (
        raw.get("base_model") if raw.get("focus_prune") else source_model_of(raw.get("base_model")))
    if not teacher_name:
        raise ValueError(f"--teacher: not given, and {args.config} names no focus_teacher_model (nor a base_model "
                         "that records its focus_source_model)")
    field = "--teacher" if args.teacher else "focus_teacher_model"
    where = resolve_model(str(teacher_name), field)
    if where.readable:  # k against the teacher's vocabulary
        vocab = getattr(AutoConfig.from_pretrained(where.folder).get_text_config(), "vocab_size", None)
        if vocab is not None and args.k > int(vocab):
            raise ValueError(f"--k: {args.k} exceeds the vocabulary of the teacher {teacher_name} ({vocab} tokens)")
    rows, cfg = teacher_cache.rows_from_config(args.config)
    temperature = args.temperature if args.temperature is not None else (
        cfg.get("focus_temperature") or focus_default("focus_temperature"))
    if args.dtype:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    else:
        dtype = train.resolve_dtype(cfg.get("focus_teacher_dtype") or focus_default("focus_teacher_dtype"),
                                    bool(cfg.get("bf16")), bool(cfg.get("fp16")))
    tokenizer = load_tokenizer(cfg)
    check_vocab_compat(tokenizer, AutoTokenizer.from_pretrained(str(teacher_name)))
    existing = teacher_cache.read_meta(args.output)
    shard_size = args.shard_size or (existing.shard_size if existing is not None else teacher_cache.DEFAULT_SHARD_SIZE)
    load = load_teacher_fn or train.load_teacher
    return teacher_cache.build_cache(lambda: load(str(teacher_name), dtype), rows, args.output,
                                     k=args.k, temperature=temperature, batch_size=args.batch_size, device=device,
                                     progress=args.progress, teacher_name=str(teacher_name), tokenizer=tokenizer,
                                     shard_size=shard_size, restart=args.restart, source_config=str(args.config),
                                     dtype=dtype, data=teacher_cache.data_sources(raw))
