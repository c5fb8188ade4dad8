"""The Axolotl plugin: wires axolotl's hooks to this package and does nothing else."""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin

from . import preflight, prune, train
from .config import training_args
from .logs import show_package_logs

show_package_logs()  # axolotl configures only its own loggers: show ours


class FocusPlugin(BasePlugin):
    """Enable with ``plugins: [axolotl_focus.FocusPlugin]`` in an axolotl config."""

    def register(self, cfg: dict) -> None:
        # every check that needs no weights first (keys, models, vocabulary, pair rows), then
        # `focus_prune:` prunes base_model (or reuses the cache) before axolotl loads anything
        account = preflight.check_before_training(cfg)
        prune.apply_to_config(cfg, account.prune)  # the settings the check validated, not validated again
        prune.disable_attention_lora_kernels(cfg)

    def get_input_args(self) -> str:
        return "axolotl_focus.config.FocusArgs"

    def get_training_args_mixin(self) -> str:
        return "axolotl_focus.config.FocusTrainingArgsMixin"

    def get_training_args(self, cfg) -> dict:
        return training_args(cfg)

    def pre_model_load(self, cfg) -> None:
        # a teacher/student vocabulary mismatch fails here, before any weights are loaded
        train.check_config_teacher(cfg)

    def get_collator_cls_and_kwargs(self, cfg, is_eval=False):
        return (train.RepairCollator, {}) if train.uses_repair(cfg) and not cfg.rl else None

    def post_trainer_create(self, cfg, trainer) -> None:
        # DPO on the RePAIR pairs: the paper's reference model is the unpruned teacher
        if cfg.rl == "dpo" and cfg.focus_dpo_reference == "teacher":
            train.use_teacher_as_reference(trainer, cfg)

    def get_trainer_cls(self, cfg):
        if cfg.rl:  # preference training (DPO etc.) keeps axolotl's own trainers
            return None
        return train.FocusTrainer
