"""axolotl-focus: FOCUS and RePAIR for pruned LLMs, as an Axolotl plugin.

Enable in an axolotl config with::

    plugins:
      - axolotl_focus.FocusPlugin
"""

__version__ = "0.1.0"

from .prune.modeling_pruned_llama import register_auto_classes as _register_auto_classes

# Pruned checkpoints (model_type `pruned_llama`) load through the Auto classes once imported.
_register_auto_classes()


def __getattr__(name):
    # Lazy: importing axolotl is slow, and `axolotl_focus.train.losses` must stay usable without it.
    if name == "FocusPlugin":
        from .plugin import FocusPlugin

        return FocusPlugin
    raise AttributeError(f"module 'axolotl_focus' has no attribute {name!r}")


__all__ = ["FocusPlugin", "__version__"]
