"""RePAIR pair mining: prompts, batched generation (left padding, early stopping), pair rows,
appended/resumable output, validation. Tiny local models only (built once per module)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from axolotl_focus.degeneration import coverage, loop_at_tail
from axolotl_focus.mining import (
    MiningConfig,
    Prompt,
    RowStopper,
    encode_prompt,
    generate_batch,
    load_prompts,
    mine_pairs,
    run_mining,
)

THRESHOLD = 0.3
DPO_FIELDS = ("prompt", "chosen", "rejected")
META_FIELDS = ("source_id", "onset", "coverage_rejected", "coverage_chosen", "student", "teacher", "seed",
               "prompt_tokens", "rejected_tokens", "chosen_tokens")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def micro(one_thread, looping_micro):
    return looping_micro


def _cfg(tmp_path, **kw) -> MiningConfig:
    base = dict(output=str(tmp_path / "pairs.jsonl"), prefix_tokens=24, max_new_tokens=80, batch_size=4,
                target_pairs=100, seed=0, progress=False, student="student", teacher="teacher")
    return MiningConfig(**(base | kw))


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _state(output) -> list[dict]:
    """The sidecar state rows (none yet when every tried prompt gave a pair)."""
    return _rows(output + ".state") if os.path.exists(output + ".state") else []


# --------------------------------------------------------------------------------------------
# Validation and prompts (no models)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("threshold", 0.0), ("threshold", 1.0), ("top_p", 0.0), ("top_p", 1.5), ("temperature", 0.0),
     ("batch_size", 0), ("target_pairs", -1), ("max_new_tokens", 0), ("prefix_tokens", 0),
     ("positive_attempts", 0), ("chosen_max_new_tokens", 0), ("mode", "chat"), ("dtype", "int8"),
     ("detector_min_repeats", 1)],
)
def test_validate_names_the_field(tmp_path, field, value):
    cfg = MiningConfig(prompts=__file__, output=str(tmp_path / "out.jsonl"), **{field: value})
    with pytest.raises(ValueError, match=rf"\b{field}: "):
        cfg.validate()


def test_validate_paths_before_loading_models(tmp_path):
    MiningConfig(prompts=__file__, output=str(tmp_path / "new" / "dir" / "out.jsonl")).validate()
    with pytest.raises(ValueError, match=r"prompts: file not found"):
        MiningConfig(prompts=str(tmp_path / "missing.jsonl"), output=str(tmp_path / "o.jsonl")).validate()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"output: directory .* is not writable"):
        MiningConfig(prompts=__file__, output=str(blocker / "out.jsonl")).validate()
    with pytest.raises(ValueError, match=r"output: is a directory"):
        MiningConfig(prompts=__file__, output=str(tmp_path)).validate()
    # run_mining validates before touching any model: no student given, missing local student
    with pytest.raises(ValueError, match=r"student: is required"):
        run_mining(MiningConfig(prompts=__file__, output=str(tmp_path / "o.jsonl")))
    with pytest.raises(ValueError, match=r"student: model directory not found"):
        run_mining(MiningConfig(prompts=__file__, output=str(tmp_path / "o.jsonl"), student=str(tmp_path / "nope")))
    plain = tmp_path / "plain_student"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"teacher: not given and the student records no focus_source_model"):
        MiningConfig(prompts=__file__, output=str(tmp_path / "o.jsonl"), student=str(plain)).validate(models=True)


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


def test_encode_prompt_modes(micro):
    tok = micro["tokenizer"]
    doc = micro["prompts"][0].text
    text, ids = encode_prompt(tok, doc, MiningConfig(prefix_tokens=20))
    assert ids[0] == tok.bos_token_id and abs(len(ids) - 21) <= 2
    assert doc.replace("<unk>", "").startswith(text)  # <unk> is a special token: skipped when decoding
    assert tok.decode(ids, skip_special_tokens=True) == text
    # instruction mode: whole prompt, with the chat template when the tokenizer has one
    cfg = MiningConfig(mode="instruction")
    assert encode_prompt(tok, "Name a lobster.", cfg)[0] == "Name a lobster."
    tok.chat_template = "{% for m in messages %}<s>[USER] {{ m['content'] }}\n{% endfor %}[BOT] "
    try:
        text, ids = encode_prompt(tok, "Name a lobster.", cfg)
        assert text == "<s>[USER] Name a lobster.\n[BOT] " and ids.count(tok.bos_token_id) == 1
        assert encode_prompt(tok, "Name a lobster.", replace(cfg, chat_template=False))[0] == "Name a lobster."
    finally:
        tok.chat_template = None


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def test_row_stopper_eos_loop_budget():
    """Per-row verdicts on a synthetic stream: row 0 hits EOS, row 1 loops, row 2 runs out."""
    eos = 2
    loop = [10, 11, 12, 13, 14]
    streams = [[5, 6, eos] + [0] * 37, [20 + i for i in range(6)] + loop * 7, list(range(100, 140))]
    stopper = RowStopper([40, 40, 30], [eos], dict(threshold=THRESHOLD, min_tokens=16, min_repeats=3))
    ids = torch.zeros(3, 4, dtype=torch.long)
    finished_at = [None] * 3
    for step in range(40):
        ids = torch.cat([ids, torch.tensor([[s[step]] for s in streams])], dim=1)
        done = stopper(ids, None)
        assert done.dtype == torch.bool and done.shape == (3,)
        for row in range(3):
            if done[row] and finished_at[row] is None:
                finished_at[row] = step + 1
    assert stopper.reason == ["eos", "loop", "budget"]
    assert stopper.tokens[0] == [5, 6]  # EOS not part of the continuation
    assert finished_at[1] < 40 and len(stopper.tokens[1]) == finished_at[1]
    assert coverage(stopper.tokens[1]).coverage >= THRESHOLD
    assert len(stopper.tokens[2]) == 30


def test_left_padding_matches_unpadded(micro):
    tok, model = micro["tokenizer"], micro["teacher"]
    short = encode_prompt(tok, micro["prompts"][1].text, MiningConfig(prefix_tokens=5))[1]
    long = encode_prompt(tok, micro["prompts"][2].text, MiningConfig(prefix_tokens=40))[1]
    assert len(long) - len(short) >= 30
    batched = generate_batch(model, tok, [short, long], [24, 24], do_sample=False).tokens
    alone = [generate_batch(model, tok, [p], [24], do_sample=False).tokens[0] for p in (short, long)]
    assert batched == alone and all(len(t) == 24 for t in batched)
    assert tok.padding_side == "right"  # the shared tokenizer is left untouched


def test_steps_count_the_batch_not_the_rows(micro):
    """A row stopped early still rides along: the batch runs until its longest row has ended."""
    tok, prompts = micro["tokenizer"], micro["prompts"][:3]
    ids = [encode_prompt(tok, p.text, MiningConfig(prefix_tokens=24))[1] for p in prompts]
    detector = dict(threshold=THRESHOLD, min_tokens=16, min_repeats=3)
    gen = generate_batch(micro["student"], tok, ids, [80, 80, 80], seed=0, detector_kwargs=detector)
    assert "loop" in gen.reason
    ends = [len(t) + (r == "eos") for t, r in zip(gen.tokens, gen.reason)]  # EOS takes a step too
    assert gen.steps == max(ends) and min(ends) < gen.steps <= 80
    budgets = generate_batch(micro["teacher"], tok, ids, [5, 12, 8], do_sample=False)
    assert budgets.steps == max(len(t) + (r == "eos") for t, r in zip(budgets.tokens, budgets.reason)) <= 12


# --------------------------------------------------------------------------------------------
# Mining
# --------------------------------------------------------------------------------------------


def test_mine_pairs_rows(micro, tmp_path):
    tok, prompts = micro["tokenizer"], micro["prompts"][:8]
    cfg = _cfg(tmp_path)
    summary = mine_pairs(micro["student"], micro["teacher"], tok, prompts, cfg)
    rows = _rows(cfg.output)
    assert summary.prompts_tried == 8 and summary.degenerate >= 6 and len(rows) >= 5
    assert summary.pairs_kept == summary.pairs_total == len(rows)
    stopped = [r for r in rows if r["student_stop"] == "loop"]
    assert summary.early_stopped >= len(stopped) > 0 and summary.tokens_not_generated > 0
    assert summary.student_tokens + summary.tokens_not_generated <= 8 * cfg.max_new_tokens
    # steps are per batch: rows stopped early still ride along until the batch stops
    assert summary.student_batches == 2
    assert summary.student_steps + summary.student_steps_skipped == 2 * cfg.max_new_tokens
    assert summary.student_steps * cfg.batch_size >= summary.student_tokens
    # a batch skips a step only once all its rows have ended, so skipped steps x rows <= unused budget
    assert 0 <= summary.student_steps_skipped * cfg.batch_size <= 8 * cfg.max_new_tokens - summary.student_tokens
    saved_file = json.loads(open(cfg.output + ".summary.json").read())
    assert saved_file["pairs_kept"] == len(rows)
    for key in ("tokens_not_generated", "student_steps", "student_steps_skipped"):
        assert saved_file[key] == getattr(summary, key)

    by_id = {p.source_id: p for p in prompts}
    for row in rows:
        assert set(DPO_FIELDS + META_FIELDS) <= set(row)
        assert all(isinstance(row[k], str) and row[k].strip() for k in DPO_FIELDS)
        assert row["student"] == "student" and row["teacher"] == "teacher"
        rejected, chosen, context = row["rejected_tokens"], row["chosen_tokens"], row["prompt_tokens"]
        assert coverage(rejected).coverage >= THRESHOLD and row["coverage_rejected"] >= THRESHOLD
        assert coverage(chosen).coverage < THRESHOLD and row["coverage_chosen"] < THRESHOLD
        assert 0 < len(chosen) <= len(rejected)  # teacher budget = rejected length
        # the prompt is the original prompt + the student's tokens up to the onset
        text, ids = encode_prompt(tok, by_id[row["source_id"]].text, cfg)
        assert context[: len(ids)] == ids and len(context) - len(ids) == row["onset"]
        student_out = context[len(ids) :] + rejected
        res = coverage(student_out)
        assert res.onset == row["onset"] and res.coverage == row["coverage_output"] >= THRESHOLD
        if row["student_stop"] == "loop":  # stopped as soon as the loop was confirmed
            assert len(student_out) < cfg.max_new_tokens and loop_at_tail(student_out)
        else:
            assert row["student_stop"] == "budget" and len(student_out) == cfg.max_new_tokens
        # texts: cut from one decode of the full sequence, so the concatenations are exact
        decode = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
        assert row["prompt"] == decode(context) and row["prompt"].startswith(text)
        assert row["prompt"] + row["rejected"] == decode(context + rejected)
        assert row["prompt"] + row["chosen"] == decode(context + chosen)


def test_resume_with_higher_target_keeps_old_rows(micro, tmp_path):
    tok, prompts = micro["tokenizer"], micro["prompts"][:16]
    cfg = _cfg(tmp_path, target_pairs=3)
    first = mine_pairs(micro["student"], micro["teacher"], tok, prompts, cfg)
    assert first.pairs_total == 3 and first.target_reached
    before = open(cfg.output, encoding="utf-8").read()
    tried_first = len(_state(cfg.output)) + 3

    second = mine_pairs(micro["student"], micro["teacher"], tok, prompts, replace(cfg, target_pairs=7))
    after = open(cfg.output, encoding="utf-8").read()
    assert after.startswith(before)
    ids = [r["source_id"] for r in _rows(cfg.output)]
    assert len(ids) == len(set(ids)) == 7 and second.pairs_kept == 4
    state = [s["source_id"] for s in _state(cfg.output)]
    assert not set(state) & set(ids) and len(state) == len(set(state))
    assert second.prompts_skipped_resume == tried_first

    # target already reached: nothing is generated
    third = mine_pairs(micro["student"], micro["teacher"], tok, prompts, replace(cfg, target_pairs=7))
    assert third.prompts_tried == 0 and open(cfg.output, encoding="utf-8").read() == after


def test_partial_last_line_is_repaired(micro, tmp_path):
    tok, prompts = micro["tokenizer"], micro["prompts"][:4]
    cfg = _cfg(tmp_path, target_pairs=2)
    mine_pairs(micro["student"], micro["teacher"], tok, prompts, cfg)
    good = open(cfg.output, encoding="utf-8").read()
    state_before = "".join(json.dumps(s) + "\n" for s in _state(cfg.output))
    with open(cfg.output, "a", encoding="utf-8") as handle:  # a crash in the middle of a write
        handle.write('{"prompt": "The cemetery is designed to be a pea')
    with open(cfg.output + ".state", "a", encoding="utf-8") as handle:
        handle.write('{"source_id": "doc-')
    summary = mine_pairs(micro["student"], micro["teacher"], tok, prompts, cfg)
    assert open(cfg.output, encoding="utf-8").read() == good and summary.prompts_tried == 0
    assert open(cfg.output + ".state", encoding="utf-8").read() == state_before


def test_non_degenerate_prompts_are_not_retried(micro, tmp_path):
    """With the normal model as student nothing loops: no pairs, every id goes to the state file."""
    tok, prompts = micro["tokenizer"], micro["prompts"][:4]
    cfg = _cfg(tmp_path, max_new_tokens=32, early_stop=False)
    first = mine_pairs(micro["teacher"], micro["teacher"], tok, prompts, cfg)
    assert first.prompts_tried == 4 and first.degenerate == 0 and first.pairs_total == 0
    assert first.degenerate_share == 0.0 and first.tokens_not_generated == 0 and first.early_stopped == 0
    assert first.student_steps + first.student_steps_skipped == first.student_batches * 32 == 32
    state = _state(cfg.output)
    assert [s["source_id"] for s in state] == [p.source_id for p in prompts]
    assert {s["status"] for s in state} == {"not_degenerate"}
    again = mine_pairs(micro["teacher"], micro["teacher"], tok, prompts, cfg)
    assert again.prompts_tried == 0 and again.prompts_skipped_resume == 4


def test_leftover_shards_are_merged(micro, tmp_path):
    """Shards of an interrupted multi-process run are merged (deduplicated) on the next start."""
    cfg = _cfg(tmp_path, target_pairs=3)
    row = lambda sid: {"source_id": sid, "prompt": "p", "chosen": "c", "rejected": "r"}  # noqa: E731
    with open(cfg.output, "w") as handle:
        handle.write(json.dumps(row("a")) + "\n")
    (tmp_path / "pairs.rank0.jsonl").write_text(json.dumps(row("a")) + "\n" + json.dumps(row("b")) + "\n")
    (tmp_path / "pairs.rank1.jsonl").write_text(json.dumps(row("c")) + "\n" + json.dumps(row("d")) + "\n")
    (tmp_path / "pairs.rank1.jsonl.state").write_text(json.dumps({"source_id": "e", "status": "dropped"}) + "\n")
    summary = mine_pairs(micro["student"], micro["teacher"], micro["tokenizer"], [], cfg)
    assert [r["source_id"] for r in _rows(cfg.output)] == ["a", "b", "c"] and summary.pairs_total == 3
    assert [s["source_id"] for s in _state(cfg.output)] == ["e"]
    assert not list(tmp_path.glob("pairs.rank*"))


def test_run_mining_from_paths(micro, tmp_path):
    """Models loaded from disk; the teacher defaults to the student's recorded source model."""
    cfg = MiningConfig(prompts=micro["prompts_file"], id_field="id", max_prompts=4, student=micro["student_path"],
                       output=str(tmp_path / "out" / "pairs.jsonl"), prefix_tokens=24, max_new_tokens=64,
                       batch_size=4, target_pairs=2, progress=False, dtype="float32")
    summary = run_mining(cfg)
    rows = _rows(cfg.output)
    assert summary.pairs_total == len(rows) == 2
    assert rows[0]["teacher"] == micro["teacher_path"] and rows[0]["student"] == micro["student_path"]
    assert {r["source_id"] for r in rows} <= {f"doc-{i}" for i in range(4)}
    assert os.path.isfile(cfg.output + ".summary.json")


@pytest.mark.slow
def test_two_process_mining_merges_shards(micro, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU): each rank mines its half into a shard, rank 0
    merges them into the output; the summary counts both ranks."""
    import subprocess
    import sys

    out = tmp_path / "pairs.jsonl"
    cfg = dict(prompts=micro["prompts_file"], id_field="id", max_prompts=8, student=micro["student_path"],
               output=str(out), prefix_tokens=24, max_new_tokens=80, batch_size=2, target_pairs=100,
               progress=False, dtype="float32")
    script = tmp_path / "mine.py"
    script.write_text(
        "import json, sys\nfrom axolotl_focus.mining import MiningConfig, run_mining\n"
        f"run_mining(MiningConfig(**json.loads({json.dumps(json.dumps(cfg))})))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows, state = _rows(out), _state(str(out))
    ids = [r["source_id"] for r in rows] + [s["source_id"] for s in state]
    assert sorted(ids) == sorted(f"doc-{i}" for i in range(8)) and len(rows) >= 4
    assert not list(tmp_path.glob("pairs.rank*"))
    summary = json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())
    assert summary["prompts_tried"] == 8 and summary["pairs_total"] == len(rows)
