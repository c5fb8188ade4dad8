"""Stage 1 of the pipeline: prune the student (LLM-Pruner width / Shortened-LLaMA depth pruning).

One concept per module: `settings` (the one pruning settings model: `focus_prune:` YAML, the
`axolotl-focus prune` options and the prune functions), `common` (what settings and the pruning
code share without pydantic: the choices' names, `check_architecture`, `model_dims`), `shapes`
(closed-form per-layer shapes and parameter counts), `calibration` (calibration texts and token
windows), `importance` (LLM-Pruner block-wise importance), `width` (structured width pruning),
`depth` (block removal), `report` (what pruning did), `checkpoint` (save/load of pruned
checkpoints), `modeling_pruned_llama` (the self-contained model class of width-pruned
checkpoints) and `cache` (the axolotl-time prune-into-cache of `focus_prune:`). This file imports
none of them.
"""
