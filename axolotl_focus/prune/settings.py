"""The pruning settings: ONE pydantic model for the `focus_prune:` YAML block, the options of
`axolotl-focus prune` (one --flag per field, built from it by `cli._add_prune_options`) and the
prune functions (`prune_width`, `prune_depth`, `run_prune`, ...), which all take it.

Field constraints (types, choices, open intervals) are checked by pydantic when the model is
built; `PruneSettings.validate(model_config)` adds what needs the model: the architecture, the
layer ranges, exactly one of num_blocks / block_fraction, that no layer loses all its heads or
channels, and that depth pruning leaves removable blocks. It raises ValueError naming the option
and value. The module itself imports neither torch nor transformers (config.py imports it).

Defaults follow LLM-Pruner's commands: 25% per-layer width ratio in layers [4, L-2), first-order
Taylor importance, 10 calibration windows of 64 tokens. The field set and defaults are part of the
cache key of pruned checkpoints (`cache.cache_path` hashes `model_dump()`): renaming, adding or
re-defaulting a field changes every cache folder.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, model_validator

# re-exported: the pruning code imports them from .common, which needs no pydantic
from .common import (  # noqa: F401
    DEPTH_SCORES,
    GQA_MODES,
    GRADIENT_IMPORTANCES,
    IMPORTANCES,
    SUPPORTED_MODEL_TYPES,
    check_architecture,
    model_dims,
)
from .shapes import plan_width

_WIDTH_ONLY = ("ratio", "target_param_reduction", "importance", "attn_layers", "mlp_layers", "gqa_mode", "uniform")
_DEPTH_ONLY = ("num_blocks", "block_fraction", "depth_score", "protected_first", "protected_last")


class PruneSettings(BaseModel):
    """`focus_prune:` - prune `base_model` before training (LLM-Pruner width / Shortened-LLaMA depth).

    Defaults follow LLM-Pruner's commands: 25% per-layer width ratio in layers [4, L-2),
    first-order Taylor importance, 10 calibration windows of 64 tokens.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["width", "depth"] = "width"
    ratio: FiniteFloat = Field(default=0.25, gt=0, lt=1, description=(
        "nominal per-layer width ratio (LLM-Pruner's pruning ratio): the share of the attention heads or KV groups "
        "(whole units, rounded down) and of the MLP channels removed in each layer of attn_layers / mlp_layers; "
        "the parameter cut is smaller (embeddings, norms and the layers outside the ranges are not pruned)"))
    target_param_reduction: FiniteFloat | None = Field(default=None, gt=0, lt=1, description=(
        "the fraction of ALL parameters to remove (embeddings included): the per-layer ratio is solved for it "
        "(not together with ratio); default: unset, ratio is used"))
    importance: Literal["param_first", "vectorize", "param_second", "param_mix", "l1", "l2", "random"] = "param_first"
    attn_layers: list[int] | None = Field(
        default=None, description="[start, end) of attention pruning; default [4, L-2)",
        json_schema_extra={"cli": {"nargs": 2, "metavar": ("START", "END")}})
    mlp_layers: list[int] | None = Field(default=None, description="[start, end) of MLP pruning; default [4, L-2)",
                                         json_schema_extra={"cli": {"nargs": 2, "metavar": ("START", "END")}})
    gqa_mode: Literal["group", "q_within_group"] = "group"
    uniform: bool = Field(default=False, description="same vanilla shape in every layer (vLLM-servable; not the paper)")
    num_blocks: int | None = Field(default=None, ge=1, description="depth: blocks to remove")
    block_fraction: FiniteFloat | None = Field(default=None, gt=0, lt=1,
                                               description="depth: fraction of blocks to remove")
    depth_score: Literal["taylor", "ppl"] = "taylor"
    protected_first: int = Field(default=4, ge=0)
    protected_last: int = Field(default=2, ge=0)
    calibration: str | None = Field(default=None, description="hub dataset id or local .txt/.jsonl; "
                                    "default: the embedded WikiText-2 slice")
    calibration_split: str = "train"
    calibration_field: str = "text"
    calibration_config: str | None = Field(default=None, description="hub dataset configuration name, "
                                           "e.g. wikitext-2-raw-v1 for calibration: wikitext")
    calib_samples: int = Field(default=10, ge=1)
    calib_seq_len: int = Field(default=64, ge=2)
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field(default="auto", description="'auto' (cuda if available), 'cpu', 'cuda', ...")
    cache_dir: str | None = Field(
        default=None, description="default $AXOLOTL_FOCUS_CACHE/pruned or ~/.cache/axolotl_focus/pruned")
    wait_timeout: FiniteFloat = Field(default=7200, gt=0, description="seconds other ranks wait for rank 0's pruning",
                                json_schema_extra={"cli": {"cli": False}})

    @model_validator(mode="after")
    def _no_ignored_settings(self) -> "PruneSettings":
        """A setting the chosen method would ignore is refused (it would silently do nothing): one
        given with a value other than its default (a ``model_dump()`` of valid settings stays valid)."""
        changed = {name for name in self.model_fields_set if getattr(self, name) != self.model_fields[name].default}
        if "ratio" in changed and self.target_param_reduction is not None:
            raise ValueError("ratio and target_param_reduction: give one (target_param_reduction solves the "
                             "per-layer ratio for a share of all parameters)")
        if self.uniform and changed & {"attn_layers", "mlp_layers"}:
            raise ValueError("uniform: true prunes every layer; remove attn_layers / mlp_layers")
        other = _DEPTH_ONLY if self.method == "width" else _WIDTH_ONLY
        ignored = [name for name in self.model_fields if name in other and name in changed]
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: not used by method: {self.method} (remove, or set method: "
                             f"{'depth' if self.method == 'width' else 'width'})")
        return self

    def layer_ranges(self, num_layers: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The (attention, MLP) layer ranges [start, end) that width pruning touches."""
        if self.uniform:
            return (0, num_layers), (0, num_layers)
        return tuple(self._range(name, num_layers) for name in ("attn_layers", "mlp_layers"))

    def _range(self, name: str, num_layers: int) -> tuple[int, int]:
        value = getattr(self, name)
        if value is None:
            if num_layers - 2 <= 4:
                raise ValueError(
                    f"{name}: the default range [4, num_layers - 2) is empty for a {num_layers}-layer model; "
                    f"set {name} explicitly"
                )
            return (4, num_layers - 2)
        if len(value) != 2:
            raise ValueError(f"{name}={value!r}: expected [start, end) as two integers")
        start, end = value
        if not 0 <= start < end <= num_layers:
            raise ValueError(
                f"{name}={list(value)}: needs 0 <= start < end <= {num_layers} (the model has {num_layers} layers)"
            )
        return (start, end)

    def validate(self, model_config: Any = None, num_layers: int | None = None) -> "PruneSettings":
        """Check what the field constraints cannot: exactly one of num_blocks / block_fraction for
        depth pruning and, with the model's config, the architecture, the layer ranges and that no
        layer loses all its heads/channels (or that depth pruning has blocks to remove). Raises
        ValueError naming the option and value. Returns self, so
        `settings = PruneSettings(...).validate(config)` reads well."""
        if self.method == "depth" and (self.num_blocks is None) == (self.block_fraction is None):
            raise ValueError(f"num_blocks={self.num_blocks!r}, block_fraction={self.block_fraction!r}: set exactly one")
        if model_config is not None:
            check_architecture(model_config)
            num_layers = model_config.num_hidden_layers
            context = getattr(model_config, "max_position_embeddings", None)
            if context and self.calib_seq_len > context:
                raise ValueError(f"calib_seq_len={self.calib_seq_len}: longer than the model's context "
                                 f"(max_position_embeddings {context})")
        if num_layers is None:
            return self
        if self.method == "depth":
            n, candidates = self.blocks_to_remove(num_layers), num_layers - self.protected_first - self.protected_last
            what = (
                f"num_blocks={self.num_blocks}" if self.num_blocks is not None
                else f"block_fraction={self.block_fraction}"
            )
            if n < 1:
                raise ValueError(f"{what}: removes no block of the {num_layers}-layer model")
            if n > candidates:
                raise ValueError(
                    f"{what}: removes {n} blocks, but only {max(candidates, 0)} of {num_layers} are removable "
                    f"(protected_first={self.protected_first}, protected_last={self.protected_last})"
                )
            return self
        self.layer_ranges(num_layers)
        if model_config is not None:
            plan_width(model_config, self)  # raises if a layer would lose every unit
        return self

    def blocks_to_remove(self, num_layers: int) -> int:
        return self.num_blocks if self.num_blocks is not None else int(self.block_fraction * num_layers)

