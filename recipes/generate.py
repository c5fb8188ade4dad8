"""Write every recipe YAML from one table (the single source of truth for recipes/).

    python recipes/generate.py            # (re)write recipes/<model>/p<ratio>/*.yml
    python recipes/generate.py --check    # exit 1 if a committed file differs (CI runs this)

One folder per model and pruning ratio; one axolotl config per row of the paper's Tables 3/4
(appendix G Table 9 for 35% / 45%), plus the CE-only control, CE + RePAIR (Table 5), TaiLr rows and DPO on the RePAIR
pairs. Every config prunes ``base_model`` itself through ``focus_prune:`` (cached, rank 0 only),
so the teacher is the unpruned ``base_model`` without a ``focus_teacher_model`` line.

``focus-cached`` and ``kd-cached`` (LLaMA-3.1-8B at 25% only, ``EXTRA_ROWS``) are the ``focus`` and
``kd`` rows with the teacher read from one precomputed teacher-logit cache (``focus_teacher_cache:``,
top-512 per position at tau 2, built from ``focus.yml`` of the same folder by ``axolotl-focus
teacher-cache``): no teacher model is loaded during training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

MODELS = {
    "llama-3.1-8b": {
        "base_model": "meta-llama/Llama-3.1-8B",
        "ratios": (0.25, 0.35, 0.45),
        "deepspeed": "recipes/deepspeed/zero2.json",
        "task": "open_ended",
    },
    "llama-2-13b": {
        "base_model": "meta-llama/Llama-2-13b-hf",
        "ratios": (0.25,),
        "deepspeed": "recipes/deepspeed/zero3.json",
        "task": "open_ended",
    },
    "llama-3.1-8b-instruct": {
        "base_model": "meta-llama/Llama-3.1-8B-Instruct",
        "ratios": (0.25,),
        "deepspeed": "recipes/deepspeed/zero2.json",
        "task": "instruction",
    },
}

# Extra loss terms of the baselines, with the paper's settings (appendix D).
AUX = {
    "ul": {"unlikelihood": {"alpha": 0.5}},
    "sg": {"scalegrad": {"gamma": 0.5}},
    "ditto": {"ditto": {"lambda": 0.5, "probability": 0.5}},
    "tailr": {"tailr": {"gamma": 0.1, "min_weight": 0.2}},
}
DISTILL = {
    "kd": {"focus_distill": "kd", "focus_alpha": 0.05, "focus_temperature": 2.0},
    "focus": {"focus_distill": "focus", "focus_alpha": 0.05, "focus_temperature": 2.0,
              "focus_beta": 15.0, "focus_gamma": 1.0},
}
# Table 9 (35% / 45%) has the FOCUS block only.
ROWS_25 = ["ce", "ce-repair", "kd", "kd-ul", "kd-sg", "kd-ditto", "kd-repair", "kd-tailr",
           "focus", "focus-ul", "focus-sg", "focus-ditto", "focus-repair", "focus-tailr", "dpo"]
ROWS_AGGRESSIVE = ["focus", "focus-ul", "focus-sg", "focus-ditto", "focus-repair"]
# rows of one folder only: (model, ratio) -> rows
EXTRA_ROWS = {("llama-3.1-8b", 0.25): ["focus-cached", "kd-cached"]}
CACHE_K = 512  # teacher ids kept per position in the teacher cache of the *-cached rows

ALPACA = {"path": "yahma/alpaca-cleaned", "type": "alpaca"}
TRAINING = {
    # LoRA as in the paper (LLM-Pruner's post-training recipe for the ranks and rates)
    "adapter": "lora",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "sequence_len": 512,
    "sample_packing": False,  # RePAIR needs one pair per row; kept off everywhere for comparable rows
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 16,  # 64 sequences per step on one GPU; divide by the GPU count
    "num_epochs": 2,
    "learning_rate": 0.0001,
    "lr_scheduler": "cosine",
    "warmup_steps": 100,
    "optimizer": "adamw_torch_fused",
    "weight_decay": 0.0,
    "bf16": True,
    "tf32": True,
    "gradient_checkpointing": True,
    "logging_steps": 10,
    "save_strategy": "epoch",
    "val_set_size": 0.0,
    "seed": 42,
}


def pairs_path(model: str, tag: str) -> str:
    return f"pairs/{model}-{tag}.jsonl"


def cache_path(model: str, tag: str) -> str:
    return f"teacher_cache/{model}-{tag}-k{CACHE_K}"


def cache_command(model: str, tag: str) -> str:
    """The command that builds the teacher cache of a folder's *-cached rows (from its focus.yml:
    the same data, tokenizer, pruned student and teacher)."""
    return (f"axolotl-focus teacher-cache recipes/{model}/{tag}/focus.yml --output {cache_path(model, tag)} "
            f"--k {CACHE_K}")


def rows_of(model: str, ratio: float) -> list[str]:
    return (ROWS_25 if ratio == 0.25 else ROWS_AGGRESSIVE) + EXTRA_ROWS.get((model, ratio), [])


def row_config(model: str, ratio: float, row: str) -> dict:
    spec = MODELS[model]
    tag = f"p{round(ratio * 100)}"
    cfg: dict = {
        "base_model": spec["base_model"],
        "plugins": ["axolotl_focus.FocusPlugin"],
        "focus_prune": {"method": "width", "ratio": ratio, "importance": "param_first"},
    }
    distill, _, extra = row.partition("-")
    datasets = [dict(ALPACA)]
    if distill == "ce":
        cfg["focus_distill"] = "none"
    if row == "dpo":
        cfg.update({"rl": "dpo", "rl_beta": 0.1, "focus_dpo_reference": "teacher"})
        datasets = [{"path": pairs_path(model, tag), "ds_type": "json", "split": "train"}]
    else:
        cfg.update(DISTILL.get(distill, {}))
        if extra == "repair":
            cfg.update({"focus_repair_alpha": 1.0, "focus_repair_margin": 1.0})
            datasets.append({"path": pairs_path(model, tag), "ds_type": "json", "type": "axolotl_focus.repair"})
        elif extra == "cached":
            cfg["focus_teacher_cache"] = cache_path(model, tag)
        elif extra:
            cfg["focus_aux_losses"] = AUX[extra]
    cfg["datasets"] = datasets
    cfg["dataset_prepared_path"] = f"last_run_prepared/{model}-{tag}-{'dpo' if row == 'dpo' else 'sft'}"
    cfg["output_dir"] = f"outputs/{model}/{tag}/{row}"
    cfg.update(TRAINING)
    if row == "dpo":
        cfg["micro_batch_size"], cfg["gradient_accumulation_steps"] = 2, 32
    cfg["deepspeed"] = spec["deepspeed"]
    return cfg


def header(model: str, ratio: float, row: str) -> str:
    tag = f"p{round(ratio * 100)}"
    what = {"ce": "CE only (the control: post-pruning fine-tuning as usual)",
            "ce-repair": "CE + RePAIR, no distillation (the paper's Table 5 'RePAIR' row)",
            "dpo": "DPO on the RePAIR pairs, reference = the unpruned teacher (paper, section 6)",
            "focus-cached": f"FOCUS, the teacher's top-{CACHE_K} read from a precomputed teacher cache (no teacher "
                            "model loaded)",
            "kd-cached": f"KD, the teacher's top-{CACHE_K} read from the same teacher cache as focus-cached (no "
                         "teacher model loaded)"}.get(row)
    if what is None:
        distill, _, extra = row.partition("-")
        what = ("KD" if distill == "kd" else "FOCUS") + (f" + {extra.upper() if extra != 'ditto' else 'DITTO'}"
                                                          if extra else "")
        what = what.replace("REPAIR", "RePAIR").replace("TAILR", "TaiLr (not in the paper)")
    needs = f"\n# Needs the mined pairs: {pairs_path(model, tag)} (recipes/README.md, step 2)." if (
        row == "dpo" or row.endswith("repair")) else ""
    if row.endswith("cached"):
        needs = (f"\n# Needs the teacher cache (recipes/README.md, step 3, once for the folder):\n"
                 f"#   {cache_command(model, tag)}")
    return (f"# {MODELS[model]['base_model']}, {round(ratio * 100)}% LLM-Pruner width pruning: {what}.\n"
            f"# Generated by recipes/generate.py - edit the table there, not this file.\n"
            f"# Run from the repository root: axolotl train recipes/{model}/{tag}/{row}.yml{needs}\n")


def prune_config(model: str, ratio: float) -> dict:
    return {"base_model": MODELS[model]["base_model"],
            "focus_prune": {"method": "width", "ratio": ratio, "importance": "param_first"}}


def recipe_files() -> dict[Path, str]:
    """Every generated file and its text."""
    files = {}
    for model, spec in MODELS.items():
        for ratio in spec["ratios"]:
            tag = f"p{round(ratio * 100)}"
            folder = HERE / model / tag
            files[folder / "prune.yml"] = (
                f"# Step 1: prune {spec['base_model']} by {round(ratio * 100)}% (cached; every training config\n"
                f"# of this folder reuses it). Run: axolotl-focus prune recipes/{model}/{tag}/prune.yml\n"
                + yaml.safe_dump(prune_config(model, ratio), sort_keys=False))
            for row in rows_of(model, ratio):
                files[folder / f"{row}.yml"] = header(model, ratio, row) + yaml.safe_dump(
                    row_config(model, ratio, row), sort_keys=False)
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed recipe differs")
    args = parser.parse_args(argv)
    stale = []
    for path, text in recipe_files().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path.relative_to(HERE.parent)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("recipes out of date (run python recipes/generate.py):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    print(f"{len(recipe_files())} recipe files {'up to date' if args.check else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
