"""The bad-input suite: a table of mistakes a user makes (configs, keys, files, rows, CLI
arguments, models), each with the exit code it must get, the words its error must contain, and
the promise that no file changed (nothing written, nothing damaged).

Every case runs in its own folder holding the inputs it names; the tiny models are shared (and
hashed too). ``validate`` and CLI cases run ``axolotl_focus.cli.main`` in-process; ``train``
cases run what ``axolotl train`` runs first (``axolotl.cli.config.load_cfg``: the plugin's
``register`` hook, then axolotl's validation) and must raise before any dataset or weights are
touched. An error is one line without a traceback (argparse's usage errors aside), under 500
characters.

After the first 67 cases the table follows the classes of issue 23, one block each: 1 non-finite
or out-of-range numbers, 3 input / machine problems (not UTF-8, truncated weights, devices), 2 what
`train` refuses `validate` refuses first, 4 a resume that is not the same job, 5 two writers on one
output, 6 questionable input. The checks that need more than one call follow the table: disk full
while pruning (3), speed of --help / --version, third-party noise and an unreachable hub (7), a
pruned checkpoint in a fresh process (8). Unit tests of the mechanisms: tests/test_files.py (UTF-8
reader, run identity, lock), tests/train/test_nonfinite.py (the non-finite guard),
tests/train/test_teacher_cache.py (the shard check and its repair), tests/prune/test_pruning.py
(the checkpoint format in a fresh process).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import axolotl.cli.config  # noqa: F401 - configures axolotl's log handlers on the session's stderr, not a test's
import pytest
import yaml

from axolotl_focus.micro import build_tokenizer, corpus_documents, llama_config


@dataclass
class Case:
    id: str
    argv: list[str]  # {root}, {teacher}, {student}, ... are filled in; "train" first: load_cfg(argv[1])
    code: int  # exit code (train: 2 means "raises ValueError")
    words: tuple[str, ...]  # all must appear in the error (case-insensitive)
    files: dict[str, object] = field(default_factory=dict)  # name -> text / bytes / dict (YAML) / list (JSONL)
    setup: Callable[[Path, dict], None] | None = None
    # files under root that may appear: axolotl's own tokenized-data cache and log, written by its data
    # loading before a problem of the tokenized data (no row left) can be known
    axolotl_cache: bool = False


def config(**changes) -> dict:
    """A valid training config of the tiny student; ``changes`` set (None deletes) keys."""
    cfg = {
        "base_model": "{student}",
        "plugins": ["axolotl_focus.FocusPlugin"],
        "datasets": [{"path": "{train}", "ds_type": "json", "type": "completion"}],
        "output_dir": "{root}/out",
        "dataset_prepared_path": "{root}/prepared",
        "sequence_len": 64,
        "micro_batch_size": 2,
        "num_epochs": 1,
        "learning_rate": 0.001,
        "val_set_size": 0,
    }
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


PAIR = {"prompt": "The cat", "chosen": " sat on the mat.", "rejected": " the cat the cat the cat", "source_id": "1"}
REPAIR_DATA = [{"path": "{train}", "ds_type": "json", "type": "completion"},
               {"path": "{root}/pairs.jsonl", "ds_type": "json", "type": "axolotl_focus.repair"}]
DPO = dict(rl="dpo", datasets=[{"path": "{root}/pairs.jsonl", "ds_type": "json", "split": "train"}])
PRUNE = {"ratio": 0.25, "attn_layers": [1, 3], "mlp_layers": [1, 3], "cache_dir": "{root}/cache"}
PAIRS = ["pairs", "--student", "{student}", "--prompts", "{train}", "--output", "{root}/pairs.jsonl",
         "--max-prompts", "2", "--max-new-tokens", "8", "--batch-size", "2", "--no-progress", "--threads", "1"]


def _mined(root: Path, models: dict) -> None:
    """A finished mining run into root/pairs.jsonl (its record and state), at temperature 1."""
    from axolotl_focus.cli import main

    assert main([a.format(root=root, **models) for a in PAIRS]) == 0
    assert (root / "pairs.jsonl.run.json").is_file()


def _cache(root: Path, models: dict) -> None:
    """A complete teacher cache of two short rows at root/cache (tiny teacher, k 8, tau 2)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_focus.train.teacher_cache.build import build_cache
    from axolotl_focus.train.teacher_cache.format import data_sources

    tokenizer = AutoTokenizer.from_pretrained(models["student"])
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"], dtype=torch.float32)
    rows = [(ids, ids) for ids in (tokenizer(t)["input_ids"][:12] for t in corpus_documents("valid")[:2])]
    build_cache(teacher, rows, root / "cache", k=8, temperature=2.0, progress=False, teacher_name=models["teacher"],
                tokenizer=tokenizer, shard_size=1,
                data=data_sources({"datasets": [{"path": models["train"]}], "sequence_len": 64}))


def _incomplete_cache(root: Path, models: dict) -> None:
    """root/cache whose build stopped before its last shard (cache.json says complete: false)."""
    _cache(root, models)
    meta = json.loads((root / "cache" / "cache.json").read_text())
    (root / "cache" / "cache.json").write_text(json.dumps({**meta, "complete": False}))
    shutil.rmtree(root / "cache" / "shard-00001")


def _truncated_shard(root: Path, models: dict) -> None:
    """A complete root/cache whose second shard's Arrow file lost its last 64 bytes."""
    _cache(root, models)
    arrow = next((root / "cache" / "shard-00001").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-64])


def _truncated_student(root: Path, models: dict) -> None:
    """root/trunc: a copy of the student whose model.safetensors lost its last 100 bytes."""
    shutil.copytree(models["student"], root / "trunc")
    weights = root / "trunc" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])


_LOCKS: list[int] = []  # file descriptors holding a lock for a case (closed after it)


def _locked(name: str):
    """A setup: another process (PID 4242, as its lock file says) holds the lock of root/name."""
    def hold(root: Path, models: dict) -> None:
        import fcntl

        fd = os.open(root / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"4242\n")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _LOCKS.append(fd)

    return hold


CACHED = "{root}/cache"
LATIN1 = "caf\u00e9".encode("latin-1")  # b"caf\xe9": not UTF-8
LONG_PROMPT = {**PAIR, "prompt": " ".join(["The cat sat on the mat near the door."] * 20)}
SFT_DATA = [{"path": "{root}/data.jsonl", "ds_type": "json", "type": "completion"}]
TEACHER_CACHE = ["teacher-cache", "{root}/c.yml", "--output", "{root}/tc", "--k", "8", "--no-progress", "--threads",
                 "1"]

CASES = [
    # --- config keys and values (validate: exit 1 and the account; train: raises in register) ---
    Case("misspelled-key", ["validate", "{root}/c.yml"], 1,
         ("c.yml:15", "focus_temprature", "did you mean focus_temperature"),
         {"c.yml": config(focus_temprature=3.0)}),
    Case("misspelled-key-train", ["train", "{root}/c.yml"], 2, ("focus_temprature", "did you mean focus_temperature"),
         {"c.yml": config(focus_temprature=3.0)}),
    Case("misspelled-prune-key", ["validate", "{root}/c.yml"], 1, ("focus_prune.ratoi", "did you mean ratio"),
         {"c.yml": config(focus_prune={"ratoi": 0.3})}),
    Case("misspelled-aux-term", ["validate", "{root}/c.yml"], 1, ("focus_aux_losses", "unknown", "unlikelyhood"),
         {"c.yml": config(focus_aux_losses=["unlikelyhood"])}),
    Case("aux-setting-unknown", ["validate", "{root}/c.yml"], 1, ("focus_aux_losses.unlikelihood.alfa", "unknown key"),
         {"c.yml": config(focus_aux_losses={"unlikelihood": {"alfa": 1}})}),
    Case("negative-alpha", ["validate", "{root}/c.yml"], 1, ("focus_alpha", "greater than or equal to 0", "-1"),
         {"c.yml": config(focus_alpha=-1)}),
    Case("distill-mode", ["validate", "{root}/c.yml"], 1, ("focus_distill", "kld"),
         {"c.yml": config(focus_distill="kld")}),
    Case("plugin-missing", ["validate", "{root}/c.yml"], 1, ("plugins", "axolotl_focus.FocusPlugin"),
         {"c.yml": config(plugins=None)}),
    Case("packing-with-pairs", ["validate", "{root}/c.yml"], 1, ("sample_packing", "one pair per row"),
         {"c.yml": config(sample_packing=True, datasets=REPAIR_DATA), "pairs.jsonl": [PAIR]}),
    Case("liger-loss", ["validate", "{root}/c.yml"], 1, ("liger_fused_linear_cross_entropy", "remove the key"),
         {"c.yml": config(liger_fused_linear_cross_entropy=True)}),
    Case("axolotl-schema", ["validate", "{root}/c.yml"], 1, ("micro_batch_size", "integer"),
         {"c.yml": config(micro_batch_size="four")}),
    Case("config-missing", ["validate", "{root}/nope.yml"], 2, ("nope.yml", "no such config file")),
    Case("config-not-yaml", ["validate", "{root}/c.yml"], 2, ("c.yml:4", "not valid YAML"),
         {"c.yml": "base_model: x\nplugins:\n  - a\n - b\n"}),
    Case("config-a-list", ["validate", "{root}/c.yml"], 2, ("c.yml", "expected a mapping"), {"c.yml": "- a\n- b\n"}),
    # --- models: teacher, student, recorded source, vocabulary ---
    Case("teacher-missing", ["validate", "{root}/c.yml"], 1,
         ("focus_teacher_model", "/nonexistent/teacher", "does not exist"),
         {"c.yml": config(focus_teacher_model="/nonexistent/teacher")}),
    Case("teacher-missing-train", ["train", "{root}/c.yml"], 2, ("focus_teacher_model", "does not exist"),
         {"c.yml": config(focus_teacher_model="/nonexistent/teacher")}),
    Case("teacher-offline-hub", ["train", "{root}/c.yml"], 2, ("focus_teacher_model", "offline"),
         {"c.yml": config(focus_teacher_model="no-such-org/no-such-model")}),
    Case("source-moved", ["validate", "{root}/c.yml"], 1, ("focus_teacher_model", "focus_source_model", "moved"),
         {"c.yml": config(base_model="{moved}")}),
    Case("no-teacher", ["validate", "{root}/c.yml"], 1, ("focus_distill", "needs a teacher", "focus_teacher_model"),
         {"c.yml": config(base_model="{teacher}")}),
    Case("teacher-vocab", ["validate", "{root}/c.yml"], 1, ("focus_teacher_model", "vocabulary", "tokenizer length"),
         {"c.yml": config(focus_teacher_model="{other}")}),
    Case("teacher-vocab-train", ["train", "{root}/c.yml"], 2, ("focus_teacher_model", "vocabulary"),
         {"c.yml": config(focus_teacher_model="{other}")}),
    Case("student-missing", ["validate", "{root}/c.yml"], 1, ("base_model", "does not exist"),
         {"c.yml": config(base_model="./no/such/student")}),
    # --- focus_teacher_cache: the folder, its settings, what it cannot be combined with ---
    Case("cache-missing", ["validate", "{root}/c.yml"], 1,
         ("focus_teacher_cache", "nocache", "does not exist", "axolotl-focus teacher-cache"),
         {"c.yml": config(focus_teacher_cache="{root}/nocache")}),
    Case("cache-missing-train", ["train", "{root}/c.yml"], 2, ("focus_teacher_cache", "nocache", "does not exist"),
         {"c.yml": config(focus_teacher_cache="{root}/nocache")}),
    Case("cache-not-a-cache", ["validate", "{root}/c.yml"], 1, ("focus_teacher_cache", "not a teacher cache"),
         {"c.yml": config(focus_teacher_cache=CACHED), "cache/notes.txt": "mine"}),
    Case("cache-incomplete", ["validate", "{root}/c.yml"], 1, ("focus_teacher_cache", "incomplete", "1 of 2 shards"),
         {"c.yml": config(focus_teacher_cache=CACHED)}, _incomplete_cache),
    Case("cache-temperature", ["validate", "{root}/c.yml"], 1,
         ("focus_teacher_cache", "temperature 2.0", "focus_temperature is 1.5"),
         {"c.yml": config(focus_teacher_cache=CACHED, focus_temperature=1.5)}, _cache),
    Case("cache-temperature-train", ["train", "{root}/c.yml"], 2, ("focus_teacher_cache", "temperature 2.0"),
         {"c.yml": config(focus_teacher_cache=CACHED, focus_temperature=1.5)}, _cache),
    Case("cache-other-student", ["validate", "{root}/c.yml"], 1,
         ("focus_teacher_cache", "vocabulary 1024", "another tokenizer"),
         {"c.yml": config(base_model="{other}", focus_teacher_cache=CACHED)}, _cache),
    Case("cache-with-packing", ["validate", "{root}/c.yml"], 1, ("sample_packing", "focus_teacher_cache", "false"),
         {"c.yml": config(focus_teacher_cache=CACHED, sample_packing=True)}, _cache),
    Case("cache-with-eval-packing", ["train", "{root}/c.yml"], 2, ("eval_sample_packing", "focus_teacher_cache"),
         {"c.yml": config(focus_teacher_cache=CACHED, eval_sample_packing=True)}, _cache),
    Case("cache-with-rl", ["validate", "{root}/c.yml"], 1, ("focus_teacher_cache", "rl: dpo", "remove"),
         {"c.yml": config(**DPO, focus_teacher_cache=CACHED), "pairs.jsonl": [PAIR]}, _cache),
    Case("cache-without-distill", ["validate", "{root}/c.yml"], 1, ("focus_teacher_cache", "focus_distill: none"),
         {"c.yml": config(focus_distill="none", focus_teacher_cache=CACHED)}, _cache),
    Case("cache-from-kd-not-kd", ["teacher-cache", "{root}/c.yml", "--output", "{root}/kdcache", "--from-kd-logprobs",
                                  "--no-progress", "--threads", "1"], 2,
         ("datasets[0].type", "'completion'", "not an axolotl KD dataset", "axolotl.integrations.kd.chat_template"),
         {"c.yml": config()}),
    # --- pair files (RePAIR and DPO) ---
    Case("pair-row-field", ["validate", "{root}/c.yml"], 1, ("pairs.jsonl:2", "missing field 'chosen'"),
         {"c.yml": config(datasets=REPAIR_DATA), "pairs.jsonl": [PAIR, {"prompt": "a", "rejected": " b"}]}),
    Case("pair-invalid-json", ["validate", "{root}/c.yml"], 1, ("pairs.jsonl:3", "invalid JSON"),
         {"c.yml": config(datasets=REPAIR_DATA), "pairs.jsonl": json.dumps(PAIR) + "\n\n{oops\n"}),
    Case("pair-invalid-json-train", ["train", "{root}/c.yml"], 2, ("pairs.jsonl:3", "invalid JSON"),
         {"c.yml": config(datasets=REPAIR_DATA), "pairs.jsonl": json.dumps(PAIR) + "\n\n{oops\n"}),
    Case("pair-file-missing", ["validate", "{root}/c.yml"], 1,
         ("datasets[1].path", "does not exist", "axolotl-focus pairs"),
         {"c.yml": config(datasets=REPAIR_DATA)}),
    # --- the RePAIR pair stream (focus_repair_pairs) ---
    Case("stream-dose-without-pairs", ["validate", "{root}/c.yml"], 1,
         ("focus_repair_pairs_per_step", "focus_repair_pairs", "is not"),
         {"c.yml": config(focus_repair_pairs_per_step=4)}),
    Case("stream-dose-zero", ["validate", "{root}/c.yml"], 1, ("focus_repair_pairs_per_step", "greater than 0"),
         {"c.yml": config(focus_repair_pairs="{root}/pairs.jsonl", focus_repair_pairs_per_step=0),
          "pairs.jsonl": [PAIR]}),
    Case("stream-missing-file", ["validate", "{root}/c.yml"], 1, ("focus_repair_pairs", "does not exist",
                                                                  "axolotl-focus pairs"),
         {"c.yml": config(focus_repair_pairs="{root}/pairs.jsonl")}),
    Case("stream-directory", ["validate", "{root}/c.yml"], 1, ("focus_repair_pairs", "is a directory"),
         {"c.yml": config(focus_repair_pairs="{root}/pairs"), "pairs/x.jsonl": [PAIR]}),
    Case("stream-bad-row", ["validate", "{root}/c.yml"], 1, ("focus_repair_pairs", "pairs.jsonl:2",
                                                            "missing field 'chosen'"),
         {"c.yml": config(focus_repair_pairs="{root}/pairs.jsonl"),
          "pairs.jsonl": [PAIR, {"prompt": "a", "rejected": " b"}]}),
    Case("stream-bad-row-train", ["train", "{root}/c.yml"], 2, ("pairs.jsonl:2", "missing field 'chosen'"),
         {"c.yml": config(focus_repair_pairs="{root}/pairs.jsonl"),
          "pairs.jsonl": [PAIR, {"prompt": "a", "rejected": " b"}]}),
    Case("stream-empty-file", ["validate", "{root}/c.yml"], 1, ("focus_repair_pairs", "no usable RePAIR pair row"),
         {"c.yml": config(focus_repair_pairs="{root}/pairs.jsonl"), "pairs.jsonl": ""}),
    Case("stream-empty-file-train", ["train", "{root}/c.yml"], 2, ("pairs.jsonl", "no usable RePAIR pair row"),
         {"c.yml": config(focus_repair_pairs="{root}/pairs.jsonl"), "pairs.jsonl": ""}),
    Case("stream-prompt-too-long", ["validate", "{root}/c.yml"], 1,
         ("focus_repair_pairs", "pairs.jsonl:2", "leaves no room", "sequence_len 64"),
         {"c.yml": config(focus_repair_pairs="{root}/pairs.jsonl"), "pairs.jsonl": [PAIR, LONG_PROMPT]}),
    Case("stream-prompt-too-long-train", ["train", "{root}/c.yml"], 2, ("pairs.jsonl:2", "sequence_len 64"),
         {"c.yml": config(focus_repair_pairs="{root}/pairs.jsonl"), "pairs.jsonl": [PAIR, LONG_PROMPT]}),
    Case("stream-not-utf8", ["validate", "{root}/c.yml"], 1, ("focus_repair_pairs", "pairs.jsonl:2", "not UTF-8"),
         {"c.yml": config(focus_repair_pairs="{root}/pairs.jsonl"),
          "pairs.jsonl": json.dumps(PAIR).encode() + b"\n" + json.dumps(PAIR).encode().replace(b"cat", LATIN1, 1)}),
    Case("stream-chosen-equals-rejected", ["validate", "{root}/c.yml"], 1, ("pairs.jsonl:1", "the same text"),
         {"c.yml": config(focus_repair_pairs="{root}/pairs.jsonl"),
          "pairs.jsonl": [{**PAIR, "rejected": PAIR["chosen"]}]}),
    Case("stream-with-dpo", ["validate", "{root}/c.yml"], 1, ("focus_repair_pairs", "rl: dpo", "datasets"),
         {"c.yml": config(**DPO, focus_repair_pairs="{root}/pairs.jsonl"), "pairs.jsonl": [PAIR]}),
    Case("stream-with-packing", ["validate", "{root}/c.yml"], 1, ("sample_packing", "focus_repair_pairs"),
         {"c.yml": config(sample_packing=True, focus_repair_pairs="{root}/pairs.jsonl"), "pairs.jsonl": [PAIR]}),
    Case("dpo-row", ["validate", "{root}/c.yml"], 1, ("pairs.jsonl:1", "empty rejected"),
         {"c.yml": config(**DPO), "pairs.jsonl": [{**PAIR, "rejected": "  "}]}),
    # --- focus_prune settings against the model ---
    Case("prune-layer-range", ["validate", "{root}/c.yml"], 1, ("focus_prune.attn_layers", "layers"),
         {"c.yml": config(base_model="{teacher}", focus_prune={**PRUNE, "attn_layers": [3, 1]})}),
    Case("prune-ratio", ["validate", "{root}/c.yml"], 1, ("focus_prune.ratio", "less than 1"),
         {"c.yml": config(base_model="{teacher}", focus_prune={**PRUNE, "ratio": 1.5})}),
    Case("prune-depth-blocks", ["validate", "{root}/c.yml"], 1, ("focus_prune", "block"),
         {"c.yml": config(base_model="{teacher}", focus_prune={"method": "depth", "num_blocks": 40,
                                                             "cache_dir": "{root}/cache"})}),
    Case("prune-calibration", ["validate", "{root}/c.yml"], 1,
         ("focus_prune.calibration", "missing.txt", "does not exist"),
         {"c.yml": config(base_model="{teacher}", focus_prune={**PRUNE, "calibration": "{root}/missing.txt"})}),
    Case("prune-no-base-model", ["validate", "{root}/c.yml"], 1, ("base_model", "required"),
         {"c.yml": config(base_model=None, focus_prune=PRUNE)}),
    # --- axolotl-focus prune ---
    Case("prune-model-missing", ["prune", "--model", "/no/such/model", "--output", "{root}/p"], 2,
         ("--model", "/no/such/model", "does not exist")),
    Case("prune-nothing", ["prune"], 2, ("give a CONFIG.yml", "--model")),
    Case("prune-ratio-cli", ["prune", "--model", "{teacher}", "--output", "{root}/p", "--ratio", "1.5"], 2,
         ("focus_prune.ratio", "less than 1")),
    Case("prune-output-exists", ["prune", "--model", "{teacher}", "--output", "{root}/p", "--attn-layers", "1", "3",
                                 "--mlp-layers", "1", "3"], 2, ("exists already",), {"p/keep.txt": "mine"}),
    Case("prune-config-without-block", ["prune", "{root}/c.yml"], 2, ("focus_prune",), {"c.yml": config()}),
    Case("prune-layers-cli", ["prune", "--model", "{teacher}", "--output", "{root}/p", "--attn-layers", "3", "1"], 2,
         ("attn_layers", "layers")),
    # --- axolotl-focus pairs ---
    Case("pairs-prompts-missing", [*PAIRS[:4], "{root}/none.jsonl", *PAIRS[5:]], 2, ("prompts", "file not found")),
    Case("pairs-prompts-empty", [*PAIRS[:4], "{root}/empty.txt", *PAIRS[5:]], 2, ("prompts", "no prompts"),
         {"empty.txt": "\n\n   \n"}),
    Case("pairs-prompts-bad-json", [*PAIRS[:4], "{root}/p.jsonl", *PAIRS[5:]], 2, ("p.jsonl:2", "not valid JSON"),
         {"p.jsonl": '{"text": "a b c"}\n{"text": \n'}),
    Case("pairs-teacher-vocab", [*PAIRS, "--teacher", "{other}"], 2, ("teacher", "vocabulary")),
    Case("pairs-output-not-pairs", PAIRS, 2, ("pairs.jsonl:1", "not a RePAIR pairs file"),
         {"pairs.jsonl": '{"text": "my notes"}\n'}),
    Case("pairs-other-settings", [*PAIRS, "--temperature", "0.5"], 2, ("temperature", "--restart"), setup=_mined),
    Case("pairs-other-student", [*PAIRS[:2], "{teacher}", *PAIRS[3:], "--teacher", "{teacher}"], 2,
         ("student", "--restart"), setup=_mined),
    Case("pairs-top-p", [*PAIRS, "--top-p", "0"], 2, ("top_p", "(0, 1]")),
    Case("pairs-mode", [*PAIRS, "--mode", "chat"], 2, ("--mode", "invalid choice")),
    Case("pairs-student-missing", [*PAIRS[:2], "{root}/nobody", *PAIRS[3:]], 2, ("student", "not found")),
    Case("pairs-threads", [*PAIRS[:-1], "0"], 2, ("--threads", "at least 1")),
    # --- axolotl-focus eval / tiny / demo ---
    Case("eval-name-only", ["eval", "m=", "--output-dir", "{root}/e"], 2, ("m=", "NAME=PATH")),
    Case("eval-path-only", ["eval", "={student}", "--output-dir", "{root}/e"], 2, ("NAME=PATH",)),
    Case("eval-model-missing", ["eval", "a={root}/nope", "--output-dir", "{root}/e"], 2, ("not found", "nope")),
    Case("eval-top-p", ["eval", "{student}", "--top-p", "2", "--output-dir", "{root}/e"], 2, ("top_p",)),
    Case("tiny-steps", ["tiny", "--out", "{root}/t", "--steps", "0"], 2, ("--steps", "at least 1")),
    Case("demo-preset", ["demo", "--preset", "huge", "--out", "{root}/d"], 2, ("--preset", "invalid choice")),
    # --- class 1: non-finite or out-of-range numbers (one finite-float type: FocusArgs, PruneSettings, the CLIs) ---
    Case("temperature-inf", ["validate", "{root}/c.yml"], 1, ("c.yml:15", "focus_temperature", "finite number", "inf"),
         {"c.yml": config(focus_temperature=float("inf"))}),
    Case("temperature-inf-train", ["train", "{root}/c.yml"], 2, ("focus_temperature", "finite number"),
         {"c.yml": config(focus_temperature=float("inf"))}),
    Case("alpha-nan", ["validate", "{root}/c.yml"], 1, ("focus_alpha", "finite number"),
         {"c.yml": config(focus_alpha=float("nan"))}),
    Case("aux-alpha-inf", ["validate", "{root}/c.yml"], 1, ("focus_aux_losses.unlikelihood.alpha", "finite number"),
         {"c.yml": config(focus_aux_losses={"unlikelihood": {"alpha": float("inf")}})}),
    Case("prune-ratio-nan", ["validate", "{root}/c.yml"], 1, ("focus_prune.ratio", "finite number"),
         {"c.yml": config(base_model="{teacher}", focus_prune={**PRUNE, "ratio": float("nan")})}),
    Case("axolotl-key-inf", ["validate", "{root}/c.yml"], 1, ("c.yml:13", "learning_rate", "finite number"),
         {"c.yml": config(learning_rate=float("inf"))}),
    Case("axolotl-key-inf-train", ["train", "{root}/c.yml"], 2, ("learning_rate", "finite number"),
         {"c.yml": config(learning_rate=float("inf"))}),
    Case("teacher-cache-temperature-inf", ["teacher-cache", "{root}/c.yml", "--output", "{root}/tc", "--temperature",
                                           "inf"], 2, ("--temperature", "finite number"), {"c.yml": config()}),
    Case("pairs-temperature-inf", [*PAIRS, "--temperature", "inf"], 2, ("--temperature", "finite number")),
    Case("pairs-threshold-nan", [*PAIRS, "--threshold", "nan"], 2, ("--threshold", "finite number")),
    Case("prune-ratio-inf-cli", ["prune", "--model", "{teacher}", "--output", "{root}/p", "--ratio", "inf"], 2,
         ("--ratio", "finite number")),
    Case("eval-temperature-zero", ["eval", "{student}", "--temperature", "0", "--output-dir", "{root}/e"], 2,
         ("temperature", "must be > 0")),
    Case("eval-seeds-twice", ["eval", "{student}", "--seeds", "1", "1", "--output-dir", "{root}/e"], 2,
         ("seeds", "twice")),
    # --- class 3: input / environment problems: exit 2, one line naming the file (line) or option ---
    Case("config-not-utf8", ["validate", "{root}/c.yml"], 2, ("c.yml:2", "not UTF-8", "0xe9"),
         {"c.yml": b"base_model: x\n# " + LATIN1 + b"\nplugins: []\n"}),
    Case("pairs-file-not-utf8", ["validate", "{root}/c.yml"], 1, ("pairs.jsonl:2", "not UTF-8"),
         {"c.yml": config(datasets=REPAIR_DATA),
          "pairs.jsonl": json.dumps(PAIR).encode() + b"\n" + json.dumps(PAIR).encode().replace(b"cat", LATIN1, 1)}),
    Case("pairs-file-not-utf8-train", ["train", "{root}/c.yml"], 2, ("pairs.jsonl:2", "not UTF-8"),
         {"c.yml": config(datasets=REPAIR_DATA),
          "pairs.jsonl": json.dumps(PAIR).encode() + b"\n" + json.dumps(PAIR).encode().replace(b"cat", LATIN1, 1)}),
    Case("prompts-not-utf8", [*PAIRS[:4], "{root}/p.jsonl", *PAIRS[5:]], 2, ("prompts", "p.jsonl:3", "not UTF-8"),
         {"p.jsonl": b'{"text": "a b c"}\n\n{"text": "' + LATIN1 + b'"}\n'}),
    Case("prompts-text-not-utf8", [*PAIRS[:4], "{root}/p.txt", *PAIRS[5:]], 2, ("prompts", "p.txt:1", "0xe9"),
         {"p.txt": LATIN1 + b" au lait\n"}),
    Case("calibration-not-utf8", ["validate", "{root}/c.yml"], 1, ("focus_prune.calibration", "cal.txt:2", "UTF-8"),
         {"c.yml": config(base_model="{teacher}", focus_prune={**PRUNE, "calibration": "{root}/cal.txt"}),
          "cal.txt": b"one line\n" + LATIN1 + b"\n"}),
    Case("calibration-not-utf8-prune", ["prune", "--model", "{teacher}", "--output", "{root}/p", "--attn-layers", "1",
                                        "3", "--mlp-layers", "1", "3", "--calibration", "{root}/cal.jsonl"], 2,
         ("focus_prune.calibration", "cal.jsonl:1", "not UTF-8"), {"cal.jsonl": b'{"text": "' + LATIN1 + b'"}\n'}),
    Case("eval-documents-not-utf8", ["eval", "{student}", "--documents", "{root}/d.txt", "--output-dir", "{root}/e"],
         2, ("documents", "d.txt:2", "not UTF-8"), {"d.txt": b"first paragraph\n" + LATIN1 + b"\n"}),
    Case("eval-documents-missing", ["eval", "{student}", "--documents", "{root}/d.txt", "--output-dir", "{root}/e"],
         2, ("documents", "d.txt", "not found")),
    Case("student-truncated", ["validate", "{root}/c.yml"], 1, ("base_model", "model.safetensors", "truncated"),
         {"c.yml": config(base_model="{root}/trunc")}, _truncated_student),
    Case("student-truncated-train", ["train", "{root}/c.yml"], 2, ("base_model", "model.safetensors", "truncated"),
         {"c.yml": config(base_model="{root}/trunc")}, _truncated_student),
    Case("prune-model-truncated", ["prune", "--model", "{root}/trunc", "--output", "{root}/p"], 2,
         ("--model", "model.safetensors", "truncated"), setup=_truncated_student),
    Case("pairs-student-truncated", [*PAIRS[:2], "{root}/trunc", *PAIRS[3:], "--teacher", "{teacher}"], 2,
         ("student", "model.safetensors", "truncated"), setup=_truncated_student),
    Case("eval-model-truncated", ["eval", "t={root}/trunc", "--output-dir", "{root}/e"], 2,
         ("t", "model.safetensors", "truncated"), setup=_truncated_student),
    Case("prune-device-gpu0", ["prune", "--model", "{teacher}", "--output", "{root}/p", "--attn-layers", "1", "3",
                               "--mlp-layers", "1", "3", "--device", "gpu0"], 2, ("--device", "gpu0", "not a device")),
    Case("prune-device-missing", ["prune", "--model", "{teacher}", "--output", "{root}/p", "--attn-layers", "1", "3",
                                  "--mlp-layers", "1", "3", "--device", "cuda:7"], 2, ("--device", "cuda:7")),
    Case("pairs-device-gpu0", [*PAIRS, "--device", "gpu0"], 2, ("--device", "gpu0", "not a device")),
    Case("eval-device-missing", ["eval", "{student}", "--device", "cuda:7", "--output-dir", "{root}/e"], 2,
         ("--device", "cuda:7")),
    Case("teacher-cache-device", ["teacher-cache", "{root}/c.yml", "--output", "{root}/tc", "--device", "gpu0"], 2,
         ("--device", "invalid choice"), {"c.yml": config()}),
    # --- class 2: what `axolotl train` refuses, validate refuses first (train: in the register hook) ---
    Case("pairs-empty-file", ["validate", "{root}/c.yml"], 1, ("pairs.jsonl", "no usable RePAIR pair row", "empty"),
         {"c.yml": config(datasets=REPAIR_DATA), "pairs.jsonl": ""}),
    Case("pairs-empty-file-train", ["train", "{root}/c.yml"], 2, ("pairs.jsonl", "no usable RePAIR pair row"),
         {"c.yml": config(datasets=REPAIR_DATA), "pairs.jsonl": ""}),
    Case("pairs-path-a-folder", ["validate", "{root}/c.yml"], 1, ("datasets[1].path", "folder without data files"),
         {"c.yml": config(datasets=REPAIR_DATA[:1] + [{**REPAIR_DATA[1], "path": "{root}/pairs"}]),
          "pairs/notes.md": "not data"}),
    Case("pair-prompt-too-long", ["validate", "{root}/c.yml"], 1,
         ("pairs.jsonl:2", "prompt of", "leaves no room", "sequence_len 64"),
         {"c.yml": config(datasets=REPAIR_DATA), "pairs.jsonl": [PAIR, LONG_PROMPT]}),
    Case("pair-prompt-too-long-train", ["train", "{root}/c.yml"], 2, ("pairs.jsonl:2", "prompt of", "sequence_len 64"),
         {"c.yml": config(datasets=REPAIR_DATA), "pairs.jsonl": [PAIR, LONG_PROMPT]}),
    Case("cache-other-teacher", ["validate", "{root}/c.yml"], 1,
         ("focus_teacher_cache", "was built by the teacher", "moved-student"),
         {"c.yml": config(focus_teacher_cache=CACHED, focus_teacher_model="{moved}")}, _cache),
    Case("cache-other-teacher-train", ["train", "{root}/c.yml"], 2, ("focus_teacher_cache", "built by the teacher"),
         {"c.yml": config(focus_teacher_cache=CACHED, focus_teacher_model="{moved}")}, _cache),
    Case("cache-other-data", ["validate", "{root}/c.yml"], 1, ("focus_teacher_cache", "other data", "datasets"),
         {"c.yml": config(focus_teacher_cache=CACHED, datasets=SFT_DATA), "data.jsonl": [{"text": "Other text."}]},
         _cache),
    Case("cache-other-sequence-len", ["train", "{root}/c.yml"], 2, ("focus_teacher_cache", "other data",
                                                                     "sequence_len 64 - now 128"),
         {"c.yml": config(focus_teacher_cache=CACHED, sequence_len=128)}, _cache),
    Case("cache-shard-truncated", ["validate", "{root}/c.yml"], 1,
         ("focus_teacher_cache", "damaged", "shard-00001", "truncated", "same settings"),
         {"c.yml": config(focus_teacher_cache=CACHED)}, _truncated_shard),
    Case("cache-shard-truncated-train", ["train", "{root}/c.yml"], 2, ("focus_teacher_cache", "shard-00001"),
         {"c.yml": config(focus_teacher_cache=CACHED)}, _truncated_shard),
    Case("sft-data-bad-json", ["validate", "{root}/c.yml"], 1, ("datasets[0].path", "data.jsonl:2", "not valid JSON"),
         {"c.yml": config(datasets=SFT_DATA), "data.jsonl": '{"text": "a"}\n{"text": \n'}),
    Case("sft-data-not-utf8", ["train", "{root}/c.yml"], 2, ("datasets[0].path", "data.jsonl:1", "not UTF-8"),
         {"c.yml": config(datasets=SFT_DATA), "data.jsonl": b'{"text": "' + LATIN1 + b'"}\n'}),
    # --- class 4: a resume that is not the same job; an empty result ---
    Case("pairs-other-prompts", [*PAIRS[:4], "{root}/B.jsonl", *PAIRS[5:]], 2,
         ("prompts=sha256:", "another job", "--restart"), {"B.jsonl": [{"text": "Another prompt, another job."}]},
         _mined),
    Case("teacher-cache-empty", TEACHER_CACHE, 2, ("no training sequence", "sequence_len"),
         {"c.yml": config(datasets=[{**SFT_DATA[0], "type": "alpaca"}]),
          "data.jsonl": [{"instruction": " ".join(["A long instruction."] * 40), "output": "Yes."}]},
         axolotl_cache=True),
    Case("teacher-cache-k-too-large", [*TEACHER_CACHE[:5], "100000", *TEACHER_CACHE[6:]], 2,
         ("--k", "100000", "exceeds the vocabulary"), {"c.yml": config(focus_teacher_model="{teacher}")}),
    # --- class 5: two writers, one output (one lock helper: pairs, teacher cache, pruned checkpoint) ---
    Case("pairs-second-writer", PAIRS, 2, ("pairs.jsonl", "another process (PID 4242)", "--output"),
         setup=_locked("pairs.jsonl")),
    Case("teacher-cache-second-writer", TEACHER_CACHE, 2, ("tc", "another process (PID 4242)"), {"c.yml": config()},
         _locked("tc")),
    Case("prune-second-writer", ["prune", "--model", "{teacher}", "--output", "{root}/p", "--attn-layers", "1", "3",
                                 "--mlp-layers", "1", "3"], 2, ("p", "another process (PID 4242)"), setup=_locked("p")),
    Case("pairs-written-twice", ["validate", "{root}/c.yml"], 1, ("pairs.jsonl:3", "duplicate source_id '1'",
                                                                   "pairs.jsonl:1"),
         {"c.yml": config(datasets=REPAIR_DATA), "pairs.jsonl": [PAIR, {**PAIR, "source_id": "2"}, PAIR]}),
    # --- class 6: questionable input is refused, in one short line ---
    Case("prompts-json-array-of-strings", [*PAIRS[:4], "{root}/p.json", *PAIRS[5:]], 2,
         ("prompts", "p.json[0]", "JSON str", "not an object with a text field"),
         {"p.json": json.dumps([" ".join(["A prompt that is only a string."] * 100)] * 3)}),
    Case("prompt-text-an-object", [*PAIRS[:4], "{root}/p.jsonl", *PAIRS[5:]], 2,
         ("prompts", "p.jsonl:2", "field 'text' is a JSON dict"),
         {"p.jsonl": [{"text": "A fine prompt."}, {"text": {"en": "A prompt", "fr": "Un prompt"}}]}),
    Case("config-duplicate-key", ["validate", "{root}/c.yml"], 2,
         ("c.yml:16", "duplicate key focus_alpha", "first at line 15"),
         {"c.yml": yaml.safe_dump(config(), sort_keys=False) + "focus_alpha: 0.1\nfocus_alpha: 0.5\n"}),
    Case("config-duplicate-key-train", ["train", "{root}/c.yml"], 2, ("c.yml:16", "duplicate key focus_alpha"),
         {"c.yml": yaml.safe_dump(config(), sort_keys=False) + "focus_alpha: 0.1\nfocus_alpha: 0.5\n"}),
    Case("config-duplicate-nested-key", ["validate", "{root}/c.yml"], 2, ("c.yml:17", "duplicate key ratio"),
         {"c.yml": yaml.safe_dump(config(base_model="{teacher}"), sort_keys=False)
          + "focus_prune:\n  ratio: 0.2\n  ratio: 0.3\n"}),
    Case("pair-chosen-equals-rejected", ["validate", "{root}/c.yml"], 1, ("pairs.jsonl:2", "the same text"),
         {"c.yml": config(datasets=REPAIR_DATA), "pairs.jsonl": [PAIR, {**PAIR, "rejected": PAIR["chosen"]}]}),
    Case("pairs-prompt-beyond-context", [*PAIRS[:4], "{root}/p.jsonl", *PAIRS[5:], "--mode", "instruction"], 2,
         ("prompts", "1 of 2 prompts", "context of 512 tokens", "--max-new-tokens 8"),
         {"p.jsonl": [{"text": "Say hi."}, {"text": " ".join(["The long instruction goes on."] * 150)}]}),
    Case("pairs-budget-beyond-context", [*PAIRS, "--max-new-tokens", "600"], 2,
         ("max_new_tokens", "--max-new-tokens 600", "context (512 tokens")),
    Case("eval-budget-beyond-context", ["eval", "{student}", "--max-new-tokens", "600", "--output-dir", "{root}/e"],
         2, ("max_new_tokens", "exceed the context", "512 tokens")),
    Case("calibration-beyond-context", ["validate", "{root}/c.yml"], 1,
         ("focus_prune.calib_seq_len", "longer than the model's context", "512"),
         {"c.yml": config(base_model="{teacher}", focus_prune={**PRUNE, "calib_seq_len": 1024})}),
    Case("prune-ratio-and-target", ["validate", "{root}/c.yml"], 1,
         ("focus_prune", "ratio and target_param_reduction", "give one"),
         {"c.yml": config(base_model="{teacher}", focus_prune={**PRUNE, "ratio": 0.3, "target_param_reduction": 0.2})}),
    Case("prune-ratio-and-target-cli", ["prune", "--model", "{teacher}", "--output", "{root}/p", "--ratio", "0.3",
                                        "--target-param-reduction", "0.2"], 2,
         ("ratio and target_param_reduction", "give one")),
    Case("prune-depth-setting-for-width", ["validate", "{root}/c.yml"], 1,
         ("focus_prune", "num_blocks", "not used by method: width"),
         {"c.yml": config(base_model="{teacher}", focus_prune={**PRUNE, "num_blocks": 2})}),
    Case("prune-uniform-with-ranges", ["prune", "--model", "{teacher}", "--output", "{root}/p", "--uniform",
                                       "--attn-layers", "1", "3"], 2, ("uniform", "remove attn_layers")),
]


@pytest.fixture(scope="module")
def models(tiny_pair, tmp_path_factory):
    """The tiny teacher / student, a teacher with another vocabulary, a student whose recorded
    source was moved away."""
    root = tmp_path_factory.mktemp("bad-models")
    other = root / "other-teacher"
    tokenizer = build_tokenizer(corpus_documents("valid")[:100], vocab_size=300)
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(llama_config(tokenizer, layers=2)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    moved = root / "moved-student"
    shutil.copytree(tiny_pair["student"], moved)
    config_file = moved / "config.json"
    data = json.loads(config_file.read_text())
    data["focus_source_model"] = str(root / "teacher-that-was-moved")
    config_file.write_text(json.dumps(data))
    return {"teacher": tiny_pair["teacher"], "student": tiny_pair["student"], "train": tiny_pair["train"],
            "other": str(other), "moved": str(moved)}


def _fill(value, names: dict):
    if isinstance(value, str):
        return re.sub(r"\{(\w+)\}", lambda m: names.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


def _write(root: Path, files: dict, names: dict) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        content = _fill(content, names)
        if isinstance(content, bytes):
            path.write_bytes(content)
            continue
        if isinstance(content, dict):
            content = yaml.safe_dump(content, sort_keys=False)
        elif isinstance(content, list):
            content = "".join(json.dumps(row) + "\n" for row in content)
        path.write_text(content, encoding="utf-8")


def snapshot(*folders) -> dict[str, str]:
    """sha256 of every file under the folders (the state that must not change)."""
    out = {}
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(dirpath, name)
                out[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def run_case(case: Case, argv: list[str]) -> tuple[int, str]:
    """(exit code, error text) of a CLI or train case."""
    if argv[0] == "train":
        from axolotl.cli.config import load_cfg

        try:
            load_cfg(argv[1])
        except ValueError as exc:
            return 2, str(exc)
        return 0, ""
    from axolotl_focus.cli import main

    try:
        return main(argv), ""
    except SystemExit as exc:  # argparse
        return int(exc.code or 0), ""


def test_the_suite_is_large_enough():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, models, tmp_path, capsys, plugin_manager, one_thread):
    names = {**models, "root": str(tmp_path)}
    _write(tmp_path, case.files, names)
    if case.setup:
        case.setup(tmp_path, models)
    capsys.readouterr()
    before = snapshot(tmp_path, *(models[k] for k in ("teacher", "student", "other", "moved")))
    try:
        code, raised = run_case(case, [_fill(a, names) for a in case.argv])
    finally:
        while _LOCKS:
            os.close(_LOCKS.pop())
    captured = capsys.readouterr()
    text = raised or captured.err + captured.out
    assert code == case.code, text
    if os.environ.get("BAD_INPUTS_DUMP"):  # read the messages: BAD_INPUTS_DUMP=file pytest tests/test_bad_inputs.py
        with open(os.environ["BAD_INPUTS_DUMP"], "a", encoding="utf-8") as handle:
            handle.write(f"## {case.id} (exit {code})\n{text.strip()}\n\n")
    assert "Traceback" not in text
    for word in case.words:
        assert word.lower() in text.lower(), (word, text)
    if case.argv[0] not in ("validate", "train"):
        # the error is one line (argparse: its `error:` line after the usage), and a short one
        mark = "error:" if text.startswith("usage:") else case.words[0]
        line = next(line for line in text.splitlines() if mark.lower() in line.lower())
        assert all(w.lower() in line.lower() for w in case.words), (line, text)
        assert len(line.replace(str(tmp_path), "ROOT")) < 500, line
    after = snapshot(tmp_path, *(models[k] for k in ("teacher", "student", "other", "moved")))
    if case.axolotl_cache:
        after = {k: v for k, v in after.items() if k in before or not k.startswith(
            (str(tmp_path / "prepared") + os.sep, str(tmp_path / "out" / "debug.log")))}
    assert after == before


def test_validate_loads_no_weights_and_writes_nothing(models, tmp_path, capsys, plugin_manager, monkeypatch):
    """Finding 1: validate of a `focus_prune:` config plans the pruning (cache miss, parameter cut)
    without loading the model, scoring, pruning or writing the cache."""
    import transformers

    from axolotl_focus.cli import main

    def no_weights(*args, **kwargs):
        raise AssertionError("validate loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    names = {**models, "root": str(tmp_path)}
    _write(tmp_path, {"c.yml": config(base_model="{teacher}", focus_prune=PRUNE)}, names)
    before = snapshot(tmp_path)
    assert main(["validate", str(tmp_path / "c.yml")]) == 0
    out = capsys.readouterr().out
    assert "valid - dry check" in out and "cache miss" in out and "parameters (-" in out, out
    assert snapshot(tmp_path) == before and not (tmp_path / "cache").exists()


def test_every_option_of_every_command_is_described():
    """Finding 9: `--help` of every command describes each option (choices and defaults are shown
    by argparse / stated in the text)."""
    from axolotl_focus.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"validate", "model", "tiny", "prune", "pairs", "eval", "demo"} <= set(commands)
    for name, command in commands.items():
        for action in command._actions:
            if action.dest != "help":
                assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}"


def test_debug_shows_the_traceback(tmp_path, capsys):
    from axolotl_focus.cli import main

    assert main(["prune", "--model", str(tmp_path / "none"), "--output", str(tmp_path / "p")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not exist"):
        main(["--debug", "prune", "--model", str(tmp_path / "none"), "--output", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="does not exist"):
        main(["prune", "--debug", "--model", str(tmp_path / "none"), "--output", str(tmp_path / "p")])


def test_disk_full_while_pruning_is_one_line_and_keeps_nothing(models, tmp_path, capsys, monkeypatch, one_thread):
    """Class 3: the disk fills up while the pruned checkpoint is written (safetensors' own error, as
    save_pretrained raises it): exit 2, one line naming the output, no temporary folder left."""
    from axolotl_focus.cli import main
    from axolotl_focus.prune import checkpoint

    class SafetensorError(Exception):  # safetensors' error type, by name
        pass

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(checkpoint, "save_pruned", full)
    argv = ["prune", "--model", models["teacher"], "--output", str(tmp_path / "p"), "--attn-layers", "1", "3",
            "--mlp-layers", "1", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "writing the pruned checkpoint" in err and str(tmp_path / "p") in err and "StorageFull" in err, err
    assert list(tmp_path.iterdir()) == []


# --- class 7: no noise, no slowness ---

def _run_cli(*argv: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``axolotl-focus ARGV`` in a fresh process: the result and the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "axolotl_focus.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_are_fast_and_import_neither_torch_nor_axolotl(flag):
    heavy = ("torch", "transformers", "axolotl", "datasets", "numpy")
    code = (f"import sys\nfrom axolotl_focus.cli import main\ntry:\n    main([{flag!r}])\n"
            f"except SystemExit:\n    pass\nprint(sorted(m for m in {heavy!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
    result, cpu = _run_cli(flag)
    assert result.returncode == 0 and result.stderr == "" and cpu < 1.0, (cpu, result.stderr)


NOISE = ("Failed to load", "_pytree", "TRLExperimentalWarning", "Skipping publisher trust", "Retrying in")


def test_a_command_prints_no_third_party_noise(models, tmp_path):
    """`validate` of a valid config: the account on stdout, on stderr nothing from other packages
    (torchao, torch's pytree, TRL, bitsandbytes) unless --debug."""
    names = {**models, "root": str(tmp_path)}
    _write(tmp_path, {"c.yml": config()}, names)
    result, _ = _run_cli("validate", str(tmp_path / "c.yml"))
    assert result.returncode == 0 and "valid - dry check" in result.stdout, result.stdout + result.stderr
    assert not [line for line in result.stderr.splitlines() if any(n in line for n in NOISE)], result.stderr


def test_an_unreachable_hub_is_treated_like_offline(models, tmp_path, capsys, plugin_manager, monkeypatch, caplog):
    """Without HF_HUB_OFFLINE and without network: one warning line, and the verdict of an offline run
    (a hub teacher 'not checked'), never a half-failed request."""
    from huggingface_hub import constants

    from axolotl_focus import locations
    from axolotl_focus.cli import main

    names = {**models, "root": str(tmp_path)}
    _write(tmp_path, {"c.yml": config(focus_teacher_model="no-such-org/no-such-model")}, names)
    assert main(["validate", str(tmp_path / "c.yml")]) == 0
    offline = capsys.readouterr().out
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(locations, "_UNREACHABLE", [])
    monkeypatch.setattr(locations, "_hub_unreachable", lambda endpoint: "huggingface.co:443: Name or service not known")
    try:
        assert main(["validate", str(tmp_path / "c.yml")]) == 0
        captured = capsys.readouterr()
        assert captured.out == offline and "not checked" in offline
        said = captured.err if "cannot be reached" in captured.err else caplog.text  # its handler, or pytest's
        assert said.count("cannot be reached") == 1 and "working offline, as with HF_HUB_OFFLINE=1" in said, said
    finally:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"


# --- class 8: a question in a library call ---

def test_a_pruned_checkpoint_asks_no_question(models, tmp_path):
    """A width-pruned checkpoint written by `axolotl-focus prune`, in a fresh process that never
    imported axolotl_focus, stdin closed: AutoTokenizer asks nothing; AutoModelForCausalLM without
    trust_remote_code refuses the narrowed weights (never a wrong model), with it loads the pruned
    class. (The full matrix, old format included: tests/prune/test_pruning.py.)"""
    from axolotl_focus.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", "--model", models["teacher"], "--output", str(out), "--attn-layers", "1", "3",
                 "--mlp-layers", "1", "3", "--ratio", "0.5", "--calib-samples", "2", "--threads", "1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["PrunedLlamaForCausalLM"]
    script = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForCausalLM, AutoTokenizer
        print("TOKENS", AutoTokenizer.from_pretrained({str(out)!r})("The game began .")["input_ids"])
        try:
            AutoModelForCausalLM.from_pretrained({str(out)!r})
            print("LOADED WITHOUT trust_remote_code")
        except Exception as exc:
            print("REFUSED", type(exc).__name__)
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        print("CLASS", type(model).__name__)
        assert not [m for m in sys.modules if m.startswith("axolotl_focus")]
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    said = result.stdout + result.stderr
    assert result.returncode == 0 and "[y/N]" not in said and "TOKENS [" in said, said[-3000:]
    assert "REFUSED RuntimeError" in said and "CLASS PrunedLlamaForCausalLM" in said, said[-3000:]
