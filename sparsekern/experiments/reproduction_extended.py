"""The paper's remaining claims on Fashion-MNIST: regularisation strength, optimizers, accuracy-matched
L2 vs WD, the selectivity mechanism, selectivity as a pruning rule (``scripts/reproduce_extended.py``
trains the runs; this module plans them and writes the tables from the finished ones).

Every run is the quick setting of ``scripts/reproduce.py`` with one thing changed, so the runs that
script made are reused: a planned run whose identity (``RunConfig.run_id``) already has a result in
the reused sweep directory is read from there.

The mechanism runs are Adam and momentum SGD with L2 2e-3 (the optimizer table's settings) and
``log_mechanism``: at every eval point (500 steps), per BN channel, the summed sizes of gamma's
regulariser and loss-gradient updates over the interval (``sparsekern.train.mechanism``) and the
channel's selectivity on the interval's training stream. Each (channel, interval) where the channel
was active and had a loss gradient is a point (selectivity, reg / loss); the table gives Spearman's
rank correlation over a run's points, mean ± std over seeds, and the ratio's median among
non-selective and selective points.

The pruning rows are ``sparsekern compare-methods --methods <PRUNING_METHODS>`` per seed
(``PRUNING_DIR/seed-N``: the Adam + L2 network trained again with its checkpoint, which the
reproduction's runs do not keep), combined over seeds by the method table's own aggregation.
"""
from __future__ import annotations

import math
from pathlib import Path

import json

import numpy as np

from ..report.figures import pyplot
from ..report.tables import Table, mean_std
from ..train.checkpoint import atomic_write_text
from ..train.config import RunConfig
from ..train.loop import read_metrics, read_result, run_files
from ..train.sweep import expand_grid
from .method_table import MethodTableConfig
from .method_table_output import OUTPUT_STEM
from .method_table_seeds import SEEDS_STEM, aggregate_markdown, aggregate_tables

STRENGTHS = (0.0, 1e-4, 5e-4, 1e-3, 2e-3, 5e-3)
# Learning-rate rule: twice torch's default for the optimizer; momentum SGD (no torch default) twice
# the full setting's 0.01. The quick setting raised Adam (1e-3 -> 2e-3) and SGD by the same factor.
OPTIMIZER_LRS = {"adam": 2e-3, "adamax": 4e-3, "adagrad": 2e-2, "adadelta": 2.0, "rmsprop": 2e-2, "momentum": 0.02}
OPTIMIZER_NAMES = {"adam": "Adam", "adamax": "AdaMax", "adagrad": "AdaGrad", "adadelta": "AdaDelta",
                   "rmsprop": "RMSprop", "momentum": "momentum SGD"}
# The WD strength whose test error matches L2 2e-3's (one seed, docs/results/reproduction/extra-runs).
MATCHED_WD = 5e-4
GROUPS = ("strength", "optimizers", "mechanism", "vgg16")  # RunConfig groups; the pruning rows are method tables
MECHANISM_OPTIMIZERS = ("adam", "momentum")
PRUNING_DIR = "pruning"
PRUNING_METHODS = ("l1-norm", "apoz", "selectivity", "apoz-global", "selectivity-global")
# VGG-16 (width 0.25, Adam + L2 2e-3, batch 20): the harvest's 2 epochs and the longest budget
# planned for the CPU (10 epochs = 30000 steps, about 30 CPU-minutes a run with flushed subnormals).
VGG_EPOCHS = (2, 10)
GAMMA_THRESHOLD = 1e-3  # |gamma| below it: a constant unit (the reports' threshold)
# Selectivity bands of the mechanism table's medians; the figure's ratio axis.
FIGURE_RATIO_RANGE = (1e-3, 1e3)
NON_SELECTIVE, SELECTIVE = 0.1, 0.5


# The quick setting of scripts/reproduce.py (sparsekern.demo.QUICK, which this layer cannot import;
# python_tests/test_reproduction_extended.py checks that the two agree).
QUICK_WIDTH, QUICK_BATCH, QUICK_EVAL_EVERY = 0.25, 20, 500
ADAM_LR, L2_STRENGTH = 2e-3, 2e-3


def _base() -> dict:
    return dict(model="basicnet", dataset="fashion-mnist", width=QUICK_WIDTH, batch_size=QUICK_BATCH,
                epochs=2, eval_every=QUICK_EVAL_EVERY, analyze_samples=None, threads=1)


def _strength_rows() -> list[dict]:
    adam = dict(_base(), optimizer="adam", lr=ADAM_LR)
    rows = [dict(adam, reg="none", reg_strength=L2_STRENGTH)]  # the run reproduce.py made for lambda = 0
    rows += [dict(adam, reg=reg, reg_strength=s) for s in STRENGTHS if s > 0 for reg in ("l2", "wd")]
    return rows


def _optimizer_rows() -> list[dict]:
    return [dict(_base(), optimizer=name, lr=lr, reg="l2", reg_strength=L2_STRENGTH)
            for name, lr in OPTIMIZER_LRS.items()]


def _mechanism_rows() -> list[dict]:
    return [dict(_base(), optimizer=name, lr=OPTIMIZER_LRS[name], reg="l2", reg_strength=L2_STRENGTH,
                 log_mechanism=True) for name in MECHANISM_OPTIMIZERS]


def _vgg_rows() -> list[dict]:
    return [dict(_base(), model="vgg16", optimizer="adam", lr=ADAM_LR, reg="l2", reg_strength=L2_STRENGTH,
                 epochs=epochs) for epochs in VGG_EPOCHS]


_ROWS = {"strength": _strength_rows, "optimizers": _optimizer_rows, "mechanism": _mechanism_rows,
         "vgg16": _vgg_rows}


def planned_configs(out, seeds, groups=GROUPS) -> list[RunConfig]:
    """The runs of ``groups``, seed-major (a cut-short budget leaves every row with as many seeds as
    possible), without duplicates."""
    unknown = sorted(set(groups) - set(_ROWS))
    if unknown:
        raise ValueError(f"unknown group(s) {unknown}: expected some of {list(_ROWS)}")
    configs, seen = [], set()
    for seed in seeds:
        for group in groups:
            for row in _ROWS[group]():
                for config in expand_grid(row, {"seed": [seed]}, out):
                    if config.run_id() not in seen:
                        seen.add(config.run_id())
                        configs.append(config)
    return configs


def _roots(reuse) -> list[Path]:
    """The reused sweep directories: None, one path, or a list of them."""
    if reuse is None:
        return []
    return [Path(reuse)] if isinstance(reuse, (str, Path)) else [Path(r) for r in reuse]


def finished_dir(config: RunConfig, out, reuse=None) -> Path | None:
    """Where the finished run of ``config`` is: this sweep's ``runs/`` or a reused sweep's (``reuse``:
    one directory or several, searched in order), else None."""
    for root in (Path(out), *_roots(reuse)):
        run_dir = root / "runs" / config.run_id()
        if run_files(run_dir)["result"].is_file():  # written last, atomically: the run is finished
            return run_dir
    return None


def _finished_dirs(row: dict, out, reuse, seeds) -> list[Path]:
    """The run directories of the finished seeds of one row."""
    dirs = []
    for seed in seeds:
        (config,) = expand_grid(row, {"seed": [seed]}, out)
        run_dir = finished_dir(config, out, reuse)
        if run_dir is not None:
            dirs.append(run_dir)
    return dirs


def _results(rows: list[dict], out, reuse, seeds) -> list[list[dict]]:
    """Per row, the results of its finished seeds."""
    return [[read_result(d) for d in _finished_dirs(row, out, reuse, seeds)] for row in rows]


def _cells(results: list[dict]) -> list:
    if not results:
        return [0, None, None, None]
    return [len(results), mean_std([r["total"]["dead_by_activation_pct"] for r in results]),
            mean_std([r["total"]["dead_by_gamma_pct"] for r in results]),
            mean_std([100.0 * r["test_error"] for r in results])]


_COLUMNS = ["seeds", "inactive, act. (%)", "inactive, |γ| (%)", "test error (%)"]


def strength_table(out, reuse, seeds) -> Table:
    rows = _strength_rows()
    results = _results(rows, out, reuse, seeds)
    lines = []
    for row, res in zip(rows, results):
        reg = "none" if row["reg"] == "none" else row["reg"].upper()
        strength = 0.0 if row["reg"] == "none" else row["reg_strength"]
        lines.append([reg, _strength_text(strength), *_cells(res)])
    return Table("table_strength", "Adam: % inactive filters and test error against the regularisation strength",
                 ["reg", "λ", *_COLUMNS], lines)


def optimizer_table(out, reuse, seeds) -> Table:
    rows = _optimizer_rows()
    results = _results(rows, out, reuse, seeds)
    lines = [[OPTIMIZER_NAMES[row["optimizer"]], f"{row['lr']:g}", *_cells(res)] for row, res in zip(rows, results)]
    return Table("table_optimizers", f"Optimizers with L2 {L2_STRENGTH:g}: % inactive filters and test error",
                 ["optimizer", "lr", *_COLUMNS], lines)


def matched_table(out, reuse, seeds) -> Table:
    adam = dict(_base(), optimizer="adam", lr=ADAM_LR)
    rows = [dict(adam, reg="l2", reg_strength=L2_STRENGTH), dict(adam, reg="wd", reg_strength=MATCHED_WD),
            dict(adam, reg="wd", reg_strength=L2_STRENGTH)]
    results = _results(rows, out, reuse, seeds)
    notes = ["", "test error matched to L2's", "same λ as L2"]
    lines = [[row["reg"].upper(), _strength_text(row["reg_strength"]), note, *_cells(res)]
             for row, note, res in zip(rows, notes, results)]
    return Table("table_matched_l2_wd", "Adam: L2 against decoupled weight decay matched by test error",
                 ["reg", "λ", "row", *_COLUMNS], lines)


def removable_exactly_pct(result: dict) -> float:
    """% of a run's measured channels removable exactly: dead by activation over the training corpus
    or |gamma| < 1e-3 (the union ``implicit_plan(by="both")`` removes), from its result.json."""
    removable = channels = 0
    for layer in result["layers"]:
        gamma = layer["gamma"] or [None] * layer["channels"]
        removable += sum(bool(dead) or (g is not None and abs(g) < GAMMA_THRESHOLD)
                         for dead, g in zip(layer["dead_mask"], gamma))
        channels += layer["channels"]
    return 100.0 * removable / channels


def vgg_table(out, reuse, seeds) -> Table:
    lines = []
    for row in _vgg_rows():
        results = [read_result(d) for d in _finished_dirs(row, out, reuse, seeds)]
        cells = _cells(results)
        removable = mean_std([removable_exactly_pct(r) for r in results]) if results else None
        lines.append([row["epochs"], results[0]["steps"] if results else None, cells[0], removable, *cells[1:]])
    return Table("table_vgg16", f"VGG-16 (width 0.25), Adam + L2 {L2_STRENGTH:g}: filters removable exactly",
                 ["epochs", "steps", "seeds", "removable exactly (%)", *_COLUMNS[1:]], lines)


def _strength_text(value: float) -> str:
    return "0" if value == 0 else f"{value:g}"


def _std_or_zero(stats: dict) -> float:
    std = stats["std"]  # None or NaN for a single seed
    return 0.0 if std is None or math.isnan(std) else std


def strength_figure(out, reuse, seeds, path) -> Path:
    """% inactive by activation and test error against lambda, L2 and WD, mean +- std over seeds."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    rows = _strength_rows()
    results = _results(rows, out, reuse, seeds)
    none = results[0]
    for reg, marker in (("l2", "o"), ("wd", "s")):
        points = [(0.0, none)] + [(row["reg_strength"], res) for row, res in zip(rows, results) if row["reg"] == reg]
        points = [(s, res) for s, res in points if res]
        # lambda = 0 sits at the left edge of the log axis (drawn at a tenth of the smallest strength)
        xs = [s if s > 0 else min(STRENGTHS[1:]) / 10 for s, _ in points]
        for ax, key in ((axes[0], "dead"), (axes[1], "error")):
            values = [[r["total"]["dead_by_activation_pct"] if key == "dead" else 100 * r["test_error"] for r in res]
                      for _, res in points]
            stats = [mean_std(v) for v in values]
            ax.errorbar(xs, [s["mean"] for s in stats], yerr=[_std_or_zero(s) for s in stats],
                        marker=marker, capsize=3, label=reg.upper())
    for ax, label in ((axes[0], "inactive filters, by activation (%)"), (axes[1], "test error (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("λ (leftmost point: λ = 0)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("BasicNet w0.25, Fashion-MNIST, Adam, batch 20, 2 epochs")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------- the mechanism
def mechanism_points(run_dir) -> tuple[np.ndarray, np.ndarray]:
    """(selectivity, reg / loss update ratio) of every (BN channel, eval interval) of a
    ``log_mechanism`` run in which the channel was active and had a loss gradient."""
    selectivity, ratio = [], []
    lines = read_metrics(run_dir)
    if not lines or "mechanism" not in lines[0]:
        raise ValueError(f"{run_dir}: metrics.jsonl has no mechanism rows (train with log_mechanism=True)")
    for line in lines:
        for row in line["mechanism"].values():
            for s, top, reg, loss in zip(row["selectivity"], row["window_max"], row["reg_update"], row["loss_update"]):
                if s is not None and top > 0 and loss > 0:
                    selectivity.append(s)
                    ratio.append(reg / loss)
    return np.asarray(selectivity, dtype=np.float64), np.asarray(ratio, dtype=np.float64)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (what Spearman's rho needs)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equal-length samples (NaN when either is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman: need two samples of one length >= 2, got {len(x)} and {len(y)}")
    rx, ry = _ranks(x) - (len(x) + 1) / 2, _ranks(y) - (len(y) + 1) / 2
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float("nan") if denominator == 0 else float((rx * ry).sum() / denominator)


def _median_or_none(values: np.ndarray):
    return float(np.median(values)) if len(values) else None


def _seed_stats(values: list):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return mean_std(values) if values else None


def mechanism_table(out, reuse, seeds) -> Table:
    lines = []
    for row in _mechanism_rows():
        runs = [mechanism_points(d) for d in _finished_dirs(row, out, reuse, seeds)]
        per_run = {"rho": [], "non": [], "sel": [], "selective": [], "mean": []}
        for selectivity, ratio in runs:
            per_run["rho"].append(spearman(selectivity, ratio))
            per_run["non"].append(_median_or_none(ratio[selectivity < NON_SELECTIVE]))
            per_run["sel"].append(_median_or_none(ratio[selectivity >= SELECTIVE]))
            per_run["selective"].append(100.0 * float((selectivity >= SELECTIVE).mean()))
            per_run["mean"].append(float(selectivity.mean()))
        lines.append([OPTIMIZER_NAMES[row["optimizer"]], len(runs), sum(len(s) for s, _ in runs),
                      *(_seed_stats(per_run[k]) for k in ("rho", "non", "sel", "selective", "mean"))])
    return Table("table_mechanism",
                 f"Regulariser vs loss-gradient updates of gamma against selectivity (L2 {L2_STRENGTH:g})",
                 ["optimizer", "seeds", "points", "Spearman ρ (selectivity, reg/loss)",
                  f"median reg/loss, selectivity < {NON_SELECTIVE:g}",
                  f"median reg/loss, selectivity ≥ {SELECTIVE:g}", f"points with selectivity ≥ {SELECTIVE:g} (%)",
                  "mean selectivity"], lines, digits=2)


def mechanism_figure(out, reuse, seeds, path) -> Path:
    """reg / loss ratio (log) against selectivity, one panel per optimizer, every seed's points."""
    plt = pyplot()
    rows = _mechanism_rows()
    fig, axes = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), 3.6), sharey=True, squeeze=False)
    for ax, row in zip(axes[0], rows):
        rhos, pooled = [], []
        for run_dir in _finished_dirs(row, out, reuse, seeds):
            selectivity, ratio = mechanism_points(run_dir)
            rhos.append(spearman(selectivity, ratio))
            pooled.append((selectivity, ratio))
            # Nearly-dead channels have loss parts near 0 and ratios up to 1e150: drawn at the edge.
            ax.scatter(selectivity, np.clip(ratio, *FIGURE_RATIO_RANGE), s=3, alpha=0.25,
                       label=f"seed {read_result(run_dir)['config']['seed']}")
        if pooled:
            selectivity, ratio = (np.concatenate(parts) for parts in zip(*pooled))
            edges = np.linspace(0.0, 1.0, 11)
            bins = np.clip(np.digitize(selectivity, edges) - 1, 0, 9)
            centres = [(edges[b] + edges[b + 1]) / 2 for b in range(10) if (bins == b).any()]
            medians = [np.median(ratio[bins == b]) for b in range(10) if (bins == b).any()]
            ax.plot(centres, np.clip(medians, *FIGURE_RATIO_RANGE), "k-o", markersize=3, label="median per 0.1 bin")
        ax.set_yscale("log")
        ax.set_ylim(*FIGURE_RATIO_RANGE)
        ax.set_xlabel("selectivity on the interval's training stream")
        rho = "no runs" if not rhos else "ρ = " + ", ".join(f"{r:.2f}" for r in rhos)
        ax.set_title(f"{OPTIMIZER_NAMES[row['optimizer']]} + L2 {L2_STRENGTH:g} ({rho})", fontsize=9)
        if rhos:
            ax.legend(fontsize=7, markerscale=3)
    axes[0][0].set_ylabel("Σ|reg update| / Σ|loss update| of γ (clipped)")
    fig.suptitle("Per BN channel and 500-step interval: BasicNet w0.25, Fashion-MNIST, batch 20", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------- pruning rows
def pruning_config(out, seed: int) -> MethodTableConfig:
    """The method table of one seed with the APoZ and selectivity rows (per layer and global) next to
    L1-norm and implicit."""
    return MethodTableConfig(out_dir=str(Path(out) / PRUNING_DIR / f"seed-{seed}"), seed=seed,
                             methods=PRUNING_METHODS, threads=1, device="cpu")


def write_pruning_table(out, seeds) -> list[Path]:
    """``PRUNING_DIR/method_table_seeds.{json,md}`` over the seeds whose method table is written."""
    directories = [Path(out) / PRUNING_DIR / f"seed-{seed}" for seed in seeds]
    directories = [d for d in directories if (d / f"{OUTPUT_STEM}.json").is_file()]
    if len(directories) < 2:  # one seed: its own method_table.md is the table
        return [d / f"{OUTPUT_STEM}.md" for d in directories]
    result = aggregate_tables(directories)
    where = Path(out) / PRUNING_DIR
    atomic_write_text(where / f"{SEEDS_STEM}.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(where / f"{SEEDS_STEM}.md", aggregate_markdown(result, where=where))
    return [where / f"{SEEDS_STEM}.json", where / f"{SEEDS_STEM}.md"]


def write_tables(out, reuse, seeds) -> list[Path]:
    """table_strength / table_optimizers / table_matched_l2_wd / table_mechanism / table_vgg16 (.md, .csv),
    fig_strength.png, fig_mechanism.png and the pruning rows' seed table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in (strength_table(out, reuse, seeds), optimizer_table(out, reuse, seeds),
                  matched_table(out, reuse, seeds), mechanism_table(out, reuse, seeds), vgg_table(out, reuse, seeds)):
        setting = {"table_mechanism": _SETTING + _MECHANISM_SETTING, "table_vgg16": _VGG_SETTING}.get(table.name, _SETTING)
        text = f"# {table.title}\n\n{setting}\n\n{table.to_markdown()}\n"
        atomic_write_text(out / f"{table.name}.md", text)
        atomic_write_text(out / f"{table.name}.csv", table.to_csv())
        written += [out / f"{table.name}.md", out / f"{table.name}.csv"]
    written.append(strength_figure(out, reuse, seeds, out / "fig_strength.png"))
    written.append(mechanism_figure(out, reuse, seeds, out / "fig_mechanism.png"))
    written += write_pruning_table(out, seeds)
    return written


_SETTING = ("BasicNet width 0.25 on Fashion-MNIST, batch 20, 2 epochs (6000 steps), constant learning rate; "
            "inactive by activation: max post-BN+ReLU output below 1e-12 on all 60000 training images; "
            "by |γ|: below 1e-3. Mean ± sample std over the seeds shown; "
            "regenerate with `python scripts/reproduce_extended.py --tables-only`.")
_MECHANISM_SETTING = (
    "\n\nA point is one BN channel in one 500-step interval in which it was active (max > 0 on the interval's "
    "training batches) and had a loss gradient: its selectivity on those batches (BN in training mode, "
    "histogram counts) and Σ|regulariser part| / Σ|loss part| of γ's updates over the interval, the update "
    "split exactly by `sparsekern.train.mechanism` (Adam's second moment scales both parts alike within a "
    "step). ρ: Spearman's rank correlation over a run's points, mean ± std over seeds; the medians and "
    "shares are per run, then averaged.")
_VGG_SETTING = (
    "VGG-16 width 0.25 (16..128 channels, 1056 filters in its 13 Conv-BN-ReLU units) on Fashion-MNIST, Adam lr "
    "2e-3 + L2 2e-3, batch 20, constant learning rate. Removable exactly: dead by activation (max below 1e-12 on "
    "all 60000 training images) or |γ| < 1e-3, the union the exact plan removes (`sparsekern prune --by both`). "
    "Mean ± sample std over the seeds shown; the 2-epoch seed 0 is the harvest's run (docs/results/harvest). "
    "Regenerate with `python scripts/reproduce_extended.py --tables-only`.")
