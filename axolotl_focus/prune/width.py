"""Structured pruning of LLaMA models (the paper's "prune 25% with LLM-Pruner" and "depth pruned").

Width pruning follows LLM-Pruner's block-wise method: in the layers of a range, remove whole
attention heads (MHA), whole KV groups (GQA: k head, v head, their n_rep q heads and o_proj
columns; or, with `gqa_mode="q_within_group"`, the same number of q heads inside every group) and
MLP channels (gate/up rows, down_proj columns), ranked by first-order Taylor importance on a few
calibration windows. Depth pruning follows Shortened LLaMA: remove whole decoder blocks ranked by
Taylor+ or by the perplexity without the block. The couplings of LLaMA are fixed, so the weights
are sliced by hand (no graph tracing).

Importance is accumulated in `register_post_accumulate_grad_hook` hooks that reduce each weight's
gradient to per-unit scores and free `.grad` at once, so full gradients are never held; decoder
activations are checkpointed and the LM loss is chunked over tokens, so the peak stays near the
weights (benchmarks/prune_memory.py). GQA group scores aggregate q heads CONTIGUOUSLY (group g =
q heads n_rep*g .. n_rep*g + n_rep - 1, the heads actually removed). `param_mix` combines per unit
(first - 0.5 * second) rather than per element as LLM-Pruner does: per element would need two
full-size buffers.

Typical use::

    cfg = PruneConfig(ratio=0.25).validate(model.config)
    report = prune_width(model, tokenizer, texts, cfg)   # report.model is the pruned model
    save_pruned(report.model, tokenizer, "out/llama-pruned")
    model = load_pruned("out/llama-pruned")
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from . import modeling_pruned_llama
from .embedded_model import fix_tokenizer_config
from .modeling_pruned_llama import SHAPE_KEYS, PrunedLlamaConfig, PrunedLlamaForCausalLM

log = logging.getLogger(__name__)

IMPORTANCES = ("param_first", "vectorize", "param_second", "param_mix", "l1", "l2", "random")
GRADIENT_IMPORTANCES = ("param_first", "vectorize", "param_second", "param_mix")
GQA_MODES = ("group", "q_within_group")
DEPTH_SCORES = ("taylor", "ppl")
SUPPORTED_MODEL_TYPES = ("llama",)
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
_INPUT_SIDE = ("o_proj", "down_proj")  # units are input columns of these; output rows of the others


# ----------------------------------------------------------------------------------------------
# Options and validation
# ----------------------------------------------------------------------------------------------
@dataclass
class PruneConfig:
    """All options of the pruning preprocessor. Call `validate(model_config)` before any heavy work."""

    method: str = "width"  # "width" (LLM-Pruner block-wise) | "depth" (Shortened LLaMA)
    # width
    ratio: float = 0.25  # LLM-Pruner's per-layer width ratio inside the layer ranges
    target_param_reduction: float | None = None  # if set: solve for the ratio giving this reduction
    importance: str = "param_first"
    attn_layers: tuple[int, int] | None = None  # [start, end); default (4, num_layers - 2)
    mlp_layers: tuple[int, int] | None = None
    gqa_mode: str = "group"  # "group" (whole KV groups) | "q_within_group" (keep all KV heads)
    uniform: bool = False  # same vanilla-expressible shape in EVERY layer (departure from the paper)
    # depth
    num_blocks: int | None = None
    block_fraction: float | None = None
    depth_score: str = "taylor"  # "taylor" (Taylor+) | "ppl"
    protected_first: int = 4
    protected_last: int = 2
    # calibration
    calib_samples: int = 10
    calib_seq_len: int = 64
    seed: int = 0

    def layer_ranges(self, num_layers: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The (attention, MLP) layer ranges [start, end) that width pruning touches."""
        if self.uniform:
            return (0, num_layers), (0, num_layers)
        return tuple(self._range(name, num_layers) for name in ("attn_layers", "mlp_layers"))

    def _range(self, name: str, num_layers: int) -> tuple[int, int]:
        value = getattr(self, name)
        if value is None:
            if num_layers - 2 <= 4:
                raise ValueError(
                    f"{name}: the default range [4, num_layers - 2) is empty for a {num_layers}-layer model; "
                    f"set {name} explicitly"
                )
            return (4, num_layers - 2)
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise ValueError(f"{name}={value!r}: expected [start, end) as two integers")
        start, end = value
        if not 0 <= start < end <= num_layers:
            raise ValueError(
                f"{name}={list(value)}: needs 0 <= start < end <= {num_layers} (the model has {num_layers} layers)"
            )
        return (start, end)

    def validate(self, model_config: Any = None, num_layers: int | None = None) -> "PruneConfig":
        """Check every option; with the model's config also the architecture, the layer ranges and
        that no layer loses all its heads/channels. Raises ValueError naming the option and value.
        Returns self, so `cfg = PruneConfig(...).validate(config)` reads well."""

        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")

        def open_unit(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name}={value!r}: must be a number strictly between 0 and 1")

        choice("method", ("width", "depth"))
        for name in ("calib_samples", "calib_seq_len", "protected_first", "protected_last", "seed"):
            value = getattr(self, name)
            low = {"calib_samples": 1, "calib_seq_len": 2}.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
        if self.method == "width":
            choice("importance", IMPORTANCES)
            choice("gqa_mode", GQA_MODES)
            open_unit("ratio")
            if self.target_param_reduction is not None:
                open_unit("target_param_reduction")
        else:
            choice("depth_score", DEPTH_SCORES)
            if (self.num_blocks is None) == (self.block_fraction is None):
                raise ValueError(
                    f"num_blocks={self.num_blocks!r}, block_fraction={self.block_fraction!r}: set exactly one"
                )
            if self.block_fraction is not None:
                open_unit("block_fraction")
            elif isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1:
                raise ValueError(f"num_blocks={self.num_blocks!r}: must be an integer >= 1")

        if model_config is not None:
            check_architecture(model_config)
            num_layers = model_config.num_hidden_layers
        if num_layers is None:
            return self
        if self.method == "depth":
            n, candidates = self.blocks_to_remove(num_layers), num_layers - self.protected_first - self.protected_last
            what = (
                f"num_blocks={self.num_blocks}" if self.num_blocks is not None
                else f"block_fraction={self.block_fraction}"
            )
            if n < 1:
                raise ValueError(f"{what}: removes no block of the {num_layers}-layer model")
            if n > candidates:
                raise ValueError(
                    f"{what}: removes {n} blocks, but only {max(candidates, 0)} of {num_layers} are removable "
                    f"(protected_first={self.protected_first}, protected_last={self.protected_last})"
                )
            return self
        self.layer_ranges(num_layers)
        if model_config is not None:
            plan_width(model_config, self)  # raises if a layer would lose every unit
        return self

    def blocks_to_remove(self, num_layers: int) -> int:
        return self.num_blocks if self.num_blocks is not None else int(self.block_fraction * num_layers)


def check_architecture(model_config: Any) -> None:
    model_type = getattr(model_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(getattr(model_config, "architectures", None) or []) or type(model_config).__name__
        raise ValueError(
            f"unsupported architecture: model_type={model_type!r} ({arch}); pruning supports LlamaForCausalLM "
            f"(model_type 'llama', MHA and GQA layouts) only"
        )


def _dims(model_config) -> tuple[int, int, int, int, int]:
    """(hidden, head_dim, q heads, kv heads, intermediate) of an unpruned LLaMA config."""
    hidden, heads = model_config.hidden_size, model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    return hidden, head_dim, heads, kv_heads, model_config.intermediate_size


# ----------------------------------------------------------------------------------------------
# Closed-form shapes and parameter counts
# ----------------------------------------------------------------------------------------------
def _removed(channels: int, unit: int, ratio: float) -> int:
    """LLM-Pruner's rounding: units removed from `channels` channels of `unit` channels each."""
    return (channels - int(channels * (1 - ratio))) // unit


def _nearest_valid(want: int, candidates: list[int]) -> int:
    """The candidate closest to `want`; ties keep the larger (less pruning)."""
    return min(candidates, key=lambda c: (abs(c - want), -c)) if candidates else 0


def layer_shapes_for_ratio(model_config, cfg: PruneConfig, ratio: float) -> list[dict]:
    """Per-layer {num_attention_heads, num_key_value_heads, intermediate_size} after pruning every
    layer of the ranges at `ratio` (entries may be 0 when the ratio removes every unit)."""
    hidden, head_dim, heads, kv_heads, inter = _dims(model_config)
    rep = heads // kv_heads
    (a0, a1), (m0, m1) = cfg.layer_ranges(model_config.num_hidden_layers)
    if heads == kv_heads:  # MHA: the unit is one head (q, k, v rows and o columns)
        q = heads - _removed(heads * head_dim, head_dim, ratio)
        if cfg.uniform:
            q = _nearest_valid(q, [c for c in range(1, heads + 1) if hidden % c == 0])
        attn = (q, q)
    elif cfg.gqa_mode == "group":  # whole KV groups; granularity 1/kv_heads, floored
        kv = kv_heads - _removed(kv_heads * head_dim, head_dim, ratio)
        if cfg.uniform:
            kv = _nearest_valid(kv, [c for c in range(1, kv_heads + 1) if hidden % (c * rep) == 0])
        attn = (kv * rep, kv)
    else:  # q_within_group: every KV head stays, the same number of q heads leaves each group
        per_group = rep - _removed(rep * head_dim, head_dim, ratio)
        if cfg.uniform:
            per_group = _nearest_valid(per_group, [c for c in range(1, rep + 1) if hidden % (c * kv_heads) == 0])
        attn = (per_group * kv_heads, kv_heads)
    kept_inter = int(inter * (1 - ratio))
    return [
        {
            "num_attention_heads": attn[0] if a0 <= i < a1 else heads,
            "num_key_value_heads": attn[1] if a0 <= i < a1 else kv_heads,
            "intermediate_size": kept_inter if m0 <= i < m1 else inter,
        }
        for i in range(model_config.num_hidden_layers)
    ]


def count_params(model_config, layer_shapes: list[dict] | None = None) -> int:
    """Closed-form parameter count of a LLaMA model (with per-layer widths, if given)."""
    hidden, head_dim, heads, kv_heads, inter = _dims(model_config)
    vocab = model_config.vocab_size
    total = vocab * hidden * (1 if getattr(model_config, "tie_word_embeddings", False) else 2) + hidden
    attn_bias, mlp_bias = getattr(model_config, "attention_bias", False), getattr(model_config, "mlp_bias", False)
    for i in range(model_config.num_hidden_layers):
        s = layer_shapes[i] if layer_shapes is not None else dict(zip(SHAPE_KEYS, (heads, kv_heads, inter)))
        q, kv, ff = s["num_attention_heads"] * head_dim, s["num_key_value_heads"] * head_dim, s["intermediate_size"]
        total += 2 * hidden  # the two RMSNorms
        total += hidden * (2 * q + 2 * kv) + (q + 2 * kv + hidden if attn_bias else 0)
        total += 3 * hidden * ff + (2 * ff + hidden if mlp_bias else 0)
    return total


@dataclass
class WidthPlan:
    ratio: float  # the per-layer ratio used (nominal; solved when target_param_reduction is set)
    layer_shapes: list[dict]
    params_before: int
    params_after: int
    notes: dict = field(default_factory=dict)  # _width_notes: part -> what is pruned and why the cut is smaller
    short: list = field(default_factory=list)  # parts that remove clearly less than asked (whole units only)

    @property
    def reduction(self) -> float:
        return 1 - self.params_after / self.params_before


def plan_width(model_config, cfg: PruneConfig) -> WidthPlan:
    """Shapes and parameter counts of width pruning, without touching any weight. Solves for the
    ratio when `cfg.target_param_reduction` is set. Raises ValueError if a layer would lose all
    heads or channels."""
    check_architecture(model_config)
    before = count_params(model_config)

    def shapes(r):
        return layer_shapes_for_ratio(model_config, cfg, r)

    def empty(s):
        return any(min(x.values()) < 1 for x in s)

    def reduction(s):
        return 1 - count_params(model_config, s) / before

    if cfg.target_param_reduction is None:
        ratio = cfg.ratio
    else:  # reduction(ratio) is a non-decreasing step function: bisect for the first step >= target
        target, lo, hi = cfg.target_param_reduction, 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            s = shapes(mid)
            if empty(s) or reduction(s) >= target:
                hi = mid
            else:
                lo = mid
        if empty(shapes(hi)):
            raise ValueError(
                f"target_param_reduction={target}: not reachable within the pruned layer ranges "
                f"(at most {reduction(shapes(lo)):.1%} before a layer loses every unit)"
            )
        below = reduction(shapes(lo))
        ratio = lo if below > 0 and target - below < reduction(shapes(hi)) - target else hi
    result = shapes(ratio)
    for i, s in enumerate(result):
        if min(s.values()) < 1:
            what = "ratio" if cfg.target_param_reduction is None else "target_param_reduction"
            raise ValueError(
                f"{what}={getattr(cfg, what)}: removes every attention head or MLP channel of layer {i} "
                f"(shape {s}); use a smaller value"
            )
    notes, short = _width_notes(model_config, cfg, ratio, result)
    return WidthPlan(ratio, result, before, count_params(model_config, result), notes, short)


_SHORT = 0.9  # a part is "short" when it removes less than 90% of the ratio's share of its units


def _units(n: int, unit: str) -> str:
    """'1 group', '2 groups', '1 q head per group' ('s' on the unit's first word)."""
    first, _, rest = unit.partition(" per ")
    return f"{n} {first if n == 1 else first + 's'}" + (f" per {rest}" if rest else "")


def _width_notes(model_config, cfg: PruneConfig, ratio: float, layer_shapes: list[dict]) -> tuple[dict, list]:
    """Why width pruning at `ratio` cuts what it cuts: ({"attention", "mlp", "scope": text}, short).

    attention / mlp: the part's units (MHA heads; GQA: KV groups of n_rep q heads, or q heads
    inside every group with q_within_group; MLP channels), how many the ratio removes (heads and
    groups whole: floor(units * ratio); channels: ceil(channels * ratio), LLM-Pruner's rounding),
    and the share of the part's weights in the pruned layers that goes. A part removing fewer
    than 90% of ratio x units (e.g. none) is listed in `short` and its note says what would prune
    it; not with `target_param_reduction`, whose solved ratio is meant to be what it is.
    scope: the share of all parameters inside the layer ranges (embeddings, norms and the
    layers outside them are never pruned), hence the nominal parameter cut ratio x that share."""
    hidden, head_dim, heads, kv_heads, inter = _dims(model_config)
    rep = heads // kv_heads
    (a0, a1), (m0, m1) = cfg.layer_ranges(model_config.num_hidden_layers)
    q_kept, kv_kept = layer_shapes[a0]["num_attention_heads"], layer_shapes[a0]["num_key_value_heads"]
    if rep == 1:
        units, kept, unit, what = heads, q_kept, "head", f"{heads} heads"
    elif cfg.gqa_mode == "group":
        units, kept, unit, what = kv_heads, kv_kept, "group", f"{kv_heads} KV groups of {rep} q heads (whole groups)"
    else:
        units, kept, unit = rep, q_kept // kv_heads, "q head per group"
        what = f"{kv_heads} KV groups of {rep} q heads (q_within_group: q heads inside every group)"
    inter_kept = layer_shapes[m0]["intermediate_size"]
    parts = {  # part: (name, range, description, units, kept, unit, rounding, units the ratio removes, weight share)
        "attention": ("attention", (a0, a1), what, units, kept, unit, "floor",
                      _removed(units * head_dim, head_dim, ratio), 1 - (q_kept + kv_kept) / (heads + kv_heads)),
        "mlp": ("MLP", (m0, m1), f"{inter} channels", inter, inter_kept, "channel", "ceil",
                _removed(inter, 1, ratio), 1 - inter_kept / inter),
    }
    notes, short = {}, []
    for part, (name, (start, end), what, units, kept, unit, rounding, nominal, share) in parts.items():
        removed = units - kept
        text = (f"{name} (layers {start}-{end - 1}): {what}; ratio {ratio:.4g} removes "
                f"{rounding}({units}*{ratio:.4g})={_units(nominal, unit)}")
        if removed != nominal:
            text += f", {removed} after uniform's rounding to a vanilla LlamaConfig shape"
        text += f" -> {name} unpruned" if removed == 0 else f" -> {share:.1%} of its weights in these layers"
        if removed >= _SHORT * ratio * units or cfg.target_param_reduction is not None:
            notes[part] = text
            continue
        short.append(part)
        text += " (less than the ratio asks: units go whole)"
        options = []
        if part == "attention" and rep > 1 and cfg.gqa_mode == "group":
            alt = _removed(rep * head_dim, head_dim, ratio)
            if alt / rep > removed / units:
                options.append(f"--gqa-mode q_within_group (removes {alt} of the {rep} q heads in every group)")
            else:
                text += f"; q_within_group removes no more: floor({rep}*{ratio:.4g})={alt} of {rep} q heads per group"
        if removed + 1 < units:
            next_ratio = math.ceil((removed + 1) / units * 1e4) / 1e4
            options.append(f"--ratio >= {next_ratio:.4g} (removes {_units(removed + 1, unit)})")
        options.append("--target-param-reduction (the fraction of all parameters to remove)")
        notes[part] = text + "; use " + " or ".join(options)
    in_ranges = (a1 - a0) * 2 * hidden * (heads + kv_heads) * head_dim + (m1 - m0) * 3 * hidden * inter
    share = in_ranges / count_params(model_config)
    notes["scope"] = (
        f"the layer ranges hold {share:.1%} of all parameters (embeddings, norms and the layers outside the "
        f"ranges are never pruned): ratio {ratio:.4g} nominally removes {ratio:.4g} x {share:.1%} = "
        f"{ratio * share:.1%} of all parameters"
    )
    return notes, short


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------
def build_calibration(
    tokenizer, texts: Sequence[str], num_samples: int = 10, seq_len: int = 64, seed: int = 0
) -> tuple[torch.Tensor, dict]:
    """`num_samples` random windows of `seq_len` tokens (seeded), one per text long enough, taken
    in a seeded random order; if too few texts are long enough, the rest are windows of all texts
    concatenated. Returns (input_ids [num_samples, seq_len], description for the metadata)."""
    if not texts:
        raise ValueError("calibration texts: none given (gradient-based importance needs calibration text)")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    tokenized: dict[int, list[int]] = {}
    samples, windows = [], []
    for i in order:
        ids = tokenized[i] = tokenizer(texts[i])["input_ids"]
        if len(ids) >= seq_len:
            start = rng.randint(0, len(ids) - seq_len)
            samples.append(ids[start : start + seq_len])
            windows.append([i, start])
            if len(samples) == num_samples:
                break
    concatenated = 0
    if len(samples) < num_samples:
        eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
        stream = [t for i in range(len(texts)) for t in (tokenized.get(i) or tokenizer(texts[i])["input_ids"]) + eos]
        if len(stream) < seq_len:
            raise ValueError(
                f"calib_seq_len={seq_len}: the calibration texts hold only {len(stream)} tokens in total"
            )
        while len(samples) < num_samples:
            start = rng.randint(0, len(stream) - seq_len)
            samples.append(stream[start : start + seq_len])
            windows.append(["concat", start])
            concatenated += 1
        log.warning("calibration: %d of %d windows cut from the concatenated texts (texts too short)",
                    concatenated, num_samples)
    info = {
        "num_texts": len(texts),
        "samples": num_samples,
        "seq_len": seq_len,
        "seed": seed,
        "windows": windows,  # [text index, start token] per sample ("concat": from all texts joined)
        "from_concatenation": concatenated,
    }
    return torch.tensor(samples, dtype=torch.long), info


def _calibration(tokenizer, texts, cfg: PruneConfig, calibration_name: str | None) -> tuple[torch.Tensor, dict]:
    if isinstance(texts, torch.Tensor):
        ids = texts.long()
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"calibration input_ids: expected [samples, seq_len >= 2], got {tuple(ids.shape)}")
        info = {"samples": ids.shape[0], "seq_len": ids.shape[1], "source": "pre-tokenized input_ids"}
    else:
        if tokenizer is None:
            raise ValueError("tokenizer: needed to tokenize the calibration texts")
        ids, info = build_calibration(tokenizer, list(texts or []), cfg.calib_samples, cfg.calib_seq_len, cfg.seed)
    if calibration_name:
        info["dataset"] = calibration_name
    return ids, info


# ----------------------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------------------
@dataclass
class Importance:
    """Per-unit scores. `raw[(layer, proj)]`: per q head (q/o_proj), per kv head (k/v_proj) or per
    channel (MLP). `attn[layer]` / `mlp[layer]`: scores of the prunable units (MHA heads, KV groups
    or q heads, per `gqa_mode`; MLP channels). Higher = more important."""

    attn: dict[int, torch.Tensor]
    mlp: dict[int, torch.Tensor]
    raw: dict[tuple[int, str], torch.Tensor]
    calibration: dict | None


def _salience(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
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


def _proj(layer: nn.Module, name: str) -> nn.Linear:
    return getattr(layer.self_attn if name in ATTN_PROJ else layer.mlp, name)


def _targets(model, layers_attn, layers_mlp) -> dict[tuple[int, str], tuple[nn.Parameter, int]]:
    """(layer, proj) -> (weight, number of units) for the weights that are scored."""
    cfg = model.config
    _, _, heads, kv_heads, inter = _dims(cfg)
    out = {}
    for i, layer in enumerate(model.model.layers):
        if i in layers_attn:
            for proj in ATTN_PROJ:
                out[(i, proj)] = (_proj(layer, proj).weight, kv_heads if proj in ("k_proj", "v_proj") else heads)
        if i in layers_mlp:
            for proj in MLP_PROJ:
                out[(i, proj)] = (_proj(layer, proj).weight, inter)
    return out


def _lm_loss(model, ids: torch.Tensor, chunked: bool = True) -> torch.Tensor:
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


def _gradient_pass(model, batches, targets, reduce, hold_grads: bool, desc: str, *, mean_loss: bool = False) -> dict:
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
                loss = _lm_loss(model, ids.to(device), chunked=not hold_grads)
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
    model, tokenizer, texts, cfg: PruneConfig, *, calibration_name: str | None = None, hold_grads: bool = False
) -> Importance:
    """Score the prunable units of the layers in cfg's ranges. `texts`: list of calibration texts
    (windows are drawn per cfg.calib_*), or a LongTensor [samples, seq_len] of token ids."""
    check_architecture(model.config)
    (a0, a1), (m0, m1) = cfg.layer_ranges(model.config.num_hidden_layers)
    targets = _targets(model, range(a0, a1), range(m0, m1))
    calibration = None
    if cfg.importance in GRADIENT_IMPORTANCES:
        ids, calibration = _calibration(tokenizer, texts, cfg, calibration_name)
        raw: dict = {}
        if cfg.importance in ("param_first", "param_mix"):
            # sum |w * g| per unit is not linear in g: one backward over the whole batch
            raw = _gradient_pass(
                model, [ids], targets,
                lambda key, w, g: _unit_scores(_salience(w, g), key[1], targets[key][1]),
                hold_grads, "importance (batch backward)",
            )
        if cfg.importance == "vectorize":
            # |sum w * g| per channel: the signed channel sums add up over samples, |.| at the end
            sums = _gradient_pass(
                model, list(ids.split(1)), targets,
                lambda key, w, g: _channel_sums(_salience(w, g), key[1]),
                hold_grads, "importance (per-sample backward)", mean_loss=True,
            )
            raw = {key: v.abs().view(targets[key][1], -1).sum(1) for key, v in sums.items()}
        if cfg.importance in ("param_second", "param_mix"):  # w * acc_grad * w, acc_grad = mean_i g_i^2
            n = ids.shape[0]
            second = _gradient_pass(
                model, list(ids.split(1)), targets,
                lambda key, w, g: _unit_scores(_salience(w, g) ** 2 / n, key[1], targets[key][1]),
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

    _, _, heads, kv_heads, _ = _dims(model.config)
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


# ----------------------------------------------------------------------------------------------
# Slicing and model rebuilding
# ----------------------------------------------------------------------------------------------
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


def _kept_units(imp: Importance, i: int, shape: dict, model_config, cfg: PruneConfig) -> dict:
    """Kept q heads, kv heads and MLP channels of layer i (all, where the layer is not pruned)."""
    _, _, heads, kv_heads, inter = _dims(model_config)
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


@dataclass
class PruneReport:
    """What pruning did. `model` is the pruned model; `metadata` is also stored as `config.pruning`."""

    model: Any
    method: str
    ratio: float | None  # nominal per-layer width ratio (width); None for depth
    layer_shapes: list[dict]
    params_before: int
    params_after: int
    metadata: dict
    kept: dict = field(default_factory=dict)  # width: layer -> {"heads", "kv_heads", "channels"}
    removed_blocks: list[int] = field(default_factory=list)  # depth
    block_scores: dict = field(default_factory=dict)  # depth
    notes: dict = field(default_factory=dict)  # width: per part, what was pruned and why (see _width_notes)

    @property
    def achieved_reduction(self) -> float:
        return 1 - self.params_after / self.params_before

    def summary(self) -> str:
        """The requested and the achieved figures, the per-part notes (width), the removed blocks
        (depth) and the per-layer shapes, one line each."""
        lines = [
            f"{self.method} pruning: params {self.params_before:,} -> {self.params_after:,} "
            f"(requested {requested(self.metadata)}; "
            f"achieved reduction {self.achieved_reduction:.2%} of all parameters)"
        ]
        lines += [f"  {self.notes[part]}" for part in ("attention", "mlp", "scope") if part in self.notes]
        if self.removed_blocks:
            lines.append(f"removed blocks {self.removed_blocks}")
        start = 0
        for i in range(1, len(self.layer_shapes) + 1):  # runs of equal shapes
            if i == len(self.layer_shapes) or self.layer_shapes[i] != self.layer_shapes[start]:
                s = self.layer_shapes[start]
                lines.append(
                    f"  layers {start}-{i - 1}: {s['num_attention_heads']} q heads, "
                    f"{s['num_key_value_heads']} kv heads, {s['intermediate_size']} MLP channels"
                )
                start = i
        return "\n".join(lines)


def requested(metadata: dict) -> str:
    """What the pruning options asked for, from a report's metadata: the nominal per-layer ratio or
    the target parameter reduction (with the ratio solved for it); depth: the blocks to remove."""
    if metadata.get("method") == "depth":
        if metadata.get("block_fraction") is not None:
            return f"block_fraction {metadata['block_fraction']:.4g} = {metadata['num_blocks']} blocks"
        return f"num_blocks {metadata.get('num_blocks')}"
    if metadata.get("target_param_reduction") is not None:
        return (f"target_param_reduction {metadata['target_param_reduction']:.2%} of all parameters, "
                f"solved nominal per-layer ratio {metadata['ratio']:.4g}")
    return f"nominal per-layer ratio {metadata.get('ratio', float('nan')):.4g}"


def _source(model, source_model: str | None) -> str | None:
    source = source_model or getattr(model.config, "_name_or_path", "") or None
    if source is None:
        log.warning("source model unknown (model has no name_or_path): pass source_model= to record the teacher")
    return source


def prune_width(
    model, tokenizer, texts, cfg: PruneConfig, *, source_model: str | None = None, calibration_name: str | None = None
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
        free = replace(cfg, uniform=False, attn_layers=(0, num_layers), mlp_layers=(0, num_layers))
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
    head_dim = _dims(model.config)[1]
    kept_all = {}
    with torch.no_grad():
        for i, layer in enumerate(tqdm(model.model.layers, desc="slicing layers", disable=None)):
            kept = _kept_units(imp, i, plan.layer_shapes[i], model.config, cfg)
            _slice_layer(layer, kept, head_dim)
            if i in imp.attn or i in imp.mlp:
                kept_all[i] = kept
    (a0, a1), (m0, m1) = cfg.layer_ranges(model.config.num_hidden_layers)
    source = _source(model, source_model)
    metadata = {
        "method": "width",
        "source_model": source,
        "ratio": plan.ratio,
        "target_param_reduction": cfg.target_param_reduction,
        "importance": cfg.importance,
        "gqa_mode": cfg.gqa_mode if _dims(model.config)[2] != _dims(model.config)[3] else None,
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
        config = PrunedLlamaConfig.from_dict(
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


# ----------------------------------------------------------------------------------------------
# Depth pruning
# ----------------------------------------------------------------------------------------------
def block_scores(
    model, tokenizer, texts, cfg: PruneConfig, *, calibration_name: str | None = None
) -> tuple[dict[int, float], dict]:
    """Importance of each removable block (higher = keep). Taylor+: sum over the block's seven
    weight matrices of |sum over the calibration tokens of w * dL/dw|. ppl: perplexity of the
    calibration windows with the block removed. Returns (scores, calibration description)."""
    check_architecture(model.config)
    num_layers = model.config.num_hidden_layers
    candidates = list(range(cfg.protected_first, num_layers - cfg.protected_last))
    ids, calibration = _calibration(tokenizer, texts, cfg, calibration_name)
    if cfg.depth_score == "taylor":
        targets = {
            (i, proj): (_proj(model.model.layers[i], proj).weight, 1)
            for i in candidates
            for proj in ATTN_PROJ + MLP_PROJ
        }
        # sum w * g is linear in g: per-sample backward passes of the mean loss add up to the batch's
        sums = _gradient_pass(
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
                scores[i] = math.exp(float(_lm_loss(model, ids.to(device))))
    finally:
        model.model.layers = layers
        model.train(was_training)
    return scores, calibration


def prune_depth(
    model, tokenizer, texts, cfg: PruneConfig, *, source_model: str | None = None, calibration_name: str | None = None
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
    source = _source(model, source_model)
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
    shapes = [dict(zip(SHAPE_KEYS, _dims(config)[2:])) for _ in kept]
    report = PruneReport(
        model, "depth", None, shapes, before, sum(p.numel() for p in model.parameters()), metadata,
        removed_blocks=removed, block_scores=scores,
    )
    log.info("%s", report.summary())
    return report


def prune(model, tokenizer, texts, cfg: PruneConfig, **kwargs) -> PruneReport:
    """`prune_width` or `prune_depth`, per `cfg.method`."""
    return (prune_width if cfg.method == "width" else prune_depth)(model, tokenizer, texts, cfg, **kwargs)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def save_pruned(model, tokenizer, path: str | os.PathLike) -> str:
    """Write a checkpoint that `from_pretrained` loads: safetensors weights, config (model_type
    `pruned_llama` with per-layer shapes and `auto_map` + `modeling_pruned_llama.py`, so that
    trust_remote_code works without this package; or plain `llama` for uniform/depth pruning),
    the `pruning` metadata and `focus_source_model`, and the tokenizer, its tokenizer_config.json
    with an explicit `tokenizer_class` (the tokenizer's class name) and without the machine-local
    keys transformers writes (`local_files_only`, `is_local`, ...: `fix_tokenizer_config`)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
        fix_tokenizer_config(path, type(tokenizer).__name__)
    if isinstance(model.config, PrunedLlamaConfig) or getattr(model.config, "model_type", "") == "pruned_llama":
        # save_pretrained copies the code through register_for_auto_class; make sure of it regardless.
        target = os.path.join(path, "modeling_pruned_llama.py")
        if not os.path.exists(target):
            shutil.copyfile(modeling_pruned_llama.__file__, target)
        config_file = os.path.join(path, "config.json")
        with open(config_file, encoding="utf-8") as f:
            data = json.load(f)
        if "auto_map" not in data:
            data["auto_map"] = {
                "AutoConfig": "modeling_pruned_llama.PrunedLlamaConfig",
                "AutoModelForCausalLM": "modeling_pruned_llama.PrunedLlamaForCausalLM",
            }
            with open(config_file, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")
    log.info("saved pruned checkpoint to %s", path)
    return path


def load_pruned(path: str | os.PathLike, **kwargs):
    """Load a checkpoint written by `save_pruned` (pruned_llama or plain llama) with this package's classes."""
    modeling_pruned_llama.register_auto_classes()
    return AutoModelForCausalLM.from_pretrained(os.fspath(path), **kwargs)


def report_dict(report: PruneReport) -> dict:
    """JSON-friendly view of a report (without the model)."""
    d = {k: v for k, v in report.__dict__.items() if k != "model"}
    d["achieved_reduction"] = report.achieved_reduction
    return d
