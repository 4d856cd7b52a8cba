"""Which of a plan's channels can go exactly, and the constants to fold where they are read.

What "exact" means. A plan says, for each removed channel, what its value is at the end of its
layer's private chain (0 for a dead channel, relu(beta) for a channel whose BN gamma is 0...).
That value is followed through the rest of the graph: a BN outside the chain maps a constant
k to gamma*(k-mean)/sqrt(var+eps)+beta, activations are applied to it, a residual add sums the
tied channels' values, a depthwise conv turns a constant input into bias + k*sum(kernel)...
Where a removed channel reaches a conv or Linear that reads it, a nonzero constant k is folded
into that layer's bias (bias += k * sum of the weights that read it). That is exact for a
Linear and for a conv that sees no zero padding; a zero-padded conv sees k inside the image but
0 in the padding, so its border outputs would change: such a channel is *kept*, and the report
says why. Channels are also kept when they are tied (residual add) to a layer that keeps the
same channel, when a grouped conv would lose part of a group, when they reach the model output,
or when their value is not constant where a layer reads it.

Partial plans. A removal that reaches an op the analysis cannot map (an opaque leaf module, a
hard-coded view...) is *kept* like any other inexact one, and the reason names the op; with
``strict=True`` it raises :class:`UnsupportedModelError` instead (nothing changed). Channels
that reach a split, a channel slice, a hard-coded view or a LayerNorm over channels are kept
the same way (``graph.py``: pins). ``ignored`` layers never lose channels.

Gates. In a product ``x * gate`` (squeeze-excitation) a removed channel of ``x`` that is 0 makes
the product 0 whatever the gate, so the gate's producer channel (never in the plan) goes too
(``Removal.free``). A constant channel k of ``x`` gives ``k * gate``, not a constant: kept.

Grouped convs (``groups > 1``, not depthwise) keep a representable module: whole groups go with
their input group; inside the groups that stay, the same number of input channels must go from
every group (a removed 0 is free, a constant is folded into the bias of that group's outputs
unless the conv zero-pads); extra ones are kept, and the reason says so.

A channel with |gamma| small but nonzero is not exactly constant: its BN output is
beta + gamma * x_hat. A plan may still treat it as the constant beta (``from_gamma`` does);
surgery's verification (``verify.py``) then decides whether the error is within tolerance.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from torch import nn

from sparsekern._types import LINEARS
from sparsekern.errors import UnsupportedModelError
from sparsekern.prune.graph import ChannelGraph
from sparsekern.prune.kinds import (
    BINARY, CAT, CHANNELWISE, ELEMENTWISE, FLATTEN, GETITEM, GROUPED, IDENTITY, INPUT, MIXING, OUTPUT, PERCHANNEL,
    POOL, PRODUCER, SHUFFLE, SPLIT, TRANSPOSE, UNKNOWN, constant_through, conv_zero_padded,
)
from sparsekern.prune.registry import ChannelHandler


class Reason(str):
    """Why a channel was kept: the text, and ``cause``, the short category reports count
    (``PruneReport.kept_by_cause``)."""

    cause: str

    def __new__(cls, text: str, cause: str):
        obj = super().__new__(cls, text)
        obj.cause = cause
        return obj

    def __reduce__(self):
        return (Reason, (str(self), self.cause))


# Causes (``Reason.cause``).
UNMAPPED = "unmapped op"
PINNED = "split, slice, view or norm over channels"
GROUPS = "grouped conv"
PADDING = "zero padding"
NOT_CONSTANT = "not constant"
GATE = "gated by a non-constant"
OUTPUT_CAUSE = "model output"
TIED = "tied to kept channels"
IGNORED = "ignored_layers"
LAST = "last channel of a layer"


def class_path(model: nn.Module) -> str:
    """``module.QualifiedName`` of the model's class, as manifests record it."""
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_requests(plan, model: nn.Module, graph: ChannelGraph) -> tuple[dict, list]:
    """atom id -> planned value for every channel the plan removes, and notes on ignored entries."""
    if plan.model_class is not None and plan.model_class != class_path(model):
        raise ValueError(
            f"the plan was made for a {plan.model_class}, but the model is a {class_path(model)}"
        )
    requests, notes, claimed = {}, [], {}
    for name, layer in plan.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"plan layer {name!r} is not a module of {type(model).__name__}") from None
        producer = graph.producer_of(name)
        if producer is None:
            what = "a grouped/depthwise conv (its channels follow the layer that feeds it)" if name in graph.grouped else (
                f"a {type(module).__name__} that is not part of a prunable Conv/Linear unit"
            )
            if layer.removed:
                notes.append(f"plan entry {name!r} ignored: {what}")
            continue
        if producer in claimed:
            raise ValueError(f"plan entries {claimed[producer]!r} and {name!r} both describe layer {producer!r}")
        claimed[producer] = name
        atoms = graph.producers[producer]
        if layer.channels != len(atoms):
            raise ValueError(
                f"plan layer {name!r} was made for {layer.channels} channels, but {producer!r} has {len(atoms)}"
            )
        for c in layer.removed:
            requests[atoms[c]] = float(layer.constants.get(c, 0.0))
    return requests, notes



@dataclass
class Removal:
    """What surgery removes (``plan_removal``'s answer)."""

    removed: set          # atom ids that go
    folds: dict           # consumer layer -> [(input position, nonzero constant)]
    why_kept: dict        # tie-class representative -> why it stays (a Reason)
    free: set = None      # removed producer atoms the plan did not name (gate channels of removed 0s)
    unmapped: dict = None  # label of each op the analysis cannot map that kept channels -> why


def _removable_classes(graph: ChannelGraph, classes: dict, requests: dict, forced: dict) -> tuple[set, dict]:
    """Representatives of the tie classes that can go, and why some others cannot."""
    atoms = graph.atoms
    gated = {graph.find(a) for a in graph.gated}

    def admissible(root, members) -> bool:
        if root in forced or any(atoms[a].kind == "fixed" for a in members):
            return False
        if all(atoms[a].kind == "derived" or a in requests for a in members):
            return True
        # A product's other factor may go unnamed (its value is multiplied by a removed 0).
        return root in gated and any(atoms[a].kind == "derived" or a in requests for a in members)

    candidates = {root for root, members in classes.items() if admissible(root, members)}
    initial = set(candidates)
    why: dict = {}
    changed = True
    while changed:
        changed = False
        for root in list(candidates):  # a derived channel goes only with its whole input group
            if any(
                atoms[a].kind == "derived" and any(graph.find(d) not in candidates for d in atoms[a].depends)
                for a in classes[root]
            ):
                candidates.discard(root)
                changed = True
        for name, info in graph.grouped.items():  # a depthwise output that stays keeps its input
            module = info.detail["module"]
            if module.in_channels // module.groups > 1:
                continue  # inside a kept group, equal counts per group may go (_group_count_conflicts)
            for a in info.channels:
                if graph.find(a) in candidates:
                    continue
                for d in atoms[a].depends:
                    if graph.find(d) in candidates:
                        candidates.discard(graph.find(d))
                        why[graph.find(d)] = Reason(
                            f"the grouped conv {name!r} reads it, and that conv's output channel {atoms[a].channel} "
                            "is tied (residual add / multiply) to channels the plan keeps"
                            if graph.find(a) not in initial else
                            f"the grouped conv {name!r} (groups={module.groups}) reads it with channels the plan "
                            "keeps: a grouped conv can only lose whole groups of input channels", GROUPS)
                        changed = True
    return candidates, why


def _combine(op, a: Optional[float], b: Optional[float]) -> Optional[float]:
    if op is operator.mul and (a == 0.0 or b == 0.0):
        return 0.0
    if a is None or b is None or (op is operator.truediv and b == 0.0):
        return None
    return op(a, b)


def _propagate(graph: ChannelGraph, removed: set, requests: dict):
    """Follow the removed channels' values through the graph (see the module docstring).

    Returns (folds, conflicts, unknown_uses): conflicts are (atom, Reason) pairs of
    removed channels that cannot go exactly; unknown_uses are (node info, atom) pairs of removed
    channels reaching an op the analysis does not understand.
    """
    chain_end = {chain[-1]: layer for layer, chain in graph.chains.items()}
    values: dict = {}
    folds: dict = defaultdict(list)
    conflicts: list = []
    unknown_uses: list = []
    for info in graph.infos:
        node, kind = info.node, info.kind
        ins = [values.get(n, {}) for n in info.inputs]
        if kind == OUTPUT:
            for n, vals in zip(info.inputs, ins):
                conflicts.extend((graph.info[n].channels[p], Reason("it reaches the model output", OUTPUT_CAUSE))
                                 for p in vals)
            continue
        if kind == UNKNOWN:
            for n, vals in zip(info.inputs, ins):
                unknown_uses.extend((info, graph.info[n].channels[p]) for p in vals)
            continue
        if info.channels is None:
            continue
        if "pin" in info.detail and ins:
            below = info.detail.get("pin_below")
            source = graph.info[info.inputs[0]].channels
            conflicts.extend((source[p], Reason(info.detail["pin"], PINNED))
                             for p in ins[0] if below is None or p < below)
        if kind in (INPUT, PRODUCER):
            if kind == PRODUCER and info.inputs:
                _check_reader(graph, info, ins[0], folds, conflicts)
            # Inside the private chain the value is not yet the planned one: unknown until its end.
            out = {p: None for p, a in enumerate(info.channels) if a in removed}
        elif kind == GROUPED:
            out = _grouped_values(graph, info, ins[0], removed, folds, conflicts)
        elif kind in (CHANNELWISE, ELEMENTWISE, IDENTITY, POOL, PERCHANNEL):
            out = {p: constant_through(info, p, v) for p, v in ins[0].items()}
        elif kind in (SHUFFLE, TRANSPOSE, GETITEM, SPLIT, MIXING):
            perm = info.detail.get("perm")
            if perm is None:
                out = dict(ins[0]) if kind != MIXING else {p: None for p in ins[0]}
            else:
                inverse = {source: q for q, source in enumerate(perm)}
                out = {inverse[p]: v for p, v in ins[0].items() if p in inverse}
        elif kind == FLATTEN:
            repeat = info.detail["repeat"]
            out = {p * repeat + s: v for p, v in ins[0].items() for s in range(repeat)}
        elif kind == CAT:
            out, offset = {}, 0
            for n, vals in zip(info.inputs, ins):
                out.update({offset + p: v for p, v in vals.items()})
                offset += len(graph.info[n].channels)
        elif kind == BINARY:
            op = info.detail["op"]
            out = {}
            for p, v in ins[0].items():
                w = ins[1].get(p)
                out[p] = _combine(op, v, w)
                if op is operator.mul and out[p] is None and (v is not None or w is not None):
                    k = v if v is not None else w
                    conflicts.append((info.channels[p], Reason(
                        f"it is the constant {k:.6g} multiplied by a channel that is not constant at {info.label} "
                        "(a per-channel gate such as squeeze-excitation): the product is not constant", GATE)))
        else:
            raise AssertionError(f"unhandled node kind {kind}")
        if node in chain_end:
            for p, a in enumerate(info.channels):
                if a in removed and a in requests:
                    out[p] = requests[a]
        values[node] = out
    return folds, conflicts, unknown_uses


def _check_reader(graph: ChannelGraph, info, vals: dict, folds: dict, conflicts: list) -> None:
    """A Conv/Linear reads removed channels: 0 is free, a constant is folded into its bias
    (unless zero padding makes that inexact), anything else keeps the channel."""
    name, module = info.module_name, info.detail["module"]
    handler = info.detail.get("handler")
    padded = handler is None and not isinstance(module, LINEARS) and conv_zero_padded(module)
    can_fold = handler is None or type(handler).fold is not ChannelHandler.fold
    source = graph.info[info.inputs[0]].channels
    for p, v in vals.items():
        if v is None or not math.isfinite(v):
            conflicts.append((source[p], Reason(f"its value is not constant where {name!r} reads it", NOT_CONSTANT)))
        elif v != 0.0 and padded:
            conflicts.append((source[p], Reason(
                f"it is the constant {v:.6g} where the zero-padded conv {name!r} reads it; folding it into "
                "the bias would change that conv's border outputs", PADDING)))
        elif v != 0.0 and not can_fold:
            conflicts.append((source[p], Reason(
                f"it is the constant {v:.6g} where {name!r} reads it, and that layer's registered handler cannot "
                "fold constants (ChannelHandler.fold)", NOT_CONSTANT)))
        elif v != 0.0:
            folds[name].append((p, v))


def _grouped_values(graph: ChannelGraph, info, vals: dict, removed: set, folds: dict, conflicts: list) -> dict:
    """Values of a grouped conv's removed output channels (their whole input group is removed);
    removed inputs of the groups that stay are checked (0 is free, a constant folds) like a reader's."""
    module = info.detail["module"]
    name = info.module_name
    per_in, per_out = module.in_channels // module.groups, module.out_channels // module.groups
    padded = conv_zero_padded(module)
    source = graph.info[info.inputs[0]].channels
    out = {}
    for g in range(module.groups):
        if info.channels[g * per_out] in removed:
            continue
        for p in range(g * per_in, (g + 1) * per_in):
            if p not in vals:
                continue
            v = vals[p]
            if v is None or not math.isfinite(v):
                conflicts.append((source[p], Reason(f"its value is not constant where the grouped conv {name!r} "
                                                    "reads it", NOT_CONSTANT)))
            elif v != 0.0 and padded:
                conflicts.append((source[p], Reason(
                    f"it is the constant {v:.6g} where the zero-padded grouped conv {name!r} reads it; folding it "
                    "into the bias would change that conv's border outputs", PADDING)))
            elif v != 0.0:
                folds[name].append((p, v))
    for j, a in enumerate(info.channels):
        if a not in removed:
            continue
        g = j // per_out
        inputs = [vals.get(g * per_in + i) for i in range(per_in)]
        bias = 0.0 if module.bias is None else float(module.bias.detach()[j].double())
        if any(v is None for v in inputs):
            out[j] = None
        elif all(v == 0.0 for v in inputs):
            out[j] = bias  # zero input and zero padding agree: the output is the bias everywhere
        elif padded:
            out[j] = None
        else:
            kernel_sums = module.weight.detach()[j].double().flatten(1).sum(1)
            out[j] = bias + float(sum(v * float(s) for v, s in zip(inputs, kernel_sums)))
    return out


def _group_count_conflicts(graph: ChannelGraph, removed: set) -> list:
    """A grouped conv (not depthwise) that keeps a group must lose the same number of input
    channels in every group it keeps, and keep at least one in each: keep the extra ones."""
    conflicts = []
    for name, info in graph.grouped.items():
        module = info.detail["module"]
        groups = module.groups
        per_in, per_out = module.in_channels // groups, module.out_channels // groups
        if per_in == 1:
            continue
        source = graph.info[info.inputs[0]].channels
        lost = {g: [p for p in range(g * per_in, (g + 1) * per_in) if source[p] in removed]
                for g in range(groups) if info.channels[g * per_out] not in removed}
        if not lost:
            continue
        fewest = min(len(v) for v in lost.values())
        keep_count = min(fewest, per_in - 1)
        for g, positions in lost.items():
            if len(positions) <= keep_count:
                continue
            why = Reason(
                f"the grouped conv {name!r} (groups={groups}, {per_in} input channels per group) must lose the "
                f"same number of input channels from every group it keeps: group {g} would lose {len(positions)}, "
                f"the fewest any group loses is {fewest}" + (" (and each group keeps one)" if fewest == per_in else ""),
                GROUPS)
            conflicts.extend((source[p], why) for p in positions[keep_count:])
    return conflicts


def _roots_to_keep(graph: ChannelGraph, atom: int) -> set:
    """Keeping ``atom`` means keeping its tie class, or for a derived channel its input group."""
    a = graph.atoms[atom]
    if a.kind == "derived":
        return set().union(*(_roots_to_keep(graph, d) for d in a.depends))
    return {graph.find(atom)}


def _empty_layer_conflicts(graph: ChannelGraph, removed: set) -> list:
    """Keep one channel of a layer that would lose all of them (an empty conv cannot run)."""
    conflicts = []
    for name, atoms in list(graph.producers.items()) + [(n, i.channels) for n, i in graph.grouped.items()]:
        if atoms and all(a in removed for a in atoms):
            conflicts.append((atoms[0], Reason(f"it is the last channel of {name!r}, which cannot become empty", LAST)))
    return conflicts


def _unmapped_reason(info, atom_label: str) -> Reason:
    why = info.detail.get("why")
    return Reason(
        f"it reaches {info.label}, which the channel analysis cannot map{' (' + why + ')' if why else ''}; "
        "declare the op with sparsekern.prune.register_channel_op to let channels through", UNMAPPED)


def ignored_layer_names(model: nn.Module, graph: ChannelGraph, ignored_layers) -> set:
    """The prunable layers (producers, grouped convs) that ``ignored_layers`` (module names or
    modules; a container covers every layer inside it; a BN its unit's layer) protects."""
    if not ignored_layers:
        return set()
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]
    names = {id(m): n for n, m in model.named_modules()}
    layers = set(graph.producers) | set(graph.grouped)
    out = set()
    for entry in ignored_layers:
        if isinstance(entry, nn.Module):
            if id(entry) not in names:
                raise ValueError(f"ignored_layers: a {type(entry).__name__} that is not a module of the model")
            entry = names[id(entry)]
        if not isinstance(entry, str):
            raise TypeError(f"ignored_layers: expected module names or modules, got {entry!r}")
        if entry not in dict(model.named_modules()):
            raise ValueError(f"ignored_layers: {entry!r} is not a module of {type(model).__name__}")
        inside = {n for n in layers if entry == "" or n == entry or n.startswith(entry + ".")}
        producer = graph.producer_of(entry)
        if producer is not None:
            inside.add(producer)
        out |= inside
    return out


def plan_removal(graph: ChannelGraph, requests: dict, *, strict: bool = False, ignored: set = frozenset()) -> Removal:
    """Decide which requested channels go and the constants to fold. Conservative: a removal
    that cannot be made exact keeps its whole tie class (and the input group of a grouped conv).

    ``strict``: raise UnsupportedModelError when a removal reaches an op the analysis cannot map
    (otherwise such channels are kept, with the op named). ``ignored``: layer names whose output
    channels are never removed.
    """
    classes = graph.tie_classes()
    forced: dict = {}
    for name in sorted(ignored):
        atoms = graph.producers.get(name) or [d for a in graph.grouped[name].channels for d in graph.atoms[a].depends]
        for a in atoms:
            for root in _roots_to_keep(graph, a):
                forced.setdefault(root, Reason(f"its layer {name!r} is in ignored_layers", IGNORED))
    unmapped: dict = {}
    while True:
        roots, why = _removable_classes(graph, classes, requests, forced)
        removed = {a for r in roots for a in classes[r]}
        folds, conflicts, unknown_uses = _propagate(graph, removed, requests)
        conflicts += _empty_layer_conflicts(graph, removed)
        conflicts += _group_count_conflicts(graph, removed)
        if not strict:
            for info, atom in unknown_uses:
                reason = _unmapped_reason(info, "")
                unmapped[info.label] = info.detail.get("why") or "the channel analysis cannot map it"
                conflicts.append((atom, reason))
        if not conflicts:
            break
        new = False
        for atom, reason in conflicts:
            for root in _roots_to_keep(graph, atom):
                if root not in forced:
                    forced[root] = reason
                    new = True
        if not new:
            raise AssertionError("plan_removal: conflicts did not shrink the removal")
    if unknown_uses:
        info, atom = unknown_uses[0]
        a = graph.atoms[atom]
        why = info.detail.get("why")
        raise UnsupportedModelError(
            f"cannot remove channel {a.channel} of {a.layer!r}: it reaches {info.label}, which the channel "
            f"analysis does not understand{' (' + why + ')' if why else ''}. Keep that layer out of the plan "
            "(ignored_layers=), declare the op (sparsekern.prune.register_channel_op), rewrite it so it keeps "
            "channels apart (e.g. x.flatten(1) instead of a hard-coded view), or leave strict=False to keep "
            "such channels"
        )
    free = {a for a in removed if graph.atoms[a].kind == "producer" and a not in requests}
    return Removal(removed, dict(folds), {**why, **forced}, free, unmapped)
