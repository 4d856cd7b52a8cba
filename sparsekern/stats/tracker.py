"""SparsityTracker: measure the post-activation features of a model while it trains.

    tracker = SparsityTracker(model)              # hooks every BN -> activation feature
    for epoch in range(epochs):
        tracker.reset()                           # epoch-wise statistics
        for x, y in loader:
            loss = criterion(model(x), y); ...    # every forward is measured (see `every`)
        print(tracker.report())

Forward hooks feed one ChannelStats per feature (see ``sparsekern.stats.features``):

* a ReLU module is hooked directly; its output is the post-ReLU map (in-place or not: the
  hook runs before anything downstream can change it);
* a functional activation (``F.relu(self.bn(x))``, ``F.silu``, ``F.leaky_relu(x, 0.2)``...) is
  measured by hooking the producer module (BN / conv / linear) and applying the activation, with
  the call's constant arguments, to a copy of its output: the model's own tensors are never
  modified;
* a norm-then-activation module (timm's BatchNormAct2d) is hooked directly: its output is the
  activation's;
* a feature whose channels are the last dim (a Linear's output, ``Feature.channel_dim == -1``)
  is measured with that dim moved to dim 1 (a view, no copy);
* a ReLU module used several times per forward (torchvision's BasicBlock) has one feature per
  call: a forward pre-hook on the model resets a per-forward call counter, and the counter
  says which feature a call belongs to. Calling a submodule directly, outside the model's own
  forward, therefore does not count as a measured forward.

Measuring runs under ``torch.no_grad()`` on detached tensors, and never synchronises with the
host (no ``.item()``, no host copies): on a GPU, training keeps its asynchrony.

torch.compile: the hooks trace into the model's graph (``torch.compile(model, fullgraph=True)``
compiles with no graph break). The step counter and the ``every=k`` decision are 0-dim CPU
tensors updated in place (``steps`` reads the counter), every feature's update is one registered
op (``torch.ops.sparsekern.channel_stats_update_``) that mutates the statistics in place and skips
the batch when the decision says so, and the per-forward call numbering is Python that runs at
trace time (the same every forward). Limits: selectivity "histogram" and "none" only ("exact" /
"memmap" / ``checksums=True`` raise under compile); the first compiled forward after construction
or ``reset()`` traces the allocation of the statistics and the next one compiles the steady
state (two graphs, both cached: later resets recompile nothing); calling ``step()`` for the first
time recompiles once (forwards stop advancing the counter); a ReLU module found without a graph
that is called more often than its features say (fallback features numbered at run time) adds
features while tracing, which is untested under compile; under compile with ``every > 1`` the
skipped steps still pay for a functional feature's activation copy (the kernel itself is skipped).
Dynamo does not guard on module hooks by default (``torch._dynamo.config.skip_nnmodule_hook_guards``):
a process that compiles another instance of the same model class without the tracker's hooks (or
before the tracker was made) may run that hook-free graph for the tracked model, which then
measures nothing. Make the tracker before compiling, and set that flag to False (or call
``torch._dynamo.reset()``) when several instances are compiled in one process.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn as nn

from sparsekern.errors import StateDictError
from sparsekern.stats.channel_stats import ChannelStats
from sparsekern.stats.features import Feature, find_features, unwrap_model
from sparsekern.stats.report_table import SparsityReport, build_report, gamma_sparsity
from sparsekern.stats.stores import MODES

__all__ = ["SparsityTracker", "SparsityReport", "gamma_sparsity"]


# The clamp bounds of the activation modules fuse_activations applies in the measuring kernel.
_CLAMP_BOUNDS = {
    nn.ReLU: lambda m: (0.0, float("inf")),
    nn.ReLU6: lambda m: (0.0, 6.0),
    nn.Hardtanh: lambda m: (float(m.min_val), float(m.max_val)),
}


class SparsityTracker:
    """Per-feature post-ReLU statistics of ``model``, collected by forward hooks.

    ``selectivity``: the ChannelStats mode ("histogram" | "exact" | "memmap" | "none");
    "memmap" writes one file per feature into ``memmap_dir`` (temporary files when None).
    ``features``: the features to measure (default: ``find_features(model)``).
    ``every``: measure one step in every ``every`` steps (steps 0, every, 2 * every, ...).
    A step is one forward of the model, unless ``step()`` is called: from then on only
    ``step()`` advances it (e.g. one optimizer step over several accumulated forwards).
    ``backend`` goes to ``channel_absmax``. ``checksums``: every ChannelStats keeps one checksum
    per measured forward (``ChannelStats.batch_checksums``; analyze compares two passes with them).
    ``leaf_modules``: classes or qualified names of modules torch.fx must not trace into (passed to
    ``find_features``; ignored when ``features`` is given).
    ``fuse_activations``: run every measured nn.ReLU / nn.ReLU6 / nn.Hardtanh module through
    ``ChannelStats.update_clamped`` in no-grad forwards of CPU float32 activations (its forward is
    replaced until ``remove()``):
    the clamp and the statistics in one pass over the activation instead of a clamp pass and a
    measuring pass, with the same output bits. ``analyze`` uses it; forwards under autograd or
    torch.compile take the module's own forward and the hook's path.
    """

    def __init__(self, model: nn.Module, *, selectivity: str = "histogram", features=None, every: int = 1,
                 backend: str = "auto", memmap_dir=None, checksums: bool = False, leaf_modules=(),
                 fuse_activations: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"SparsityTracker: expected an nn.Module, got {type(model).__name__}")
        if selectivity not in MODES:
            raise ValueError(f"SparsityTracker: unknown selectivity mode {selectivity!r}; expected one of {MODES}")
        if memmap_dir is not None and selectivity != "memmap":
            raise ValueError("SparsityTracker: memmap_dir only applies to selectivity='memmap'")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"SparsityTracker: every must be a positive int, got {every!r}")
        self.model = model
        self.network = unwrap_model(model)  # hooks go on the wrapped network of a DDP model
        self.selectivity_mode = selectivity
        self.memmap_dir = memmap_dir
        self.backend = backend
        self.checksums = checksums
        self.every = every
        features = find_features(self.network, leaf_modules=leaf_modules) if features is None else list(features)
        if not features:
            raise ValueError(
                f"SparsityTracker: {type(self.network).__name__} has no activation feature to measure (no ReLU, "
                "SiLU, GELU... after a layer; see sparsekern._types.register_activation for other classes)"
            )
        modules = dict(self.network.named_modules())
        for f in features:
            if not isinstance(f, Feature):
                raise TypeError(f"SparsityTracker: features must be Feature objects, got {type(f).__name__}")
            if f.hook_module_name not in modules:
                raise ValueError(f"SparsityTracker: feature {f.name!r} hooks module {f.hook_module_name!r}, "
                                 f"which {type(self.network).__name__} does not have")
        if len({f.name for f in features}) != len(features):
            raise ValueError("SparsityTracker: feature names must be unique")

        self.features: list[Feature] = []
        self.stats: dict[str, ChannelStats] = {}
        # hooked module -> {call index -> features measured on that call}; the key None holds
        # fallback templates whose calls are numbered at run time (see _output_hook).
        self._routes: dict[str, dict] = {}
        for f in features:
            self._add_feature(f)
        # 0-dim CPU tensors, changed in place by the hooks (compile-friendly, no host sync on a GPU):
        # the step counter, and whether the current forward is measured.
        self._step = torch.zeros((), dtype=torch.int64)
        self._measuring = torch.zeros((), dtype=torch.bool)
        self._manual_steps = False
        self._calls: dict[str, int] = {}
        self._handles = [self.network.register_forward_pre_hook(self._on_model_forward)]
        self._fused: list[nn.Module] = []  # modules whose forward is _fused_forward's until remove()
        for name in self._routes:
            if fuse_activations and self._clamp_module(name, modules[name]):
                modules[name].forward = self._fused_forward(name, modules[name])
                self._fused.append(modules[name])
            else:
                self._handles.append(modules[name].register_forward_hook(self._output_hook(name)))

    # --- hooks ---------------------------------------------------------------------------

    def _add_feature(self, f: Feature) -> None:
        self._routes.setdefault(f.hook_module_name, {}).setdefault(f.call_index, []).append(f)
        if f.call_index is None:
            return  # a fallback template: the features are made per call at run time
        path = None
        if self.memmap_dir is not None:
            os.makedirs(self.memmap_dir, exist_ok=True)
            path = os.path.join(self.memmap_dir, f.name.replace("/", "_") + ".f32")
        self.features.append(f)
        self.stats[f.name] = ChannelStats(selectivity=self.selectivity_mode, memmap_path=path, backend=self.backend,
                                          checksums=self.checksums)

    @property
    def steps(self) -> int:
        """Steps counted so far (forwards, or ``step()`` calls once it was called)."""
        return int(self._step)

    @steps.setter
    def steps(self, value: int) -> None:
        self._step.fill_(value)

    def _on_model_forward(self, module, args) -> None:
        self._calls = {}
        self._measuring.copy_(torch.remainder(self._step, self.every) == 0)
        if not self._manual_steps:
            self._step.add_(1)

    def _next_call(self, module_name: str) -> list[Feature] | None:
        """Count one call of the hooked module; the features it feeds, or None when this forward
        is not measured or the call feeds none."""
        routes = self._routes[module_name]
        call = self._calls.get(module_name, 0)
        self._calls[module_name] = call + 1
        # Eager: skip at once (a CPU tensor, no sync). Compiled: the update op reads the flag.
        if not torch.compiler.is_compiling() and not bool(self._measuring):
            return None
        features = routes.get(call)
        if features is None:
            if None not in routes:
                return None  # a call the traced graph has no feature for (not a ReLU input)
            features = [self._fallback_feature(routes[None][0], call)]
            self._add_feature(features[0])
        return features

    def _measure(self, module_name: str, features: list[Feature], output) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"SparsityTracker: module {module_name!r} returned a {type(output).__name__}, "
                            "expected the activation tensor")
        with torch.no_grad():
            y = output.detach()
            for f in features:
                a = f.apply(y) if f.functional else y
                if f.channel_dim != 1 and a.dim() > 2:
                    a = a.movedim(f.channel_dim, 1)  # channels last (a Linear's output): a view
                self.stats[f.name].update(a, enabled=self._measuring)

    def _output_hook(self, module_name: str):
        def hook(module, args, output):
            features = self._next_call(module_name)
            if features:
                self._measure(module_name, features, output)

        return hook

    def _clamp_module(self, module_name: str, module: nn.Module) -> bool:
        """Whether the clamp of this module can be applied by the measuring kernel (see
        ``fuse_activations``): a plain ReLU / ReLU6 / Hardtanh whose calls feed one feature each,
        measured as is (no functional activation on top, channels in dim 1)."""
        routes = self._routes[module_name]
        return (type(module) in _CLAMP_BOUNDS and "forward" not in vars(module) and None not in routes
                and all(len(fs) == 1 and not fs[0].functional and fs[0].channel_dim == 1 for fs in routes.values()))

    def _fused_forward(self, module_name: str, module: nn.Module):
        """The module's forward with the clamp and the statistics of its output in one kernel pass.
        The same output bits as the module's own forward (torch.clamp's semantics); under autograd,
        torch.compile, off the CPU, for other dtypes or for a call that is not measured, the module's
        own forward and the hook's path instead."""
        own_forward = type(module).forward
        lo, hi = _CLAMP_BOUNDS[type(module)](module)

        def forward(input):
            features = self._next_call(module_name)
            # The fused kernel is the CPU float32 one; elsewhere the module's own forward keeps its
            # exact bits (a GPU's relu and clamp need not agree on -0.0).
            if (features and isinstance(input, torch.Tensor) and input.device.type == "cpu"
                    and input.dtype == torch.float32 and not torch.is_grad_enabled()
                    and not torch.compiler.is_compiling()):
                return self.stats[features[0].name].update_clamped(input, lo, hi, inplace=module.inplace)
            output = own_forward(module, input)
            if features:
                self._measure(module_name, features, output)
            return output

        return forward

    @staticmethod
    def _fallback_feature(base: Feature, call: int) -> Feature:
        """The feature of call ``call`` of a ReLU module found without a graph. Only its first
        call is the one registration order paired with a BN; what feeds a later call is unknown."""
        if call == 0:
            return dataclasses.replace(base, call_index=0)
        return dataclasses.replace(base, name=f"{base.relu_target}:{call}", call_index=call, producer_module_name=None,
                                   bn_module_name=None, layer_module_name=None, kind="other")

    # --- control -------------------------------------------------------------------------

    def step(self) -> None:
        """Advance the step counter by one; from now on forwards no longer advance it."""
        self._manual_steps = True
        self._step.add_(1)

    def reset(self) -> None:
        """Forget every sample (e.g. at the start of an epoch); the hooks stay."""
        for s in self.stats.values():
            s.reset()

    def remove(self) -> None:
        """Remove every hook from the model; the statistics stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self._fused:
            del module.forward  # back to the class's forward
        self._fused = []

    def __enter__(self) -> "SparsityTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # --- results -------------------------------------------------------------------------

    def report(self, activation_thresholds=(1e-12, 1e-4), gamma_thresholds=(1e-3, 1e-2),
               selectivity_threshold: float = 1e-3, constant_thresholds=(1e-6,)) -> SparsityReport:
        """Per-layer and total sparsity of what was measured (see ``SparsityReport``), with each
        feature's activation and its "constant by activation" counts.

        Selectivity is left out with ``selectivity="none"``.
        """
        return build_report(
            self.network, self.features, self.stats,
            activation_thresholds=activation_thresholds, gamma_thresholds=gamma_thresholds,
            selectivity_threshold=None if self.selectivity_mode == "none" else selectivity_threshold,
            constant_thresholds=constant_thresholds,
        )

    def state_dict(self) -> dict:
        """Features, step counter and every ChannelStats' state (for checkpoints)."""
        return {
            "format": 1,
            "features": [dataclasses.asdict(f) for f in self.features],
            "steps": self.steps,
            "manual_steps": self._manual_steps,
            "stats": {name: s.state_dict() for name, s in self.stats.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore what ``state_dict`` saved into a tracker on the same model.

        The whole state is checked before anything changes: a malformed or inconsistent one
        raises StateDictError (naming the layer and field) and leaves the tracker as it was.
        """
        new_features = self._check_state_dict(sd)
        for feature in new_features:
            self._add_feature(feature)  # a fallback feature numbered at run time
        for name, s in self.stats.items():
            s.load_state_dict(sd["stats"][name])
        self.steps, self._manual_steps = sd["steps"], sd["manual_steps"]

    def _check_state_dict(self, sd: dict) -> list[Feature]:
        """Raise StateDictError unless ``sd`` fits this tracker; returns the fallback features it
        adds (features numbered at run time that this tracker has not made yet)."""
        where = "SparsityTracker.load_state_dict"
        if not isinstance(sd, dict) or sd.get("format") != 1:
            raise StateDictError(f"{where}: not a SparsityTracker state dict (format 1)")
        fields = {"format", "features", "steps", "manual_steps", "stats"}
        if set(sd) != fields:
            raise StateDictError(f"{where}: expected the fields {sorted(fields)}, got {sorted(sd)}")
        steps = sd["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise StateDictError(f"{where}: field 'steps' must be a non-negative int, got {steps!r}")
        if not isinstance(sd["manual_steps"], bool):
            raise StateDictError(f"{where}: field 'manual_steps' must be a bool, got {sd['manual_steps']!r}")
        if not isinstance(sd["features"], list) or not isinstance(sd["stats"], dict):
            raise StateDictError(f"{where}: field 'features' must be a list and 'stats' a dict")
        saved = [_saved_feature(entry, where) for entry in sd["features"]]
        names = [f.name for f in saved]
        if len(set(names)) != len(names):
            raise StateDictError(f"{where}: field 'features' names a feature twice: {names}")
        if set(sd["stats"]) != set(names):
            raise StateDictError(f"{where}: field 'stats' has statistics for {sorted(sd['stats'])}, "
                                 f"field 'features' lists {sorted(names)}")
        missing = set(self.stats) - set(names)
        if missing:
            raise StateDictError(f"{where}: the state has no statistics for {sorted(missing)}")
        new_features = []
        for feature in saved:
            if feature.name in self.stats:
                own = next(f for f in self.features if f.name == feature.name)
                if feature != own:
                    differ = [f"{k.name} ({getattr(feature, k.name)!r} in the state, {getattr(own, k.name)!r} here)"
                              for k in dataclasses.fields(Feature) if getattr(feature, k.name) != getattr(own, k.name)]
                    raise StateDictError(f"{where}: feature {feature.name!r} differs from this tracker's in "
                                         f"{', '.join(differ)}: a state of another model?")
                probe = self.stats[feature.name]
            elif None in self._routes.get(feature.hook_module_name, {}):
                new_features.append(feature)
                probe = ChannelStats(selectivity=self.selectivity_mode, backend=self.backend)
            else:
                raise StateDictError(f"{where}: this tracker has no feature {feature.name!r}")
            try:
                probe.check_state_dict(sd["stats"][feature.name])
            except StateDictError as exc:
                raise StateDictError(f"{where}: layer {feature.name!r}: {exc}") from None
        return new_features


def _saved_feature(entry, where: str) -> Feature:
    """A Feature from its state_dict form (a dict of its fields)."""
    try:
        return Feature(**entry)
    except (TypeError, ValueError) as exc:
        raise StateDictError(f"{where}: field 'features' holds an invalid feature {entry!r}: {exc}") from None
