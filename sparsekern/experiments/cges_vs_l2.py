"""CGES (Yoon and Hwang 2017, SCIENCE.md section 3) against plain L2 on LeNet-5 and BasicNet.

    sparsekern cges-vs-l2 --out runs/cges-vs-l2
    sparsekern cges-vs-l2 --out /tmp/cg --quick --dataset synthetic

Each model is trained with the same optimizer under two regularisers, over several seeds:

    L2    the penalty lambda/2 ||theta||^2 in the gradient (torch weight_decay), every parameter
    CGES  after every optimizer step the group prox then the exclusive prox on every conv /
          Linear weight (input groups, mu ramping from 0.8 to 0.2 over the layers)

and measured at the end of training:

    accuracy            test accuracy of the final network (%)
    weight sparsity     % of conv + Linear weights that are exactly 0
    filter sparsity     % of conv filters (output channels) whose weights are all 0
    MACs                Conv/Linear multiply-accumulates per sample (prune.flops.macs_by_layer)
                        after removing every all-zero filter / Linear row and every input
                        channel that no longer carries anything: for each layer,
                        dense MACs x (live outputs / outputs) x (live inputs / inputs)

A unit is kept when some of its weights are nonzero and, along the chain of layers of these
sequential models, an output unit also needs a nonzero weight reading it in the next layer, and
an input unit a kept output feeding it in the previous layer (one pass each way). A removed
unit's constant output (its bias / BN beta through the ReLU) is folded into the next layer's
bias, which costs no MACs; as SCIENCE.md section 2 says, through zero padding that folding is
exact only away from the borders, so the MACs are those of the slimmed network such a folding
gives. Files in ``out_dir``: ``runs/`` (reused on rerun), ``cges_vs_l2.json``,
``.md`` and ``.csv`` (mean ± sample std over seeds).

Defaults are documented choices, not tuned values: the paper gives no strengths for these
networks. ``cges_strength`` is the lambda of the prox thresholds ``lr * lambda * mu``; on short
runs (800 steps of LeNet-5 on Fashion-MNIST) 5e-3 zeroed ~24% of the weights at the accuracy of
L2, 2e-2 ~65% at a few points of accuracy.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from sparsekern.data import dataset_info
from sparsekern.errors import ConfigError
from sparsekern.experiments import (
    ExperimentCommand,
    RunSettings,
    check_positive,
    load_run,
    option,
    train_runs,
    write_text,
)
from sparsekern.prune.flops import macs_by_layer
from sparsekern.report.tables import Table, markdown_table, mean_std
from sparsekern.train.config import RunConfig
from sparsekern.train.loop import read_result

OUTPUT_STEM = "cges_vs_l2"
MODELS = ("lenet5", "basicnet")
METHODS = ("L2", "CGES")
METRICS = {  # key -> column title
    "accuracy_pct": "accuracy (%)",
    "weight_sparsity_pct": "zero weights (%)",
    "filter_sparsity_pct": "zero conv filters (%)",
    "macs_m": "MACs (M)",
    "macs_pct": "MACs (% of dense)",
}
SPARSE_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class CgesVsL2Config(RunSettings):
    """Everything the CGES-versus-L2 experiment does (and RunSettings); every field is also a
    ``sparsekern cges-vs-l2`` flag."""

    out_dir: str = option("runs/cges-vs-l2", "output directory (trained runs, tables)")
    dataset: str = option("fashion-mnist", "dataset (sparsekern.data name)")
    data_root: str | None = option(None, "dataset directory (default: the data module's search path)")
    models: tuple[str, ...] = option(MODELS, f"models, from {', '.join(MODELS)}")
    basicnet_width: float = option(0.125, "width multiplier of BasicNet (0.125: 8..64 channels, ~50 ms a CPU step)")
    seeds: tuple[int, ...] = option((0, 1, 2), "training seeds (mean ± std over them)")
    epochs: int = option(10, "training epochs per run")
    steps: int | None = option(None, "step budget per run; overrides --epochs")
    batch_size: int = option(64, "mini-batch size")
    optimizer: str = option("momentum", "optimizer of every run (sparsekern.train name)")
    lr: float = option(0.01, "learning rate")
    lr_schedule: str = option("step", "lr schedule: x0.1 at 50% and 75% of the budget")
    l2_strength: float = option(5e-4, "L2: lambda of the penalty lambda/2 ||theta||^2")
    cges_strength: float = option(5e-3, "CGES: lambda (group share mu_l, exclusive share 1 - mu_l)")

    def __post_init__(self):
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ConfigError(f"models={self.models!r}: expected some of {', '.join(MODELS)} "
                              "(sequential models whose MACs after filter removal this experiment can count)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds!r}: expected distinct seeds")
        check_positive(self, ("basicnet_width", "epochs", "steps", "batch_size", "lr", "l2_strength",
                              "cges_strength", "workers"))

    def quick(self) -> "CgesVsL2Config":
        """A tiny version for tests and smoke runs: 2 seeds, 30 steps at lr 0.05 on 512 samples."""
        return replace(self, seeds=(0, 1), epochs=1, steps=30, batch_size=32, lr=0.05,
                       num_train_samples=512, num_test_samples=256, analyze_samples=64, eval_batch_size=256)

    def run_config(self, model: str, method: str, seed: int):
        """The sparsekern.train RunConfig of one (model, method, seed)."""
        reg = {"L2": ("l2", self.l2_strength), "CGES": ("cges", self.cges_strength)}[method]
        return RunConfig(
            model=model, width=self.basicnet_width if model == "basicnet" else 1.0, dataset=self.dataset,
            data_root=self.data_root, optimizer=self.optimizer, lr=self.lr, reg=reg[0], reg_strength=reg[1],
            batch_size=self.batch_size, epochs=self.epochs, steps=self.steps, lr_schedule=self.lr_schedule,
            seed=seed, selectivity="none", out_dir=str(Path(self.out_dir) / "runs"), **self.run_settings(),
        )


# ---------------------------------------------------------------------- measurements
def sparse_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's Conv2d / Linear layers, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SPARSE_LAYERS)]


@torch.no_grad()
def weight_sparsity(model: nn.Module) -> dict:
    """% of zero weights over every conv / Linear weight, and % of all-zero conv filters."""
    layers = sparse_layers(model)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    total = sum(m.weight.numel() for _, m in layers)
    convs = [m for _, m in layers if isinstance(m, nn.Conv2d)]
    dead = sum(int((m.weight.flatten(1) == 0).all(dim=1).sum()) for m in convs)
    filters = sum(m.out_channels for m in convs)
    return {"weight_sparsity_pct": 100.0 * zeros / total,
            "filter_sparsity_pct": 100.0 * dead / filters if filters else 0.0}


@torch.no_grad()
def macs_after_removal(model: nn.Module, input_shape) -> dict:
    """Dense MACs per sample and the MACs left after removing all-zero units (see the module doc)."""
    weight = next(model.parameters())
    sample = torch.zeros((1,) + tuple(input_shape[1:]), device=weight.device, dtype=weight.dtype)
    dense = macs_by_layer(model, (sample,))
    layers = sparse_layers(model)
    for name, m in layers:
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(f"{name}: grouped convolutions are not supported by this count")
    # Per layer, the output units (filters / rows) and the input units (channels / columns) that
    # have a nonzero weight. Consecutive layers of the chain share units when the sizes agree.
    outputs = [m.weight.ne(0).flatten(1).any(dim=1) for _, m in layers]
    inputs = [m.weight.ne(0).transpose(0, 1).flatten(1).any(dim=1) for _, m in layers]
    remaining = 0.0
    for i, (name, _) in enumerate(layers):
        live_out, live_in = outputs[i], inputs[i]
        if i + 1 < len(layers) and inputs[i + 1].numel() == live_out.numel():
            live_out = live_out & inputs[i + 1]  # nothing downstream reads this unit
        if i > 0 and outputs[i - 1].numel() == live_in.numel():
            live_in = live_in & outputs[i - 1]  # the unit feeding this input was removed
        kept = float(live_out.sum()) / live_out.numel() * float(live_in.sum()) / live_in.numel()
        remaining += dense[name] * kept
    total = sum(dense.values())
    return {"macs": total, "macs_after_removal": remaining, "macs_pct": 100.0 * remaining / total}


# ---------------------------------------------------------------------- the experiment
def run_cges_vs_l2(config: CgesVsL2Config, *, restart: bool = False, progress: bool = True, log=print) -> dict:
    """Train (or reuse) every model x method x seed, measure, write the files; returns cges_vs_l2.json's content."""
    runs = {(model, method, seed): config.run_config(model, method, seed)
            for model in config.models for method in METHODS for seed in config.seeds}
    train_runs(runs.values(), workers=config.workers, restart=restart, progress=progress, log=log)

    info = dataset_info(config.dataset)
    input_shape = (1, info.in_channels, info.image_size, info.image_size)
    per_run = {}
    for key, run in runs.items():
        model, _ = load_run(run, "cpu")
        macs = macs_after_removal(model, input_shape)
        per_run[key] = {
            "run_id": run.run_id(),
            "accuracy_pct": 100.0 * (1.0 - read_result(run.run_dir())["test_error"]),
            **weight_sparsity(model),
            "macs_m": macs["macs_after_removal"] / 1e6,
            "macs_pct": macs["macs_pct"],
            "dense_macs_m": macs["macs"] / 1e6,
        }
    groups = []
    for model in config.models:
        for method in METHODS:
            members = [per_run[model, method, seed] for seed in config.seeds]
            groups.append({"model": model, "method": method, "runs": [m["run_id"] for m in members],
                           "dense_macs_m": members[0]["dense_macs_m"],
                           **{key: mean_std([m[key] for m in members]) for key in METRICS}})
    results = {"config": asdict(config), "groups": groups,
               "runs": {f"{m}/{meth}/seed{s}": values for (m, meth, s), values in per_run.items()}}
    write_outputs(results, Path(config.out_dir))
    log(f"{Path(config.out_dir) / (OUTPUT_STEM + '.md')}: {len(groups)} settings, {len(config.seeds)} seeds")
    return results


def table_rows(results: dict) -> tuple[list[str], list[list]]:
    """(columns, rows): one line per model x method."""
    columns = ["model", "method", "dense MACs (M)"] + list(METRICS.values())
    width = results["config"]["basicnet_width"]
    lines = [[g["model"] if g["model"] != "basicnet" else f"basicnet (width {width:g})", g["method"],
              g["dense_macs_m"]] + [g[key] for key in METRICS] for g in results["groups"]]
    return columns, lines


def write_outputs(results: dict, out: Path) -> dict[str, Path]:
    """cges_vs_l2.json / .md / .csv in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    config = results["config"]
    columns, lines = table_rows(results)
    budget = f"{config['steps']} steps" if config["steps"] is not None else f"{config['epochs']} epochs"
    markdown = "\n".join([
        "# CGES versus L2: sparsity, accuracy and compute",
        "",
        f"Dataset `{config['dataset']}`; optimizer {config['optimizer']} lr {config['lr']:g} ({config['lr_schedule']} "
        f"schedule), batch {config['batch_size']}, {budget} per run; L2 lambda {config['l2_strength']:g}, CGES lambda "
        f"{config['cges_strength']:g}. Mean ± sample std over seeds {', '.join(map(str, config['seeds']))}.",
        "",
        "Zero weights: over every conv and Linear weight. Zero conv filters: output channels whose weights are all "
        "0. MACs: per sample, after removing all-zero filters / Linear rows and the inputs they fed (and inputs "
        "whose weights are all 0).",
        "",
        markdown_table(columns, lines),
        "",
    ])
    return {
        "json": write_text(out / f"{OUTPUT_STEM}.json", json.dumps(results, indent=1) + "\n"),
        "md": write_text(out / f"{OUTPUT_STEM}.md", markdown),
        "csv": write_text(out / f"{OUTPUT_STEM}.csv", Table(OUTPUT_STEM, "", columns, lines).to_csv()),
    }


# ---------------------------------------------------------------------- command line
COMMAND = ExperimentCommand("cges-vs-l2", CgesVsL2Config, run_cges_vs_l2, OUTPUT_STEM, doc=__doc__,
                            help="CGES versus L2 on LeNet-5 and BasicNet: sparsity, accuracy, MACs")
add_parser = COMMAND.add_parser  # the ``sparsekern cges-vs-l2`` subcommand (registered by sparsekern.cli)
