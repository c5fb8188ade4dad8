"""Every recipe under recipes/ validates with axolotl (plugin loaded) and trains a couple of steps.

The hub model and datasets cannot be reached here, so each recipe runs as its "CPU variant"
(:func:`cpu_variant`): the same config except

* ``base_model``: a tiny local LLaMA of the same architecture (8 layers so that LLM-Pruner's default
  range [4, L-2) is not empty; GQA 4 query / 2 KV heads for LLaMA-3.1, MHA for LLaMA-2), random
  weights: the recipe's own ``focus_prune`` block prunes it;
* hub datasets: ``yahma/alpaca-cleaned`` -> a local Alpaca-format file built from the embedded
  Self-Instruct instructions; the mined pairs file -> a local pairs file of the same schema;
* stripped because this CPU cannot run them: ``deepspeed`` (needs GPUs and the deepspeed package),
  ``bf16`` / ``tf32`` (CPU training is fp32);
* shortened for time: ``num_epochs`` -> ``max_steps: 2`` (4 for DITTO rows, so that both kinds of
  update occur), ``gradient_accumulation_steps`` -> 1, ``save_strategy: "no"``, ``logging_steps: 1``;
  output, prepared-data and pruning-cache folders -> the test's temporary folder;
* ``focus_teacher_cache`` (the ``*-cached`` rows) -> a teacher cache built for the tiny model by the
  command in the recipe's header (``axolotl-focus teacher-cache <folder>/focus.yml ...``), run on
  the CPU variant of that ``focus.yml`` with the output in the test's temporary folder.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*/p*/*.yml") if p.name != "prune.yml")
STRIPPED = ("deepspeed",)
CPU_OFF = ("bf16", "tf32")


def test_generated_recipes_are_up_to_date():
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "generate.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # 3 models at 25% (+ focus-cached and kd-cached for LLaMA-3.1-8B), LLaMA-3.1-8B at 35% and 45%
    assert len(RECIPES) == 15 + 17 + 15 + 5 + 5


def test_deepspeed_files_are_valid_json_with_the_stages():
    for stage in (2, 3):
        config = json.loads((ROOT / "recipes" / "deepspeed" / f"zero{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage
        assert config["train_micro_batch_size_per_gpu"] == "auto"


@pytest.fixture(scope="module")
def recipe_env(tmp_path_factory):
    """Tiny GQA and MHA LLaMAs (random weights), a local Alpaca file, a local pairs file."""
    from transformers import LlamaForCausalLM

    from axolotl_focus.evaluate import embedded_instructions, load_instructions
    from axolotl_focus.micro import build_tokenizer, corpus_documents, llama_config

    root = tmp_path_factory.mktemp("recipes")
    docs = corpus_documents("valid")
    tokenizer = build_tokenizer(docs[:200], vocab_size=512)
    models = {}
    for name, kv_heads in (("gqa", 2), ("mha", 4)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(tokenizer, layers=8, kv_heads=kv_heads))
        models[name] = str(root / name)
        model.save_pretrained(models[name])
        tokenizer.save_pretrained(models[name])
    alpaca = root / "alpaca.jsonl"
    with open(alpaca, "w", encoding="utf-8") as handle:
        for row in load_instructions(embedded_instructions(), limit=64):
            instruction, _, inp = row["text"].partition("\n\n")
            handle.write(json.dumps({"instruction": instruction, "input": inp, "output": row["reference"]}) + "\n")
    pairs = root / "pairs.jsonl"
    with open(pairs, "w", encoding="utf-8") as handle:
        for i, doc in enumerate(docs[300:364]):
            words = doc.split()
            loop = " ".join(words[30:36])
            handle.write(json.dumps({"prompt": " ".join(words[:30]), "chosen": " " + " ".join(words[30:70]),
                                     "rejected": " " + " ".join([loop] * 6), "source_id": i}) + "\n")
    return {"root": root, "models": models, "alpaca": str(alpaca), "pairs": str(pairs)}


def cpu_variant(recipe: Path, env: dict, work: Path) -> Path:
    """Write the recipe's CPU variant (see the module docstring) and return its path."""
    cfg = yaml.safe_load(recipe.read_text())
    cfg["base_model"] = env["models"]["mha" if "llama-2" in recipe.parts[-3] else "gqa"]
    for ds in cfg["datasets"]:
        if ds["path"] == "yahma/alpaca-cleaned":
            ds.update(path=env["alpaca"], ds_type="json")
        elif ds["path"].startswith("pairs/"):
            ds["path"] = env["pairs"]
    for key in STRIPPED + CPU_OFF:
        cfg.pop(key, None)
    cfg.update(bf16=False, fp16=False, tf32=False, save_strategy="no", logging_steps=1,
               gradient_accumulation_steps=1, max_steps=4 if "ditto" in recipe.stem else 2)
    cfg.pop("num_epochs")
    cfg["focus_prune"]["cache_dir"] = str(env["root"] / "prune-cache")
    if cfg.get("focus_teacher_cache"):
        cfg["focus_teacher_cache"] = tiny_teacher_cache(recipe, env, work)
    name = "-".join(recipe.parts[-3:]).removesuffix(".yml")
    cfg["output_dir"] = str(work / "out" / name)
    cfg["dataset_prepared_path"] = str(work / "prepared" / cfg["dataset_prepared_path"].rsplit("/", 1)[-1])
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tiny_teacher_cache(recipe: Path, env: dict, work: Path) -> str:
    """The teacher cache a ``*-cached`` recipe reads, for the tiny model: the ``axolotl-focus
    teacher-cache`` command of the recipe's header, its config swapped for that config's CPU variant
    and its output for a folder of the module's temporary root (built once, then reused)."""
    from axolotl.integrations.base import PluginManager

    from axolotl_focus.cli import main
    from axolotl_focus.train.teacher_cache.format import read_meta

    command = next(line.lstrip("# ").split() for line in recipe.read_text().splitlines()
                   if line.lstrip("# ").startswith("axolotl-focus teacher-cache "))
    argv = command[1:]
    output = argv.index("--output") + 1
    assert argv[output] == yaml.safe_load(recipe.read_text())["focus_teacher_cache"], recipe
    out = env["root"] / "teacher-cache" / "-".join(recipe.parts[-3:-1])
    meta = read_meta(out)
    if meta is None or not meta.complete:
        argv[1] = str(cpu_variant(ROOT / argv[1], env, work))
        argv[output] = str(out)
        try:
            code = main([*argv, "--no-progress", "--threads", "1"])
        finally:
            PluginManager.get_instance().plugins.clear()
        assert code == 0, recipe
    return str(out)


def expected_terms(recipe: Path) -> set[str]:
    row = recipe.stem
    if row == "dpo":
        return set()
    distill, _, extra = row.partition("-")
    terms = {"loss/ce"} | ({"loss/kd"} if distill == "kd" else {"loss/focus"} if distill == "focus" else set())
    terms |= {"ul": {"loss/ul"}, "sg": {"loss/scalegrad"}, "tailr": {"loss/tailr"}}.get(extra, set())
    return terms


def test_every_recipe_validates_with_axolotl(recipe_env, tmp_path, plugin_manager):
    from axolotl.cli.config import load_cfg

    for recipe in RECIPES:
        plugin_manager.plugins.clear()
        cfg = load_cfg(str(cpu_variant(recipe, recipe_env, tmp_path)))
        assert "axolotl_focus.FocusPlugin" in plugin_manager.plugins, recipe
        source = recipe_env["models"]["mha" if "llama-2" in str(recipe) else "gqa"]
        assert cfg.focus_pruned_from == source, recipe  # the recipe's focus_prune ran (cached)
        if cfg.rl:
            assert cfg.rl == "dpo" and cfg.focus_dpo_reference == "teacher"
        else:
            assert cfg.focus_teacher_model == source, recipe  # teacher = the unpruned base_model
        assert bool(cfg.focus_teacher_cache) == recipe.stem.endswith("cached"), recipe


def test_prune_recipes_run_and_share_the_training_configs_cache(recipe_env, tmp_path, capsys):
    """Each prune.yml (base_model swapped for the tiny model of its architecture) runs through
    `axolotl-focus prune CONFIG`, prunes with the folder's settings, and lands in the same cache
    entry as the folder's training configs (step 1 of recipes/README.md is reused by step 3)."""
    from axolotl_focus.cli import main
    from axolotl_focus.prune.settings import PruneSettings

    prune_recipes = sorted((ROOT / "recipes").glob("*/p*/prune.yml"))
    assert len(prune_recipes) == 5
    cache = tmp_path / "cache"
    for recipe in prune_recipes:
        cfg = yaml.safe_load(recipe.read_text())
        ratio = PruneSettings(**cfg["focus_prune"]).ratio
        assert f"p{round(ratio * 100)}" == recipe.parent.name, recipe
        training = yaml.safe_load((recipe.parent / "focus-repair.yml").read_text())
        assert training["focus_prune"] == cfg["focus_prune"] and training["base_model"] == cfg["base_model"], recipe
        cfg["base_model"] = recipe_env["models"]["mha" if "llama-2" in recipe.parts[-3] else "gqa"]
        cfg["focus_prune"]["cache_dir"] = str(cache)
        path = tmp_path / ("-".join(recipe.parts[-3:-1]) + "-prune.yml")
        path.write_text(yaml.safe_dump(cfg))
        assert main(["prune", str(path)]) == 0, recipe
        pruned = capsys.readouterr().out.split("pruned checkpoint:")[-1].strip().splitlines()[0]
        config = json.loads((Path(pruned) / "config.json").read_text())
        assert config["pruning"]["source_model"] == cfg["base_model"], recipe
        assert config["pruning"]["ratio"] == ratio, recipe
    assert len(list(cache.iterdir())) == 4  # (GQA or MHA) x ratio: 8B 25/35/45 share GQA with Instruct 25


@pytest.mark.slow
def test_every_recipe_trains_a_few_steps(recipe_env, tmp_path):
    configs = [cpu_variant(r, recipe_env, tmp_path) for r in RECIPES]
    out = tmp_path / "runs.jsonl"
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "recipe_runner.py"), str(out), *map(str, configs)],
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {Path(r["config"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(runs) == len(RECIPES)
    for recipe, config in zip(RECIPES, configs):
        run = runs[config.name]
        assert "error" not in run, f"{recipe}:\n{run.get('error')}"
        steps = [log for log in run["log_history"] if "loss" in log]
        assert len(steps) == (4 if "ditto" in recipe.stem else 2), recipe
        assert all(torch.isfinite(torch.tensor(log["loss"])) for log in steps), recipe
        logged = set().union(*steps)
        assert expected_terms(recipe) <= logged, (recipe, sorted(logged))
        if recipe.stem.endswith("repair"):
            assert "loss/repair" in logged, recipe
        if recipe.stem.endswith("ditto"):  # both DITTO-only and normal updates happened
            assert any("loss/ditto" in log for log in steps) and any("loss/ce" in log for log in steps), recipe
        if recipe.stem == "dpo":
            assert "rewards/chosen" in logged, (recipe, sorted(logged))


def test_every_recipe_validates_offline_as_shipped(tmp_path, monkeypatch, plugin_manager, capsys):
    """`axolotl-focus validate` on each recipe file itself (hub models, offline): a clear account,
    no weights, nothing written; the only problems reported are a pairs file not mined yet and a
    teacher cache not built yet."""
    from axolotl_focus.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("AXOLOTL_FOCUS_CACHE", str(tmp_path / "cache"))
    before = sorted(p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts)
    for recipe in RECIPES:  # the training configs (prune.yml is read by `axolotl-focus prune`)
        plugin_manager.plugins.clear()
        code = main(["validate", str(recipe.relative_to(ROOT))])
        out = capsys.readouterr().out
        errors = [line for line in out.splitlines() if line.startswith("  error: ")]
        text = recipe.read_text()
        pairs, cached = "\n- path: pairs/" in text, "\nfocus_teacher_cache: " in text
        assert code == (1 if pairs or cached else 0), out
        assert all("does not exist (mine it first: axolotl-focus pairs)" in e
                   or ("focus_teacher_cache: teacher_cache/" in e and "does not exist; build the teacher cache first: "
                       "axolotl-focus teacher-cache" in e) for e in errors), out
        assert len(errors) == pairs + cached, out
        assert "cache miss" in out and "the hub is offline" in out, out
        assert "  loss " in out, out
    assert not (tmp_path / "cache").exists()
    assert sorted(p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts) == before
