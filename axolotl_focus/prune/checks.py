"""The prune stage's check before any work (``axolotl-focus validate``, and ``axolotl train`` in the
plugin's ``register`` hook): the ``focus_prune:`` settings, then, with the student's config, their
plan (layer ranges, GQA groups, the parameter cut, whether the pruned checkpoint is cached). Loads
no weights, writes nothing."""

from __future__ import annotations

import re
from typing import Mapping

from pydantic import ValidationError

from ..account import Account, validation_messages
from .cache import plan_prune
from .settings import PruneSettings

__all__ = ["check"]


def check(cfg: Mapping, account: Account) -> None:
    """``focus_prune:`` valid (``account.prune``), and planned against ``base_model`` unless the
    config was pruned already (``focus_pruned_from``)."""
    if not cfg.get("focus_prune"):
        return
    try:
        spec = account.prune = PruneSettings.model_validate(cfg["focus_prune"])
    except ValidationError as exc:
        for key, msg in validation_messages(exc, "focus_prune", PruneSettings):
            account.error(key, msg)
        return
    if cfg.get("focus_pruned_from") or account.resolve_student(cfg) is None:
        return
    source = cfg["base_model"]
    try:
        plan = plan_prune(source, spec)
    except ValueError as exc:
        message = str(exc).removeprefix("focus_prune: ")
        first = re.match(r"[\w.]+", message)
        key = first.group(0).removeprefix("focus_prune.") if first else ""
        if key in spec.model_fields:
            account.error(f"focus_prune.{key}", message.removeprefix(f"focus_prune.{key}: ").removeprefix(f"{key}: "))
        else:
            account.error("focus_prune", message)
        return
    what = f"{spec.method} pruning of {source}"
    if plan.get("params_after"):
        what += (f": {plan['params_before']:,} -> {plan['params_after']:,} parameters "
                 f"(-{plan['reduction']:.1%})")
    elif plan.get("note"):
        what += f" ({plan['note']})"
    cache = "cache hit, reused" if plan["cached"] else "cache miss: `axolotl train` prunes it first"
    account.say("student", f"{what}; {cache} ({plan['cache_path']})")
