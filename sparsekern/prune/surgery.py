"""Exact removal of dead and constant channels, with automatic verification.

``prune_model(model, plan, example_inputs)`` removes the channels a :class:`PrunePlan` marks,
together with everything that carries them (see ``graph.py``), and returns a new model plus a
:class:`PruneReport`. The original model is never modified (unless ``inplace=True``, and then
only after the pruned copy passed verification).

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

A channel with |gamma| small but nonzero is not exactly constant: its BN output is
beta + gamma * x_hat. A plan may still treat it as the constant beta (``from_gamma`` does);
the verification then decides whether the error is within tolerance.

Verification: the pruned model and the reference are run in eval mode on the example batch
(given, or random of a given shape); the check is max |pruned - reference| <=
atol_rel * max(1, max |reference|). For exact plans the reference is the original model; for
lossy plans (``PrunePlan.exact == False``, e.g. score-based baselines) it is the original with
the removed channels overwritten by their planned values, so the check proves the surgery,
not the plan. A failure raises :class:`PruneVerificationError` saying which removed channels
were not what the plan said and where the outputs first diverge.
"""
from __future__ import annotations

import copy
import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx
from torch import nn

from sparsekern.errors import PruneVerificationError, UnsupportedModelError
from sparsekern.prune import flops
from sparsekern.prune.graph import (
    BINARY, CAT, CHANNELWISE, ELEMENTWISE, FLATTEN, GROUPED, IDENTITY, INPUT, OUTPUT, POOL,
    PRODUCER, UNKNOWN, ChannelGraph, constant_through, conv_zero_padded, trace,
)


@dataclass
class LayerReport:
    """One conv / Linear (or grouped conv) before and after surgery.

    removed_dead: removed channels whose planned value was 0; removed_constant: removed
    channels with a nonzero planned constant; folded_in: removed input channels of *this*
    layer whose constant was folded into its bias; kept: channel -> why a channel the plan
    removes was kept for exactness.
    """

    name: str
    channels_before: int
    channels_after: int
    removed_dead: int = 0
    removed_constant: int = 0
    folded_in: int = 0
    kept: dict = field(default_factory=dict)


@dataclass
class PruneReport:
    """What ``prune_model`` did. MACs are multiply-accumulates of conv/Linear layers per sample;
    FLOPs = 2 * MACs (see ``flops.py``)."""

    layers: dict
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    notes: list = field(default_factory=list)
    max_abs_diff: Optional[float] = None
    tolerance: Optional[float] = None

    @property
    def flops_before(self) -> int:
        return 2 * self.macs_before

    @property
    def flops_after(self) -> int:
        return 2 * self.macs_after

    def kept_for_exactness(self) -> dict:
        """layer -> {channel: why kept} for every layer with such channels."""
        return {name: dict(r.kept) for name, r in self.layers.items() if r.kept}

    def to_dict(self) -> dict:
        """Plain data (JSON-serialisable)."""
        return {
            "layers": {
                name: {
                    "channels_before": r.channels_before, "channels_after": r.channels_after,
                    "removed_dead": r.removed_dead, "removed_constant": r.removed_constant,
                    "folded_in": r.folded_in,
                    "kept": {str(c): why for c, why in r.kept.items()},
                }
                for name, r in self.layers.items()
            },
            "params_before": self.params_before, "params_after": self.params_after,
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "notes": list(self.notes), "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
        }

    def summary(self) -> str:
        """A markdown table of the layers that changed, totals, and the kept-for-exactness notes."""
        lines = [
            "| layer | channels before | after | dead removed | constants removed | constants folded in | kept for exactness |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in self.layers.items():
            if r.channels_before != r.channels_after or r.kept or r.folded_in:
                lines.append(
                    f"| {name} | {r.channels_before} | {r.channels_after} | {r.removed_dead} | "
                    f"{r.removed_constant} | {r.folded_in} | {len(r.kept)} |"
                )
        ratio = lambda a, b: f"{100.0 * (1 - b / a):.1f}%" if a else "n/a"
        lines.append("")
        lines.append(f"params: {self.params_before} -> {self.params_after} ({ratio(self.params_before, self.params_after)} fewer)")
        lines.append(f"MACs/sample: {self.macs_before} -> {self.macs_after} ({ratio(self.macs_before, self.macs_after)} fewer)")
        if self.max_abs_diff is not None:
            lines.append(f"verified: max |diff| = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})")
        for name, r in self.layers.items():
            for reason, channels in _group_by_reason(r.kept).items():
                lines.append(f"- {name}: kept channels {channels}: {reason}")
        lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines)


def _group_by_reason(kept: dict) -> dict:
    grouped: dict = {}
    for c, why in sorted(kept.items()):
        grouped.setdefault(why, []).append(c)
    return grouped


# --- inputs -----------------------------------------------------------------------------------


def example_batch(model: nn.Module, example_inputs) -> tuple:
    """A tuple of input tensors from a tensor, a tuple of tensors, or a shape (random normal
    batch with a fixed seed, on the model's device and dtype)."""
    if example_inputs is None:
        raise ValueError(
            "example_inputs is required: the channel analysis needs tensor shapes; pass a batch "
            "(a tensor or a tuple of tensors) or an input shape such as (2, 3, 32, 32)"
        )
    if isinstance(example_inputs, torch.Tensor):
        inputs = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list, torch.Size)) and example_inputs and all(
        isinstance(d, int) and not isinstance(d, bool) for d in example_inputs
    ):
        if any(d < 1 for d in example_inputs):
            raise ValueError(f"input shape must have positive sizes, got {tuple(example_inputs)}")
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        generator = torch.Generator().manual_seed(0)
        inputs = (torch.randn(tuple(example_inputs), generator=generator, dtype=torch.float32).to(device, dtype),)
    elif isinstance(example_inputs, (tuple, list)) and example_inputs and all(
        isinstance(t, torch.Tensor) for t in example_inputs
    ):
        inputs = tuple(example_inputs)
    else:
        raise TypeError(
            "example_inputs must be a tensor, a tuple of tensors or an input shape (tuple of ints), "
            f"got {type(example_inputs).__name__}"
        )
    for i, t in enumerate(inputs):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"example input {i} contains NaN or Inf; verification needs finite inputs")
    return inputs


# --- which channels go -------------------------------------------------------------------------


def _resolve_requests(plan, model: nn.Module, graph: ChannelGraph) -> tuple[dict, list]:
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


def class_path(model: nn.Module) -> str:
    """``module.QualifiedName`` of the model's class, as manifests record it."""
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class _Removal:
    removed: set          # atom ids that go
    folds: dict           # consumer layer -> [(input position, nonzero constant)]
    why_kept: dict        # tie-class representative -> why it stays


def _removable_classes(graph: ChannelGraph, classes: dict, requests: dict, forced: dict) -> tuple[set, dict]:
    """Representatives of the tie classes that can go, and why some others cannot."""
    atoms = graph.atoms
    candidates = {
        root for root, members in classes.items()
        if root not in forced
        and all(atoms[a].kind == "derived" or (atoms[a].kind == "producer" and a in requests) for a in members)
    }
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
        for name, info in graph.grouped.items():  # a grouped conv output that stays keeps its inputs
            module = info.detail["module"]
            for a in info.channels:
                if graph.find(a) in candidates:
                    continue
                for d in atoms[a].depends:
                    if graph.find(d) in candidates:
                        candidates.discard(graph.find(d))
                        why[graph.find(d)] = (
                            f"the grouped conv {name!r} reads it, and that conv's output channel {atoms[a].channel} "
                            "is tied (residual add / multiply) to channels the plan keeps"
                            if graph.find(a) not in initial else
                            f"the grouped conv {name!r} (groups={module.groups}) reads it with channels the plan "
                            "keeps: a grouped conv can only lose whole groups of input channels"
                        )
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

    Returns (folds, conflicts, unknown_uses): conflicts are (atom, why) pairs of
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
                conflicts.extend((graph.info[n].channels[p], "it reaches the model output") for p in vals)
            continue
        if kind == UNKNOWN:
            for n, vals in zip(info.inputs, ins):
                unknown_uses.extend((info, graph.info[n].channels[p]) for p in vals)
            continue
        if info.channels is None:
            continue
        if kind in (INPUT, PRODUCER):
            if kind == PRODUCER and info.inputs:
                _check_reader(graph, info, ins[0], folds, conflicts)
            # Inside the private chain the value is not yet the planned one: unknown until its end.
            out = {p: None for p, a in enumerate(info.channels) if a in removed}
        elif kind == GROUPED:
            out = _grouped_values(info, ins[0], removed)
        elif kind in (CHANNELWISE, ELEMENTWISE, IDENTITY, POOL):
            out = {p: constant_through(info, p, v) for p, v in ins[0].items()}
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
            out = {p: _combine(op, v, ins[1].get(p)) for p, v in ins[0].items()}
        else:
            raise AssertionError(f"unhandled node kind {kind}")
        if node in chain_end:
            for p, a in enumerate(info.channels):
                if a in removed:
                    out[p] = requests[a]
        values[node] = out
    return folds, conflicts, unknown_uses


def _check_reader(graph: ChannelGraph, info, vals: dict, folds: dict, conflicts: list) -> None:
    """A Conv/Linear reads removed channels: 0 is free, a constant is folded into its bias
    (unless zero padding makes that inexact), anything else keeps the channel."""
    name, module = info.module_name, info.detail["module"]
    padded = not isinstance(module, nn.Linear) and conv_zero_padded(module)
    source = graph.info[info.inputs[0]].channels
    for p, v in vals.items():
        if v is None or not math.isfinite(v):
            conflicts.append((source[p], f"its value is not constant where {name!r} reads it"))
        elif v != 0.0 and padded:
            conflicts.append((
                source[p],
                f"it is the constant {v:.6g} where the zero-padded conv {name!r} reads it; folding it into "
                "the bias would change that conv's border outputs",
            ))
        elif v != 0.0:
            folds[name].append((p, v))


def _grouped_values(info, vals: dict, removed: set) -> dict:
    """Values of a grouped conv's removed output channels (its whole input group is removed)."""
    module = info.detail["module"]
    per_in, per_out = module.in_channels // module.groups, module.out_channels // module.groups
    padded = conv_zero_padded(module)
    out = {}
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
            conflicts.append((atoms[0], f"it is the last channel of {name!r}, which cannot become empty"))
    return conflicts


def plan_removal(graph: ChannelGraph, requests: dict) -> _Removal:
    """Decide which requested channels go and the constants to fold. Conservative: a removal
    that cannot be made exact keeps its whole tie class (and the input group of a grouped conv)."""
    classes = graph.tie_classes()
    forced: dict = {}
    while True:
        roots, why = _removable_classes(graph, classes, requests, forced)
        removed = {a for r in roots for a in classes[r]}
        folds, conflicts, unknown_uses = _propagate(graph, removed, requests)
        conflicts += _empty_layer_conflicts(graph, removed)
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
            f"analysis does not understand{' (' + why + ')' if why else ''}. Keep that layer out of the plan, "
            "or rewrite the op so it keeps channels apart (e.g. x.flatten(1) instead of a hard-coded view)"
        )
    return _Removal(removed, dict(folds), {**why, **forced})


# --- editing modules ---------------------------------------------------------------------------


def _index(t: torch.Tensor, dim: int, keep: list) -> torch.Tensor:
    out = t.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def compute_edits(graph: ChannelGraph, removal: _Removal) -> dict:
    """module name -> {attribute: new value}: new weights/buffers and sizes after surgery."""
    removed, edits = removal.removed, {}
    for info in graph.infos:
        if info.kind == PRODUCER:
            edit = _layer_edit(graph, info, removed, removal.folds.get(info.module_name, []))
        elif info.kind == GROUPED:
            edit = _grouped_edit(info, removed)
        elif info.kind == CHANNELWISE and info.channels is not None:
            edit = _bn_edit(info, removed)
        else:
            continue
        if edit:
            edits[info.module_name] = edit
    return edits


def _layer_edit(graph, info, removed: set, folds: list) -> dict:
    module = info.detail["module"]
    kept_out = [c for c, a in enumerate(info.channels) if a not in removed]
    source = graph.info[info.inputs[0]].channels if info.inputs else None
    kept_in = [p for p, a in enumerate(source) if a not in removed] if source is not None else None
    in_size = module.in_features if isinstance(module, nn.Linear) else module.in_channels
    if len(kept_out) == len(info.channels) and (kept_in is None or len(kept_in) == in_size) and not folds:
        return {}
    weight = module.weight.detach()
    edit = {}
    bias = None if module.bias is None else module.bias.detach().double()
    if folds:
        # bias[o] += sum_c k_c * sum_kernel W[o, c, ...]: the removed constant's contribution.
        positions = torch.tensor([p for p, _ in folds], dtype=torch.long, device=weight.device)
        constants = torch.tensor([v for _, v in folds], dtype=torch.float64, device=weight.device)
        read = weight.index_select(1, positions).double()
        read = read.flatten(2).sum(2) if read.dim() > 2 else read
        bias = (torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) if bias is None else bias)
        bias = bias + read @ constants
    new_weight = _index(weight, 0, kept_out)
    if kept_in is not None:
        new_weight = _index(new_weight, 1, kept_in)
    edit["weight"] = new_weight
    if bias is not None:
        edit["bias"] = bias.index_select(0, torch.tensor(kept_out, device=bias.device)).to(weight.dtype)
    if isinstance(module, nn.Linear):
        edit["out_features"], edit["in_features"] = len(kept_out), new_weight.shape[1]
    else:
        edit["out_channels"], edit["in_channels"] = len(kept_out), new_weight.shape[1]
    return edit


def _grouped_edit(info, removed: set) -> dict:
    module = info.detail["module"]
    per_in, per_out = module.in_channels // module.groups, module.out_channels // module.groups
    kept_groups = [g for g in range(module.groups) if info.channels[g * per_out] not in removed]
    if len(kept_groups) == module.groups:
        return {}
    kept_out = [g * per_out + j for g in kept_groups for j in range(per_out)]
    edit = {
        "weight": _index(module.weight.detach(), 0, kept_out),
        "groups": len(kept_groups),
        "in_channels": len(kept_groups) * per_in,
        "out_channels": len(kept_out),
    }
    if module.bias is not None:
        edit["bias"] = _index(module.bias.detach(), 0, kept_out)
    return edit


def _bn_edit(info, removed: set) -> dict:
    module = info.detail["module"]
    kept = [p for p, a in enumerate(info.channels) if a not in removed]
    if len(kept) == len(info.channels):
        return {}
    edit = {"num_features": len(kept)}
    for attr in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(module, attr)
        if value is not None:
            edit[attr] = _index(value.detach(), 0, kept)
    return edit


def apply_edits(model: nn.Module, edits: dict) -> None:
    """Write ``edits`` (from :func:`compute_edits`) into ``model``'s modules."""
    for name, changes in edits.items():
        module = model.get_submodule(name)
        for attr, value in changes.items():
            if isinstance(value, torch.Tensor) and attr in module._parameters:
                old = module._parameters[attr]
                requires_grad = old.requires_grad if old is not None else module.weight.requires_grad
                setattr(module, attr, nn.Parameter(value.clone(), requires_grad=requires_grad))
            elif isinstance(value, torch.Tensor):
                setattr(module, attr, value.clone())
            else:
                setattr(module, attr, value)


# --- verification ------------------------------------------------------------------------------


def _impositions(graph: ChannelGraph, removal: _Removal, requests: dict) -> dict:
    """chain-end node -> (positions, planned values) of the removed channels there."""
    out = {}
    for chain in graph.chains.values():
        end = chain[-1]
        channels = graph.info[end].channels or []
        positions = [p for p, a in enumerate(channels) if a in removal.removed]
        if positions:
            out[end] = (
                torch.tensor(positions, dtype=torch.long),
                torch.tensor([requests[channels[p]] for p in positions], dtype=torch.float64),
            )
    return out


def _tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    return []


def _tolerance(reference: torch.Tensor, atol_rel: float) -> float:
    peak = float(reference.detach().abs().max()) if reference.numel() else 0.0
    return atol_rel * max(1.0, peak)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


class _Stepper:
    """Executes a traced graph one node at a time (so two graphs can run side by side and be
    compared node by node), freeing each value after its last use."""

    def __init__(self, gm: torch.fx.GraphModule, inputs: tuple):
        self.gm, self.inputs, self.env = gm, iter(inputs), {}
        self.last_use = {}
        for node in gm.graph.nodes:
            torch.fx.node.map_arg((node.args, node.kwargs), lambda n, user=node: self.last_use.__setitem__(n, user))

    def step(self, node: torch.fx.Node):
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: self.env[n])
        if node.op == "placeholder":
            value = next(self.inputs)
        elif node.op == "get_attr":
            value = operator.attrgetter(node.target)(self.gm)
        elif node.op == "call_module":
            value = self.gm.get_submodule(node.target)(*args, **kwargs)
        elif node.op == "call_function":
            value = node.target(*args, **kwargs)
        elif node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:  # output
            value = args[0]
        self.env[node] = value
        return value

    def free(self, node: torch.fx.Node) -> None:
        for n in [n for n, user in self.last_use.items() if user is node]:
            self.env.pop(n, None)


def _verify(graph: ChannelGraph, pruned: nn.Module, inputs: tuple, removal: _Removal, planned: dict,
            overwrite: bool, atol_rel: float) -> tuple[float, float, str]:
    """Run the reference (graph.gm, not edited) and the pruned model side by side, comparing
    every node's kept channels. ``planned`` (from _impositions) gives the removed channels'
    planned values at the chain ends: with ``overwrite`` (lossy plans) the reference takes them;
    otherwise they are checked, to say which removed channels were not dead on this batch.

    Returns (max abs diff of the outputs, its tolerance, problem or ''). Comparing every node,
    not only the logits, catches a broken fold even where a later saturation would hide it.
    """
    new_gm = trace(pruned)
    ref_nodes, new_nodes = list(graph.gm.graph.nodes), list(new_gm.graph.nodes)
    if [(n.op, n.target) for n in ref_nodes] != [(n.op, n.target) for n in new_nodes]:
        raise AssertionError("the pruned model traces to a different graph than the original")
    ref, new = _Stepper(graph.gm, inputs), _Stepper(new_gm, inputs)
    deviations, divergence = [], ""
    for ref_node, new_node in zip(ref_nodes, new_nodes):
        expected = ref.step(ref_node)
        try:
            got = new.step(new_node)
        except Exception as exc:  # e.g. a size the forward hard-codes
            return math.inf, 0.0, f"the pruned model fails at {graph.info[ref_node].label}: {type(exc).__name__}: {exc}"
        if ref_node in planned and isinstance(expected, torch.Tensor):
            positions, values = planned[ref_node]
            values = values.to(expected.device).view((1, -1) + (1,) * (expected.dim() - 2))
            if overwrite:
                expected = expected.clone()
                expected[:, positions] = values.to(expected.dtype)
                ref.env[ref_node] = expected
            else:
                deviations.extend(_deviations(graph, ref_node, expected, positions, values, atol_rel))
        info = graph.info[ref_node]
        if not divergence and info.channels is not None and isinstance(expected, torch.Tensor):
            divergence = _divergence(info, expected, got, removal.removed, atol_rel)
        ref.free(ref_node)
        new.free(new_node)
    refs, outs = _tensors(expected), _tensors(got)
    if len(refs) != len(outs) or any(r.shape != o.shape for r, o in zip(refs, outs)):
        return math.inf, 0.0, "the pruned model's outputs have other shapes than the original's"
    worst = (0.0, atol_rel)
    for r, o in zip(refs, outs):
        if not torch.isfinite(r).all():
            raise ValueError("the original model's output is not finite on the example batch; cannot verify")
        diff, tol = _max_diff(r, o), _tolerance(r, atol_rel)
        if diff / tol >= worst[0] / worst[1]:
            worst = (diff, tol)
    if not divergence and worst[0] <= worst[1]:
        return worst[0], worst[1], ""
    problems = [divergence or f"the outputs differ by {worst[0]:.3g} (tolerance {worst[1]:.3g})"]
    return worst[0], worst[1], "; ".join(problems + deviations[:3])


def _deviations(graph, node, actual: torch.Tensor, positions, values, atol_rel: float) -> list:
    """Messages for removed channels whose actual value is not the planned one."""
    layer = next(name for name, chain in graph.chains.items() if chain[-1] is node)
    messages = []
    tol = _tolerance(actual, atol_rel)
    for i, p in enumerate(positions.tolist()):
        deviation = float((actual[:, p].double() - values[0, i].double()).abs().max())
        if deviation > tol:
            messages.append(
                f"removed channel {p} of {layer!r} is not the planned constant {float(values[0, i]):.6g} on "
                f"this batch (deviates by up to {deviation:.3g}): it is not dead/constant for these inputs"
            )
    return messages


def _divergence(info, expected: torch.Tensor, got, removed: set, atol_rel: float) -> str:
    """'' if the pruned node output equals the reference's kept channels, else a message."""
    kept = [p for p, a in enumerate(info.channels) if a not in removed]
    kept_ref = expected.index_select(1, torch.tensor(kept, dtype=torch.long, device=expected.device))
    if not isinstance(got, torch.Tensor) or kept_ref.shape != got.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return f"outputs first diverge at {info.label}: {shape} instead of shape {tuple(kept_ref.shape)}"
    diff, tol = _max_diff(kept_ref, got), _tolerance(kept_ref, atol_rel)
    if diff > tol:
        return f"outputs first diverge at {info.label}: max abs diff {diff:.3g} on the kept channels (tolerance {tol:.3g})"
    return ""


# --- the public entry point --------------------------------------------------------------------


def prune_model(model: nn.Module, plan, example_inputs=None, *, verify: bool = True,
                atol_rel: float = 1e-4, inplace: bool = False):
    """Remove the channels ``plan`` marks, exactly; return ``(pruned_model, PruneReport)``.

    example_inputs: a batch (tensor or tuple of tensors) or an input shape (random batch); for
        activation-dead channels pass real data: a channel dead on the training set need not be
        dead on noise. Defaults to ``plan.input_shape`` when that is set.
    verify: compare pruned and reference in eval mode, node by node (see the module docstring);
        raises PruneVerificationError above ``atol_rel * max(1, max |reference|)``.
    inplace: also edit ``model`` itself (after the copy passed verification) and return it.
    Raises UnsupportedModelError (nothing changed) when a removed channel reaches an op the
    analysis cannot map, ValueError when the plan does not fit the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune_model: expected an nn.Module, got {type(model).__name__}")
    if not atol_rel > 0:
        raise ValueError(f"atol_rel must be > 0, got {atol_rel!r}")
    if example_inputs is None and getattr(plan, "input_shape", None) is not None:
        example_inputs = tuple(plan.input_shape)
    inputs = example_batch(model, example_inputs)
    work = copy.deepcopy(model)  # the analysis never touches the caller's model
    modes = {name: m.training for name, m in work.named_modules()}
    work.eval()
    graph = ChannelGraph(work, inputs)
    requests, notes = _resolve_requests(plan, work, graph)
    removal = plan_removal(graph, requests)
    edits = compute_edits(graph, removal)

    pruned = copy.deepcopy(work)  # edited; work's modules stay the reference that graph.gm runs
    apply_edits(pruned, edits)
    max_diff = tolerance = None
    if verify:
        planned = _impositions(graph, removal, requests)
        with torch.no_grad():
            max_diff, tolerance, problem = _verify(graph, pruned, inputs, removal, planned, not plan.exact, atol_rel)
        if problem:
            raise PruneVerificationError(
                f"pruned model does not match the {'original' if plan.exact else 'masked reference'}: "
                f"{problem}. The model was not changed.", max_diff, tolerance,
            )
    for name, m in pruned.named_modules():
        m.training = modes[name]
    report = PruneReport(
        layers=_layer_reports(graph, removal, requests),
        params_before=flops.count_params(work), params_after=flops.count_params(pruned),
        macs_before=flops.graph_macs(graph.gm), macs_after=flops.graph_macs(graph.gm, root=pruned),
        notes=notes, max_abs_diff=max_diff, tolerance=tolerance,
    )
    if inplace:
        apply_edits(model, edits)
        return model, report
    return pruned, report


def _layer_reports(graph: ChannelGraph, removal: _Removal, requests: dict) -> dict:
    classes = graph.tie_classes()
    reports = {}
    for name, atoms in graph.producers.items():
        r = LayerReport(name, len(atoms), sum(a not in removal.removed for a in atoms))
        for c, a in enumerate(atoms):
            if a in removal.removed:
                if requests[a] == 0.0:
                    r.removed_dead += 1
                else:
                    r.removed_constant += 1
            elif a in requests:
                r.kept[c] = _why_kept(graph, classes, a, removal, requests)
        reports[name] = r
    for info in graph.infos:
        if info.kind == PRODUCER and info.module_name in removal.folds:
            source = graph.info[info.inputs[0]].channels
            reports[info.module_name].folded_in = len({source[p] for p, _ in removal.folds[info.module_name]})
    for name, info in graph.grouped.items():
        reports[name] = LayerReport(name, len(info.channels), sum(a not in removal.removed for a in info.channels))
    return reports


def _why_kept(graph: ChannelGraph, classes: dict, atom: int, removal: _Removal, requests: dict) -> str:
    root = graph.find(atom)
    if root in removal.why_kept:
        return removal.why_kept[root]
    members = classes[root]
    if any(graph.atoms[a].kind == "fixed" for a in members):
        return "it is tied (residual add) to the network input or to the output of an op the analysis treats as opaque"
    keeping = sorted(
        f"{graph.atoms[a].layer}[{graph.atoms[a].channel}]" for a in members
        if graph.atoms[a].kind == "producer" and a not in requests
    )
    if keeping:
        return f"it is tied (residual add) to {', '.join(keeping)}, which the plan keeps"
    return "a channel it depends on is kept"
