"""Prompt sources (axolotl_focus.sources): JSON lines, JSON arrays, plain text and hub datasets."""

from __future__ import annotations

import json

import pytest

from axolotl_focus import sources
from axolotl_focus.sources import Prompt, load_prompts, read_json_rows


def test_load_prompts_jsonl_and_text(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        json.dumps({"text": "first doc"}) + "\n\n"
        + json.dumps({"instruction": "Translate.", "input": "bonjour"}) + "\n"
        + json.dumps({"instruction": "Say hi.", "input": ""}) + "\n"
    )
    got = load_prompts(str(jsonl))
    assert got == [Prompt("1", "first doc"), Prompt("3", "Translate.\n\nbonjour"), Prompt("4", "Say hi.")]
    assert load_prompts(str(jsonl), limit=2)[-1].source_id == "3"
    with pytest.raises(ValueError, match=r"text_field: .*p\.jsonl:1 has no field 'prompt'"):
        load_prompts(str(jsonl), text_field="prompt")
    with pytest.raises(ValueError, match=r"id_field: .* has no field 'uid'"):
        load_prompts(str(jsonl), id_field="uid")
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"id": 7, "prompt": p}) + "\n" for p in ("a", "b")))
    with pytest.raises(ValueError, match=r"id_field: duplicate source id '7'"):
        load_prompts(str(dup), id_field="id")

    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"prompt": "x"}, {"prompt": "y", "input": "z"}]))
    assert load_prompts(str(array)) == [Prompt("0", "x"), Prompt("1", "y\n\nz")]

    text = tmp_path / "docs.txt"
    text.write_text("para one\ncontinues\n\n\npara two\n")
    assert load_prompts(str(text)) == [Prompt("1", "para one continues"), Prompt("5", "para two")]
    assert [p.text for p in load_prompts(str(text), text_unit="line")] == ["para one", "continues", "para two"]



def test_read_json_rows_names_the_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(ValueError, match=r"^prompts: .*rows\.jsonl:3 is not valid JSON \("):
        read_json_rows(str(path), "prompts")
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [(i, row) for i, _, row in read_json_rows(str(path), "prompts")] == [(1, {"a": 1}), (3, {"a": 2})]


def test_hub_prompts_go_through_load_hub_dataset(monkeypatch):
    calls = []

    def fake_hub(name, config, split):
        calls.append((name, config, split))
        return [{"text": "a"}, {"text": " "}, {"text": "c", "uid": 9}]

    monkeypatch.setattr(sources, "load_hub_dataset", fake_hub)
    assert load_prompts("org/data", split="test", dataset_config="cfg") == [Prompt("0", "a"), Prompt("2", "c")]
    assert calls == [("org/data", "cfg", "test")]
    with pytest.raises(ValueError, match=r"id_field: org/data\[test\]\[0\] has no field 'uid'"):
        load_prompts("org/data", split="test", id_field="uid")


def test_missing_file(tmp_path):
    there = tmp_path / "p.jsonl"
    there.write_text("{}\n")
    assert not sources.missing_file(str(there))
    assert all(sources.missing_file(name) for name in ("nope.txt", "nope.jsonl", "a/nope.json", "/x/y", "./d", "../d"))
    assert not any(sources.missing_file(name) for name in ("Salesforce/wikitext", "wikitext", "org/name"))
