"""The keep-ratio table of the Split LBI papers (SCIENCE.md section 4) on LeNet-5.

    sparsekern keep-ratio --out runs/keep-ratio                 # Fashion-MNIST, 3 seeds
    sparsekern keep-ratio --out /tmp/kr --quick --dataset synthetic

For every row and seed one LeNet-5 is trained; then, one layer at a time (conv ``c5``: its 120
filters; fc ``f6``: its 120x84 weights), all but a fraction of the layer's units are zeroed
and the test accuracy is measured without fine-tuning. Rows (how the net is trained -> how
units are ranked for pruning):

    Plain  no penalty            -> largest L1 norm (|w| for single weights)
    Rand   the Plain network     -> a random choice of units
    R-P    ridge (L2) prox       -> largest L1 norm
    L-P    lasso (L1) prox       -> largest L1 norm
    S-P    Split LBI             -> earliest entry into Gamma's support, then ||Gamma||, ||W||
    GL-P   group lasso prox      -> largest L1 norm of filters / f6 rows   (optional)
    GS-P   group Split LBI       -> as S-P, f6 ranked by rows               (optional)

The group rows prune f6 by rows (output units), the others by single weights; c5 is always
pruned by filters. The kept count is ``max(1, floor(ratio * n + 0.5))`` (masks.keep_count).

Files in ``out_dir``: ``runs/<run id>/`` (the trainings, reused on rerun), ``keep_ratio.json``
(every accuracy per seed, the kept counts, the config), ``keep_ratio.md`` and ``keep_ratio.csv``
(mean ± sample std over seeds, in %), ``keep_ratio.png`` (accuracy against keep ratio, one
panel per layer).

The defaults follow the authors' LeNet setting where it is known (batch 128, Split LBI with
kappa 1, nu 20, momentum 0.9 on the loss gradient, no weight decay, lr divided by 10 during
training). The rest are documented choices, checked only on short runs (3 epochs on Fashion-MNIST:
every row learns, Split LBI's c5 support fills up): one learning rate 0.05 for every row, 30
epochs where the authors ran 60 on MNIST, and the penalty strengths; see ``KeepRatioConfig``.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from sparsekern.errors import ConfigError
from sparsekern.experiments import (
    ExperimentCommand,
    RunSettings,
    check_positive,
    load_run,
    load_test_set,
    option,
    train_runs,
    write_text,
)
from sparsekern.regularize import masks
from sparsekern.report.figures import pyplot
from sparsekern.report.tables import Table, markdown_table, mean_std
from sparsekern.train.config import RunConfig
from sparsekern.train.loop import evaluate, resolve_device

OUTPUT_STEM = "keep_ratio"


@dataclass(frozen=True)
class Row:
    """One row of the table: how the network is trained and how a layer's units are ranked."""

    label: str
    description: str
    optimizer: str  # "momentum" (SGD with momentum) or a Split LBI optimizer name
    reg: str  # regulariser of sparsekern.train ("none", "ridge", "lasso", "group-lasso")
    ranking: str  # "magnitude" | "random" | "slbi"
    fc_unit: str  # unit of the fc layer: "weight" or "filter" (a row)


ROWS = {row.label: row for row in (
    Row("Plain", "no penalty, pruned by magnitude", "momentum", "none", "magnitude", "weight"),
    Row("Rand", "the Plain network, pruned at random", "momentum", "none", "random", "weight"),
    Row("R-P", "ridge penalty, pruned by magnitude", "momentum", "ridge", "magnitude", "weight"),
    Row("L-P", "lasso penalty, pruned by magnitude", "momentum", "lasso", "magnitude", "weight"),
    Row("S-P", "Split LBI, pruned by support entry", "slbi", "none", "slbi", "weight"),
    Row("GL-P", "group lasso (filters / rows), pruned by magnitude", "momentum", "group-lasso", "magnitude", "filter"),
    Row("GS-P", "group Split LBI (filters / rows), pruned by support entry", "slbi-group", "none", "slbi", "filter"),
)}
# The layers of the table: LeNet-5 attribute -> label.
LAYERS = {"c5": "conv c5", "f6": "fc f6"}


@dataclass(frozen=True)
class KeepRatioConfig(RunSettings):
    """Everything the keep-ratio experiment does; every field is also a ``sparsekern keep-ratio`` flag."""

    out_dir: str = option("runs/keep-ratio", "output directory (trained runs, tables, figure)")
    dataset: str = option("fashion-mnist", "dataset (sparsekern.data name); the papers used MNIST")
    data_root: str | None = option(None, "dataset directory (default: the data module's search path)")
    rows: tuple[str, ...] = option(("Plain", "Rand", "R-P", "L-P", "S-P"),
                                   f"table rows, from {', '.join(ROWS)}")
    layers: tuple[str, ...] = option(tuple(LAYERS), "LeNet-5 layers pruned (one at a time)")
    keep_ratios: tuple[float, ...] = option(masks.TABLE_KEEP_RATIOS, "fractions of each layer's units kept")
    seeds: tuple[int, ...] = option((0, 1, 2), "training seeds (mean ± std over them)")
    epochs: int = option(30, "training epochs per run")
    steps: int | None = option(None, "step budget per run; overrides --epochs")
    batch_size: int = option(128, "mini-batch size (the authors' LeNet setting)")
    lr_schedule: str = option("step", "lr schedule of every run: lr x0.1 at 50% and 75% of the budget")
    lr: float = option(0.05, "learning rate of every row (SGD with momentum; Split LBI's alpha)")
    momentum: float = option(0.9, "momentum of SGD, and of Split LBI's loss gradient (the authors' default)")
    ridge_strength: float = option(5e-4, "R-P: lambda of the ridge prox w / (1 + lr*lambda) (usual weight decay)")
    lasso_strength: float = option(2e-4, "L-P: lambda of the lasso prox (soft threshold at lr*lambda)")
    group_lasso_strength: float = option(2e-3, "GL-P: lambda of the group-lasso prox on filters / rows")
    slbi_kappa: float = option(1.0, "S-P / GS-P: Split LBI kappa")
    slbi_nu: float = option(20.0, "S-P / GS-P: Split LBI nu (the authors' LeNet value)")

    def __post_init__(self):
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown or not self.rows:
            raise ConfigError(f"rows={self.rows!r}: unknown row(s) {unknown}; expected some of {', '.join(ROWS)}")
        unknown = [name for name in self.layers if name not in LAYERS]
        if unknown or not self.layers:
            raise ConfigError(f"layers={self.layers!r}: expected some of {', '.join(LAYERS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds!r}: expected distinct seeds")
        if not self.keep_ratios or len(set(self.keep_ratios)) != len(self.keep_ratios):
            raise ConfigError(f"keep_ratios={self.keep_ratios!r}: expected distinct ratios")
        for ratio in self.keep_ratios:
            masks.keep_count(ratio, 1)  # a clear error for 0, negatives or percentages
        check_positive(self, ("epochs", "steps", "batch_size", "lr", "ridge_strength", "lasso_strength",
                              "group_lasso_strength", "slbi_kappa", "slbi_nu", "workers"))
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum!r}: must be in [0, 1)")

    def quick(self) -> "KeepRatioConfig":
        """A tiny version for tests and smoke runs: all rows, 2 seeds, 80 steps at a constant lr on 512 samples."""
        return replace(self, rows=tuple(ROWS), seeds=(0, 1), epochs=1, steps=80, batch_size=32,
                       lr_schedule="constant", num_train_samples=512, num_test_samples=256, analyze_samples=64,
                       eval_batch_size=256)

    def run_config(self, row: Row, seed: int):
        """The sparsekern.train RunConfig that trains ``row``'s network for ``seed``."""
        strengths = {"none": 0.0, "ridge": self.ridge_strength, "lasso": self.lasso_strength,
                     "group-lasso": self.group_lasso_strength}
        return RunConfig(
            model="lenet5", dataset=self.dataset, data_root=self.data_root, optimizer=row.optimizer, lr=self.lr,
            momentum=self.momentum, slbi_kappa=self.slbi_kappa, slbi_nu=self.slbi_nu,  # ignored unless slbi*
            reg=row.reg, reg_strength=strengths[row.reg], batch_size=self.batch_size, epochs=self.epochs,
            steps=self.steps, lr_schedule=self.lr_schedule, seed=seed, selectivity="none",
            out_dir=str(Path(self.out_dir) / "runs"), **self.run_settings(),
        )


# ---------------------------------------------------------------------- pruning one layer
def unit_kind(row: Row, layer: str) -> str:
    """Pruning unit of ``layer`` in ``row``: conv filters, and fc single weights or rows."""
    return "filter" if layer == "c5" else row.fc_unit


def layer_mask(row: Row, layer: str, model, optimization, keep_ratio: float, seed: int) -> torch.Tensor:
    """Weight-shaped bool mask (True = kept) of ``layer``'s weight for ``row`` at ``keep_ratio``."""
    weight = getattr(model, layer).weight
    if row.ranking == "slbi":
        optimizer = optimization.optimizer
        if optimizer.unit_kind(weight) != unit_kind(row, layer):  # the run was trained for another row
            raise ValueError(f"{row.label}: Split LBI ranks {layer} by {optimizer.unit_kind(weight)}s, "
                             f"the row expects {unit_kind(row, layer)}s")
        return masks.slbi_masks(optimizer, weight, keep_ratio)
    if row.ranking == "random":
        # A different draw for every seed, layer and ratio, the same on every rerun.
        draw = 1_000_003 * seed + 100_000 * list(LAYERS).index(layer) + round(keep_ratio * 1e4)
        return masks.random_masks(weight, keep_ratio, unit_kind(row, layer), seed=draw)
    return masks.magnitude_masks(weight, keep_ratio, unit_kind(row, layer), p=1)


def pruned_copy(model, layer: str, mask: torch.Tensor):
    """A copy of ``model`` with ``layer``'s weights zeroed where ``mask`` is False (bias kept)."""
    pruned = copy.deepcopy(model)
    masks.apply_masks(pruned, {f"{layer}.weight": mask})
    return pruned


def kept_units(mask: torch.Tensor, kind: str) -> int:
    """How many units a weight-shaped mask keeps (filters: those with any weight kept)."""
    return int(mask.flatten(1).any(dim=1).sum()) if kind == "filter" else int(mask.sum())


# ---------------------------------------------------------------------- the experiment
def run_keep_ratio(config: KeepRatioConfig, *, restart: bool = False, progress: bool = True, log=print) -> dict:
    """Train (or reuse) every row x seed, prune, evaluate, write the files; returns keep_ratio.json's content."""
    rows = [ROWS[label] for label in config.rows]
    runs = {(row.label, seed): config.run_config(row, seed) for row in rows for seed in config.seeds}
    unique = {c.run_id(): c for c in runs.values()}  # Rand reuses the Plain trainings
    train_runs(unique.values(), workers=config.workers, restart=restart, progress=progress, log=log)

    device = resolve_device(config.device)
    test_set = load_test_set(next(iter(runs.values())), device)
    accuracy = {}  # (row, layer, ratio) -> [per seed], in %
    kept = {}  # (row, layer, ratio) -> units kept
    units = {}  # (row, layer) -> units of the layer
    unpruned = {}  # (row, seed) -> accuracy of the trained network, in %
    for (label, seed), run in runs.items():
        row = ROWS[label]
        model, optimization = load_run(run, device)
        unpruned[label, seed] = 100.0 * (1.0 - evaluate(model, test_set, config.eval_batch_size, device)[1])
        for layer in config.layers:
            for ratio in config.keep_ratios:
                mask = layer_mask(row, layer, model, optimization, ratio, seed)
                error = evaluate(pruned_copy(model, layer, mask), test_set, config.eval_batch_size, device)[1]
                accuracy.setdefault((label, layer, ratio), []).append(100.0 * (1.0 - error))
                kept[label, layer, ratio] = kept_units(mask, unit_kind(row, layer))
                units[label, layer] = mask.shape[0] if unit_kind(row, layer) == "filter" else mask.numel()
        log(f"{label} seed {seed}: pruned and evaluated ({run.run_id()})")

    results = {
        "config": asdict(config),
        "runs": {f"{label}/seed{seed}": run.run_id() for (label, seed), run in runs.items()},
        "test_samples": len(test_set),
        "unpruned_accuracy_pct": {label: mean_std([unpruned[label, s] for s in config.seeds])
                                  for label in config.rows},
        "cells": [
            {"row": label, "layer": layer, "keep_ratio": ratio, "unit": unit_kind(ROWS[label], layer),
             "units": units[label, layer], "kept": kept[label, layer, ratio],
             "accuracy_pct": mean_std(accuracy[label, layer, ratio])}
            for layer in config.layers for label in config.rows for ratio in config.keep_ratios
        ],
    }
    write_outputs(results, Path(config.out_dir))
    log(f"{Path(config.out_dir) / (OUTPUT_STEM + '.md')}: {len(rows)} rows x {len(config.layers)} layers x "
        f"{len(config.keep_ratios)} keep ratios, {len(config.seeds)} seeds")
    return results


# ---------------------------------------------------------------------- tables and figure
def ratio_label(ratio: float) -> str:
    """0.0313 -> '3.13%'."""
    return f"{100 * ratio:g}%"


def table_rows(results: dict) -> tuple[list[str], list[list]]:
    """(columns, rows) of the table: one line per layer x row, one column per keep ratio."""
    ratios = results["config"]["keep_ratios"]
    columns = ["layer", "row", "unit"] + [ratio_label(r) for r in ratios]
    cells = {(c["row"], c["layer"], c["keep_ratio"]): c for c in results["cells"]}
    lines = []
    for layer in results["config"]["layers"]:
        for label in results["config"]["rows"]:
            first = cells[label, layer, ratios[0]]
            # Internally a pruned fc row is a "filter" (one output unit, like a conv filter); say "row".
            unit = "row" if first["unit"] == "filter" and layer != "c5" else first["unit"]
            lines.append([LAYERS[layer], label, f"{unit} (of {first['units']})"]
                         + [cells[label, layer, r]["accuracy_pct"] for r in ratios])
    return columns, lines


def write_outputs(results: dict, out: Path) -> dict[str, Path]:
    """keep_ratio.json / .md / .csv / .png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    columns, lines = table_rows(results)
    config = results["config"]
    budget = f"{config['steps']} steps" if config["steps"] is not None else f"{config['epochs']} epochs"
    rows_text = "\n".join(f"- **{label}**: {ROWS[label].description}" for label in config["rows"])
    unpruned = ", ".join(f"{label} {cell['mean']:.2f}" for label, cell in results["unpruned_accuracy_pct"].items())
    markdown = "\n".join([
        "# Keep-ratio table: LeNet-5 test accuracy (%) after pruning one layer, no fine-tuning",
        "",
        f"Dataset `{config['dataset']}` ({results['test_samples']} test samples); {budget} per run, batch "
        f"{config['batch_size']}, seeds {', '.join(map(str, config['seeds']))} (mean ± sample std). "
        f"Each cell zeroes all but the given fraction of one layer's units (`unit` column) and measures the "
        f"test accuracy; the other layers are untouched.",
        "",
        rows_text,
        "",
        markdown_table(columns, lines),
        "",
        f"Unpruned accuracy: {unpruned}.",
        "",
        f"Settings: lr {config['lr']:g} ({config['lr_schedule']} schedule), momentum {config['momentum']:g} (SGD, "
        f"and Split LBI's loss gradient); ridge {config['ridge_strength']:g}, lasso {config['lasso_strength']:g}, "
        f"group lasso {config['group_lasso_strength']:g}; Split LBI kappa {config['slbi_kappa']:g}, "
        f"nu {config['slbi_nu']:g}.",
        "",
        f"![accuracy against keep ratio]({OUTPUT_STEM}.png)",
        "",
    ])
    paths = {
        "json": write_text(out / f"{OUTPUT_STEM}.json", json.dumps(results, indent=1) + "\n"),
        "md": write_text(out / f"{OUTPUT_STEM}.md", markdown),
        "csv": write_text(out / f"{OUTPUT_STEM}.csv", Table(OUTPUT_STEM, "", columns, lines).to_csv()),
        "png": figure(results, out / f"{OUTPUT_STEM}.png"),
    }
    return paths


def figure(results: dict, path: Path) -> Path:
    """Accuracy against keep ratio (log scale, 100% on the left), one line per row, one panel per layer."""
    plt = pyplot()  # names the 'figures' extra when matplotlib is missing

    config = results["config"]
    ratios = config["keep_ratios"]
    cells = {(c["row"], c["layer"], c["keep_ratio"]): c["accuracy_pct"] for c in results["cells"]}
    fig, axes = plt.subplots(1, len(config["layers"]), figsize=(5 * len(config["layers"]), 3.8), squeeze=False)
    for ax, layer in zip(axes[0], config["layers"]):
        for label in config["rows"]:
            stats = [cells[label, layer, r] for r in ratios]
            ax.errorbar([100 * r for r in ratios], [s["mean"] for s in stats],
                        yerr=[s["std"] or 0.0 for s in stats], marker="o", ms=3, capsize=2, label=label)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xticks([100 * r for r in ratios], [ratio_label(r) for r in ratios], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("keep ratio")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(LAYERS[layer])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- command line
COMMAND = ExperimentCommand("keep-ratio", KeepRatioConfig, run_keep_ratio, OUTPUT_STEM, doc=__doc__,
                            help="LeNet-5 keep-ratio table: Plain / Rand / R-P / L-P / S-P pruning")
add_parser = COMMAND.add_parser  # the ``sparsekern keep-ratio`` subcommand (registered by sparsekern.cli)
