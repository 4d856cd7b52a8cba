"""Find the post-ReLU features of a model: the tensors whose channels can be "dead".

A feature is one place in the forward pass where a ReLU (or ReLU6) produces a feature map
(N, C, ...). For each one we record what feeds it, so a report can relate the activation
statistics to the BatchNorm scale (gamma) and the filter that produce it:

    kind "bn"        ReLU(BN(...)), usually Conv -> BN -> ReLU (or Linear -> BN -> ReLU)
    kind "conv"      ReLU(Conv(...)) without BN
    kind "linear"    ReLU(Linear(...))
    kind "residual"  ReLU(a + b), e.g. ResNet's `relu(bn2(conv2(x)) + identity)`
    kind "other"     ReLU of anything else (a pooling, a concatenation...)

Only ReLU and ReLU6 count (modules nn.ReLU / nn.ReLU6, and F.relu, torch.relu, Tensor.relu,
relu_ and F.relu6): they output exact zeros, which is what makes a channel dead. LeakyReLU,
GELU, SiLU, Hardswish... never output a constant 0 for a whole range, so they are not features.

Discovery traces the model with ``torch.fx`` (the model itself is not modified) and walks the
graph. When tracing fails (data-dependent control flow), it falls back to every nn.ReLU /
nn.ReLU6 module, one feature per call of the module (the calls are numbered at run time), and
pairs each with the nearest BN registered before it; it warns when it does that.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

from sparsekern._types import (
    ALL_CONVS, BATCH_NORMS, LINEARS, MEASURED_ACTIVATION_FUNCTIONS, MEASURED_ACTIVATION_METHODS, measured_activation,
)
from sparsekern.ops.bn_relu import FusedBNReLU

KINDS = ("bn", "conv", "linear", "residual", "other")

# The layers a feature's report names as producing it: any conv (a transposed one makes its
# output channels too) or linear layer.
_LAYERS = ALL_CONVS + LINEARS
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


def _function_name(function) -> str:
    """A functional ReLU as a feature's ``relu_target`` names it: "F.relu", "torch.relu_"..."""
    prefix = "F" if getattr(function, "__module__", None) == "torch.nn.functional" else "torch"
    return f"{prefix}.{function.__name__}"


@dataclass(frozen=True)
class Feature:
    """One post-ReLU feature map of a model.

    name: stable, readable layer name (the BN's qualified name, or the container that holds
        exactly this Conv-BN-ReLU unit, e.g. "features.c1"; "<block>.residual" for residuals).
    relu_target: qualified name of the ReLU module, or the functional call ("F.relu", ...).
    producer_module_name: the module whose output the ReLU consumes (None when that is not a
        module output, e.g. a residual add).
    bn_module_name / layer_module_name: the BN and the Conv/Linear that produce the feature.
    kind: one of KINDS.
    call_index: which call (0-based, within one forward of the model) of the hooked module
        this feature is: the ReLU module's call, or the producer's call for a functional ReLU.
        None only for fallback features, whose calls are numbered at run time.
    activation: "relu" or "relu6".
    functional: True when the ReLU is a function call, so a tracker must hook the producer
        module and apply the activation itself.
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

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Feature {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.activation not in ("relu", "relu6"):
            raise ValueError(f"Feature {self.name!r}: activation must be 'relu' or 'relu6', got {self.activation!r}")
        if self.functional and self.producer_module_name is None:
            raise ValueError(f"Feature {self.name!r}: a functional ReLU is measured on its producer module, "
                             "so producer_module_name is required")

    @property
    def hook_module_name(self) -> str:
        """The module whose forward output a tracker hooks to see this feature."""
        return self.producer_module_name if self.functional else self.relu_target


class _Tracer(torch.fx.Tracer):
    """Default leaves (torch.nn modules) plus ReLU subclasses and fused BN+ReLU modules: their
    output is a feature, so they must stay one node of the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return measured_activation(m) is not None or isinstance(m, FusedBNReLU) or super().is_leaf_module(m, qualname)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's network inside a DistributedDataParallel / DataParallel wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def find_features(model: nn.Module) -> list[Feature]:
    """Every ReLU-family feature of ``model``, in forward order (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_features: expected an nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...) for dynamic code
        warnings.warn(
            f"find_features: torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}). "
            "Falling back to hooking every nn.ReLU / nn.ReLU6 module, one feature per call, each paired "
            "with the nearest BatchNorm registered before it; functional relu calls are not measured.",
            RuntimeWarning,
            stacklevel=2,
        )
        return _features_by_registration(model)
    return _features_from_graph(model, graph)


# --- traced graph -------------------------------------------------------------------------


def _relu_of(node: torch.fx.Node, modules: dict[str, nn.Module]):
    """(relu_target, activation, functional) if ``node`` is a ReLU-family op, else None."""
    if node.op == "call_module":
        m = modules[node.target]
        activation = measured_activation(m)
        if activation is not None:
            return node.target, activation, False
        if isinstance(m, FusedBNReLU):
            return node.target, "relu", False
    elif node.op == "call_function" and node.target in MEASURED_ACTIVATION_FUNCTIONS:
        return _function_name(node.target), MEASURED_ACTIVATION_FUNCTIONS[node.target], True
    elif node.op == "call_method" and node.target in MEASURED_ACTIVATION_METHODS:
        return f"Tensor.{node.target}", MEASURED_ACTIVATION_METHODS[node.target], True
    return None


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
    """The Conv/Linear whose output is the (first) input of ``node``, if any."""
    return _module_node(node.args[0] if node.args else None, modules, _LAYERS)


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
        relu = _relu_of(node, modules)
        if relu is None:
            continue
        relu_target, activation, functional = relu
        src = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(src, torch.fx.Node):
            continue
        if _relu_of(src, modules) is not None:
            continue  # relu(relu(x)) is the same feature again
        producer = src.target if src.op == "call_module" else None
        fused = not functional and isinstance(modules[relu_target], FusedBNReLU)
        bn = layer = None
        if fused:
            kind, bn, layer = "bn", relu_target, _layer_feeding(node, modules)
        elif producer is not None and isinstance(modules[producer], BATCH_NORMS):
            kind, bn, layer = "bn", producer, _layer_feeding(src, modules)
        elif producer is not None and isinstance(modules[producer], ALL_CONVS):
            kind, layer = "conv", producer
        elif producer is not None and isinstance(modules[producer], LINEARS):
            kind, layer = "linear", producer
        elif _is_add(src):
            kind = "residual"
            for arg in src.args:
                bn = _module_node(arg, modules, BATCH_NORMS)
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
                activation=activation, functional=functional,
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
    """One fallback feature per ReLU module; BN / layer = the nearest ones registered before it
    and after the previous ReLU (so a BN is never paired with two ReLUs)."""
    found: list[dict] = []
    bn = layer = None
    for name, m in model.named_modules():
        if isinstance(m, BATCH_NORMS):
            bn = name
        elif isinstance(m, _LAYERS):
            layer, bn = name, None  # a BN registered before this layer belongs to an earlier unit
        elif measured_activation(m) is not None:
            if bn is not None:
                kind = "bn"
            elif layer is not None:
                kind = "conv" if isinstance(model.get_submodule(layer), ALL_CONVS) else "linear"
            else:
                kind = "other"
            found.append(
                dict(
                    relu_target=name, producer_module_name=None, bn_module_name=bn,
                    layer_module_name=layer, kind=kind, call_index=None,
                    activation=measured_activation(m), functional=False,
                )
            )
            bn = layer = None
    return _name_features(found)
