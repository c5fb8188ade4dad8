"""Stage 1, ``teacher``: the embedded real model materialized, or the micro teacher pretrained."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ...embedded_model import RECORD, materialize
from ...files import read_json
from ...micro import build_micro_teacher
from ..pipeline import Context
from ..settings import DemoSettings, write_json


def run(s: DemoSettings, ctx: Context, folder: Path, records: dict) -> tuple[dict, str]:
    if s.real:
        return _real_teacher()
    model_dir = folder / "model"
    _, losses = build_micro_teacher(
        model_dir, steps=s.teacher_steps, seed=s.seed, vocab_size=s.vocab_size, layers=s.teacher_layers,
        hidden=s.teacher_hidden, heads=s.teacher_heads, kv_heads=s.teacher_kv_heads,
        intermediate=s.teacher_intermediate, progress=ctx.progress)
    write_json(folder / "pretrain_loss.json", losses)
    params = _param_count(model_dir)
    k = max(1, min(10, len(losses) // 10))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    data = {"path": str(model_dir), "params": params, "loss_first": first, "loss_last": last, "steps": s.teacher_steps}
    summary = (f"{params / 1e6:.2f} M params ({s.teacher_layers} layers, hidden {s.teacher_hidden}, GQA "
               f"{s.teacher_heads}/{s.teacher_kv_heads} heads), loss {first:.2f} -> {last:.2f} in {s.teacher_steps} "
               "steps")
    return data, summary


def _real_teacher() -> tuple[dict, str]:
    path = materialize()
    record = read_json(path / RECORD) or {}
    data = {"path": str(path), "params": record.get("parameters") or _param_count(path), "record": record}
    summary = (f"SmolLM2-135M-Instruct at {path} ({data['params'] / 1e6:.1f} M params, 30 layers, GQA 9/3 heads; "
               f"from {record.get('wheel')})")
    return data, summary


def _param_count(path: str | os.PathLike) -> int:
    from safetensors import safe_open  # only once the stage runs

    total = 0
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():
            total += math.prod(handle.get_slice(name).get_shape())
    return total
