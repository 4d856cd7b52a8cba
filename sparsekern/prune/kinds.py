"""What each traced op does to channels: the node kinds of the channel graph and the table of
modules, functions and methods that have each (the layer kinds come from ``sparsekern._types``).

``classify`` reads one fx node from its op and target alone (shapes are checked by the graph,
``graph.py``); ``constant_through`` follows a constant channel through a one-input op, which
``from_gamma`` and surgery use to know what a removed channel outputs downstream. Ops declared
with ``registry.register_channel_op`` are looked up first.

What the table knows, beyond convs, BNs and activations: eval-mode no-ops (Dropout, Identity,
torchvision's ``stochastic_depth`` with ``training=False``; timm's DropPath returns its input
in eval mode, so it never reaches the graph); norm-then-activation modules (timm's
``BatchNormAct2d`` family, ``_types.norm_act_activation``): a BN followed by its elementwise
activation; pooling, ``interpolate`` / ``Upsample`` (a constant stays constant) and padding
(constant padding with value v keeps only the constant v: zero-padding a constant channel k
makes it non-constant at the borders); splits, slices, transposes and reshapes along the
channel dim (the graph maps them, ``graph.py``); LayerNorm / GroupNorm (they normalise over the
channel dim and mix channels: a removal that reaches one is kept).
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_arg

from sparsekern._types import BATCH_NORMS, CONVS, ELEMENTWISE_ACTIVATIONS, LINEARS, norm_act_activation
from sparsekern.prune import registry

# Node kinds -------------------------------------------------------------------------------
INPUT = "input"              # placeholder
PRODUCER = "producer"        # Conv (groups == 1) / Linear: reads channels, makes new ones
GROUPED = "grouped"          # Conv with groups > 1: output group g follows input group g
CHANNELWISE = "channelwise"  # BatchNorm: one set of parameters per channel
ELEMENTWISE = "elementwise"  # activation or arithmetic with a number, applied per element
IDENTITY = "identity"        # dropout (eval), identity, contiguous, flatten(start_dim >= 2)...
POOL = "pool"                # spatial pooling / reduction: keeps channels
FLATTEN = "flatten"          # (N, C, *S) -> (N, C * prod(S)): channel c -> features c*S..(c+1)*S-1
CAT = "cat"                  # concatenation along dim 1
BINARY = "binary"            # add / sub / mul / div of two channel tensors: ties their channels
PERCHANNEL = "perchannel"    # a registered channelwise module: output channel c from input channel c
SPLIT = "split"              # torch.split / chunk along dim 1: a tuple of channel ranges
GETITEM = "getitem"          # a part of a split, or a tensor slice along dim 1
TRANSPOSE = "transpose"      # transpose / permute (channel grids of a channel shuffle, spatial dims)
SHUFFLE = "shuffle"          # a permutation of channel positions (channel_shuffle, reshapes of channel grids)
MIXING = "mixing"            # LayerNorm / GroupNorm over the channel dim: channels pass, removals cannot
OUTPUT = "output"
IGNORE = "ignore"            # no tensor result (x.size(0), getattr(x, "shape")...)
UNKNOWN = "unknown"          # anything else

# Ops a private chain may pass through: each is fed by one tensor and keeps its channels.
CHAIN_KINDS = (CHANNELWISE, ELEMENTWISE, IDENTITY, POOL, PERCHANNEL)

# Modules that pass their input on unchanged in eval mode.
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
# Pools whose output is the constant k wherever their input is the constant k.
_CONSTANT_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_UPSAMPLE_MODULES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
_REPEATING_PAD_MODULES = (
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)
_CONSTANT_PAD_MODULES = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)
_INTERPOLATE_FUNCTIONS = {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear}
_SPLIT_FUNCTIONS = {torch.split: "split", torch.chunk: "chunk", torch.tensor_split: "tensor_split"}
_SPLIT_METHODS = {"split", "chunk", "tensor_split", "split_with_sizes"}
_TRANSPOSE_FUNCTIONS = {torch.transpose, torch.swapaxes, torch.swapdims}
_TRANSPOSE_METHODS = {"transpose", "swapaxes", "swapdims"}
_SHUFFLE_FUNCTIONS = {torch.channel_shuffle, F.channel_shuffle, F.native_channel_shuffle}

_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.gelu,
    F.silu, F.hardswish, F.hardsigmoid, F.mish, F.softplus, torch.sigmoid, torch.tanh, F.sigmoid,
    F.tanh, torch.clamp, torch.clip, F.selu, F.celu, F.softsign, F.logsigmoid, F.relu6, F.hardshrink,
    F.softshrink, F.tanhshrink, torch.neg, torch.abs, torch.exp, torch.square, operator.neg,
}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_CONSTANT_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
_AVG_POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
_REDUCE_FUNCTIONS = {torch.mean, torch.amax, torch.amin}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_BINARY_FUNCTIONS = {
    operator.add: operator.add, operator.iadd: operator.add, torch.add: operator.add,
    operator.sub: operator.sub, operator.isub: operator.sub, torch.sub: operator.sub,
    operator.mul: operator.mul, operator.imul: operator.mul, torch.mul: operator.mul,
    operator.truediv: operator.truediv, torch.div: operator.truediv,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clamp_min",
                        "clamp_max", "neg", "abs", "exp", "square", "hardtanh", "hardtanh_"}
_IDENTITY_METHODS = {"contiguous", "clone", "detach", "float", "double", "half", "bfloat16"}
_REDUCE_METHODS = {"mean", "amax", "amin"}
_RESHAPE_METHODS = {"view", "reshape"}
_BINARY_METHODS = {
    "add": operator.add, "add_": operator.add, "sub": operator.sub, "sub_": operator.sub,
    "mul": operator.mul, "mul_": operator.mul, "div": operator.truediv, "div_": operator.truediv,
}
_NON_TENSOR_METHODS = {"size", "dim", "numel"}

def _registered(op, target) -> tuple[str, dict]:
    """(kind, detail) of a registered module / function / method (``registry.py``)."""
    if op.kind == "identity":
        return IDENTITY, {}
    if op.kind == "elementwise":
        return ELEMENTWISE, {"fn": target}
    if op.kind == "channelwise":
        return PERCHANNEL, {"handler": op.handler}
    if op.kind == "producer":
        return PRODUCER, {"handler": op.handler}
    return UNKNOWN, {"why": "it is registered as opaque"}


def activation_fn(act: nn.Module):
    """``act`` as an elementwise function, or None when it is not known to be elementwise."""
    op = registry.module_op(act)
    if op is not None:
        return act if op.kind == "elementwise" else (lambda t: t) if op.kind == "identity" else None
    if isinstance(act, _IDENTITY_MODULES):
        return lambda t: t
    if isinstance(act, ELEMENTWISE_ACTIVATIONS):
        return act
    return None


def _module_types(m: nn.Module) -> tuple[str, dict]:
    """(kind, detail) of a call_module node's module, from its type alone."""
    op = registry.module_op(m)
    if op is not None:
        return _registered(op, m)
    if isinstance(m, CONVS):
        return (PRODUCER if m.groups == 1 else GROUPED), {}
    if isinstance(m, LINEARS):
        return PRODUCER, {}
    if isinstance(m, BATCH_NORMS):
        act = norm_act_activation(m)
        if act is None:
            return CHANNELWISE, {}
        fn = activation_fn(act)
        if fn is None:
            return UNKNOWN, {"why": f"its activation {type(act).__name__} is not known to be elementwise: declare it "
                                    f"with sparsekern.prune.register_channel_op({type(act).__name__}, 'elementwise')"}
        return CHANNELWISE, {"act": fn}
    if isinstance(m, _IDENTITY_MODULES):
        return IDENTITY, {}
    if isinstance(m, ELEMENTWISE_ACTIVATIONS):
        return ELEMENTWISE, {"fn": m}
    if isinstance(m, _CONSTANT_POOL_MODULES):  # (with return_indices the tuple output has no shape: unknown)
        return POOL, {"keeps_constants": True}
    if isinstance(m, _AVG_POOL_MODULES):
        padded = any(p > 0 for p in as_tuple(m.padding)) and m.count_include_pad
        divisor = getattr(m, "divisor_override", None) is not None
        return POOL, {"keeps_constants": not (padded or divisor)}
    if isinstance(m, _UPSAMPLE_MODULES):
        return POOL, {"keeps_constants": True}
    if isinstance(m, _REPEATING_PAD_MODULES):
        return POOL, {"keeps_constants": True, "pad": as_tuple(m.padding)}
    if isinstance(m, _CONSTANT_PAD_MODULES):
        return POOL, {"keeps_constants": False, "only_value": float(m.value), "pad": as_tuple(m.padding)}
    if isinstance(m, nn.Flatten):
        return FLATTEN, {"start_dim": m.start_dim, "end_dim": m.end_dim}
    if isinstance(m, nn.ChannelShuffle):
        return SHUFFLE, {"groups": m.groups}
    if isinstance(m, nn.LayerNorm):
        return MIXING, {"normalized_dims": len(m.normalized_shape), "what": "LayerNorm"}
    if isinstance(m, nn.GroupNorm):
        return MIXING, {"normalized_dims": None, "what": "GroupNorm"}
    return UNKNOWN, {}


def _is_stochastic_depth(target) -> bool:
    """torchvision.ops.stochastic_depth (fx-wrapped, so it is a call_function node)."""
    return getattr(target, "__name__", "") == "stochastic_depth" and \
        getattr(target, "__module__", "").startswith("torchvision.ops")


def as_tuple(v) -> tuple:
    """A size argument as a tuple (``padding=1`` and ``padding=(1, 1)`` alike)."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _has_node(values) -> bool:
    found = []
    map_arg(values, found.append)
    return bool(found)


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def classify(node: torch.fx.Node, modules: dict) -> tuple[str, dict]:
    """(kind, detail) of a node from its op and target (shapes are checked later)."""
    if node.op == "placeholder":
        return INPUT, {}
    if node.op == "output":
        return OUTPUT, {}
    if node.op == "get_attr":
        return UNKNOWN, {}
    if node.op == "call_module":
        return _module_types(modules[node.target])
    target = node.target
    rest_args, kwargs = node.args[1:], dict(node.kwargs)
    if node.op == "call_function":
        op = registry.function_op(target)
        if op is not None:
            kind, detail = _registered(op, target)
            if kind == ELEMENTWISE:
                if _has_node((rest_args, kwargs)):
                    return UNKNOWN, {"why": "a registered elementwise function called with tensor arguments"}
                detail["fn"] = lambda t, f=target: f(t, *rest_args, **kwargs)
            return kind, detail
        if target in _DROPOUT_FUNCTIONS:
            # Traced in eval mode, `training=self.training` was recorded as False: an identity.
            return (IDENTITY, {}) if not _arg(node, 2, "training", True) else (UNKNOWN, {})
        if _is_stochastic_depth(target):
            return (IDENTITY, {}) if not _arg(node, 3, "training", True) else (UNKNOWN, {"why": "in training mode"})
        if target in _ELEMENTWISE_FUNCTIONS and not _has_node((rest_args, kwargs)):
            return ELEMENTWISE, {"fn": lambda t, f=target: f(t, *rest_args, **kwargs)}
        if target in _CONSTANT_POOL_FUNCTIONS:
            return POOL, {"keeps_constants": True}
        if target in _AVG_POOL_FUNCTIONS:
            padded = any(p > 0 for p in as_tuple(_arg(node, 3, "padding", 0))) and _arg(node, 5, "count_include_pad", True)
            divisor = _arg(node, 6, "divisor_override", None) is not None
            return POOL, {"keeps_constants": not (padded or divisor)}
        if target in _INTERPOLATE_FUNCTIONS:
            return POOL, {"keeps_constants": True}
        if target is F.pad:
            mode = _arg(node, 2, "mode", "constant")
            pad = _arg(node, 1, "pad", ())
            if mode == "constant":
                value = _arg(node, 3, "value", None)
                return POOL, {"keeps_constants": False, "only_value": 0.0 if value is None else float(value),
                              "pad": tuple(pad)}
            return POOL, {"keeps_constants": True, "pad": tuple(pad)}
        if target in _REDUCE_FUNCTIONS:
            return POOL, {"keeps_constants": True, "reduce_dims": _arg(node, 1, "dim", None)}
        if target is torch.flatten:
            return FLATTEN, {"start_dim": _arg(node, 1, "start_dim", 0), "end_dim": _arg(node, 2, "end_dim", -1)}
        if target is torch.reshape:
            return FLATTEN, {"reshape": _arg(node, 1, "shape", None)}
        if target in _CAT_FUNCTIONS:
            return CAT, {"dim": _arg(node, 1, "dim", 0)}
        if target in _BINARY_FUNCTIONS and not kwargs:
            return BINARY, {"op": _BINARY_FUNCTIONS[target]}
        if target in _SPLIT_FUNCTIONS:
            return SPLIT, {"how": _SPLIT_FUNCTIONS[target], "size": _arg(node, 1, "split_size_or_sections",
                           node.kwargs.get("chunks", node.kwargs.get("indices_or_sections"))),
                           "dim": _arg(node, 2, "dim", 0)}
        if target is operator.getitem:
            return GETITEM, {"index": node.args[1] if len(node.args) > 1 else None}
        if target in _TRANSPOSE_FUNCTIONS:
            return TRANSPOSE, {"dims": (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))}
        if target is torch.permute:
            return TRANSPOSE, {"permute": tuple(_arg(node, 1, "dims", ()))}
        if target in _SHUFFLE_FUNCTIONS:
            return SHUFFLE, {"groups": _arg(node, 1, "groups")}
        if target is F.layer_norm:
            shape = _arg(node, 1, "normalized_shape", ())
            # A computed shape (x.shape[1:]) may cover the channel dim: count it as mixing.
            dims = None if _has_node(shape) else len(as_tuple(shape))
            return MIXING, {"normalized_dims": dims, "what": "layer_norm"}
        if target is F.group_norm:
            return MIXING, {"normalized_dims": None, "what": "group_norm"}
        if target is getattr:
            return IGNORE, {}
        return UNKNOWN, {}
    if node.op == "call_method":
        op = registry.method_op(target)
        if op is not None:
            kind, detail = _registered(op, target)
            if kind == ELEMENTWISE:
                detail["fn"] = lambda t, name=target: getattr(t, name)(*rest_args, **kwargs)
            return kind, detail
        if target in _ELEMENTWISE_METHODS and not _has_node((rest_args, kwargs)):
            return ELEMENTWISE, {"fn": lambda t, name=target: getattr(t, name)(*rest_args, **kwargs)}
        if target in _IDENTITY_METHODS and not _has_node((rest_args, kwargs)):
            return IDENTITY, {}
        if target in _REDUCE_METHODS:
            return POOL, {"keeps_constants": True, "reduce_dims": _arg(node, 1, "dim", None)}
        if target == "flatten":
            return FLATTEN, {"start_dim": _arg(node, 1, "start_dim", 0), "end_dim": _arg(node, 2, "end_dim", -1)}
        if target in _RESHAPE_METHODS:
            shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return FLATTEN, {"reshape": tuple(shape) if shape else node.kwargs.get("shape")}
        if target in _BINARY_METHODS and not kwargs:
            return BINARY, {"op": _BINARY_METHODS[target]}
        if target in _SPLIT_METHODS:
            return SPLIT, {"how": "split" if target == "split_with_sizes" else target,
                           "size": _arg(node, 1, "split_size", node.kwargs.get("chunks", node.kwargs.get(
                               "split_size_or_sections", node.kwargs.get("sections")))),
                           "dim": _arg(node, 2, "dim", 0)}
        if target in _TRANSPOSE_METHODS:
            return TRANSPOSE, {"dims": (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))}
        if target == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return TRANSPOSE, {"permute": tuple(dims or node.kwargs.get("dims", ()))}
        if target in _NON_TENSOR_METHODS:
            return IGNORE, {}
    return UNKNOWN, {}


def scalar_at(t: torch.Tensor, index: int) -> float:
    """Element ``index`` of a 1-D parameter or buffer as a Python float (through float64)."""
    return float(t.detach()[index].double())


def constant_through(info, position: int, value: Optional[float]) -> Optional[float]:
    """The value of channel ``position`` after the one-input op ``info`` when its input there is
    the constant ``value`` (None: not a constant). None when the result is not a constant.

    BatchNorm (eval): gamma * (k - mean) / sqrt(var + eps) + beta; with gamma exactly 0 the
    output is beta whatever the input. Average pooling with zero padding counted in the
    average keeps only 0 constant (borders average in the padding).
    """
    kind = info.kind
    if kind == CHANNELWISE:
        bn = info.detail["module"]
        gamma = 1.0 if bn.weight is None else scalar_at(bn.weight, position)
        beta = 0.0 if bn.bias is None else scalar_at(bn.bias, position)
        if bn.running_mean is None or not bn.track_running_stats:
            return None  # normalises with batch statistics: no fixed affine map
        if value is None:
            out = beta if gamma == 0.0 else None
        else:
            mean, var = scalar_at(bn.running_mean, position), scalar_at(bn.running_var, position)
            out = gamma * (value - mean) / math.sqrt(var + bn.eps) + beta
        return after_norm_act(info, out)
    if kind == PERCHANNEL:
        if value is None:
            return None
        return info.detail["handler"].constant(info.detail["module"], position, value, info.detail.get("in_shape"))
    if value is None:
        return None
    if kind in (IDENTITY, TRANSPOSE, SHUFFLE):
        return value
    if kind == POOL:
        if info.detail["keeps_constants"]:
            return value
        only = info.detail.get("only_value", 0.0)
        return value if only is not None and value == only else None
    if kind == ELEMENTWISE:
        return _apply(info.detail["fn"], value)
    raise ValueError(f"constant_through: {kind} is not a one-input channel-keeping op")


def _apply(fn, value: float) -> float:
    with torch.no_grad():
        out = fn(torch.tensor([value], dtype=torch.float64))
    return float(out.reshape(-1)[0])


def after_norm_act(info, value: Optional[float]) -> Optional[float]:
    """A norm-then-activation module's output for its BN output ``value`` (the activation applied);
    a plain BN's is ``value`` itself."""
    act = info.detail.get("act")
    if act is None or value is None:
        return value
    return _apply(act, value)


def conv_zero_padded(conv: nn.Module) -> bool:
    """True when the conv pads its input with zeros (then a constant input channel does not
    give a constant contribution at the borders)."""
    if conv.padding_mode != "zeros":
        return False  # reflect / replicate / circular padding repeats the constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)
