"""Exact removal of dead and constant channels, with automatic verification.

``prune_model(model, plan, example_inputs)`` removes the channels a :class:`PrunePlan` marks,
together with everything that carries them (see ``graph.py``), and returns a new model plus a
:class:`PruneReport`. The original model is never modified (unless ``inplace=True``, and then
only after the pruned copy passed verification).

The work is split by job: ``removal.py`` decides which channels go and what to fold (what
"exact" means is there), ``edits.py`` computes and writes the module edits, ``verify.py``
compares the pruned model with its reference node by node. Verification runs in eval mode on
the example batch; for lossy plans (``PrunePlan.exact == False``) the reference is the original
with the removed channels set to their planned values, so the check proves the surgery, not the
plan. A failure raises :class:`PruneVerificationError`, and the model is left unchanged.

Partial plans are the default: channels whose removal cannot be exact - they reach an op the
analysis cannot map, a split or a hard-coded view, a zero-padded conv as a constant, a grouped
conv that would become unrepresentable... - are kept, and ``PruneReport`` says which, and why
(``LayerSurgery.kept``, ``PruneReport.kept_by_cause()``, ``PruneReport.unmapped``).
``strict=True`` raises :class:`UnsupportedModelError` when a removal reaches an op the analysis
cannot map. A plan that removes nothing on a model with norm layers gets a note and a warning.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from sparsekern._deprecated import deprecated_names
from sparsekern._types import BATCH_NORMS
from sparsekern.errors import PruneVerificationError, UnsupportedModelError
from sparsekern.prune import flops
from sparsekern.prune.edits import apply_edits, compute_edits
from sparsekern.prune.graph import ChannelGraph
from sparsekern.prune.kinds import PRODUCER
from sparsekern.prune.removal import TIED, Reason, Removal, class_path, ignored_layer_names, plan_removal, resolve_requests
from sparsekern.prune.verify import planned_values, verify_pruned

__all__ = ["LayerSurgery", "PruneReport", "PruneVerificationError", "UnsupportedModelError", "class_path",
           "example_batch", "prune_model"]


@dataclass
class LayerSurgery:
    """One conv / Linear (or grouped conv) before and after surgery.

    removed_dead: removed channels whose planned value was 0; removed_constant: removed
    channels with a nonzero planned constant; removed_gated: removed channels the plan did not
    name, because what they multiply is removed as 0 (an SE gate's expand conv); folded_in:
    removed input channels of *this* layer whose constant was folded into its bias; kept:
    channel -> why a channel the plan removes was kept for exactness (a ``removal.Reason``: a
    str with a ``cause``).
    """

    name: str
    channels_before: int
    channels_after: int
    removed_dead: int = 0
    removed_constant: int = 0
    folded_in: int = 0
    kept: dict = field(default_factory=dict)
    removed_gated: int = 0


@dataclass
class PruneReport:
    """What ``prune_model`` did. MACs are multiply-accumulates of conv/Linear layers per sample;
    FLOPs = 2 * MACs (see ``flops.py``). ``unmapped``: ops the channel analysis cannot map that
    kept planned channels (label -> why); ``requested`` / ``removed``: channels the plan asks to
    remove / that went (plan layers only)."""

    layers: dict
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    notes: list = field(default_factory=list)
    max_abs_diff: Optional[float] = None
    tolerance: Optional[float] = None
    unmapped: dict = field(default_factory=dict)
    requested: int = 0
    removed: int = 0

    @property
    def flops_before(self) -> int:
        return 2 * self.macs_before

    @property
    def flops_after(self) -> int:
        return 2 * self.macs_after

    def kept_for_exactness(self) -> dict:
        """layer -> {channel: why kept} for every layer with such channels."""
        return {name: dict(r.kept) for name, r in self.layers.items() if r.kept}

    def kept_by_cause(self) -> dict:
        """cause -> number of planned channels kept for it (``removal.Reason.cause``: "unmapped op",
        "grouped conv", "zero padding", "split, slice, view or norm over channels", ...)."""
        counts: dict = {}
        for r in self.layers.values():
            for why in r.kept.values():
                cause = getattr(why, "cause", "other")
                counts[cause] = counts.get(cause, 0) + 1
        return counts

    def to_dict(self) -> dict:
        """Plain data (JSON-serialisable)."""
        return {
            "layers": {
                name: {
                    "channels_before": r.channels_before, "channels_after": r.channels_after,
                    "removed_dead": r.removed_dead, "removed_constant": r.removed_constant,
                    "removed_gated": r.removed_gated, "folded_in": r.folded_in,
                    "kept": {str(c): why for c, why in r.kept.items()},
                }
                for name, r in self.layers.items()
            },
            "params_before": self.params_before, "params_after": self.params_after,
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "notes": list(self.notes), "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
            "unmapped": dict(self.unmapped), "requested": self.requested, "removed": self.removed,
            "kept_by_cause": self.kept_by_cause(),
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
        if self.requested:
            causes = ", ".join(f"{n} {c}" for c, n in sorted(self.kept_by_cause().items(), key=lambda kv: -kv[1]))
            lines.append(f"removed {self.removed} of {self.requested} planned channels"
                         + (f"; kept: {causes}" if causes else ""))
        for label, why in self.unmapped.items():
            lines.append(f"- not mapped by the channel analysis (its channels kept): {label}: {why}")
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



# --- the public entry point --------------------------------------------------------------------


def prune_model(model: nn.Module, plan, example_inputs=None, *, verify: bool = True,
                atol_rel: float = 1e-4, inplace: bool = False, strict: bool = False, ignored_layers=None,
                leaf_modules=(), concrete_args: Optional[dict] = None):
    """Remove the channels ``plan`` marks, exactly; return ``(pruned_model, PruneReport)``.

    example_inputs: a batch (tensor or tuple of tensors) or an input shape (random batch); for
        activation-dead channels pass real data: a channel dead on the training set need not be
        dead on noise. Defaults to ``plan.input_shape`` when that is set.
    verify: compare pruned and reference in eval mode, node by node (see the module docstring);
        raises PruneVerificationError above ``atol_rel * max(1, max |reference|)``.
    inplace: also edit ``model`` itself (after the copy passed verification) and return it.
    strict: raise UnsupportedModelError (nothing changed) when a removed channel reaches an op
        the analysis cannot map; by default such channels are kept and the report names the op.
    ignored_layers: module names or modules whose output channels are never removed (a
        container covers every layer inside it; a BN, its unit's layer).
    leaf_modules / concrete_args: how to trace (``sparsekern._fx.trace_graph``): modules kept as
        one opaque node (their output channels fixed unless registered with
        ``register_channel_op``), fixed Python arguments of ``forward``. A model torch.fx cannot
        trace raises UntraceableModelError naming the module.
    Raises ValueError when the plan does not fit the model.
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
    graph = ChannelGraph(work, inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, strict=strict)
    requests, notes = resolve_requests(plan, work, graph)
    notes = graph.notes + notes
    ignored = ignored_layer_names(work, graph, _same_modules(model, work, ignored_layers))
    removal = plan_removal(graph, requests, strict=strict, ignored=ignored)
    edits = compute_edits(graph, removal)

    pruned = copy.deepcopy(work)  # edited; work's modules stay the reference that graph.gm runs
    apply_edits(pruned, edits)
    max_diff = tolerance = None
    if verify:
        planned = planned_values(graph, removal, requests)
        with torch.no_grad():
            max_diff, tolerance, problem = verify_pruned(graph, pruned, inputs, removal, planned, not plan.exact, atol_rel)
        if problem:
            raise PruneVerificationError(
                f"pruned model does not match the {'original' if plan.exact else 'masked reference'}: "
                f"{problem}. The model was not changed.", max_diff, tolerance,
            )
    for name, m in pruned.named_modules():
        m.training = modes[name]
    notes = notes + _empty_plan_notes(work, plan, requests)
    report = PruneReport(
        layers=_layer_reports(graph, removal, requests),
        params_before=flops.count_params(work), params_after=flops.count_params(pruned),
        macs_before=flops.graph_macs(graph.gm), macs_after=flops.graph_macs(graph.gm, root=pruned),
        notes=notes, max_abs_diff=max_diff, tolerance=tolerance, unmapped=dict(removal.unmapped or {}),
        requested=len(requests), removed=sum(a in removal.removed for a in requests),
    )
    if inplace:
        apply_edits(model, edits)
        return model, report
    return pruned, report


def _same_modules(model: nn.Module, work: nn.Module, ignored_layers):
    """``ignored_layers`` with modules of ``model`` named (``work`` is its deep copy)."""
    if ignored_layers is None:
        return None
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]
    names = {id(m): n for n, m in model.named_modules()}
    return [names.get(id(e), e) if isinstance(e, nn.Module) else e for e in ignored_layers]


def _empty_plan_notes(model: nn.Module, plan, requests: dict) -> list:
    """Never a silent empty plan: say when a model with norm layers is asked for nothing, and warn
    when the plan has no layer at all (its constructor found nothing it could use)."""
    if requests:
        return []
    norms = [n for n, m in model.named_modules() if isinstance(m, BATCH_NORMS)]
    if not norms:
        return []
    if getattr(plan, "layers", None):
        return [f"the plan removes no channel of its {len(plan.layers)} layers"]
    plan_notes = [n for n in getattr(plan, "notes", []) if n]
    note = (f"the plan removes no channel, though the model has {len(norms)} BatchNorm layers"
            + (f" ({plan_notes[0]})" if plan_notes else
               ": a plan from gamma or an analysis finds channels only in Conv/Linear units it can map"))
    warnings.warn(note, stacklevel=3)
    return [note]


def _layer_reports(graph: ChannelGraph, removal: Removal, requests: dict) -> dict:
    classes = graph.tie_classes()
    reports = {}
    for name, atoms in graph.producers.items():
        r = LayerSurgery(name, len(atoms), sum(a not in removal.removed for a in atoms))
        for c, a in enumerate(atoms):
            if a in removal.removed and a not in requests:
                r.removed_gated += 1
            elif a in removal.removed:
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
        reports[name] = LayerSurgery(name, len(info.channels), sum(a not in removal.removed for a in info.channels))
    return reports


def _why_kept(graph: ChannelGraph, classes: dict, atom: int, removal: Removal, requests: dict) -> str:
    root = graph.find(atom)
    if root in removal.why_kept:
        return removal.why_kept[root]
    members = classes[root]
    if any(graph.atoms[a].kind == "fixed" for a in members):
        return Reason("it is tied (residual add) to the network input or to the output of an op the analysis "
                      "treats as opaque", TIED)
    keeping = sorted(
        f"{graph.atoms[a].layer}[{graph.atoms[a].channel}]" for a in members
        if graph.atoms[a].kind == "producer" and a not in requests
    )
    if keeping:
        return Reason(f"it is tied (residual add) to {', '.join(keeping)}, which the plan keeps", TIED)
    return Reason("a channel it depends on is kept", TIED)


# ``LayerReport`` was this class's name until the statistics' per-layer report took that meaning.
__getattr__ = deprecated_names(__name__, {"LayerReport": LayerSurgery})
