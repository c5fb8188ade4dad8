"""Loading the evaluated models: on the evaluation device, and only when first needed."""

from __future__ import annotations

import gc

import torch

from ..options import resolve_device
from .config import EvalConfig, MetricUnavailable
from .runner import get_ranks


def load_model(path: str, cfg: EvalConfig):
    """``AutoModelForCausalLM.from_pretrained`` (pruned checkpoints included) on the eval device."""
    from transformers import AutoModelForCausalLM  # heavy: a model is loaded on first use

    dtype = cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    return model.to(eval_device(cfg)).eval()


def eval_device(cfg: EvalConfig) -> torch.device:
    """``--device``, else cuda when available, else cpu; under several processes each rank's own
    ``PartialState().device`` (``--device`` ignored)."""
    ranks = get_ranks()
    if ranks.size > 1:
        return ranks.state.device
    return resolve_device(cfg.device, "--device")


class LazyModel:
    """A model loaded on first use (so reruns on saved generations never load it)."""

    def __init__(self, path: str, cfg: EvalConfig):
        self.path, self.cfg, self._model = path, cfg, None

    @property
    def model(self):
        if self._model is None:
            if self.cfg.metrics_only:
                raise MetricUnavailable(f"{self.path}: --metrics-only never loads a model")
            self._model = load_model(self.path, self.cfg)
        return self._model

    def release(self):
        self._model = None
        get_ranks().release()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
