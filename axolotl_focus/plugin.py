"""The Axolotl plugin: wires axolotl's hooks to this package and does nothing else."""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin

from .config import TRAINING_ARG_KEYS


class FocusPlugin(BasePlugin):
    """Enable with ``plugins: [axolotl_focus.FocusPlugin]`` in an axolotl config."""

    def get_input_args(self) -> str:
        return "axolotl_focus.config.FocusArgs"

    def get_training_args_mixin(self) -> str:
        return "axolotl_focus.config.FocusTrainingArgsMixin"

    def get_training_args(self, cfg) -> dict:
        return {key: cfg[key] for key in TRAINING_ARG_KEYS if cfg.get(key) is not None}

    def pre_model_load(self, cfg) -> None:
        # fail on a teacher/student vocabulary mismatch before any weights are loaded
        if cfg.focus_distill != "none" and cfg.focus_teacher_model and not cfg.rl:
            from .teacher import check_teacher_before_loading

            check_teacher_before_loading(cfg.base_model, cfg.tokenizer_config, cfg.focus_teacher_model)

    def get_trainer_cls(self, cfg):
        if cfg.rl:  # preference training (DPO etc.) keeps axolotl's own trainers
            return None
        from .trainer import FocusTrainer

        return FocusTrainer
