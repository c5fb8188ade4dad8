"""The demo's pairs stage helpers (axolotl_focus/demo/stages/pairs.py): the held-out split and the
mining source."""

import pytest

from axolotl_focus.demo import demo_settings
from axolotl_focus.demo.stages.pairs import source_model, split_heldout


def test_the_held_out_split_is_seeded_by_source_id_and_keeps_the_file_order():
    rows = [{"source_id": f"doc-{i}", "i": i} for i in range(40)]
    train, held = split_heldout(rows, 0.15, seed=0)
    assert len(held) == 6 and len(train) == 34
    assert sorted(r["i"] for r in train + held) == list(range(40))
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)  # file order
    assert held == split_heldout(list(reversed(rows)), 0.15, seed=0)[1][::-1]  # by source id, not by position
    assert held != split_heldout(rows, 0.15, seed=1)[1]
    assert split_heldout(rows[:1], 0.15, seed=0) == (rows[:1], [])  # one pair: all for training
    assert len(split_heldout(rows[:3], 0.15, seed=0)[1]) == 1  # at least one held out
    assert split_heldout(rows, 0.0, seed=0) == (rows, [])


def test_the_mining_source_is_the_model_being_repaired():
    s = demo_settings(preset="quick")
    records = {"sft": {"runs": {"ce-s0": {"model": "/sft/ce-s0/merged"}}}, "prune": {"width": {"path": "/w"}}}
    assert source_model(s, records) == "/sft/ce-s0/merged"
    s.mine_from = "pruned"
    assert source_model(s, records) == "/w"
    s.mine_from = "base"
    with pytest.raises(ValueError, match="mine_from"):
        source_model(s, records)
