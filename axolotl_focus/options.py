"""Command-line options built from a settings schema, so that each option is written once.

A schema is a dataclass or a pydantic model. Every field becomes ``--field-name`` (underscores to
dashes), in field order, described by the field's help: a dataclass field's ``metadata["help"]``
(write fields with :func:`opt`, TRL style) or a pydantic field's ``description``. The option's
type comes from the annotation (``X | None`` -> X; ``bool`` -> ``--x / --no-x``; ``Literal`` ->
its values as choices; ``tuple[X, ...]`` / ``list[X]`` -> ``nargs="+"`` of X). A dataclass field's
metadata (a pydantic field's ``json_schema_extra["cli"]``) may override ``type``, ``choices``,
``nargs``, ``metavar``, or set ``group`` (the option group's title), ``required``,
``action="store_true"`` (a flag without ``--no-x``) and ``cli: False`` (no option).

``defaults=False`` (commands whose options override a config block, or whose code applies the
schema's defaults itself): every option defaults to None, "not given". ``defaults=True``: the
option's default is the schema's (a tuple as a list). Either way the help ends with the schema's
default, unless the help already speaks of it or it is None or empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any

from pydantic import FiniteFloat

from .arg_types import finite_float, positive_int

__all__ = ["FiniteFloat", "add_options", "finite_float", "given", "nonfinite_fields", "opt", "positive_int",
           "resolve_device"]

_NONE = type(None)


def opt(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
        **cli: Any) -> Any:
    """A dataclass field with its ``--help`` text and option overrides in the metadata."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **cli})


def nonfinite_fields(obj) -> list[str]:
    """``"name: must be a finite number (got inf)"`` for each float field of the dataclass ``obj``
    holding inf or nan (a tuple of floats: any element)."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        values = value if isinstance(value, (tuple, list)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            out.append(f"{f.name}: must be a finite number (got {value!r})")
    return out


def resolve_device(name: str | None, field: str = "--device"):
    """The ``torch.device`` of ``name`` (None / ``auto``: cuda when available, else cpu). Raises
    ``ValueError("<field>: ...")`` for a name torch does not parse (``gpu0``) and for a device this
    machine does not have (``cuda`` without CUDA, ``cuda:3`` with 2 GPUs, ``mps``)."""
    import torch  # heavy: the options and --help need no torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{field}: {name!r} is not a device (expected cpu, cuda, cuda:N, mps or auto)") from None
    count = {"cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
             "mps": int(bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()),
             "xpu": torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0}
    if device.type in count:
        if not count[device.type]:
            raise ValueError(f"{field}: {name}: this machine has no {device.type.upper()} device (use --device cpu)")
        if device.index is not None and device.index >= count[device.type]:
            raise ValueError(f"{field}: {name}: this machine has {count[device.type]} {device.type} device(s), "
                             f"numbered from 0")
    elif device.type != "cpu":
        raise ValueError(f"{field}: {name!r}: unsupported device type {device.type!r} (expected cpu, cuda or mps)")
    return device


def _fields(schema) -> list[tuple[str, Any, Any, str, dict]]:
    """(name, annotation, default, help, overrides) per field of a dataclass or pydantic model."""
    if dataclasses.is_dataclass(schema):
        hints = typing.get_type_hints(schema)
        out = []
        for f in dataclasses.fields(schema):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            extra = {k: v for k, v in f.metadata.items() if k != "help"}
            out.append((f.name, hints[f.name], default, f.metadata.get("help", ""), extra))
        return out
    return [(name, info.annotation, info.default, info.description or "",
             dict((info.json_schema_extra or {}).get("cli", {}))) for name, info in schema.model_fields.items()]


def _strip_optional(kind):
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not _NONE]
        if len(args) == 1:
            return args[0]
    return kind


def option_kwargs(kind, extra: dict) -> dict:
    """argparse keyword arguments for a field of annotation ``kind`` (before ``extra`` overrides)."""
    kind, kw = _strip_optional(kind), {}
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        kw["choices"] = list(typing.get_args(kind))
    elif kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin in (tuple, list):
        item = typing.get_args(kind)[0]
        kw.update(nargs="+", type=finite_float if item is float else item)
    elif kind is float:
        kw["type"] = finite_float
    elif kind in (int, str):
        kw["type"] = kind
    kw.update({k: v for k, v in extra.items() if k in ("type", "choices", "nargs", "metavar", "action", "required")})
    if "choices" in kw and kw.get("type") is str:
        del kw["type"]
    if kw.get("action") == "store_true":
        kw.pop("type", None)
    return kw


def _help(text: str, default) -> str:
    if "default" in text.lower() or default is None or default in ((), [], {}):  # said in the help, or unset
        return text
    shown = " ".join(map(str, default)) if isinstance(default, tuple | list) else default
    return f"{text} (default: {shown})".lstrip()


def add_options(parser: argparse.ArgumentParser, schema, *, defaults: bool = False, skip=()) -> None:
    """One ``--option`` per field of ``schema`` (see the module docstring)."""
    groups: dict[str, Any] = {}
    for name, kind, default, text, extra in _fields(schema):
        if name in skip or extra.get("cli", True) is False:
            continue
        target = parser
        if extra.get("group"):
            target = groups.setdefault(extra["group"], parser.add_argument_group(extra["group"]))
        kw = option_kwargs(kind, extra)
        value = (list(default) if isinstance(default, tuple) else default) if defaults else None
        plain = kw.get("required") or kw.get("action") == "store_true"  # no default worth showing
        target.add_argument("--" + name.replace("_", "-"), dest=name, default=value,
                            help=text if plain else _help(text, default), **kw)


def given(args: argparse.Namespace, schema) -> dict:
    """The parsed options that are fields of ``schema`` and were given (not None)."""
    names = {f[0] for f in _fields(schema)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
