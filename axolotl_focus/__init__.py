"""axolotl-focus: FOCUS and RePAIR for pruned LLMs, as an Axolotl plugin.

Enable in an axolotl config with::

    plugins:
      - axolotl_focus.FocusPlugin
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: importing axolotl is slow, and `axolotl_focus.losses` must stay usable without it.
    if name == "FocusPlugin":
        from .plugin import FocusPlugin

        return FocusPlugin
    raise AttributeError(f"module 'axolotl_focus' has no attribute {name!r}")


__all__ = ["FocusPlugin", "__version__"]
