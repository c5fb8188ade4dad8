"""`focus_prune:` / `axolotl-focus prune`: validation first, atomic cached checkpoints, config rewrite."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from axolotl_focus.prune.cache import REPORT_FILE, apply_to_config, cache_path, ensure_pruned, run_prune
from axolotl_focus.prune.settings import PruneSettings

TINY_RANGES = {"attn_layers": [1, 3], "mlp_layers": [1, 3]}


def spec(tmp_path, **kw):
    width = {"ratio": 0.5, **TINY_RANGES} if kw.get("method", "width") == "width" else {}  # depth refuses them
    return PruneSettings(**{"cache_dir": str(tmp_path / "cache"), "calib_samples": 4} | width | kw)


@pytest.fixture
def no_log_handlers(monkeypatch):
    """The `axolotl_focus` logger as a fresh process has it (the plugin, once imported, adds a handler)."""
    logger = logging.getLogger("axolotl_focus")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    return logger


def test_cli_prune_without_config(tiny_pair, tmp_path, capsys, no_log_handlers):
    from transformers import AutoModelForCausalLM

    from axolotl_focus.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", "--model", tiny_pair["teacher"], "--ratio", "0.5", "--output", str(out),
                 "--attn-layers", "1", "3", "--mlp-layers", "1", "3", "--calib-samples", "4"]) == 0
    captured = capsys.readouterr()
    assert "achieved reduction" in captured.out
    # the pruning summary is logged: nominal ratio, per-layer shapes, achieved reduction
    assert "nominal per-layer ratio 0.5" in captured.err and "achieved reduction" in captured.err
    assert "layers 0-0: 4 q heads, 2 kv heads" in captured.err
    assert "layers 1-2: 2 q heads, 1 kv heads" in captured.err
    assert captured.err.count("layers 1-2:") == 1  # logged once
    assert no_log_handlers.handlers == [] and no_log_handlers.propagate  # the logger is left as it was
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["PrunedLlamaForCausalLM"]
    assert config["focus_source_model"] == tiny_pair["teacher"]
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["params_after"] < report["params_before"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    assert [s["num_attention_heads"] for s in config["layer_shapes"]] == [4, 2, 2, 4]
    # never overwrite what is there
    with pytest.raises(FileExistsError):
        run_prune(tiny_pair["teacher"], spec(tmp_path), out)
    assert (out / "model.safetensors").is_file()


def test_cli_prune_depth_options_and_cached_config(tiny_pair, tmp_path, capsys, no_log_handlers):
    import yaml

    from axolotl_focus.cli import main

    out = tmp_path / "depth"
    assert main(["prune", "--model", tiny_pair["teacher"], "--method", "depth", "--num-blocks", "1",
                 "--protected-first", "1", "--protected-last", "2", "--dtype", "float32",
                 "--calib-samples", "2", "--output", str(out)]) == 0
    assert "removed blocks [1]" in capsys.readouterr().err  # only block 1 is not protected
    report = json.loads((out / REPORT_FILE).read_text())
    assert (report["metadata"]["protected_first"], report["metadata"]["protected_last"]) == (1, 2)

    config = tmp_path / "cfg.yml"
    config.write_text(yaml.safe_dump({"base_model": tiny_pair["teacher"], "focus_prune": spec(tmp_path).model_dump()}))
    assert main(["prune", str(config)]) == 0
    first = capsys.readouterr()
    assert main(["prune", str(config)]) == 0  # reused from the cache: the stored summary is shown
    second = capsys.readouterr()
    assert second.out == first.out and "layers 1-2: 2 q heads" in first.err and "layers 1-2: 2 q heads" in second.err
    assert "reusing cached" in second.err


def smollm2_layout(tiny_pair, folder) -> str:
    """SmolLM2-135M's layout in small (9 q heads in 3 KV groups, tied embeddings), saved with the
    tiny tokenizer loaded from disk (so transformers writes its machine-local tokenizer keys)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=72, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_cli_prune_explains_gqa_group_rounding(tiny_pair, tmp_path, capsys, no_log_handlers):
    from axolotl_focus.cli import main

    source, out = smollm2_layout(tiny_pair, tmp_path / "smol"), tmp_path / "pruned"
    assert main(["prune", "--model", source, "--ratio", "0.25", "--output", str(out), "--attn-layers", "1", "3",
                 "--mlp-layers", "1", "3", "--calib-samples", "2", "--calib-seq-len", "16"]) == 0
    captured = capsys.readouterr()
    why = "3 KV groups of 3 q heads (whole groups); ratio 0.25 removes floor(3*0.25)=0 groups -> attention unpruned"
    assert "[WARNING]" in captured.err and captured.err.count(why) == 2  # the warning and the summary
    assert "(requested nominal per-layer ratio 0.25; achieved reduction" in captured.err
    assert "--ratio >= 0.3334 (removes 1 group) or --target-param-reduction" in captured.err
    report = json.loads((out / REPORT_FILE).read_text())
    assert why in report["notes"]["attention"] and "ceil(96*0.25)=24 channels" in report["notes"]["mlp"]
    assert [s["num_key_value_heads"] for s in report["layer_shapes"]] == [3, 3, 3, 3]
    assert (f"(requested nominal per-layer ratio 0.25; achieved reduction {report['achieved_reduction']:.2%} of "
            "all parameters)") in captured.out


def test_cli_prune_help_tells_ratio_from_target(capsys):
    from axolotl_focus.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--ratio RATIO nominal per-layer width ratio (LLM-Pruner's pruning ratio)" in text
    assert "the parameter cut is smaller" in text and "(default: 0.25)" in text
    assert "the fraction of ALL parameters to remove (embeddings included): the per-layer ratio is solved" in text


def test_pruned_checkpoint_is_machine_independent(tiny_pair, tmp_path):
    """Nothing of this machine in the checkpoint but focus_source_model (and pruning.source_model);
    its tokenizer loads with AutoTokenizer alone, in a fresh process that never imports axolotl_focus,
    with stdin closed."""
    from transformers import AutoTokenizer

    from axolotl_focus.embedded_model import LOCAL_KEYS

    source, out = smollm2_layout(tiny_pair, tmp_path / "smol"), tmp_path / "pruned"
    written = json.loads((tmp_path / "smol" / "tokenizer_config.json").read_text())
    assert {"is_local", "local_files_only"} <= set(written)  # what fix_tokenizer_config removes
    run_prune(source, spec(tmp_path, ratio=0.4), out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["focus_source_model"] == source
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert not set(LOCAL_KEYS) & set(tokenizer_config)
    assert tokenizer_config["tokenizer_class"] == type(AutoTokenizer.from_pretrained(source)).__name__

    def local(value, where=""):  # (key path, string) of every string naming a path of this machine
        if isinstance(value, dict):
            return [hit for k, v in value.items() for hit in local(v, f"{where}.{k}")]
        if isinstance(value, list):
            return [hit for i, v in enumerate(value) for hit in local(v, f"{where}[{i}]")]
        return [(where, value)] if isinstance(value, str) and str(tmp_path) in value else []

    found = {name: local(json.loads((out / name).read_text())) for name in os.listdir(out)
             if name.endswith(".json") and name != REPORT_FILE}
    assert found.pop("config.json") == [(".focus_source_model", source), (".pruning.source_model", source)]
    assert not [hit for hits in found.values() for hit in hits], found

    script = textwrap.dedent(f"""
        import sys
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
        print("LOADED", type(tokenizer).__name__, tokenizer("The game began .")["input_ids"])
        assert not [m for m in sys.modules if m == "axolotl_focus" or m.startswith("axolotl_focus.")]
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    # the config is transformers' own llama config: AutoTokenizer (which reads it first) asks nothing
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[y/N]" not in result.stdout + result.stderr and "trust_remote_code" not in result.stdout + result.stderr
    expected = AutoTokenizer.from_pretrained(source)
    loaded = result.stdout.rpartition("LOADED ")[2].strip()
    assert loaded == f"{type(expected).__name__} {expected('The game began .')['input_ids']}", result.stdout


@pytest.mark.parametrize("argv,match", [
    (["--attn-layers", "0", "99"], "attn_layers=[0, 99]"),
    (["--ratio", "0.99", "--attn-layers", "0", "4", "--mlp-layers", "0", "4"], "removes every"),
    ([], "exists already"),
])
def test_cli_prune_bad_input_is_one_line(tiny_pair, tmp_path, capsys, argv, match):
    from axolotl_focus.cli import main

    out = tmp_path / "out"
    if not argv:
        out.mkdir()
    assert main(["prune", "--model", tiny_pair["teacher"], "--output", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("axolotl-focus prune: ") and match in err and "Traceback" not in err


def test_cli_prune_options_come_from_the_schema():
    from axolotl_focus.cli import build_parser

    args = build_parser().parse_args(["prune", "--model", "m", "--output", "o", "--dtype", "bfloat16",
                                      "--calibration-split", "validation", "--calibration-field", "body",
                                      "--calibration-config", "c", "--attn-layers", "1", "3", "--no-uniform",
                                      "--importance", "vectorize"])
    given = {k: v for k, v in vars(args).items() if k in PruneSettings.model_fields and v is not None}
    assert PruneSettings.model_validate(given).model_dump(exclude_defaults=True) == {
        "dtype": "bfloat16", "calibration_split": "validation", "calibration_field": "body",
        "calibration_config": "c", "attn_layers": [1, 3], "importance": "vectorize",
    }
    args = build_parser().parse_args(["prune", "--method", "depth", "--protected-first", "2", "--protected-last", "1",
                                      "--num-blocks", "3"])
    given = {k: v for k, v in vars(args).items() if k in PruneSettings.model_fields and v is not None}
    assert PruneSettings.model_validate(given).model_dump(exclude_defaults=True) == {
        "method": "depth", "protected_first": 2, "protected_last": 1, "num_blocks": 3}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--dtype", "float64"])
    missing = {k for k in PruneSettings.model_fields if k not in vars(args)}
    assert missing == {"wait_timeout"}


class FakeStream:
    """A streamed hub split: records shuffle/take and how many rows were read."""

    def __init__(self, rows):
        self.rows, self.calls, self.read = rows, [], 0

    def shuffle(self, seed, buffer_size):
        self.calls.append(("shuffle", seed, buffer_size))
        return self

    def take(self, n):
        self.calls.append(("take", n))
        return self

    def __iter__(self):
        for row in self.rows:
            self.read += 1
            yield row


def test_hub_calibration_is_streamed_with_its_config(tiny_pair, tmp_path, monkeypatch):
    from axolotl_focus.micro import corpus_documents
    from axolotl_focus.prune.calibration import load_calibration_texts

    docs = [d for d in corpus_documents("valid") if len(d.split()) >= 64]
    rows = [{"text": ""}, {"text": "short"}] + [{"text": d} for d in docs] * 50
    stream, seen = FakeStream(rows), []

    def load_dataset(path, name=None, *, split=None, streaming=False, **kwargs):
        seen.append((path, name, split, streaming))
        return stream

    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    s = spec(tmp_path, calibration="Salesforce/wikitext", calibration_config="wikitext-2-raw-v1",
             calibration_split="validation", seed=3)
    texts, description = load_calibration_texts(s)
    assert seen == [("Salesforce/wikitext", "wikitext-2-raw-v1", "validation", True)]
    assert stream.calls[0][:2] == ("shuffle", 3) and stream.calls[1][0] == "take"
    assert texts == ["short"] + docs[:4] and stream.read == 6  # stops once calib_samples texts are long enough
    assert "wikitext-2-raw-v1" in description and "[validation]" in description

    report = run_prune(tiny_pair["teacher"], s, tmp_path / "out")
    assert "wikitext-2-raw-v1" in report["metadata"]["calibration"]["dataset"]
    assert cache_path(tiny_pair["teacher"], s) != cache_path(tiny_pair["teacher"], spec(
        tmp_path, calibration="Salesforce/wikitext", calibration_config="wikitext-103-raw-v1",
        calibration_split="validation", seed=3))
    with pytest.raises(ValueError, match="no 'body' column"):
        load_calibration_texts(spec(tmp_path, calibration="Salesforce/wikitext", calibration_field="body"))


def test_cache_is_reused_and_keyed_by_settings(tiny_pair, tmp_path, monkeypatch):
    first = ensure_pruned(tiny_pair["teacher"], spec(tmp_path))
    assert (first / REPORT_FILE).is_file()
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temp folder left

    def boom(*a, **k):
        raise AssertionError("pruned again")

    monkeypatch.setattr("axolotl_focus.prune.cache.run_prune", boom)
    assert ensure_pruned(tiny_pair["teacher"], spec(tmp_path)) == first
    assert cache_path(tiny_pair["teacher"], spec(tmp_path, ratio=0.25)) != first
    assert cache_path(tiny_pair["teacher"], spec(tmp_path, seed=1)) != first


def test_other_ranks_wait_for_rank_zero(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(TimeoutError, match="rank 0 did not finish"):
        ensure_pruned(tiny_pair["teacher"], spec(tmp_path, wait_timeout=0.01))
    monkeypatch.setenv("RANK", "0")
    path = ensure_pruned(tiny_pair["teacher"], spec(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert ensure_pruned(tiny_pair["teacher"], spec(tmp_path)) == path


def test_apply_to_config_rewrites_base_model_and_teacher(tiny_pair, tmp_path):
    cfg = {"base_model": tiny_pair["teacher"], "tokenizer_config": tiny_pair["teacher"],
           "focus_prune": spec(tmp_path).model_dump()}
    apply_to_config(cfg)
    assert cfg["focus_teacher_model"] == tiny_pair["teacher"] == cfg["focus_pruned_from"]
    assert cfg["base_model"] == cfg["tokenizer_config"] == str(cache_path(tiny_pair["teacher"], spec(tmp_path)))
    before = dict(cfg)
    apply_to_config(cfg)  # idempotent
    assert cfg == before


@pytest.mark.parametrize("block,match", [
    ({"ratio": 1.5}, "ratio"),
    ({"ratio": 0}, "ratio"),
    ({"method": "channels"}, "method"),
    ({"ratoi": 0.2}, "ratoi"),
])
def test_bad_prune_options_are_rejected_by_the_schema(block, match):
    with pytest.raises(ValidationError, match=match):
        PruneSettings.model_validate(block)


@pytest.mark.parametrize("kw,match", [
    ({"attn_layers": [0, 99]}, "attn_layers"),
    ({"ratio": 0.99, "attn_layers": [0, 4], "mlp_layers": [0, 4]}, "removes every"),
])
def test_bad_ranges_fail_before_weights_load(tiny_pair, tmp_path, monkeypatch, kw, match):
    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before validation")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    with pytest.raises(ValueError, match=match):
        run_prune(tiny_pair["teacher"], spec(tmp_path, **kw), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unsupported_architecture(tmp_path):
    from transformers import MistralConfig

    MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100).save_pretrained(tmp_path / "mistral")
    with pytest.raises(ValueError, match="unsupported architecture"):
        run_prune(str(tmp_path / "mistral"), PruneSettings(), tmp_path / "out")


def test_calibration_jsonl_errors_name_file_and_line(tiny_pair, tmp_path):
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"calib.jsonl:2"):
        run_prune(tiny_pair["teacher"], spec(tmp_path, calibration=str(bad)), tmp_path / "x")
    with pytest.raises(ValueError, match="does not exist"):
        run_prune(tiny_pair["teacher"], spec(tmp_path, calibration=str(tmp_path / "missing.txt")), tmp_path / "x")


def test_attention_lora_kernels_are_turned_off_for_pruned_llama(tmp_path):
    import json

    import pytest

    from axolotl_focus.prune.cache import disable_attention_lora_kernels

    for width_pruned in ({"model_type": "pruned_llama"}, {"model_type": "llama", "layer_shapes": []}):  # old, new
        (tmp_path / "config.json").write_text(json.dumps(width_pruned))
        cfg = {"base_model": str(tmp_path), "adapter": "lora"}
        disable_attention_lora_kernels(cfg)
        assert cfg["lora_qkv_kernel"] is False and cfg["lora_o_kernel"] is False
    assert "lora_mlp_kernel" not in cfg  # axolotl's MLP kernel does not depend on the model type
    with pytest.raises(ValueError, match="lora_qkv_kernel"):
        disable_attention_lora_kernels({"base_model": str(tmp_path), "adapter": "lora", "lora_qkv_kernel": True})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    vanilla = {"base_model": str(tmp_path), "adapter": "lora"}
    disable_attention_lora_kernels(vanilla)
    assert "lora_qkv_kernel" not in vanilla


def overwrite_weights(folder, seed):
    """Retrain stand-in: the same architecture with other random weights, saved over `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig.from_pretrained(folder)).save_pretrained(folder)


def test_changed_source_is_pruned_again(tiny_pair, tmp_path, caplog):
    import shutil

    from safetensors.torch import load_file

    from axolotl_focus.prune.cache import source_fingerprint

    src = tmp_path / "src"
    shutil.copytree(tiny_pair["teacher"], src)
    s, fingerprint = spec(tmp_path), source_fingerprint(str(src))
    first = ensure_pruned(str(src), s)
    assert json.loads((first / REPORT_FILE).read_text())["source_fingerprint"] == fingerprint
    with caplog.at_level(logging.INFO, logger="axolotl_focus"):
        assert ensure_pruned(str(src), s) == first  # unchanged: a hit
    assert "reusing cached pruned checkpoint" in caplog.text and source_fingerprint(str(src)) == fingerprint

    overwrite_weights(src, seed=1)
    changed = source_fingerprint(str(src))
    assert changed["weights"]["model.safetensors"]["sample"] != fingerprint["weights"]["model.safetensors"]["sample"]
    assert changed["weights"]["model.safetensors"]["header"] == fingerprint["weights"]["model.safetensors"]["header"]
    second = ensure_pruned(str(src), s)  # a miss: pruned again into a new folder
    assert second != first and second == cache_path(str(src), s)
    assert json.loads((second / REPORT_FILE).read_text())["source_fingerprint"] == changed
    old, new = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert old.keys() == new.keys() and any(not old[k].equal(new[k]) for k in old)

    # a checkpoint of another version under the current key (a digest collision, a copy by hand) is not
    # reused nor overwritten: the warning names the changed file and the source is pruned into a sibling
    overwrite_weights(src, seed=2)
    key = cache_path(str(src), s)
    shutil.copytree(first, key)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="axolotl_focus"):
        third = ensure_pruned(str(src), s)
    assert "was pruned from another version" in caplog.text and "changed: model.safetensors" in caplog.text
    assert third.name.startswith(f"{key.name}-") and third.parent == key.parent
    assert json.loads((key / REPORT_FILE).read_text())["source_fingerprint"] == fingerprint  # left as it was
    assert json.loads((third / REPORT_FILE).read_text())["source_fingerprint"] == source_fingerprint(str(src))
    assert ensure_pruned(str(src), s) == third


def test_fingerprint_samples_without_loading_weights(tmp_path, monkeypatch):
    import hashlib
    import time

    from axolotl_focus.prune.cache import source_fingerprint

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    for target in ("safetensors.safe_open", "safetensors.torch.load_file", "torch.load"):
        monkeypatch.setattr(target, no_weights)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "README.md").write_text("not part of the fingerprint")
    (folder / "extra.bin").write_bytes(os.urandom(1000))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 32], "data_offsets": [0, 1 << 34]}}).encode()
    weights, size = folder / "model.safetensors", 16 << 30  # 16 GiB, sparse: random bytes around a valid header
    with open(weights, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header + os.urandom(1 << 20))
        handle.truncate(size)
    start = time.monotonic()
    first = source_fingerprint(str(folder))
    assert time.monotonic() - start < 10
    assert first == source_fingerprint(str(folder))  # stable
    assert list(first["weights"]) == ["extra.bin", "model.safetensors"] and first["tokenizer"] == {}
    entry = first["weights"]["model.safetensors"]
    assert entry["size"] == size and entry["header"] == hashlib.sha256(header).hexdigest()
    assert first["weights"]["extra.bin"]["header"] is None

    with open(weights, "r+b") as handle:  # one byte inside a sampled block, far from the header
        handle.seek(32 * (size - (1 << 16)) // 64 + 5)
        handle.write(b"\x01")
    changed = source_fingerprint(str(folder))
    assert changed["weights"]["model.safetensors"]["sample"] != entry["sample"]
    assert changed["weights"]["model.safetensors"]["header"] == entry["header"] and changed["config"] == first["config"]
    spec_ = PruneSettings(cache_dir=str(tmp_path / "cache"))
    assert cache_path(str(folder), spec_, first) != cache_path(str(folder), spec_) == cache_path(str(folder), spec_)
    (folder / "config.json").write_text('{"model_type": "llama", "x": 1}')
    assert source_fingerprint(str(folder))["config"] != first["config"]


def fake_hub_cache(root, repo_id, sha, config_from=None):
    snapshot = root / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(sha)
    if config_from:
        (snapshot / "config.json").write_text((config_from / "config.json").read_text())
    return snapshot


def test_hub_fingerprint_and_plan(tiny_pair, tmp_path, monkeypatch, caplog):
    from pathlib import Path
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import constants

    from axolotl_focus.prune.cache import plan_prune, source_fingerprint

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_hub_cache(tmp_path / "hub", "org/tiny", "abc123", config_from=Path(tiny_pair["teacher"]))
    assert source_fingerprint("org/tiny") == {"hub": "org/tiny", "revision": "abc123"}
    s = spec(tmp_path)
    plan, local = plan_prune("org/tiny", s), plan_prune(tiny_pair["teacher"], s)
    assert plan["config"] == str(snapshot / "config.json") and plan["params_after"] == local["params_after"]
    assert plan["note"] is None and not plan["cached"]

    with caplog.at_level(logging.WARNING, logger="axolotl_focus"):  # offline, not cached: a note, no error
        missing = plan_prune("org/absent", s)
    assert missing["config"] is None and "offline" in missing["note"] and missing["params_after"] is None
    assert missing["fingerprint"] == {"hub": "org/absent", "revision": None} and "staleness" in caplog.text

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **k: SimpleNamespace(sha="def456"))
    assert source_fingerprint("org/tiny") == {"hub": "org/tiny", "revision": "def456"}  # the hub's current commit
    assert cache_path("org/tiny", s) != cache_path("org/tiny", s, {"hub": "org/tiny", "revision": "abc123"})


@pytest.mark.parametrize("kw", [{}, {"method": "depth", "num_blocks": 1, "protected_first": 1, "protected_last": 1}])
def test_plan_prune_is_a_dry_run(tiny_pair, tmp_path, monkeypatch, kw):
    from pathlib import Path

    from axolotl_focus.prune.cache import plan_prune

    def files():
        return sorted(str(p) for root in (tmp_path, tiny_pair["teacher"]) for p in Path(root).rglob("*"))

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    s = spec(tmp_path, **kw)
    before = files()
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    plan = plan_prune(tiny_pair["teacher"], s)
    assert files() == before
    monkeypatch.undo()
    assert plan["method"] == s.method and not plan["cached"]
    assert plan["cache_path"] == str(cache_path(tiny_pair["teacher"], s))
    path = ensure_pruned(tiny_pair["teacher"], s)
    report = json.loads((path / REPORT_FILE).read_text())
    assert (plan["params_before"], plan["params_after"]) == (report["params_before"], report["params_after"])
    assert plan["reduction"] == pytest.approx(report["achieved_reduction"])
    assert plan["fingerprint"] == report["source_fingerprint"]
    again = plan_prune(tiny_pair["teacher"], s)
    assert again["cached"] and again["cache_path"] == str(path)


@pytest.mark.parametrize("kw,match", [
    ({"attn_layers": [0, 99]}, r"focus_prune: attn_layers=\[0, 99\]"),
    ({"method": "depth", "num_blocks": 3}, "focus_prune: num_blocks=3"),
    ({"calibration": "/no/such/calib.jsonl"}, "focus_prune.calibration: file /no/such/calib.jsonl does not exist"),
])
def test_plan_prune_rejects_bad_settings(tiny_pair, tmp_path, kw, match):
    from axolotl_focus.prune.cache import plan_prune

    with pytest.raises(ValueError, match=match):
        plan_prune(tiny_pair["teacher"], spec(tmp_path, **kw))


def test_plan_prune_does_not_read_hub_calibration_or_missing_folders(tiny_pair, tmp_path, monkeypatch):
    from axolotl_focus.prune.cache import plan_prune

    def no_dataset(*a, **k):
        raise AssertionError("a hub dataset was read")

    monkeypatch.setattr("datasets.load_dataset", no_dataset)
    plan = plan_prune(tiny_pair["teacher"], spec(tmp_path, calibration="Salesforce/wikitext"))
    assert "Salesforce/wikitext" in plan["calibration"] and "(not read)" in plan["calibration"]
    with pytest.raises(ValueError, match="is not a folder"):
        plan_prune(str(tmp_path / "nowhere"), spec(tmp_path))
