"""Config schema: every YAML key the plugin reads, its paper default, and its validation.

Axolotl merges :class:`FocusArgs` into its own pydantic schema (keys no model declares are
dropped silently), and :class:`FocusTrainingArgsMixin` into ``AxolotlTrainingArguments`` so the
values reach :class:`axolotl_focus.train.trainer.FocusTrainer` as ``self.args.focus_*``. Axolotl
imports both by dotted path (``axolotl_focus.config.FocusArgs``, ``...FocusTrainingArgsMixin``,
see :mod:`axolotl_focus.plugin`), so this module is the plugin's public schema.

Every default and help text is written once, on the :class:`FocusArgs` field (``description``).
:class:`FocusTrainingArgsMixin` is generated from those fields (:data:`TRAINER_KEYS`, same
default, ``metadata={"help": description}`` as ``TrainingArguments`` fields carry), plus
``focus_sequence_len``, which the plugin fills from ``sequence_len``.

:func:`check` is the config's own part of the check before training (:mod:`axolotl_focus.preflight`):
the plugin listed, the ``focus_*`` keys known, the numbers finite, :class:`FocusArgs` valid. The
``focus_prune:`` block is the prune stage's settings (:class:`axolotl_focus.prune.settings.PruneSettings`),
declared here as a mapping and checked by that stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal, Mapping, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, model_validator

from .account import Account, nearest, validation_messages
from .loss_settings import DISTILL_MODES, AuxSpec, DistillMode

TRAINING_RECORD = "focus_training.json"  # the trainer's record of its focus_* settings, in output_dir
PLUGIN = "axolotl_focus.FocusPlugin"  # the name a config lists under `plugins:`
REPAIR_TYPE = "axolotl_focus.repair"  # the dataset type of RePAIR pair files

# Config attribute written into pruned checkpoints (pruning issue): the unpruned source model.
SOURCE_MODEL_KEY = "focus_source_model"

# Axolotl features that replace the causal-LM loss; FOCUS computes CE itself in its fused pass.
_CONFLICTING_LOSS_KEYS = ("liger_fused_linear_cross_entropy", "cut_cross_entropy", "chunked_cross_entropy")


def source_model_of(model_path: str | None) -> str | None:
    """The unpruned source model recorded in a checkpoint's config.json, if any: a local folder,
    or a hub id (its config.json through the hub cache; None when it cannot be fetched)."""
    if not model_path:
        return None
    if os.path.isdir(model_path):
        config_file = os.path.join(model_path, "config.json")
        if not os.path.isfile(config_file):
            return None
    elif os.path.exists(model_path) or model_path.count("/") > 1:
        return None  # a file, or a path that is not a hub id
    else:
        try:
            from huggingface_hub import hf_hub_download  # heavy, and only for a hub id's config

            config_file = hf_hub_download(model_path, "config.json")
        except Exception:  # offline, gated, missing: no recorded source, validation says what to set
            return None
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    return config.get(SOURCE_MODEL_KEY) or (config.get("pruning") or {}).get("source_model")


class _Term(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class UnlikelihoodArgs(_Term):
    """Token-level unlikelihood (Welleck et al., 2019): CE + alpha * sum_c -log(1 - p(c))."""

    alpha: FiniteFloat = Field(default=0.5, ge=0, description="weight of the UL term (the paper: 0.5)")


class ScaleGradArgs(_Term):
    """ScaleGrad (Lin et al., 2021): replaces CE; novel tokens' probabilities scaled by gamma."""

    gamma: FiniteFloat = Field(default=0.5, gt=0, le=1, description="0.5 in the paper; 1.0 is plain CE")


class TaiLrArgs(_Term):
    """TaiLr (Ji et al., 2023): replaces CE by w * NLL, w = p / (gamma + (1 - gamma) p), detached."""

    gamma: FiniteFloat = Field(default=0.1, gt=0, le=1, description="their settings: 0.1 down to 1e-7")
    min_weight: FiniteFloat = Field(default=0.2, ge=0, le=1, description="lower clamp of w; their settings 0.2-0.3")


class DittoArgs(_Term):
    """DITTO (Xu et al., 2022): DITTO-only updates on pseudo-repetition rows, with a probability."""

    lambda_: FiniteFloat = Field(default=0.5, ge=0, le=1, alias="lambda",
                           description="penalty target lambda * p(previous copy); the paper: 0.5")
    probability: FiniteFloat = Field(default=0.5, ge=0, le=1,
                                     description="share of optimizer steps that are DITTO-only")


class FocusAuxLosses(BaseModel):
    """`focus_aux_losses:` the paper's baselines as extra loss terms. A mapping term -> settings
    (`unlikelihood: {alpha: 0.5}`; `{}` or `true` means the defaults, `false` or null leaves the
    term off) or a list of term names, each with its defaults."""

    model_config = ConfigDict(extra="forbid")

    unlikelihood: UnlikelihoodArgs | None = Field(default=None, description="token-level unlikelihood (adds to CE)")
    scalegrad: ScaleGradArgs | None = Field(default=None, description="ScaleGrad (replaces CE)")
    tailr: TaiLrArgs | None = Field(default=None, description="TaiLr (replaces CE)")
    ditto: DittoArgs | None = Field(default=None, description="DITTO-only steps on pseudo-repetition rows")

    @model_validator(mode="before")
    @classmethod
    def _names_and_defaults(cls, data: Any) -> Any:
        if isinstance(data, (list, tuple)):
            unknown = [name for name in data if name not in cls.model_fields]
            if unknown:
                raise ValueError(f"focus_aux_losses: unknown term(s) {unknown}; known: {list(cls.model_fields)}")
            data = {name: {} for name in data}
        if isinstance(data, dict):
            data = {k: ({} if v is True else v) for k, v in data.items() if v is not None and v is not False}
            if data.get("scalegrad") is not None and data.get("tailr") is not None:
                raise ValueError("focus_aux_losses: scalegrad and tailr both replace the CE/NLL term; "
                                 "configure only one of them")
        return data

    def aux_spec(self) -> AuxSpec | None:
        """The :class:`~axolotl_focus.loss_settings.AuxSpec` of the fused pass (None: no term there)."""
        spec = AuxSpec(
            unlikelihood=self.unlikelihood.alpha if self.unlikelihood else None,
            scalegrad=self.scalegrad.gamma if self.scalegrad else None,
            tailr=(self.tailr.gamma, self.tailr.min_weight) if self.tailr else None,
        )
        return spec if spec != AuxSpec() else None


class FocusArgs(BaseModel):
    """YAML keys of the plugin (``focus_*``). Defaults are the paper's (section 5, appendix G)."""

    focus_distill: DistillMode = Field(
        default="focus",
        description="Distillation term added to CE: 'focus' (paper), 'kd' (T^2 KL baseline) or 'none'.",
    )
    focus_teacher_model: str | None = Field(
        default=None,
        description="Hub id or local path of the unpruned teacher. Defaults to the source model "
        "recorded in a pruned checkpoint's config (focus_source_model).",
    )
    focus_teacher_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Teacher weights dtype; 'auto' = the training dtype."
    )
    focus_teacher_cache: str | None = Field(
        default=None,
        description="Folder of a precomputed teacher-logit cache (built by `axolotl-focus teacher-cache CONFIG "
        "--output DIR --k 512` from the same data and tokenizer): FOCUS / KD read the teacher's top-k "
        "distribution from it and no teacher model is loaded. Needs sample_packing: false and "
        "eval_sample_packing: false; not with rl or focus_distill: none.",
    )
    focus_alpha: FiniteFloat = Field(default=0.05, ge=0, description="alpha_1: weight of the distillation term.")
    focus_ce_alpha: FiniteFloat = Field(default=1.0, ge=0, description="Weight of the CE term.")
    focus_temperature: FiniteFloat = Field(default=2.0, gt=0, description="tau (FOCUS) / T (KD).")
    focus_beta: FiniteFloat = Field(default=15.0, ge=0, description="beta: exponent of q in w = q^beta + (1-q)^gamma.")
    focus_gamma: FiniteFloat = Field(
        default=1.0,
        ge=0,
        description="gamma: exponent of (1-q). Not stated in the paper; 1.0 keeps tail tokens at "
        "weight ~1 while damping the mid-probability head.",
    )
    focus_chunk_size: int = Field(default=1024, gt=0, description="Tokens per chunk of the fused loss.")
    focus_repair_alpha: FiniteFloat = Field(default=1.0, ge=0, description="alpha_2: weight of the RePAIR margin loss.")
    focus_repair_margin: FiniteFloat = Field(
        default=1.0,
        ge=0,
        description="m in max(0, m + l+ - l-), in nats per token. Not stated in the paper; 1.0 asks the "
        "student to find the looping continuation at least 1 nat/token less likely than the teacher's.",
    )
    focus_repair_skip_bad_rows: bool = Field(default=False, description="Skip (and count) bad pair rows "
                                             "instead of stopping with the file and line.")
    focus_repair_pairs: str | None = Field(
        default=None,
        description="A RePAIR pairs file (JSON lines from `axolotl-focus pairs`; or a hub dataset id / folder with "
        "a train split) drawn as its own stream, apart from `datasets:`: every optimizer step adds the margin loss "
        "over focus_repair_pairs_per_step pairs in a seeded order, and the SFT data are sampled exactly as "
        "without pairs. (The other way: list the file in `datasets:` with `type: axolotl_focus.repair`.)",
    )
    focus_repair_pairs_per_step: int = Field(
        default=4, gt=0,
        description="Pairs of focus_repair_pairs per optimizer step (all accumulation micro-batches and "
        "data-parallel ranks together): the RePAIR dose, whatever the size of the SFT data.",
    )
    focus_dpo_reference: Literal["teacher", "student"] = Field(
        default="teacher",
        description="rl: dpo on RePAIR pairs: reference model = the unpruned teacher (paper, section 6) "
        "or axolotl's default (the initial student).",
    )
    focus_aux_losses: FocusAuxLosses | None = Field(
        default=None,
        description="Baselines as extra loss terms: unlikelihood, scalegrad, tailr, ditto (see FocusAuxLosses).",
    )
    focus_prune: dict[str, Any] | None = Field(
        default=None, description="Prune base_model before training: the keys of "
        "axolotl_focus.prune.settings.PruneSettings, checked by the prune stage (axolotl_focus.prune.check) "
        "before axolotl validates the config.")
    focus_pruned_from: str | None = Field(default=None, description="Set by the plugin: the unpruned source.")

    @model_validator(mode="before")
    @classmethod
    def _check_focus(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        mode = data.get("focus_distill") or cls.model_fields["focus_distill"].default
        if data.get("rl") and data.get("focus_dpo_reference", "teacher") == "student":
            mode = "none"  # preference training with the student as reference needs no teacher
        if mode not in DISTILL_MODES:
            raise ValueError(f"focus_distill: must be one of {list(DISTILL_MODES)}, got {mode!r}")
        cached = bool(data.get("focus_teacher_cache"))
        if cached:
            _check_teacher_cache_use(data, mode)
        if mode != "none" and not cached and not data.get("focus_teacher_model"):
            inferred = source_model_of(data.get("base_model"))
            if inferred is None:
                base = data.get("base_model")
                raise ValueError(
                    f"focus_distill: {mode} needs a teacher, and none could be inferred ("
                    + (f"base_model {base} records no {SOURCE_MODEL_KEY}). " if base else "no base_model). ")
                    +
                    "Add `focus_teacher_model: <hub id or path of the unpruned model>` to the "
                    "config, or set `focus_distill: none` to train with CE only."
                )
            data["focus_teacher_model"] = inferred
        _check_repair_use(data)
        for key in _CONFLICTING_LOSS_KEYS:
            if data.get(key):
                raise ValueError(
                    f"{key}: true replaces the model's loss, but axolotl_focus.FocusPlugin computes "
                    "CE and distillation in its own fused chunked pass. Remove the key."
                )
        return data


def _check_repair_use(data: dict) -> None:
    """RePAIR pairs (a ``type: axolotl_focus.repair`` dataset or the ``focus_repair_pairs`` stream) need
    one pair per row, and the stream is read by FocusTrainer only."""
    stream = data.get("focus_repair_pairs")
    if "focus_repair_pairs_per_step" in data and not stream:
        raise ValueError("focus_repair_pairs_per_step: set, but focus_repair_pairs (the pairs file it draws from) "
                         "is not; add `focus_repair_pairs: <pairs.jsonl>` or remove the key")
    if stream and data.get("rl"):
        raise ValueError(f"focus_repair_pairs: rl: {data['rl']} trains with axolotl's preference trainer, which does "
                         "not read the pair stream; list the pairs file in `datasets:` for DPO instead")
    typed = any(isinstance(d, dict) and d.get("type") == REPAIR_TYPE for d in data.get("datasets") or [])
    if data.get("sample_packing") and (typed or stream):
        what = "focus_repair_pairs" if stream else "RePAIR pair datasets (type: axolotl_focus.repair)"
        raise ValueError(f"sample_packing: {what} need one pair per row; set `sample_packing: false`")


def _check_teacher_cache_use(data: dict, mode: str) -> None:
    """``focus_teacher_cache`` is read by FocusTrainer's FOCUS / KD term on unpacked rows only."""
    if data.get("rl"):
        raise ValueError(f"focus_teacher_cache: rl: {data['rl']} trains with axolotl's preference trainer, which "
                         "does not read the teacher cache (DPO's reference model is a loaded model); remove "
                         "focus_teacher_cache")
    if mode == "none":
        raise ValueError("focus_teacher_cache: set, but focus_distill: none uses no teacher; remove "
                         "focus_teacher_cache or set focus_distill: focus / kd")
    for key in ("sample_packing", "eval_sample_packing"):
        if data.get(key):
            raise ValueError(f"{key}: true packs several sequences into one row, which is not a sequence of the "
                             f"teacher cache (focus_teacher_cache); set {key}: false")
    for key in ("context_parallel_size", "sequence_parallel_degree"):
        value = data.get(key)
        if isinstance(value, int) and value > 1:
            raise ValueError(f"{key}: {data[key]} splits sequences across ranks, which the teacher cache "
                             "(focus_teacher_cache) does not support; remove it or focus_teacher_cache")


# the FocusArgs keys that reach the trainer through TrainingArguments, in this order
TRAINER_KEYS = ("focus_distill", "focus_teacher_model", "focus_teacher_dtype", "focus_teacher_cache", "focus_alpha",
                "focus_ce_alpha", "focus_temperature", "focus_beta", "focus_gamma", "focus_chunk_size",
                "focus_repair_alpha", "focus_repair_margin", "focus_repair_skip_bad_rows", "focus_repair_pairs",
                "focus_repair_pairs_per_step", "focus_aux_losses")


def focus_default(key: str) -> Any:
    """The default of a ``focus_*`` key of :class:`FocusArgs`."""
    return FocusArgs.model_fields[key].default


def _training_field(key: str) -> tuple[str, Any, dataclasses.Field]:
    """``(name, type, field)`` of a :class:`FocusArgs` key as a ``TrainingArguments`` field: a
    ``Literal`` becomes its value type, ``focus_aux_losses`` a plain JSON-able dict (the trainer
    validates it with :class:`FocusAuxLosses`)."""
    info = FocusArgs.model_fields[key]
    kind = info.annotation
    if get_origin(kind) is Literal:
        kind = type(get_args(kind)[0])
    elif key == "focus_aux_losses":
        kind = dict | None
    return key, kind, dataclasses.field(default=info.default, metadata={"help": info.description})


FocusTrainingArgsMixin = dataclasses.make_dataclass(
    "FocusTrainingArgsMixin",
    [*(_training_field(key) for key in TRAINER_KEYS),
     ("focus_sequence_len", int | None, dataclasses.field(default=None, metadata={
         "help": "axolotl's sequence_len, filled by the plugin: the length of DITTO's pseudo-repetition rows and "
                 "the row the pairs of focus_repair_pairs are fitted into."}))],
)
FocusTrainingArgsMixin.__module__ = __name__
FocusTrainingArgsMixin.__doc__ = """The ``focus_*`` values as they reach the trainer through ``TrainingArguments``
(generated from :class:`FocusArgs`, see the module docstring)."""

TRAINING_ARG_KEYS = tuple(FocusTrainingArgsMixin.__dataclass_fields__)


def training_args(cfg) -> dict:
    """The training-arguments kwargs of an axolotl config (the plugin's ``get_training_args``): its
    set :data:`TRAINING_ARG_KEYS`, ``focus_aux_losses`` as a plain dict (not axolotl's
    ``DictDefault``), and ``focus_sequence_len`` = ``sequence_len`` unless given."""
    args = {key: cfg[key] for key in TRAINING_ARG_KEYS if cfg.get(key) is not None}
    if args.get("focus_aux_losses") is not None:
        args["focus_aux_losses"] = json.loads(json.dumps(args["focus_aux_losses"]))
    if cfg.get("sequence_len") and "focus_sequence_len" not in args:
        args["focus_sequence_len"] = int(cfg.sequence_len)
    return args


# the keys besides FocusArgs' own that its validators read
_OTHER_KEYS = ("base_model", "rl", "datasets", "sample_packing", "eval_sample_packing", "context_parallel_size",
               "sequence_parallel_degree", *_CONFLICTING_LOSS_KEYS)


def check(cfg: Mapping, account: Account) -> None:
    """The config's own checks: the plugin listed (``validate`` only), every ``focus_*`` key known
    (else the nearest one), every number finite, and :class:`FocusArgs` (``account.focus`` once
    valid). ``focus_prune`` is the prune stage's (:func:`axolotl_focus.prune.check`)."""
    if PLUGIN not in (cfg.get("plugins") or []) and not account.train:
        account.error("plugins", f"does not list {PLUGIN}; the focus_* keys would be ignored")
    known = FocusArgs.model_fields
    for key in cfg:
        if isinstance(key, str) and key.startswith("focus_") and key not in known:
            account.error(key, f"unknown axolotl_focus key; {nearest(key, known)}")
    for key, value in cfg.items():
        if not str(key).startswith("focus_"):  # the focus_* keys are checked by their schema
            _finite(value, str(key), account)
    data = {k: v for k, v in cfg.items() if k in known and k != "focus_prune" or k in _OTHER_KEYS}
    if cfg.get("focus_prune") and not data.get("focus_teacher_model"):  # as prune.apply_to_config sets it
        data["focus_teacher_model"] = data.get("base_model")
    try:
        account.focus = FocusArgs.model_validate(data)
    except ValidationError as exc:
        for key, msg in validation_messages(exc, schema=FocusArgs):
            if key == "config":  # a model-level check: its message starts with the key
                key, _, msg = msg.partition(": ")
            account.error(key, msg)


def _finite(value, key: str, account: Account) -> None:
    """``.inf`` / ``.nan`` anywhere in ``value`` (a mapping or list walked) is an error."""
    if isinstance(value, float) and not math.isfinite(value):
        account.error(key, f"must be a finite number (got {value})")
    elif isinstance(value, Mapping):
        for sub, item in value.items():
            _finite(item, f"{key}.{sub}", account)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _finite(item, f"{key}[{i}]", account)
