"""Declare what your own modules and ops do to channels, so surgery can cut through them.

The channel analysis (``graph.py``) knows torch's convs, norms, activations, pooling, shape ops
and the eval-mode no-ops of torchvision and timm (``kinds.py``). Anything else is *opaque*: its
output channels are fixed, and a planned removal that reaches it is kept, with the op named in
the report (``prune_model(..., strict=True)`` raises instead). To let channels through, declare
the op, in the manner of Torch-Pruning's customized pruners (``customized_pruners={MyModule:
MyPruner()}`` with ``prune_out_channels`` / ``prune_in_channels``), but with fewer methods, since
exactness is decided by the analysis::

    from sparsekern.prune import register_channel_op, ChannelHandler

    register_channel_op(MySwish, "elementwise")     # y = f(x) element by element (no parameters)
    register_channel_op(my_identity_fn, "identity")  # y = x in eval mode
    register_channel_op(LayerScale, "channelwise", params=("gamma",))  # y_c = f_c(x_c), params per channel
    register_channel_op(MyConv, "producer", handler=MyConvHandler())   # reads channels, makes new ones
    register_channel_op(MyBlock, "opaque")           # never look inside; outputs fixed (the default)

``target`` is a module class (subclasses included; the class becomes an fx leaf, so its forward
is never traced), a function (matched as an fx ``call_function`` target) or a Tensor method name
(a ``str``, ``call_method``). Kinds:

- ``"identity"``: the output is the input (constants pass unchanged).
- ``"elementwise"``: one output element from one input element with the same function for every
  channel; a constant channel k becomes ``target(k)`` (computed by calling it on a float64
  tensor). Dead inputs are 0 only if ``target(0) == 0``, which the analysis computes itself.
- ``"channelwise"``: output channel c depends on input channel c only (per-channel parameters
  allowed). ``params`` names the module's tensors whose dim 0 is the channel dim (edited by
  surgery); a constant channel k becomes what the module outputs on a tensor filled with k
  (a module whose channel c depends on the position of the element should pass
  ``keeps_constants=False``). A ``handler`` replaces both.
- ``"producer"``: like a Conv: its output channels are new (planable by their layer name) and
  it reads all input channels. Needs a ``handler`` with ``out_channels(module)`` and
  ``prune(module, kept_in, kept_out)``; constant (nonzero) inputs are kept, as for a padded conv,
  unless the handler's ``fold(module, position, value)`` folds them into its bias.
- ``"opaque"``: the module is an fx leaf with fixed output channels.

A :class:`ChannelHandler` is the full form; every method has a default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import nn

CHANNEL_OP_KINDS = ("identity", "elementwise", "channelwise", "producer", "opaque")


class ChannelHandler:
    """How surgery edits a registered module and follows constants through it.

    ``prune(module, kept_in, kept_out)`` edits ``module`` in place so that it reads only the input
    channels ``kept_in`` and makes only the output channels ``kept_out`` (sorted original indices;
    for a channelwise module both are the same list). ``constant(module, channel, value, shape)``:
    output channel ``channel`` when that input channel is the constant ``value`` (``shape``: the
    input's shape), or None when it is not constant. ``out_channels(module)``: a producer's output
    count. ``fold(module, position, value) -> bool``: fold a constant input channel into the
    module's bias before ``prune`` removes it (producers); False (the default) keeps that channel.
    """

    def __init__(self, params: tuple = (), keeps_constants: bool = True):
        self.params = tuple(params)
        self.keeps_constants = keeps_constants

    def prune(self, module: nn.Module, kept_in: list, kept_out: list) -> None:
        for name in self.params:
            value = getattr(module, name)
            if value is None:
                continue
            index = torch.tensor(kept_out, dtype=torch.long, device=value.device)
            new = value.detach().index_select(0, index).clone()
            if isinstance(value, nn.Parameter):
                setattr(module, name, nn.Parameter(new, requires_grad=value.requires_grad))
            else:
                setattr(module, name, new)

    def constant(self, module: nn.Module, channel: int, value: float, shape) -> Optional[float]:
        if not self.keeps_constants:
            return None
        param = next((p for p in module.parameters()), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float64
        if shape is None:  # a graph built without example inputs: guess (1, C, 1, 1) from the parameters
            sizes = [getattr(module, n).shape[0] for n in self.params if getattr(module, n, None) is not None]
            if not sizes:
                return None
            shape = (1, sizes[0], 1, 1)
        probe = torch.full((1, shape[1]) + (1,) * (len(shape) - 2), value, dtype=dtype)
        try:
            with torch.no_grad():
                out = module(probe)
        except Exception:  # the module wants another shape: say "not constant"
            return None
        if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
            return None
        return float(out[0, channel].reshape(-1)[0].double())

    def out_channels(self, module: nn.Module) -> int:
        raise NotImplementedError(f"{type(self).__name__}.out_channels: a producer handler must say how many "
                                  "output channels the module has")

    def fold(self, module: nn.Module, position: int, value: float) -> bool:
        return False


@dataclass(frozen=True)
class ChannelOp:
    """One registration (see the module docstring)."""

    kind: str
    handler: Optional[ChannelHandler] = None
    description: str = field(default="", compare=False)


_MODULES: dict = {}
_FUNCTIONS: dict = {}
_METHODS: dict = {}


def register_channel_op(target: Union[type, Callable, str], kind: str, *, handler: Optional[ChannelHandler] = None,
                        params: tuple = (), keeps_constants: bool = True) -> None:
    """Declare what ``target`` does to channels (see the module docstring). Registering a target
    again replaces its entry; :func:`unregister_channel_op` removes it."""
    if kind not in CHANNEL_OP_KINDS:
        raise ValueError(f"register_channel_op: kind must be one of {CHANNEL_OP_KINDS}, got {kind!r}")
    if handler is not None and not isinstance(handler, ChannelHandler):
        raise TypeError("register_channel_op: handler must be a sparsekern.prune.ChannelHandler")
    is_module = isinstance(target, type) and issubclass(target, nn.Module)
    if kind == "producer" and (handler is None or not is_module):
        raise ValueError("register_channel_op: a 'producer' is a module class with a handler (out_channels, prune)")
    if kind == "channelwise":
        if not is_module:
            raise ValueError("register_channel_op: 'channelwise' is for module classes (functions: 'elementwise')")
        handler = handler or ChannelHandler(params, keeps_constants)
    if (params or not keeps_constants) and kind != "channelwise":
        raise ValueError("register_channel_op: params / keeps_constants apply to 'channelwise' modules")
    op = ChannelOp(kind, handler)
    if is_module:
        _MODULES[target] = op
    elif isinstance(target, str):
        _METHODS[target] = op
    elif callable(target):
        _FUNCTIONS[target] = op
    else:
        raise TypeError(f"register_channel_op: target must be a module class, a function or a method name, got {target!r}")


def unregister_channel_op(target) -> None:
    """Forget ``target``'s registration (no error if it has none)."""
    for table in (_MODULES, _FUNCTIONS, _METHODS):
        try:
            table.pop(target, None)
        except TypeError:  # unhashable
            pass


def module_op(module: nn.Module) -> Optional[ChannelOp]:
    """The registration of ``module``'s class or of its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls in _MODULES:
            return _MODULES[cls]
    return None


def function_op(function) -> Optional[ChannelOp]:
    try:
        return _FUNCTIONS.get(function)
    except TypeError:
        return None


def method_op(name: str) -> Optional[ChannelOp]:
    return _METHODS.get(name)


def is_registered_leaf(module: nn.Module, qualname: str = "") -> bool:
    """Registered module classes are fx leaves (their forward is described, not traced)."""
    return module_op(module) is not None
