"""``sparsekern`` / ``python -m sparsekern``: train, sweep, report, analyze, demo, info.

    sparsekern train --width 0.25 --batch-size 20 --steps 5000 --eval-every 500 --out-dir runs
    sparsekern train --config run.toml --lr 2e-3        # flags override the TOML file
    sparsekern sweep --config sweep.toml --out sweeps/t1 --workers 2
    sparsekern report sweeps/t1
    sparsekern analyze runs/<run id> --split train --json stats.json
    sparsekern analyze --model timm:resnet18 --model-args num_classes=10 --weights r18.safetensors \
        --data imagefolder:photos --input-size 64         # any model: torchvision:, timm:, package.module:factory
    sparsekern demo [--full] [--out DIR]
    sparsekern keep-ratio --out runs/keep-ratio     # Split LBI keep-ratio table (sparsekern.experiments)
    sparsekern cges-vs-l2 --out runs/cges-vs-l2
    sparsekern compare-methods --out runs/method-table   # implicit vs L1-norm, Slimming, CGES, Split LBI
    sparsekern prune runs/<run id> --by activation      # exact removal of dead filters (sparsekern.cli_prune)
    sparsekern prune --model torchvision:resnet50 --weights r50.pth --data imagefolder:val --out pruned --onnx p.onnx
    sparsekern bench runs/<run id>/pruned-activation    # dense vs pruned speed
    sparsekern harvest runs/<run id> --slimming-run runs/<id>   # vs L1-norm pruning, Network Slimming
    sparsekern info

Subcommands are registered in ``SUBCOMMANDS`` (name -> function that adds its parser); a new
one (``prune``, ``bench``) is one more entry there. A registrar adds a sub-parser and sets
``func``: a function of the parsed args returning the exit code.

Errors: argparse's own (a bad flag) exit 2 with its usage message. Any exception from a
subcommand becomes one line ``sparsekern <cmd>: error: <message>`` on stderr and exit code 2
(the project's own errors by their message, anything else as ``Type: message``); Ctrl-C exits
130. ``sparsekern --debug <cmd>`` or ``SPARSEKERN_DEBUG=1`` re-raises instead, with the traceback.
Counts given as flags are checked by ``positive_int`` / ``int_at_least``, directories by
``existing_directory``, devices (present on this machine) by ``available_device``.

A model from elsewhere instead of a run directory (``analyze``, ``prune``, ``bench``):
``add_model_flags`` adds ``--model`` / ``--model-args`` / ``--weights`` / ``--seed`` / ``--data`` /
``--input-size``; ``external_model_from_args`` builds the model (``sparsekern.models.external``) and
``external_data_from_args`` its corpus (``sparsekern.data.specs``), sized and normalised for it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from sparsekern._backend import backends
from sparsekern._flags import add_config_flags, comma_list, config_overrides, field_kind
from sparsekern.data import InMemoryImageDataset, first_samples, get_dataset, make_loader
from sparsekern.data.specs import DATA_FORMS, load_data, parse_data_spec
from sparsekern.errors import ConfigError, SparsekernError
from sparsekern.models.external import SPEC_FORMS, ExternalModel, load_external
from sparsekern.experiments import check_here, log_to_stderr
from sparsekern.stats.analyze import analyze
from sparsekern.train.config import RunConfig
from sparsekern.train.distributed import launched_ranks, session
from sparsekern.train.loop import load_trained, resolve_device
from sparsekern.train.report import write_report

DEBUG_ENV = "SPARSEKERN_DEBUG"

RUN_FLAGS_TITLE = "run configuration (override --config)"
GRID_FLAGS = {  # sweep flag -> RunConfig field it lists values of
    "optimizers": "optimizer",
    "regs": "reg",
    "strengths": "reg_strength",
    "batch_sizes": "batch_size",
    "widths": "width",
    "seeds": "seed",
}


# ---------------------------------------------------------------------- flag types
def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``. A count of 0 or -3 is a mistake to report, not to run with."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


positive_int = int_at_least(1)


def existing_directory(text: str) -> str:
    """An argparse type: a directory that exists (an explicit --data-root is never silently replaced)."""
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing directory")
    return text


def available_device(text: str) -> str:
    """An argparse type: auto, or a device this machine has (see ``resolve_device``); kept as the name."""
    try:
        resolve_device(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def input_size(text: str):
    """An argparse type: ``N`` (N x N) or ``HxW``, positive."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) not in (1, 2) or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive integers, got {text!r}")
    return values[0] if len(values) == 1 or values[0] == values[1] else values


# ---------------------------------------------------------------------- a model from elsewhere
MODEL_FLAGS = ("model_args", "weights", "data", "input_size")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --model-args, --weights, --seed, --data, --input-size: a model from elsewhere."""
    group = p.add_argument_group("a model from elsewhere (instead of a run directory)")
    group.add_argument("--model", metavar="SPEC", help=f"{SPEC_FORMS} (e.g. torchvision:resnet50, timm:resnet18, "
                                                       "mypkg.nets:build); never downloads weights")
    group.add_argument("--model-args", metavar="K=V,...",
                       help="keyword arguments of the model's builder, as Python literals (e.g. num_classes=10)")
    group.add_argument("--weights", metavar="FILE",
                       help="local .pth / .pt (torch.load(weights_only=True): tensors only, no pickles) or "
                            ".safetensors; a state dict or one under state_dict / model / model_state, loaded "
                            "strictly. Without it the model is randomly initialised")
    group.add_argument("--seed", type=int, default=0, help="torch seed of the random initialisation (default 0)")
    group.add_argument("--data", metavar="SPEC", help=f"corpus: {DATA_FORMS} (--data-root: where "
                                                                       "Fashion-MNIST is)")
    group.add_argument("--input-size", type=input_size, metavar="N|HxW",
                       help="input size (default: timm's data config of the model, else 224)")


def external_model_from_args(args, command: str) -> ExternalModel | None:
    """The --model of ``args`` built, its --weights loaded (None without --model; the other model
    flags without --model are a ConfigError; --model needs --data, checked first). Says on stderr
    when the weights are random."""
    if args.model is None:
        _check_no_model_flags(args)
        return None
    if args.data is None:
        raise ConfigError(f"--model needs --data: the corpus to measure on ({DATA_FORMS})")
    parse_data_spec(args.data)  # a bad --data fails before the model is built
    torch.manual_seed(args.seed)
    ext = load_external(args.model, args.model_args, args.weights, args.input_size)
    if args.weights is None:
        print(f"sparsekern {command}: no --weights: {args.model} is randomly initialised (seed {args.seed})",
              file=sys.stderr)
    return ext


def external_data_from_args(args, ext: ExternalModel, split: str):
    """The --data corpus of ``args`` (split "train" or "test"), brought to ``ext``'s input; an
    in-memory one is moved to the model's device (batches are built there), as a run's is."""
    dataset = load_data(parse_data_spec(args.data), train=split == "train", input_size=ext.input_size,
                        mean=ext.mean, std=ext.std, interpolation=ext.interpolation, crop_pct=ext.crop_pct,
                        root=getattr(args, "data_root", None), seed=args.seed)
    parameter = next(ext.model.parameters(), None)
    if isinstance(dataset, InMemoryImageDataset) and parameter is not None:
        dataset.to(parameter.device)
    return dataset


def _check_no_model_flags(args) -> None:
    given = [f"--{name.replace('_', '-')}" for name in MODEL_FLAGS if getattr(args, name, None) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with --model "
                          "(a model from elsewhere); a run directory brings its own model and data")


def check_one_source(args, positional: str, command: str) -> None:
    """Exactly one of the run directory ``positional`` and --model (and no model flag without --model)."""
    if args.model is None:
        _check_no_model_flags(args)
    given = getattr(args, positional) is not None
    if given and args.model is not None:
        raise ConfigError(f"give a run directory or --model, not both ({getattr(args, positional)} and "
                          f"--model {args.model})")
    if not given and args.model is None:
        raise ConfigError(f"sparsekern {command} needs a run directory or --model SPEC ({SPEC_FORMS})")


# ---------------------------------------------------------------------- config flags
def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults, then the --config TOML file, then the flags given; its data_root and device checked here."""
    overrides = config_overrides(RunConfig, args)
    source = args.config or "command line"
    if args.config is not None:
        config = RunConfig.from_toml(args.config, overrides)
    else:
        config = RunConfig.from_dict(overrides, source=source)
    check_here(config.data_root, config.device, source)
    return config


# ---------------------------------------------------------------------- subcommands
def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one run (resumes from its checkpoint)",
                              description="Train one run; rerunning the same command resumes it.")
    p.add_argument("--config", help="TOML file with RunConfig fields (flat, or under [run])")
    p.add_argument("--restart", action="store_true", help="discard an existing checkpoint / result and start over")
    p.add_argument("--stop-after", type=positive_int, metavar="STEP",
                   help="stop (checkpointed) at the first eval point at or after STEP; rerun to continue")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_flags(p, RunConfig, RUN_FLAGS_TITLE)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from sparsekern.train.loop import train  # looked up when the command runs (tests replace it)

    config = run_config_from_args(args)
    result = train(config, restart=args.restart, stop_after=args.stop_after, progress=not args.no_progress,
                   log=log_to_stderr)
    # Under torchrun every rank returns the result; rank 0 prints it, with the run directory of
    # the run as launched (its id names the ranks: train fills them in from WORLD_SIZE).
    if result is not None and os.environ.get("RANK", "0") == "0":
        if config.ranks is None and launched_ranks() > 1:
            config = config.replace(ranks=launched_ranks())
        total = result["total"]
        print(json.dumps({"run_dir": str(config.run_dir()), "test_error": result["test_error"],
                          "dead_by_activation_pct": total["dead_by_activation_pct"],
                          "dead_by_gamma_pct": total["dead_by_gamma_pct"]}))
    return 0


def _add_sweep(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a grid of runs (resumable, parallel) and summarise over seeds",
                              description="Run a grid of configurations; completed runs are skipped on rerun.")
    p.add_argument("--config", help="sweep TOML file with [base] and [grid] tables")
    p.add_argument("--out", required=True, help="sweep directory (runs/, sweep_summary.json)")
    p.add_argument("--workers", type=positive_int, default=1, help="parallel runs (subprocesses); threads are split")
    p.add_argument("--restart", action="store_true", help="rerun every run from scratch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report", action="store_true", help="also write the report when the sweep is done")
    launch = p.add_argument_group("where the runs go")
    launch.add_argument("--launcher", choices=("local", "submitit"), default="local",
                        help="local: this machine (--workers processes); submitit: one job array on a scheduler "
                             "(Slurm when sbatch is found, else submitit's local executor)")
    launch.add_argument("--cluster", choices=("auto", "local", "slurm"), default="auto",
                        help="submitit's executor (default auto)")
    launch.add_argument("--slurm", type=slurm_options, default={}, metavar="KEY=VALUE,...",
                        help="Slurm options for --launcher submitit, e.g. partition=gpu,time=240,gpus_per_node=1,"
                             "cpus_per_task=8,mem_gb=32,array_parallelism=16")
    grid = p.add_argument_group("grid (comma-separated values; override [grid])")
    for flag, field in GRID_FLAGS.items():
        grid.add_argument("--" + flag.replace("_", "-"), dest=f"grid_{field}", default=argparse.SUPPRESS,
                          metavar="V1,V2", help=f"values of {field}")
    add_config_flags(p, RunConfig, RUN_FLAGS_TITLE, exclude=("out_dir", "name"))
    p.set_defaults(func=_cmd_sweep)


def slurm_options(text: str) -> dict:
    """``partition=gpu,time=240`` -> {"partition": "gpu", "time": 240} (numbers where they parse)."""
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE (e.g. partition=gpu)")
        value = value.strip()
        try:
            options[key.strip()] = int(value)
        except ValueError:
            options[key.strip()] = value
    return options


def _grid_from_args(args) -> dict:
    grid = {}
    for field in GRID_FLAGS.values():
        text = getattr(args, f"grid_{field}", None)
        if text is None:
            continue
        try:
            grid[field] = list(comma_list(field_kind(RunConfig, field).base)(text))
        except ValueError as exc:
            raise ConfigError(f"grid {field}={text!r}: {exc}") from None
    return grid


def _cmd_sweep(args) -> int:
    from sparsekern.train.sweep import expand_grid, load_sweep, run_sweep  # likewise

    if args.config is not None:
        base, grid = load_sweep(args.config, config_overrides(RunConfig, args), _grid_from_args(args))
    else:
        base, grid = config_overrides(RunConfig, args), _grid_from_args(args)
    for config in expand_grid(base, grid, args.out):  # every run's config, before anything is written
        check_here(config.data_root, config.device, args.config or "command line")
    summary = run_sweep(args.out, base, grid, workers=args.workers, restart=args.restart,
                        progress=not args.no_progress, log=log_to_stderr, launcher=args.launcher,
                        cluster=args.cluster, slurm=args.slurm)
    if args.report:
        write_report(args.out, log=log_to_stderr)
    return 1 if summary["failed"] else 0


def _add_report(subparsers) -> None:
    p = subparsers.add_parser("report", help="tables (markdown, CSV) and figures (PNG) of a run or sweep",
                              description="Write report.md with the paper's tables and figures.")
    p.add_argument("source", help="a sweep directory (sweep_summary.json) or a run directory (result.json)")
    p.add_argument("--out", help="output directory (default: the source directory)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    write_report(args.source, args.out, log=print)
    return 0


def _add_analyze(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="per-layer sparsity of a trained checkpoint (or any model) over a dataset",
                              description="Measure every post-ReLU feature of a checkpoint, or of a model from "
                                          "elsewhere (--model), over a corpus.")
    p.add_argument("checkpoint", nargs="?",
                   help="a run directory or its checkpoint.pt (config.toml must be beside it); or use --model")
    p.add_argument("--dataset", help="dataset to measure on (default: the run's)")
    p.add_argument("--data-root", type=existing_directory, help="dataset directory (default: the run's)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="which split (default: train)")
    p.add_argument("--samples", type=positive_int, help="only the first N samples")
    p.add_argument("--batch-size", type=positive_int, default=500)
    p.add_argument("--workers", type=int_at_least(0), default=0,
                   help="DataLoader worker processes decoding the images of imagefolder: (default 0: in this process; "
                        "in-memory corpora need none)")
    p.add_argument("--selectivity", default="two-pass", help="two-pass | exact | histogram | memmap | none")
    p.add_argument("--device", type=available_device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    p.add_argument("--no-progress", action="store_true")
    add_model_flags(p)
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args) -> int:
    check_one_source(args, "checkpoint", "analyze")
    # Under torchrun each rank analyses its shard of the corpus (make_loader shards it) and the
    # statistics are all-reduced: every rank gets the one-process result; rank 0 prints it.
    with session(args.device) as context:
        device = context.device(resolve_device(args.device))
        ext = external_model_from_args(args, "analyze")
        if ext is None:
            model, config = load_trained(args.checkpoint, str(device))
            dataset = get_dataset(args.dataset or config.dataset, train=args.split == "train",
                                  root=args.data_root or config.data_root)
            source = {"checkpoint": str(args.checkpoint)}
        else:
            if args.dataset is not None:
                raise ConfigError("--dataset names a run's dataset; with --model give the corpus with --data")
            model = ext.model.to(device)
            dataset = external_data_from_args(args, ext, args.split)
            source = {"model": args.model, "model_args": args.model_args, "weights": ext.weights,
                      "data": str(parse_data_spec(args.data)), "input_size": list(ext.input_size)}
        corpus = first_samples(dataset, args.samples)
        in_memory = isinstance(corpus, InMemoryImageDataset)  # batches are cut from tensors: no decoding
        loader = make_loader(corpus, args.batch_size, shuffle=False, num_workers=0 if in_memory else args.workers,
                             pin_memory=device.type == "cuda" and not in_memory)
        result = analyze(model, loader, selectivity=args.selectivity, progress=not args.no_progress)
        if context.is_main:
            print(result)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump({**source, "split": args.split, "ranks": context.world, **result.to_dict()}, fh,
                              indent=1)
    return 0


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the project's main job: 4 optimizer/regulariser settings on "
                                           "Fashion-MNIST, with tables and figures",
                              description="Train BasicNet on Fashion-MNIST under Adam+L2, mSGD+L2, Adam without "
                                          "regularisation and Adam+WD; measure sparsity; write a report.")
    p.add_argument("--full", action="store_true", help="the paper-scale configuration (hours on a CPU)")
    p.add_argument("--out", default=None, help="output directory (default: runs/demo or runs/demo-full)")
    p.add_argument("--workers", type=positive_int, help="parallel runs (default: 2 on CPU, 1 on GPU)")
    p.add_argument("--restart", action="store_true", help="rerun every configuration from scratch")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from sparsekern.demo import run_demo

    summary = run_demo(out=args.out, full=args.full, workers=args.workers, restart=args.restart,
                       progress=not args.no_progress)
    return 1 if summary["failed"] else 0


def _add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="available kernel backends and build information")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args) -> int:
    print(json.dumps(backends(), indent=2, default=str))
    return 0


def _add_from(module: str, function: str = "add_parser") -> Callable:
    """The registrar ``sparsekern.<module>.<function>``, imported when the parser is built (so those
    modules, which use the flag types above, are not imported with this one)."""
    def register(subparsers) -> None:
        import importlib

        getattr(importlib.import_module(f"sparsekern.{module}"), function)(subparsers)

    return register


SUBCOMMANDS: dict[str, Callable] = {
    "train": _add_train,
    "sweep": _add_sweep,
    "report": _add_report,
    "analyze": _add_analyze,
    "demo": _add_demo,
    "info": _add_info,
    "keep-ratio": _add_from("experiments.keep_ratio"),
    "compare-methods": _add_from("experiments.method_table"),
    "cges-vs-l2": _add_from("experiments.cges_vs_l2"),
    "prune": _add_from("cli_prune", "add_prune"),
    "bench": _add_from("cli_prune", "add_bench"),
    "harvest": _add_from("cli_prune", "add_harvest"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsekern", description="Measure and harvest filter-level sparsity in CNNs.")
    parser.add_argument("--debug", action="store_true",
                        help=f"on an error, raise it with its traceback instead of one line (also: {DEBUG_ENV}=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS.values():
        register(subparsers)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``sparsekern`` console script; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"sparsekern {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        # The message says what is wrong; a traceback would only bury it (--debug shows it).
        print(f"sparsekern {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2


def error_line(exc: BaseException) -> str:
    """One line for an error: the project's own errors (``sparsekern.errors``) and bad input
    (ValueError, a missing file) by their message; any other exception with its type, since
    "'foo'" alone does not say that a KeyError happened."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, (SparsekernError, ValueError, FileNotFoundError)) and message:
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
