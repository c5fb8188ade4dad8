"""Stage 1 of the pipeline: prune the student (LLM-Pruner width / Shortened-LLaMA depth pruning).

One concept per module: `settings` (the one pruning settings model: `focus_prune:` YAML, the
`axolotl-focus prune` options and the prune functions), `common` (what settings and the pruning
code share without pydantic: the choices' names, `check_architecture`, `model_dims`), `shapes`
(closed-form per-layer shapes and parameter counts), `calibration` (calibration texts and token
windows), `importance` (LLM-Pruner block-wise importance), `width` (structured width pruning),
`depth` (block removal), `report` (what pruning did), `checkpoint` (save/load of pruned
checkpoints), `modeling_pruned_llama` (the self-contained model class of width-pruned
checkpoints), `cache` (the axolotl-time prune-into-cache of `focus_prune:`) and `checks` (the
check of `focus_prune:` before any work).

The public API below is imported from its module on first use (:mod:`axolotl_focus.exports`).
"""

from ..exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "cache": ("REPORT_FILE", "apply_to_config", "cache_path", "disable_attention_lora_kernels", "ensure_pruned",
              "plan_prune", "prune", "run_prune", "source_fingerprint"),
    "calibration": ("load_calibration_texts",),
    "checkpoint": ("load_pruned", "save_pruned"),
    "checks": ("check",),
    "depth": ("prune_depth",),
    "importance": ("compute_importance",),
    "modeling_pruned_llama": ("PrunedLlamaConfig", "PrunedLlamaForCausalLM", "register_auto_classes"),
    "report": ("PruneReport", "requested"),
    "settings": ("PruneSettings",),
    "shapes": ("count_params", "plan_width"),
    "width": ("prune_width",),
})
