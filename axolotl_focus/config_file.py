"""Reading an axolotl config file: the YAML mapping and the line of every key (so that errors say
``config.yml:LINE: key: ...``), a key given twice refused (YAML loaders keep the last one silently)."""

from __future__ import annotations

import os

import yaml

from .files import read_text

__all__ = ["duplicate_keys", "key_lines", "read_config"]


def duplicate_keys(node, path: str) -> None:
    """Raise ``ValueError("<path>:<line>: duplicate key <key> (first at line N) ...")`` for the first
    key that a mapping of the YAML node tree holds twice (YAML loaders keep the last one silently)."""
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in first:
                    raise ValueError(f"{path}:{key.start_mark.line + 1}: duplicate key {key.value} (first at line "
                                     f"{first[key.value]}); YAML would keep the last value silently - remove one")
                first[key.value] = key.start_mark.line + 1
            duplicate_keys(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            duplicate_keys(item, path)


def key_lines(path: str, text: str | None = None) -> dict[str, int]:
    """1-based line of each top-level key and of each key one level down (``focus_prune.ratio``)
    (``text``: the file's content, when read already). A key given twice in one mapping raises
    (:func:`duplicate_keys`)."""
    root = yaml.compose(read_text(path, "config") if text is None else text)
    duplicate_keys(root, path)
    lines: dict[str, int] = {}
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            lines[str(key.value)] = key.start_mark.line + 1
            if isinstance(value, yaml.MappingNode):
                for sub, _ in value.value:
                    lines[f"{key.value}.{sub.value}"] = sub.start_mark.line + 1
            elif isinstance(value, yaml.SequenceNode):
                for i, item in enumerate(value.value):
                    lines[f"{key.value}[{i}]"] = item.start_mark.line + 1
    return lines


def read_config(path: str) -> tuple[dict, dict[str, int]]:
    """The YAML mapping of ``path`` and its key lines; ``ValueError`` naming file:line otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such config file")
    text = read_text(path, "config")  # not UTF-8: the line of the first bad byte
    try:
        cfg = yaml.safe_load(text)
        lines = key_lines(path, text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ValueError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(cfg).__name__}")
    return cfg, lines
