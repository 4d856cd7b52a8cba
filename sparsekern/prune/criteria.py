"""Which filters to drop: one protocol for every pruning criterion.

A criterion scores the output channels of a model's prunable layers:
``criterion.scores(model) -> {layer: 1-D float64 tensor}``, one score per output channel,
*higher = more important* (kept first). ``PrunePlan.from_criterion(criterion, model, keep=...)``
turns the scores into a plan: a keep ratio per layer or over all layers, per-layer counts, or a
score threshold; every layer keeps at least one channel, and ties keep the lower channel index
(:func:`sparsekern.regularize.masks.rank_units`, the same order as the keep-ratio masks).

``criterion.exact`` says what removing the channels it *marks* does:

- exact criteria mark channels whose removal cannot change the outputs, and say what each
  marked channel outputs at the end of its layer's private chain (``marked(model)``; surgery
  folds nonzero constants into the layers that read them):
  :class:`DeadByActivation` (corpus max below a threshold in an analysis: the channel is 0) and
  :class:`ConstantGamma` (|gamma| below a threshold: the unit outputs the constant act(beta)).
- rankings only order channels; removing the low ones changes the outputs, so their plans are
  lossy: :class:`L1Norm` (Li et al. 2017), :class:`Slimming` (|gamma| as importance, Liu et al.
  2017), :class:`CGES` (exact zeros first, then |gamma|), :class:`SplitLBIOrder` (entry order
  into Split LBI's support), :class:`APoZ` (Hu et al. 2016) and :class:`Selectivity` (the
  paper's corollary: the most selective features go first). An exact criterion used with
  ``keep=`` is a ranking too (its scores are corpus maxima or |gamma|).

``scope`` is where a keep ratio applies unless the plan says otherwise ("layer": the same
fraction of every layer; "global": one threshold over all scored layers); ``name`` goes into the
plan's ``source``. Which layer a BN belongs to, and who reads a channel, come from the channel
graph (``graph.py``), never from module order; the analysis criteria key each feature by the
layer the tracker found producing it (``stats.features``), and surgery resolves every plan entry
through the graph again.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from sparsekern._types import BATCH_NORMS, CONVS, LINEARS
from sparsekern.prune.graph import ChannelGraph
from sparsekern.prune.kinds import PRODUCER
from sparsekern.prune.surgery import example_batch

# Features of an analysis that a Conv/Linear produces (see stats.features): their channels are
# that layer's output channels. A ReLU after a concat or a pooling ("other") has no such layer.
_LAYER_FEATURE_KINDS = ("bn", "conv", "linear", "residual")


@dataclass(frozen=True)
class Marked:
    """The channels an exact criterion marks in one layer.

    channels: the layer's output channels; values: marked channel -> what it outputs at the end
    of its layer's private chain (0.0: dead); notes: marked channels left in the layer, and why.
    """

    channels: int
    values: dict
    notes: tuple = ()


class Criterion(ABC):
    """Scores per output channel, higher = more important (see the module docstring)."""

    name: ClassVar[str]
    exact: ClassVar[bool] = False
    scope: ClassVar[str] = "layer"  # where a keep ratio applies by default: "layer" or "global"
    needs_model: ClassVar[bool] = True  # False: the scores come from an analysis of the model

    @abstractmethod
    def scores(self, model: Optional[nn.Module]) -> dict:
        """``{layer: 1-D float64 CPU tensor}``, one score per output channel of each scored layer."""


class ExactCriterion(Criterion):
    """A criterion whose marked channels can be removed without changing the outputs."""

    exact: ClassVar[bool] = True
    threshold: float

    @abstractmethod
    def marked(self, model: Optional[nn.Module]) -> dict:
        """``{layer: Marked}`` for every scored layer (layers with nothing marked included)."""


def check_threshold(threshold) -> float:
    """A positive finite threshold, or ValueError."""
    if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and threshold > 0
                                           and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a positive finite number, got {threshold!r}")
    return float(threshold)


# --- scores of the model's weights ------------------------------------------------------------


def filter_l1_scores(model: nn.Module) -> dict:
    """``{layer: L1 norm of each output filter}`` for every Conv (groups == 1) and Linear
    (Li et al. 2017, "Pruning Filters for Efficient ConvNets")."""
    scores = {}
    for name, m in model.named_modules():
        if (isinstance(m, CONVS) and m.groups == 1) or isinstance(m, LINEARS):
            scores[name] = m.weight.detach().abs().flatten(1).sum(1).double().cpu()
    return scores


def _gamma_scores(graph: ChannelGraph) -> dict:
    scores = {}
    for layer in graph.chains:
        bn = graph.chain_bn(layer)
        if bn is not None and bn.detail["module"].weight is not None:
            scores[layer] = bn.detail["module"].weight.detach().abs().double().cpu()
    return scores


def bn_gamma_scores(model: nn.Module, *, leaf_modules=(), concrete_args=None) -> dict:
    """``{layer: |gamma| of the BN after it}`` for every Conv/Linear followed by a BN in its
    unit (Liu et al. 2017, "Network Slimming"); the channel graph pairs them (a norm-act module,
    timm's ``BatchNormAct2d``, is a BN). ``leaf_modules`` / ``concrete_args``: how to trace."""
    return _gamma_scores(ChannelGraph(model, leaf_modules=leaf_modules, concrete_args=concrete_args))


def unused_batch_norms(graph: ChannelGraph) -> list:
    """Names of the BatchNorm modules of ``graph`` that are in no Conv/Linear unit (after a grouped
    conv, an add, a concat, an op it cannot map...): gamma criteria cannot use them."""
    used = {graph.chain_bn(layer).module_name for layer in graph.chains if graph.chain_bn(layer) is not None}
    return [name for name, m in graph.modules.items() if isinstance(m, BATCH_NORMS) and name not in used]


def unit_layers(model: nn.Module) -> list:
    """Names of the Conv/Linear layers followed by a BN in their unit: what the baselines prune
    (the Conv-BN-ReLU units implicit sparsity kills, never a classifier without BN)."""
    return list(bn_gamma_scores(model))


def _require_gammas(scores: dict, model: nn.Module, who: str) -> dict:
    if not scores:
        raise ValueError(f"{type(model).__name__} has no Conv/Linear followed by a BatchNorm with a scale: "
                         f"{who} needs BN gammas")
    return scores


# --- scores of an analysis --------------------------------------------------------------------


def _by_layer(result, measure: Callable, combine: Callable) -> dict:
    """``{layer: measure(stats)}`` over the analysis' features a Conv/Linear produces; two features
    of one layer (e.g. a ResNet's conv2 feeding both its own and a residual feature) ``combine``."""
    out: dict = {}
    for feature in result.features:
        if feature.layer_module_name is None or feature.kind not in _LAYER_FEATURE_KINDS:
            continue
        value = measure(result.stats[feature.name]).cpu()
        name = feature.layer_module_name
        out[name] = value if name not in out else combine(out[name], value)
    return out


@dataclass(frozen=True)
class DeadByActivation(ExactCriterion):
    """Channels whose corpus max in ``result`` (a ``sparsekern.analyze`` result) is below
    ``threshold``: 0 on every input of the corpus. Scores: the corpus max (float64).

    A channel of two features of one layer is dead only if dead in both. For a ResNet residual
    feature relu(bn2(conv2(x)) + shortcut) the channel is marked for conv2 only; surgery removes
    it only if every layer tied by the residual adds removes it too. Channels that saw NaN raise
    NonFiniteActivationError (``ChannelStats.dead_mask``).
    """

    result: Any
    threshold: float = 1e-12
    name: ClassVar[str] = "dead_by_activation"
    needs_model: ClassVar[bool] = False

    def __post_init__(self):
        check_threshold(self.threshold)

    def scores(self, model: Optional[nn.Module] = None) -> dict:
        return _by_layer(self.result, lambda s: s.corpus_max.double(), torch.maximum)

    def marked(self, model: Optional[nn.Module] = None) -> dict:
        dead = _by_layer(self.result, lambda s: s.dead_mask(self.threshold), torch.logical_and)
        return {name: Marked(mask.numel(), {c: 0.0 for c in torch.nonzero(mask).flatten().tolist()})
                for name, mask in dead.items()}


@dataclass(frozen=True)
class APoZ(Criterion):
    """Average percentage of zeros of each post-ReLU channel in ``result`` (Hu et al. 2016,
    "Network Trimming"): a channel that is mostly 0 matters least. Scores: 1 - APoZ, the
    fraction of positive activations; of two features of one layer, the larger."""

    result: Any
    name: ClassVar[str] = "apoz"
    needs_model: ClassVar[bool] = False

    def scores(self, model: Optional[nn.Module] = None) -> dict:
        return _by_layer(self.result, lambda s: 1.0 - s.apoz(), torch.maximum)


@dataclass(frozen=True)
class Selectivity(Criterion):
    """Feature selectivity in ``result`` (SCIENCE.md: the fraction of samples on which a channel's
    max stays below ``threshold`` x its corpus max) as a pruning rule: the paper's corollary that
    selective features are the ones regularization pushes to zero, so they matter least. Scores:
    universality, 1 - selectivity (a never-active channel scores 0); of two features of one layer,
    the larger. ``result`` must measure selectivity at ``threshold`` (``analyze``'s default
    two-pass mode does at 1e-3); channels of equal universality keep the lower index."""

    result: Any
    threshold: float = 1e-3
    name: ClassVar[str] = "selectivity"
    needs_model: ClassVar[bool] = False

    def __post_init__(self):
        check_threshold(self.threshold)

    def scores(self, model: Optional[nn.Module] = None) -> dict:
        return _by_layer(self.result, lambda s: s.selectivity(self.threshold).universality, torch.maximum)


# --- criteria of the weights ------------------------------------------------------------------


@dataclass(frozen=True)
class ConstantGamma(ExactCriterion):
    """Channels whose BN has |gamma| < ``threshold`` (compared in float64). Scores: |gamma|.

    Such a BN outputs beta + gamma * x_hat, taken as the constant beta (exact when gamma is
    exactly 0; otherwise surgery's verification judges the error); the marked channel outputs
    beta passed through the rest of its private chain, e.g. relu(beta). A channel whose chain
    does not keep a constant (e.g. a zero-padded average pool) stays, with a note. Only
    Conv/Linear layers followed by a BN are scored.
    """

    threshold: float = 1e-3
    leaf_modules: tuple = ()
    concrete_args: Optional[dict] = field(default=None, hash=False, compare=False)
    name: ClassVar[str] = "constant_gamma"

    def __post_init__(self):
        check_threshold(self.threshold)

    def scores(self, model: nn.Module) -> dict:
        return bn_gamma_scores(model, leaf_modules=self.leaf_modules, concrete_args=self.concrete_args)

    def marked(self, model: nn.Module) -> dict:
        graph = ChannelGraph(model, leaf_modules=self.leaf_modules, concrete_args=self.concrete_args)
        marked = {}
        for layer, gamma in _gamma_scores(graph).items():
            values, notes = {}, []
            for c in torch.nonzero(gamma < self.threshold).flatten().tolist():
                value = graph.chain_constant_from_bn(layer, c)
                if value is None:
                    notes.append(f"{layer}: channel {c} has |gamma| < {self.threshold:g} but its unit's output "
                                 "is not constant")
                else:
                    values[c] = value
            marked[layer] = Marked(gamma.numel(), values, tuple(notes))
        return marked


@dataclass(frozen=True)
class L1Norm(Criterion):
    """Li et al.'s filter L1 norm, per unit layer (:func:`unit_layers`); same fraction per layer."""

    name: ClassVar[str] = "l1_norm"

    def scores(self, model: nn.Module) -> dict:
        layers = set(unit_layers(model))
        return {name: s for name, s in filter_l1_scores(model).items() if name in layers}


@dataclass(frozen=True)
class Slimming(Criterion):
    """Network Slimming: |gamma| of the unit BNs as importance, one global threshold."""

    name: ClassVar[str] = "network_slimming"
    scope: ClassVar[str] = "global"

    def scores(self, model: nn.Module) -> dict:
        return _require_gammas(bn_gamma_scores(model), model, "Network Slimming")


@dataclass(frozen=True)
class CGES(Criterion):
    """CGES's ranking (Yoon and Hwang 2017), over all unit layers: zero filters first, then |gamma|.

    BN renormalises whatever scale a filter's weights have, so a small but nonzero filter norm
    says nothing about how much the filter matters: only exact zeros (which CGES's prox steps
    produce) and the BN scale gamma do. A filter is *zero* when all its conv weights are 0, or
    when every layer that reads its channel is a Conv/Linear whose weights there are all 0
    (CGES's input groups zero such columns). Who reads a channel comes from the channel graph,
    built on ``example_inputs`` (a batch, or an input shape such as (1, 1, 28, 28)). Zero filters
    score below every other (|gamma| - (1 + max |gamma|)), and among themselves, like the
    others, by |gamma|.
    """

    example_inputs: Any
    name: ClassVar[str] = "cges"
    scope: ClassVar[str] = "global"

    @torch.no_grad()
    def scores(self, model: nn.Module) -> dict:
        graph = ChannelGraph(model, example_batch(model, self.example_inputs))
        gammas = _gamma_scores(graph)
        if not gammas:
            raise ValueError(f"{type(model).__name__} has no Conv/Linear followed by a BN: nothing to rank")
        offset = 1.0 + max(float(g.max()) for g in gammas.values())
        scores = {}
        for name, gamma in gammas.items():
            zero = model.get_submodule(name).weight.flatten(1).eq(0).all(dim=1).cpu()
            unread = torch.tensor([_unread(readers) for readers in graph.readers(name)], dtype=torch.bool)
            scores[name] = torch.where(zero | unread, gamma - offset, gamma)
        return scores


def _unread(readers: list) -> bool:
    """True when a channel's every reader is a Conv/Linear with zero weights where it reads it."""
    return bool(readers) and all(
        info.kind == PRODUCER and bool(info.detail["module"].weight[:, positions].eq(0).all())
        for info, positions in readers
    )


@dataclass(frozen=True)
class SplitLBIOrder(Criterion):
    """Split LBI's ranking, per unit layer: the filters that entered Gamma's support first
    (``optimizer.importance``, then by ||Gamma|| and ||W||) score highest. ``optimizer``: a
    ``regularize.SplitLBI`` that optimised the model, ranking filters (not single weights)."""

    optimizer: Any
    name: ClassVar[str] = "split_lbi"

    @torch.no_grad()
    def scores(self, model: nn.Module) -> dict:
        scores = {}
        for name in unit_layers(model):
            weight = model.get_submodule(name).weight
            kind = self.optimizer.unit_kind(weight)
            if kind != "filter":
                raise ValueError(f"{name}: Split LBI ranks its {kind}s, not its filters")
            order = self.optimizer.importance(weight).cpu()
            score = torch.empty(order.numel(), dtype=torch.float64)
            score[order] = torch.arange(order.numel(), 0, -1, dtype=torch.float64)  # first = highest
            scores[name] = score
        return scores


@dataclass(frozen=True)
class GivenScores(Criterion):
    """Scores computed elsewhere: ``{layer: 1-D tensor}`` (``PrunePlan.from_scores``)."""

    given: dict = field(default_factory=dict)
    name: ClassVar[str] = "from_scores"

    def scores(self, model: Optional[nn.Module]) -> dict:
        return dict(self.given)
