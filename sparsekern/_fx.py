"""Tracing a model with torch.fx, the one way the tracker and the channel analysis both do it
(a leaf: imports torch, ``_types`` and ``errors`` only).

``leaf_modules`` lets a user keep a module torch.fx cannot trace (data-dependent Python control
flow) as one opaque node: the tracker does not look inside it, and surgery treats its output
channels as fixed. Entries are module classes or qualified module names. ``concrete_args`` is
passed to ``torch.fx.Tracer.trace`` (fix a Python argument, e.g. ``{"return_features": False}``).
When tracing fails, the error names the module being traced at the failure and says what to do;
with ``opaque_untraceable=True`` such a module becomes a leaf instead (partial plans keep its
channels and say so).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.fx
from torch import nn

from sparsekern._types import norm_act_activation
from sparsekern.errors import UntraceableModelError


def normalize_leaf_modules(leaf_modules) -> tuple:
    """``leaf_modules`` as a tuple of classes and names; one clear error for anything else."""
    if leaf_modules is None:
        return ()
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = (leaf_modules,)
    out = []
    for entry in leaf_modules:
        if not (isinstance(entry, str) or (isinstance(entry, type) and issubclass(entry, nn.Module))):
            raise TypeError(f"leaf_modules: expected module classes or qualified module names, got {entry!r}")
        out.append(entry)
    return tuple(out)


class LeafTracer(torch.fx.Tracer):
    """torch.fx's default leaves (torch.nn modules), registered norm-act modules, the user's
    ``leaf_modules``, and whatever ``is_leaf`` (module, qualname) -> bool adds."""

    def __init__(self, leaf_modules: Iterable = (), is_leaf=None):
        super().__init__()
        leaves = normalize_leaf_modules(leaf_modules)
        self.leaf_types = tuple(e for e in leaves if isinstance(e, type))
        self.leaf_names = frozenset(e for e in leaves if isinstance(e, str))
        self.extra_is_leaf = is_leaf
        self.failed_in: Optional[str] = None  # the innermost module being traced when tracing failed

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if norm_act_activation(m) is not None:
            return True
        if self.extra_is_leaf is not None and self.extra_is_leaf(m, qualname):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def trace_graph(model: nn.Module, leaf_modules: Iterable = (), concrete_args: Optional[dict] = None,
                is_leaf=None, *, opaque_untraceable: bool = False) -> torch.fx.GraphModule:
    """A GraphModule of ``model`` (sharing its submodules), or UntraceableModelError saying
    where tracing failed and what to do.

    ``opaque_untraceable``: when tracing fails inside a submodule (not the model's own forward),
    trace again with that submodule as a leaf, as often as needed; the GraphModule's
    ``meta["untraceable"]`` maps each such module's name to why it could not be traced, so a
    caller that treats leaves as opaque ops (surgery's partial plans) can say what it kept.
    """
    leaves = list(normalize_leaf_modules(leaf_modules))
    untraceable: dict[str, str] = {}
    while True:
        try:
            gm = _trace_once(model, leaves, concrete_args, is_leaf)
        except UntraceableModelError as exc:
            failed = exc.failed_in
            if not (opaque_untraceable and failed and failed not in untraceable and len(untraceable) < 64):
                raise
            untraceable[failed] = exc.cause
            leaves.append(failed)
            continue
        gm.meta["untraceable"] = untraceable
        gm.meta["leaf_modules"] = tuple(leaves)
        return gm


def _trace_once(model: nn.Module, leaf_modules, concrete_args, is_leaf) -> torch.fx.GraphModule:
    tracer = LeafTracer(leaf_modules, is_leaf)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises TraceError, TypeError, AttributeError... on dynamic code
        failed = tracer.failed_in
        where = f" inside module {failed!r} ({type(model.get_submodule(failed)).__name__})" if failed else ""
        hint = (f"pass leaf_modules=[{failed!r}] (or its class) to keep it as one opaque op"
                if failed else "pass concrete_args= for Python arguments that steer control flow, or "
                "leaf_modules= for the submodules that cannot be traced")
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        cause = f"{type(exc).__name__}: {first_line}"
        error = UntraceableModelError(f"torch.fx cannot trace {type(model).__name__}{where} ({cause}); {hint}")
        error.failed_in, error.cause = failed or None, cause
        raise error from exc
    name = model.__class__.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)
