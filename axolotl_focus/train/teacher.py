"""The in-process teacher: which one a config names, loading, placement (device, DeepSpeed ZeRO)
and, before any weights are loaded, its check (:func:`check`: resolvable, and the student's
vocabulary, :mod:`axolotl_focus.vocabulary`)."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Mapping

import torch

from ..account import Account
from ..config import SOURCE_MODEL_KEY, focus_default, source_model_of
from ..locations import looks_local
from ..vocabulary import check_teacher_before_loading, check_vocab_compat

LOG = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / DeepSpeed wrapper (``.module``), or ``module`` itself."""
    return module.module if hasattr(module, "module") else module


def resolve_dtype(name: str, bf16: bool, fp16: bool) -> torch.dtype:
    """``focus_teacher_dtype``: an explicit dtype, or 'auto' = the training dtype."""
    if name != "auto":
        return _DTYPES[name]
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def load_teacher(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """Load the teacher once: eval mode, no grads, never seen by the optimizer or PEFT."""
    from transformers import AutoModelForCausalLM  # heavy: only when the teacher is loaded

    LOG.info("axolotl_focus: loading teacher %s (%s)", path, dtype)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    teacher.eval()
    teacher.requires_grad_(False)
    teacher.config.use_cache = False
    return teacher


def teacher_placement(deepspeed_config: dict | None) -> str:
    """How the teacher is placed: 'zero3' (sharded inference engine), 'deepspeed' (replicated,
    stage-0 inference engine) or 'device' (plain module on the local device; DDP, single process)."""
    if not deepspeed_config:
        return "device"
    stage = (deepspeed_config.get("zero_optimization") or {}).get("stage", 0)
    return "zero3" if stage == 3 else "deepspeed"


def teacher_deepspeed_config(deepspeed_config: dict, hidden_size: int | None) -> dict:
    """An inference-only DeepSpeed config for the teacher derived from the training one.

    ZeRO-3 keeps the teacher sharded across ranks (gathered layer by layer in forward); for stages
    0-2 sharding brings nothing to a frozen model, so it is replicated with stage 0.
    """
    config = copy.deepcopy(deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    if teacher_placement(deepspeed_config) == "zero3":
        if hidden_size:
            zero["reduce_bucket_size"] = hidden_size * hidden_size
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
    else:
        config["zero_optimization"] = {"stage": 0}
    # the teacher never steps: batch-size keys must only be self-consistent
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if config.get(key) == "auto":
            config.pop(key)
    return config


def place_teacher(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Move/wrap the teacher for the accelerator's setup (see :func:`teacher_placement`)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    ds_config = plugin.deepspeed_config if plugin is not None else None
    placement = teacher_placement(ds_config)
    LOG.info("axolotl_focus: teacher placement = %s", placement)
    if placement == "device":
        return teacher.to(accelerator.device)
    import deepspeed  # GPU-only path: needs the `deepspeed` extra and NCCL

    hidden = getattr(teacher.config, "hidden_size", None)
    engine, *_ = deepspeed.initialize(model=teacher, config=teacher_deepspeed_config(ds_config, hidden))
    engine.eval()
    return engine


def gathered(*params: torch.nn.Parameter):
    """Context in which ZeRO-3-partitioned parameters hold their full value (no-op otherwise)."""
    partitioned = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed  # optional (the deepspeed extra), GPU only

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def teacher_name(cfg: Mapping) -> tuple[str | None, str]:
    """The teacher of a raw config and where it comes from (None: no teacher needed)."""
    if cfg.get("rl") and cfg.get("focus_dpo_reference", "teacher") == "student":
        return None, "DPO reference = the initial student; no teacher"
    if not cfg.get("rl") and (cfg.get("focus_distill") or focus_default("focus_distill")) == "none":
        return None, "focus_distill: none; no teacher"
    if cfg.get("focus_teacher_model"):
        return cfg["focus_teacher_model"], "focus_teacher_model"
    if cfg.get("focus_prune") and cfg.get("base_model"):
        return cfg["base_model"], "the unpruned source of focus_prune"
    recorded = source_model_of(cfg.get("base_model"))  # None: FocusArgs' validation says what to set
    return recorded, f"{SOURCE_MODEL_KEY} recorded by {cfg.get('base_model')}"


def check(cfg: Mapping, account: Account) -> None:
    """The teacher (``focus_teacher_model``, else the ``focus_prune`` source, else the
    ``focus_source_model`` a pruned ``base_model`` records) can be loaded and shares the student's
    vocabulary, from tokenizer files and configs only."""
    teacher, origin = teacher_name(cfg)
    if teacher is None:
        if not origin.startswith(SOURCE_MODEL_KEY):
            account.say("teacher", origin)
        return
    key = "focus_teacher_model"
    if origin.startswith(SOURCE_MODEL_KEY) and looks_local(teacher) and not os.path.isdir(teacher):
        account.error(key, f"not set, and the focus_source_model {teacher} recorded by base_model "
                      f"{cfg.get('base_model')} does not exist (moved?); set focus_teacher_model to the unpruned "
                      "model", line_of="base_model")
        return
    teacher_at = account.resolve(teacher, key)
    if teacher_at is None:
        return
    account.say("teacher", f"{teacher} ({origin}; {teacher_at.note or teacher_at.kind})")
    student = account.student
    if student is None:
        return
    if not (student.readable and teacher_at.readable):
        account.say("vocabulary", "not checked (a model's files are not readable offline)")
        return
    tokenizer = cfg.get("tokenizer_config")
    try:
        check_teacher_before_loading(student.folder, tokenizer if tokenizer and tokenizer != cfg.get("base_model")
                                     else None, teacher_at.folder)
    except (ValueError, OSError) as exc:
        account.error(key, str(exc).removeprefix(f"{key}: "))
    else:
        account.say("vocabulary", "teacher and student share one tokenizer and vocabulary size")


def check_config_teacher(cfg) -> None:
    """Fail on a teacher/student vocabulary mismatch of an axolotl config before any weights are
    loaded (the plugin's ``pre_model_load``). Nothing to check when no teacher model is loaded:
    ``focus_distill: none``, ``rl``, or ``focus_teacher_cache`` (the trainer checks the cache's
    vocabulary)."""
    if cfg.focus_distill != "none" and cfg.focus_teacher_model and not cfg.rl and not cfg.focus_teacher_cache:
        check_teacher_before_loading(cfg.base_model, cfg.tokenizer_config, cfg.focus_teacher_model)


def use_teacher_as_reference(trainer, cfg) -> None:
    """Make a TRL DPO trainer score the reference log-probs with the unpruned teacher."""
    from transformers import AutoTokenizer  # heavy: only under DPO with the teacher as reference

    if getattr(trainer.args, "precompute_ref_log_probs", False):
        raise ValueError(
            "focus_dpo_reference: teacher cannot be combined with precompute_ref_log_probs (the reference "
            "log-probs would come from the student); drop precompute_ref_log_probs or set "
            "focus_dpo_reference: student"
        )
    check_vocab_compat(trainer.processing_class, AutoTokenizer.from_pretrained(cfg.focus_teacher_model))
    dtype = resolve_dtype(cfg.focus_teacher_dtype or "auto", bool(cfg.bf16), bool(cfg.fp16))
    teacher = load_teacher(cfg.focus_teacher_model, dtype)
    trainer.ref_model = place_teacher(teacher, trainer.accelerator)
    LOG.info("axolotl_focus: DPO reference model = teacher %s", cfg.focus_teacher_model)
