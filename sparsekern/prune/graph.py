"""Which channels of a model belong together: dependency analysis with torch.fx.

Removing output channel c of a conv is only exact if everything that carries that channel
goes with it: the BN entries after the conv, the matching input channel of every layer that
reads it, and - across residual adds - the same channel of every other layer whose output is
summed with it. This module finds those links.

The model: the traced graph is walked once with the tensor shapes of an example batch
(``ShapeProp``). Every tensor with a channel dim (dim 1) gets a *channel map*: for each of its
channels the id of an :class:`Atom`, "output channel c of layer L". Ops that keep channels
(BN, activations, pooling, dropout) pass the map on; ``torch.cat`` along dim 1 concatenates
maps; flatten repeats each atom over the H*W features it becomes; an add, sub or mul of two
channel tensors *ties* the atoms at equal positions (union-find): tied atoms can only be
removed together. A conv with ``groups > 1`` makes *derived* atoms: its output group g is
removed exactly when its whole input group g is (a depthwise conv's channels follow the
channel that feeds them). Network inputs and the outputs of ops the analysis does not
understand get *fixed* atoms, which are never removed; a planned removal that reaches such an
op raises :class:`UnsupportedModelError` (see ``surgery.py``).

Each prunable layer (a Conv with ``groups == 1`` or a Linear) has a *private chain*: the ops
after it that only it feeds (``conv -> bn -> relu -> maxpool``). The chain's last node is
where a plan's statement "channel c is dead (or the constant k)" applies: in a
Conv-BN-ReLU unit, after the ReLU; for ResNet's ``bn2`` (summed with the shortcut before its
ReLU), at the BN output that enters the add.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from sparsekern.errors import UnsupportedModelError

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
OUTPUT = "output"
IGNORE = "ignore"            # no tensor result (x.size(0), getattr(x, "shape")...)
UNKNOWN = "unknown"          # anything else

# Ops a private chain may pass through: each is fed by one tensor and keeps its channels.
CHAIN_KINDS = (CHANNELWISE, ELEMENTWISE, IDENTITY, POOL)

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus,
)
# Pools whose output is the constant k wherever their input is the constant k.
_CONSTANT_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)

_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.gelu,
    F.silu, F.hardswish, F.hardsigmoid, F.mish, F.softplus, torch.sigmoid, torch.tanh, F.sigmoid,
    F.tanh, torch.clamp, torch.clip,
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
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip"}
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}
_REDUCE_METHODS = {"mean", "amax", "amin"}
_RESHAPE_METHODS = {"view", "reshape"}
_BINARY_METHODS = {
    "add": operator.add, "add_": operator.add, "sub": operator.sub, "sub_": operator.sub,
    "mul": operator.mul, "mul_": operator.mul, "div": operator.truediv, "div_": operator.truediv,
}
_NON_TENSOR_METHODS = {"size", "dim", "numel"}


@dataclass(frozen=True)
class Atom:
    """One removable unit: output channel ``channel`` of ``layer``.

    kind "producer": a Conv/Linear output channel (the plan decides);
    kind "derived": an output channel of a grouped conv, removed exactly when all of
    ``depends`` (its input group) are; kind "fixed": never removed (network inputs, outputs
    of ops the analysis treats as opaque).
    """

    kind: str
    layer: str
    channel: int
    depends: tuple = ()


@dataclass
class NodeInfo:
    """What the analysis knows about one fx node."""

    node: torch.fx.Node
    kind: str
    module_name: Optional[str] = None
    channels: Optional[list] = None        # atom id per channel of the output, None if no channel dim
    inputs: list = field(default_factory=list)  # the channel-tensor nodes it reads, in order
    detail: dict = field(default_factory=dict)  # kind-specific facts (see _classify)

    @property
    def label(self) -> str:
        """How error messages name this node: the module, or the op and fx node name."""
        if self.module_name is not None:
            return f"module {self.module_name!r} ({self.node.name})"
        target = getattr(self.node.target, "__name__", str(self.node.target))
        return f"{self.node.op} {target!r} (fx node {self.node.name!r})"


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` with a clear error for models it cannot trace.

    The GraphModule shares ``model``'s submodules: editing them edits ``model``.
    """
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, AttributeError... on dynamic code
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
            "the channel dependency analysis needs a forward without data-dependent Python control flow"
        ) from exc


def _module_types(m: nn.Module) -> tuple[str, dict]:
    """(kind, detail) of a call_module node's module, from its type alone."""
    if isinstance(m, _CONV_TYPES):
        return (PRODUCER if m.groups == 1 else GROUPED), {}
    if isinstance(m, nn.Linear):
        return PRODUCER, {}
    if isinstance(m, _BN_TYPES):
        return CHANNELWISE, {}
    if isinstance(m, _IDENTITY_MODULES):
        return IDENTITY, {}
    if isinstance(m, _ELEMENTWISE_MODULES):
        return ELEMENTWISE, {"fn": m}
    if isinstance(m, _CONSTANT_POOL_MODULES):  # (with return_indices the tuple output has no shape: unknown)
        return POOL, {"keeps_constants": True}
    if isinstance(m, _AVG_POOL_MODULES):
        padded = any(p > 0 for p in _tuple(m.padding)) and m.count_include_pad
        divisor = getattr(m, "divisor_override", None) is not None
        return POOL, {"keeps_constants": not (padded or divisor)}
    if isinstance(m, nn.Flatten):
        return FLATTEN, {"start_dim": m.start_dim, "end_dim": m.end_dim}
    return UNKNOWN, {}


def _tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _has_node(values) -> bool:
    found = []
    map_arg(values, found.append)
    return bool(found)


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _classify(node: torch.fx.Node, modules: dict) -> tuple[str, dict]:
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
        if target in _DROPOUT_FUNCTIONS:
            # Traced in eval mode, `training=self.training` was recorded as False: an identity.
            return (IDENTITY, {}) if not _arg(node, 2, "training", True) else (UNKNOWN, {})
        if target in _ELEMENTWISE_FUNCTIONS and not _has_node((rest_args, kwargs)):
            return ELEMENTWISE, {"fn": lambda t, f=target: f(t, *rest_args, **kwargs)}
        if target in _CONSTANT_POOL_FUNCTIONS:
            return POOL, {"keeps_constants": True}
        if target in _AVG_POOL_FUNCTIONS:
            padded = any(p > 0 for p in _tuple(_arg(node, 3, "padding", 0))) and _arg(node, 5, "count_include_pad", True)
            divisor = _arg(node, 6, "divisor_override", None) is not None
            return POOL, {"keeps_constants": not (padded or divisor)}
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
        if target is getattr:
            return IGNORE, {}
        return UNKNOWN, {}
    if node.op == "call_method":
        if target in _ELEMENTWISE_METHODS and not _has_node((rest_args, kwargs)):
            return ELEMENTWISE, {"fn": lambda t, name=target: getattr(t, name)(*rest_args, **kwargs)}
        if target in _IDENTITY_METHODS:
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
        if target in _NON_TENSOR_METHODS:
            return IGNORE, {}
    return UNKNOWN, {}


def _shape(node) -> Optional[torch.Size]:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return meta.shape if isinstance(meta, TensorMetadata) else None


def _item(t: torch.Tensor, index: int) -> float:
    return float(t.detach()[index].double())


def constant_through(info: NodeInfo, position: int, value: Optional[float]) -> Optional[float]:
    """The value of channel ``position`` after the one-input op ``info`` when its input there is
    the constant ``value`` (None: not a constant). None when the result is not a constant.

    BatchNorm (eval): gamma * (k - mean) / sqrt(var + eps) + beta; with gamma exactly 0 the
    output is beta whatever the input. Average pooling with zero padding counted in the
    average keeps only 0 constant (borders average in the padding).
    """
    kind = info.kind
    if kind == CHANNELWISE:
        bn = info.detail["module"]
        gamma = 1.0 if bn.weight is None else _item(bn.weight, position)
        beta = 0.0 if bn.bias is None else _item(bn.bias, position)
        if bn.running_mean is None or not bn.track_running_stats:
            return None  # normalises with batch statistics: no fixed affine map
        if value is None:
            return beta if gamma == 0.0 else None
        mean, var = _item(bn.running_mean, position), _item(bn.running_var, position)
        return gamma * (value - mean) / math.sqrt(var + bn.eps) + beta
    if value is None:
        return None
    if kind == IDENTITY:
        return value
    if kind == POOL:
        return value if (info.detail["keeps_constants"] or value == 0.0) else None
    if kind == ELEMENTWISE:
        with torch.no_grad():
            out = info.detail["fn"](torch.tensor([value], dtype=torch.float64))
        return float(out.reshape(-1)[0])
    raise ValueError(f"constant_through: {kind} is not a one-input channel-keeping op")


def conv_zero_padded(conv: nn.Module) -> bool:
    """True when the conv pads its input with zeros (then a constant input channel does not
    give a constant contribution at the borders)."""
    if conv.padding_mode != "zeros":
        return False  # reflect / replicate / circular padding repeats the constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


class ChannelGraph:
    """The channel dependency graph of ``model`` (see the module docstring).

    ``example_inputs`` (a tensor or a tuple of tensors) gives the shapes; without it only the
    structure is built (kinds, private chains), enough to read BN parameters per layer.
    The model is traced in eval mode and never modified here; ``gm`` shares its submodules.
    """

    def __init__(self, model: nn.Module, example_inputs=None):
        was_training = {name: m.training for name, m in model.named_modules()}
        model.eval()  # trace in eval mode: F.dropout(training=self.training) records False
        try:
            self.gm = trace(model)
            self.modules = dict(model.named_modules())
            # The traced model's output on the example batch: the reference of exact surgery.
            self.example_output = None
            if example_inputs is not None:
                with torch.no_grad():
                    self.example_output = ShapeProp(self.gm).propagate(*example_inputs)
        finally:
            for name, m in model.named_modules():
                m.training = was_training[name]
        self.has_shapes = example_inputs is not None
        self.atoms: list[Atom] = []
        self._parent: list[int] = []
        self.producers: dict[str, list[int]] = {}   # layer -> atom id of each output channel
        self.grouped: dict[str, NodeInfo] = {}      # grouped conv name -> its node
        self.infos: list[NodeInfo] = []
        self.info: dict[torch.fx.Node, NodeInfo] = {}
        self._build()
        self.chains = self._private_chains()

    # --- atoms and ties --------------------------------------------------------------------
    def _new_atom(self, atom: Atom) -> int:
        self.atoms.append(atom)
        self._parent.append(len(self._parent))
        return len(self.atoms) - 1

    def find(self, a: int) -> int:
        """The representative of ``a``'s tie class."""
        while self._parent[a] != a:
            self._parent[a] = self._parent[self._parent[a]]
            a = self._parent[a]
        return a

    def _tie(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def tie_classes(self) -> dict[int, list[int]]:
        """Representative -> every atom tied to it."""
        classes: dict[int, list[int]] = {}
        for a in range(len(self.atoms)):
            classes.setdefault(self.find(a), []).append(a)
        return classes

    def tied_layers(self) -> list[list[str]]:
        """Groups of prunable layers whose output channels are tied (residual adds), each sorted."""
        groups: dict[int, set] = {}
        for members in self.tie_classes().values():
            layers = {self.atoms[a].layer for a in members if self.atoms[a].kind == "producer"}
            if len(layers) > 1:
                groups.setdefault(self.find(members[0]), set()).update(layers)
        merged: list[set] = []
        for layers in groups.values():
            for m in merged:
                if m & layers:
                    m |= layers
                    break
            else:
                merged.append(set(layers))
        return sorted(sorted(m) for m in merged)

    # --- the walk over the graph -----------------------------------------------------------
    def _build(self) -> None:
        call_counts: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                call_counts[node.target] = call_counts.get(node.target, 0) + 1
        for node in self.gm.graph.nodes:
            kind, detail = _classify(node, self.modules)
            info = NodeInfo(node, kind, detail=detail)
            if node.op == "call_module":
                info.module_name = node.target
                info.detail["module"] = self.modules[node.target]
                if call_counts[node.target] > 1 and kind in (PRODUCER, GROUPED, CHANNELWISE):
                    info.kind = UNKNOWN  # one module, several call sites: no single cut fits all
                    info.detail["why"] = f"the module is called {call_counts[node.target]} times"
            if self.has_shapes:
                self._map_channels(info)
            self.infos.append(info)
            self.info[node] = info

    def _mapped(self, arg) -> Optional[NodeInfo]:
        if isinstance(arg, torch.fx.Node) and arg in self.info and self.info[arg].channels is not None:
            return self.info[arg]
        return None

    def _fixed_channels(self, info: NodeInfo) -> Optional[list]:
        shape = _shape(info.node)
        if shape is None or len(shape) < 2:
            return None
        return [self._new_atom(Atom("fixed", info.node.name, c)) for c in range(shape[1])]

    def _make_unknown(self, info: NodeInfo, why: str = "") -> None:
        info.kind = UNKNOWN
        if why:
            info.detail["why"] = why
        info.inputs = []
        map_arg((info.node.args, info.node.kwargs), lambda n: info.inputs.append(n) if self._mapped(n) else None)
        info.channels = self._fixed_channels(info)

    def _map_channels(self, info: NodeInfo) -> None:
        """Set info.channels (and ties) from the node's inputs; downgrade to UNKNOWN what does not fit."""
        node, kind = info.node, info.kind
        shape = _shape(node)
        first = self._mapped(node.args[0]) if node.args else None
        if kind == INPUT:
            info.channels = self._fixed_channels(info)
        elif kind == OUTPUT:
            map_arg(node.args, lambda n: info.inputs.append(n) if self._mapped(n) else None)
        elif kind == IGNORE:
            if shape is not None:
                self._make_unknown(info)
        elif kind == PRODUCER:
            self._map_producer(info, first, shape)
        elif kind == GROUPED:
            self._map_grouped(info, first, shape)
        elif kind in (CHANNELWISE, ELEMENTWISE, IDENTITY, POOL):
            self._map_unary(info, first, shape)
        elif kind == FLATTEN:
            self._map_flatten(info, first, shape)
        elif kind == CAT:
            self._map_cat(info, shape)
        elif kind == BINARY:
            self._map_binary(info, shape)
        else:
            self._make_unknown(info)

    def _map_producer(self, info, first, shape) -> None:
        m = info.detail["module"]
        in_size = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        out_size = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        if isinstance(m, nn.Linear) and (shape is None or len(shape) != 2):
            return self._make_unknown(info, "a Linear on a tensor of rank other than 2 mixes dims other than channels")
        if first is not None:
            if len(first.channels) != in_size:
                return self._make_unknown(info, f"reads {len(first.channels)} channels but has {in_size} inputs")
            info.inputs = [first.node]
        info.channels = [self._new_atom(Atom("producer", info.module_name, c)) for c in range(out_size)]
        self.producers[info.module_name] = info.channels

    def _map_grouped(self, info, first, shape) -> None:
        m = info.detail["module"]
        if first is None or len(first.channels) != m.in_channels:
            return self._make_unknown(info, "its input channels could not be mapped")
        info.inputs = [first.node]
        per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
        info.channels = []
        for j in range(m.out_channels):
            g = j // per_out
            deps = tuple(first.channels[g * per_in:(g + 1) * per_in])
            info.channels.append(self._new_atom(Atom("derived", info.module_name, j, deps)))
        self.grouped[info.module_name] = info

    def _map_unary(self, info, first, shape) -> None:
        node = info.node
        if first is None or shape is None or len(shape) < 2 or shape[1] != len(first.channels):
            return self._make_unknown(info)
        if info.kind == CHANNELWISE and info.detail["module"].num_features != len(first.channels):
            return self._make_unknown(info, "BatchNorm size does not match its input's channels")
        if "reduce_dims" in info.detail:  # mean / amax / amin: must keep the batch and channel dims
            dims = info.detail["reduce_dims"]
            rank = len(_shape(first.node))
            reduced = range(rank) if dims is None else [d % rank for d in _tuple(dims)]
            if 0 in reduced or 1 in reduced:
                return self._make_unknown(info, "reduces over the batch or channel dim")
        extra = [a for a in node.args[1:] if isinstance(a, torch.fx.Node) and _shape(a) is not None]
        if extra:  # e.g. a clamp with tensor bounds: not a per-channel function of one input
            return self._make_unknown(info)
        info.inputs = [first.node]
        info.channels = list(first.channels)

    def _map_flatten(self, info, first, shape) -> None:
        if first is None or shape is None:
            return self._make_unknown(info)
        in_shape = _shape(first.node)
        rank = len(in_shape)
        spatial = math.prod(in_shape[2:])
        if "reshape" in info.detail:
            target = info.detail["reshape"]
            keeps_batch = tuple(shape) == (in_shape[0], in_shape[1] * spatial)
            if not (keeps_batch and target is not None and len(target) == 2 and target[1] == -1):
                return self._make_unknown(
                    info, "a view/reshape that is not a flatten to (N, -1): it may regroup channels, or "
                    "hard-code a size that changes when channels are removed",
                )
        else:
            start, end = info.detail["start_dim"] % rank, info.detail["end_dim"] % rank
            if start >= 2 or start == end:
                info.kind = IDENTITY  # channels untouched
                info.inputs = [first.node]
                info.channels = list(first.channels)
                return
            if start != 1 or end != rank - 1:
                return self._make_unknown(info, "flattens the batch dim or only part of the trailing dims")
        info.inputs = [first.node]
        info.detail["repeat"] = spatial
        info.channels = [a for a in first.channels for _ in range(spatial)]

    def _map_cat(self, info, shape) -> None:
        parts = info.node.args[0] if info.node.args else info.node.kwargs.get("tensors")
        mapped = [self._mapped(p) for p in parts] if isinstance(parts, (list, tuple)) else [None]
        dim = info.detail["dim"]
        if shape is None or any(m is None for m in mapped) or dim % len(shape) != 1:
            return self._make_unknown(info, "concatenates along a dim other than channels")
        info.inputs = [m.node for m in mapped]
        info.channels = [a for m in mapped for a in m.channels]

    def _map_binary(self, info, shape) -> None:
        node = info.node
        left, right = node.args[0], node.args[1] if len(node.args) > 1 else None
        a, b = self._mapped(left), self._mapped(right)
        if shape is None or len(shape) < 2:
            return self._make_unknown(info)
        if a is not None and b is not None:
            if len(a.channels) != len(b.channels) or len(_shape(a.node)) != len(_shape(b.node)):
                return self._make_unknown(info, "broadcasts over the channel dim")
            for x, y in zip(a.channels, b.channels):
                self._tie(x, y)
            info.inputs = [a.node, b.node]
            info.channels = list(a.channels)
            return
        mapped, other = (a, right) if a is not None else (b, left)
        if mapped is None or not isinstance(other, (int, float)) or isinstance(other, bool):
            return self._make_unknown(info)
        # Arithmetic with a Python number is an elementwise function of one channel tensor.
        op = info.detail["op"]
        info.kind = ELEMENTWISE
        info.detail["fn"] = (lambda t: op(t, other)) if a is not None else (lambda t: op(other, t))
        info.inputs = [mapped.node]
        info.channels = list(mapped.channels)

    # --- private chains --------------------------------------------------------------------
    def _private_chains(self) -> dict[str, list]:
        """layer -> the nodes only it feeds (see the module docstring), the layer's node first."""
        chains = {}
        for info in self.infos:
            if info.kind != PRODUCER:
                continue
            chain = [info.node]
            current = info.node
            while len(current.users) == 1:
                user = next(iter(current.users))
                user_info = self.info[user]
                if user_info.kind not in CHAIN_KINDS or user.args[:1] != (current,):
                    break
                if self.has_shapes and user_info.inputs != [current]:
                    break
                chain.append(user)
                current = user
            chains[info.module_name] = chain
        return chains

    def producer_of(self, module_name: str) -> Optional[str]:
        """The prunable layer whose unit contains module ``module_name`` (the layer itself, or a
        BN / activation in its private chain); None if it belongs to none."""
        for layer, chain in self.chains.items():
            if any(n.op == "call_module" and n.target == module_name for n in chain):
                return layer
        return None

    def chain_bn(self, layer: str) -> Optional[NodeInfo]:
        """The first BatchNorm in ``layer``'s private chain, if any."""
        for n in self.chains[layer][1:]:
            if self.info[n].kind == CHANNELWISE:
                return self.info[n]
        return None

    def chain_constant_from_bn(self, layer: str, channel: int) -> Optional[float]:
        """The value at the end of ``layer``'s private chain of a channel whose BN has gamma
        treated as 0 (BN output beta), or None when the chain does not keep it constant."""
        bn = self.chain_bn(layer)
        if bn is None:
            return None
        module = bn.detail["module"]
        value = 0.0 if module.bias is None else _item(module.bias, channel)
        chain = self.chains[layer]
        for n in chain[chain.index(bn.node) + 1:]:
            value = constant_through(self.info[n], channel, value)
            if value is None:
                return None
        return value


def analyze_dependencies(model: nn.Module, example_inputs) -> ChannelGraph:
    """Trace ``model`` (not modified) and map its channel dependencies on ``example_inputs``
    (a tensor or a tuple of tensors). Raises UnsupportedModelError if it cannot be traced."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return ChannelGraph(model, tuple(example_inputs))
