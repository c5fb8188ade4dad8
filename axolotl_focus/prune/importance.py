"""LLM-Pruner block-wise importance of the prunable units (heads, KV groups, MLP channels).

First-order Taylor importance (`param_first`: sum over a unit's weights of |w * dL/dw|; also
`vectorize`, `param_second`, `param_mix`) on the calibration windows, or weight magnitudes
(`l1`, `l2`) or `random`. Importance is accumulated in `register_post_accumulate_grad_hook` hooks
that reduce each weight's gradient to per-unit scores and free `.grad` at once, so full gradients
are never held; decoder activations are checkpointed and the LM loss is chunked over tokens, so the
peak stays near the weights (benchmarks/prune_memory.py). GQA group scores aggregate q heads
CONTIGUOUSLY (group g = q heads n_rep*g .. n_rep*g + n_rep - 1, the heads actually removed).
`param_mix` combines per unit (first - 0.5 * second) rather than per element as LLM-Pruner does:
per element would need two full-size buffers. `gradient_pass` and `lm_loss` are shared with the
Taylor+ block scores of depth pruning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm

from .calibration import calibration_ids
from .common import GRADIENT_IMPORTANCES, check_architecture, model_dims

if TYPE_CHECKING:
    from .settings import PruneSettings

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
_INPUT_SIDE = ("o_proj", "down_proj")  # units are input columns of these; output rows of the others


@dataclass
class Importance:
    """Per-unit scores. `raw[(layer, proj)]`: per q head (q/o_proj), per kv head (k/v_proj) or per
    channel (MLP). `attn[layer]` / `mlp[layer]`: scores of the prunable units (MHA heads, KV groups
    or q heads, per `gqa_mode`; MLP channels). Higher = more important."""

    attn: dict[int, torch.Tensor]
    mlp: dict[int, torch.Tensor]
    raw: dict[tuple[int, str], torch.Tensor]
    calibration: dict | None


def salience(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Element-wise first-order Taylor salience w * dL/dw of one weight (fp32)."""
    return w.float() * g.float()


def _channel_sums(salience: torch.Tensor, proj: str) -> torch.Tensor:
    """Signed sum of the salience over each channel's row (column for o/down_proj), in fp64."""
    return salience.sum(0 if proj in _INPUT_SIDE else 1, dtype=torch.float64)


def _unit_scores(salience: torch.Tensor, proj: str, n_units: int, vectorize: bool = False) -> torch.Tensor:
    """Reduce element-wise salience of one weight to per-unit scores: sum of |s| over each unit's
    rows (or columns for o/down_proj) and, for heads, over head_dim. `vectorize`: |row sum| instead."""
    dim = 0 if proj in _INPUT_SIDE else 1
    per_channel = salience.sum(dim).abs() if vectorize else salience.abs().sum(dim)
    return per_channel.view(n_units, -1).sum(1)


def projection(layer: nn.Module, name: str) -> nn.Linear:
    return getattr(layer.self_attn if name in ATTN_PROJ else layer.mlp, name)


def _targets(model, layers_attn, layers_mlp) -> dict[tuple[int, str], tuple[nn.Parameter, int]]:
    """(layer, proj) -> (weight, number of units) for the weights that are scored."""
    cfg = model.config
    _, _, heads, kv_heads, inter = model_dims(cfg)
    out = {}
    for i, layer in enumerate(model.model.layers):
        if i in layers_attn:
            for proj in ATTN_PROJ:
                out[(i, proj)] = (projection(layer, proj).weight, kv_heads if proj in ("k_proj", "v_proj") else heads)
        if i in layers_mlp:
            for proj in MLP_PROJ:
                out[(i, proj)] = (projection(layer, proj).weight, inter)
    return out


def lm_loss(model, ids: torch.Tensor, chunked: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over all windows, `model(ids, labels=ids).loss`. `chunked`:
    the logits are built (and, in backward, rebuilt) a chunk of tokens at a time, so the
    [tokens, vocab] logits and their gradient never exist in full (328 MB fp32 for 10 x 64 tokens
    of LLaMA-3)."""
    if not chunked:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = ids[:, 1:].reshape(-1).to(hidden.device)
    chunk = max(1, (1 << 22) // model.config.vocab_size)

    def chunk_loss(h, y):
        return nn.functional.cross_entropy(model.lm_head(h).float(), y, reduction="sum")

    grad = torch.is_grad_enabled()
    total = sum(
        torch.utils.checkpoint.checkpoint(chunk_loss, h, y, use_reentrant=False) if grad else chunk_loss(h, y)
        for h, y in zip(hidden.split(chunk), labels.split(chunk))
    )
    return total / labels.numel()


class _Checkpointed(nn.Module):
    """A decoder layer whose activations are recomputed in backward instead of kept."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


def gradient_pass(model, batches, targets, reduce, hold_grads: bool, desc: str, *, mean_loss: bool = False) -> dict:
    """Backward the LM loss of each batch; `reduce(key, weight, grad)` turns one weight's gradient
    into a score that is summed over batches. Default: hooks fire as soon as a weight's gradient is
    accumulated, reduce it, and free it (no full gradient is ever held); decoder layers are
    activation-checkpointed and the LM loss is chunked, so the peak stays near the weights.
    `hold_grads=True` is LLM-Pruner's way (every parameter requires grad and keeps its .grad until
    the pass ends; plain HF loss): for the memory benchmark and tests.
    `mean_loss`: the batches are micro-batches of one calibration set; each loss is weighted by its
    share of the predicted tokens, so the gradients summed over them are those of the mean loss
    over all of them (for scores linear in the gradient). Progress: one tick per batch, or, for a
    single batch, one tick per weight scored."""
    acc: dict = {}
    per_weight = len(batches) == 1
    total_tokens = sum(ids.shape[0] * (ids.shape[1] - 1) for ids in batches)
    bar = tqdm(total=len(targets) if per_weight else len(batches), desc=desc,
               unit="weight" if per_weight else "batch", disable=None)
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    by_param = {id(w): key for key, (w, _) in targets.items()}
    was_training, layers = model.training, model.model.layers
    handles = []

    def add(key, w, g):
        with torch.no_grad():
            value = reduce(key, w.detach(), g)
        acc[key] = acc[key] + value if key in acc else value
        if per_weight:
            bar.update()

    def hook(p):
        add(by_param[id(p)], p, p.grad)
        p.grad = None

    try:
        model.eval()
        for p in params:
            p.requires_grad_(hold_grads)
        for w, _ in targets.values():
            w.requires_grad_(True)
            if not hold_grads:
                handles.append(w.register_post_accumulate_grad_hook(hook))
        if not hold_grads:
            model.model.layers = nn.ModuleList([_Checkpointed(layer) for layer in layers])
        device = next(model.parameters()).device
        for ids in batches:
            with torch.enable_grad():
                loss = lm_loss(model, ids.to(device), chunked=not hold_grads)
                if mean_loss:
                    loss = loss * (ids.shape[0] * (ids.shape[1] - 1) / total_tokens)
                loss.backward()
            if hold_grads:
                for key, (w, _) in targets.items():
                    add(key, w, w.grad)
                model.zero_grad(set_to_none=True)
            if not per_weight:
                bar.update()
    finally:
        bar.close()
        model.model.layers = layers
        for h in handles:
            h.remove()
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return acc


def compute_importance(
    model, tokenizer, texts, cfg: PruneSettings, *, calibration_name: str | None = None, hold_grads: bool = False
) -> Importance:
    """Score the prunable units of the layers in cfg's ranges. `texts`: list of calibration texts
    (windows are drawn per cfg.calib_*), or a LongTensor [samples, seq_len] of token ids."""
    check_architecture(model.config)
    (a0, a1), (m0, m1) = cfg.layer_ranges(model.config.num_hidden_layers)
    targets = _targets(model, range(a0, a1), range(m0, m1))
    calibration = None
    if cfg.importance in GRADIENT_IMPORTANCES:
        ids, calibration = calibration_ids(tokenizer, texts, cfg, calibration_name)
        raw: dict = {}
        if cfg.importance in ("param_first", "param_mix"):
            # sum |w * g| per unit is not linear in g: one backward over the whole batch
            raw = gradient_pass(
                model, [ids], targets,
                lambda key, w, g: _unit_scores(salience(w, g), key[1], targets[key][1]),
                hold_grads, "importance (batch backward)",
            )
        if cfg.importance == "vectorize":
            # |sum w * g| per channel: the signed channel sums add up over samples, |.| at the end
            sums = gradient_pass(
                model, list(ids.split(1)), targets,
                lambda key, w, g: _channel_sums(salience(w, g), key[1]),
                hold_grads, "importance (per-sample backward)", mean_loss=True,
            )
            raw = {key: v.abs().view(targets[key][1], -1).sum(1) for key, v in sums.items()}
        if cfg.importance in ("param_second", "param_mix"):  # w * acc_grad * w, acc_grad = mean_i g_i^2
            n = ids.shape[0]
            second = gradient_pass(
                model, list(ids.split(1)), targets,
                lambda key, w, g: _unit_scores(salience(w, g) ** 2 / n, key[1], targets[key][1]),
                hold_grads, "importance (per-sample backward)",
            )
            # param_mix combines per unit (first - 0.5 * second): element-wise would need full buffers
            raw = {k: raw[k] - 0.5 * v for k, v in second.items()} if raw else second
    elif cfg.importance == "random":
        gen = torch.Generator().manual_seed(cfg.seed)
        raw = {key: torch.rand(n, generator=gen) for key, (_, n) in sorted(targets.items())}
    else:
        power = 1 if cfg.importance == "l1" else 2
        with torch.no_grad():
            raw = {key: _unit_scores(w.detach().float().abs() ** power, key[1], n) for key, (w, n) in targets.items()}
    raw = {k: v.float().cpu() for k, v in raw.items()}

    _, _, heads, kv_heads, _ = model_dims(model.config)
    rep = heads // kv_heads
    attn, mlp = {}, {}
    for i in range(a0, a1):
        per_q = raw[(i, "q_proj")] + raw[(i, "o_proj")]
        per_kv = raw[(i, "k_proj")] + raw[(i, "v_proj")]
        if rep == 1:
            attn[i] = per_q + per_kv
        elif cfg.gqa_mode == "group":  # CONTIGUOUS: q heads rep*g .. rep*g + rep - 1 share kv head g
            attn[i] = per_q.view(kv_heads, rep).sum(1) + per_kv
        else:
            attn[i] = per_q
    for i in range(m0, m1):
        mlp[i] = raw[(i, "gate_proj")] + raw[(i, "up_proj")] + raw[(i, "down_proj")]
    return Importance(attn, mlp, raw, calibration)


