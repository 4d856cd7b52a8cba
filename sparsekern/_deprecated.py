"""Old public names that keep working for one release: a module-level ``__getattr__`` that
returns the renamed or moved object and warns (a leaf: imports nothing of sparsekern).

    from sparsekern._deprecated import deprecated_names
    __getattr__ = deprecated_names(__name__, {"LayerReport": LayerSparsity})

Python calls a module's ``__getattr__`` only for names the module does not define, so the old
name costs nothing until someone uses it, and then says where its replacement lives.
"""
from __future__ import annotations

import importlib
import warnings


def deprecated_names(module: str, aliases: dict[str, object]):
    """A ``__getattr__`` for ``module`` serving each old name in ``aliases`` (old name -> the
    object now known by another name or module) with a DeprecationWarning naming the new place."""

    def __getattr__(name: str):
        try:
            new = aliases[name]
        except KeyError:
            raise AttributeError(f"module {module!r} has no attribute {name!r}") from None
        place = f"{new.__module__}.{getattr(new, '__qualname__', name)}"
        warnings.warn(f"{module}.{name} is deprecated and will be removed in the next release; use {place}",
                      DeprecationWarning, stacklevel=2)
        return new

    return __getattr__


def deprecated_paths(module: str, paths: dict[str, str]):
    """The same for names that moved up the layers (out of ``prune`` into ``experiments``):
    ``paths`` maps each old name to the dotted path of its new home (``"package.module.name"``),
    imported on first use of the old name only, so importing ``module`` still loads nothing above
    its own layer."""

    def __getattr__(name: str):
        try:
            path = paths[name]
        except KeyError:
            raise AttributeError(f"module {module!r} has no attribute {name!r}") from None
        warnings.warn(f"{module}.{name} is deprecated and will be removed in the next release; use {path}",
                      DeprecationWarning, stacklevel=2)
        home, _, attr = path.rpartition(".")
        return getattr(importlib.import_module(home), attr)

    return __getattr__
