"""The Axolotl plugin: wires axolotl's hooks to this package and does nothing else."""

from __future__ import annotations

import json

from axolotl.integrations.base import BasePlugin

from .config import TRAINING_ARG_KEYS
from .logs import show_package_logs

show_package_logs()  # axolotl configures only its own loggers: show ours


class FocusPlugin(BasePlugin):
    """Enable with ``plugins: [axolotl_focus.FocusPlugin]`` in an axolotl config."""

    def register(self, cfg: dict) -> None:
        # every check that needs no weights first (keys, models, vocabulary, pair rows), then
        # `focus_prune:` prunes base_model (or reuses the cache) before axolotl loads anything
        from .preflight import check_before_training
        from .prune.cache import apply_to_config, disable_attention_lora_kernels

        check_before_training(cfg)
        apply_to_config(cfg)
        disable_attention_lora_kernels(cfg)

    def get_input_args(self) -> str:
        return "axolotl_focus.config.FocusArgs"

    def get_training_args_mixin(self) -> str:
        return "axolotl_focus.config.FocusTrainingArgsMixin"

    def get_training_args(self, cfg) -> dict:
        args = {key: cfg[key] for key in TRAINING_ARG_KEYS if cfg.get(key) is not None}
        if args.get("focus_aux_losses") is not None:  # plain dict (not axolotl's DictDefault)
            args["focus_aux_losses"] = json.loads(json.dumps(args["focus_aux_losses"]))
        if cfg.get("sequence_len") and "focus_ditto_max_length" not in args:
            args["focus_ditto_max_length"] = int(cfg.sequence_len)
        return args

    def pre_model_load(self, cfg) -> None:
        # fail on a teacher/student vocabulary mismatch before any weights are loaded; with
        # focus_teacher_cache no teacher is loaded (the trainer checks the cache's vocabulary)
        if cfg.focus_distill != "none" and cfg.focus_teacher_model and not cfg.rl and not cfg.focus_teacher_cache:
            from .teacher import check_teacher_before_loading

            check_teacher_before_loading(cfg.base_model, cfg.tokenizer_config, cfg.focus_teacher_model)

    def get_collator_cls_and_kwargs(self, cfg, is_eval=False):
        from .repair import RepairCollator, uses_repair

        return (RepairCollator, {}) if uses_repair(cfg) and not cfg.rl else None

    def post_trainer_create(self, cfg, trainer) -> None:
        # DPO on the RePAIR pairs: the paper's reference model is the unpruned teacher
        if cfg.rl == "dpo" and cfg.focus_dpo_reference == "teacher":
            from .teacher import use_teacher_as_reference

            use_teacher_as_reference(trainer, cfg)

    def get_trainer_cls(self, cfg):
        if cfg.rl:  # preference training (DPO etc.) keeps axolotl's own trainers
            return None
        from .trainer import FocusTrainer

        return FocusTrainer
