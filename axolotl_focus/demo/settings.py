"""Settings of `axolotl-focus demo`: the stage names and their dependencies, the runs of the train
stage, the presets (:func:`demo_settings`) and the axolotl config of every run (:func:`train_configs`)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import files

STAGES = ("teacher", "prune", "table1", "pairs", "train", "eval")
STAGE_TITLES = {
    "teacher": "teacher model",
    "prune": "width + depth pruning",
    "table1": "Table 1: repetition before/after pruning",
    "pairs": "RePAIR pair mining",
    "train": "fine-tuning through `axolotl train`",
    "eval": "evaluation",
}
# the stages whose outputs a stage reads (their ids enter its key)
DEPENDS = {"teacher": (), "prune": ("teacher",), "table1": ("prune",), "pairs": ("prune",), "train": ("pairs",),
           "eval": ("train", "table1")}

# run name -> (label in the report, method description)
RUNS = {
    "ce": ("CE", "cross-entropy only (focus_distill: none)"),
    "kd": ("KD", "CE + KD (focus_distill: kd)"),
    "focus": ("FOCUS", "CE + FOCUS (focus_distill: focus)"),
    "focus-repair": ("FOCUS + RePAIR", "CE + FOCUS + RePAIR margin on the mined pairs"),
    "ce-repair": ("CE + RePAIR", "CE + RePAIR margin on the mined pairs (no distillation)"),
    "dpo": ("DPO", "rl: dpo on the mined pairs, reference = the teacher"),
    # the teacher-cache comparison: one cache (top-k at the training tau) read by both rows, no
    # teacher model loaded; the second FOCUS seed is the training-noise reference it is judged by
    "kd-cached": ("KD (cache)", "CE + KD from the teacher cache (focus_teacher_cache, no teacher loaded)"),
    "focus-cached": ("FOCUS (cache)", "CE + FOCUS from the teacher cache (focus_teacher_cache, no teacher loaded)"),
    "focus-seed1": ("FOCUS (seed +1)", "CE + FOCUS with training seed + 1 (the training-noise reference)"),
}
# the rows the teacher-cache section compares: (cached or reseeded run, in-process run)
CACHE_PAIRS = (("focus-cached", "focus"), ("kd-cached", "kd"), ("focus-seed1", "focus"))
REPORT = "demo_report.md"
# stages that keep the finished parts of an interrupted attempt with the same key (train: its
# finished runs; eval: the evaluation module's own per-model caches)
RESUMABLE = ("train", "eval")


class DemoError(RuntimeError):
    """A stage failed; the message says which and where its log is."""



MODELS = ("smollm2", "micro")
PRESETS = ("full", "quick", "smoke")


@dataclass
class DemoSettings:
    """Sizes and budgets of a demo run (:func:`demo_settings` gives the presets)."""

    quick: bool = False
    seed: int = 0
    # "smollm2": the embedded real model (axolotl_focus.embedded_model); "micro": a micro LLaMA
    # pretrained in stage 1 (the teacher_* sizes below)
    model: str = "micro"
    preset: str = "full"
    # 1. teacher (micro only)
    teacher_layers: int = 8
    teacher_hidden: int = 128
    teacher_heads: int = 8
    teacher_kv_heads: int = 4
    teacher_intermediate: int = 352
    teacher_steps: int = 500
    vocab_size: int = 1024
    # 2. pruning
    width_reduction: float = 0.25  # fraction of ALL parameters (target_param_reduction)
    width_gqa_mode: str = "group"
    width_layers: tuple[int, int] | None = None  # None: layers 1 .. L-2 (micro)
    depth_blocks: int = 2
    calib_samples: int = 10
    # 3. Table 1 (0 prompts: Table 1 is read from the evaluation stage, which then also evaluates
    # the depth-pruned model; the real-model presets do this to generate once)
    table1_prompts: int = 64
    table1_prefix_tokens: int = 50
    table1_new_tokens: int = 200
    # 4. pair mining
    mining_prompts: int = 600
    mining_prefix_tokens: int = 32
    mining_new_tokens: int = 128
    mining_temperature: float = 0.5  # at temperature 1 the micro student (almost) never loops
    mining_teacher_temperature: float | None = None  # None: mining_temperature
    target_pairs: int = 128
    # 5. fine-tuning
    sft_chunk_tokens: int = 128
    sft_max_rows: int | None = None  # None: the whole slice
    sequence_len: int = 320  # prompt + chosen + rejected of a pair row must fit
    micro_batch_size: int = 8
    train_steps: int = 80
    dpo_steps: int = 24
    learning_rate: float = 1e-3
    dpo_learning_rate: float = 1e-4
    train_lora_r: int = 0  # 0: full fine-tuning; else LoRA on every linear layer, merged after training
    cache_k: int = 512  # teacher tokens kept per position by the teacher cache of the *-cached runs
    runs: tuple[str, ...] = ("ce", "kd", "focus", "focus-repair", "ce-repair", "dpo")
    # 6. evaluation
    eval_documents: int = 64
    eval_prefix_tokens: int = 50
    eval_new_tokens: int = 100
    ppl_max_tokens: int = 16384
    mauve_seeds: tuple[int, ...] = (1, 2, 3)
    # top-p 0.9 at temperature 1 (the paper's) under these generation seeds, plus greedy
    eval_seeds: tuple[int, ...] = (0,)
    # a second top-p condition at a lower temperature, where the small models loop part of the
    # time (at temperature 1 they hardly ever loop, under greedy decoding always); 0 = skip it
    eval_low_temperature: float = 0.5
    eval_low_seeds: tuple[int, ...] = (0,)

    @property
    def real(self) -> bool:
        return self.model != "micro"

    def stage_settings(self, stage: str) -> dict:
        """The settings a stage's outputs depend on."""
        prefix = {"teacher": ("teacher_", "vocab_size", "model"), "prune": ("width_", "depth_", "calib_"),
                  "table1": ("table1_",), "pairs": ("mining_", "target_pairs"),
                  "train": ("sft_", "sequence_len", "micro_batch_size", "train_", "dpo_", "learning_rate", "runs",
                            "cache_"),
                  "eval": ("eval_", "ppl_", "mauve_", "table1_prompts")}[stage]
        return {k: v for k, v in asdict(self).items() if k.startswith(prefix)} | {"seed": self.seed}


def demo_settings(quick: bool = False, seed: int = 0, model: str = "smollm2",
                  preset: str | None = None) -> DemoSettings:
    """The presets: ``full`` (real model: <= 75 min on a 2-core CPU; micro: ~7 min), ``quick``
    (real: <= 12 min; micro: ~2 min; same stages, smaller) and ``smoke`` (real model only: the
    smallest run of every stage, for CI). ``preset`` overrides ``quick``."""
    preset = preset or ("quick" if quick else "full")
    if model not in MODELS:
        raise ValueError(f"model: must be one of {MODELS} (got {model!r})")
    if preset not in PRESETS:
        raise ValueError(f"preset: must be one of {PRESETS} (got {preset!r})")
    if model == "micro":
        if preset == "smoke":
            raise ValueError("preset: smoke exists for the real model only (the micro quick preset is small already)")
        if preset == "full":
            return DemoSettings(seed=seed)
        return DemoSettings(
            quick=True, preset="quick", seed=seed, teacher_layers=6, teacher_hidden=64, teacher_heads=4,
            teacher_kv_heads=2, teacher_intermediate=176, teacher_steps=150, depth_blocks=2, calib_samples=4,
            table1_prompts=16, table1_new_tokens=100, mining_prompts=128, mining_new_tokens=96,
            mining_temperature=0.3, target_pairs=32, sft_max_rows=192, sequence_len=256, train_steps=8, dpo_steps=4,
            runs=("ce", "kd", "focus", "focus-repair", "dpo"), eval_documents=32, ppl_max_tokens=2048,
            mauve_seeds=(1,), eval_low_temperature=0.3,
        )
    # SmolLM2-135M (30 layers, 9 q / 3 KV heads): whole-KV-group pruning would remove a third of
    # the attention or none, so q heads are pruned inside every group; the protocol (loops at top-p
    # 0.9 only below temperature 1, so the pairs are mined and the claims checked at 0.7 with the
    # teacher's positives at 1.0) was chosen on the WikiText-2 valid split (see README)
    real = dict(
        model=model, preset=preset, quick=preset != "full", seed=seed, width_gqa_mode="q_within_group",
        width_layers=(3, 28), depth_blocks=9, calib_samples=10, table1_prompts=0, mining_prompts=603,
        mining_prefix_tokens=50, mining_new_tokens=128, mining_temperature=0.7, mining_teacher_temperature=1.0,
        target_pairs=64, sft_chunk_tokens=128, sft_max_rows=None, sequence_len=320, micro_batch_size=4,
        train_steps=30, dpo_steps=32, learning_rate=1e-3, dpo_learning_rate=2e-4, train_lora_r=16,
        eval_documents=24, ppl_max_tokens=8192, mauve_seeds=(1,), eval_seeds=(0,), eval_low_temperature=0.7,
        eval_low_seeds=(0, 1, 2),
        runs=("ce", "kd", "focus", "focus-repair", "ce-repair", "dpo", "kd-cached", "focus-cached", "focus-seed1"),
        cache_k=512,
    )
    if preset == "quick":
        real |= dict(calib_samples=4, mining_prompts=128, target_pairs=24, train_steps=8, dpo_steps=8,
                     runs=("ce", "kd", "focus", "focus-repair", "dpo"), eval_documents=12,
                     ppl_max_tokens=2048, eval_low_seeds=(0,))
    elif preset == "smoke":
        # 8 SFT rows + the pairs, 3 steps of 4 rows: one epoch, so the pair rows are trained on
        real |= dict(calib_samples=2, depth_blocks=2, mining_prompts=32, mining_temperature=0.5, target_pairs=4,
                     mining_new_tokens=64, sft_max_rows=8, train_steps=3, dpo_steps=1,
                     runs=("focus-repair", "focus", "focus-cached"), cache_k=32,
                     eval_documents=4,
                     eval_new_tokens=32, ppl_max_tokens=512, eval_low_seeds=(0,))
    return DemoSettings(**real)




def write_json(path: Path, data) -> None:
    """A stage record, atomically (:func:`axolotl_focus.files.write_json`)."""
    files.write_json(path, data, indent=2, default=str)


def fmt_time(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"





def train_configs(s: DemoSettings, student: str, sft: str, pairs: str, work: str | os.PathLike) -> dict[str, dict]:
    """The axolotl config of every run in ``s.runs`` (ordinary axolotl keys plus the plugin's).

    ``student``: the width-pruned checkpoint (records the teacher); ``sft``: completion JSONL;
    ``pairs``: the mined RePAIR pairs; ``work``: the train stage folder (outputs, prepared data).
    """
    work = Path(work)
    sft_ds = {"path": str(sft), "ds_type": "json", "type": "completion"}
    repair_ds = {"path": str(pairs), "ds_type": "json", "type": "axolotl_focus.repair"}
    common = {
        "base_model": str(student),
        "plugins": ["axolotl_focus.FocusPlugin"],
        "sequence_len": s.sequence_len,
        "sample_packing": False,
        "micro_batch_size": s.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": s.train_steps,
        "learning_rate": s.learning_rate,
        "lr_scheduler": "cosine",
        "warmup_steps": max(1, s.train_steps // 20),
        "optimizer": "adamw_torch",
        "weight_decay": 0.0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "val_set_size": 0,
        "seed": s.seed,
        "dataset_num_proc": 1,  # worker processes cost more than they save on these few rows
        # one folder for all runs: axolotl names each prepared dataset by a hash of its settings,
        # so the runs on the same data tokenize and save it once
        "dataset_prepared_path": str(work / "prepared"),
    }
    methods = {
        "ce": {"focus_distill": "none", "datasets": [sft_ds]},
        "kd": {"focus_distill": "kd", "datasets": [sft_ds]},
        "focus": {"focus_distill": "focus", "datasets": [sft_ds]},
        "focus-repair": {"focus_distill": "focus", "datasets": [sft_ds, repair_ds]},
        "ce-repair": {"focus_distill": "none", "datasets": [sft_ds, repair_ds]},
        "kd-cached": {"focus_distill": "kd", "datasets": [sft_ds], "focus_teacher_cache": str(cache_dir(s, work))},
        "focus-cached": {"focus_distill": "focus", "datasets": [sft_ds],
                         "focus_teacher_cache": str(cache_dir(s, work))},
        "focus-seed1": {"focus_distill": "focus", "datasets": [sft_ds], "seed": s.seed + 1},
        "dpo": {"rl": "dpo", "rl_beta": 0.1, "focus_dpo_reference": "teacher",
                "datasets": [{"path": str(pairs), "ds_type": "json", "split": "train"}],
                "max_steps": s.dpo_steps, "learning_rate": s.dpo_learning_rate,
                "warmup_steps": max(1, s.dpo_steps // 20)},
    }
    if s.train_lora_r:
        # LoRA on every linear layer (axolotl's lora_target_linear); its Triton kernels need CUDA
        common |= {"adapter": "lora", "lora_r": s.train_lora_r, "lora_alpha": 2 * s.train_lora_r,
                   "lora_dropout": 0.0, "lora_target_linear": True, "lora_mlp_kernel": False,
                   "lora_qkv_kernel": False, "lora_o_kernel": False}
    unknown = [r for r in s.runs if r not in methods]
    if unknown:
        raise ValueError(f"runs: unknown {unknown}; known {list(methods)}")
    out = {}
    for run in s.runs:
        cfg = {**common, **methods[run]}
        cfg["output_dir"] = str(work / run)
        out[run] = cfg
    return out


def cache_dir(s: DemoSettings, work: str | os.PathLike) -> Path:
    """The one teacher cache of the train stage folder ``work``, shared by every ``*-cached`` run
    (they train on the same SFT rows at the same temperature); its name carries ``k``."""
    return Path(work) / f"teacher_cache_k{s.cache_k}"
