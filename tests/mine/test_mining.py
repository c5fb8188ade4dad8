"""RePAIR pair mining: prompts, batched generation (left padding, early stopping), pair rows,
appended/resumable output, validation. Tiny local models only (built once per module)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields, replace

import pytest
import torch

from axolotl_focus.degeneration import coverage, loop_at_tail
from axolotl_focus.generation import RowStopper, generate_batch
from axolotl_focus.mine.config import DTYPES, MODES, MiningConfig
from axolotl_focus.mine.run import mine_pairs, run_mining
from axolotl_focus.prompt_format import encode_prompt
from axolotl_focus.sources import TEXT_UNITS, load_prompts

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


def _files(folder, *, summary: bool = True) -> dict[str, bytes]:
    """Every file of ``folder`` (name -> bytes); ``summary=False`` leaves out the summary, which
    each run rewrites (elapsed time, this run's counts)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and (summary or not p.name.endswith(".summary.json"))}


@pytest.fixture
def no_weights(monkeypatch):
    """Loading model weights fails the test: what it checks happens before."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


# --------------------------------------------------------------------------------------------
# Validation and prompts (no models)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("threshold", 0.0), ("threshold", 1.0), ("top_p", 0.0), ("top_p", 1.5), ("temperature", 0.0),
     ("batch_size", 0), ("target_pairs", -1), ("max_new_tokens", 0), ("prefix_tokens", 0),
     ("positive_attempts", 0), ("chosen_max_new_tokens", 0), ("mode", "chat"), ("dtype", "int8"),
     ("detector_min_repeats", 1), ("teacher_temperature", 0.0), ("teacher_temperature", -1.0)],
)
def test_validate_names_the_field(tmp_path, field, value):
    cfg = MiningConfig(prompts=__file__, output=str(tmp_path / "out.jsonl"), **{field: value})
    with pytest.raises(ValueError, match=rf"\b{field}: "):
        cfg.validate()


def test_validate_is_one_line(tmp_path):
    cfg = MiningConfig(prompts=__file__, output=str(tmp_path / "o.jsonl"), threshold=0.0, batch_size=0)
    with pytest.raises(ValueError) as err:
        cfg.validate()
    assert str(err.value) == "threshold: must be in (0, 1) (got 0.0); batch_size: must be an integer > 0 (got 0)"


def test_every_option_has_help():
    """Each field carries its --help text (TRL style metadata); the closed sets carry choices."""
    for f in fields(MiningConfig):
        assert len(f.metadata.get("help", "")) > 15, f.name
    choices = {f.name: f.metadata["choices"] for f in fields(MiningConfig) if "choices" in f.metadata}
    assert choices == {"mode": MODES, "text_unit": TEXT_UNITS, "dtype": DTYPES}
    assert all(getattr(MiningConfig(), name) in values for name, values in choices.items())
    assert MiningConfig().restart is False
    from axolotl_focus.cli import build_parser

    assert build_parser().parse_args(["pairs", "--restart"]).restart is True


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


def test_empty_prompt_source_is_an_error(micro, tmp_path, no_weights):
    """A source without any prompt stops run_mining before any model is loaded or file written."""
    blank, empty, rows = tmp_path / "blank.txt", tmp_path / "empty.txt", tmp_path / "rows.jsonl"
    blank.write_text("\n   \n\n")
    empty.write_text("")
    rows.write_text(json.dumps({"text": ""}) + "\n\n" + json.dumps({"text": " ", "input": ""}) + "\n")
    for path, why in ((blank, "the file holds only blank lines"), (empty, "the file is empty"),
                      (rows, "all 2 rows have an empty text")):
        with pytest.raises(ValueError, match=re.escape(f"prompts: {path} holds no prompts ({why})")):
            load_prompts(str(path))
    out = tmp_path / "out" / "pairs.jsonl"
    with pytest.raises(ValueError, match=r"^prompts: .*blank\.txt holds no prompts \(the file holds only blank"):
        run_mining(MiningConfig(prompts=str(blank), student=micro["student_path"], output=str(out), progress=False))
    assert not out.parent.exists()


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


def test_steps_and_row_steps(micro):
    """Steps run until the batch's longest row has ended; rows that ended earlier leave the batch,
    so the row-steps computed are the rows' own lengths, below rows x steps."""
    tok, prompts = micro["tokenizer"], micro["prompts"][:3]
    ids = [encode_prompt(tok, p.text, MiningConfig(prefix_tokens=24))[1] for p in prompts]
    detector = dict(threshold=THRESHOLD, min_tokens=16, min_repeats=3)
    gen = generate_batch(micro["student"], tok, ids, [80, 80, 80], seed=0, detector_kwargs=detector)
    assert "loop" in gen.reason
    ends = [len(t) + (r == "eos") for t, r in zip(gen.tokens, gen.reason)]  # EOS takes a step too
    assert gen.steps == max(ends) and min(ends) < gen.steps <= 80
    assert gen.row_steps == sum(ends) < gen.padded_row_steps == 3 * gen.steps
    budgets = generate_batch(micro["teacher"], tok, ids, [5, 12, 8], do_sample=False)
    ends = [len(t) + (r == "eos") for t, r in zip(budgets.tokens, budgets.reason)]
    assert budgets.steps == max(ends) <= 12 and budgets.row_steps == sum(ends) < 3 * budgets.steps
    # a budget of 0 ends the row before it starts; an all-zero batch runs no forward pass
    zero = generate_batch(micro["teacher"], tok, ids[:2], [0, 4], do_sample=False)
    assert zero.tokens[0] == [] and zero.reason[0] == "budget" and zero.row_steps == zero.steps == len(zero.tokens[1])
    none = generate_batch(micro["teacher"], tok, ids[:2], [0, 0], do_sample=False)
    assert none.steps == none.row_steps == 0 and none.tokens == [[], []]


@pytest.fixture(scope="module")
def mha_gqa(micro):
    """Two briefly trained 2-layer LLaMAs on the micro tokenizer: MHA (4/4 heads) and GQA (4/2)."""
    from transformers import LlamaForCausalLM

    from axolotl_focus.micro import corpus_documents, llama_config, pretrain

    models = {}
    for name, kv in (("mha", 4), ("gqa", 2)):
        torch.manual_seed(7)
        model = LlamaForCausalLM(llama_config(micro["tokenizer"], layers=2, heads=4, kv_heads=kv))
        pretrain(model, micro["tokenizer"], corpus_documents("valid")[:200], steps=40, batch=8, seed=3, progress=False)
        models[name] = model.eval()
    return models


def _prompt_ids(micro, lengths) -> list[list[int]]:
    tok = micro["tokenizer"]
    docs = [p.text for p in micro["prompts"]]
    return [tok(d)["input_ids"][:n] for d, n in zip(docs, lengths)]


@pytest.mark.parametrize("arch", ["mha", "gqa"])
def test_greedy_matches_hf_generate(micro, mha_gqa, arch):
    """Greedy decoding of the shrinking loop equals HF generate(do_sample=False) token for token,
    batched, with prompts of different lengths (left padding) and rows leaving the batch early."""
    tok, model = micro["tokenizer"], mha_gqa[arch]
    prompts = _prompt_ids(micro, (3, 17, 9, 30, 1, 24))
    budgets = [40, 6, 25, 40, 13, 31]
    pad = tok.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    eos = tok.eos_token_id
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max(budgets),
                             pad_token_id=pad, eos_token_id=eos, repetition_penalty=1.0)[:, width:].tolist()
    gen = generate_batch(model, tok, prompts, budgets, do_sample=False)
    assert gen.row_steps < gen.padded_row_steps  # rows did leave the batch
    for row, (toks, reason, budget) in enumerate(zip(gen.tokens, gen.reason, budgets)):
        expected = ref[row][: len(toks) + (reason == "eos")]
        assert toks + [eos] * (reason == "eos") == expected, row
        assert reason == "eos" or (reason == "budget" and len(toks) == budget)
    # the same rows one at a time, and with ended rows kept as padding (as HF does)
    assert [generate_batch(model, tok, [p], [b], do_sample=False).tokens[0]
            for p, b in zip(prompts, budgets)] == gen.tokens
    padded = generate_batch(model, tok, prompts, budgets, do_sample=False, shrink=False)
    assert padded.tokens == gen.tokens and padded.reason == gen.reason and padded.steps == gen.steps
    assert padded.row_steps == padded.padded_row_steps == gen.padded_row_steps


@pytest.mark.parametrize("arch", ["mha", "gqa"])
def test_sampled_row_does_not_depend_on_its_batch(micro, mha_gqa, arch):
    """With fixed row seeds a row's sample is the same alone, in a batch, in another batch order,
    and whether its neighbours stop early or not; the same call twice gives the same result."""
    tok, model = micro["tokenizer"], mha_gqa[arch]
    prompts = _prompt_ids(micro, (5, 21, 12, 30, 2))
    budgets = [30, 8, 30, 17, 30]
    seeds = [11, 22, 33, 44, 55]
    kw = dict(seed=5, top_p=0.9, temperature=1.3)
    batched = generate_batch(model, tok, prompts, budgets, row_seeds=seeds, **kw)
    assert batched.tokens == generate_batch(model, tok, prompts, budgets, row_seeds=seeds, **kw).tokens
    order = [3, 0, 4, 2, 1]
    shuffled = generate_batch(model, tok, [prompts[i] for i in order], [budgets[i] for i in order],
                              row_seeds=[seeds[i] for i in order], **kw)
    assert [shuffled.tokens[order.index(i)] for i in range(5)] == batched.tokens
    alone = [generate_batch(model, tok, [p], [b], row_seeds=[s], **kw).tokens[0]
             for p, b, s in zip(prompts, budgets, seeds)]
    assert alone == batched.tokens
    # a neighbour with another budget changes nothing for the others
    other = generate_batch(model, tok, prompts, [30, 30, 30, 2, 30], row_seeds=seeds, **kw)
    assert [other.tokens[i] for i in (0, 2, 4)] == [batched.tokens[i] for i in (0, 2, 4)]
    assert other.tokens[3] == batched.tokens[3][:2]
    # row seeds matter, the default ones are the row indices under the call's seed
    assert generate_batch(model, tok, prompts, budgets, row_seeds=[s + 1 for s in seeds], **kw).tokens != batched.tokens
    assert (generate_batch(model, tok, prompts, budgets, **kw).tokens
            == generate_batch(model, tok, prompts, budgets, row_seeds=range(5), **kw).tokens)
    # the global RNG is neither used nor disturbed
    torch.manual_seed(123)
    state = torch.get_rng_state()
    generate_batch(model, tok, prompts[:2], [4, 4], **kw)
    assert torch.equal(state, torch.get_rng_state())


def test_top_p_keeps_exactly_the_nucleus():
    """Over many draws from a fixed distribution: only nucleus tokens appear (HF's
    TopPLogitsWarper's set), with the renormalised probabilities; temperature applies first."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from axolotl_focus.generation import sample_top_p

    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])  # sorted: 0.4 0.3 0.15 | 0.1 0.05
    logits = probs.log()
    draws = 20000
    gens = [torch.Generator().manual_seed(i) for i in range(draws)]
    tokens = sample_top_p(logits.expand(draws, -1), gens, top_p=0.8, temperature=1.0)
    freq = torch.bincount(tokens, minlength=5).double() / draws
    hf_kept = torch.isfinite(TopPLogitsWarper(top_p=0.8)(None, logits[None].clone()))[0]
    assert hf_kept.tolist() == [False, True, False, True, True]
    assert freq[~hf_kept].sum() == 0
    expected = torch.where(hf_kept, probs, 0) / probs[hf_kept].sum()
    assert torch.allclose(freq, expected.double(), atol=0.015), freq
    # temperature 0.5 squares the probabilities: 0.16 0.09 0.0225 0.01 0.0025 (/0.285), top-p 0.8
    # keeps 0.561 + 0.316 (the mass above the third, 0.877, already reaches 0.8)
    tokens = sample_top_p(logits.expand(draws, -1), gens, top_p=0.8, temperature=0.5)
    freq = torch.bincount(tokens, minlength=5).double() / draws
    assert freq[[0, 2, 4]].sum() == 0 and abs(freq[1] - 0.16 / 0.25) < 0.015
    # the top token is always kept, even when alone above top_p; top_p = 1 keeps everything
    assert set(sample_top_p(logits.expand(200, -1), gens[:200], top_p=0.2, temperature=1.0).tolist()) == {1}
    every = sample_top_p(logits.expand(draws, -1), gens, top_p=1.0, temperature=1.0)
    assert torch.allclose(torch.bincount(every, minlength=5).double() / draws, probs.double(), atol=0.015)
    # a flat distribution over 3000 tokens: the nucleus (about 2700 tokens) is larger than the
    # first candidate set; still exactly HF's set
    wide = torch.randn(1, 3000, generator=torch.Generator().manual_seed(0)) * 0.3
    hf_kept = torch.isfinite(TopPLogitsWarper(top_p=0.9)(None, wide.clone()))[0]
    assert 2000 < int(hf_kept.sum()) < 3000
    got = sample_top_p(wide.expand(2000, -1), gens[:2000], top_p=0.9, temperature=1.0)
    assert hf_kept[got].all() and len(set(got.tolist())) > 1000
    # a row's draw depends on its own generator only
    a = sample_top_p(logits.expand(3, -1), [torch.Generator().manual_seed(s) for s in (1, 2, 3)], top_p=0.9,
                     temperature=1.0)
    b = sample_top_p(logits.expand(1, -1), [torch.Generator().manual_seed(2)], top_p=0.9, temperature=1.0)
    assert a[1] == b[0]


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
    # steps are per batch: the batch runs until its longest row has ended
    assert summary.student_batches == 2
    assert summary.student_steps + summary.student_steps_skipped == 2 * cfg.max_new_tokens
    assert summary.student_steps * cfg.batch_size >= summary.student_tokens
    # a batch skips a step only once all its rows have ended, so skipped steps x rows <= unused budget
    assert 0 <= summary.student_steps_skipped * cfg.batch_size <= 8 * cfg.max_new_tokens - summary.student_tokens
    # ended rows leave the batch: each row costs its own steps (tokens, + 1 for an EOS)
    eos_rows = summary.student_row_steps - summary.student_tokens
    assert 0 <= eos_rows <= 8 and summary.student_row_steps < summary.student_row_steps_padded
    assert summary.student_row_steps_padded == cfg.batch_size * summary.student_steps
    saved_file = json.loads(open(cfg.output + ".summary.json").read())
    assert saved_file["pairs_kept"] == len(rows)
    for key in ("tokens_not_generated", "student_steps", "student_steps_skipped", "student_row_steps",
                "student_row_steps_padded"):
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


def test_resumed_run_writes_the_pairs_of_an_uninterrupted_run(micro, tmp_path, monkeypatch):
    """Seeds depend on (seed, source id) only: a run killed after its first batch and resumed, a
    run stopped by its target and resumed with a higher one, and a run with another batch size
    write the very pairs (and state rows) of one uninterrupted run."""
    import axolotl_focus.mine.run as mining

    tok, prompts = micro["tokenizer"], micro["prompts"][:12]
    models = (micro["student"], micro["teacher"], tok, prompts)

    def files(cfg):
        return open(cfg.output, encoding="utf-8").read(), open(cfg.output + ".state", encoding="utf-8").read()

    whole = _cfg(tmp_path / "whole", target_pairs=7)
    summary = mine_pairs(*models, whole)
    assert 3 < summary.pairs_total == 7 and summary.prompts_tried >= 8

    killed = _cfg(tmp_path / "killed", target_pairs=7)
    real, calls = mining._teacher_pass, []

    def crash_in_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed in the second batch")
        return real(*args, **kwargs)

    monkeypatch.setattr(mining, "_teacher_pass", crash_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        mine_pairs(*models, killed)
    monkeypatch.setattr(mining, "_teacher_pass", real)
    first = len(_rows(killed.output)) + len(_state(killed.output))
    assert first == killed.batch_size  # the first batch only
    resumed = mine_pairs(*models, killed)
    assert resumed.prompts_skipped_resume == first
    assert files(killed) == files(whole)

    stopped = _cfg(tmp_path / "stopped", target_pairs=2)
    mine_pairs(*models, stopped)
    mine_pairs(*models, replace(stopped, target_pairs=7))
    assert files(stopped) == files(whole)

    other_batch = _cfg(tmp_path / "batch3", target_pairs=7, batch_size=3)
    mine_pairs(*models, other_batch)
    assert files(other_batch) == files(whole)


def test_teacher_temperature(micro, tmp_path):
    """The positives are sampled at teacher_temperature (recorded in the rows and the summary);
    the student's samples do not change with it."""
    tok, prompts = micro["tokenizer"], micro["prompts"][:4]
    base = mine_pairs(micro["student"], micro["teacher"], tok, prompts, _cfg(tmp_path / "a"))
    hot_cfg = _cfg(tmp_path / "b", teacher_temperature=2.5)
    hot = mine_pairs(micro["student"], micro["teacher"], tok, prompts, hot_cfg)
    rows_base, rows_hot = _rows(_cfg(tmp_path / "a").output), _rows(hot_cfg.output)
    assert base.settings["teacher_temperature"] == 1.0 and hot.settings["teacher_temperature"] == 2.5
    saved = json.loads(open(hot_cfg.output + ".summary.json").read())
    assert saved["settings"]["teacher_temperature"] == 2.5 and saved["settings"]["temperature"] == 1.0
    assert all(r["teacher_temperature"] == 2.5 and r["temperature"] == 1.0 and r["top_p"] == 0.9 for r in rows_hot)
    assert all(r["teacher_temperature"] == 1.0 for r in rows_base)
    common = {r["source_id"] for r in rows_base} & {r["source_id"] for r in rows_hot}
    assert common
    by_id = {r["source_id"]: r for r in rows_base}
    for row in rows_hot:
        if row["source_id"] in common:
            old = by_id[row["source_id"]]
            assert (row["prompt_tokens"], row["rejected_tokens"]) == (old["prompt_tokens"], old["rejected_tokens"])
    assert any(by_id[r["source_id"]]["chosen_tokens"] != r["chosen_tokens"]
               for r in rows_hot if r["source_id"] in common)
    assert MiningConfig(teacher_temperature=None, temperature=0.7).positive_temperature == 0.7
    from axolotl_focus.cli import build_parser

    args = build_parser().parse_args(["pairs", "--teacher-temperature", "1.5", "--temperature", "0.7"])
    assert (args.teacher_temperature, args.temperature) == (1.5, 0.7)


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


def test_changed_settings_are_refused_and_restart_starts_over(micro, tmp_path, caplog):
    """The output's .run.json records what decides its pairs: a rerun with the same settings
    resumes and changes no file; other settings (sampling, models, prompt reading) are refused
    with one line naming each, every file left byte-identical; --restart removes the output's
    files (leftover shards too) and mines anew."""
    models = (micro["student"], micro["teacher"], micro["tokenizer"], micro["prompts"][:8])
    cfg = _cfg(tmp_path, target_pairs=2)
    mine_pairs(*models, cfg)
    record = json.loads((tmp_path / "pairs.jsonl.run.json").read_text())
    assert record == cfg.run_record("student", "teacher", 384)
    assert {k: record[k] for k in ("mode", "id_field", "temperature", "teacher_temperature")} == dict(
        mode="open_ended", id_field=None, temperature=1.0, teacher_temperature=1.0)
    before = _files(tmp_path, summary=False)
    assert mine_pairs(*models, cfg).prompts_tried == 0 and _files(tmp_path, summary=False) == before

    before = _files(tmp_path)
    for change, was, now in (
        (dict(temperature=0.7), "temperature=1.0, teacher_temperature=1.0", "temperature=0.7, teacher_temperature=0.7"),
        (dict(student="other", teacher_temperature=1.0), "student=student", "student=other"),
        (dict(id_field="id", max_prompts=3, target_pairs=5), "id_field=None", "id_field=id"),  # not in the record
    ):
        with pytest.raises(ValueError) as err:
            mine_pairs(*models, replace(cfg, **change))
        assert str(err.value) == (f"output: {cfg.output} was made with {was} (now {now}): another job; rerun with "
                                  "--restart to start it over, or pick another --output")
        assert _files(tmp_path) == before

    (tmp_path / "pairs.rank1.jsonl").write_text(json.dumps({"source_id": "x", "temperature": 1.0}) + "\n")
    with caplog.at_level("WARNING", logger="axolotl_focus.mine"):
        summary = mine_pairs(*models, replace(cfg, temperature=0.7, restart=True))
    assert "restart: removed" in caplog.text and "pairs.rank1.jsonl" in caplog.text
    rows = _rows(cfg.output)
    assert summary.pairs_total == len(rows) == 2 and {r["temperature"] for r in rows} == {0.7}
    assert summary.prompts_skipped_resume == 0 and not list(tmp_path.glob("pairs.rank*"))
    assert json.loads((tmp_path / "pairs.jsonl.run.json").read_text())["temperature"] == 0.7


def test_output_of_an_older_version_is_checked_by_its_first_row(micro, tmp_path):
    """Without .run.json (older versions) the settings the first pair row records are compared;
    a start that agrees writes the record. No generation: the target is already reached."""
    models = (micro["student"], micro["teacher"], micro["tokenizer"], micro["prompts"][:4])
    cfg = _cfg(tmp_path, target_pairs=1)
    row = dict(prompt="p", chosen="c", rejected="r", source_id="doc-9", student="student", teacher="teacher",
               seed=0, top_p=0.9, temperature=1.0, teacher_temperature=1.0)
    (tmp_path / "pairs.jsonl").write_text(json.dumps(row) + "\n")
    before = _files(tmp_path)
    message = ("was made with teacher_temperature=1.0, seed=0 (now teacher_temperature=1.5, seed=3): another job; "
               "rerun with")
    with pytest.raises(ValueError, match=re.escape(message)):
        mine_pairs(*models, replace(cfg, seed=3, teacher_temperature=1.5))
    assert _files(tmp_path) == before
    assert mine_pairs(*models, cfg).prompts_tried == 0
    assert json.loads((tmp_path / "pairs.jsonl.run.json").read_text()) == cfg.run_record("student", "teacher", 384)
    assert (tmp_path / "pairs.jsonl").read_bytes() == before["pairs.jsonl"]


@pytest.mark.parametrize("content,why", [
    ("some notes\nmore notes\n", "invalid JSON: Expecting value: line 1 column 1 (char 0)"),
    ('{"text": "a prompt", "id": 1}\n', "not a JSON object with a source_id"),
    ("[1, 2]\n", "not a JSON object with a source_id"),
    ("notes without a newline", "invalid JSON: Expecting value: line 1 column 1 (char 0)"),
])
def test_output_that_is_not_a_pairs_file_is_refused(micro, tmp_path, content, why):
    """Never appended to, nor removed by --restart; the message names the file and line."""
    out = tmp_path / "pairs.jsonl"
    out.write_text("\n" + content)
    for restart in (False, True):
        with pytest.raises(ValueError) as err:
            mine_pairs(micro["student"], micro["teacher"], micro["tokenizer"], [], _cfg(tmp_path, restart=restart))
        assert str(err.value) == (f"output: {out}:2 is not a RePAIR pairs file written by axolotl-focus pairs "
                                  f"({why}); refusing to append to it - pick another --output")
        assert _files(tmp_path) == {"pairs.jsonl": ("\n" + content).encode()}


def test_bad_line_in_a_pairs_file_names_it(micro, tmp_path):
    """A broken line inside a pairs file names path:line; a partial (first and last) line is
    still the trace of a kill mid-write and is dropped."""
    models = (micro["student"], micro["teacher"], micro["tokenizer"], [])
    out = tmp_path / "pairs.jsonl"
    out.write_text(json.dumps({"source_id": "a"}) + "\n{oops\n" + json.dumps({"source_id": "b"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"output: {out}:2 is not a pairs row (invalid JSON: ")):
        mine_pairs(*models, _cfg(tmp_path))
    out.write_text('{"prompt": "The cemetery is designed to be a pea')
    assert mine_pairs(*models, _cfg(tmp_path)).pairs_total == 0 and out.read_text() == ""


def test_teacher_with_another_vocabulary_fails_before_loading_weights(micro, tmp_path, no_weights):
    """Compared from tokenizer files and configs: a teacher whose tokenizer has the student's
    length and whose embeddings have the student's size, but other token ids, is refused before
    any weights are loaded or any file written; so is one with another vocabulary size."""
    from transformers import LlamaForCausalLM

    from axolotl_focus.micro import build_tokenizer, corpus_documents, llama_config

    out = tmp_path / "out" / "pairs.jsonl"
    for docs, size, problem in (
        (corpus_documents("valid")[300:600], 384, "token ids of "),
        (corpus_documents("valid")[:300], 320, "vocabulary size / lm_head rows: student 384, teacher 320"),
    ):
        tok = build_tokenizer(docs, vocab_size=size)
        assert len(tok) == size
        folder = tmp_path / f"teacher_{size}"
        model = LlamaForCausalLM(llama_config(tok, layers=1, hidden=16, heads=2, kv_heads=2, intermediate=32))
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        cfg = MiningConfig(prompts=micro["prompts_file"], id_field="id", student=micro["student_path"],
                           teacher=str(folder), output=str(out), progress=False)
        with pytest.raises(ValueError, match=re.escape(f"teacher: {folder}: does not share the student's "
                                                       f"vocabulary ({problem}")) as err:
            run_mining(cfg)
        assert "\n" not in str(err.value) and "focus_distill" not in str(err.value)
    assert not out.parent.exists()


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
    record = json.loads(open(cfg.output + ".run.json").read())
    assert record == cfg.run_record(micro["student_path"], micro["teacher_path"], 384)

    # the same settings again: resumed (target reached: nothing tried), every file kept as it was
    folder = tmp_path / "out"
    before = _files(folder, summary=False)
    assert run_mining(cfg).prompts_tried == 0 and _files(folder, summary=False) == before
    # --restart starts the output over (here with another temperature)
    summary = run_mining(replace(cfg, temperature=0.8, restart=True))
    rows = _rows(cfg.output)
    assert summary.pairs_total == len(rows) == 2 and {r["temperature"] for r in rows} == {0.8}
    assert json.loads(open(cfg.output + ".run.json").read())["temperature"] == 0.8


def test_run_mining_refuses_other_settings_before_loading_weights(micro, tmp_path, no_weights):
    """Settings that differ from the output's record stop run_mining before any weights are
    loaded, with one line naming every differing setting; no file changes."""
    cfg = MiningConfig(prompts=micro["prompts_file"], id_field="id", student=micro["student_path"],
                       output=str(tmp_path / "pairs.jsonl"), progress=False)
    record = cfg.run_record(micro["student_path"], micro["teacher_path"], 384)
    (tmp_path / "pairs.jsonl.run.json").write_text(json.dumps(record))
    (tmp_path / "pairs.jsonl.state").write_text(json.dumps({"source_id": "doc-0", "status": "dropped"}) + "\n")
    before = _files(tmp_path)
    with pytest.raises(ValueError) as err:
        run_mining(replace(cfg, temperature=0.7, top_p=0.95))
    assert str(err.value) == (  # the positives' temperature follows the student's (no teacher_temperature)
        f"output: {cfg.output} was made with top_p=0.9, temperature=1.0, teacher_temperature=1.0 (now top_p=0.95, "
        "temperature=0.7, teacher_temperature=0.7): another job; rerun with --restart to start it over, or pick "
        "another --output")
    assert _files(tmp_path) == before


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
        "import json, sys\nfrom axolotl_focus.mine.config import MiningConfig\n"
        "from axolotl_focus.mine.run import run_mining\n"
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
