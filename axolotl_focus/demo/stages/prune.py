"""Stage 2, ``prune``: width and depth pruning of the teacher."""

from __future__ import annotations

import json
from pathlib import Path

from ... import prune  # the stage's public API, imported on first use: the demo's --help stays light
from ...prune.settings import PruneSettings
from ..pipeline import Context
from ..settings import DemoSettings


def run(s: DemoSettings, ctx: Context, folder: Path, records: dict) -> tuple[dict, str]:
    teacher = records["teacher"]["path"]
    layers = int(json.loads((Path(teacher) / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])
    span = list(s.width_layers or (1, layers - 1))
    specs = {
        "width": PruneSettings(target_param_reduction=s.width_reduction, attn_layers=span, mlp_layers=span,
                               gqa_mode=s.width_gqa_mode, calib_samples=s.calib_samples, seed=s.seed,
                               device=ctx.device),
        "depth": PruneSettings(method="depth", num_blocks=s.depth_blocks, protected_first=1, protected_last=1,
                               calib_samples=s.calib_samples, seed=s.seed, device=ctx.device),
    }
    data, parts = {}, []
    for kind, spec in specs.items():
        report = prune.run_prune(teacher, spec, folder / kind)
        data[kind] = {"path": str(folder / kind), "params_before": report["params_before"],
                      "params_after": report["params_after"], "reduction": report["achieved_reduction"],
                      "removed_blocks": report.get("removed_blocks"), "layer_shapes": report.get("layer_shapes"),
                      "spec": spec.model_dump(exclude={"cache_dir", "wait_timeout"})}
        extra = f", blocks {report['removed_blocks']} removed" if report.get("removed_blocks") else \
            f", layers {span[0]}-{span[1] - 1}"
        parts.append(f"{kind} {report['params_after'] / 1e6:.2f} M ({report['achieved_reduction']:.1%} fewer{extra})")
    return data, "; ".join(parts)
