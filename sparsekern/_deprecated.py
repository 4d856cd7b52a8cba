"""Old public names that keep working for a release, each with a DeprecationWarning naming the new one.

A module whose public name moved or was renamed ends with

    __getattr__ = deprecated_names(__name__, {"old_name": "new.module:new_name"})

and then ``module.old_name`` (an attribute access or ``from module import old_name``) warns
and returns the object now at ``new.module:new_name``. The new place is imported only when an
old name is used, so keeping an alias adds no import (and no layer crossing) to the old module.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable


def deprecated_names(module: str, moved: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``module`` serving each old name of ``moved`` from its new place."""
    for old, new in moved.items():
        if new.count(":") != 1:
            raise ValueError(f"deprecated_names({module!r}): {old!r} -> {new!r}, expected 'package.module:name'")

    def __getattr__(name: str) -> object:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new_module, new_name = moved[name].split(":")
        # stacklevel=2: the warning names the line that used the old name, not this one.
        warnings.warn(
            f"{module}.{name} is deprecated and will be removed; use {new_module}.{new_name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new_module), new_name)

    return __getattr__
