"""Re-export of `axolotl_focus.prune.modeling_pruned_llama` at its former path, kept on purpose.

Width-pruned checkpoints load with this package's classes through the Auto classes (registered
by `axolotl_focus/__init__.py`), and earlier checkpoints, user code and scripts import the model
classes from `axolotl_focus.modeling_pruned_llama`; this module keeps that import working. The
real file is `axolotl_focus/prune/modeling_pruned_llama.py`, which must stay self-contained: it is
copied into every width-pruned checkpoint (`auto_map` names it) for trust_remote_code loading.
"""

from .prune.modeling_pruned_llama import (  # noqa: F401 - re-exported names
    SHAPE_KEYS,
    PrunedLlamaConfig,
    PrunedLlamaForCausalLM,
    register_auto_classes,
    resize_decoder_layer,
)
