"""axolotl KD's offline top-k logprobs as a teacher cache (axolotl_focus.train.teacher_cache.kd_import)."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from test_plugin import tiny_config

from axolotl_focus.train.losses import IGNORE_INDEX
from axolotl_focus.train.teacher_cache.format import sequence_key, trained_positions
from axolotl_focus.train.teacher_cache.kd_import import import_kd_rows, sparse_from_kd_row
from axolotl_focus.train.teacher_cache.reader import TeacherCache
from axolotl_focus.train.teacher_cache.rows import rows_from_config

V, K, TAU = 40, 6, 2.0


def axolotl_kd_rows(z: torch.Tensor, first: int, k: int, t1: float, t2: float):
    """KD target rows as axolotl's KD strategy writes them (written here from its documented
    behaviour): rows before ``first`` are padding (-inf, ids 0..k-1); row j >= first holds the
    top-k of softmax(z[j] / t1), renormalized over the k ids and rescaled to t2 (q^(t1/t2))."""
    ids, logprobs = [], []
    for j in range(z.shape[0]):
        if j < first:
            ids.append(list(range(k)))
            logprobs.append([-math.inf] * k)
            continue
        q1 = torch.softmax(z[j].double() / t1, -1)
        top = torch.topk(q1, k).indices
        q = q1[top] / q1[top].sum()
        q2 = q ** (t1 / t2)
        q2 = q2 / q2.sum()
        ids.append(top.tolist())
        logprobs.append(q2.log().tolist())
    return ids, logprobs


def sequence(length: int, prompt: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (length,), generator=g).tolist()
    labels = [IGNORE_INDEX] * prompt + input_ids[prompt:]
    return input_ids, labels, 3.0 * torch.randn(length, V, generator=g)  # z[j]: the teacher's logits of token j


@pytest.mark.parametrize("t1,t2", [(1.0, 1.0), (1.0, 2.0), (0.7, 1.0)])
def test_a_kd_row_is_the_next_tokens_top_k_renormalized_at_tau(t1, t2):
    input_ids, labels, z = sequence(12, prompt=4, seed=0)
    ids, logprobs = axolotl_kd_rows(z, first=4, k=K, t1=t1, t2=t2)
    part = sparse_from_kd_row(input_ids, labels, ids, logprobs, kd_temperature=t2, temperature=TAU)
    positions = trained_positions(labels)
    assert positions == list(range(3, 11))  # labels[t + 1] != -100
    part.validate(len(positions), V)
    assert part.temperature == TAU and torch.isinf(part.log_tail).all()
    for row, t in enumerate(positions):  # closed form: the top-k of z[t + 1] / tau, renormalized over them
        top = torch.topk(z[t + 1], K).indices
        expected = torch.log_softmax(z[t + 1][top].double() / TAU, -1)
        assert part.ids[row].tolist() == top.tolist()  # decreasing teacher probability
        torch.testing.assert_close(part.logq[row].double(), expected, atol=1e-6, rtol=0)


def test_a_trained_token_without_logprobs_is_an_error_naming_it():
    input_ids, labels, z = sequence(12, prompt=4, seed=1)
    ids, logprobs = axolotl_kd_rows(z, first=5, k=K, t1=1.0, t2=1.0)  # logprobs start one token late
    with pytest.raises(ValueError, match=r"sequence 7: token 4 is trained .* no finite teacher logprobs"):
        sparse_from_kd_row(input_ids, labels, ids, logprobs, kd_temperature=1.0, temperature=TAU, where="sequence 7")
    ids, logprobs = axolotl_kd_rows(z, first=4, k=K, t1=1.0, t2=1.0)
    ids[6][1] = ids[6][0]
    with pytest.raises(ValueError, match="token 6 repeats a token id"):
        sparse_from_kd_row(input_ids, labels, ids, logprobs, kd_temperature=1.0, temperature=TAU)
    with pytest.raises(ValueError, match="11 KD rows for 12 tokens"):
        sparse_from_kd_row(input_ids, labels, ids[:-1], logprobs[:-1], kd_temperature=1.0, temperature=TAU)
    assert sparse_from_kd_row(input_ids, [IGNORE_INDEX] * 12, ids, logprobs, kd_temperature=1.0,
                              temperature=TAU) is None


def test_import_writes_a_cache_the_trainer_reads(tmp_path):
    rows = []
    for seed, (length, prompt) in enumerate([(12, 4), (9, 1), (15, 7)]):
        input_ids, labels, z = sequence(length, prompt, seed)
        rows.append((input_ids, labels, *axolotl_kd_rows(z, first=prompt, k=K, t1=1.0, t2=1.0)))
    rows.append(rows[0])  # a duplicate is stored once
    meta = import_kd_rows(rows, tmp_path / "cache", kd_temperature=1.0, temperature=TAU, vocab_size=V,
                          tokenizer=None, source="test", shard_size=2)
    assert (meta.k, meta.sequences, meta.shards, meta.complete, meta.vocab_size) == (K, 3, 2, True, V)
    cache = TeacherCache.open(tmp_path / "cache")
    cache.check_rows([r[:2] for r in rows])
    for input_ids, labels, ids, logprobs in rows[:3]:
        part = sparse_from_kd_row(input_ids, labels, ids, logprobs, kd_temperature=1.0, temperature=TAU)
        got_ids, got_logq, got_tail = cache.entry(sequence_key(input_ids, labels))
        assert torch.equal(got_ids, part.ids) and torch.equal(got_logq, part.logq) and torch.isinf(got_tail).all()
    # the same rows again: reused; other rows: refused, nothing changed
    again = import_kd_rows(rows, tmp_path / "cache", kd_temperature=1.0, temperature=TAU, vocab_size=V,
                           tokenizer=None, source="test", shard_size=2)
    assert again.created == meta.created
    with pytest.raises(ValueError, match="made with"):
        import_kd_rows(rows[1:], tmp_path / "cache", kd_temperature=1.0, temperature=TAU, vocab_size=V,
                       tokenizer=None, source="test", shard_size=2)
    TeacherCache.open(tmp_path / "cache").check_rows([r[:2] for r in rows])


def test_bad_kd_rows_are_refused_before_anything_is_written(tmp_path):
    a = sequence(10, 3, 0)
    b = sequence(10, 3, 1)
    row_a = (a[0], a[1], *axolotl_kd_rows(a[2], 3, K, 1.0, 1.0))
    row_b = (b[0], b[1], *axolotl_kd_rows(b[2], 3, K - 1, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"sequence 1: k = 5 logprobs per token, earlier sequences 6"):
        import_kd_rows([row_a, row_b], tmp_path / "c1", kd_temperature=1.0, temperature=TAU, vocab_size=V,
                       tokenizer=None, source="test")
    with pytest.raises(ValueError, match=r"outside the vocabulary \(20\)"):
        import_kd_rows([row_a], tmp_path / "c2", kd_temperature=1.0, temperature=TAU, vocab_size=20,
                       tokenizer=None, source="test")
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


# --------------------------------------------------------------------------------------------
# through axolotl: its KD dataset type -> the cache -> a FOCUS config's rows
# --------------------------------------------------------------------------------------------


def test_axolotl_kd_dataset_to_cache_to_focus_config(tiny_pair, tmp_path, plugin_manager, capsys, one_thread):
    from transformers import AutoTokenizer

    from axolotl_focus.cli import main

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["student"])
    with open(tiny_pair["train"], encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle][:6]
    data = tmp_path / "chats.jsonl"
    chats = [{"messages": [{"role": "user", "content": t[:40]}, {"role": "assistant", "content": t[40:160]}]}
             for t in texts]
    # shuffle_merged_datasets: false keeps the dataset order, so row i of the tokenized data is chat i
    common = {"chat_template": "chatml", "sequence_len": 256, "shuffle_merged_datasets": False}
    focus_cfg = tiny_config(tiny_pair, tmp_path, datasets=[{"path": str(data), "ds_type": "json",
                                                           "type": "chat_template", "field_messages": "messages"}],
                            focus_teacher_cache=str(tmp_path / "cache"),
                            dataset_prepared_path=str(tmp_path / "prepared"), **common)
    # the token sequences axolotl trains on, to write logprobs of the right length (one row per token)
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    focus_yml = tmp_path / "focus.yml"
    focus_yml.write_text(yaml.safe_dump(focus_cfg))
    plain_rows, _ = rows_from_config(focus_yml)
    plugin_manager.plugins.clear()
    assert len(plain_rows) == len(chats)
    rng = np.random.default_rng(0)
    for chat, (input_ids, _) in zip(chats, plain_rows):
        chat["target_token_ids"] = [rng.choice(len(tokenizer), size=K, replace=False).tolist() for _ in input_ids]
        chat["logprobs"] = [np.log(rng.dirichlet(np.ones(K))).tolist() for _ in input_ids]
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    kd_cfg = tiny_config(tiny_pair, tmp_path, datasets=[{
        "path": str(data), "ds_type": "json", "type": "axolotl.integrations.kd.chat_template",
        "field_messages": "messages", "logprobs_field": "logprobs", "temperature": 1.0}],
        dataset_prepared_path=str(tmp_path / "prepared-kd"), **common)
    kd_yml = tmp_path / "kd.yml"
    kd_yml.write_text(yaml.safe_dump(kd_cfg))

    code = main(["teacher-cache", str(kd_yml), "--output", str(tmp_path / "cache"), "--from-kd-logprobs",
                 "--no-progress", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "k 6, temperature 2.0" in captured.out
    cache = TeacherCache.open(tmp_path / "cache")
    assert cache.meta.k == K and cache.meta.temperature == 2.0 and cache.meta.teacher.startswith("axolotl KD")
    cache.check_rows(plain_rows)  # the FOCUS config's chat_template rows are the KD rows' keys
    # position t holds the logprobs written for token t + 1, rescaled from T2 = 1 to tau = 2
    by_ids = {tuple(r[0]): c for r, c in zip(plain_rows, chats)}
    input_ids, labels = plain_rows[0]
    ids, logq, _ = cache.entry(sequence_key(input_ids, labels))
    t = trained_positions(labels)[0]
    raw_ids = by_ids[tuple(input_ids)]["target_token_ids"][t + 1]
    raw_lp = torch.tensor(by_ids[tuple(input_ids)]["logprobs"][t + 1], dtype=torch.float64)
    expected = torch.log_softmax(torch.log_softmax(raw_lp, 0) / 2.0, 0)
    order = torch.argsort(expected, descending=True)
    assert ids[0].tolist() == [raw_ids[i] for i in order]
    torch.testing.assert_close(logq[0].double(), expected[order], atol=1e-6, rtol=0)

    plugin_manager.plugins.clear()
    assert main(["validate", str(focus_yml)]) == 0, capsys.readouterr()
