"""`axolotl-focus eval`: the pipeline on tiny local models (a looping 2-layer student and its teacher,
from conftest), hand-checked perplexity and distribution-study numbers, the Markdown report,
saved-generation reuse, and the messages when an extra or a model is missing. Offline."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from axolotl_focus import evaluate as ev
from axolotl_focus import sources
from axolotl_focus.degeneration import crep, ead, rep_n, rep_ns, serving_degeneration
from axolotl_focus.evaluate import (
    EvalConfig,
    distribution_stats,
    distribution_study,
    evaluate_models,
    focus_params_of,
    load_instructions,
    markdown_report,
    open_ended_items,
    perplexity,
    reweighted,
    top_p_mask,
    toy_zipf,
)
from axolotl_focus.evaluate import data as ev_data
from axolotl_focus.evaluate import models as ev_models
from axolotl_focus.evaluate import runner as ev_runner
from axolotl_focus.sources import Prompt
from axolotl_focus.train.losses import focus_weights

HAS = {m: importlib.util.find_spec(m) is not None for m in ("mauve", "bert_score", "matplotlib", "lm_eval")}
EXTRA = "axolotl-focus[eval]"
OPEN_NEW, INSTR_NEW = 40, 20  # new tokens: open-ended (2+ copies of the student's 16-token loop), instruction


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def micro(one_thread, looping_micro):
    return looping_micro


@pytest.fixture(scope="module")
def featurizers(tmp_path_factory, micro):
    """A tiny GPT-2 (MAUVE features, the micro tokenizer) and a tiny BERT with a WordPiece vocab."""
    from transformers import BertConfig, BertModel, BertTokenizer, GPT2Config, GPT2Model

    root = tmp_path_factory.mktemp("featurizers")
    tok = micro["tokenizer"]
    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=256,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    gpt2.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    words = sorted({w.lower() for d in micro["prompts"] for w in d.text.split() if w.isalpha()})[:300]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,'-")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + words
    (root / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    bert_tok = BertTokenizer(str(root / "vocab.txt"), model_max_length=128)
    bert = BertModel(BertConfig(vocab_size=bert_tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    bert.save_pretrained(root / "bert")
    bert_tok.save_pretrained(root / "bert")
    return {"gpt2": str(root / "gpt2"), "bert": str(root / "bert")}


def _instructions(path: Path) -> str:
    rows = [
        {"id": "t0", "instruction": "Rewrite the sentence more simply.",
         "instances": [{"input": "The game was released in the first year.", "output": "The game came out early."}]},
        {"id": "t1", "instruction": "Name two rivers in the state.",
         "instances": [{"input": "", "output": "The Ohio and the Miami."},
                       {"input": "Answer briefly.", "output": "Ohio, Miami."}]},
        {"id": "t2", "instruction": "Describe the church.",
         "instances": [{"input": "", "output": "It is old and large."}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(out, micro, featurizers, **kw) -> EvalConfig:
    base = dict(
        output_dir=str(out), metrics=("ppl", "repetition", "serving", "mauve", "bertscore", "distribution"),
        seeds=(0, 1), num_documents=8, prefix_tokens=16, max_new_tokens=OPEN_NEW, batch_size=4,
        instructions=_instructions(Path(out).parent / "instr.jsonl"), instruction_max_new_tokens=INSTR_NEW,
        ppl_window=64, ppl_stride=32, ppl_max_tokens=300, distribution_samples=4,
        mauve_featurizer=featurizers["gpt2"], mauve_seeds=(1, 2), bertscore_model=featurizers["bert"],
        bertscore_layer=2, bertscore_rescale=False, progress=False,
        focus_params={"teacher": (0.0, 0.0), "student": (15.0, 1.0)},
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    return EvalConfig(**(base | kw))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, micro, featurizers):
    out = tmp_path_factory.mktemp("eval") / "out"
    cfg = _cfg(out, micro, featurizers)
    models = {"teacher": micro["teacher_path"], "student": micro["student_path"]}
    return cfg, models, evaluate_models(models, cfg)


def _generations(out, model, task, label):
    with open(Path(out) / model / "generations" / f"{task}.{label}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# --------------------------------------------------------------------------------------------
# Pipeline: metrics equal the degeneration.py functions on the saved generations
# --------------------------------------------------------------------------------------------


def test_repetition_metrics_equal_degeneration_functions(evaluated, micro):
    cfg, _, results = evaluated
    vocab = len(micro["tokenizer"])
    for res in results:
        for task in ("open_ended", "instruction"):
            block, budget = res[task], OPEN_NEW if task == "open_ended" else INSTR_NEW
            assert set(block["decodings"]) == {"top_p0.9", "greedy"}
            for key, dec in block["decodings"].items():
                assert set(dec["seeds"]) == ({"0", "1"} if key != "greedy" else {"greedy"})
                for seed, m in dec["seeds"].items():
                    label = key if seed == "greedy" else f"{key}.seed{seed}"
                    toks = [r["tokens"] for r in _generations(cfg.output_dir, res["model"], task, label)]
                    assert len(toks) == block["prompts"] and all(len(t) <= budget for t in toks)
                    assert m["crep"] == crep(toks, 0.3)
                    for n in (3, 4, 5, 6):
                        assert m[f"rep-{n}"] == rep_n(toks, n)
                    assert m["ead"] == ead(toks, vocab)
                    serving = serving_degeneration(toks, budget)
                    assert (m["serving_rate"], m["serving_token_share"]) == (serving.rate_pct, serving.token_share_pct)
                for metric, value in dec["mean"].items():
                    assert value == pytest.approx(statistics.mean(s[metric] for s in dec["seeds"].values()))
    # the looping student degenerates, the teacher much less
    crep_of = {r["model"]: r["open_ended"]["decodings"]["top_p0.9"]["mean"]["crep"] for r in results}
    assert crep_of["student"] > crep_of["teacher"]


def test_human_reference_row(evaluated, micro):
    cfg, _, results = evaluated
    tok = micro["tokenizer"]
    rows = _generations(cfg.output_dir, "student", "open_ended", "greedy")
    for row in rows:  # the reference is the document's next max_new_tokens tokens after the prefix
        assert len(row["reference_tokens"]) == OPEN_NEW and row["prompt_tokens"][0] == tok.bos_token_id
    ref = results[1]["open_ended"]["reference"]
    assert {f"rep-{n}": v for n, v in rep_ns([r["reference_tokens"] for r in rows]).items()} == {
        k: ref[k] for k in ("rep-3", "rep-4", "rep-5", "rep-6")}


def test_human_row_of_the_embedded_corpus_is_sane(micro):
    """Sanity anchor: human text repeats little. The embedded WikiText-2 test slice (50-token prefix,
    100-token references) gives, with the micro tokenizer (vocab 384), 3.45 / 2.00 / 1.16 / 0.67
    (286 documents); the paper's WikiText-103 row is 2.62 / 1.10 / 0.52 / 0.24 (LLaMA tokens)."""
    from axolotl_focus.micro import corpus_documents

    docs = [Prompt(str(i), d) for i, d in enumerate(corpus_documents("test"))]
    items = open_ended_items(micro["tokenizer"], docs, 50, 100, num=1000)
    refs = [it["reference_tokens"] for it in items]
    reps = rep_ns(refs)
    assert len(items) == 286 and crep(refs) == 0.0
    assert [round(reps[n], 2) for n in (3, 4, 5, 6)] == [3.45, 2.00, 1.16, 0.67]


def test_results_json_fields(evaluated, micro):
    cfg, models, results = evaluated
    for res in results:
        saved = json.loads((Path(cfg.output_dir) / res["model"] / "results.json").read_text())
        assert saved == json.loads(json.dumps(res))
        assert saved["path"] == models[res["model"]]
        assert saved["versions"]["torch"] == torch.__version__ and saved["versions"]["transformers"]
        assert saved["settings"]["seeds"] == [0, 1] and saved["settings"]["top_p"] == 0.9
        assert saved["ead_vocab_size"] == len(micro["tokenizer"])
        ppl = saved["perplexity"]
        assert (ppl["window"], ppl["stride"], ppl["tokens"]) == (64, 32, 300) and ppl["scored"] == 299
        assert math.isfinite(ppl["ppl"]) and ppl["data"] == "embedded:wikitext-2/test"
        assert saved["open_ended"]["prompts"] == 8 and saved["open_ended"]["prefix_tokens"] == 16
        assert saved["instruction"]["prompts"] == 4  # t1 has two instances
        for key in ("mauve", "bertscore"):
            if not HAS["mauve" if key == "mauve" else "bert_score"]:
                assert EXTRA in saved["unavailable"][key]
        if HAS["mauve"]:
            m = saved["open_ended"]["decodings"]["top_p0.9"]["seeds"]["0"]
            assert 0 < m["mauve"] <= 1 and m["mauve"] == pytest.approx(statistics.mean(m["mauve_values"]))
        if HAS["bert_score"]:
            assert -1 <= saved["instruction"]["decodings"]["greedy"]["mean"]["bertscore"] <= 1
            assert saved["bertscore_settings"]["bertscore_rescaled"] is False
    teacher, student = results
    assert "is the teacher" in teacher["unavailable"]["distribution"]
    dist = student["distribution"]
    assert dist["samples"] == 4 and dist["positions"] > 0 and dist["teacher"] == models["teacher"]
    for key in ("ar_head", "ar_tail"):
        assert 0 <= dist[key] <= 1
    assert dist["count_head"] >= 1 and len(dist["teacher_examples"]) == 3


def test_reuse_saved_generations_without_loading_models(evaluated, monkeypatch):
    cfg, models, results = evaluated

    def boom(*args, **kwargs):
        raise AssertionError("must not generate nor load a model")

    monkeypatch.setattr(ev_runner, "generate_batch", boom)
    monkeypatch.setattr(ev_models, "load_model", boom)
    again = evaluate_models(models, cfg)
    for old, new in zip(results, again):
        for key in ("perplexity", "open_ended", "instruction", "distribution", "unavailable"):
            assert new.get(key) == json.loads(json.dumps(old.get(key))), key
    # --metrics-only with settings that match no saved generations: reported, nothing generated
    other = evaluate_models(
        models, replace(cfg, max_new_tokens=OPEN_NEW + 1, metrics=("repetition",), metrics_only=True))
    assert "--metrics-only" in other[1]["unavailable"]["open_ended.greedy"]
    assert other[1]["open_ended"]["decodings"] == {}
    assert other[1]["instruction"]["decodings"]["greedy"]  # instruction budget unchanged: reused


# --------------------------------------------------------------------------------------------
# Perplexity and the distribution study, by hand
# --------------------------------------------------------------------------------------------


def test_perplexity_sliding_window_by_hand(micro):
    model, tok = micro["teacher"], micro["tokenizer"]
    ids = tok(micro["prompts"][0].text, add_special_tokens=False)["input_ids"][:50]
    with torch.no_grad():
        # stride == window: plain chunked NLL (each chunk predicts its tokens 1..len-1)
        total, count = 0.0, 0
        for b in range(0, len(ids), 16):
            chunk = torch.tensor([ids[b : b + 16]])
            if chunk.shape[1] > 1:
                total += model(input_ids=chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
                count += chunk.shape[1] - 1
        got = perplexity(model, tok, ids, window=16, stride=16)
        assert got["scored"] == count == 50 - 4
        assert got["nll"] == pytest.approx(total / count, rel=1e-5)
        assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
        # stride < window: token t is predicted from the window k*8 (the earliest one reaching past t)
        nll = 0.0
        for t in range(1, len(ids)):
            begin = max(0, math.ceil((t - 16 + 1) / 8)) * 8
            logits = model(input_ids=torch.tensor([ids[begin:t]])).logits[0, -1]
            nll -= torch.log_softmax(logits.float(), -1)[ids[t]].item()
        got = perplexity(model, tok, ids, window=16, stride=8)
        assert got["scored"] == len(ids) - 1 and got["nll"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
        # one window covering everything: the model's own loss; a string gets BOS first
        x = torch.tensor([ids])
        assert perplexity(model, tok, ids, window=64, stride=32)["nll"] == pytest.approx(
            model(input_ids=x, labels=x).loss.item(), rel=1e-5)
        assert (perplexity(model, tok, tok.decode(ids), window=64, stride=64)["tokens"]
                == len(tok(tok.decode(ids))["input_ids"]))
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, ids, window=8, stride=16)


def test_distribution_stats_hand_made():
    q = torch.tensor([[0.5, 0.25, 0.15, 0.06, 0.04], [0.95, 0.03, 0.02, 0.0, 0.0]])
    p = torch.tensor([[0.3, 0.4, 0.05, 0.2, 0.05], [0.95, 0.03, 0.02, 0.0, 0.0]])
    # row 0: H_q = {0, 1, 2} (0.5 + 0.25 + 0.15 reaches 0.9), T_q = {3, 4}; H_p = {1, 0, 3}, T_p = {2, 4}
    assert top_p_mask(q, 0.9).tolist() == [[True, True, True, False, False], [True, False, False, False, False]]
    assert top_p_mask(p[:1], 0.9).tolist() == [[True, True, False, True, False]]
    s = distribution_stats(q, p, 0.9)
    assert s["ar_head"].tolist() == pytest.approx([2 / 3, 1.0])
    assert s["ar_tail"].tolist() == pytest.approx([1 / 2, 1.0])
    assert s["cor_head"][0].item() == pytest.approx(statistics.correlation([0.5, 0.25, 0.15], [0.3, 0.4, 0.05]))
    assert s["cor_tail"][0].item() == pytest.approx(1.0)  # two points, same order
    assert math.isnan(s["cor_head"][1].item())  # a one-token head has no correlation
    assert s["cor_tail"][1].item() == pytest.approx(1.0)
    assert s["count_head"].tolist() == [3, 1] and s["count_head_teacher"].tolist() == [3, 1]
    assert top_p_mask(torch.tensor([[0.1, 0.5, 0.4]]), 0.9).tolist() == [[False, True, True]]  # exact 0.9


def test_distribution_study_of_a_model_with_itself(micro):
    tok, teacher = micro["tokenizer"], micro["teacher"]
    items = open_ended_items(tok, micro["prompts"], 16, 12, num=3)
    samples = [{"prompt_tokens": it["prompt_tokens"], "tokens": it["reference_tokens"]} for it in items]
    got = distribution_study(teacher, teacher, samples, 0.9, batch_size=2, chunk=7)
    assert got["positions"] == 3 * 12 and got["samples"] == 3
    for key in ("ar_head", "ar_tail", "cor_head", "cor_tail"):
        assert got[key] == pytest.approx(1.0)
    assert got["count_head"] == pytest.approx(got["count_head_teacher"])
    other = distribution_study(teacher, micro["student"], samples, 0.9)
    assert other["ar_head"] < 1 and other["count_head"] != got["count_head"]


# --------------------------------------------------------------------------------------------
# Report, plots, FOCUS reweighting
# --------------------------------------------------------------------------------------------


def _row(md: str, title: str, label: str) -> list[str]:
    section = md.split(f"### {title}")[1].split("###")[0]
    line = next(row for row in section.splitlines() if row.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_markdown_table_bolds_best_with_direction():
    def result(name, ppl, crep_, mauve, rep3, zs):
        mean = {"crep": crep_, "mauve": mauve, "rep-3": rep3, "rep-4": 1.0, "rep-5": 0.5, "rep-6": 0.25,
                "ead": 0.3, "serving_rate": 0.0, "serving_token_share": 0.0}
        return {"model": name, "settings": EvalConfig().__dict__ | {"seeds": [0]}, "ead_vocab_size": 10,
                "perplexity": {"ppl": ppl, "window": 8, "stride": 4, "scored": 9, "data": "x"},
                "zero_shot": {"tasks": {}, "average": zs},
                "open_ended": {"reference": {"crep": 0.0, "rep-3": 0.1}, "decodings": {"top_p0.9": {"mean": mean}}}}

    md = markdown_report([result("KD", 21.69, 7.3, 0.61, 13.28, 60.39),
                          result("FOCUS", 22.32, 1.73, 0.64, 13.28, 61.0)])
    title = "Open-ended generation (Table 3): top_p0.9, mean over seeds [0]"
    header = next(row for row in md.split(f"### {title}")[1].splitlines() if row.startswith("| Method"))
    assert "PPL (↓)" in header and "0-shot (↑)" in header and "MAUVE (↑)" in header and "CREP (↓)" in header
    kd, focus = _row(md, title, "KD"), _row(md, title, "FOCUS")
    # columns: PPL, 0-shot, MAUVE, CREP, rep-3..6, serving rate, serving tokens
    assert kd[0] == "**21.69**" and focus[0] == "22.32"  # lower PPL wins
    assert kd[1] == "60.39" and focus[1] == "**61.00**"  # higher 0-shot wins
    assert kd[2] == "0.610" and focus[2] == "**0.640**"  # higher MAUVE wins
    assert kd[3] == "7.30" and focus[3] == "**1.73**"  # lower CREP wins
    assert kd[4] == focus[4] == "**13.28**"  # ties: both bold
    human = _row(md, title, "Reference (human)")
    assert human[3] == "0.00" and human[4] == "0.10" and human[2] == "-"  # never bold, missing = '-'
    assert "lower is better" in md and "higher is better" in md


def test_reweighting_and_toy_distribution():
    q = toy_zipf(50)
    assert q[:2].tolist() == pytest.approx([0.8, 0.1]) and q.sum().item() == pytest.approx(1.0)
    assert bool((q[2:-1] >= q[3:]).all())
    qt = reweighted(q, 15.0, 1.0)
    w = q**15 + (1 - q) ** 1
    assert qt.tolist() == pytest.approx((w * q / (w * q).sum()).tolist())
    assert torch.allclose(reweighted(q, 15.0, 1.0),
                          focus_weights(q, 15.0, 1.0) * q / (focus_weights(q, 15.0, 1.0) * q).sum())
    assert qt[0] < q[0] and qt[2:].sum() > q[2:].sum()  # smoothed head, raised tail (Figure 2a)
    assert bool((qt[:-1] >= qt[1:]).all())  # order preserved


def test_plots_written(evaluated, tmp_path):
    cfg, _, results = evaluated
    plots = Path(cfg.output_dir) / "plots"
    if not HAS["matplotlib"]:
        assert EXTRA in ev.make_plots(results, tmp_path)
        return
    for name in ("repetition", "focus_reweighting", "distribution", "focus_beta_gamma"):
        assert (plots / f"{name}.png").stat().st_size > 1000, name


def test_focus_params_of(tmp_path):
    assert focus_params_of("llama-focus-beta15-gamma0.5") == (15.0, 0.5)
    assert focus_params_of("FOCUS_beta_5") == (5.0, 1.0)
    assert focus_params_of("kd-baseline") is None
    assert focus_params_of("beta5", mapping={"beta5": (1, 2)}) == (1.0, 2.0)
    (tmp_path / "config.json").write_text(json.dumps({"focus_beta": 3, "focus_gamma": 2}))
    assert focus_params_of("x", str(tmp_path)) == (3.0, 2.0)


def test_focus_params_of_reads_the_training_record(tmp_path):
    """Sources in order: --focus-params, <path>/focus_training.json, <path>/../focus_training.json
    (a LoRA-merged model under <output_dir>/merged), config.json, the name."""
    run = tmp_path / "focus-run"
    merged = run / "merged"
    merged.mkdir(parents=True)
    record = {"focus_distill": "focus", "focus_beta": 15, "focus_gamma": 0.5, "focus_alpha": 0.5,
              "focus_temperature": 1.0}
    (merged / "config.json").write_text(json.dumps({"focus_beta": 3, "focus_gamma": 2}))
    assert focus_params_of("beta7", str(merged)) == (3.0, 2.0)  # config.json before the name
    (run / "focus_training.json").write_text(json.dumps(record))
    assert focus_params_of("beta7", str(merged)) == (15.0, 0.5)  # the output_dir's record of a merged model
    assert focus_params_of("beta7", str(run)) == (15.0, 0.5)  # the output_dir itself
    (merged / "focus_training.json").write_text(json.dumps(record | {"focus_beta": 5, "focus_gamma": None}))
    assert focus_params_of("beta7", str(merged)) == (5.0, 1.0)  # <path> first; no gamma: 1.0
    assert focus_params_of("beta7", str(merged), {"beta7": (2, 3)}) == (2.0, 3.0)  # --focus-params first
    for mode in ("kd", "none"):  # a KD / CE run has no FOCUS parameters, whatever its name says
        (merged / "focus_training.json").write_text(json.dumps(record | {"focus_distill": mode}))
        assert focus_params_of("beta7", str(merged)) is None
    (merged / "focus_training.json").write_text("{not json")  # unreadable: as if absent
    assert focus_params_of("beta7", str(merged)) == (15.0, 0.5)
    assert focus_params_of("beta7", str(tmp_path / "missing")) == (7.0, 1.0)


# --------------------------------------------------------------------------------------------
# Default data: WikiText-103 test from the hub, the embedded WikiText-2 slice offline
# --------------------------------------------------------------------------------------------


def _no_hub(*args, **kwargs):
    raise AssertionError("the hub must not be asked when offline")


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_default_data_is_the_embedded_slice_offline(monkeypatch, caplog, var):
    from axolotl_focus.micro import corpus_text

    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "1")
    monkeypatch.setattr(sources, "load_hub_dataset", _no_hub)
    with caplog.at_level("INFO", logger="axolotl_focus.evaluate"):
        docs, info = ev_data.load_documents(EvalConfig())
    assert info == {"source": "embedded:wikitext-2/test", "dataset": None, "config": None, "split": "test",
                    "fallback": f"{var} is set"}
    assert docs[0].source_id == "wikitext2-test-0" and len(docs) > 250
    assert var in caplog.text and "Salesforce/wikitext" in caplog.text
    text, ppl = ev_data.ppl_source(EvalConfig())
    assert ppl == info and text() == corpus_text("test")


def test_offline_source_is_recorded_in_results(evaluated):
    cfg, _, results = evaluated  # conftest sets HF_HUB_OFFLINE=1; results.json = results (test_results_json_fields)
    for saved in results:
        assert saved["data"]["open_ended"]["source"] == "embedded:wikitext-2/test"
        assert saved["data"]["open_ended"]["fallback"].endswith("is set")
        assert saved["data"]["ppl"]["source"] == saved["perplexity"]["data"] == "embedded:wikitext-2/test"
        assert saved["data"]["instruction"]["source"] == cfg.instructions and saved["processes"] == 1
    assert "Open-ended documents: embedded:wikitext-2/test (fallback: HF_" in markdown_report(results)


def test_default_data_comes_from_the_hub_when_online(micro, featurizers, tmp_path, monkeypatch):
    """Online (no offline variable): the default documents and PPL text are the rows of
    Salesforce/wikitext, wikitext-103-raw-v1, test (the loader is replaced: no network here)."""
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    calls = []
    texts = [" = Title = \n", ""] + [" " + p.text + "\n" for p in micro["prompts"][:4]]

    def fake_hub(name, config, split):
        calls.append((name, config, split))
        return {"text": texts}

    monkeypatch.setattr(sources, "load_hub_dataset", fake_hub)
    docs, info = ev_data.load_documents(EvalConfig())
    assert calls == [("Salesforce/wikitext", "wikitext-103-raw-v1", "test")]
    assert info == {"source": "hub:Salesforce/wikitext/wikitext-103-raw-v1/test", "dataset": "Salesforce/wikitext",
                    "config": "wikitext-103-raw-v1", "split": "test"}
    assert [d.source_id for d in docs] == ["0", "2", "3", "4", "5"] and docs[1].text == texts[2]  # as load_prompts
    text, ppl = ev_data.ppl_source(EvalConfig())
    assert ppl == info and text() == "\n\n".join(texts)
    # the whole run: loaded once, recorded in results.json
    calls.clear()
    cfg = _cfg(tmp_path / "out", micro, featurizers, tasks=("open_ended",), metrics=("ppl", "repetition"),
               decodings=("greedy",), num_documents=3, max_new_tokens=8, ppl_max_tokens=100)
    (res,) = evaluate_models({"student": micro["student_path"]}, cfg)
    assert len(calls) == 1 and res["open_ended"]["prompts"] == 3
    assert res["data"]["open_ended"] == res["data"]["ppl"] == info and res["perplexity"]["data"] == info["source"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "student" / "generations" /
                                          "open_ended.greedy.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]  # 3 of the 4 documents (data_seed), in corpus order
    assert len(set(ids)) == 3 and set(ids) <= {"2", "3", "4", "5"} and ids == sorted(ids)


def test_default_data_falls_back_when_the_hub_fails(monkeypatch, caplog):
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)

    def unreachable(name, config, split):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(sources, "load_hub_dataset", unreachable)
    with caplog.at_level("WARNING", logger="axolotl_focus.evaluate"):
        docs, info = ev_data.load_documents(EvalConfig())
    assert info["source"] == "embedded:wikitext-2/test" and docs[0].source_id == "wikitext2-test-0"
    assert info["fallback"] == "hub load failed (ConnectionError: Name or service not known)"
    warning = next(r for r in caplog.records if r.levelname == "WARNING")
    assert "Salesforce/wikitext" in warning.message and "wikitext-103-raw-v1" in warning.message
    assert "embedded WikiText-2" in warning.message


def test_explicit_sources_are_used_as_given(tmp_path, monkeypatch):
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(sources, "load_hub_dataset", _no_hub)
    for name in ("embedded", "embedded:wikitext-2/test"):  # the embedded slice, online too, no fallback note
        docs, info = ev_data.load_documents(EvalConfig(documents=name))
        assert info == {"source": "embedded:wikitext-2/test", "dataset": None, "config": None, "split": "test"}
        assert docs[0].source_id == "wikitext2-test-0"
        assert ev_data.ppl_source(EvalConfig(ppl_data=name))[1] == info
    (tmp_path / "docs.txt").write_text("first paragraph\n\nsecond paragraph\n")
    docs, info = ev_data.load_documents(EvalConfig(documents=str(tmp_path / "docs.txt")))
    assert [d.text for d in docs] == ["first paragraph", "second paragraph"]
    assert info == {"source": str(tmp_path / "docs.txt"), "config": None, "split": "test"}
    text, ppl = ev_data.ppl_source(EvalConfig(ppl_data=str(tmp_path / "docs.txt")))
    assert ppl["source"] == str(tmp_path / "docs.txt") and text().startswith("first paragraph")


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def test_load_instructions_and_open_ended_items(tmp_path, micro):
    path = _instructions(tmp_path / "i.jsonl")
    rows = load_instructions(path)
    assert [r["id"] for r in rows] == ["t0", "t1#0", "t1#1", "t2"]
    assert rows[0]["text"] == "Rewrite the sentence more simply.\n\nThe game was released in the first year."
    assert rows[1]["text"] == "Name two rivers in the state." and rows[2]["reference"] == "Ohio, Miami."
    flat = tmp_path / "flat.jsonl"
    flat.write_text(json.dumps({"prompt": "Hi?", "completion": "Hello."}) + "\n")
    assert load_instructions(str(flat)) == [{"id": "1", "text": "Hi?", "reference": "Hello."}]
    assert len(load_instructions(path, limit=2)) == 2

    tok = micro["tokenizer"]
    docs = [Prompt("short", "too short"), *micro["prompts"][:6]]
    items = open_ended_items(tok, docs, prefix_tokens=10, max_new_tokens=15, num=4, seed=3)
    assert len(items) == 4 and "short" not in {it["id"] for it in items}
    assert [it["id"] for it in items] == sorted((it["id"] for it in items),
                                                key=lambda i: [d.source_id for d in docs].index(i))
    assert items == open_ended_items(tok, docs, prefix_tokens=10, max_new_tokens=15, num=4, seed=3)
    for it in items:
        doc = next(d for d in docs if d.source_id == it["id"])
        assert it["reference_tokens"] == tok(doc.text, add_special_tokens=False)["input_ids"][10:25]


# --------------------------------------------------------------------------------------------
# Missing extras / models, CLI, validation
# --------------------------------------------------------------------------------------------


def test_missing_extras_are_reported_and_other_metrics_run(micro, featurizers, tmp_path, monkeypatch):
    for module in ("mauve", "bert_score", "lm_eval", "matplotlib"):
        monkeypatch.setitem(sys.modules, module, None)
    cfg = _cfg(tmp_path / "out", micro, featurizers, metrics=("repetition", "mauve", "bertscore", "zero_shot"),
               decodings=("greedy",), num_documents=3)
    (res,) = evaluate_models({"student": micro["student_path"]}, cfg)
    for key, package in (("mauve", "mauve-text"), ("bertscore", "bert-score"), ("zero_shot", "lm-eval")):
        assert package in res["unavailable"][key] and EXTRA in res["unavailable"][key]
    assert "crep" in res["open_ended"]["decodings"]["greedy"]["mean"]
    assert "bertscore" not in res["instruction"]["decodings"]["greedy"]["mean"]
    assert not (tmp_path / "out" / "plots").exists()
    assert "Unavailable" in (tmp_path / "out" / "results.md").read_text()
    assert EXTRA in ev.make_plots([res], tmp_path / "p")


def test_missing_models_name_the_option(micro, featurizers, tmp_path):
    cfg = _cfg(tmp_path / "out", micro, featurizers, metrics=("mauve", "bertscore", "distribution"),
               decodings=("greedy",), num_documents=2, mauve_featurizer="gpt2-large", bertscore_model="roberta-large",
               bertscore_layer=None)
    (res,) = evaluate_models({"student": micro["student_path"]}, replace(cfg, teacher=None))
    if HAS["mauve"]:
        assert "--mauve-featurizer" in res["unavailable"]["mauve"]
    if HAS["bert_score"]:
        assert "--bertscore-model" in res["unavailable"]["bertscore"]
    # the teacher defaults to the student's recorded focus_source_model
    assert res["distribution"]["teacher"] == micro["teacher_path"]


def test_zero_shot_missing_extra_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ev.MetricUnavailable, match=r"lm-eval.*pip install 'axolotl-focus\[eval\]'"):
        ev.zero_shot("/nonexistent", ["piqa"])


@pytest.mark.skipif(not HAS["lm_eval"], reason="lm-eval not installed")
def test_zero_shot_offline_message(micro, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ev.MetricUnavailable, match=r"zero-shot: lm-eval could not run.*run once online"):
        ev.zero_shot(micro["student_path"], ["piqa"], batch_size=1, limit=2)


def test_cli_metrics_only_and_bad_options(evaluated, capsys, micro):
    cfg, models, _ = evaluated
    parser = argparse.ArgumentParser()
    ev.add_eval_arguments(parser)
    argv = [f"{n}={p}" for n, p in models.items()] + [
        "--output-dir", cfg.output_dir, "--metrics", "ppl", "repetition", "serving", "distribution",
        "--seeds", "0", "1", "--num-documents", "8", "--prefix-tokens", "16", "--max-new-tokens", str(OPEN_NEW),
        "--batch-size", "4", "--instructions", cfg.instructions, "--instruction-max-new-tokens", str(INSTR_NEW),
        "--ppl-window", "64", "--ppl-stride", "32", "--ppl-max-tokens", "300", "--distribution-samples", "4",
        "--metrics-only", "--no-plots", "--no-progress", "--focus-params", "student=15,1"]
    args = parser.parse_args(argv)
    assert ev.config_from_args(args).focus_params == {"student": (15.0, 1.0)}
    assert ev.run_eval_cli(args) == 0
    out = capsys.readouterr().out
    assert "### Open-ended generation (Table 3): top_p0.9" in out and "| student |" in out
    saved = json.loads((Path(cfg.output_dir) / "student" / "results.json").read_text())
    assert "ppl" not in saved["unavailable"] and saved["distribution"]["positions"] > 0
    bad = parser.parse_args([micro["student_path"], "--ppl-window", "8", "--ppl-stride", "16", "--skip", "ppl"])
    assert ev.run_eval_cli(bad) == 2
    assert "ppl_stride" in capsys.readouterr().err


def test_validate_names_the_field():
    with pytest.raises(ValueError, match=r"^tasks: [^\n]*; top_p: "):  # one line, every field
        EvalConfig(tasks=("chat",), top_p=0.0).validate()
    with pytest.raises(ValueError, match=r"regenerate: contradicts"):
        EvalConfig(metrics_only=True, regenerate=True).validate()


def test_embedded_self_instruct_is_the_offline_default():
    from axolotl_focus.evaluate import embedded_instructions

    rows = load_instructions(embedded_instructions())
    assert len(rows) == 252 and all(r["text"] and r["reference"] for r in rows)


@pytest.mark.skipif(not HAS["lm_eval"], reason="lm-eval not installed")
def test_zero_shot_runs_lm_eval_on_a_pruned_checkpoint_offline(micro, tmp_path):
    """The real harness (HFLM + simple_evaluate) on a width-pruned checkpoint, with a local
    multiple-choice task in lm-eval's YAML format (the hub tasks cannot be fetched here)."""
    from axolotl_focus.prune.cache import run_prune
    from axolotl_focus.prune.settings import PruneSettings

    pruned = tmp_path / "pruned"
    run_prune(micro["teacher_path"], PruneSettings(ratio=0.5, attn_layers=[0, 2], mlp_layers=[0, 2],
                                                     calib_samples=2, device="cpu"), pruned)
    rows = [{"goal": f"The {w} is", "sol1": " a river .", "sol2": " the the the", "label": 0}
            for w in ("church", "state", "road", "album", "song", "city")]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(
        "task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{goal}}\"\ndoc_to_target: label\n"
        "doc_to_choice: \"{{[sol1, sol2]}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        "metadata:\n  version: 1.0\n")
    out = ev.zero_shot(str(pruned), ["local_mc"], batch_size=2, dtype="float32", include_path=str(tasks))
    acc = out["tasks"]["local_mc"]["acc"]
    assert 0.0 <= acc <= 1.0 and out["tasks"]["local_mc"]["value"] == pytest.approx(100 * acc)
