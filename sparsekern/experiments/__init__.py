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
also the command-line flags, the training of a list of runs, and loading a trained run back.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path


# ---------------------------------------------------------------------- configs and flags
def option(default, help: str):
    """A config field with its help text (shown by --help)."""
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default=tuple(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _parse_list(kind):
    def parse(text: str) -> tuple:
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip())

    parse.__name__ = f"comma-separated {kind.__name__} list"  # argparse names the type in errors
    return parse


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _field_kind(cls, name: str):
    """(parser for one flag value, the base type) of a dataclass field."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return _parse_list(args[0]), tuple
    if len(args) == 1 and type(None) in typing.get_args(hint):  # X | None
        return _parse_optional(args[0]), args[0]
    return hint, hint


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per field of the dataclass ``cls``; only flags given are set on the namespace."""
    group = parser.add_argument_group(f"{cls.__name__} (defaults in parentheses)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        parse, base = _field_kind(cls, f.name)
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        help_text = f"{f.metadata['help']} ({default})".replace("%", "%%")  # argparse %-formats help
        if base is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=parse, default=argparse.SUPPRESS, metavar=f.name.upper(),
                               help=help_text)


def config_from_args(cls, args: argparse.Namespace, base=None):
    """``base`` (default: ``cls()``) with the fields given as flags replaced; its ``data_root`` and
    ``device`` checked on this machine, before anything is trained."""
    from sparsekern.train.config import check_data_root
    from sparsekern.train.loop import resolve_device

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    config = dataclasses.replace(base if base is not None else cls(), **given)
    check_data_root(config.data_root, "command line")
    resolve_device(config.device)
    return config


def check_positive(config, names) -> None:
    """Raise ConfigError naming the first of ``names`` that is not a finite number > 0 (None allowed)."""
    from sparsekern.train.config import ConfigError

    for name in names:
        value = getattr(config, name)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}={value!r}: must be a finite number > 0")


# ---------------------------------------------------------------------- runs
def train_runs(configs, *, workers: int = 1, restart: bool = False, progress: bool = True, log=print) -> None:
    """Train every run config to its end (finished ones are skipped, partial ones resume).

    Raises RuntimeError naming the runs that failed, after the others have finished.
    """
    from sparsekern.train.sweep import run_many

    statuses = run_many(list(configs), workers=workers, restart=restart, progress=progress, log=log)
    failed = [f"{s['run_id']} ({s['error']})" for s in statuses if s["status"] == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} training run(s) failed: {'; '.join(failed)}")


def load_run(config, device: str = "cpu"):
    """(model with the run's final weights in eval mode, its Optimization with the final optimizer
    state) of a finished run of ``config``."""
    from sparsekern.data import dataset_info
    from sparsekern.train.checkpoint import load_checkpoint
    from sparsekern.train.loop import build_run_model, read_result, resolve_device, run_files
    from sparsekern.train.optim import Optimization

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
    from sparsekern.data import InMemoryImageDataset, get_dataset
    from sparsekern.train.loop import first_samples, resolve_device

    dataset = first_samples(get_dataset(config.dataset, train=False, root=config.data_root),
                            config.num_test_samples)
    return dataset.to(resolve_device(device)) if isinstance(dataset, InMemoryImageDataset) else dataset


# ---------------------------------------------------------------------- numbers and files
def mean_std(values) -> dict:
    """{"mean", "std" (sample std, None for one value), "n", "values"}: a table cell."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": values}


def markdown_table(columns: list[str], rows: list[list], digits: int = 2) -> str:
    """A markdown table; {"mean", "std"} cells print as ``mean ± std`` with ``digits`` decimals."""
    from sparsekern.report.tables import format_cell

    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("---" for _ in columns) + "|"]
    out += [line([format_cell(c, digits) for c in row]) for row in rows]
    return "\n".join(out)


def write_text(path: Path, text: str) -> Path:
    from sparsekern.train.checkpoint import atomic_write_text

    atomic_write_text(path, text)
    return path


__all__ = [
    "add_config_flags",
    "check_positive",
    "config_from_args",
    "load_run",
    "load_test_set",
    "markdown_table",
    "mean_std",
    "option",
    "train_runs",
    "write_text",
]
