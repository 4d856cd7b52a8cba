"""Experiments with explicit sparsity, each one command that trains (resumably), measures and
writes its tables:

    sparsekern keep-ratio --out runs/keep-ratio        # keep_ratio.py: the Split LBI pruning table
    sparsekern cges-vs-l2 --out runs/cges-vs-l2        # cges_vs_l2.py: CGES against plain L2
    sparsekern compare-methods --out runs/method-table # method_table.py: one table of five pruning methods

    from sparsekern.experiments.keep_ratio import KeepRatioConfig, run_keep_ratio
    run_keep_ratio(KeepRatioConfig(out_dir="runs/keep-ratio"))

Every training goes through ``sparsekern.train`` (one run directory per row and seed under
``<out>/runs``), so rerunning a command reuses finished runs and resumes interrupted ones.
This module holds what the experiments share: their configs as dataclasses whose fields are
also the command-line flags, their subcommand (``ExperimentCommand``), the training of a list of
runs, and loading a trained run back.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Callable

from sparsekern._deprecated import deprecated_names
from sparsekern._flags import add_config_flags, config_overrides
from sparsekern.data import InMemoryImageDataset, dataset_info, first_samples, get_dataset
from sparsekern.errors import ConfigError
from sparsekern.report import tables
from sparsekern.train.checkpoint import atomic_write_text, load_checkpoint
from sparsekern.train.config import check_data_root
from sparsekern.train.loop import build_run_model, read_result, resolve_device, run_files
from sparsekern.train.optim import Optimization
from sparsekern.train.sweep import run_many


# ---------------------------------------------------------------------- configs
def option(default, help: str):
    """A config field with its help text (shown by --help)."""
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default=tuple(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The fields every experiment config shares: how much data each run sees and where it runs.
    (A dataclass's inherited fields come first: in its flags and its JSON these lead.)"""

    num_train_samples: int | None = option(None, "train on the first N training samples only")
    num_test_samples: int | None = option(None, "evaluate on the first N test samples only")
    analyze_samples: int | None = option(10000, "samples of each run's final sparsity analysis")
    eval_batch_size: int = option(1000, "batch size of evaluations")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    threads: int | None = option(None, "torch threads per run (default: torch's, or split between workers)")
    workers: int = option(1, "runs trained in parallel (subprocesses)")

    def run_settings(self) -> dict:
        """These settings as RunConfig fields (``workers`` is the experiment's, not a run's)."""
        return dict(num_train_samples=self.num_train_samples, num_test_samples=self.num_test_samples,
                    analyze_samples=self.analyze_samples, eval_batch_size=self.eval_batch_size,
                    device=self.device, threads=self.threads)


def check_here(data_root, device: str, source: str) -> None:
    """ConfigError before anything is written when a config's data folder or device is not on this
    machine (``source`` names where the config came from)."""
    check_data_root(data_root, source)
    resolve_device(device)


def config_from_args(cls, args: argparse.Namespace, base=None):
    """``base`` (default: ``cls()``) with the fields given as flags replaced; its ``data_root`` and
    ``device`` checked on this machine, before anything is trained."""
    config = dataclasses.replace(base if base is not None else cls(), **config_overrides(cls, args))
    check_here(config.data_root, config.device, "command line")
    return config


def check_positive(config, names) -> None:
    """Raise ConfigError naming the first of ``names`` that is not a finite number > 0 (None allowed)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}={value!r}: must be a finite number > 0")


# ---------------------------------------------------------------------- subcommands
def log_to_stderr(message: str) -> None:
    """Progress messages of a command go to stderr; stdout keeps its one JSON line."""
    print(message, file=sys.stderr)


@dataclasses.dataclass
class ExperimentCommand:
    """The ``sparsekern <name>`` subcommand of one experiment.

    Flags: ``--out`` (= ``--out-dir``), ``--quick`` (``config().quick()`` as the base), ``--restart``,
    ``--no-progress`` and one per field of ``config``. It builds the config, checks its data folder
    and device, calls ``run(config, restart=, progress=, log=)`` and prints one JSON line with the
    output directory and the table ``<out_dir>/<output_stem>.md``. (Not frozen: a test may replace
    ``run`` with a recorder.)
    """

    name: str
    config: type
    run: Callable[..., dict]
    output_stem: str
    help: str
    doc: str  # the experiment module's docstring: its first paragraph is the --help description
    restart_help: str = "retrain every run from scratch"

    def add_parser(self, subparsers, func: Callable[[argparse.Namespace], int] | None = None):
        """Add the subcommand; ``func`` (default: :meth:`main`) runs it. Returns the parser, for extra flags."""
        p = subparsers.add_parser(self.name, help=self.help, description=self.doc.split("\n\n")[0])
        p.add_argument("--out", dest="out_dir", default=argparse.SUPPRESS, help="same as --out-dir")
        p.add_argument("--quick", action="store_true", help="tiny budget (tests, smoke runs); other flags still apply")
        p.add_argument("--restart", action="store_true", help=self.restart_help)
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        add_config_flags(p, self.config, f"experiment configuration ({self.config.__name__})")
        p.set_defaults(func=func or self.main)
        return p

    def main(self, args: argparse.Namespace) -> int:
        base = self.config().quick() if args.quick else self.config()
        config = config_from_args(self.config, args, base)
        self.run(config, restart=args.restart, progress=not args.no_progress, log=log_to_stderr)
        print(json.dumps({"out_dir": config.out_dir, "table": str(Path(config.out_dir) / f"{self.output_stem}.md")}))
        return 0


# ---------------------------------------------------------------------- runs
def train_runs(configs, *, workers: int = 1, restart: bool = False, progress: bool = True, log=print) -> None:
    """Train every run config to its end (finished ones are skipped, partial ones resume).

    Raises RuntimeError naming the runs that failed, after the others have finished.
    """
    statuses = run_many(list(configs), workers=workers, restart=restart, progress=progress, log=log)
    failed = [f"{s['run_id']} ({s['error']})" for s in statuses if s["status"] == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} training run(s) failed: {'; '.join(failed)}")


def load_run(config, device: str = "cpu"):
    """(model with the run's final weights in eval mode, its Optimization with the final optimizer
    state) of a finished run of ``config``."""
    result = read_result(config.run_dir())
    if result is None:
        raise FileNotFoundError(f"{config.run_dir()}: the run has not finished (no result.json)")
    target = resolve_device(device)
    model = build_run_model(config, dataset_info(config.dataset)).to(target)
    state = load_checkpoint(run_files(config.run_dir())["checkpoint"], config_hash=config.config_hash(),
                            config=config.identity(), map_location=target)
    if state["step"] != result["steps"]:
        raise RuntimeError(f"{config.run_dir()}: checkpoint is at step {state['step']}, not the final "
                           f"step {result['steps']}; rerun with --restart")
    model.load_state_dict(state["model"])
    optimization = Optimization(config, model, total_steps=result["steps"])
    optimization.load_state_dict(state["optimization"])
    return model.eval(), optimization


def load_test_set(config, device: str = "cpu"):
    """The test split the runs of ``config`` were evaluated on (first ``num_test_samples``)."""
    dataset = first_samples(get_dataset(config.dataset, train=False, root=config.data_root),
                            config.num_test_samples)
    return dataset.to(resolve_device(device)) if isinstance(dataset, InMemoryImageDataset) else dataset


# ---------------------------------------------------------------------- files
def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a reader never sees half a table); returns ``path``."""
    atomic_write_text(path, text)
    return path


# Moved to sparsekern.report.tables, next to the cell format they make and print.
__getattr__ = deprecated_names(__name__, {"mean_std": tables.mean_std, "markdown_table": tables.markdown_table})

__all__ = [
    "ExperimentCommand",
    "RunSettings",
    "add_config_flags",
    "check_here",
    "check_positive",
    "config_from_args",
    "load_run",
    "load_test_set",
    "log_to_stderr",
    "option",
    "train_runs",
    "write_text",
]
