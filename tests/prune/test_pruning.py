"""Pruning preprocessor core: LLM-Pruner block-wise width pruning and Shortened-LLaMA depth pruning.

Tiny fp32 LlamaConfig models (hidden 64, 8 layers) built locally; nothing is downloaded.
"""

import copy
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from axolotl_focus.prune import importance as importance_module
from axolotl_focus.prune import width
from axolotl_focus.prune.cache import prune
from axolotl_focus.prune.calibration import build_calibration
from axolotl_focus.prune.checkpoint import load_pruned, save_pruned
from axolotl_focus.prune.depth import block_scores, prune_depth
from axolotl_focus.prune.importance import ATTN_PROJ, MLP_PROJ, compute_importance, gradient_pass, projection, salience
from axolotl_focus.prune.modeling_pruned_llama import PrunedLlamaConfig, PrunedLlamaForCausalLM, register_auto_classes
from axolotl_focus.prune.report import PruneReport, report_dict
from axolotl_focus.prune.settings import PruneSettings
from axolotl_focus.prune.shapes import count_params, layer_shapes_for_ratio, plan_width
from axolotl_focus.prune.width import prune_width

ATOL = 1e-5
WORDS = [f"w{i}" for i in range(120)]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls: one thread is much faster than two contended ones.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) for _ in range(30)]


def tiny_config(layout: str = "mha", layers: int = 8) -> LlamaConfig:
    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, initializer_range=0.1
    )
    if layout == "mha":  # LLaMA-2 layout
        return LlamaConfig(**common, num_attention_heads=4)
    # LLaMA-3.x layout: GQA with 4 q heads per kv head, tied embeddings like Llama-3.2
    return LlamaConfig(**common, num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)


def tiny_model(layout: str = "mha", layers: int = 8, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(layout, layers)).eval()


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 123, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids=None):
    return model(input_ids=inputs() if ids is None else ids).logits


@torch.no_grad()
def zero_pruned_units(model: LlamaForCausalLM, kept: dict) -> LlamaForCausalLM:
    """The unpruned model with the pruned q heads (o_proj input columns) and MLP channels
    (down_proj input columns) set to zero: by construction it must compute what the sliced model does."""
    head_dim = model.config.head_dim
    for i, k in kept.items():
        layer = model.model.layers[int(i)]
        for h in set(range(model.config.num_attention_heads)) - set(k["heads"]):
            layer.self_attn.o_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0
        dropped = sorted(set(range(model.config.intermediate_size)) - set(k["channels"]))
        layer.mlp.down_proj.weight[:, dropped] = 0
    return model


def greedy(model, ids, use_cache):
    return model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=0)


WIDTH_CASES = {
    # name: (layout, PruneSettings kwargs, expected shape of pruned attention layers, of pruned MLP layers)
    "mha-default-ranges": ("mha", dict(), (2, 2), 64),
    "gqa-group": ("gqa", dict(gqa_mode="group", attn_layers=(1, 7), mlp_layers=(2, 6)), (4, 1), 64),
    "gqa-q-within-group": ("gqa", dict(gqa_mode="q_within_group", attn_layers=(1, 7), mlp_layers=(2, 6)), (4, 2), 64),
}


def prune_case(name, tokenizer, texts, **extra):
    layout, kwargs, _, _ = WIDTH_CASES[name]
    model = tiny_model(layout)
    original = copy.deepcopy(model)
    cfg = PruneSettings(ratio=0.5, calib_samples=4, calib_seq_len=16, **{**kwargs, **extra})
    return original, prune_width(model, tokenizer, texts, cfg, source_model="tiny/source")


# ----------------------------------------------------------------------------------------------
# closed form
# ----------------------------------------------------------------------------------------------
LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)
LLAMA3_8B = dict(LLAMA2_7B, vocab_size=128256, intermediate_size=14336, num_key_value_heads=8)


@pytest.mark.parametrize(
    "arch,ratio,layers,expected",
    [
        (LLAMA2_7B, 0.25, (4, 30), 0.195),
        (LLAMA2_7B, 0.35, (4, 30), 0.272),
        (LLAMA2_7B, 0.45, (4, 30), 0.348),
        (LLAMA2_7B, 0.25, (0, 32), 0.240),
        (LLAMA3_8B, 0.25, (4, 30), 0.177),
        (LLAMA3_8B, 0.35, (4, 30), 0.234),
        (LLAMA3_8B, 0.45, (4, 30), 0.308),
        (LLAMA3_8B, 0.25, (0, 32), 0.217),
    ],
)
def test_closed_form_reproduces_llm_pruner_reductions(arch, ratio, layers, expected):
    config = LlamaConfig(**arch)
    plan = plan_width(config, PruneSettings(ratio=ratio, attn_layers=layers, mlp_layers=layers))
    assert round(plan.reduction, 3) == expected
    assert plan.params_before == (6_738_415_616 if arch is LLAMA2_7B else 8_030_261_248)
    if ratio == 0.25 and layers == (4, 30):
        assert round(plan.params_after / 1e9, 3) == (5.423 if arch is LLAMA2_7B else 6.613)
        shape = plan.layer_shapes[4]
        # MHA: 8 of 32 heads; GQA: 2 of 8 KV groups (8 q heads); MLP: 25% of the channels
        assert shape["num_attention_heads"] == 24 and shape["num_key_value_heads"] == (24 if arch is LLAMA2_7B else 6)
        assert shape["intermediate_size"] == (8256 if arch is LLAMA2_7B else 10752)
        assert plan.layer_shapes[3] == plan.layer_shapes[30] == {
            "num_attention_heads": 32,
            "num_key_value_heads": arch.get("num_key_value_heads", 32),
            "intermediate_size": arch["intermediate_size"],
        }


def test_gqa_granularity_is_floored():
    plan = plan_width(LlamaConfig(**LLAMA3_8B), PruneSettings(ratio=0.35))
    assert plan.layer_shapes[4]["num_key_value_heads"] == 6  # 0.35 still removes only 2 of 8 groups
    assert plan.layer_shapes[4]["num_attention_heads"] == 24
    assert plan.short == ["attention"] and "floor(8*0.35)=2 groups -> 25.0% of its weights" in plan.notes["attention"]


SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def test_gqa_group_rounding_is_explained():
    """SmolLM2-135M at ratio 0.25: 3 KV groups x 0.25 floors to 0 groups, only the MLP is pruned (11.8%)."""
    config = LlamaConfig(**SMOLLM2_135M)
    plan = plan_width(config, PruneSettings(ratio=0.25))
    assert plan.params_before == 134_515_008  # the tied embedding matrix counted once
    assert round(plan.reduction, 3) == 0.118 and plan.short == ["attention"]
    attention = plan.notes["attention"]
    assert attention.startswith("attention (layers 4-27): 3 KV groups of 3 q heads (whole groups); ratio 0.25 "
                                "removes floor(3*0.25)=0 groups -> attention unpruned")
    assert "q_within_group removes no more: floor(3*0.25)=0 of 3 q heads per group" in attention
    assert "--gqa-mode" not in attention  # suggested only where it prunes more
    assert "--ratio >= 0.3334 (removes 1 group)" in attention and "--target-param-reduction" in attention
    assert plan.notes["mlp"] == ("MLP (layers 4-27): 1536 channels; ratio 0.25 removes ceil(1536*0.25)=384 channels "
                                 "-> 25.0% of its weights in these layers")
    assert "hold 63.1% of all parameters" in plan.notes["scope"] and "= 15.8% of all parameters" in plan.notes["scope"]
    # what the note suggests does prune attention
    assert plan_width(config, PruneSettings(ratio=0.3334)).layer_shapes[4]["num_key_value_heads"] == 2
    solved = plan_width(config, PruneSettings(target_param_reduction=0.25))
    assert abs(solved.reduction - 0.25) < 1e-3 and solved.layer_shapes[4]["num_key_value_heads"] == 2
    assert solved.short == []  # the solved ratio is what was asked for: no warning
    # 2 groups of 4 q heads: q_within_group removes 1 q head per group where group mode removes nothing
    gqa = plan_width(tiny_config("gqa"), PruneSettings(ratio=0.25)).notes["attention"]
    assert "-> attention unpruned" in gqa
    assert "--gqa-mode q_within_group (removes 1 of the 4 q heads in every group)" in gqa
    exact = plan_width(LlamaConfig(**LLAMA3_8B), PruneSettings(ratio=0.25))
    assert exact.short == [] and exact.notes["attention"].endswith("floor(8*0.25)=2 groups -> 25.0% of its weights "
                                                                   "in these layers")


def test_target_param_reduction_solves_the_ratio():
    plan = plan_width(LlamaConfig(**LLAMA2_7B), PruneSettings(target_param_reduction=0.20))
    assert abs(plan.reduction - 0.20) < 1e-3 and 0.25 < plan.ratio < 0.27
    cfg = PruneSettings(target_param_reduction=0.20, gqa_mode="q_within_group")
    plan = plan_width(LlamaConfig(**LLAMA3_8B), cfg)
    assert abs(plan.reduction - 0.20) < 1e-3


def test_target_param_reduction_on_a_model(tokenizer, texts):
    model = tiny_model("mha")
    cfg = PruneSettings(
        target_param_reduction=0.2, attn_layers=(0, 8), mlp_layers=(0, 8), calib_samples=2, calib_seq_len=8
    )
    config = model.config
    report = prune_width(model, tokenizer, texts, cfg)
    # tiny model: coarse steps (1 of 4 heads); the solver picks the step closest to the target
    reachable = [count_params(config, layer_shapes_for_ratio(config, cfg, r / 1000)) for r in range(1, 750)]
    best = min(abs(1 - n / report.params_before - 0.2) for n in reachable)
    assert abs(report.achieved_reduction - 0.2) == pytest.approx(best) and best < 0.04
    assert report.metadata["ratio"] == report.ratio and report.metadata["target_param_reduction"] == 0.2
    assert report.params_after == sum(p.numel() for p in report.model.parameters())


# ----------------------------------------------------------------------------------------------
# width pruning: correctness by construction, KV cache, checkpoints
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(WIDTH_CASES))
def test_width_pruning_equals_zeroed_original(case, tokenizer, texts, tmp_path):
    layout, kwargs, (q_heads, kv_heads), channels = WIDTH_CASES[case]
    original, report = prune_case(case, tokenizer, texts)
    model = report.model
    assert isinstance(model, PrunedLlamaForCausalLM) and model.config.model_type == "llama"

    # shapes: narrowed only inside the ranges, hidden size untouched
    (a0, a1), (m0, m1) = PruneSettings(**kwargs).layer_ranges(8)
    head_dim, full = original.config.head_dim, original.config
    for i, layer in enumerate(model.model.layers):
        q, kv = (q_heads, kv_heads) if a0 <= i < a1 else (full.num_attention_heads, full.num_key_value_heads)
        ff = channels if m0 <= i < m1 else full.intermediate_size
        assert report.layer_shapes[i] == dict(num_attention_heads=q, num_key_value_heads=kv, intermediate_size=ff)
        attn = layer.self_attn
        assert attn.q_proj.weight.shape == (q * head_dim, 64) and attn.o_proj.weight.shape == (64, q * head_dim)
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (kv * head_dim, 64)
        assert layer.mlp.up_proj.weight.shape == (ff, 64) and layer.mlp.down_proj.weight.shape == (64, ff)
    if case == "gqa-group":  # contiguous groups: kv head g owns q heads 4g..4g+3
        for k in report.kept.values():
            if len(k["kv_heads"]) == 1:
                assert k["heads"] == [4 * k["kv_heads"][0] + j for j in range(4)]

    # closed-form parameter count == real count; the unpruned count of the source
    actual = sum(p.numel() for p in model.parameters())
    assert actual == report.params_after == count_params(model.config, model.config.layer_shapes)
    assert report.params_before == sum(p.numel() for p in original.parameters())
    assert report.metadata["achieved_param_reduction"] == pytest.approx(1 - actual / report.params_before)

    # the pruned units are the lowest-scoring ones
    cfg = PruneSettings(ratio=0.5, calib_samples=4, calib_seq_len=16, **kwargs)
    imp = compute_importance(copy.deepcopy(original), tokenizer, texts, cfg)
    for i, scores in imp.attn.items():
        k = report.kept[i]
        units = k["heads"] if layout == "mha" or cfg.gqa_mode == "q_within_group" else k["kv_heads"]
        dropped = [u for u in range(len(scores)) if u not in units]
        if cfg.gqa_mode == "q_within_group" and layout == "gqa":  # compared inside each group
            for g in range(2):
                keep_g = [u for u in units if u // 4 == g]
                drop_g = [u for u in dropped if u // 4 == g]
                assert scores[keep_g].min() >= scores[drop_g].max()
        else:
            assert scores[units].min() >= scores[dropped].max()
    for i, scores in imp.mlp.items():
        kept_ch = report.kept[i]["channels"]
        assert scores[kept_ch].min() >= scores[[c for c in range(128) if c not in kept_ch]].max()

    # correctness by construction
    expected = logits(zero_pruned_units(original, report.kept))
    assert (logits(model) - expected).abs().max() < ATOL

    # generation with the per-layer-width KV cache
    ids = inputs()[:1]
    assert torch.equal(greedy(model, ids, True), greedy(model, ids, False))

    # checkpoint round trip
    path = tmp_path / "ckpt"
    save_pruned(model, tokenizer, path)
    files = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "modeling_pruned_llama.py", "tokenizer.json"} <= files
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["PrunedLlamaForCausalLM"]
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_pruned_llama.PrunedLlamaForCausalLM"}
    assert config["focus_source_model"] == config["pruning"]["source_model"] == "tiny/source"
    assert config["layer_shapes"] == report.layer_shapes
    assert config["head_dim"] == head_dim and config["hidden_size"] == 64
    meta = config["pruning"]
    assert meta["method"] == "width" and meta["ratio"] == 0.5 and meta["importance"] == "param_first"
    assert meta["attn_layers"] == [a0, a1] and meta["mlp_layers"] == [m0, m1]
    assert meta["kept"] == {str(i): k for i, k in report.kept.items()}
    assert meta["calibration"]["samples"] == 4 and meta["calibration"]["seq_len"] == 16
    loaded = load_pruned(path)
    assert type(loaded) is PrunedLlamaForCausalLM
    assert (logits(loaded) - expected).abs().max() < ATOL
    assert torch.equal(greedy(loaded, ids, True), greedy(model, ids, False))


def test_fresh_process_trust_remote_code_load(tokenizer, texts, tmp_path):
    """A process that never imports axolotl_focus loads every variant through auto_map."""
    for case in WIDTH_CASES:
        original, report = prune_case(case, tokenizer, texts)
        save_pruned(report.model, tokenizer, tmp_path / case)
        expected = logits(zero_pruned_units(original, report.kept))
        torch.save({"ids": inputs(), "logits": expected}, tmp_path / f"{case}.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        for case in {list(WIDTH_CASES)!r}:
            ref = torch.load(f"{tmp_path}/{{case}}.pt")
            model = AutoModelForCausalLM.from_pretrained(f"{tmp_path}/{{case}}", trust_remote_code=True).eval()
            assert type(model).__name__ == "PrunedLlamaForCausalLM", type(model)
            with torch.no_grad():
                diff = (model(input_ids=ref["ids"]).logits - ref["logits"]).abs().max().item()
            assert diff < {ATOL}, (case, diff)
            ids = ref["ids"][:1]
            a = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
            b = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
            assert torch.equal(a, b), case
            if model.config.tie_word_embeddings:
                assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), case
        assert not [m for m in sys.modules if m == "axolotl_focus" or m.startswith("axolotl_focus.")]
        print("FRESH-OK")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "FRESH-OK" in result.stdout, result.stderr[-3000:]


def test_the_checkpoint_format_asks_no_question(tokenizer, texts, tmp_path):
    """A width-pruned checkpoint in a fresh process that never imports axolotl_focus, stdin closed:
    AutoTokenizer and AutoConfig load it asking nothing; AutoModelForCausalLM loads the right model
    with trust_remote_code=True and refuses the weights without it (never a wrong model); in a
    process that imported axolotl_focus no flag is needed. A checkpoint of the earlier format
    (model_type pruned_llama) still loads in both kinds of process."""
    original, report = prune_case("gqa-group", tokenizer, texts)
    save_pruned(report.model, tokenizer, tmp_path / "new")
    expected = logits(zero_pruned_units(original, report.kept))
    torch.save({"ids": inputs(), "logits": expected}, tmp_path / "ref.pt")
    old = tmp_path / "old"  # the earlier format, as save_pruned wrote it before
    shutil.copytree(tmp_path / "new", old)
    config = json.loads((old / "config.json").read_text())
    config.update(model_type="pruned_llama", auto_map={
        "AutoConfig": "modeling_pruned_llama.PrunedLlamaConfig",
        "AutoModelForCausalLM": "modeling_pruned_llama.PrunedLlamaForCausalLM"})
    (old / "config.json").write_text(json.dumps(config))
    code = (old / "modeling_pruned_llama.py").read_text()  # its class then took its own config class only
    (old / "modeling_pruned_llama.py").write_text(code.replace("config_class = LlamaConfig",
                                                               "config_class = PrunedLlamaConfig"))
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        ref = torch.load("{tmp_path}/ref.pt")
        new, old = "{tmp_path}/new", "{tmp_path}/old"
        print("TOKENIZER", type(AutoTokenizer.from_pretrained(new)).__name__)
        print("CONFIG", type(AutoConfig.from_pretrained(new)).__name__)
        for path in (new, old):
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            with torch.no_grad():
                assert (model(input_ids=ref["ids"]).logits - ref["logits"]).abs().max().item() < {ATOL}, path
        try:
            AutoModelForCausalLM.from_pretrained(new)
        except Exception as exc:
            print("REFUSED", type(exc).__name__)
        assert not [m for m in sys.modules if m == "axolotl_focus" or m.startswith("axolotl_focus.")]
        import axolotl_focus  # registers with the Auto classes: no flag needed
        for path in (new, old):
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            assert type(model).__module__ == "axolotl_focus.prune.modeling_pruned_llama", type(model)
            with torch.no_grad():
                assert (model(input_ids=ref["ids"]).logits - ref["logits"]).abs().max().item() < {ATOL}, path
        print("FRESH-OK")
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "FRESH-OK" in result.stdout, out[-3000:]
    assert "[y/N]" not in out and f"TOKENIZER {type(tokenizer).__name__}\n" in out and "CONFIG LlamaConfig" in out, out
    assert "REFUSED RuntimeError" in out


def test_uniform_saves_a_vanilla_llama_checkpoint(tokenizer, texts, tmp_path):
    model = tiny_model("gqa")
    original = copy.deepcopy(model)
    cfg = PruneSettings(ratio=0.5, uniform=True, calib_samples=2, calib_seq_len=8)
    report = prune_width(model, tokenizer, texts, cfg)
    assert type(report.model) is LlamaForCausalLM
    c = report.model.config
    assert (c.model_type, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.head_dim) == (
        "llama", 4, 1, 64, 8)
    assert sorted(report.kept) == list(range(8))  # every layer
    expected = logits(zero_pruned_units(original, report.kept))
    assert (logits(report.model) - expected).abs().max() < ATOL
    save_pruned(report.model, tokenizer, tmp_path / "u")
    assert "modeling_pruned_llama.py" not in os.listdir(tmp_path / "u")
    saved = json.loads((tmp_path / "u" / "config.json").read_text())
    assert saved["model_type"] == "llama" and "auto_map" not in saved and saved["pruning"]["uniform"] is True
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "u")
    assert (logits(loaded) - expected).abs().max() < ATOL
    assert loaded.config.focus_source_model == report.metadata["source_model"]


def test_uniform_head_counts_divide_hidden_size():
    # LlamaConfig (transformers 5.x) rejects hidden_size % num_attention_heads != 0 even with head_dim set,
    # which is why uniform pruning rounds the kept head count to a divisor.
    with pytest.raises(Exception, match="multiple"):
        LlamaConfig(hidden_size=64, num_attention_heads=3, head_dim=16)
    config = LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=8, num_attention_heads=6)
    for ratio in (0.2, 0.3, 0.4, 0.6, 0.8):
        shapes = plan_width(config, PruneSettings(ratio=ratio, uniform=True)).layer_shapes
        assert len({tuple(s.values()) for s in shapes}) == 1
        assert 96 % shapes[0]["num_attention_heads"] == 0
    assert plan_width(config, PruneSettings(ratio=0.4, uniform=True)).layer_shapes[0]["num_attention_heads"] == 4
    # LLaMA-2-7B at 0.25: 24 heads are not expressible (4096 % 24); nearest divisor, ties keep more -> 32
    plan = plan_width(LlamaConfig(**LLAMA2_7B), PruneSettings(ratio=0.25, uniform=True))
    assert plan.layer_shapes[0] == {"num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 8256}


# ----------------------------------------------------------------------------------------------
# SmolLM2's layout in small: 3 KV groups of 3 q heads, tied input/output embeddings
# ----------------------------------------------------------------------------------------------
def tied_gqa_config(layers: int = 6) -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=72, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True,
                       initializer_range=0.1)


def tied_gqa_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tied_gqa_config()).eval()


def is_tied(model) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


TIED_CASES = {
    "width-0.25": dict(ratio=0.25, attn_layers=(1, 5), mlp_layers=(1, 5)),  # SmolLM2's case: attention unpruned
    "width-0.4": dict(ratio=0.4, attn_layers=(1, 5), mlp_layers=(1, 5)),  # one of the 3 groups goes
    "uniform": dict(ratio=0.4, uniform=True),
    "depth": dict(method="depth", num_blocks=2, protected_first=1, protected_last=1),
}


def prune_tied(case, tokenizer, texts):
    cfg = PruneSettings(calib_samples=2, calib_seq_len=8, **TIED_CASES[case])
    return prune(tied_gqa_model(), tokenizer, texts, cfg, source_model="tiny/source")


def test_report_states_requested_achieved_and_why(tokenizer, texts, monkeypatch):
    warnings = []
    monkeypatch.setattr(width.log, "warning", lambda msg, *args: warnings.append(msg % args))
    report = prune_tied("width-0.25", tokenizer, texts)
    assert len(warnings) == 1 and "floor(3*0.25)=0 groups -> attention unpruned" in warnings[0]
    assert all(s["num_attention_heads"] == 9 and s["num_key_value_heads"] == 3 for s in report.layer_shapes)
    lines = report.summary().splitlines()
    assert lines[0] == (f"width pruning: params {report.params_before:,} -> {report.params_after:,} (requested "
                        f"nominal per-layer ratio 0.25; achieved reduction {report.achieved_reduction:.2%} of all "
                        f"parameters)")
    assert lines[1:4] == ["  " + report.notes[part] for part in ("attention", "mlp", "scope")]
    assert report.notes["mlp"].startswith("MLP (layers 1-4): 96 channels; ratio 0.25 removes ceil(96*0.25)=24")
    # pruning_report.json carries the notes; a report rebuilt from it (the CLI's cached path) says the same
    saved = json.loads(json.dumps(report_dict(report), default=str))
    assert saved["notes"] == report.notes
    fields = {f.name: saved[f.name] for f in dataclasses.fields(PruneReport) if f.name in saved}
    assert PruneReport(**{**fields, "model": None}).summary() == report.summary()

    warnings.clear()
    cfg = PruneSettings(target_param_reduction=0.2, attn_layers=(1, 5), mlp_layers=(1, 5), calib_samples=2,
                        calib_seq_len=8)
    solved = prune_width(tied_gqa_model(), tokenizer, texts, cfg, source_model="tiny/source")
    assert warnings == [] and (f"requested target_param_reduction 20.00% of all parameters, solved nominal "
                               f"per-layer ratio {solved.ratio:.4g}; achieved reduction") in solved.summary()
    depth = prune_tied("depth", tokenizer, texts)
    assert "(requested num_blocks 2; achieved reduction" in depth.summary() and depth.notes == {}


@pytest.mark.parametrize("case", list(TIED_CASES))
def test_tied_embeddings_stay_tied_and_count_once(case, tokenizer, texts, tmp_path):
    config = tied_gqa_config()
    untied = copy.deepcopy(config)
    untied.tie_word_embeddings = False
    assert count_params(untied) - count_params(config) == 128 * 72
    report = prune_tied(case, tokenizer, texts)
    model = report.model
    assert is_tied(model) and model.config.tie_word_embeddings
    assert report.params_before == count_params(config) == sum(p.numel() for p in tied_gqa_model().parameters())
    shapes = getattr(model.config, "layer_shapes", None)
    assert report.params_after == sum(p.numel() for p in model.parameters()) == count_params(model.config, shapes)

    path = tmp_path / case
    save_pruned(model, tokenizer, path)
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    embed = stored["model.embed_tokens.weight"]
    assert torch.equal(stored.get("lm_head.weight", embed), embed)  # no separate lm_head that differs
    assert sum(t.numel() for key, t in stored.items() if key != "lm_head.weight") == report.params_after
    loaded = load_pruned(path).eval()
    assert is_tied(loaded) and (logits(loaded) - logits(model)).abs().max() < ATOL


@pytest.mark.parametrize("case", ["width-0.4", "depth"])
def test_lora_merge_keeps_tied_embeddings(case, tokenizer, texts, tmp_path):
    """axolotl's lora_target_linear (attention and MLP projections, not lm_head) on the tied pruned
    model: one SGD step, merge_and_unload, save, reload."""
    from peft import LoraConfig, get_peft_model

    save_pruned(prune_tied(case, tokenizer, texts).model, tokenizer, tmp_path / "pruned")
    base = load_pruned(tmp_path / "pruned")
    before = logits(base)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(ATTN_PROJ + MLP_PROJ))
    peft_model = get_peft_model(base, lora)
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and "lm_head" not in name for name in trainable)
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
    ids = inputs(seed=2)
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    merged = peft_model.merge_and_unload().eval()
    assert is_tied(merged) and not [name for name, _ in merged.named_modules() if "lora" in name]
    expected = logits(merged)
    assert (expected - before).abs().max() > 1e-3  # the step changed the model
    save_pruned(merged, tokenizer, tmp_path / "merged")
    reloaded = load_pruned(tmp_path / "merged").eval()
    assert is_tied(reloaded) and reloaded.config.tie_word_embeddings
    assert (logits(reloaded) - expected).abs().max() < ATOL


# ----------------------------------------------------------------------------------------------
# importance
# ----------------------------------------------------------------------------------------------
def reference_scores(model, ids, importance, layers):
    """Per-unit scores computed from fully materialised gradients (LLM-Pruner's way)."""
    cfg = model.config
    hd, nq = cfg.head_dim, cfg.num_attention_heads

    def grads(batch):
        model.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def name(i, proj):
        return f"model.layers.{i}.{'self_attn' if proj[0] in 'qkvo' else 'mlp'}.{proj}.weight"

    def weight(i, proj):
        return dict(model.named_parameters())[name(i, proj)]

    def reduce(s, proj):  # units: heads of q/k/v rows and o columns; channels of gate/up rows and down columns
        if proj == "o_proj":
            per = s.sum(0).abs() if importance == "vectorize" else s.abs().sum(0)
            return per.view(nq, hd).sum(1)
        if proj == "down_proj":
            return s.sum(0).abs() if importance == "vectorize" else s.abs().sum(0)
        per = s.sum(1).abs() if importance == "vectorize" else s.abs().sum(1)
        return per.view(-1, hd).sum(1) if proj in ("q_proj", "k_proj", "v_proj") else per

    projs = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    keys = [(i, p) for i in layers for p in projs]
    with torch.no_grad():
        if importance in ("l1", "l2"):
            return {k: reduce(weight(*k).abs() ** (1 if importance == "l1" else 2), k[1]) for k in keys}
    out = {}
    if importance in ("param_first", "vectorize", "param_mix"):
        g = grads(ids)
        out = {k: reduce(weight(*k).detach() * g[name(*k)], k[1]) for k in keys}
    if importance in ("param_second", "param_mix"):
        acc = {k: 0 for k in keys}
        for row in ids.split(1):
            g = grads(row)
            for k in keys:
                acc[k] = acc[k] + g[name(*k)] ** 2 / len(ids)
        second = {k: reduce(weight(*k).detach() ** 2 * acc[k], k[1]) for k in keys}
        out = {k: out[k] - 0.5 * second[k] for k in keys} if out else second
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("importance", ["param_first", "vectorize", "param_second", "param_mix", "l1", "l2"])
def test_hook_importance_matches_full_gradient_reference(importance, tokenizer, texts, monkeypatch):
    model = tiny_model("gqa")
    cfg = PruneSettings(
        importance=importance, attn_layers=(2, 4), mlp_layers=(3, 5), calib_samples=3, calib_seq_len=8
    )
    ids, _ = build_calibration(tokenizer, texts, 3, 8, 0)

    live = []  # how many parameters hold a gradient whenever a score is computed
    real = salience
    def counting(*args, **kwargs):
        live.append(sum(p.grad is not None for p in model.parameters()))
        return real(*args, **kwargs)

    monkeypatch.setattr(importance_module, "salience", counting)
    imp = compute_importance(model, None, ids, cfg)
    assert set(imp.attn) == {2, 3} and set(imp.mlp) == {3, 4}
    if importance not in ("l1", "l2"):
        assert max(live) == 1  # each gradient is reduced and freed before the next one exists
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # grads freed, flags restored

    expected = reference_scores(model, ids, importance, [2, 3, 4])
    for key, value in imp.raw.items():
        assert torch.allclose(value, expected[key].float(), rtol=1e-4, atol=1e-9), key
    # holding all gradients (LLM-Pruner's way, used by the memory benchmark) gives the same scores
    live.clear()
    held = compute_importance(model, None, ids, cfg, hold_grads=True)
    for key, value in held.raw.items():
        assert torch.allclose(value, imp.raw[key], rtol=1e-5, atol=1e-9)
    if importance not in ("l1", "l2"):
        assert max(live) > 1


class _Bar:
    """Stands in for tqdm: records each bar's total, unit and ticks."""

    bars: list = []

    def __init__(self, iterable=None, total=None, desc=None, unit="it", disable=None, **kwargs):
        self.iterable, self.total, self.desc, self.unit, self.n = iterable, total, desc, unit, 0
        _Bar.bars.append(self)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1

    def update(self, n=1):
        self.n += n

    def close(self):
        pass


@pytest.mark.parametrize("importance,bars", [
    ("param_first", [("weight", 14)]),  # one backward: a tick per weight scored (2 layers x 7)
    ("vectorize", [("batch", 3)]),  # linear in the gradient: a tick per calibration sample
    ("param_mix", [("weight", 14), ("batch", 3)]),
])
def test_importance_progress_bars_tick_over_the_calibration(importance, bars, monkeypatch):
    monkeypatch.setattr(importance_module, "tqdm", _Bar)
    monkeypatch.setattr(_Bar, "bars", [])
    cfg = PruneSettings(importance=importance, attn_layers=(2, 4), mlp_layers=(2, 4))
    ids = torch.randint(3, 123, (3, 12), generator=torch.Generator().manual_seed(0))
    compute_importance(tiny_model("gqa"), None, ids, cfg)
    assert [(b.unit, b.total) for b in _Bar.bars] == bars
    assert all(b.n == b.total for b in _Bar.bars)


def test_depth_taylor_ticks_per_sample_and_matches_one_batch(tokenizer, texts, monkeypatch):
    monkeypatch.setattr(importance_module, "tqdm", _Bar)
    monkeypatch.setattr(_Bar, "bars", [])
    cfg = PruneSettings(method="depth", num_blocks=1, protected_first=1, protected_last=1,
                        calib_samples=3, calib_seq_len=16)
    model = tiny_model("mha")
    scores, _ = block_scores(model, tokenizer, texts, cfg)
    assert [(b.unit, b.total, b.n) for b in _Bar.bars] == [("batch", 3, 3)]
    # the per-sample passes add up to the gradient of the mean loss over the whole batch
    ids, _ = build_calibration(tokenizer, texts, 3, 16, 0)
    targets = {(i, p): (projection(model.model.layers[i], p).weight, 1) for i in scores for p in ATTN_PROJ + MLP_PROJ}
    whole = gradient_pass(model, [ids], targets, lambda k, w, g: (w.double() * g.double()).sum(), False, "x")
    for i, value in scores.items():
        assert value == pytest.approx(float(sum(whole[(i, p)].abs() for p in ATTN_PROJ + MLP_PROJ)), rel=1e-6)


def test_gqa_group_scores_aggregate_contiguous_heads():
    model = tiny_model("gqa")
    ids = inputs()
    imp = compute_importance(model, None, ids, PruneSettings(attn_layers=(0, 2), mlp_layers=(0, 1)))
    for i in (0, 1):
        per_q = imp.raw[(i, "q_proj")] + imp.raw[(i, "o_proj")]
        for g in range(2):
            expected = per_q[4 * g : 4 * g + 4].sum() + imp.raw[(i, "k_proj")][g] + imp.raw[(i, "v_proj")][g]
            assert torch.allclose(imp.attn[i][g], expected)
        # LLM-Pruner's strided fold ({g, g+2, g+4, g+6}) is a different quantity
        strided = per_q.view(4, 2).sum(0) + imp.raw[(i, "k_proj")] + imp.raw[(i, "v_proj")]
        assert not torch.allclose(strided, imp.attn[i])
    cfg = PruneSettings(gqa_mode="q_within_group", attn_layers=(0, 1), mlp_layers=(0, 1))
    q_imp = compute_importance(model, None, ids, cfg)
    assert q_imp.attn[0].shape == (8,)


def test_random_importance_is_seeded(tokenizer, texts):
    def kept(seed):
        cfg = PruneSettings(importance="random", seed=seed, ratio=0.5, attn_layers=(0, 8), mlp_layers=(0, 8))
        return prune_width(tiny_model("mha"), tokenizer, texts, cfg).kept

    assert kept(0) == kept(0) and kept(0) != kept(1)
    cfg = PruneSettings(importance="l2", attn_layers=(0, 1), mlp_layers=(0, 1))
    report = prune_width(tiny_model("mha"), None, None, cfg)
    assert report.metadata["calibration"] is None  # magnitude importance needs no calibration data


# ----------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------
def test_calibration_windows_are_seeded_and_recorded(tokenizer, texts):
    long_texts = [" ".join(WORDS[(i + j) % 120] for j in range(100)) for i in range(12)]
    ids, info = build_calibration(tokenizer, long_texts)  # defaults: 10 samples x 64 tokens
    assert ids.shape == (10, 64) and ids.dtype == torch.long
    again, _ = build_calibration(tokenizer, long_texts)
    other, _ = build_calibration(tokenizer, long_texts, seed=1)
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    assert (info["samples"], info["seq_len"], info["num_texts"], info["from_concatenation"]) == (10, 64, 12, 0)
    for (text_idx, start), row in zip(info["windows"], ids):
        assert row.tolist() == tokenizer(long_texts[text_idx])["input_ids"][start : start + 64]

    short = build_calibration(tokenizer, texts, 4, 100)[1]  # no text has 100 words: windows of the joined texts
    assert short["from_concatenation"] == 4
    with pytest.raises(ValueError, match="calib_seq_len=10000"):
        build_calibration(tokenizer, texts[:2], 2, 10000)


# ----------------------------------------------------------------------------------------------
# depth pruning
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def logits_without_blocks(model, removed, ids=None):
    handles = [model.model.layers[i].register_forward_hook(lambda mod, args, out: args[0]) for i in removed]
    try:
        return logits(model, ids)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("score", ["taylor", "ppl"])
def test_depth_pruning(score, tokenizer, texts, tmp_path):
    model = tiny_model("mha")
    original = copy.deepcopy(model)
    cfg = PruneSettings(method="depth", depth_score=score, num_blocks=2, protected_first=1, protected_last=1,
                        calib_samples=3, calib_seq_len=16)
    report = prune_depth(model, tokenizer, texts, cfg, source_model="tiny/source")
    scores = report.block_scores
    assert sorted(scores) == [1, 2, 3, 4, 5, 6]  # protected blocks 0 and 7 are never candidates
    assert report.removed_blocks == sorted(sorted(scores, key=scores.get)[:2])

    # the scores themselves, against an independent reference
    ids, _ = build_calibration(tokenizer, texts, 3, 16, 0)
    ref = copy.deepcopy(original)
    if score == "taylor":
        ref(input_ids=ids, labels=ids).loss.backward()
        for i in scores:
            layer = ref.model.layers[i]
            mats = [getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            mats += [getattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")]
            taylor_plus = sum(float((m.weight * m.weight.grad).sum().abs().detach()) for m in mats)
            assert scores[i] == pytest.approx(taylor_plus, rel=1e-4)
    else:
        for i in scores:
            handle = ref.model.layers[i].register_forward_hook(lambda mod, args, out: args[0])
            with torch.no_grad():
                assert scores[i] == pytest.approx(torch.exp(ref(input_ids=ids, labels=ids).loss).item(), rel=1e-5)
            handle.remove()

    pruned = report.model
    assert pruned is model and type(pruned) is LlamaForCausalLM and pruned.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == list(range(6))
    expected = logits_without_blocks(original, report.removed_blocks)
    assert (logits(pruned) - expected).abs().max() < ATOL
    assert report.params_after == sum(p.numel() for p in pruned.parameters()) == count_params(pruned.config)
    ids = inputs()[:1]
    assert torch.equal(greedy(pruned, ids, True), greedy(pruned, ids, False))

    save_pruned(pruned, tokenizer, tmp_path / "d")
    saved = json.loads((tmp_path / "d" / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["num_hidden_layers"] == 6
    assert saved["pruning"]["removed_blocks"] == report.removed_blocks
    assert saved["focus_source_model"] == saved["pruning"]["source_model"] == "tiny/source"
    assert saved["pruning"]["depth_score"] == score and saved["pruning"]["calibration"]["seq_len"] == 16
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "d")
    assert (logits(loaded) - expected).abs().max() < ATOL


def test_depth_default_protection_and_fraction(tokenizer, texts):
    cfg = PruneSettings(method="depth", block_fraction=0.25, calib_samples=2, calib_seq_len=8)
    report = prune_depth(tiny_model("gqa"), tokenizer, texts, cfg)
    assert report.removed_blocks == [4, 5]  # 8 layers: blocks 0-3 and the last two are protected
    assert report.model.config.num_hidden_layers == 6


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ratio=0), r"ratio\n.*greater than 0 .*input_value=0\b"),
        (dict(ratio=1.5), r"ratio\n.*less than 1 .*input_value=1.5"),
        (dict(ratio=-0.2), r"ratio\n.*input_value=-0.2"),
        (dict(importance="taylor"), r"importance\n.*input_value='taylor'"),
        (dict(gqa_mode="strided"), r"gqa_mode\n.*input_value='strided'"),
        (dict(calib_samples=0), r"calib_samples\n.*input_value=0"),
        (dict(method="depth", num_blocks=1, depth_score="loss"), r"depth_score\n.*input_value='loss'"),
    ],
)
def test_bad_values_are_refused_by_the_settings_model(kwargs, match):
    """Types, choices and ranges are the settings model's field constraints (the same for YAML,
    CLI and code): they fail when the settings are built, naming the option and the value."""
    with pytest.raises(ValidationError, match=match):
        PruneSettings(**kwargs)


@pytest.mark.parametrize(
    "kwargs,layers,match",
    [
        (dict(attn_layers=(4, 12)), 8, r"attn_layers=\[4, 12\].*8 layers"),
        (dict(mlp_layers=(5, 5)), 8, r"mlp_layers=\[5, 5\]"),
        (dict(attn_layers=(0, 2)), 4, r"mlp_layers: the default range"),
        (dict(ratio=0.99), 8, r"ratio=0.99: removes every"),
        (dict(target_param_reduction=0.95), 8, r"target_param_reduction=0.95: not reachable"),
        (dict(method="depth"), 8, r"num_blocks=None, block_fraction=None"),
        (dict(method="depth", num_blocks=3), 8, r"num_blocks=3: removes 3 blocks, but only 2"),
        (dict(method="depth", block_fraction=0.1), 8, r"block_fraction=0.1: removes no block"),
    ],
)
def test_bad_options_raise_before_any_work(kwargs, layers, match):
    model = tiny_model("mha", layers=layers)
    with pytest.raises(ValueError, match=match):
        PruneSettings(**kwargs).validate(model.config)
    fn = prune_depth if kwargs.get("method") == "depth" else prune_width
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):  # no tokenizer/texts needed to fail: validation runs first
        fn(model, None, None, PruneSettings(**kwargs))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_unsupported_architecture():
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                           num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="unsupported architecture: model_type='mistral'"):
        PruneSettings().validate(config)
    with pytest.raises(ValueError, match="unsupported architecture: model_type='mistral'"):
        prune_width(MistralForCausalLM(config), None, None, PruneSettings())


def test_pruned_config_and_registration():
    register_auto_classes()
    register_auto_classes()  # idempotent
    assert AutoConfig.for_model("pruned_llama").__class__ is PrunedLlamaConfig
    shape = {"num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 8}
    with pytest.raises(ValueError, match="layer_shapes has 1 entries"):
        PrunedLlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, layer_shapes=[shape])
    with pytest.raises(ValueError, match="heads % kv_heads"):
        PrunedLlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                          layer_shapes=[dict(shape, num_key_value_heads=3)])


def test_former_modeling_module_path_reexports_the_classes():
    """Earlier checkpoints and user code import `axolotl_focus.modeling_pruned_llama`."""
    import axolotl_focus.modeling_pruned_llama as former
    from axolotl_focus.prune import modeling_pruned_llama as current

    assert former.PrunedLlamaConfig is current.PrunedLlamaConfig is PrunedLlamaConfig
    assert former.PrunedLlamaForCausalLM is current.PrunedLlamaForCausalLM
    assert former.register_auto_classes is current.register_auto_classes
