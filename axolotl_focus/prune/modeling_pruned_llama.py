"""LLaMA with per-layer attention-head and MLP widths (the output of block-wise width pruning).

Self-contained on purpose (imports only torch and transformers): `save_pruned` copies this file
into every width-pruned checkpoint and sets `auto_map`, so that
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works in a process that never
imported `axolotl_focus` (lm-eval-harness, plain scripts).

Checkpoint format (the one `save_pruned` writes): `config.json` is a plain LLaMA config - `model_type:
llama`, the ORIGINAL global sizes (so LlamaConfig's validation passes, e.g. hidden_size %
num_attention_heads == 0), an explicit `head_dim` - plus `layer_shapes` (one dict per decoder layer
with its `num_attention_heads`, `num_key_value_heads` and `intermediate_size`), `architectures:
["PrunedLlamaForCausalLM"]` and `auto_map: {"AutoModelForCausalLM":
"modeling_pruned_llama.PrunedLlamaForCausalLM"}`. So:

- `AutoConfig` / `AutoTokenizer.from_pretrained(path)` load it in any process without asking about
  remote code (the config is transformers' own LlamaConfig, `layer_shapes` an extra attribute);
- `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` loads this class from the
  checkpoint; in a process that imported `axolotl_focus` no flag is needed
  (:func:`register_auto_classes`: for a LlamaConfig the Auto class builds this class when the config
  has `layer_shapes`, transformers' LlamaForCausalLM otherwise);
- in any other process, without `trust_remote_code`, transformers builds its plain LlamaForCausalLM
  and refuses the narrowed weights (a size-mismatch error): it never loads a wrong model.

Checkpoints of the earlier format (`model_type: pruned_llama`, `PrunedLlamaConfig`, an `auto_map`
with `AutoConfig` too) keep loading the same ways.

`PrunedLlamaForCausalLM` builds the vanilla model, then swaps each narrowed layer's q/k/v/o and
gate/up/down Linear modules for correctly shaped ones. Hidden size, embeddings, norms and lm_head
are never pruned. The KV cache (DynamicCache) sizes each layer lazily, so per-layer KV widths work
with `generate(use_cache=True)`.
"""

import sys

from torch import nn
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def check_layer_shapes(config) -> None:
    """Raise ValueError unless the config's `layer_shapes` (if any) has one valid entry per layer."""
    shapes = getattr(config, "layer_shapes", None)
    if shapes is None:
        return
    if len(shapes) != config.num_hidden_layers:
        raise ValueError(f"layer_shapes has {len(shapes)} entries, num_hidden_layers is {config.num_hidden_layers}")
    for i, shape in enumerate(shapes):
        heads, kv_heads, inter = (int(shape[k]) for k in SHAPE_KEYS)
        if min(heads, kv_heads, inter) < 1 or heads % kv_heads:
            raise ValueError(f"layer_shapes[{i}]={shape}: need >= 1 of each and heads % kv_heads == 0")


def layer_shape(config, idx: int) -> dict:
    """Widths of decoder layer `idx` of a LLaMA config with or without `layer_shapes`."""
    shapes = getattr(config, "layer_shapes", None)
    if shapes is None:
        return {k: getattr(config, k) for k in SHAPE_KEYS}
    return {k: int(shapes[idx][k]) for k in SHAPE_KEYS}


class PrunedLlamaConfig(LlamaConfig):
    """The config of width-pruned checkpoints of the earlier format (`model_type: pruned_llama`):
    LlamaConfig + per-layer widths (`layer_shapes`) + pruning metadata (`pruning`)."""

    model_type = "pruned_llama"

    # One {num_attention_heads, num_key_value_heads, intermediate_size} dict per layer (None: unpruned).
    layer_shapes: list | None = None
    # How the checkpoint was made: source model, method, ratio, ranges, importance, kept indices, ...
    pruning: dict | None = None
    # The unpruned source model (teacher); also in pruning["source_model"].
    focus_source_model: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_layer_shapes(self)

    def layer_shape(self, idx: int) -> dict:
        """Widths of decoder layer `idx` (the global sizes when the layer is not pruned)."""
        return layer_shape(self, idx)


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


def resize_decoder_layer(
    layer: nn.Module, num_attention_heads: int, num_key_value_heads: int, intermediate_size: int
) -> None:
    """Replace a LlamaDecoderLayer's projections with (uninitialised) ones of the given widths."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden, head_dim = attn.q_proj.in_features, attn.head_dim
    num_heads, num_kv_heads = num_attention_heads, num_key_value_heads
    if attn.q_proj.out_features != num_heads * head_dim or attn.k_proj.out_features != num_kv_heads * head_dim:
        attn.q_proj = _linear_like(attn.q_proj, hidden, num_heads * head_dim)
        attn.k_proj = _linear_like(attn.k_proj, hidden, num_kv_heads * head_dim)
        attn.v_proj = _linear_like(attn.v_proj, hidden, num_kv_heads * head_dim)
        attn.o_proj = _linear_like(attn.o_proj, num_heads * head_dim, hidden)
    # Used by repeat_kv (eager) and the SDPA/flash paths to map q heads onto kv heads.
    attn.num_key_value_groups = num_heads // num_kv_heads
    if mlp.gate_proj.out_features != intermediate_size:
        mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, intermediate_size)
        mlp.up_proj = _linear_like(mlp.up_proj, hidden, intermediate_size)
        mlp.down_proj = _linear_like(mlp.down_proj, intermediate_size, hidden)
    mlp.intermediate_size = intermediate_size


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose decoder layers have the widths listed in `config.layer_shapes` (a
    LlamaConfig with that attribute, or a PrunedLlamaConfig of the earlier format)."""

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        check_layer_shapes(config)
        super().__init__(config)
        if getattr(config, "layer_shapes", None) is not None:
            for idx, layer in enumerate(self.model.layers):
                resize_decoder_layer(layer, **layer_shape(config, idx))
            self.post_init()  # initialise the replaced modules like the rest of the model


class LlamaOrPrunedLlamaForCausalLM:
    """What AutoModelForCausalLM builds for a LlamaConfig in a process that imported axolotl_focus
    (:func:`register_auto_classes`): `PrunedLlamaForCausalLM` when the config has `layer_shapes`,
    transformers' `LlamaForCausalLM` otherwise. It counts as transformers' own class (its
    `__module__`), so a checkpoint's remote code keeps precedence under trust_remote_code=True,
    exactly as for a plain LLaMA."""

    __module__ = LlamaForCausalLM.__module__
    config_class = LlamaConfig

    @staticmethod
    def pick(config) -> type:
        return PrunedLlamaForCausalLM if getattr(config, "layer_shapes", None) is not None else LlamaForCausalLM

    @classmethod
    def from_pretrained(cls, *args, config=None, **kwargs):
        return cls.pick(config).from_pretrained(*args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return cls.pick(config)._from_config(config, **kwargs)


def register_auto_classes() -> None:
    """Make width-pruned checkpoints load through AutoConfig / AutoModelForCausalLM in this process,
    without trust_remote_code (idempotent): `model_type: pruned_llama` (the earlier format) is
    registered, and a LlamaConfig gets :class:`LlamaOrPrunedLlamaForCausalLM` (transformers'
    `register` ignores its native config types, so the mapping is set directly)."""
    # the Auto classes' table, only when registering
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    AutoConfig.register(PrunedLlamaConfig.model_type, PrunedLlamaConfig, exist_ok=True)
    # (AutoModelForCausalLM.register would insist on config_class == PrunedLlamaConfig; the class takes
    # any LlamaConfig with layer_shapes, the earlier format's subclass included)
    MODEL_FOR_CAUSAL_LM_MAPPING._extra_content[PrunedLlamaConfig] = PrunedLlamaForCausalLM
    MODEL_FOR_CAUSAL_LM_MAPPING._extra_content[LlamaConfig] = LlamaOrPrunedLlamaForCausalLM


# save_pretrained then copies this file into the checkpoint and writes `auto_map` (trust_remote_code).
PrunedLlamaConfig.register_for_auto_class()
PrunedLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

# A process that imported axolotl_focus registers these classes as soon as transformers is imported
# (axolotl_focus/__init__.py); when this module is what imported transformers, they did not exist yet
# then and it asked for them here (a look-up, not an import: this file also runs as remote code).
if getattr(sys.modules.get("axolotl_focus"), "_register_when_defined", False):
    register_auto_classes()
