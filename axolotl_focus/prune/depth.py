"""Depth pruning (Shortened LLaMA): remove whole decoder blocks ranked by Taylor+ or by the
perplexity of the calibration windows without the block.

Taylor+ of a block: sum over its seven weight matrices of |sum over the calibration tokens of
w * dL/dw| (per-sample backward passes of the mean loss, `importance.gradient_pass`). The first
`protected_first` and the last `protected_last` blocks are never removed. The result is a vanilla
LlamaForCausalLM with renumbered `layer_idx`, so the KV cache stays consistent.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from .calibration import calibration_ids
from .common import SHAPE_KEYS, check_architecture, model_dims
from .importance import ATTN_PROJ, MLP_PROJ, gradient_pass, lm_loss, projection
from .modeling_pruned_llama import PrunedLlamaForCausalLM
from .report import PruneReport, source_of
from .shapes import count_params

if TYPE_CHECKING:
    from .settings import PruneSettings

log = logging.getLogger(__name__)


def block_scores(
    model, tokenizer, texts, cfg: PruneSettings, *, calibration_name: str | None = None
) -> tuple[dict[int, float], dict]:
    """Importance of each removable block (higher = keep). Taylor+: sum over the block's seven
    weight matrices of |sum over the calibration tokens of w * dL/dw|. ppl: perplexity of the
    calibration windows with the block removed. Returns (scores, calibration description)."""
    check_architecture(model.config)
    num_layers = model.config.num_hidden_layers
    candidates = list(range(cfg.protected_first, num_layers - cfg.protected_last))
    ids, calibration = calibration_ids(tokenizer, texts, cfg, calibration_name)
    if cfg.depth_score == "taylor":
        targets = {
            (i, proj): (projection(model.model.layers[i], proj).weight, 1)
            for i in candidates
            for proj in ATTN_PROJ + MLP_PROJ
        }
        # sum w * g is linear in g: per-sample backward passes of the mean loss add up to the batch's
        sums = gradient_pass(
            model, list(ids.split(1)), targets, lambda key, w, g: (w.double() * g.double()).sum(), False,
            "block scores (Taylor+, per-sample backward)", mean_loss=True,
        )
        return {i: float(sum(sums[(i, p)].abs() for p in ATTN_PROJ + MLP_PROJ)) for i in candidates}, calibration
    scores, layers = {}, model.model.layers
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in tqdm(candidates, desc="block scores (PPL without block)", disable=None):
                model.model.layers = nn.ModuleList([blk for j, blk in enumerate(layers) if j != i])
                scores[i] = math.exp(float(lm_loss(model, ids.to(device))))
    finally:
        model.model.layers = layers
        model.train(was_training)
    return scores, calibration


def prune_depth(
    model, tokenizer, texts, cfg: PruneSettings, *, source_model: str | None = None, calibration_name: str | None = None
) -> PruneReport:
    """Shortened-LLaMA depth pruning: remove the lowest-scoring blocks (never the first
    `protected_first` nor the last `protected_last`), in place. The result is a vanilla
    LlamaForCausalLM with renumbered `layer_idx` (the KV cache stays consistent)."""
    cfg.validate(model.config)
    if cfg.method != "depth":
        raise ValueError(f"method={cfg.method!r}: prune_depth needs method='depth'")
    if not isinstance(model, LlamaForCausalLM) or isinstance(model, PrunedLlamaForCausalLM):
        raise ValueError(f"unsupported architecture: {type(model).__name__}; depth pruning needs a LlamaForCausalLM")
    num_layers = model.config.num_hidden_layers
    before = count_params(model.config)
    scores, calibration = block_scores(model, tokenizer, texts, cfg, calibration_name=calibration_name)
    n = cfg.blocks_to_remove(num_layers)
    removed = sorted(sorted(scores, key=lambda i: (scores[i], i))[:n])
    kept = [i for i in range(num_layers) if i not in removed]
    model.model.layers = nn.ModuleList([model.model.layers[i] for i in kept])
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    config = model.config
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    source = source_of(model, source_model)
    metadata = {
        "method": "depth",
        "source_model": source,
        "depth_score": cfg.depth_score,
        "num_blocks": n,
        "block_fraction": cfg.block_fraction,
        "protected_first": cfg.protected_first,
        "protected_last": cfg.protected_last,
        "removed_blocks": removed,
        "kept_blocks": kept,
        "block_scores": {str(i): s for i, s in scores.items()},
        "seed": cfg.seed,
        "calibration": calibration,
        "params_before": before,
        "params_after": count_params(config),
        "achieved_param_reduction": 1 - count_params(config) / before,
    }
    config.pruning, config.focus_source_model = metadata, source
    shapes = [dict(zip(SHAPE_KEYS, model_dims(config)[2:])) for _ in kept]
    report = PruneReport(
        model, "depth", None, shapes, before, sum(p.numel() for p in model.parameters()), metadata,
        removed_blocks=removed, block_scores=scores,
    )
    log.info("%s", report.summary())
    return report


