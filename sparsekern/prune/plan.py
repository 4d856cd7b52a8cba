"""PrunePlan: which output channels of which layers to remove, and a JSON manifest of it.

A plan maps a prunable layer - the qualified module name of a Conv (groups == 1) or Linear
whose output channels go, or of a BN / activation of its unit, which resolves to that layer -
to the sorted kept channel indices, the original channel count, and, for removed channels that
are not 0, the constant they output. That value is taken where the layer's *private chain*
ends (see ``graph.py``): after the ReLU of a Conv-BN-ReLU unit; at the BN output for a BN that
feeds a residual add. Dead channels (value 0) have no constant entry.

Plans come from a criterion (``criteria.py``: what to drop, one protocol for all of them) through
``from_criterion(criterion, model, keep=...)``, or from the shorthands:
- ``from_dead_masks({layer: bool mask})``: True = dead (outputs 0);
- ``from_gamma(model, threshold)``: :class:`~sparsekern.prune.criteria.ConstantGamma`, channels
  with |gamma| < threshold output beta from their BN, so the unit outputs the constant act(beta)
  (relu(beta) in a Conv-BN-ReLU unit);
- ``from_analysis(result, threshold)``: :class:`~sparsekern.prune.criteria.DeadByActivation`,
  channels dead by activation in ``sparsekern.analyze``;
- ``from_scores(model, scores, keep_ratio)``: scores computed elsewhere. Rankings (L1-norm
  filter pruning, Network Slimming's global |gamma| threshold, ...) remove live channels: the
  plan is *lossy* (``exact = False``) and surgery behaves as if the removed channels output 0.

``save(path)`` / ``load(path)`` write and read a small JSON manifest (format name and version,
model class, input shape if known, layer -> channels / kept / constants); it holds no
modules or tensors and applies to any instance of the same model definition. A manifest is
read strictly: every field must have its JSON type (``"exact": "false"`` is not a boolean,
``2.7`` is not a channel index), kept indices are sorted, distinct and in range, unknown keys
are refused, and the file's size and nesting are bounded; any of that is a one-line
:class:`ManifestError` naming the file and the JSON path of the field.
``apply(model, example_inputs)`` runs :func:`sparsekern.prune.surgery.prune_model`.
"""
from __future__ import annotations

import json
import math
import warnings
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NoReturn, Optional

import torch
from torch import nn

from sparsekern._deprecated import deprecated_names
from sparsekern.errors import ManifestError
from sparsekern.prune import criteria
from sparsekern.prune.criteria import ConstantGamma, DeadByActivation, GivenScores
from sparsekern.prune.surgery import class_path, prune_model
from sparsekern.regularize.masks import rank_units

MANIFEST_FORMAT = "sparsekern.prune_plan"
MANIFEST_VERSION = 1
# A manifest holds a few numbers per channel, so real ones are kilobytes; the limit stops a
# wrong file (a checkpoint, /dev/zero) from being read into memory whole.
MAX_MANIFEST_BYTES = 64 * 2**20
# Channels of one layer. The widest real layers have ~1e5 outputs (large classifier heads);
# a plan lists kept / removed channels one by one, so a count far beyond that is a corrupt
# file whose per-channel lists would exhaust time and memory, not a model.
MAX_CHANNELS = 2**24
_MANIFEST_KEYS = ("format", "version", "model_class", "exact", "input_shape", "source", "notes", "layers")
_LAYER_KEYS = ("channels", "kept", "constants")


@dataclass
class LayerPlan:
    """One layer of a plan: ``channels`` originally, ``kept`` (sorted) stay; removed channels
    output 0 unless ``constants`` gives their value."""

    channels: int
    kept: list
    constants: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"channels must be a positive int, got {self.channels!r}")
        if self.channels > MAX_CHANNELS:
            raise ValueError(f"channels={self.channels} is more than {MAX_CHANNELS} (2**24), the most one layer may have")
        kept = sorted(_channel_index(c, "kept") for c in self.kept)
        if len(set(kept)) != len(kept) or any(not 0 <= c < self.channels for c in kept):
            raise ValueError(f"kept must be distinct channel indices in [0, {self.channels}), got {self.kept!r}")
        self.kept = kept
        kept_set = set(kept)
        constants = {_channel_index(c, "constants"): float(v) for c, v in self.constants.items()}
        for c, v in constants.items():
            if c in kept_set or not 0 <= c < self.channels:
                raise ValueError(f"constant for channel {c}: constants are only for removed channels in [0, {self.channels})")
            if not math.isfinite(v):
                raise ValueError(f"constant for channel {c} is {v}; constants must be finite")
        self.constants = {c: v for c, v in sorted(constants.items()) if v != 0.0}

    @property
    def removed(self) -> list:
        """Sorted removed channel indices."""
        kept = set(self.kept)
        return [c for c in range(self.channels) if c not in kept]


@dataclass
class PrunePlan:
    """Channels to remove per layer (see the module docstring).

    exact: True when every removed channel really is 0 / the stated constant (surgery verifies
    against the original model); False for score-based baselines.
    model_class: ``module.Class`` of the model the plan was made for (checked on apply), or None.
    input_shape: an input shape to verify on when ``apply`` gets no example inputs, or None.
    source: how the plan was made (free text, kept in the manifest). notes: remarks from its
    construction (e.g. channels a constructor could not treat as constant).
    """

    layers: dict = field(default_factory=dict)
    exact: bool = True
    model_class: Optional[str] = None
    input_shape: Optional[tuple] = None
    source: str = ""
    notes: list = field(default_factory=list)

    # --- constructors ----------------------------------------------------------------------
    @classmethod
    def from_dead_masks(cls, masks: dict, *, model: Optional[nn.Module] = None, constants: Optional[dict] = None,
                        input_shape=None) -> "PrunePlan":
        """``{layer: 1-D bool mask}`` with True for each dead channel (removed, value 0).

        ``constants``: optional ``{layer: {channel: value}}`` for removed channels that output
        a nonzero constant. ``model`` (optional) records the model class and checks channel counts.
        """
        layers = {}
        for name, mask in masks.items():
            mask = _bool_mask(mask, f"mask for layer {name!r}")
            if model is not None:
                _check_channels(model, name, mask.numel())
            layers[name] = LayerPlan(
                channels=mask.numel(),
                kept=torch.nonzero(~mask).flatten().tolist(),
                constants=dict((constants or {}).get(name, {})),
            )
        return cls(
            layers=layers, exact=True, model_class=class_path(model) if model is not None else None,
            input_shape=_shape_or_none(input_shape), source="from_dead_masks",
        )

    @classmethod
    def from_criterion(cls, criterion, model: Optional[nn.Module], keep=None, *, threshold=None,
                       scope: Optional[str] = None, input_shape=None) -> "PrunePlan":
        """The plan of a criterion (``sparsekern.prune.criteria``), whose scores rank channels
        higher = kept first.

        keep: a ratio in (0, 1], kept in each layer (``scope="layer"``: ``round(keep * C)``) or over
            all scored layers (``"global"``: the ``round(keep * total)`` best, one threshold); or
            ``{layer: number kept}`` (layers not listed keep all their channels).
        threshold: remove the channels scoring below it.
        Neither: the channels an *exact* criterion marks, with the constants they output (an exact
            plan); a ranking needs ``keep`` or ``threshold``.
        scope: default the criterion's own (L1-norm per layer, Slimming global...).
        model: the model the plan is for (class recorded, channel counts checked); None only for
            criteria that read an analysis (``criterion.needs_model`` False).
        Plans from ``keep`` / ``threshold`` are lossy (``exact = False``) whatever the criterion.
        Every layer keeps at least one channel (its best); ties keep the lower channel index.
        """
        if model is None and criterion.needs_model:
            raise ValueError(f"from_criterion: the {criterion.name} criterion scores a model; got model=None")
        if keep is not None and threshold is not None:
            raise ValueError("from_criterion: give keep or threshold, not both")
        model_class = class_path(model) if model is not None else None
        if keep is None and threshold is None:
            if not criterion.exact:
                raise ValueError(f"from_criterion: {criterion.name} is a ranking, not an exact criterion: give keep= "
                                 "(a ratio or per-layer counts) or threshold=")
            return cls._from_marked(criterion, model, model_class, input_shape)
        if scope not in (None, "layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if scope == "global" and isinstance(keep, Mapping):
            raise ValueError("from_criterion: per-layer counts are per layer; scope='global' does not apply")
        scores = _checked_scores(model, criterion.scores(model))
        if threshold is not None:
            kept, source = _kept_above(scores, threshold), f"{criterion.name}(threshold={threshold:g})"
        elif isinstance(keep, Mapping):
            kept, source = _kept_counts(model, scores, keep, criterion.name), f"{criterion.name}(per-layer counts)"
        else:
            check_keep_ratio(keep)
            scope = criterion.scope if scope is None else scope
            kept = _kept_per_layer(scores, keep) if scope == "layer" else _kept_global(scores, keep)
            source = f"{criterion.name}(keep_ratio={keep:g}{'' if scope == criterion.scope else ', scope=' + scope})"
        layers = {name: LayerPlan(channels=s.numel(), kept=kept[name]) for name, s in scores.items()}
        return cls(layers=layers, exact=False, model_class=model_class, input_shape=_shape_or_none(input_shape),
                   source=source)

    @classmethod
    def _from_marked(cls, criterion, model, model_class, input_shape) -> "PrunePlan":
        """An exact criterion's marked channels removed, with the constants they output."""
        layers, notes = {}, []
        for name, marked in criterion.marked(model).items():
            if model is not None:
                _check_channels(model, name, marked.channels)
            kept = [c for c in range(marked.channels) if c not in marked.values]
            layers[name] = LayerPlan(channels=marked.channels, kept=kept, constants=marked.values)
            notes.extend(marked.notes)
        return cls(layers=layers, exact=True, model_class=model_class, input_shape=_shape_or_none(input_shape),
                   source=f"{criterion.name}(threshold={criterion.threshold:g})", notes=notes)

    @classmethod
    def from_gamma(cls, model: nn.Module, threshold: float = 1e-3, *, input_shape=None, leaf_modules=(),
                   concrete_args=None) -> "PrunePlan":
        """Channels whose BN has |gamma| < ``threshold`` (compared in float64): the exact plan of
        :class:`~sparsekern.prune.criteria.ConstantGamma` (see there). Such a channel's unit
        outputs beta through the rest of its private chain, e.g. relu(beta) (a norm-act module
        such as timm's ``BatchNormAct2d`` is the BN and its activation); a channel whose chain
        does not keep a constant (e.g. a zero-padded average pool) is left out, with a note.
        BatchNorms in no Conv/Linear unit (after a depthwise conv, an add...) are counted in a
        note; a model with BatchNorms none of which is usable warns (never a silent empty plan).
        ``leaf_modules`` / ``concrete_args``: how to trace (``sparsekern._fx.trace_graph``).
        """
        criterion = ConstantGamma(threshold, tuple(leaf_modules or ()), concrete_args)
        plan = cls.from_criterion(criterion, model, input_shape=input_shape)
        plan.source = f"from_gamma(threshold={threshold:g})"
        graph = criteria.ChannelGraph(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
        unused = criteria.unused_batch_norms(graph)
        if unused and not plan.layers:
            note = (f"from_gamma: none of the model's {len(unused)} BatchNorm layers follows a Conv/Linear in a unit "
                    f"the channel analysis can map (e.g. {unused[0]!r}), so the plan is empty; a norm module with "
                    "its activation inside needs sparsekern._types.register_norm_act")
            warnings.warn(note, stacklevel=2)
            plan.notes.append(note)
        elif unused:
            plan.notes.append(f"from_gamma: {len(unused)} BatchNorm layers are in no Conv/Linear unit (after a grouped "
                              f"conv, an add, a concat...) and were not used, e.g. {unused[0]!r}")
        if plan.layers and not plan.num_removed:
            plan.notes.append(f"from_gamma: no channel has |gamma| < {threshold:g}")
        return plan

    @classmethod
    def from_analysis(cls, result, threshold: float = 1e-12, *, input_shape=None) -> "PrunePlan":
        """Channels dead by activation (corpus max < ``threshold``) in a ``sparsekern.analyze``
        result, keyed by the Conv/Linear that produces each feature: the exact plan of
        :class:`~sparsekern.prune.criteria.DeadByActivation` (see there for features without
        such a layer, residual features and two features of one layer)."""
        plan = cls.from_criterion(DeadByActivation(result, threshold), None, input_shape=input_shape)
        plan.source = f"from_analysis(threshold={threshold:g})"
        return plan

    @classmethod
    def from_scores(cls, model: nn.Module, scores: dict, keep_ratio: float, *, scope: str = "layer",
                    input_shape=None) -> "PrunePlan":
        """Keep the highest-scoring channels: a lossy baseline plan (``exact = False``).

        scores: ``{layer: 1-D tensor}``, one score per output channel (e.g. from
        :func:`filter_l1_scores` for Li et al.'s L1-norm pruning, :func:`bn_gamma_scores` for
        Network Slimming). ``keep_ratio`` and ``scope`` as in :meth:`from_criterion`.
        """
        check_keep_ratio(keep_ratio)
        plan = cls.from_criterion(GivenScores(scores), model, keep_ratio, scope=scope, input_shape=input_shape)
        plan.source = f"from_scores(keep_ratio={keep_ratio:g}, scope={scope})"
        return plan

    # --- use -------------------------------------------------------------------------------
    def apply(self, model: nn.Module, example_inputs=None, *, inplace: bool = False, verify: bool = True,
              atol_rel: float = 1e-4, **options) -> nn.Module:
        """The pruned model (a new one unless ``inplace``); see ``prune_model`` for the rest
        (``options``: strict, ignored_layers, leaf_modules, concrete_args)."""
        pruned, _ = prune_model(model, self, example_inputs, verify=verify, atol_rel=atol_rel, inplace=inplace,
                                **options)
        return pruned

    @property
    def num_removed(self) -> int:
        """Channels the plan removes over all layers (from the counts: kept indices are distinct and in range)."""
        return sum(layer.channels - len(layer.kept) for layer in self.layers.values())

    # --- manifest --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The manifest as plain data."""
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "model_class": self.model_class,
            "exact": self.exact,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "source": self.source,
            "notes": list(self.notes),
            "layers": {
                name: {
                    "channels": layer.channels,
                    "kept": list(layer.kept),
                    "constants": {str(c): v for c, v in layer.constants.items()},
                }
                for name, layer in self.layers.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "manifest") -> "PrunePlan":
        """Read a manifest made by :meth:`to_dict`, strictly (see the module docstring).

        Raises ManifestError naming ``source`` (the file) and the JSON path of the first bad field.
        """
        return cls(**_manifest_fields(data, source))

    def save(self, path) -> None:
        """Write the JSON manifest to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "PrunePlan":
        """Read a JSON manifest written by :meth:`save`; ManifestError if it is not a valid one."""
        with open(path, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)  # never more: the file may be anything
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes, the most a prune plan manifest may be")
        try:
            data = json.loads(raw, object_pairs_hook=_object_without_duplicates)
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None
        except RecursionError:  # the C decoder recurses per nesting level and stops itself here, quickly
            raise ManifestError(f"{path}: JSON nested too deeply to be a prune plan manifest") from None
        except ValueError as exc:  # bad JSON, bad UTF-8, an integer of more than 4300 digits
            raise ManifestError(f"{path}: not a JSON prune plan manifest ({exc})") from None
        return cls.from_dict(data, source=str(path))


# --- reading a manifest -----------------------------------------------------------------------


def _object_without_duplicates(pairs: list) -> dict:
    """json's object hook: a repeated key would silently drop a value (e.g. one of two layers)."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise ManifestError(f"duplicate key {json.dumps(key)}")
        result[key] = value
    return result


def _got(value) -> str:
    """A JSON value as an error message shows it."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return f"the string {json.dumps(value[:60])}"
    return json.dumps(value)  # 2.7, true, null


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Reader:
    """Checks of one manifest's values; each failure is a ManifestError '<source>: <JSON path>: <problem>'."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str) -> NoReturn:
        """``where``: the JSON path of the value ('' for the manifest itself)."""
        raise ManifestError(f"{self.source}: {where + ': ' if where else ''}{problem}")

    def expect(self, value, kind, where: str, expected: str):
        ok = _is_int(value) if kind is int else isinstance(value, kind)
        if not ok:
            self.fail(where, f"expected {expected}, got {_got(value)}")
        return value

    def keys(self, obj: dict, allowed: tuple, required: tuple, where: str) -> None:
        unknown = [k for k in obj if k not in allowed]
        if unknown:
            self.fail(where, f"unknown key {json.dumps(unknown[0])}; allowed: {', '.join(allowed)}")
        missing = [k for k in required if k not in obj]
        if missing:
            self.fail(where, f"missing key {json.dumps(missing[0])}")

    def layer(self, entry, where: str) -> LayerPlan:
        self.expect(entry, dict, where, "an object with channels, kept and constants")
        self.keys(entry, _LAYER_KEYS, ("channels", "kept"), where)
        channels = self.expect(entry["channels"], int, f"{where}.channels", "an int")
        if not 1 <= channels <= MAX_CHANNELS:
            self.fail(f"{where}.channels", f"{channels} is outside [1, {MAX_CHANNELS}] (2**24 channels per layer "
                                           "at most: far beyond any real layer, so a corrupt file)")
        kept = self.expect(entry["kept"], list, f"{where}.kept", "an array of channel indices")
        previous = -1
        for i, c in enumerate(kept):
            self.expect(c, int, f"{where}.kept[{i}]", "an int")
            if not 0 <= c < channels:
                self.fail(f"{where}.kept[{i}]", f"{c} is not a channel index in [0, {channels})")
            if c <= previous:
                self.fail(f"{where}.kept[{i}]", f"{c} after {previous}: kept must be increasing, without repeats")
            previous = c
        constants = self.expect(entry.get("constants", {}), dict, f"{where}.constants",
                                "an object {\"channel\": value}")
        kept_set, values = set(kept), {}
        for key, value in constants.items():
            at = f"{where}.constants[{json.dumps(key)}]"
            if not (key.isdecimal() and str(int(key)) == key):
                self.fail(at, "the key must be a channel index written as a decimal int, e.g. \"3\"")
            channel = int(key)
            if channel >= channels or channel in kept_set:
                self.fail(at, f"constants are only for removed channels in [0, {channels})")
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                self.fail(at, f"expected a finite number, got {_got(value)}")
            values[channel] = float(value)
        return LayerPlan(channels=channels, kept=list(kept), constants=values)


def _manifest_fields(data, source: str) -> dict:
    """PrunePlan's keyword arguments from manifest ``data``, every value checked (``_Reader``)."""
    reader = _Reader(source)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{source}: not a prune plan manifest (expected format {MANIFEST_FORMAT!r})")
    version = data.get("version")
    if not _is_int(version) or version != MANIFEST_VERSION:
        raise ManifestError(f"{source}: prune plan manifest version {_got(version)} is not supported "
                            f"(expected {MANIFEST_VERSION})")
    reader.keys(data, _MANIFEST_KEYS, ("layers",), "")
    exact = reader.expect(data.get("exact", True), bool, "exact", "true or false")
    model_class = data.get("model_class")
    if model_class is not None:
        reader.expect(model_class, str, "model_class", "a string or null")
    shape = data.get("input_shape")
    if shape is not None:
        reader.expect(shape, list, "input_shape", "an array of ints or null")
        for i, d in enumerate(shape):
            reader.expect(d, int, f"input_shape[{i}]", "an int")
        if len(shape) < 2 or min(shape) < 1:
            reader.fail("input_shape", f"{shape} is not a full input shape with a batch dim, e.g. [2, 3, 32, 32]")
    source_text = reader.expect(data.get("source", ""), str, "source", "a string")
    notes = reader.expect(data.get("notes", []), list, "notes", "an array of strings")
    for i, note in enumerate(notes):
        reader.expect(note, str, f"notes[{i}]", "a string")
    layers = reader.expect(data["layers"], dict, "layers", "an object {layer name: layer}")
    plans = {}
    for name, entry in layers.items():
        where = f"layers[{json.dumps(name)}]"
        if not name:
            reader.fail(where, "a layer is named by its module's qualified name, never empty")
        plans[name] = reader.layer(entry, where)
    return {"layers": plans, "exact": exact, "model_class": model_class, "input_shape": _shape_or_none(shape),
            "source": source_text, "notes": list(notes)}


# --- keeping the best channels -----------------------------------------------------------------


def _checked_scores(model: Optional[nn.Module], scores: dict) -> dict:
    """``scores`` as 1-D finite float64 CPU tensors, one per output channel of each layer."""
    checked = {}
    for name, s in scores.items():
        s = torch.as_tensor(s).detach().double().cpu()
        if s.dim() != 1:
            raise ValueError(f"scores for layer {name!r} must be 1-D, got shape {tuple(s.shape)}")
        if not torch.isfinite(s).all():
            raise ValueError(f"scores for layer {name!r} contain NaN or Inf")
        if model is not None:
            _check_channels(model, name, s.numel())
        checked[name] = s
    return checked


def check_keep_ratio(keep_ratio) -> None:
    """A keep ratio is a fraction in (0, 1]; ValueError otherwise."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")


def _kept_per_layer(scores: dict, keep_ratio: float) -> dict:
    """Each layer's ``max(1, round(keep_ratio * C))`` best channels."""
    return {name: rank_units(s)[:max(1, int(round(keep_ratio * s.numel())))].tolist() for name, s in scores.items()}


def _kept_global(scores: dict, keep_ratio: float) -> dict:
    """The ``max(1, round(keep_ratio * total))`` best channels of all layers; a layer left
    without any keeps its best."""
    names = list(scores)
    owner = [(n, c) for n in names for c in range(scores[n].numel())]
    flat = torch.cat([scores[n] for n in names])
    keep: dict = {n: [] for n in names}
    for i in rank_units(flat)[:max(1, int(round(keep_ratio * flat.numel())))].tolist():
        keep[owner[i][0]].append(owner[i][1])
    return {n: kept or rank_units(scores[n])[:1].tolist() for n, kept in keep.items()}


def _kept_counts(model, scores: dict, counts: Mapping, who: str) -> dict:
    """Each listed layer's ``counts[layer]`` best channels; the others keep all."""
    unknown = sorted(set(counts) - set(scores))
    if unknown:
        model_name = type(model).__name__ if model is not None else "the model"
        raise ValueError(f"{who}: {unknown} are not prunable unit layers of {model_name} it scores "
                         f"(those are {list(scores)})")
    kept = {}
    for name, s in scores.items():
        count = counts.get(name, s.numel())
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= s.numel():
            raise ValueError(f"{who}: layer {name!r} has {s.numel()} filters; cannot keep {count!r}")
        kept[name] = rank_units(s)[:count].tolist()
    return kept


def _kept_above(scores: dict, threshold) -> dict:
    """Each layer's channels scoring at least ``threshold``, or its best one if none does."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return {name: torch.nonzero(s >= threshold).flatten().tolist() or rank_units(s)[:1].tolist()
            for name, s in scores.items()}


# --- validation helpers -----------------------------------------------------------------------


def _bool_mask(mask, what: str) -> torch.Tensor:
    t = torch.as_tensor(mask)
    if t.dtype != torch.bool:
        raise TypeError(f"{what} must be a bool tensor (True = dead), got dtype {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{what} must be 1-D and non-empty, got shape {tuple(t.shape)}")
    return t.cpu()


def _channel_index(value, what: str) -> int:
    """A channel index as an int: ints, numpy / torch integers; never a float or a bool (no silent rounding)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what}: channel indices must be ints, got {value!r}") from None


def _check_channels(model: nn.Module, name: str, count: int) -> None:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"layer {name!r} is not a module of {type(model).__name__}") from None
    size = getattr(m, "out_channels", None) or getattr(m, "out_features", None) or getattr(m, "num_features", None)
    if size is not None and size != count:
        raise ValueError(f"layer {name!r} has {size} output channels, but {count} values were given")


def _shape_or_none(shape) -> Optional[tuple]:
    if shape is None:
        return None
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be a full input shape with a batch dim, e.g. (2, 3, 32, 32), got {shape}")
    return shape


# The baseline score functions live with the criteria now.
__getattr__ = deprecated_names(__name__, {"filter_l1_scores": criteria.filter_l1_scores,
                                          "bn_gamma_scores": criteria.bn_gamma_scores})
