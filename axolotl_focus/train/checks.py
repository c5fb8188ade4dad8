"""The train stage's check before any weights are loaded (``axolotl-focus validate``, and ``axolotl
train`` in the plugin's ``register`` hook), each part next to the code it protects: the teacher and
the vocabulary (:func:`axolotl_focus.train.teacher.check`) or the teacher cache
(:func:`axolotl_focus.train.teacher_cache.checks.check`), the datasets and their pair rows
(:func:`axolotl_focus.train.dataset_files.check`), the pair stream
(:func:`axolotl_focus.train.pair_stream.check`); then the loss ``train`` would compute."""

from __future__ import annotations

from typing import Mapping

from ..account import Account
from ..config import FocusArgs, FocusAuxLosses, focus_default
from .dataset_files import check as check_dataset_files
from .pair_dataset import uses_repair
from .pair_stream import check as check_pair_stream
from .teacher import check as check_teacher
from .teacher_cache.checks import check as check_teacher_cache

__all__ = ["check", "describe_loss"]


def check(cfg: Mapping, account: Account) -> None:
    """The student (``base_model``), then its teacher or teacher cache, the datasets, the pair stream
    and the loss line (see the module docstring)."""
    account.resolve_student(cfg)
    if cfg.get("base_model"):
        distill = cfg.get("focus_distill") or focus_default("focus_distill")
        if cfg.get("focus_teacher_cache") and not cfg.get("rl") and distill != "none":
            check_teacher_cache(cfg, account)
        else:
            check_teacher(cfg, account)
    check_dataset_files(cfg, account)
    check_pair_stream(cfg, account)
    if account.focus is not None:
        account.say("loss", describe_loss(cfg, account.focus))


def describe_loss(cfg: Mapping, args: FocusArgs) -> str:
    """The loss terms ``train`` computes, with their weights and settings, as one line."""
    if cfg.get("rl"):
        return f"{cfg['rl']} (axolotl/TRL) on the pairs, reference model = {args.focus_dpo_reference}"
    terms = [f"CE x{args.focus_ce_alpha}"]
    cached = " from the teacher cache" if args.focus_teacher_cache else ""
    if args.focus_distill == "focus":
        terms.append(f"FOCUS x{args.focus_alpha} (tau {args.focus_temperature}, beta {args.focus_beta}, "
                     f"gamma {args.focus_gamma}){cached}")
    elif args.focus_distill == "kd":
        terms.append(f"KD x{args.focus_alpha} (T {args.focus_temperature}){cached}")
    if uses_repair(cfg) or args.focus_repair_pairs:
        stream = f", {args.focus_repair_pairs_per_step} pairs per step" if args.focus_repair_pairs else ""
        terms.append(f"RePAIR x{args.focus_repair_alpha} (margin {args.focus_repair_margin}{stream})")
    aux = args.focus_aux_losses
    for name in FocusAuxLosses.model_fields:
        term = getattr(aux, name, None) if aux else None
        if term is not None:
            terms.append(f"{name} {term.model_dump(by_alias=True)}")
    return " + ".join(terms)
