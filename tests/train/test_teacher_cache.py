"""The teacher-logit cache (axolotl_focus.train.teacher_cache): format, lookups, resuming, CLI."""

import hashlib
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_plugin import tiny_config

from axolotl_focus.train.losses import IGNORE_INDEX, sparse_teacher_from_logits
from axolotl_focus.train.teacher_cache.build import build_cache
from axolotl_focus.train.teacher_cache.format import FORMAT, VERSION, dataset_digest, sequence_key, trained_positions
from axolotl_focus.train.teacher_cache.reader import TeacherCache
from axolotl_focus.train.teacher_cache.rows import rows_from_config

TAU = 2.0


@pytest.fixture(scope="module")
def teacher_and_rows(tiny_pair, one_thread):
    """The tiny teacher (fp32, eval), its tokenizer and 7 rows: 5 distinct sequences with trained
    positions (prompt-masked, various lengths), a duplicate and one without trained positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    with open(tiny_pair["train"], encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle][:6]
    rows = []
    for i, text in enumerate(texts[:5]):
        ids = tokenizer(text)["input_ids"][: 12 + 9 * i]
        labels = list(ids)
        labels[: 2 + i] = [IGNORE_INDEX] * (2 + i)  # a masked "prompt"
        if i == 3:
            labels[8] = IGNORE_INDEX  # a hole in the middle
        rows.append((ids, labels))
    rows.append(rows[1])  # duplicate
    ids = tokenizer(texts[5])["input_ids"][:10]
    rows.append((ids, [ids[0]] + [IGNORE_INDEX] * 9))  # only the first token is labelled: no trained position
    return teacher, tokenizer, rows


def build(teacher_and_rows, tiny_pair, path, **kwargs):
    teacher, tokenizer, rows = teacher_and_rows
    teacher, rows = kwargs.pop("teacher", teacher), kwargs.pop("rows", rows)
    options = {"k": 8, "temperature": TAU, "batch_size": 2, "progress": False, "teacher_name": tiny_pair["teacher"],
               "tokenizer": tokenizer, "shard_size": 2}
    options.update(kwargs)
    return build_cache(teacher, rows, path, **options)


def padded_batch(rows, pad_id=0, pad_label=IGNORE_INDEX, left=False):
    length = max(len(ids) for ids, _ in rows) + 3
    input_ids = torch.full((len(rows), length), pad_id)
    labels = torch.full((len(rows), length), pad_label)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        where = slice(length - len(ids), None) if left else slice(None, len(ids))
        input_ids[b, where] = torch.tensor(ids)
        labels[b, where] = torch.tensor(lab)
        mask[b, where] = 1
    return input_ids, labels, mask


def reference(teacher, rows, k):
    """sparse_teacher_from_logits of the teacher's full logits of each sequence alone, at its
    trained positions, concatenated in row order."""
    parts = []
    with torch.no_grad():
        for ids, labels in rows:
            logits = teacher(input_ids=torch.tensor([ids])).logits[0]
            parts.append(sparse_teacher_from_logits(logits[trained_positions(labels)], k, TAU))
    return (torch.cat([p.ids for p in parts]), torch.cat([p.logq for p in parts]),
            torch.cat([p.log_tail for p in parts]))


def shard_files(path):
    """{relative path: bytes} of the shard folders; state.json without its random _fingerprint."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if not rel.startswith("shard-"):
                continue
            with open(full, "rb") as handle:
                data = handle.read()
            if name == "state.json":
                state = json.loads(data)
                state.pop("_fingerprint", None)
                data = json.dumps(state, sort_keys=True).encode()
            out[rel] = data
    return out


def test_key_and_positions():
    ids, labels = [5, 6, 7, 8, 9, 10], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10]
    assert trained_positions(labels) == [1, 2, 4]  # the last position has no target
    assert trained_positions([IGNORE_INDEX] * 5 + [3]) == [4]
    assert trained_positions([3] + [IGNORE_INDEX] * 5) == []
    expected = hashlib.blake2b(
        b"".join(x.to_bytes(4, "little", signed=True) for x in ids + labels), digest_size=16).hexdigest()
    assert sequence_key(ids, labels) == expected
    assert sequence_key(torch.tensor(ids), torch.tensor(labels)) == expected  # any int container
    assert sequence_key(ids, [IGNORE_INDEX] + labels[1:]) == expected
    assert sequence_key(ids, ids) != expected  # other masking, other key
    keys = [sequence_key(ids, labels), sequence_key(ids, ids)]
    assert dataset_digest(keys) == hashlib.blake2b(b"".join(bytes.fromhex(k) for k in keys),
                                                   digest_size=16).hexdigest()


@pytest.mark.parametrize("k", [8, "V"])
def test_batch_lookup_equals_the_full_teacher(teacher_and_rows, tiny_pair, tmp_path, k):
    teacher, _, rows = teacher_and_rows
    vocab = teacher.get_output_embeddings().weight.shape[0]
    k = vocab if k == "V" else k
    meta = build(teacher_and_rows, tiny_pair, tmp_path / "cache", k=k, batch_size=1)
    assert (meta.format, meta.version, meta.complete, meta.k, meta.vocab_size) == (FORMAT, VERSION, True, k, vocab)
    unique = rows[:5]
    assert meta.sequences == 5 and meta.shards == 3
    assert meta.positions == sum(len(trained_positions(lab)) for _, lab in unique)
    assert meta.dataset_digest == dataset_digest([sequence_key(*r) for r in unique])
    stored = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert stored["complete"] is True and stored["teacher_fingerprint"]["weights"]

    cache = TeacherCache.open(tmp_path / "cache")
    # a padded batch as the collator makes it: rows in another order, one without targets
    batch_rows = [rows[3], rows[6], rows[0], rows[4], rows[1]]
    input_ids, labels, mask = padded_batch(batch_rows)
    sparse = cache.sparse_for_batch(input_ids, labels, mask)
    valid = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:] != IGNORE_INDEX  # the trainer's rows
    assert sparse.ids.shape == (int(valid.sum()), k) and sparse.temperature == TAU
    sparse.validate(int(valid.sum()), vocab)
    ids, logq, log_tail = reference(teacher, batch_rows, k)
    assert torch.equal(sparse.ids, ids) and torch.equal(sparse.logq, logq) and torch.equal(sparse.log_tail, log_tail)
    if k == vocab:
        assert torch.isneginf(sparse.log_tail).all()
    # left padding: the same rows (these sequences do not label their first token)
    left = cache.sparse_for_batch(*padded_batch([r for r in batch_rows if r is not rows[6]], left=True))
    assert torch.equal(left.ids, ids) and torch.equal(left.logq, logq) and torch.equal(left.log_tail, log_tail)
    entry = cache.entry(sequence_key(*rows[0]))
    n = len(trained_positions(rows[0][1]))
    assert entry[0].dtype == torch.long and [tuple(x.shape) for x in entry] == [(n, k), (n, k), (n,)]

    # a batched build (padding, length-sorted batches) agrees up to float rounding
    build(teacher_and_rows, tiny_pair, tmp_path / "batched", k=k, batch_size=4)
    other = TeacherCache.open(tmp_path / "batched").sparse_for_batch(input_ids, labels, mask)
    torch.testing.assert_close(other.logq, logq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other.log_tail, log_tail, atol=1e-5, rtol=1e-5)


def test_resume_rewrites_only_missing_shards(teacher_and_rows, tiny_pair, tmp_path):
    teacher = teacher_and_rows[0]
    path = tmp_path / "cache"
    build(teacher_and_rows, tiny_pair, path)
    before = shard_files(path)
    assert sorted({p.split(os.sep)[0] for p in before}) == ["shard-00000", "shard-00001", "shard-00002"]
    shutil.rmtree(path / "shard-00002")
    meta = json.loads((path / "cache.json").read_text())
    (path / "cache.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache.open(path)
    first = os.stat(path / "shard-00000").st_ino
    loads = []

    def lazy():
        loads.append(1)
        return teacher

    resumed = build(teacher_and_rows, tiny_pair, path, teacher=lazy, dtype=torch.float32)
    assert resumed.complete and loads == [1]
    assert shard_files(path) == before  # byte-identical
    assert os.stat(path / "shard-00000").st_ino == first  # kept, not rewritten
    assert resumed.created == meta["created"]
    # complete and unchanged: nothing to do, the teacher is not even loaded
    build(teacher_and_rows, tiny_pair, path, teacher=lazy, dtype=torch.float32)
    assert loads == [1]
    TeacherCache.open(path).check_rows(teacher_and_rows[2])


def test_a_damaged_shard_is_named_and_a_rerun_repairs_it(teacher_and_rows, tiny_pair, tmp_path):
    """The shard check: cache.json records each shard's file sizes; a truncated shard of a complete
    cache is refused by the reader (naming the shard) and by validate's check, and rerunning the
    build with the same settings writes that shard again - only that one, byte-identical."""
    from axolotl_focus.train.teacher_cache.format import read_meta, shard_problems

    teacher = teacher_and_rows[0]
    path = tmp_path / "cache"
    meta = build(teacher_and_rows, tiny_pair, path)
    assert set(meta.shard_files) == {"shard-00000", "shard-00001", "shard-00002"} and shard_problems(path, meta) == []
    before = shard_files(path)
    arrow = next((path / "shard-00001").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-40])
    problems = shard_problems(path, read_meta(path))
    assert len(problems) == 1 and problems[0].startswith(f"shard-00001/{arrow.name} has") and "truncated" in problems[0]
    with pytest.raises(ValueError, match=r"damaged \(shard-00001/.*\(truncated\?\)\); rerun axolotl-focus"):
        TeacherCache.open(path)
    first = os.stat(path / "shard-00000").st_ino
    loads = []

    def lazy():
        loads.append(1)
        return teacher

    repaired = build(teacher_and_rows, tiny_pair, path, teacher=lazy, dtype=torch.float32)
    assert repaired.complete and loads == [1] and shard_files(path) == before
    assert os.stat(path / "shard-00000").st_ino == first  # the intact shards are kept
    TeacherCache.open(path).check_rows(teacher_and_rows[2])


def test_an_empty_result_and_a_failed_start_leave_nothing(teacher_and_rows, tiny_pair, tmp_path):
    """No sequence with a trained position is an error, before anything is written; a build that
    fails before its first shard (k above the vocabulary, found when the teacher loads) removes the
    cache.json it wrote, so that the corrected run is not refused as another job."""
    teacher, _, rows = teacher_and_rows
    with pytest.raises(ValueError, match="no training sequence has a trained position"):
        build(teacher_and_rows, tiny_pair, tmp_path / "empty", rows=[rows[-1]])
    assert not (tmp_path / "empty").exists()
    with pytest.raises(ValueError, match="exceeds the teacher's vocabulary"):
        build(teacher_and_rows, tiny_pair, tmp_path / "big", k=10**6, teacher=lambda: teacher, dtype=torch.float32)
    assert list(tmp_path.iterdir()) == []
    assert build(teacher_and_rows, tiny_pair, tmp_path / "big", k=8).complete


def test_other_settings_refuse_and_restart_rebuilds(teacher_and_rows, tiny_pair, tmp_path):
    path = tmp_path / "cache"
    build(teacher_and_rows, tiny_pair, path, k=4)
    with pytest.raises(ValueError) as err:
        build(teacher_and_rows, tiny_pair, path, k=8)
    assert str(err.value) == (f"{path} was made with k=4 (now k=8): another job; rerun with --restart to start it "
                              "over, or pick another --output")
    with pytest.raises(ValueError, match=r"made with temperature=2.0 \(now temperature=1.0\)"):
        build(teacher_and_rows, tiny_pair, path, k=4, temperature=1.0)
    with pytest.raises(ValueError, match=r"made with dataset digest \w+ \(5 sequences\) \(now dataset digest \w+ "
                                         r"\(4 sequences\)\)"):
        build(teacher_and_rows, tiny_pair, path, k=4, rows=teacher_and_rows[2][:4])
    meta = build(teacher_and_rows, tiny_pair, path, k=8, restart=True)
    assert meta.k == 8 and TeacherCache.open(path).meta.k == 8
    assert TeacherCache.open(path).entry(sequence_key(*teacher_and_rows[2][0]))[0].shape[1] == 8
    with pytest.raises(ValueError, match="exceeds the teacher's vocabulary"):
        build(teacher_and_rows, tiny_pair, tmp_path / "big", k=10**6)


def test_restart_never_deletes_another_folder(teacher_and_rows, tiny_pair, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for restart in (False, True):
        with pytest.raises(ValueError, match="is not a teacher cache"):
            build(teacher_and_rows, tiny_pair, folder, restart=restart)
    (folder / "cache.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="is not a teacher cache"):
        build(teacher_and_rows, tiny_pair, folder, restart=True)
    assert sorted(os.listdir(folder)) == ["cache.json", "notes.txt"]
    with pytest.raises(ValueError, match="not a teacher cache"):
        TeacherCache.open(folder)
    with pytest.raises(ValueError, match="no cache.json"):
        TeacherCache.open(tmp_path)


def test_missing_sequence_and_wrong_counts(teacher_and_rows, tiny_pair, tmp_path):
    rows = teacher_and_rows[2]
    build(teacher_and_rows, tiny_pair, tmp_path / "cache")
    cache = TeacherCache.open(tmp_path / "cache")
    input_ids, labels, mask = padded_batch(rows[:3])
    changed = input_ids.clone()
    changed[1, 3] += 1
    with pytest.raises(ValueError, match=r"sequence \[.*\] \(\d+ tokens\) of the batch is not in the teacher cache "
                                         r".*: it was built for other data or settings \(rebuild: axolotl-focus "
                                         r"teacher-cache CONFIG\)"):
        cache.sparse_for_batch(changed, labels, mask)
    # the same tokens, but the padding is labelled: more targets than the cached entry
    _, bad_labels, _ = padded_batch(rows[:3], pad_label=0)
    with pytest.raises(ValueError, match="trained positions, its entry in the teacher cache"):
        cache.sparse_for_batch(input_ids, bad_labels, mask)
    # without a mask the whole row is the sequence: a padded row is another key
    with pytest.raises(ValueError, match="not in the teacher cache"):
        cache.sparse_for_batch(input_ids, labels)
    ids0, lab0 = (torch.tensor([r]) for r in rows[0])
    assert cache.sparse_for_batch(ids0, lab0).ids.shape[0] == len(trained_positions(rows[0][1]))
    none = cache.sparse_for_batch(ids0, torch.full_like(lab0, IGNORE_INDEX))
    assert none.ids.shape == (0, 8) and none.log_tail.shape == (0,)

    cache.check_rows(rows)
    ids, lab = rows[2]
    other_mask = list(lab)
    other_mask[5] = IGNORE_INDEX
    with pytest.raises(ValueError, match=r"2 of 8 training sequences do not match it \(2 missing, 0 with another "
                                         r"position count; first: row 3, missing\)"):
        cache.check_rows(rows[:3] + [(ids, other_mask), rows[3], (ids[:-1], lab[:-1])] + rows[4:])


def test_rows_from_config_and_cli(tiny_pair, tmp_path, plugin_manager, capsys, one_thread):
    from axolotl_focus.cli import main

    config = tmp_path / "cfg.yml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_pair, tmp_path)))
    rows, cfg = rows_from_config(config)
    assert len(rows) > 100 and os.path.samefile(cfg.focus_teacher_model, tiny_pair["teacher"])
    assert all(len(ids) == len(labels) <= 128 for ids, labels in rows)

    out = tmp_path / "cache"
    code = main(["teacher-cache", str(config), "--output", str(out), "--k", "8", "--no-progress", "--threads", "1",
                 "--shard-size", "256", "--batch-size", "16"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    print(printed)
    assert f"teacher cache: {out}" in printed and "B per position" in printed
    cache = TeacherCache.open(out)
    meta = cache.meta
    assert (meta.k, meta.temperature, meta.dtype, meta.source_config) == (8, 2.0, "float32", str(config))
    assert os.path.samefile(meta.teacher, tiny_pair["teacher"]) and meta.shards == -(-meta.sequences // 256) > 1
    assert meta.sequences == len({sequence_key(*r) for r in rows if trained_positions(r[1])})
    cache.check_rows(rows)

    # batches as axolotl's collator pads them (pad_to_multiple_of 64; right, and left as for Mistral + FA2)
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.collators import DataCollatorForSeq2Seq

    tokenizer = load_tokenizer(cfg)
    picked = [rows[i] for i in (0, 7, 3, 11)]
    expected = torch.cat([cache.entry(sequence_key(*r))[1] for r in picked])
    for side in ("right", "left"):
        tokenizer.padding_side = side
        collate = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=64, return_tensors="pt")
        batch = collate([{"input_ids": list(i), "attention_mask": [1] * len(i), "labels": list(lab)}
                         for i, lab in picked])
        assert batch["input_ids"].shape[1] == 64 * -(-max(len(i) for i, _ in picked) // 64)
        if side == "left":  # completion rows label their first token: the pad before it would be trained
            with pytest.raises(ValueError, match="left-padded and its first token is labelled"):
                cache.sparse_for_batch(batch["input_ids"], batch["labels"], batch["attention_mask"])
            continue
        valid = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:] != IGNORE_INDEX
        sparse = cache.sparse_for_batch(batch["input_ids"], batch["labels"], batch["attention_mask"])
        assert sparse.logq.shape[0] == int(valid.sum()) and torch.equal(sparse.logq, expected)

    code = main(["teacher-cache", str(config), "--output", str(out), "--k", "16", "--no-progress", "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()  # axolotl's and the plugin's log lines, then the error
    assert code == 2 and err[-1] == (f"axolotl-focus teacher-cache: {out} was made with k=8 (now k=16): another job; "
                                     "rerun with --restart to start it over, or pick another --output")


def test_sample_packing_is_refused(tiny_pair, tmp_path, plugin_manager):
    config = tmp_path / "cfg.yml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_pair, tmp_path, sample_packing=True)))
    with pytest.raises(ValueError, match="sample_packing: true is not supported by the teacher cache"):
        rows_from_config(config)


def test_dataset_rows_skip_pair_rows_and_follow_the_indices():
    """dataset_sft_rows reads Arrow columns (selection / shuffle indices applied) and skips RePAIR
    pair rows (attention mask 2 / 3); any other dataset row by row."""
    import datasets
    import numpy as np

    from axolotl_focus.train.teacher_cache.rows import dataset_sft_rows

    rows = []
    for i in range(9):
        ids = list(range(10 * i, 10 * i + 3 + i))
        mask = [1] * len(ids) if i % 3 else [1, 2] + [3] * (len(ids) - 2)  # rows 0, 3, 6: pairs
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:], "attention_mask": mask})
    data = datasets.Dataset.from_list(rows).shuffle(seed=3).select(range(1, 8))
    expected = [(r["input_ids"], r["labels"]) for r in data if max(r["attention_mask"]) < 2]
    got = list(dataset_sft_rows(data, batch_size=3))
    assert len(expected) == len(got) > 0
    for (ids, labels), (got_ids, got_labels) in zip(expected, got):
        assert isinstance(got_ids, np.ndarray) and got_ids.tolist() == ids and got_labels.tolist() == labels
    assert [(list(a), list(b)) for a, b in dataset_sft_rows(list(data))] == expected
    no_mask = data.remove_columns("attention_mask")
    assert len(list(dataset_sft_rows(no_mask))) == len(data)


def test_validate_reports_the_cache_and_loads_no_teacher(teacher_and_rows, tiny_pair, tmp_path, plugin_manager,
                                                        capsys, monkeypatch):
    """`axolotl-focus validate` of a config with focus_teacher_cache: the cache's account line, the
    tokenizer digest checked, no teacher resolved or loaded."""
    import transformers

    from axolotl_focus.cli import main

    meta = build(teacher_and_rows, tiny_pair, tmp_path / "cache")

    def no_weights(*args, **kwargs):
        raise AssertionError("validate loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    config = tmp_path / "cfg.yml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_pair, tmp_path, focus_teacher_cache=str(tmp_path / "cache"))))
    assert main(["validate", str(config)]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert (f"teacher      cache {tmp_path / 'cache'} (k=8, teacher {tiny_pair['teacher']}, 5 sequences, "
            f"{meta.positions} positions); no teacher weights loaded") in out, out
    assert "vocabulary   the teacher cache was built for the student's tokenizer and vocabulary size" in out, out
    assert "FOCUS x0.05 (tau 2.0, beta 15.0, gamma 1.0) from the teacher cache" in out, out


@pytest.mark.slow
def test_axolotl_train_from_the_cache(tiny_pair, tmp_path, plugin_manager, capsys, one_thread):
    """`axolotl-focus teacher-cache` of the tiny config, then `axolotl train` of it with
    focus_teacher_cache: no teacher model loaded, loss/focus logged at every step."""
    from test_e2e_axolotl import axolotl_train, logged_dicts

    from axolotl_focus.cli import main

    cfg = tiny_config(tiny_pair, tmp_path, dataset_prepared_path=str(tmp_path / "prepared"), max_steps=4)
    config = tmp_path / "cfg.yml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cache"
    assert main(["teacher-cache", str(config), "--output", str(out), "--k", "32", "--no-progress", "--threads", "1",
                 "--batch-size", "16"]) == 0
    capsys.readouterr()
    output = axolotl_train({**cfg, "focus_teacher_cache": str(out)}, tmp_path, "cached")
    assert f"axolotl_focus: teacher cache {out} (k=32, teacher {tiny_pair['teacher']}): no teacher model loaded" \
        in output, output[-3000:]
    assert "loading teacher" not in output and "teacher placement" not in output
    logs = logged_dicts(output)
    assert len(logs) == 4
    for log in logs:
        assert {"loss", "loss/ce", "loss/focus"} <= log.keys()
        assert log["loss"] == pytest.approx(log["loss/ce"] + 0.05 * log["loss/focus"], rel=0.02)


def test_rows_of_a_config_that_names_its_cache(tiny_pair, tmp_path, plugin_manager, one_thread):
    """The config that trains from a cache not built yet gives the rows and teacher of the same
    config without focus_teacher_cache (what `axolotl-focus teacher-cache` builds from)."""
    config = tmp_path / "cfg.yml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_pair, tmp_path, focus_teacher_cache=str(tmp_path / "none"))))
    rows, cfg = rows_from_config(config)
    assert len(rows) > 100 and not cfg.focus_teacher_cache
    assert os.path.samefile(cfg.focus_teacher_model, tiny_pair["teacher"])
