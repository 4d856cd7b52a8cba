"""One table of filter-pruning methods on BasicNet / Fashion-MNIST: how many filters each can
remove with no accuracy loss, and what the pruned network costs and runs at.

    sparsekern compare-methods --out runs/method-table
    sparsekern compare-methods --out /tmp/mt --quick --dataset synthetic
    sparsekern compare-methods --aggregate runs/mt-s0,runs/mt-s1,runs/mt-s2 --out runs/mt   # mean ± std over seeds

Four BasicNets are trained (one seed, the same width, data and step budget), and the methods
prune them, without fine-tuning (nine rows):

    implicit     Adam + L2 (the reproduction's run): remove the filters implicit sparsity left
                 dead, exactly: dead by activation over the training corpus or |gamma| < 1e-3
                 (prune.implicit.implicit_plan, by="both"); one point, its fraction is what it is
    L1-norm      the same Adam + L2 network, Li et al. 2017: per layer, the filters of smallest
                 weight L1 norm, the same fraction in every layer
    Slimming     Adam + Network Slimming's L1 penalty on the BN gammas, Liu et al. 2017: the
                 smallest |gamma| under one global threshold
    CGES         momentum SGD + CGES's prox steps (Yoon and Hwang 2017): globally, first the filters that
                 are exactly zero (all their conv weights 0, or every weight of the next layer
                 that reads them 0), then the smallest |gamma| (:func:`cges_scores`)
    Split LBI    group Split LBI (conv filters, Linear rows; Fu et al.): per layer, the filters
                 that entered Gamma's support last (``SplitLBI.importance``), the same fraction
                 in every layer
    APoZ         the same Adam + L2 network, Hu et al. 2016 ("Network Trimming"): per layer, the
                 filters whose post-ReLU outputs are most often 0 over the training corpus
    selectivity  the same Adam + L2 network, the paper's corollary: per layer, the most selective
                 filters first (max below 1e-3 x the corpus max on the most training images;
                 :class:`sparsekern.prune.criteria.Selectivity`)
    APoZ, global / selectivity, global   the same two scores (fractions, comparable between layers)
                 under one threshold over all layers: dead filters (APoZ 1, selectivity 1) go first

``--methods`` restricts the swept rows (the implicit row is always there); a training no chosen
method needs is not run, e.g. ``--methods l1-norm,apoz,selectivity`` trains the Adam + L2 network
only. APoZ and selectivity come from one analysis of that network over the corpus the implicit
plan is measured on (``analyze_samples``), selectivity by its two passes (exact counts).

Every method removes filters of the same layers, the Conv layers followed by a BN
(``prune.baselines.unit_layers``; the classifier is never pruned), by surgery
(``prune.surgery.prune_model``); the baselines' plans are lossy (``exact=False``: surgery checks
that the pruned network equals the original with the removed filters zeroed). Every layer
keeps at least one filter. Per-layer counts are ``max(1, round(keep * filters))``, so the
filters actually removed (from the surgery report) can differ slightly from the nominal fraction.

Choosing the fraction without looking at the reported accuracy: the test split is cut in two.
On the first half (selection), each swept method takes the largest fraction of ``fractions``
whose pruned accuracy is at least the dense accuracy minus ``tolerance_pct`` points
(:func:`select_fraction`); the table reports accuracies on the second half only. The implicit row
is not swept; its selection-half check is recorded too (``within_tolerance``), and its logits are
compared with the dense network's on the report half (an activation-dead filter on the
training corpus need not be dead on test images).

Columns: filters removed (% of the unit layers' filters), dense and pruned test accuracy
(report half), params and FLOPs (2 x Conv/Linear MACs per 1x28x28 image) of the pruned network,
and its measured speed: milliseconds per batch of ``speed_batch``, every pruned network and
every dense network timed side by side in one interleaved ``time_models`` call (BN folded,
channels_last, float32 on CPU / float16 on CUDA, eager), with the speedup over its own dense
network.

Settings: the Adam + L2 run is exactly the reproduction's (``scripts/reproduce.py``: width
0.25, batch 20, 2 epochs = 6000 steps, eval every 500 steps, Adam lr 2e-3, L2 2e-3, the
default final analysis), so ``--reuse-runs`` can point at the directory holding it and it is
not trained again; the Slimming run is ``experiments.harvest.slimming_config`` of it (strength 1e-4),
likewise reusable. CGES trains with momentum SGD (lr 0.02, the reproduction's SGD lr), as in its
paper: its prox thresholds are ``lr * lambda * mu`` per step, which Adam's ~lr-sized steps on every
weight would swamp. ``cges_strength`` (5e-3, the value cges_vs_l2 checked on LeNet-5) and Split
LBI's settings (lr 0.02, momentum 0.9, kappa 1, nu 20 as in the keep-ratio table) are documented
choices, not tuned for this network; an untuned method may simply sparsify little in this budget.

Files in ``out_dir``: ``runs/`` (trainings not found in ``reuse_runs``; reused on rerun),
``plans/<method>.json`` (the chosen PrunePlan of each method: ``PrunePlan.load(...).apply(model)``
rebuilds the pruned network from the run's checkpoint), ``method_table.json`` (everything,
including each method's accuracy curve over the fractions on both halves), ``method_table.md``
and ``method_table.csv``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sparsekern.bench.speed import inference_model
from sparsekern.bench.timing import time_models
from sparsekern.data import first_samples, make_loader, run_dataset, sample_range
from sparsekern.errors import ConfigError
from sparsekern.experiments import ExperimentCommand, check_positive, load_run, option, train_runs, write_text
from sparsekern.experiments.harvest import accuracy, first_batch
from sparsekern.experiments.method_table_output import OUTPUT_STEM, write_outputs
from sparsekern.experiments.method_table_seeds import SEEDS_STEM, aggregate_markdown, aggregate_tables
from sparsekern.prune.baselines import l1_norm_plan, slimming_plan, unit_layers
from sparsekern.prune.compare import compare_logits, unit_keep_ratio
from sparsekern.prune.criteria import APoZ, CGES, Selectivity, SplitLBIOrder
from sparsekern.prune.flops import count_flops, count_params
from sparsekern.prune.implicit import implicit_plan
from sparsekern.prune.plan import PrunePlan
from sparsekern.prune.surgery import prune_model
from sparsekern.stats.analyze import analyze
from sparsekern.train.config import RunConfig
from sparsekern.train.loop import resolve_device
from sparsekern.train.sweep import is_finished

PLANS_DIR = "plans"
TRAININGS = ("adam-l2", "slimming", "cges", "slbi-group")
DEFAULT_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(20))  # 0, 0.05, ..., 0.95


@dataclass(frozen=True)
class Method:
    """One row: which trained network it prunes and how it ranks the filters."""

    key: str  # json key and plan file name
    label: str
    training: str  # one of TRAININGS
    ranking: str


METHODS = {m.key: m for m in (
    Method("implicit", "implicit sparsity", "adam-l2",
           "dead by activation over the training corpus or |gamma| < 1e-3, removed exactly (one point)"),
    Method("l1-norm", "L1-norm (Li et al.)", "adam-l2", "smallest filter L1 norm, same fraction per layer"),
    Method("slimming", "Network Slimming", "slimming", "smallest |gamma|, one global threshold"),
    Method("cges", "CGES", "cges", "exactly-zero / unread filters first, then smallest |gamma|, global"),
    Method("split-lbi", "Split LBI (group)", "slbi-group",
           "last to enter Gamma's support (then smaller ||Gamma||, ||W||), same fraction per layer"),
    Method("apoz", "APoZ (Hu et al.)", "adam-l2",
           "most zeros after ReLU over the training corpus first, same fraction per layer"),
    Method("selectivity", "selectivity", "adam-l2",
           "most selective over the training corpus first (max < 1e-3 x corpus max on the most images), "
           "same fraction per layer"),
    Method("apoz-global", "APoZ, global", "adam-l2", "most zeros after ReLU first, one threshold over all layers"),
    Method("selectivity-global", "selectivity, global", "adam-l2",
           "most selective first, one threshold over all layers"),
)}
SWEPT = tuple(key for key in METHODS if key != "implicit")
NEEDS_ANALYSIS = ("apoz", "selectivity", "apoz-global", "selectivity-global")  # scores of an analysis


@dataclass(frozen=True)
class MethodTableConfig:
    """Everything the method table does; every field is also a ``sparsekern compare-methods`` flag."""

    out_dir: str = option("runs/method-table", "output directory (trained runs, plans, tables)")
    dataset: str = option("fashion-mnist", "dataset (sparsekern.data name)")
    data_root: str | None = option(None, "dataset directory (default: the data module's search path)")
    width: float = option(0.25, "BasicNet width multiplier (0.25: 16..128 channels)")
    batch_size: int = option(20, "mini-batch size of every run")
    epochs: int = option(2, "training epochs per run")
    steps: int | None = option(None, "step budget per run; overrides --epochs")
    eval_every: int | None = option(500, "evaluate + checkpoint every N steps")
    seed: int = option(0, "training seed (one network per training)")
    adam_lr: float = option(2e-3, "learning rate of the Adam runs (implicit / L1-norm, Slimming)")
    l2_strength: float = option(2e-3, "implicit / L1-norm: L2 lambda of the Adam run")
    slimming_strength: float = option(1e-4, "Network Slimming: L1 strength on the BN gammas")
    cges_lr: float = option(0.02, "CGES: learning rate of its momentum SGD (the reproduction's SGD lr)")
    cges_strength: float = option(5e-3, "CGES: lambda of the prox steps (untuned)")
    slbi_lr: float = option(0.02, "Split LBI: learning rate alpha (momentum 0.9 on the loss gradient; untuned)")
    slbi_kappa: float = option(1.0, "Split LBI: kappa")
    slbi_nu: float = option(20.0, "Split LBI: nu (untuned)")
    tolerance_pct: float = option(0.5, "accuracy loss allowed when choosing a fraction (points of %)")
    fractions: tuple[float, ...] = option(DEFAULT_FRACTIONS, "fractions of the filters removed, swept per method")
    speed_batch: int = option(256, "batch size of the speed measurement")
    speed_rounds: int = option(15, "interleaved timing rounds (median)")
    reuse_runs: tuple[str, ...] = option((), "run directories' parents searched for finished runs of the same "
                                             "id before training (e.g. docs/results/harvest/runs)")
    num_train_samples: int | None = option(None, "train on the first N training samples only")
    num_test_samples: int | None = option(None, "evaluate on the first N test samples only (split in two halves)")
    analyze_samples: int | None = option(None, "samples of each run's final analysis, and of the implicit "
                                               "plan's dead-filter analysis (default: all)")
    eval_batch_size: int = option(1000, "batch size of evaluations")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    threads: int | None = option(None, "torch threads per run and for the measurements (default: torch's)")
    workers: int = option(1, "runs trained in parallel (subprocesses)")
    methods: tuple[str, ...] = option(SWEPT, "swept methods (the implicit row is always measured); trainings "
                                             "no chosen method needs are not run")

    def __post_init__(self):
        check_positive(self, ("width", "batch_size", "epochs", "steps", "eval_every", "adam_lr", "l2_strength",
                              "slimming_strength", "cges_lr", "cges_strength", "slbi_lr", "slbi_kappa", "slbi_nu",
                              "speed_batch", "speed_rounds", "num_train_samples", "num_test_samples",
                              "analyze_samples", "eval_batch_size", "threads", "workers"))
        tol = self.tolerance_pct
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise ConfigError(f"tolerance_pct={tol!r}: must be a finite number >= 0 (points of accuracy)")
        if not self.fractions or len(set(self.fractions)) != len(self.fractions):
            raise ConfigError(f"fractions={self.fractions!r}: expected distinct fractions")
        for f in self.fractions:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
                raise ConfigError(f"fractions={self.fractions!r}: {f!r} is not a fraction of filters removed "
                                  "in [0, 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r}: must be an int >= 0")
        if isinstance(self.reuse_runs, str):
            raise ConfigError(f"reuse_runs={self.reuse_runs!r}: expected a tuple of directories")
        if isinstance(self.methods, str) or len(set(self.methods)) != len(self.methods) or \
                not set(self.methods) <= set(SWEPT):
            raise ConfigError(f"methods={self.methods!r}: expected distinct methods of {', '.join(SWEPT)}")

    def trainings(self) -> tuple[str, ...]:
        """The trainings the chosen methods prune, in TRAININGS order (the implicit row's always)."""
        needed = {"adam-l2"} | {METHODS[key].training for key in self.methods}
        return tuple(t for t in TRAININGS if t in needed)

    def quick(self) -> "MethodTableConfig":
        """A tiny version for tests and smoke runs: width 0.125, 30 steps on 512 samples, 4 fractions."""
        return replace(self, width=0.125, epochs=1, steps=30, batch_size=32, eval_every=None,
                       num_train_samples=512, num_test_samples=256, analyze_samples=64, eval_batch_size=256,
                       fractions=(0.0, 0.25, 0.5, 0.75), speed_batch=32, speed_rounds=3)

    def run_config(self, training: str):
        """The sparsekern.train RunConfig of one training (see TRAININGS).

        Fields not set here keep RunConfig's defaults (momentum 0.9, constant lr, two-pass final
        analysis), as the reproduction's runs did: the Adam + L2 run's id is theirs."""
        common = dict(model="basicnet", dataset=self.dataset, data_root=self.data_root, width=self.width,
                      batch_size=self.batch_size, epochs=self.epochs, steps=self.steps, eval_every=self.eval_every,
                      seed=self.seed, analyze_samples=self.analyze_samples,
                      num_train_samples=self.num_train_samples, num_test_samples=self.num_test_samples,
                      eval_batch_size=self.eval_batch_size, device=self.device, threads=self.threads,
                      out_dir=str(Path(self.out_dir) / "runs"))
        adam = dict(common, optimizer="adam", lr=self.adam_lr)
        if training == "adam-l2":
            return RunConfig(**adam, reg="l2", reg_strength=self.l2_strength)
        if training == "slimming":
            return RunConfig(**adam, reg="slimming", reg_strength=self.slimming_strength)
        if training == "cges":
            # Momentum SGD, as in the CGES paper and `cges-vs-l2`: the prox thresholds are
            # lr * lambda * mu per step, which Adam's ~lr-sized steps on every weight would swamp.
            return RunConfig(**common, optimizer="momentum", lr=self.cges_lr, reg="cges",
                             reg_strength=self.cges_strength)
        if training == "slbi-group":
            return RunConfig(**common, optimizer="slbi-group", lr=self.slbi_lr, slbi_kappa=self.slbi_kappa,
                             slbi_nu=self.slbi_nu, reg="none")
        raise ValueError(f"unknown training {training!r}; expected one of {', '.join(TRAININGS)}")

    def training_label(self, training: str) -> str:
        return {
            "adam-l2": f"Adam lr {self.adam_lr:g} + L2 {self.l2_strength:g}",
            "slimming": f"Adam lr {self.adam_lr:g} + slimming {self.slimming_strength:g}",
            "cges": f"momentum SGD lr {self.cges_lr:g} + CGES {self.cges_strength:g}",
            "slbi-group": f"Split LBI group, lr {self.slbi_lr:g}, kappa {self.slbi_kappa:g}, nu {self.slbi_nu:g}",
        }[training]


# ---------------------------------------------------------------------- choosing a fraction
def select_fraction(points, reference: float, tolerance: float):
    """The largest fraction whose accuracy is >= ``reference - tolerance`` (None if none is).

    points: ``(fraction, accuracy)`` pairs, in any order; accuracies and tolerance in the same
    units (here % and points of %). Not assumed monotone: the largest qualifying fraction wins.
    """
    ok = [fraction for fraction, accuracy in points if accuracy >= reference - tolerance]
    return max(ok) if ok else None


# ---------------------------------------------------------------------- plans
# The criteria live in sparsekern.prune.criteria; these are the table's plan makers over them.
def _layer_filters(model: nn.Module, layers) -> int:
    return sum(model.get_submodule(n).weight.shape[0] for n in layers)


def _basicnet_batch(model: nn.Module) -> tuple:
    """The input shape the channel graph traces the table's networks with when no batch is given:
    one 28x28 image of the first unit layer's input channels. A BasicNet's global pool makes its
    channel maps the same at every input size its pools keep above 0."""
    layers = unit_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv/Linear followed by a BN: nothing to rank")
    return (1, model.get_submodule(layers[0]).in_channels, 28, 28)


def cges_scores(model: nn.Module, example_inputs=None) -> dict:
    """``{unit layer: score per filter}`` of :class:`sparsekern.prune.criteria.CGES` (zero or
    unread filters first, then |gamma|), higher = kept first. ``example_inputs``: a batch or an
    input shape for the channel graph (default: :func:`_basicnet_batch`)."""
    return CGES(_basicnet_batch(model) if example_inputs is None else example_inputs).scores(model)


def cges_plan(model: nn.Module, keep_ratio: float, example_inputs=None) -> PrunePlan:
    """Keep the ``round(keep_ratio * filters)`` best filters of :func:`cges_scores` over all unit
    layers (every layer keeps at least its best); a lossy plan."""
    criterion = CGES(_basicnet_batch(model) if example_inputs is None else example_inputs)
    return PrunePlan.from_criterion(criterion, model, keep_ratio)


def slbi_plan(model: nn.Module, optimizer, keep_ratio: float) -> PrunePlan:
    """Per unit layer, keep the ``max(1, round(keep_ratio * filters))`` filters Split LBI ranks
    first (:class:`sparsekern.prune.criteria.SplitLBIOrder`: earliest entry into Gamma's
    support); a lossy plan."""
    return PrunePlan.from_criterion(SplitLBIOrder(optimizer), model, keep_ratio)


def plan_maker(method: str, model: nn.Module, optimization, example_inputs=None, analysis=None) -> Callable:
    """keep ratio -> PrunePlan of a swept method (``example_inputs``: CGES's channel graph batch;
    ``analysis``: the ``analyze`` result APoZ and selectivity score, with two-pass selectivity)."""
    if method == "l1-norm":
        return lambda keep: l1_norm_plan(model, keep)
    if method == "slimming":
        return lambda keep: slimming_plan(model, keep)
    if method == "cges":
        return lambda keep: cges_plan(model, keep, example_inputs)
    if method == "split-lbi":
        return lambda keep: slbi_plan(model, optimization.optimizer, keep)
    if method in NEEDS_ANALYSIS:
        if analysis is None:
            raise ValueError(f"{method!r} scores an analysis of the model; none was given")
        criterion = APoZ(analysis) if method.startswith("apoz") else Selectivity(analysis)
        scope = "global" if method.endswith("-global") else "layer"
        return lambda keep: PrunePlan.from_criterion(criterion, model, keep, scope=scope)
    raise ValueError(f"{method!r} is not a swept method")


# ---------------------------------------------------------------------- data
def split_halves(dataset) -> tuple:
    """(first half, second half) of ``dataset``, in order (the second gets the odd sample)."""
    n = len(dataset)
    if n < 2:
        raise ValueError(f"the test set has {n} sample(s); at least 2 are needed to select on one half and "
                         "report on the other")
    return sample_range(dataset, 0, n // 2), sample_range(dataset, n // 2, n)


def resolve_runs(config: MethodTableConfig, restart: bool = False) -> tuple[dict, set]:
    """({training: RunConfig}, trainings found finished in ``reuse_runs``). A training not finished
    under ``<out_dir>/runs`` but finished, with the same id, under a ``reuse_runs`` directory is
    taken from there (read only); ``restart`` ignores ``reuse_runs``."""
    runs, reused = {}, set()
    for training in config.trainings():
        run = config.run_config(training)
        if not restart and not is_finished(run):
            for directory in config.reuse_runs:
                other = run.replace(out_dir=str(directory))
                if is_finished(other):
                    run = other
                    reused.add(training)
                    break
        runs[training] = run
    return runs, reused


# ---------------------------------------------------------------------- the experiment
def run_method_table(config: MethodTableConfig, *, restart: bool = False, progress: bool = True,
                     log=print) -> dict:
    """Train (or reuse) the networks the methods need, prune, choose, time, write the files; returns
    method_table.json's content."""
    runs, reused = resolve_runs(config, restart)
    for training in sorted(reused):
        log(f"{training}: reusing the finished run {runs[training].run_dir()}")
    train_runs([run for t, run in runs.items() if t not in reused], workers=config.workers, restart=restart,
               progress=progress, log=log)
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        results = measure(config, runs, reused, resolve_device(config.device), log)
    finally:
        torch.set_num_threads(threads)
    out = Path(config.out_dir)
    write_outputs(results, out)
    log(f"{out / (OUTPUT_STEM + '.md')}: {len(results['rows'])} methods")
    return results


def measure(config: MethodTableConfig, runs: dict, reused: set, device: torch.device, log=print) -> dict:
    """Everything of method_table.json but writing it (see the module docstring)."""
    train_set, test_set = run_dataset(runs["adam-l2"], "train", device), run_dataset(runs["adam-l2"], "test", device)
    select_set, report_set = split_halves(test_set)
    corpus = first_samples(train_set, config.analyze_samples)
    batch = first_batch(corpus, 256)  # surgery verifies on training images
    input_shape = (1,) + tuple(batch.shape[1:])
    trained = {t: load_run(run, device) for t, run in runs.items()}  # (model, Optimization)
    layers = unit_layers(trained["adam-l2"][0])
    filters = _layer_filters(trained["adam-l2"][0], layers)

    def accuracies(model) -> tuple[float, float]:
        """(selection-half, report-half) accuracy in %."""
        return (100.0 * accuracy(model, select_set, config.eval_batch_size),
                100.0 * accuracy(model, report_set, config.eval_batch_size))

    dense = {t: accuracies(model) for t, (model, _) in trained.items()}
    rows, chosen_models, notes = [], {}, []

    def point(model, plan, fraction) -> tuple[dict, nn.Module, object]:
        pruned, report = prune_model(model, plan, batch)
        select_acc, report_acc = accuracies(pruned)
        removed = 1.0 - unit_keep_ratio(report, layers)
        return ({"fraction": fraction, "filters_removed_pct": 100.0 * removed,
                 "select_accuracy_pct": select_acc, "report_accuracy_pct": report_acc}, pruned, report)

    def add_row(method: Method, pruned: nn.Module, report, plan, fraction, curve, extra=None) -> None:
        select_dense, report_dense = dense[method.training]
        model = trained[method.training][0]
        kept = unit_keep_ratio(report, layers)
        select_acc, report_acc = accuracies(pruned)
        plan_path = Path(config.out_dir) / PLANS_DIR / f"{method.key}.json"
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan.save(plan_path)
        rows.append({
            "method": method.key, "label": method.label, "training": method.training,
            "trained_with": config.training_label(method.training), "run_id": runs[method.training].run_id(),
            "ranking": method.ranking, "selected_fraction": fraction,
            "filters": filters, "filters_kept": sum(report.layers[n].channels_after for n in layers),
            "filters_removed_pct": 100.0 * (1.0 - kept),
            "dense_accuracy_pct": report_dense, "pruned_accuracy_pct": report_acc,
            "dense_select_accuracy_pct": select_dense, "pruned_select_accuracy_pct": select_acc,
            "within_tolerance": select_acc >= select_dense - config.tolerance_pct,
            "params_dense": count_params(model), "params": count_params(pruned),
            "flops_dense": count_flops(model, input_shape), "flops": count_flops(pruned, input_shape),
            "plan": str(Path(PLANS_DIR) / f"{method.key}.json"), "curve": curve, **(extra or {}),
        })
        chosen_models[method.key] = pruned
        log(f"{method.label}: {rows[-1]['filters_removed_pct']:.1f}% of {filters} filters removed"
            + ("" if fraction is None else f" (fraction {fraction:g})")
            + f", report-half accuracy {report_dense:.2f}% -> {report_acc:.2f}%")

    # implicit sparsity: one exact point
    method = METHODS["implicit"]
    model = trained[method.training][0]
    plan = implicit_plan(model, make_loader(corpus, config.eval_batch_size, shuffle=False), by="both")
    entry, pruned, report = point(model, plan, None)
    # Exact by construction on the corpus the plan was measured on; on other images only as far as
    # the channels dead on that corpus stay dead there (not guaranteed), so both are reported.
    logits = compare_logits(model, pruned, report_set, batch_size=config.eval_batch_size)
    on_corpus = compare_logits(model, pruned, corpus, batch_size=config.eval_batch_size)
    add_row(method, pruned, report, plan, None, [entry], {"logits_vs_dense": logits, "logits_on_corpus": on_corpus})

    # the swept methods
    analysis = None
    if set(NEEDS_ANALYSIS) & set(config.methods):
        analysis = analyze(trained["adam-l2"][0], make_loader(corpus, config.eval_batch_size, shuffle=False),
                           progress=False, selectivity="two-pass")
    for key in (k for k in SWEPT if k in config.methods):
        method = METHODS[key]
        model, optimization = trained[method.training]
        make_plan = plan_maker(key, model, optimization, batch, analysis)
        curve = [point(model, make_plan(1.0 - f), f)[0] for f in sorted(config.fractions)]
        fraction = select_fraction([(p["fraction"], p["select_accuracy_pct"]) for p in curve],
                                   dense[method.training][0], config.tolerance_pct)
        if fraction is None:
            notes.append(f"{method.label}: no fraction of the grid kept the selection-half accuracy within "
                         f"{config.tolerance_pct:g} points; the row shows the unpruned network")
        plan = make_plan(1.0 - (fraction or 0.0))
        pruned, report = prune_model(model, plan, batch)
        add_row(method, pruned, report, plan, fraction, curve)

    # speed: every pruned and every dense network, side by side in one interleaved measurement
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    timed = {f"dense {t}": inference_model(model, dtype=dtype) for t, (model, _) in trained.items()}
    timed.update({f"pruned {key}": inference_model(m, dtype=dtype) for key, m in chosen_models.items()})
    timing = time_models(timed, (config.speed_batch,) + input_shape[1:], device=device, dtype=dtype,
                         rounds=config.speed_rounds)
    for row in rows:
        row["ms_per_batch"] = 1e3 * timing[f"pruned {row['method']}"]
        row["dense_ms_per_batch"] = 1e3 * timing[f"dense {row['training']}"]
        row["speedup"] = row["dense_ms_per_batch"] / row["ms_per_batch"]

    return {
        "config": asdict(config),
        "runs": {t: {"run_id": run.run_id(), "run_dir": str(run.run_dir()), "reused": t in reused}
                 for t, run in runs.items()},
        "test_samples": {"select": len(select_set), "report": len(report_set)},
        "analysis_samples": len(corpus),
        "input_shape": list(input_shape),
        "speed": {"batch": config.speed_batch, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                  "threads": torch.get_num_threads(), "rounds": config.speed_rounds,
                  "dense_ms_per_batch": {t: 1e3 * timing[f"dense {t}"] for t in trained}},
        "rows": rows,
        "notes": notes,
    }


# ---------------------------------------------------------------------- command line
COMMAND = ExperimentCommand("compare-methods", MethodTableConfig, run_method_table, OUTPUT_STEM, doc=__doc__,
                            help="BasicNet: implicit sparsity vs L1-norm, Network Slimming, CGES and Split LBI "
                                 "filter pruning, one table",
                            restart_help="retrain every run from scratch (ignores --reuse-runs)")


def add_parser(subparsers) -> None:
    """The ``sparsekern compare-methods`` subcommand: the experiment, or --aggregate of its seeds' tables."""
    p = COMMAND.add_parser(subparsers, func=_cmd_method_table)
    p.add_argument("--aggregate", metavar="DIR,DIR,...",
                   help="run nothing: combine the tables in these output directories (one per --seed, same "
                        "settings otherwise) into mean ± std, written to --out as method_table_seeds.md/.json")


def _cmd_method_table(args) -> int:
    if not args.aggregate:
        return COMMAND.main(args)
    if "out_dir" not in vars(args):
        raise ValueError("--aggregate needs --out: the directory for the combined table")
    result = aggregate_tables([d for d in args.aggregate.split(",") if d.strip()])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{SEEDS_STEM}.json", json.dumps(result, indent=1) + "\n")
    write_text(out / f"{SEEDS_STEM}.md", aggregate_markdown(result, where=out))
    print(json.dumps({"table": str(out / f"{SEEDS_STEM}.md")}))
    return 0
