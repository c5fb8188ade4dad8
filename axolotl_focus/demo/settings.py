"""Settings of `axolotl-focus demo`: the experiment's arms and runs, the presets
(:func:`demo_settings`) and the axolotl config of every run (:func:`run_config`).

The experiment (issue "decide the paper's claims"): every **arm** (a training method) is trained
once per **training seed**; a *run* is one arm under one seed (``<arm>-s<k>``, seed ``seed + k``).
Within a seed every arm starts from the same LoRA initialisation (axolotl seeds before the
adapter is made) and sees the same SFT batches (the RePAIR arms draw their pairs from the pair
stream, ``focus_repair_pairs``, which never touches the SFT sampler). DPO trains after the SFT: it
starts from the CE run of the same seed, on the same training pairs, with as many pair visits as a
RePAIR run (``train_steps`` steps of ``pairs_per_step`` pairs).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import files

MODELS = ("smollm2", "micro")
PRESETS = ("full", "quick", "smoke", "cache")
REPORT = "demo_report.md"


class DemoError(RuntimeError):
    """A stage failed; the message says which and where its log is."""


@dataclass(frozen=True)
class Arm:
    label: str  # the method's name in the report
    method: str  # what it trains
    distill: str | None = "none"  # focus_distill (None: preference training)
    repair: bool = False  # draws the pair stream
    cached: bool = False  # reads the teacher cache instead of the teacher model


ARMS = {
    "ce": Arm("CE", "cross-entropy only (focus_distill: none)"),
    "kd": Arm("KD", "CE + KD (focus_distill: kd)", "kd"),
    "focus": Arm("FOCUS", "CE + FOCUS (focus_distill: focus)", "focus"),
    "ce-repair": Arm("CE + RePAIR", "CE + the RePAIR margin over the pair stream", repair=True),
    "focus-repair": Arm("FOCUS + RePAIR", "CE + FOCUS + the RePAIR margin over the pair stream", "focus", True),
    "dpo": Arm("DPO after SFT", "rl: dpo on the training pairs, starting from the CE run of the same seed "
               "(reference = the teacher), as many pair visits as a RePAIR run", None),
    "kd-cached": Arm("KD (cache)", "CE + KD from the teacher cache (no teacher loaded)", "kd", cached=True),
    "focus-cached": Arm("FOCUS (cache)", "CE + FOCUS from the teacher cache (no teacher loaded)", "focus",
                        cached=True),
}
SFT_ARM = "ce"  # trained by the sft stage for every seed: the CE arm, DPO's start and the mining source
# the teacher-cache comparison: (cached arm, its in-process twin)
CACHE_PAIRS = (("focus-cached", "focus"), ("kd-cached", "kd"))


def run_id(arm: str, k: int) -> str:
    """The run of ``arm`` under training seed offset ``k``."""
    return f"{arm}-s{k}"


def run_label(arm: str, k: int) -> str:
    """A run's model name in the evaluation."""
    return f"{ARMS[arm].label} (seed {k})"


@dataclass
class DemoSettings:
    """Sizes and budgets of a demo run (:func:`demo_settings` gives the presets)."""

    quick: bool = False
    seed: int = 0  # calibration, mining, the held-out split; training seeds are seed + train_seeds
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
    # the text: WikiText's markup (@-@, spaces before punctuation) undone and its <unk> dropped in the
    # SFT rows, the mining prompts and the evaluation documents (axolotl_focus.wikitext.clean)
    clean_text: bool = True
    # 4. sft: the CE run of every training seed (LoRA or full fine-tuning from the width-pruned checkpoint)
    sft_chunk_tokens: int = 128
    sft_max_rows: int | None = None  # None: the whole slice
    sequence_len: int = 320  # the SFT rows; a pair's prompt + chosen + rejected is fitted into it
    micro_batch_size: int = 8
    train_steps: int = 80
    learning_rate: float = 1e-3
    train_lora_r: int = 0  # 0: full fine-tuning; else LoRA on every linear layer, merged after training
    train_seeds: tuple[int, ...] = (0, 1, 2, 3)  # offsets added to seed
    # 5. pair mining: from the SFT-tuned student ("tuned": the CE run of the first training seed, the
    # model being repaired) or from the width-pruned checkpoint ("pruned")
    mine_from: str = "tuned"
    mining_prompts: int = 600
    mining_prefix_tokens: int = 32
    mining_new_tokens: int = 128
    mining_temperature: float = 0.5  # at temperature 1 the micro student (almost) never loops
    mining_teacher_temperature: float | None = None  # None: mining_temperature
    target_pairs: int = 128
    heldout_share: float = 0.15  # pairs kept out of training: the held-out margin diagnostic
    # 6. train: every arm of `runs` but the CE arm, under every training seed
    runs: tuple[str, ...] = ("ce", "kd", "focus", "ce-repair", "focus-repair", "dpo")
    pairs_per_step: int = 8  # RePAIR pairs per optimizer step (and DPO's micro-batch of pairs)
    dpo_learning_rate: float = 1e-4
    cache_k: int = 512  # teacher tokens kept per position by the teacher cache of the *-cached runs
    # 7. evaluation: top-p 0.9 at eval_temperature (the primary condition, chosen on the valid split)
    # under eval_seeds, and greedy decoding (secondary)
    eval_documents: int = 64
    eval_prefix_tokens: int = 50
    eval_new_tokens: int = 100
    eval_temperature: float = 0.5
    eval_seeds: tuple[int, ...] = (0,)
    ppl_max_tokens: int = 16384
    mauve_seeds: tuple[int, ...] = (1,)

    @property
    def real(self) -> bool:
        return self.model != "micro"

    @property
    def arms(self) -> tuple[str, ...]:
        """The trained arms: ``runs``, plus the CE arm (the sft stage trains it for every seed)."""
        return tuple(dict.fromkeys((SFT_ARM, *self.runs)))

    @property
    def needs_pairs(self) -> bool:
        return any(ARMS[a].repair or a == "dpo" for a in self.arms)

    def runs_of(self, stage: str) -> dict[str, tuple[str, int]]:
        """``{run id: (arm, seed offset)}`` of the sft stage (the CE arm) or the train stage (the rest)."""
        arms = (SFT_ARM,) if stage == "sft" else [a for a in self.arms if a != SFT_ARM]
        return {run_id(a, k): (a, k) for a in arms for k in self.train_seeds}

    def stage_settings(self, stage: str) -> dict:
        """The settings a stage's outputs depend on."""
        train = ("sft_", "sequence_len", "micro_batch_size", "train_", "learning_rate", "clean_text")
        prefix = {"teacher": ("teacher_", "vocab_size", "model"), "prune": ("width_", "depth_", "calib_"),
                  "table1": ("table1_",), "sft": train,
                  "pairs": ("mine_from", "mining_", "target_pairs", "heldout_", "clean_text", "runs"),
                  "train": train + ("runs", "pairs_per_step", "dpo_", "cache_"),
                  "eval": ("eval_", "ppl_", "mauve_", "table1_prompts", "runs", "train_seeds", "clean_text")}[stage]
        return {k: v for k, v in asdict(self).items() if k.startswith(prefix)} | {"seed": self.seed}


def demo_settings(quick: bool = False, seed: int = 0, model: str = "smollm2",
                  preset: str | None = None) -> DemoSettings:
    """The presets. Real model: ``full`` (the experiment: 6 arms x 4 training seeds, <= 90 min on
    2 idle cores), ``quick`` (5 arms x 2 seeds, <= 12 min), ``smoke`` (the smallest run of every
    stage, one seed, for CI) and ``cache`` (KD / FOCUS from the teacher cache beside their in-process
    twins, 2 seeds). Micro model: ``full`` and ``quick``. ``preset`` overrides ``quick``."""
    preset = preset or ("quick" if quick else "full")
    if model not in MODELS:
        raise ValueError(f"model: must be one of {MODELS} (got {model!r})")
    if preset not in PRESETS:
        raise ValueError(f"preset: must be one of {PRESETS} (got {preset!r})")
    if model == "micro":
        if preset in ("smoke", "cache"):
            raise ValueError(f"preset: {preset} exists for the real model only")
        if preset == "full":
            return DemoSettings(seed=seed)
        return DemoSettings(
            quick=True, preset="quick", seed=seed, teacher_layers=6, teacher_hidden=64, teacher_heads=4,
            teacher_kv_heads=2, teacher_intermediate=176, teacher_steps=150, depth_blocks=2, calib_samples=4,
            table1_prompts=16, table1_new_tokens=100, mining_prompts=128, mining_new_tokens=96,
            mining_temperature=0.3, target_pairs=32, sft_max_rows=192, sequence_len=256, train_steps=8,
            runs=("ce", "ce-repair", "dpo"), train_seeds=(0, 1), pairs_per_step=4, eval_documents=32,
            ppl_max_tokens=2048, eval_temperature=0.3,
        )
    # SmolLM2-135M (30 layers, 9 q / 3 KV heads): whole-KV-group pruning would remove a third of
    # the attention or none, so q heads are pruned inside every group. The protocol was chosen on the
    # WikiText-2 valid split (docs/results.md, examples/protocol_check.py): of top-p 0.9 at T 0.6 /
    # 0.7 / 0.8, the temperature where the CE-tuned student's CREP is closest to 50% (0.6: 42%,
    # unpruned 10%) judges the claims and mines the pairs, the teacher's positives at T 1.0; the
    # pairs come from the tuned student (examples/mining_source_check.py)
    real = dict(
        model=model, preset=preset, quick=preset != "full", seed=seed, width_gqa_mode="q_within_group",
        width_layers=(3, 28), depth_blocks=9, calib_samples=10, table1_prompts=0, mining_prompts=603,
        mining_prefix_tokens=50, mining_new_tokens=96, mining_temperature=0.6, mining_teacher_temperature=1.0,
        target_pairs=120, sft_chunk_tokens=128, sft_max_rows=None, sequence_len=256, micro_batch_size=4,
        train_steps=30, learning_rate=1e-3, dpo_learning_rate=2e-4, train_lora_r=16, pairs_per_step=2,
        train_seeds=(0, 1, 2, 3), runs=("ce", "kd", "focus", "ce-repair", "focus-repair", "dpo"),
        eval_documents=48, eval_temperature=0.6, eval_seeds=(0,), ppl_max_tokens=4096, mauve_seeds=(1,),
        cache_k=512,
    )
    if preset == "quick":
        real |= dict(calib_samples=4, mining_prompts=160, target_pairs=40, train_steps=8, train_seeds=(0, 1),
                     runs=("ce", "focus", "ce-repair", "focus-repair", "dpo"), eval_documents=16, ppl_max_tokens=2048)
    elif preset == "smoke":
        real |= dict(calib_samples=2, depth_blocks=2, mining_prompts=32, mining_temperature=0.5, target_pairs=4,
                     mining_new_tokens=64, sft_max_rows=8, train_steps=3, train_seeds=(0,), pairs_per_step=2,
                     runs=("ce", "ce-repair", "dpo", "focus-cached"), cache_k=32, eval_documents=4,
                     eval_new_tokens=32, ppl_max_tokens=512)
    elif preset == "cache":
        real |= dict(calib_samples=4, train_seeds=(0, 1), runs=("ce", "kd", "focus", "kd-cached", "focus-cached"))
    return DemoSettings(**real)


def write_json(path: Path, data) -> None:
    """A stage record, atomically (:func:`axolotl_focus.files.write_json`)."""
    files.write_json(path, data, indent=2, default=str)


def fmt_time(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def run_config(s: DemoSettings, arm: str, k: int, *, student: str, sft: str, work: str | os.PathLike,
               pairs: str | None = None, sft_model: str | None = None) -> dict:
    """The axolotl config of ``arm`` under training seed ``seed + k`` (ordinary axolotl keys plus
    the plugin's). ``student``: the width-pruned checkpoint (records the teacher); ``sft``: the
    completion JSONL; ``pairs``: the training pairs (RePAIR and DPO arms); ``sft_model``: the CE
    run of the same seed, DPO's start; ``work``: the stage folder (outputs, prepared data)."""
    if arm not in ARMS:
        raise ValueError(f"runs: unknown {arm!r}; known {list(ARMS)}")
    a, work = ARMS[arm], Path(work)
    cfg = {
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
        "seed": s.seed + k,
        "dataset_num_proc": 1,  # worker processes cost more than they save on these few rows
        # one folder for all runs: axolotl names each prepared dataset by a hash of its settings,
        # so the runs on the same data tokenize and save it once
        "dataset_prepared_path": str(work / "prepared"),
    }
    if s.train_lora_r:
        # LoRA on every linear layer (axolotl's lora_target_linear); its Triton kernels need CUDA
        cfg |= {"adapter": "lora", "lora_r": s.train_lora_r, "lora_alpha": 2 * s.train_lora_r, "lora_dropout": 0.0,
                "lora_target_linear": True, "lora_mlp_kernel": False, "lora_qkv_kernel": False,
                "lora_o_kernel": False}
    if a.distill is None:  # DPO after the SFT: the CE run of this seed, the pairs as rows of pairs_per_step
        if not (pairs and sft_model):
            raise ValueError(f"{arm}: needs the training pairs and the CE run of the same seed")
        cfg |= {"base_model": str(sft_model), "rl": "dpo", "rl_beta": 0.1, "focus_dpo_reference": "teacher",
                "datasets": [{"path": str(pairs), "ds_type": "json", "split": "train"}],
                "micro_batch_size": s.pairs_per_step, "learning_rate": s.dpo_learning_rate}
    else:
        cfg |= {"focus_distill": a.distill, "datasets": [{"path": str(sft), "ds_type": "json", "type": "completion"}]}
    if a.repair:
        if not pairs:
            raise ValueError(f"{arm}: needs the training pairs")
        cfg |= {"focus_repair_pairs": str(pairs), "focus_repair_pairs_per_step": s.pairs_per_step}
    if a.cached:
        cfg["focus_teacher_cache"] = str(cache_dir(s, work))
    cfg["output_dir"] = str(work / run_id(arm, k))
    return cfg


def cache_dir(s: DemoSettings, work: str | os.PathLike) -> Path:
    """The one teacher cache of the train stage folder ``work``, shared by every ``*-cached`` run
    (they train on the same SFT rows at the same temperature); its name carries ``k``."""
    return Path(work) / f"teacher_cache_k{s.cache_k}"
