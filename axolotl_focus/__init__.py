"""axolotl-focus: FOCUS and RePAIR for pruned LLMs, as an Axolotl plugin.

Enable in an axolotl config with::

    plugins:
      - axolotl_focus.FocusPlugin

Importing the package imports neither torch nor transformers (``axolotl-focus --help`` stays fast):
the Auto-class registration of pruned checkpoints (:func:`axolotl_focus.prune.modeling_pruned_llama.
register_auto_classes`) runs as soon as ``transformers`` is imported in this process - at once if it
is already, else right after its import (a one-shot import hook).
"""

import importlib.abc
import importlib.util
import sys

from . import prune
from .exports import lazy_exports

__version__ = "0.1.0"
_MODELING = "axolotl_focus.prune.modeling_pruned_llama"
_register_when_defined = False  # read by the last lines of prune/modeling_pruned_llama.py


def _register_auto_classes() -> None:
    modeling = sys.modules.get(_MODELING)
    if modeling is not None and not hasattr(modeling, "register_auto_classes"):
        # that module is being imported and is what imported transformers: its classes do not exist
        # yet, so it registers them itself once they do
        global _register_when_defined
        _register_when_defined = True
        return
    prune.register_auto_classes()  # imports prune/modeling_pruned_llama.py (transformers) now


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_register_auto_classes` once ``transformers`` is imported, then leaves."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register_auto_classes()

        spec.loader.exec_module = exec_module
        return spec


# Pruned checkpoints load through the Auto classes in any process that imported this package.
if "transformers" in sys.modules:
    _register_auto_classes()
elif not any(isinstance(finder, _AfterTransformersImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformersImport())


# Lazy: importing axolotl is slow, and `axolotl_focus.train.losses` must stay usable without it.
__getattr__, __dir__, _exported = lazy_exports(__name__, {"plugin": ("FocusPlugin",)})
__all__ = [*_exported, "__version__"]
