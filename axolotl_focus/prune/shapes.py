"""Closed-form shapes and parameter counts of width pruning (no weight is touched).

`plan_width(model_config, settings)` gives the per-layer {num_attention_heads,
num_key_value_heads, intermediate_size} after LLM-Pruner block-wise width pruning, the parameter
counts before/after, and per part (attention, MLP, scope) a note on what is pruned and why the
cut may be smaller than the ratio (units go whole). With `target_param_reduction` it bisects for
the per-layer ratio. `count_params` is the closed-form LLaMA parameter count (depth pruning and
`plan_prune` use it too). Rounding follows LLM-Pruner: heads and KV groups are removed whole,
floor(units * ratio); MLP channels ceil(channels * ratio).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .common import SHAPE_KEYS, WidthSettings, check_architecture, model_dims


def _removed(channels: int, unit: int, ratio: float) -> int:
    """LLM-Pruner's rounding: units removed from `channels` channels of `unit` channels each."""
    return (channels - int(channels * (1 - ratio))) // unit


def _nearest_valid(want: int, candidates: list[int]) -> int:
    """The candidate closest to `want`; ties keep the larger (less pruning)."""
    return min(candidates, key=lambda c: (abs(c - want), -c)) if candidates else 0


def layer_shapes_for_ratio(model_config, cfg: WidthSettings, ratio: float) -> list[dict]:
    """Per-layer {num_attention_heads, num_key_value_heads, intermediate_size} after pruning every
    layer of the ranges at `ratio` (entries may be 0 when the ratio removes every unit)."""
    hidden, head_dim, heads, kv_heads, inter = model_dims(model_config)
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
    hidden, head_dim, heads, kv_heads, inter = model_dims(model_config)
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


def plan_width(model_config, cfg: WidthSettings) -> WidthPlan:
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


def _width_notes(model_config, cfg: WidthSettings, ratio: float, layer_shapes: list[dict]) -> tuple[dict, list]:
    """Why width pruning at `ratio` cuts what it cuts: ({"attention", "mlp", "scope": text}, short).

    attention / mlp: the part's units (MHA heads; GQA: KV groups of n_rep q heads, or q heads
    inside every group with q_within_group; MLP channels), how many the ratio removes (heads and
    groups whole: floor(units * ratio); channels: ceil(channels * ratio), LLM-Pruner's rounding),
    and the share of the part's weights in the pruned layers that goes. A part removing fewer
    than 90% of ratio x units (e.g. none) is listed in `short` and its note says what would prune
    it; not with `target_param_reduction`, whose solved ratio is meant to be what it is.
    scope: the share of all parameters inside the layer ranges (embeddings, norms and the
    layers outside them are never pruned), hence the nominal parameter cut ratio x that share."""
    hidden, head_dim, heads, kv_heads, inter = model_dims(model_config)
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


