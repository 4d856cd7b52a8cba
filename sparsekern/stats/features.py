"""Find the post-activation features of a model: the tensors whose channels can be "dead" or
"constant".

A feature is one place in the forward pass where an elementwise activation produces a feature
map (N, C, ...). For each one we record what feeds it, so a report can relate the activation
statistics to the BatchNorm scale (gamma) and the filter that produce it:

    kind "bn"        act(BN(...)), usually Conv -> BN -> act (or Linear -> BN -> act); also a
                     norm-then-activation module (timm's BatchNormAct2d, FusedBNReLU, any class
                     registered with ``_types.register_norm_act``), whose BN is the module itself
    kind "conv"      act(Conv(...)) without BN
    kind "linear"    act(Linear(...)); its channels are the last dim (``channel_dim = -1``), which
                     for an (N, C) output is dim 1 as before, and for a channels-last MLP
                     (ConvNeXt's Linear on (N, H, W, C)) the real channels
    kind "residual"  act(a + b), e.g. ResNet's `relu(bn2(conv2(x)) + identity)`
    kind "other"     act of anything else (a pooling, a concatenation, a LayerNorm / GroupNorm...)

The activations are those of ``sparsekern._types``: ReLU, ReLU6, LeakyReLU, Hardswish, SiLU,
GELU, Mish, ELU, CELU, SELU, Hardtanh, PReLU, Softplus as modules (subclasses, timm's own classes
and ``register_activation``-ed ones included), as functionals (F.silu, F.gelu, F.leaky_relu,
in-place forms such as F.hardtanh_ ...) and as Tensor methods where torch has them (relu,
relu_). ``Feature.activation`` names it. ReLU and ReLU6 output exact zeros, which is what makes
a channel dead; for any activation a channel can be constant (``ChannelStats.constant_mask``).
Gates (Sigmoid, Hardsigmoid, Tanh) are not features.

"Norm then activation" means a BatchNorm (a per-channel affine of per-channel statistics, so a
|gamma| ~ 0 channel outputs the constant act(beta), and foldable into the conv before it). A
LayerNorm or GroupNorm normalises across channels: an activation right after one is kind
"other" (a LayerNorm's channels are its last dim); in ConvNeXt the GELU follows the MLP's first
conv / Linear (kind "conv" / "linear"), with the LayerNorm before that layer.

Discovery traces the model with ``sparsekern._fx.trace_graph`` (the model itself is not
modified; ``leaf_modules`` keeps modules torch.fx cannot trace as opaque nodes) and walks the
graph. When tracing fails (data-dependent control flow), it falls back to every activation
module (and norm-then-activation module), one feature per call of the module (the calls are
numbered at run time), and pairs each with the nearest BN registered before it; it warns when it
does that, with the tracing error (which names the failing module and suggests leaf_modules).
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from sparsekern._fx import trace_graph
from sparsekern._types import (
    ACTIVATION_FUNCTIONS, ACTIVATION_PARAMETERS, ALL_CONVS, BATCH_NORMS, LINEARS, MEASURED_ACTIVATION_FUNCTIONS,
    MEASURED_ACTIVATION_METHODS, activation_names, measured_activation, norm_act_activation,
)
from sparsekern.errors import UntraceableModelError
from sparsekern.ops.bn_relu import FusedBNReLU

KINDS = ("bn", "conv", "linear", "residual", "other")

# The layers a feature's report names as producing it: any conv (a transposed one makes its
# output channels too) or linear layer.
_LAYERS = ALL_CONVS + LINEARS
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


# relu(relu6(x)) is the same feature again; other activations of an activation are new features.
_IDEMPOTENT = ("relu", "relu6")


def _function_name(function) -> str:
    """A functional activation as a feature's ``relu_target`` names it: "F.relu", "torch.relu_"..."""
    name = function.__name__
    prefix = "F" if getattr(F, name, None) is function else "torch"
    return f"{prefix}.{name}"


def _norm_act_name(module: nn.Module) -> str | None:
    """The activation name of a norm-then-activation module whose activation is measured, else None."""
    act = norm_act_activation(module)
    return None if act is None else measured_activation(act)


def _is_plain_norm(module: nn.Module) -> bool:
    """A BatchNorm whose output is the norm's own: a plain one, or a norm-act module whose
    activation is an identity (timm's ``apply_act=False``)."""
    if not isinstance(module, BATCH_NORMS):
        return False
    act = norm_act_activation(module)
    return act is None or isinstance(act, nn.Identity)


@dataclass(frozen=True)
class Feature:
    """One post-ReLU feature map of a model.

    name: stable, readable layer name (the BN's qualified name, or the container that holds
        exactly this Conv-BN-ReLU unit, e.g. "features.c1"; "<block>.residual" for residuals).
    relu_target: qualified name of the activation module (or norm-act module), or the functional
        call ("F.relu", "F.silu", ...).
    producer_module_name: the module whose output the activation consumes (None when that is not
        a module output, e.g. a residual add).
    bn_module_name / layer_module_name: the BN and the Conv/Linear that produce the feature.
    kind: one of KINDS.
    call_index: which call (0-based, within one forward of the model) of the hooked module
        this feature is: the ReLU module's call, or the producer's call for a functional ReLU.
        None only for fallback features, whose calls are numbered at run time.
    activation: its name, one of ``_types.activation_names()`` ("relu", "silu", "gelu", ...).
    functional: True when the activation is a function call, so a tracker must hook the producer
        module and apply the activation itself (``apply``).
    activation_args: for a functional activation, its constant arguments after the input as
        sorted (name, value) pairs, e.g. (("negative_slope", 0.2),); () for modules.
    channel_dim: the dim of the activation tensor holding the channels: 1, or -1 (the last) for
        a Linear's or LayerNorm's output.
    """

    name: str
    relu_target: str
    producer_module_name: str | None
    bn_module_name: str | None
    layer_module_name: str | None
    kind: str
    call_index: int | None
    activation: str = "relu"
    functional: bool = False
    activation_args: tuple = ()
    channel_dim: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Feature {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.activation not in activation_names():
            raise ValueError(f"Feature {self.name!r}: activation must be one of {sorted(activation_names())}, "
                             f"got {self.activation!r}")
        if self.functional and self.producer_module_name is None:
            raise ValueError(f"Feature {self.name!r}: a functional activation is measured on its producer module, "
                             "so producer_module_name is required")
        if self.functional and self.activation not in ACTIVATION_FUNCTIONS:
            raise ValueError(f"Feature {self.name!r}: activation {self.activation!r} has no functional form to "
                             f"apply; expected one of {sorted(ACTIVATION_FUNCTIONS)}")
        args = self.activation_args
        if isinstance(args, list):  # a state dict that went through JSON
            args = tuple(tuple(pair) for pair in args)
        if not isinstance(args, tuple) or not all(
            isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) for pair in args
        ):
            raise ValueError(f"Feature {self.name!r}: activation_args must be (name, value) pairs, got {args!r}")
        object.__setattr__(self, "activation_args", tuple(sorted(args)))
        if self.channel_dim not in (1, -1) or isinstance(self.channel_dim, bool):
            raise ValueError(f"Feature {self.name!r}: channel_dim must be 1 or -1, got {self.channel_dim!r}")

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """The activation of a functional feature applied to its producer's output (a new tensor)."""
        return ACTIVATION_FUNCTIONS[self.activation](y, **dict(self.activation_args))

    @property
    def hook_module_name(self) -> str:
        """The module whose forward output a tracker hooks to see this feature."""
        return self.producer_module_name if self.functional else self.relu_target


def _feature_leaf(m: nn.Module, qualname: str) -> bool:
    """Activation modules (subclasses and registered ones too) and fused BN+ReLU modules: their
    output is a feature, so they stay one node of the graph (``_fx.LeafTracer`` already keeps
    registered norm-act modules)."""
    return measured_activation(m) is not None or isinstance(m, FusedBNReLU)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's network inside a DistributedDataParallel / DataParallel wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def find_features(model: nn.Module, *, leaf_modules=()) -> list[Feature]:
    """Every activation feature of ``model``, in forward order (see the module docstring).

    ``leaf_modules``: module classes or qualified names torch.fx should not trace into (see
    ``sparsekern._fx``); activations inside them are not seen, their outputs can feed features.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_features: expected an nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    try:
        graph = trace_graph(model, leaf_modules, is_leaf=_feature_leaf).graph
    except UntraceableModelError as exc:
        warnings.warn(
            f"find_features: torch.fx could not trace {type(model).__name__}: {exc}. Falling back to hooking every activation module (and norm-then-activation "
            "module), one feature per call, each paired with the nearest BatchNorm registered before it; "
            "functional activation calls are not measured.",
            RuntimeWarning,
            stacklevel=2,
        )
        return _features_by_registration(model)
    return _features_from_graph(model, graph)


# --- traced graph -------------------------------------------------------------------------


class _NotConstant(Exception):
    """A functional activation's argument is not a constant of the graph."""


def _activation_args(node: torch.fx.Node, activation: str) -> tuple:
    """The constant arguments after the input of a functional activation call, as (name, value)
    pairs without "inplace"; _NotConstant if one is computed in the graph."""
    names = ACTIVATION_PARAMETERS.get(activation, ())
    bound = dict(zip(names, node.args[1:]))
    bound.update((k, v) for k, v in node.kwargs.items() if k != "input")
    bound.pop("inplace", None)
    for value in bound.values():
        if isinstance(value, torch.fx.Node) or not isinstance(value, (int, float, str, bool, type(None))):
            raise _NotConstant
    return tuple(sorted(bound.items()))


def _activation_of(node: torch.fx.Node, modules: dict[str, nn.Module]):
    """(target, activation, functional, norm_act) if ``node`` is a measured activation, else None;
    norm_act is True for a module that is a BatchNorm and its activation at once."""
    if node.op == "call_module":
        m = modules[node.target]
        activation = measured_activation(m)
        if activation is not None:
            return node.target, activation, False, False
        if isinstance(m, FusedBNReLU):
            return node.target, "relu", False, True
        activation = _norm_act_name(m)
        if activation is not None:
            return node.target, activation, False, True
    elif node.op == "call_function" and node.target in MEASURED_ACTIVATION_FUNCTIONS:
        return _function_name(node.target), MEASURED_ACTIVATION_FUNCTIONS[node.target], True, False
    elif node.op == "call_method" and node.target in MEASURED_ACTIVATION_METHODS:
        return f"Tensor.{node.target}", MEASURED_ACTIVATION_METHODS[node.target], True, False
    return None


def _through_identities(node, modules):
    """The node an nn.Identity chain passes on (timm's ``norm_head = Identity()`` between a conv
    and its activation): identities do not hide what produces a feature."""
    while (isinstance(node, torch.fx.Node) and node.op == "call_module" and isinstance(modules[node.target], nn.Identity)
           and node.args and isinstance(node.args[0], torch.fx.Node)):
        node = node.args[0]
    return node


def _is_add(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )


def _module_node(arg, modules, types) -> str | None:
    """The module name if ``arg`` is the output of a module of one of ``types``."""
    if isinstance(arg, torch.fx.Node) and arg.op == "call_module" and isinstance(modules[arg.target], types):
        return arg.target
    return None


def _layer_feeding(node: torch.fx.Node, modules) -> str | None:
    """The Conv/Linear whose output is the (first) input of ``node`` (through identities), if any."""
    return _module_node(_through_identities(node.args[0], modules) if node.args else None, modules, _LAYERS)


def _features_from_graph(model: nn.Module, graph: torch.fx.Graph) -> list[Feature]:
    modules = dict(model.named_modules())
    calls_so_far: dict[str, int] = {}  # call_module target -> calls seen so far in graph order
    call_index_of: dict[torch.fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            call_index_of[node] = calls_so_far.get(node.target, 0)
            calls_so_far[node.target] = call_index_of[node] + 1

    found: list[dict] = []
    seen_hooks: set[tuple[str, int]] = set()
    for node in graph.nodes:
        found_here = _activation_of(node, modules)
        if found_here is None:
            continue
        relu_target, activation, functional, norm_act = found_here
        src = _through_identities(node.args[0] if node.args else node.kwargs.get("input"), modules)
        if not isinstance(src, torch.fx.Node):
            continue
        before = _activation_of(src, modules)
        if before is not None and before[1] in _IDEMPOTENT and activation in _IDEMPOTENT:
            continue  # relu(relu(x)) is the same feature again
        args = ()
        if functional:
            try:
                args = _activation_args(node, activation)
            except _NotConstant:
                warnings.warn(
                    f"find_features: {relu_target} in {node.format_node()!r} takes an argument computed in the "
                    "graph, so the tracker cannot apply it; this feature is not measured.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
        producer = src.target if src.op == "call_module" else None
        bn = layer = None
        channel_dim = 1
        if norm_act:
            kind, bn, layer = "bn", relu_target, _layer_feeding(node, modules)
        elif producer is not None and _is_plain_norm(modules[producer]):
            kind, bn, layer = "bn", producer, _layer_feeding(src, modules)
        elif producer is not None and isinstance(modules[producer], ALL_CONVS):
            kind, layer = "conv", producer
        elif producer is not None and isinstance(modules[producer], LINEARS):
            kind, layer, channel_dim = "linear", producer, -1
        elif producer is not None and isinstance(modules[producer], nn.LayerNorm):
            kind, channel_dim = "other", -1  # LayerNorm normalises (and keeps its channels in) the last dim
        elif _is_add(src):
            kind = "residual"
            for arg in src.args:
                arg = _through_identities(arg, modules)
                bn = _module_node(arg, modules, BATCH_NORMS)
                if bn is not None and not _is_plain_norm(modules[bn]):
                    bn = None  # a norm-act module's output is its activation's, not a BN's
                if bn is not None:
                    layer = _layer_feeding(arg, modules)
                    break
        else:
            kind = "other"

        if functional:
            if producer is None:
                warnings.warn(
                    f"find_features: {relu_target} applied to the output of {src.format_node()!r} is not "
                    "the output of a module, so it cannot be hooked; this feature is not measured.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            call_index = call_index_of[src]
            hook = (producer, call_index)
        else:
            call_index = call_index_of[node]
            hook = (relu_target, call_index)
        if hook in seen_hooks:
            continue  # the same tensor seen through two relu calls
        seen_hooks.add(hook)
        found.append(
            dict(
                relu_target=relu_target, producer_module_name=producer, bn_module_name=bn,
                layer_module_name=layer, kind=kind, call_index=call_index,
                activation=activation, functional=functional, activation_args=args, channel_dim=channel_dim,
            )
        )
    return _name_features(found)


# --- naming --------------------------------------------------------------------------------


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _own_modules(f: dict) -> list[str]:
    names = [f["layer_module_name"], f["bn_module_name"]]
    if not f["functional"]:
        names.append(f["relu_target"])
    elif f["producer_module_name"] is not None:
        names.append(f["producer_module_name"])
    return [n for n in names if n]


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _name_features(found: list[dict]) -> list[Feature]:
    """Readable names: the container holding exactly one Conv-BN-ReLU unit, else the BN/layer name."""
    features, used = [], set()
    for i, f in enumerate(found):
        own = _own_modules(f)
        unit = _common_parent(own) if f["kind"] in ("bn", "conv", "linear") and len(own) > 1 else ""
        if unit and not any(
            _is_under(m, unit) for j, g in enumerate(found) if j != i for m in _own_modules(g)
        ):
            name = unit
        elif f["kind"] == "bn":
            name = f["bn_module_name"]
        elif f["kind"] in ("conv", "linear"):
            name = f["layer_module_name"]
        elif f["kind"] == "residual":
            anchor = f["bn_module_name"] or (None if f["functional"] else f["relu_target"])
            name = f"{_parent(anchor)}.residual".lstrip(".") if anchor else "residual"
        else:
            name = f["producer_module_name"] if f["functional"] else f["relu_target"]
        if name in used:
            name = f"{name}:{f['call_index']}"
        k = 1
        base = name
        while name in used:  # still clashing (e.g. two functional relus on one module): number them
            name, k = f"{base}#{k}", k + 1
        used.add(name)
        features.append(Feature(name=name, **f))
    return features


# --- fallback without a graph --------------------------------------------------------------


def _features_by_registration(model: nn.Module) -> list[Feature]:
    """One fallback feature per activation module (or norm-then-activation module, its own BN);
    BN / layer = the nearest ones registered before it and after the previous activation (so a
    BN is never paired with two activations)."""
    found: list[dict] = []
    bn = layer = None
    inside_norm_act: set[int] = set()  # the activation modules of norm-act modules: seen through them
    for name, m in model.named_modules():
        norm_act = _norm_act_name(m) if isinstance(m, BATCH_NORMS) else None
        if isinstance(m, FusedBNReLU):
            norm_act = "relu"
        activation = None if id(m) in inside_norm_act else measured_activation(m)
        if norm_act is not None:
            inside_norm_act.add(id(norm_act_activation(m)))
            activation, bn = norm_act, name
        elif isinstance(m, BATCH_NORMS):
            bn = name
            continue
        elif isinstance(m, _LAYERS):
            layer, bn = name, None  # a BN registered before this layer belongs to an earlier unit
            continue
        if activation is None:
            continue
        channel_dim = 1
        if bn is not None:
            kind = "bn"
        elif layer is not None:
            linear = not isinstance(model.get_submodule(layer), ALL_CONVS)
            kind, channel_dim = ("linear", -1) if linear else ("conv", 1)
        else:
            kind = "other"
        found.append(
            dict(
                relu_target=name, producer_module_name=None, bn_module_name=bn,
                layer_module_name=layer, kind=kind, call_index=None,
                activation=activation, functional=False, channel_dim=channel_dim,
            )
        )
        bn = layer = None
    return _name_features(found)
