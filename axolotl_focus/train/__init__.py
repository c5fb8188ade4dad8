"""Stage 3 of the pipeline, training: the FOCUS trainer, its teacher (in process or from a
teacher-logit cache, :mod:`.teacher_cache`), the RePAIR pair dataset type and pair stream, the
baseline terms, the fused losses (:mod:`.losses`), and the check of a config before any weights
are loaded (:mod:`.checks`).

The public API below is imported from its module on first use (:mod:`axolotl_focus.exports`).
"""

from ..exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "checks": ("check", "describe_loss"),
    "ditto": ("pseudo_rows",),
    "pair_dataset": ("RepairCollator", "check_pair_file", "uses_repair"),
    "pair_stream": ("PairStream",),
    "teacher": ("check_config_teacher", "load_teacher", "resolve_dtype", "teacher_name", "use_teacher_as_reference"),
    "tokenizer": ("student_tokenizer",),
    "trainer": ("FocusTrainer", "NonFiniteTraining"),
})
