"""Save and load pruned checkpoints.

`save_pruned` writes what `from_pretrained` loads: safetensors weights, the config (for width
pruning with per-layer shapes: `model_type: llama` plus `layer_shapes`, `architectures:
["PrunedLlamaForCausalLM"]` and an `auto_map` naming `modeling_pruned_llama.py`, which is copied
beside the weights so that trust_remote_code works without this package - the format is described
in `modeling_pruned_llama`; a plain `llama` config for uniform/depth pruning) and the tokenizer.
`load_pruned` loads either kind, and checkpoints of the earlier `pruned_llama` format, with this
package's classes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from transformers import AutoModelForCausalLM

from ..embedded_model import fix_tokenizer_config
from . import modeling_pruned_llama
from .modeling_pruned_llama import PrunedLlamaConfig

log = logging.getLogger(__name__)


def save_pruned(model, tokenizer, path: str | os.PathLike) -> str:
    """Write a checkpoint that `from_pretrained` loads: safetensors weights, config (`llama` with
    per-layer shapes and `auto_map` + `modeling_pruned_llama.py`, so that trust_remote_code works
    without this package; or plain `llama` for uniform/depth pruning),
    the `pruning` metadata and `focus_source_model`, and the tokenizer, its tokenizer_config.json
    with an explicit `tokenizer_class` (the tokenizer's class name) and without the machine-local
    keys transformers writes (`local_files_only`, `is_local`, ...: `fix_tokenizer_config`)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
        fix_tokenizer_config(path, type(tokenizer).__name__)
    if getattr(model.config, "layer_shapes", None) is not None:
        # save_pretrained copies the code through register_for_auto_class; make sure of it regardless.
        target = os.path.join(path, "modeling_pruned_llama.py")
        if not os.path.exists(target):
            shutil.copyfile(modeling_pruned_llama.__file__, target)
        config_file = os.path.join(path, "config.json")
        with open(config_file, encoding="utf-8") as f:
            data = json.load(f)
        want = {"AutoModelForCausalLM": "modeling_pruned_llama.PrunedLlamaForCausalLM"}
        if isinstance(model.config, PrunedLlamaConfig):  # the earlier format: its config class is remote code too
            want["AutoConfig"] = "modeling_pruned_llama.PrunedLlamaConfig"
        if data.get("auto_map") != want or data.get("architectures") != ["PrunedLlamaForCausalLM"]:
            data.update(auto_map=want, architectures=["PrunedLlamaForCausalLM"])
            with open(config_file, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")
    log.info("saved pruned checkpoint to %s", path)
    return path


def load_pruned(path: str | os.PathLike, **kwargs):
    """Load a checkpoint written by `save_pruned` (pruned_llama or plain llama) with this package's classes."""
    modeling_pruned_llama.register_auto_classes()
    return AutoModelForCausalLM.from_pretrained(os.fspath(path), **kwargs)
