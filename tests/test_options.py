"""axolotl_focus.options: command-line options built from a dataclass or a pydantic schema."""

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from axolotl_focus.options import add_options, given, opt, positive_int


@dataclass
class Settings:
    name: str = opt("x", "a name")
    count: int = opt(3, "how many", type=positive_int)
    rate: float | None = opt(None, "a rate (default: as the config)")
    mode: Literal["a", "b"] = opt("a", "a mode")
    flag: bool = opt(True, "a switch", group="extra")
    seeds: tuple[int, ...] = opt((0, 1), "seeds", group="extra")
    once: bool = opt(False, "a one-way flag", action="store_true")
    hidden: int = opt(7, "no option", cli=False)


class Model(BaseModel):
    ratio: float = Field(default=0.25, description="a ratio")
    kind: Literal["width", "depth"] = "width"
    span: list[int] | None = Field(default=None, description="[start, end)",
                                   json_schema_extra={"cli": {"nargs": 2, "metavar": ("START", "END")}})
    secret: float = Field(default=1.0, json_schema_extra={"cli": {"cli": False}})


def parser_for(schema, **kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_options(parser, schema, **kw)
    return parser


def test_dataclass_fields_become_typed_options_with_schema_defaults():
    parser = parser_for(Settings, defaults=True)
    args = parser.parse_args([])
    assert (args.name, args.count, args.rate, args.mode, args.flag, args.seeds, args.once) == \
        ("x", 3, None, "a", True, [0, 1], False)
    assert not hasattr(args, "hidden")
    args = parser.parse_args(["--count", "5", "--rate", "0.5", "--mode", "b", "--no-flag", "--seeds", "4", "5",
                              "--once"])
    assert (args.count, args.rate, args.mode, args.flag, args.seeds, args.once) == (5, 0.5, "b", False, [4, 5], True)
    for bad in (["--count", "0"], ["--mode", "c"], ["--hidden", "1"]):
        with pytest.raises((argparse.ArgumentError, SystemExit)):
            parser.parse_args(bad)


def test_help_says_each_default_once_and_groups_options():
    text = parser_for(Settings, defaults=True).format_help()
    assert "a name (default: x)" in text and "seeds (default: 0 1)" in text
    assert "a rate (default: as the config)" in text and "(default: None)" not in text
    assert "extra:" in text and "--flag, --no-flag" in text


def test_not_given_is_none_and_given_keeps_the_rest():
    parser = parser_for(Settings)
    args = parser.parse_args(["--count", "2"])
    assert args.name is None and args.flag is None
    assert given(args, Settings) == {"count": 2}


def test_pydantic_fields_with_cli_overrides():
    parser = parser_for(Model)
    args = parser.parse_args(["--ratio", "0.4", "--kind", "depth", "--span", "2", "6"])
    assert given(args, Model) == {"ratio": 0.4, "kind": "depth", "span": [2, 6]}
    assert Model.model_validate(given(args, Model)).span == [2, 6]
    assert "--secret" not in parser.format_help() and "START END" in parser.format_help()
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        parser.parse_args(["--kind", "other"])
