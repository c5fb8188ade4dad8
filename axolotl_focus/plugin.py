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

    def get_trainer_cls(self, cfg):
        if cfg.rl:  # preference training (DPO etc.) keeps axolotl's own trainers
            return None
        from .trainer import FocusTrainer

        return FocusTrainer
