"""What pruning did: `PruneReport` (the pruned model, the shapes and parameter counts, the
`metadata` also stored as `config.pruning`), its one-line-per-fact `summary()`, `requested()` (what
the settings asked for, from the metadata) and `report_dict()` (the JSON view written as
pruning_report.json). Shared by width and depth pruning and by `axolotl-focus prune`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


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
    notes: dict = field(default_factory=dict)  # width: per part, what was pruned and why (see shapes.plan_width)

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


def source_of(model, source_model: str | None) -> str | None:
    """The unpruned source recorded in the metadata: `source_model`, else the model's name_or_path."""
    source = source_model or getattr(model.config, "_name_or_path", "") or None
    if source is None:
        log.warning("source model unknown (model has no name_or_path): pass source_model= to record the teacher")
    return source



def report_dict(report: PruneReport) -> dict:
    """JSON-friendly view of a report (without the model)."""
    d = {k: v for k, v in report.__dict__.items() if k != "model"}
    d["achieved_reduction"] = report.achieved_reduction
    return d
