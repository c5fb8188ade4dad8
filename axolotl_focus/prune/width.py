"""Width pruning (LLM-Pruner block-wise): slice whole attention heads, KV groups and MLP channels.

In the layers of a range, remove whole attention heads (MHA), whole KV groups (GQA: k head, v
head, their n_rep q heads and o_proj columns; or, with `gqa_mode="q_within_group"`, the same
number of q heads inside every group) and MLP channels (gate/up rows, down_proj columns), ranked
by the importance of `importance.compute_importance` and sized by `shapes.plan_width`. The
couplings of LLaMA are fixed, so the weights are sliced by hand (no graph tracing). The result is
a `PrunedLlamaForCausalLM` (per-layer widths) or, with `uniform`, a vanilla `LlamaForCausalLM`,
sharing the sliced tensors.

Typical use::

    settings = PruneSettings(ratio=0.25).validate(model.config)
    report = prune_width(model, tokenizer, texts, settings)   # report.model is the pruned model
    save_pruned(report.model, tokenizer, "out/llama-pruned")  # prune.checkpoint
    model = load_pruned("out/llama-pruned")
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from .common import model_dims
from .importance import Importance, compute_importance
from .modeling_pruned_llama import PrunedLlamaForCausalLM
from .report import PruneReport, source_of
from .shapes import layer_shapes_for_ratio, plan_width

if TYPE_CHECKING:
    from .settings import PruneSettings

log = logging.getLogger(__name__)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, ascending (stable on ties: lower index wins)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def _sliced(lin: nn.Linear, rows: list[int] | None = None, cols: list[int] | None = None) -> nn.Linear:
    weight, bias = lin.weight.data, None if lin.bias is None else lin.bias.data
    if rows is not None:
        idx = torch.tensor(rows, device=weight.device)
        weight = weight.index_select(0, idx)
        bias = None if bias is None else bias.index_select(0, idx)
    if cols is not None:
        weight = weight.index_select(1, torch.tensor(cols, device=weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.contiguous(), requires_grad=lin.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=lin.bias.requires_grad)
    return new


def _head_channels(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def _kept_units(imp: Importance, i: int, shape: dict, model_config, cfg: PruneSettings) -> dict:
    """Kept q heads, kv heads and MLP channels of layer i (all, where the layer is not pruned)."""
    _, _, heads, kv_heads, inter = model_dims(model_config)
    rep = heads // kv_heads
    q_keep, kv_keep = list(range(heads)), list(range(kv_heads))
    if i in imp.attn:
        if rep == 1:
            q_keep = kv_keep = _top(imp.attn[i], shape["num_attention_heads"])
        elif cfg.gqa_mode == "group":
            kv_keep = _top(imp.attn[i], shape["num_key_value_heads"])
            q_keep = [g * rep + j for g in kv_keep for j in range(rep)]
        else:
            per_group = shape["num_attention_heads"] // kv_heads
            groups = imp.attn[i].view(kv_heads, rep)
            q_keep = [g * rep + j for g in range(kv_heads) for j in _top(groups[g], per_group)]
    channels = _top(imp.mlp[i], shape["intermediate_size"]) if i in imp.mlp else list(range(inter))
    return {"heads": q_keep, "kv_heads": kv_keep, "channels": channels}


def _slice_layer(layer: nn.Module, kept: dict, head_dim: int) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    if len(kept["heads"]) != attn.q_proj.out_features // head_dim:
        q_rows, kv_rows = _head_channels(kept["heads"], head_dim), _head_channels(kept["kv_heads"], head_dim)
        attn.q_proj = _sliced(attn.q_proj, rows=q_rows)
        attn.k_proj = _sliced(attn.k_proj, rows=kv_rows)
        attn.v_proj = _sliced(attn.v_proj, rows=kv_rows)
        attn.o_proj = _sliced(attn.o_proj, cols=q_rows)
        attn.num_key_value_groups = len(kept["heads"]) // len(kept["kv_heads"])
    if len(kept["channels"]) != mlp.gate_proj.out_features:
        mlp.gate_proj = _sliced(mlp.gate_proj, rows=kept["channels"])
        mlp.up_proj = _sliced(mlp.up_proj, rows=kept["channels"])
        mlp.down_proj = _sliced(mlp.down_proj, cols=kept["channels"])
        mlp.intermediate_size = len(kept["channels"])


def _rebuild(model, model_cls, config):
    """A `model_cls(config)` instance that takes over `model`'s (already sliced) tensors, no copy."""
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        new = model_cls(config)
    new.load_state_dict(model.state_dict(), assign=True, strict=True)
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in the state dict
        module_name, _, buf_name = name.rpartition(".")
        new.get_submodule(module_name)._buffers[buf_name] = buf
    if getattr(config, "tie_word_embeddings", False):
        new.lm_head.weight = new.model.embed_tokens.weight
    new.generation_config = model.generation_config
    new.train(model.training)
    return new


def _config_dict(model_config) -> dict:
    d = model_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "layer_shapes", "pruning"):
        d.pop(key, None)
    return d


def prune_width(
    model, tokenizer, texts, cfg: PruneSettings, *, source_model: str | None = None, calibration_name: str | None = None
) -> PruneReport:
    """LLM-Pruner block-wise width pruning of a LlamaForCausalLM. The input model's layers are
    sliced in place (do not use it afterwards); `report.model` is a `PrunedLlamaForCausalLM`
    (or, with `cfg.uniform`, a vanilla `LlamaForCausalLM`) sharing its tensors."""
    cfg.validate(model.config)
    if cfg.method != "width":
        raise ValueError(f"method={cfg.method!r}: prune_width needs method='width'")
    if not isinstance(model, LlamaForCausalLM) or isinstance(model, PrunedLlamaForCausalLM):
        raise ValueError(f"unsupported architecture: {type(model).__name__}; width pruning needs a LlamaForCausalLM")
    plan = plan_width(model.config, cfg)
    if cfg.uniform:
        num_layers = model.config.num_hidden_layers
        free = cfg.model_copy(update={"uniform": False, "attn_layers": [0, num_layers], "mlp_layers": [0, num_layers]})
        nominal = layer_shapes_for_ratio(model.config, free, plan.ratio)[0]
        if cfg.attn_layers is not None or cfg.mlp_layers is not None:
            log.warning("uniform=True prunes every layer; attn_layers/mlp_layers are ignored")
        if nominal["num_attention_heads"] != plan.layer_shapes[0]["num_attention_heads"]:
            log.warning(
                "uniform=True: %d q heads per layer instead of the nominal %d (LlamaConfig needs hidden_size %% "
                "num_attention_heads == 0)",
                plan.layer_shapes[0]["num_attention_heads"],
                nominal["num_attention_heads"],
            )
    for part in plan.short:
        log.warning("width pruning removes less than asked: %s", plan.notes[part])
    imp = compute_importance(model, tokenizer, texts, cfg, calibration_name=calibration_name)
    head_dim = model_dims(model.config)[1]
    kept_all = {}
    with torch.no_grad():
        for i, layer in enumerate(tqdm(model.model.layers, desc="slicing layers", disable=None)):
            kept = _kept_units(imp, i, plan.layer_shapes[i], model.config, cfg)
            _slice_layer(layer, kept, head_dim)
            if i in imp.attn or i in imp.mlp:
                kept_all[i] = kept
    (a0, a1), (m0, m1) = cfg.layer_ranges(model.config.num_hidden_layers)
    source = source_of(model, source_model)
    metadata = {
        "method": "width",
        "source_model": source,
        "ratio": plan.ratio,
        "target_param_reduction": cfg.target_param_reduction,
        "importance": cfg.importance,
        "gqa_mode": cfg.gqa_mode if model_dims(model.config)[2] != model_dims(model.config)[3] else None,
        "gqa_aggregation": "contiguous",
        "attn_layers": [a0, a1],
        "mlp_layers": [m0, m1],
        "uniform": cfg.uniform,
        "seed": cfg.seed,
        "calibration": imp.calibration,
        "kept": {str(i): k for i, k in kept_all.items()},
        "params_before": plan.params_before,
        "params_after": plan.params_after,
        "achieved_param_reduction": plan.reduction,
    }
    extra = {"pruning": metadata, "focus_source_model": source}
    if cfg.uniform:
        shape = plan.layer_shapes[0]
        config = LlamaConfig.from_dict({**_config_dict(model.config), **shape, "head_dim": head_dim, **extra})
        new = _rebuild(model, LlamaForCausalLM, config)
    else:
        config = LlamaConfig.from_dict(  # model_type llama + layer_shapes (modeling_pruned_llama's format)
            {**_config_dict(model.config), "head_dim": head_dim, "layer_shapes": plan.layer_shapes, **extra}
        )
        new = _rebuild(model, PrunedLlamaForCausalLM, config)
    actual = sum(p.numel() for p in new.parameters())
    if actual != plan.params_after:
        raise RuntimeError(f"internal error: pruned model has {actual} parameters, closed form {plan.params_after}")
    report = PruneReport(
        new, "width", plan.ratio, plan.layer_shapes, plan.params_before, actual, metadata, kept_all, notes=plan.notes
    )
    log.info("%s", report.summary())
    return report


