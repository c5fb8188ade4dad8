"""How every package of axolotl_focus declares its public API: ``__all__``, from one map of submodule
-> names (and the submodules offered whole), each imported on first use (PEP 562 ``__getattr__``).
Importing a package therefore imports none of its submodules, so ``axolotl-focus --help`` imports
no torch and a light module (a command's options, the check driver, a demo stage) can hold a
stage's heavy functions by name until it calls them. The idea of TRL's ``trl/trainer/__init__.py``
(``_import_structure``), without replacing the module object."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence

__all__ = ["lazy_exports"]


def lazy_exports(package: str, structure: Mapping[str, Sequence[str]], modules: Sequence[str] = ()
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` of the package ``package`` whose public names are
    ``structure`` (submodule -> names) and the submodules ``modules``; each is imported on first
    use."""
    home = {name: module for module, names in structure.items() for name in names}

    def __getattr__(name: str) -> object:
        if name in modules:
            return importlib.import_module(f"{package}.{name}")  # the import sets it on the package
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # looked up on every use, not kept: a test's monkeypatch of the submodule shows through the package
        return getattr(importlib.import_module(f"{package}.{home[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(home) | set(modules))

    return __getattr__, __dir__, sorted([*home, *modules])
