"""SparsityReport: the per-layer sparsity numbers of a model, as data and as a table.

Built from one ChannelStats per feature (``build_report``) or from the BN scales alone
(``gamma_sparsity``). Per layer it holds:

    channels, samples, NaN/Inf channels
    inactive by activation   channels with corpus max of the post-ReLU map < t   (per threshold t)
    inactive by |gamma|      channels with |BN weight| < t                        (per threshold t)
    constant by activation   channels whose output never varies: corpus max a - corpus min a <= t,
                             for any activation (per constant threshold t; next to the gamma-based
                             constants: |gamma| ~ 0 makes the BN output the constant beta)
    activation               the feature's activation function ("relu", "silu", "gelu", ...)
    selectivity              distribution over the live channels (quantiles, 10-bin histogram,
                             largest error bound); dead channels are left out because their
                             selectivity is 1 by definition and they are counted above already
    mean APoZ, gamma / beta min / median / max

plus totals over all layers. ``to_dict()`` is JSON-able, ``to_markdown()`` a markdown table and
``str(report)`` a fixed-width text table. Comparisons ``v < t`` are done in float64 (SCIENCE.md).

Channels that saw NaN / Inf are neither dead nor active: the tables show them per layer (column
"NaN/Inf") and, when there are any, end with a warning line saying how many and where.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from sparsekern._deprecated import deprecated_names
from sparsekern._types import is_batch_norm

SELECTIVITY_BINS = 10  # histogram bins over [0, 1]
_QUANTILES = {"min": 0.0, "p25": 0.25, "median": 0.5, "p75": 0.75, "max": 1.0}
_SHOWN_LAYERS = 5  # layers the NaN / Inf warning names


@dataclass
class LayerSparsity:
    """Sparsity numbers of one feature (layer), a row of a SparsityReport. Counts, not
    percentages; None = not available. (Formerly ``LayerReport``, a name surgery's per-layer
    pruning report also had.)"""

    name: str
    kind: str
    bn_module_name: str | None
    layer_module_name: str | None
    channels: int | None
    num_samples: int
    nonfinite_channels: int | None = None
    inactive_by_activation: dict[float, int] | None = None
    inactive_by_gamma: dict[float, int] | None = None
    selectivity: dict | None = None
    apoz_mean: float | None = None
    gamma: dict | None = None  # {"min", "median", "max"} of the BN weight (signed)
    beta: dict | None = None  # the same of the BN bias
    activation: str | None = None  # the feature's activation ("relu", "silu", ...); None: not a feature
    constant_by_activation: dict[float, int] | None = None  # None: the value range is unknown
    constant_channels: list[int] | None = None  # channels constant at the first constant threshold

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "activation": self.activation,
            "bn_module_name": self.bn_module_name,
            "layer_module_name": self.layer_module_name,
            "channels": self.channels,
            "num_samples": self.num_samples,
            "nonfinite_channels": self.nonfinite_channels,
            "inactive_by_activation": _counts_to_list(self.inactive_by_activation, self.channels),
            "inactive_by_gamma": _counts_to_list(self.inactive_by_gamma, self.channels),
            "constant_by_activation": _counts_to_list(self.constant_by_activation, self.channels),
            "constant_channels": self.constant_channels,
            "selectivity": self.selectivity,
            "apoz_mean": self.apoz_mean,
            "gamma": self.gamma,
            "beta": self.beta,
        }


@dataclass
class SparsityReport:
    """Per-layer sparsity of a model plus totals; see the module docstring."""

    layers: list[LayerSparsity]
    activation_thresholds: tuple[float, ...]
    gamma_thresholds: tuple[float, ...]
    constant_thresholds: tuple[float, ...] = ()
    totals: dict = field(init=False)

    def __post_init__(self):
        self.totals = _totals(self.layers, self.activation_thresholds, self.gamma_thresholds,
                              self.constant_thresholds)

    def layer(self, name: str) -> LayerSparsity:
        """The report of the layer called ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in this report; layers: {[l.name for l in self.layers]}")

    def to_dict(self) -> dict:
        """Everything as plain JSON types (threshold-keyed counts become lists of records)."""
        totals = dict(self.totals)
        denominators = {"inactive_by_activation": "channels", "inactive_by_gamma": "channels_with_gamma",
                        "constant_by_activation": "channels_with_range"}
        for key, denominator in denominators.items():
            totals[key] = _counts_to_list(totals[key], totals[denominator])
        return {
            "activation_thresholds": list(self.activation_thresholds),
            "gamma_thresholds": list(self.gamma_thresholds),
            "constant_thresholds": list(self.constant_thresholds),
            "layers": [layer.to_dict() for layer in self.layers],
            "totals": totals,
        }

    def nonfinite_warning(self) -> str | None:
        """A one-line warning when channels saw NaN / Inf activations, else None."""
        layers = [l.name for l in self.layers if l.nonfinite_channels]
        if not layers:
            return None
        count = self.totals["nonfinite_channels"]
        shown = ", ".join(layers[:_SHOWN_LAYERS]) + (", ..." if len(layers) > _SHOWN_LAYERS else "")
        return (f"WARNING: {count} channel{'s' if count != 1 else ''} in {len(layers)} layer"
                f"{'s' if len(layers) != 1 else ''} ({shown}) had NaN/Inf activations; they are neither dead "
                "nor active (left out of the inactive counts, selectivity and APoZ)")

    def to_markdown(self) -> str:
        """A markdown table, one row per layer plus a totals row; then the NaN / Inf warning, if any."""
        header, rows = _table_cells(self)
        cells = lambda row: "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"  # noqa: E731
        table = [cells(header), "|" + "|".join("---" for _ in header) + "|", *map(cells, rows)]
        warning = self.nonfinite_warning()
        return "\n".join(table + ([] if warning is None else ["", f"**{warning}**"]))

    def __str__(self) -> str:
        header, rows = _table_cells(self)
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        line = lambda cells: "  ".join(  # noqa: E731
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()
        rule = "-" * len(line(header))
        body = [line(r) for r in rows]
        # The totals row is the last one; a rule sets it apart.
        warning = self.nonfinite_warning()
        return "\n".join([line(header), rule, *body[:-1], rule, body[-1]] + ([] if warning is None else [warning]))


# --- building ------------------------------------------------------------------------------


def build_report(model: nn.Module, features, stats: dict, *, activation_thresholds=(1e-12, 1e-4),
                 gamma_thresholds=(1e-3, 1e-2), selectivity_threshold: float | None = 1e-3,
                 constant_thresholds=(1e-6,)) -> SparsityReport:
    """A SparsityReport from one ChannelStats per feature (``stats[feature.name]``).

    ``selectivity_threshold=None`` leaves selectivity out (stats that keep no per-sample
    maxima cannot give it). BN scales are read from ``model`` (the module named by each
    feature's ``bn_module_name``). Reading numbers back to the host happens here, not while
    the statistics are collected. ``constant_thresholds``: the "constant by activation" counts
    (``ChannelStats.constant_mask``), for stats that kept the value range of every sample.
    """
    activation_thresholds = _thresholds(activation_thresholds, "activation_thresholds")
    gamma_thresholds = _thresholds(gamma_thresholds, "gamma_thresholds")
    constant_thresholds = _thresholds(constant_thresholds, "constant_thresholds", allow_zero=True)
    layers = []
    for feature in features:
        s = stats[feature.name]
        gamma, beta = _bn_parameters(model, feature.bn_module_name)
        layer = LayerSparsity(
            name=feature.name, kind=feature.kind, bn_module_name=feature.bn_module_name,
            layer_module_name=feature.layer_module_name,
            channels=s.num_channels if s.num_channels is not None else (None if gamma is None else gamma.numel()),
            num_samples=s.num_samples,
            gamma=_spread(gamma), beta=_spread(beta), activation=getattr(feature, "activation", None),
        )
        # A residual feature with gamma = 0 still carries the identity branch, so the scale of
        # the BN feeding the sum says nothing about whether the feature is inactive.
        if gamma is not None and feature.kind != "residual":
            layer.inactive_by_gamma = {t: int((gamma.abs() < t).sum()) for t in gamma_thresholds}
        if s.num_samples > 0:
            layer.nonfinite_channels = int(s.nonfinite_mask().sum())
            layer.inactive_by_activation = {
                t: int(s.dead_mask(t, on_nan="exclude").sum()) for t in activation_thresholds
            }
            if s.has_range:
                masks = {t: s.constant_mask(t, on_nan="exclude") for t in constant_thresholds}
                layer.constant_by_activation = {t: int(mask.sum()) for t, mask in masks.items()}
                layer.constant_channels = masks[constant_thresholds[0]].nonzero().flatten().tolist()
            apoz = s.apoz(on_nan="exclude")
            layer.apoz_mean = None if bool(torch.isnan(apoz).all()) else apoz.nanmean().item()
            if selectivity_threshold is not None:
                dead = s.dead_mask(activation_thresholds[0], on_nan="exclude")
                layer.selectivity = _selectivity_summary(s.selectivity(selectivity_threshold, on_nan="exclude"), dead)
        layers.append(layer)
    return SparsityReport(layers, activation_thresholds, gamma_thresholds, constant_thresholds)


def gamma_sparsity(model: nn.Module, thresholds=(1e-3, 1e-2)) -> SparsityReport:
    """Inactive-by-scale counts of every affine BatchNorm in ``model``, from the weights alone.

    One layer per BatchNorm module (named by its qualified name, kind "bn"); the activation
    columns are empty because no data was seen.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gamma_sparsity: expected an nn.Module, got {type(model).__name__}")
    thresholds = _thresholds(thresholds, "thresholds")
    layers = []
    for name, module in model.named_modules():
        if not is_batch_norm(module) or module.weight is None:
            continue
        gamma, beta = _bn_parameters(model, name)
        layers.append(LayerSparsity(
            name=name, kind="bn", bn_module_name=name, layer_module_name=None, channels=gamma.numel(),
            num_samples=0, inactive_by_gamma={t: int((gamma.abs() < t).sum()) for t in thresholds},
            gamma=_spread(gamma), beta=_spread(beta),
        ))
    if not layers:
        raise ValueError(f"gamma_sparsity: {type(model).__name__} has no BatchNorm layer with an affine weight")
    return SparsityReport(layers, (), thresholds)


def _thresholds(values, what: str, allow_zero: bool = False) -> tuple[float, ...]:
    values = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else (values,)))
    low = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
    if not values or any(not (math.isfinite(v) and low(v)) for v in values):
        kind = "finite numbers >= 0" if allow_zero else "positive finite numbers"
        raise ValueError(f"{what} must be {kind}, got {values}")
    return values


def _bn_parameters(model: nn.Module, bn_name: str | None):
    """(gamma, beta) of a BN as float64 CPU tensors, or (None, None) without an affine BN."""
    if bn_name is None:
        return None, None
    bn = model.get_submodule(bn_name)
    weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
    if not isinstance(weight, torch.Tensor):
        return None, None
    as64 = lambda t: None if t is None else t.detach().to("cpu", torch.float64).flatten()  # noqa: E731
    return as64(weight), as64(bias)


def _spread(values: torch.Tensor | None) -> dict | None:
    if values is None or values.numel() == 0:
        return None
    # quantile(0.5) averages the two middle values of an even count (torch.median would not).
    return {"min": values.min().item(), "median": torch.quantile(values, 0.5).item(), "max": values.max().item()}


def _selectivity_summary(result, dead: torch.Tensor) -> dict:
    """Distribution of the selectivity over the live (not dead, finite) channels."""
    value = result.value.detach().cpu()
    live = ~torch.isnan(value) & ~dead.cpu()
    v = value[live]
    summary = {
        "threshold": result.threshold,
        "mode": result.mode,
        "exact": result.exact,
        "live_channels": int(live.sum()),
        "max_error_bound": result.error_bound.detach().cpu()[live].max().item() if v.numel() else None,
        "mean": v.mean().item() if v.numel() else None,
        "quantiles": {k: torch.quantile(v, q).item() for k, q in _QUANTILES.items()} if v.numel() else None,
        # Bin i holds [i/10, (i+1)/10); the last bin also holds 1.0.
        "histogram": torch.histc(v, bins=SELECTIVITY_BINS, min=0.0, max=1.0).to(torch.int64).tolist(),
    }
    return summary


def _totals(layers, activation_thresholds, gamma_thresholds, constant_thresholds=()) -> dict:
    measured = [l for l in layers if l.inactive_by_activation is not None]
    with_gamma = [l for l in layers if l.inactive_by_gamma is not None]
    with_range = [l for l in layers if l.constant_by_activation is not None]
    return {
        "layers": len(layers),
        "channels": sum(l.channels for l in measured),
        "channels_with_gamma": sum(l.channels for l in with_gamma),
        "channels_with_range": sum(l.channels for l in with_range),
        "constant_by_activation": (
            {t: sum(l.constant_by_activation[t] for l in with_range) for t in constant_thresholds} if with_range else None
        ),
        "nonfinite_channels": sum(l.nonfinite_channels for l in measured),
        "inactive_by_activation": (
            {t: sum(l.inactive_by_activation[t] for l in measured) for t in activation_thresholds} if measured else None
        ),
        "inactive_by_gamma": (
            {t: sum(l.inactive_by_gamma[t] for l in with_gamma) for t in gamma_thresholds} if with_gamma else None
        ),
    }


def _percent(count: int, total: int | None) -> float | None:
    return None if not total else 100.0 * count / total


def _counts_to_list(counts: dict | None, total: int | None) -> list | None:
    if counts is None:
        return None
    return [{"threshold": t, "count": k, "percent": _percent(k, total)} for t, k in counts.items()]


# --- table cells ---------------------------------------------------------------------------


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _fmt_count(counts: dict | None, t: float, total: int | None) -> str:
    if counts is None or not total:
        return "-"
    return f"{_percent(counts[t], total):.1f}% ({counts[t]})"


def _fmt_spread(s: dict | None) -> str:
    return "-" if s is None else f"{_fmt(s['min'])}/{_fmt(s['median'])}/{_fmt(s['max'])}"


def _table_cells(report: SparsityReport) -> tuple[list[str], list[list[str]]]:
    act, gam, const = report.activation_thresholds, report.gamma_thresholds, report.constant_thresholds
    header = ["layer", "kind"] + (["act"] if act else []) + ["ch", "samples"] + (["NaN/Inf"] if act else [])
    header += [f"act<{t:g}" for t in act] + [f"|gamma|<{t:g}" for t in gam]
    header += [f"const<={t:g}" for t in const]
    if act:
        header += ["selectivity med [p25, p75] +-err", "APoZ"]
    header += ["gamma min/med/max", "beta min/med/max"]
    rows = []
    for l in report.layers:
        row = [l.name, l.kind] + ([l.activation or "-"] if act else []) + [_fmt(l.channels, "d"), str(l.num_samples)]
        row += [_fmt(l.nonfinite_channels, "d")] if act else []
        row += [_fmt_count(l.inactive_by_activation, t, l.channels) for t in act]
        row += [_fmt_count(l.inactive_by_gamma, t, l.channels) for t in gam]
        row += [_fmt_count(l.constant_by_activation, t, l.channels) for t in const]
        if act:
            s = l.selectivity
            if s is None or s["quantiles"] is None:
                row.append("-")
            else:
                q = s["quantiles"]
                row.append(f"{q['median']:.3f} [{q['p25']:.3f}, {q['p75']:.3f}] +-{s['max_error_bound']:.2g}")
            row.append(_fmt(l.apoz_mean, ".3f"))
        row += [_fmt_spread(l.gamma), _fmt_spread(l.beta)]
        rows.append(row)
    t = report.totals
    total = ["total", ""] + (["-"] if act else []) + [str(t["channels"] or t["channels_with_gamma"]), ""]
    if act:
        total.append("-" if t["inactive_by_activation"] is None else str(t["nonfinite_channels"]))
    total += [_fmt_count(t["inactive_by_activation"], x, t["channels"]) for x in act]
    total += [_fmt_count(t["inactive_by_gamma"], x, t["channels_with_gamma"]) for x in gam]
    total += [_fmt_count(t["constant_by_activation"], x, t["channels_with_range"]) for x in const]
    total += ["", ""] if act else []
    total += ["", ""]
    rows.append(total)
    return header, rows


# Old name, kept for a release (prune.surgery had a LayerReport too).
__getattr__ = deprecated_names(__name__, {"LayerReport": LayerSparsity})
