"""Entry module of the dataset type ``type: axolotl_focus.repair`` (RePAIR pairs).

Axolotl imports the module a dataset's ``type:`` names and calls its ``load(tokenizer, cfg,
ds_cfg)``; a type must name a module, not a function inside one, so the public name
``axolotl_focus.repair`` needs this module. The strategy itself, its pre-check and its collator
live in :mod:`axolotl_focus.train.pair_dataset`; this module only re-exports its entry point.
"""

from .train.pair_dataset import load

__all__ = ["load"]
