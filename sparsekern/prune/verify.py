"""Surgery's verification: the pruned model against its reference, node by node.

The pruned model and the reference are run in eval mode on the example batch (given, or random
of a given shape); the check is max |pruned - reference| <= atol_rel * max(1, max |reference|).
For exact plans the reference is the original model; for lossy plans (``PrunePlan.exact ==
False``, e.g. score-based baselines) it is the original with the removed channels overwritten
by their planned values, so the check proves the surgery, not the plan. A failure names which
removed channels were not what the plan said and where the outputs first diverge.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx
from torch import nn

from sparsekern.prune.graph import ChannelGraph
from sparsekern.prune.removal import Removal


def planned_values(graph: ChannelGraph, removal: Removal, requests: dict) -> dict:
    """chain-end node -> (positions, planned values) of the removed channels there."""
    out = {}
    for chain in graph.chains.values():
        end = chain[-1]
        channels = graph.info[end].channels or []
        positions = [p for p, a in enumerate(channels) if a in removal.removed and a in requests]
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


def _node_key(node: torch.fx.Node) -> tuple:
    # Constants fx lifts out of the forward (torch.tensor(...) in the code) are numbered per trace:
    # "_tensor_constant44" in one trace can be "_tensor_constant66" in the other.
    if node.op == "get_attr" and str(node.target).startswith("_tensor_constant"):
        return node.op, "_tensor_constant"
    return node.op, node.target


def _first_mismatch(ref_nodes: list, new_nodes: list) -> str:
    """'' when both traces have the same ops in the same order, else the first difference."""
    for a, b in zip(ref_nodes, new_nodes):
        if _node_key(a) != _node_key(b):
            return f"{a.format_node()} against {b.format_node()}"
    if len(ref_nodes) != len(new_nodes):
        return f"{len(ref_nodes)} nodes against {len(new_nodes)}"
    return ""


def verify_pruned(graph: ChannelGraph, pruned: nn.Module, inputs: tuple, removal: Removal, planned: dict,
            overwrite: bool, atol_rel: float) -> tuple[float, float, str]:
    """Run the reference (graph.gm, not edited) and the pruned model side by side, comparing
    every node's kept channels. ``planned`` (from planned_values) gives the removed channels'
    planned values at the chain ends: with ``overwrite`` (lossy plans) the reference takes them;
    otherwise they are checked, to say which removed channels were not dead on this batch.

    Returns (max abs diff of the outputs, its tolerance, problem or ''). Comparing every node,
    not only the logits, catches a broken fold even where a later saturation would hide it.
    """
    new_gm = graph.retrace(pruned)
    ref_nodes, new_nodes = list(graph.gm.graph.nodes), list(new_gm.graph.nodes)
    mismatch = _first_mismatch(ref_nodes, new_nodes)
    if mismatch:
        return math.inf, 0.0, (f"the pruned model traces to another graph than the original ({mismatch}): its forward "
                               "depends on the channel counts, so the node-by-node check cannot pair them")
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
    if "grid" in info.detail:  # a channel dim split in two (channel shuffle): compare it flattened
        expected = expected.flatten(1, 2)
        got = got.flatten(1, 2) if isinstance(got, torch.Tensor) and got.dim() == expected.dim() + 1 else got
    kept_ref = expected.index_select(1, torch.tensor(kept, dtype=torch.long, device=expected.device))
    if not isinstance(got, torch.Tensor) or kept_ref.shape != got.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return f"outputs first diverge at {info.label}: {shape} instead of shape {tuple(kept_ref.shape)}"
    diff, tol = _max_diff(kept_ref, got), _tolerance(kept_ref, atol_rel)
    if diff > tol:
        return f"outputs first diverge at {info.label}: max abs diff {diff:.3g} on the kept channels (tolerance {tol:.3g})"
    return ""

