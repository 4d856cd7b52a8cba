"""The paper's remaining claims on Fashion-MNIST: regularisation strength, optimizers, accuracy-matched
L2 vs WD (``scripts/reproduce_extended.py`` trains the runs; this module plans them and writes the
tables from the finished ones).

Every run is the quick setting of ``scripts/reproduce.py`` with one thing changed, so the runs that
script made are reused: a planned run whose identity (``RunConfig.run_id``) already has a result in
the reused sweep directory is read from there.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..report.figures import pyplot
from ..report.tables import Table, mean_std
from ..train.checkpoint import atomic_write_text
from ..train.config import RunConfig
from ..train.loop import read_result, run_files
from ..train.sweep import expand_grid

STRENGTHS = (0.0, 1e-4, 5e-4, 1e-3, 2e-3, 5e-3)
# Learning-rate rule: twice torch's default for the optimizer; momentum SGD (no torch default) twice
# the full setting's 0.01. The quick setting raised Adam (1e-3 -> 2e-3) and SGD by the same factor.
OPTIMIZER_LRS = {"adam": 2e-3, "adamax": 4e-3, "adagrad": 2e-2, "adadelta": 2.0, "rmsprop": 2e-2, "momentum": 0.02}
OPTIMIZER_NAMES = {"adam": "Adam", "adamax": "AdaMax", "adagrad": "AdaGrad", "adadelta": "AdaDelta",
                   "rmsprop": "RMSprop", "momentum": "momentum SGD"}
# The WD strength whose test error matches L2 2e-3's (one seed, docs/results/reproduction/extra-runs).
MATCHED_WD = 5e-4
GROUPS = ("strength", "optimizers")


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


_ROWS = {"strength": _strength_rows, "optimizers": _optimizer_rows}


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


def finished_dir(config: RunConfig, out, reuse=None) -> Path | None:
    """Where the finished run of ``config`` is: this sweep's ``runs/`` or the reused sweep's, else None."""
    for root in (Path(out), *([Path(reuse)] if reuse else [])):
        run_dir = root / "runs" / config.run_id()
        if run_files(run_dir)["result"].is_file():  # written last, atomically: the run is finished
            return run_dir
    return None


def _results(rows: list[dict], out, reuse, seeds) -> list[list[dict]]:
    """Per row, the results of its finished seeds."""
    found = []
    for row in rows:
        results = []
        for seed in seeds:
            (config,) = expand_grid(row, {"seed": [seed]}, out)
            run_dir = finished_dir(config, out, reuse)
            if run_dir is not None:
                results.append(read_result(run_dir))
        found.append(results)
    return found


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


def write_tables(out, reuse, seeds) -> list[Path]:
    """table_strength / table_optimizers / table_matched_l2_wd (.md, .csv) and fig_strength.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in (strength_table(out, reuse, seeds), optimizer_table(out, reuse, seeds),
                  matched_table(out, reuse, seeds)):
        text = f"# {table.title}\n\n{_SETTING}\n\n{table.to_markdown()}\n"
        atomic_write_text(out / f"{table.name}.md", text)
        atomic_write_text(out / f"{table.name}.csv", table.to_csv())
        written += [out / f"{table.name}.md", out / f"{table.name}.csv"]
    written.append(strength_figure(out, reuse, seeds, out / "fig_strength.png"))
    return written


_SETTING = ("BasicNet width 0.25 on Fashion-MNIST, batch 20, 2 epochs (6000 steps), constant learning rate; "
            "inactive by activation: max post-BN+ReLU output below 1e-12 on all 60000 training images; "
            "by |γ|: below 1e-3. Mean ± sample std over the seeds shown; "
            "regenerate with `python scripts/reproduce_extended.py --tables-only`.")
