"""What the pruning settings and the pruning code share, without pydantic: the names of the
importance criteria and the rest of the choices, the keys of a width-pruned layer's shape
(`SHAPE_KEYS`), what the width arithmetic reads of its settings (`WidthSettings`), and what pruning
supports and reads of a model config (`check_architecture`, `model_dims`).

`settings` (the pydantic model) re-exports them. The pruning code (`importance`, `shapes`,
`width`, `depth`, `calibration`) imports them from here and `PruneSettings` only for its type
annotations, so it runs where pydantic is not installed, with any object that has
`PruneSettings`' fields and methods as its settings (benchmarks/gpu_check.py, on a GPU machine
without axolotl).
"""

from __future__ import annotations

from typing import Any, Protocol

IMPORTANCES = ("param_first", "vectorize", "param_second", "param_mix", "l1", "l2", "random")
GRADIENT_IMPORTANCES = ("param_first", "vectorize", "param_second", "param_mix")
GQA_MODES = ("group", "q_within_group")
DEPTH_SCORES = ("taylor", "ppl")
SUPPORTED_MODEL_TYPES = ("llama",)
# a width-pruned layer's sizes in config.json's `layer_shapes`; modeling_pruned_llama.py, which must stay
# self-contained (it is copied into every width-pruned checkpoint), spells the same tuple
SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


class WidthSettings(Protocol):
    """What the closed-form width arithmetic (`shapes`) reads of its settings; `PruneSettings` has it."""

    ratio: float
    target_param_reduction: float | None
    gqa_mode: str
    uniform: bool

    def layer_ranges(self, num_layers: int) -> tuple[tuple[int, int], tuple[int, int]]: ...


def check_architecture(model_config: Any) -> None:
    model_type = getattr(model_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(getattr(model_config, "architectures", None) or []) or type(model_config).__name__
        raise ValueError(
            f"unsupported architecture: model_type={model_type!r} ({arch}); pruning supports LlamaForCausalLM "
            f"(model_type 'llama', MHA and GQA layouts) only"
        )


def model_dims(model_config) -> tuple[int, int, int, int, int]:
    """(hidden, head_dim, q heads, kv heads, intermediate) of an unpruned LLaMA config."""
    hidden, heads = model_config.hidden_size, model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    return hidden, head_dim, heads, kv_heads, model_config.intermediate_size
