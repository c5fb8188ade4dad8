"""What a check of a training config found: every error, naming ``file:line`` and the key (with the
nearest valid key for a misspelled one), and what ``axolotl train`` would do. Each stage's
``check(cfg, account)`` writes into one :class:`Account` (:mod:`axolotl_focus.preflight` runs them
in order and renders it)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping, get_args

from pydantic import BaseModel

from .locations import ModelLocation, resolve_model

__all__ = ["Account", "nearest", "validation_messages"]


@dataclass
class Account:
    """What a config would do, and what is wrong with it."""

    config: str  # the config file ("" for a mapping without a file)
    where: Mapping[str, int] = field(default_factory=dict, repr=False)  # 1-based line of each key in it
    train: bool = False  # checked as `axolotl train` runs it: a model that cannot be loaded is an error
    errors: list[str] = field(default_factory=list)
    lines: list[tuple[str, str]] = field(default_factory=list)  # (topic, what train would do)
    focus: Any = field(default=None, repr=False)  # the config's FocusArgs, once valid
    prune: Any = field(default=None, repr=False)  # its `focus_prune:` settings (PruneSettings), once valid
    student: ModelLocation | None = field(default=None, repr=False)  # base_model, once resolved
    _student_asked: bool = field(default=False, repr=False)

    def error(self, key: str, message: str, line_of: str = "") -> None:
        """Record ``file:line: key: message`` (the line of ``key``, or of ``line_of`` when the key is
        not in the file)."""
        message = message.removeprefix(f"{key}: ")
        head = key.split(".")[0]
        where = self.where
        line = where.get(key) or where.get(head) or where.get(head.split("[")[0]) or where.get(line_of)
        prefix = f"{self.config}:{line}: " if line else (f"{self.config}: " if self.config else "")
        self.errors.append(f"{prefix}{key}: {message}")

    def say(self, topic: str, text: str) -> None:
        self.lines.append((topic, text))

    def raise_errors(self) -> None:
        if self.errors:
            raise ValueError("; ".join(self.errors))

    def render(self) -> str:
        head = f"{self.config}: " + (f"INVALID ({len(self.errors)} problem{'s' * (len(self.errors) > 1)})"
                                     if self.errors else "valid")
        out = [head + " - dry check: no weights loaded, nothing written"]
        out += [f"  error: {e}" for e in self.errors]
        out += [f"  {topic:<12} {text}" for topic, text in self.lines]
        return "\n".join(out)

    def resolve(self, name: str, key: str) -> ModelLocation | None:
        """The model ``name`` of config key ``key`` (:func:`axolotl_focus.locations.resolve_model`), or
        None with the error recorded; under ``train`` a hub model that cannot be loaded offline is one."""
        try:
            where = resolve_model(str(name), key)
        except ValueError as exc:
            self.error(key, str(exc).removeprefix(f"{key}: "))
            return None
        if where.kind == "unchecked" and self.train:
            self.error(key, f"{name}: {where.note}, so it cannot be loaded; download it first or unset "
                       "HF_HUB_OFFLINE")
        return where

    def resolve_student(self, cfg: Mapping) -> ModelLocation | None:
        """``base_model``, resolved the first time a check asks (its problems recorded then, once)."""
        if not self._student_asked:
            self._student_asked = True
            if not cfg.get("base_model"):
                self.error("base_model", "is required")
            else:
                self.student = self.resolve(cfg["base_model"], "base_model")
        return self.student


def nearest(name: str, known) -> str:
    """`did you mean X?` for the closest known name, or a list of the known names."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"


def _model_at(schema, names: list[str]):
    """The pydantic model nested in ``schema`` at the field path ``names`` (``schema`` itself for
    none), or None."""
    model = schema
    for name in names:
        info = getattr(model, "model_fields", {}).get(name)
        kinds = (get_args(info.annotation) or (info.annotation,)) if info is not None else ()
        model = next((k for k in kinds if isinstance(k, type) and not get_args(k) and issubclass(k, BaseModel)), None)
        if model is None:
            return None
    return model


def validation_messages(exc, prefix: str = "", schema=None) -> list[tuple[str, str]]:
    """``(key, message)`` per pydantic error of validating the model ``schema`` as the config's
    ``prefix`` block (``""``: the whole config); an unknown key inside a block gets the nearest
    valid key of that block."""
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join([prefix] * bool(prefix) + loc) or prefix or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            path = loc[:-1]
            model = None
            if schema is not None and (path or prefix):
                model = _model_at(schema, path) or (_model_at(schema, path[1:]) if path else None)
            msg = f"unknown key; {nearest(loc[-1], model.model_fields)}" if model else "unknown key"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        out.append((key, msg))
    return out
