"""Sweeps: a grid of runs, resumable, optionally parallel, summarised as mean +- std over seeds.

A sweep file (TOML)::

    [base]                      # any RunConfig field, shared by every run
    model = "basicnet"
    steps = 4000
    eval_every = 500

    [grid]                      # RunConfig field -> the values to try (the cartesian product)
    optimizer = ["adam", "momentum"]
    reg = ["none", "l2", "wd"]
    reg_strength = [1e-4, 5e-4]
    seed = [0, 1, 2]

``reg = "none"`` ignores the strength, so its copies collapse into one run per other setting.
Runs live in ``<sweep_dir>/runs/<run_id>``; a run whose result.json exists is skipped, a
partial one resumes from its checkpoint. With ``workers > 1`` each run is a subprocess
(``python -m sparsekern train --config <run>/config.toml``, log in ``<run>/train.log``) and
the CPU threads are split between the workers; each worker's run writes ``<run>/progress.json``
and the sweep draws one progress line per worker from it (``progress.py``). Every run holds
its directory's lock: a run that another live process is training is reported as failed,
naming that process, and the others go on. With ``launcher="submitit"`` the pending runs are
one job array on a scheduler instead (Slurm; submitit's local executor in the tests), with the
same run directories and summary (``launchers.py``). ``sweep_summary.json`` groups the runs that
differ only in their seed and gives mean and sample standard deviation (ddof=1; None for a
single seed) of the test error and the sparsity numbers, in total and per layer.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sparsekern.report.tables import mean_std
from sparsekern.train.checkpoint import RunLockedError, atomic_write_text, ensure_unlocked
from sparsekern.train.config import NOT_IDENTITY, ConfigError, RunConfig, config_fields, dumps_toml, load_toml
from sparsekern.train.launchers import LAUNCHERS, run_with_submitit
from sparsekern.train.loop import read_result, run_files, train
from sparsekern.train.progress import PROGRESS_FILE, PROGRESS_FILE_ENV, ProgressConsole, read_progress_file

SUMMARY_FILE = "sweep_summary.json"
SPEC_FILE = "sweep.toml"
# The numbers summarised per group: result.json "total" keys, plus the test error.
TOTAL_METRICS = ("dead_by_activation_pct", "dead_by_gamma_pct", "dead_by_activation_loose_pct",
                 "dead_by_gamma_loose_pct")
LAYER_METRICS = ("dead_by_activation", "dead_by_gamma")
OPTIMIZER_LABELS = {"sgd": "SGD", "momentum": "mSGD", "adam": "Adam", "adamax": "AdaMax", "adagrad": "AdaGrad",
                    "adadelta": "AdaDelta", "rmsprop": "RMSProp"}


def load_sweep(path, base_overrides: dict | None = None, grid_overrides: dict | None = None):
    """(base values, grid) from a sweep TOML file, with command-line overrides applied.

    Anything but a [base] and a [grid] table of RunConfig fields raises ConfigError naming it.
    """
    spec = load_toml(path)
    unknown = [k for k in spec if k not in ("base", "grid") or not isinstance(spec[k], dict)]
    if unknown:
        what = f"table [{unknown[0]}]" if isinstance(spec[unknown[0]], dict) else f"key {unknown[0]!r} outside a table"
        raise ConfigError(f"{path}: unknown {what}; a sweep file has only a [base] and a [grid] table")
    fields = [f.name for f in config_fields()]
    for table in ("base", "grid"):
        unknown = [k for k in spec.get(table, {}) if k not in fields]
        if unknown:
            raise ConfigError(f"{path}: [{table}] has unknown field {unknown[0]!r}; known: {', '.join(fields)}")
    return {**spec.get("base", {}), **(base_overrides or {})}, {**spec.get("grid", {}), **(grid_overrides or {})}


def expand_grid(base: dict, grid: dict, sweep_dir) -> list[RunConfig]:
    """Every combination of the grid on top of ``base``, as validated configs (duplicates dropped).

    Runs go to ``<sweep_dir>/runs``; ``out_dir`` and ``name`` in ``base`` are not allowed.
    """
    for key in ("out_dir", "name"):
        if key in base or key in grid:
            raise ConfigError(f"{key}: set by the sweep (runs go to <sweep_dir>/runs/<run id>), not by the sweep file")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}={values!r}: expected a non-empty list of values")
    keys = list(grid)
    configs, seen = [], set()
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = {**base, **dict(zip(keys, combo)), "out_dir": str(Path(sweep_dir) / "runs")}
        config = RunConfig.from_dict(values, source=f"sweep run {dict(zip(keys, combo))}")
        if config.run_id() not in seen:
            seen.add(config.run_id())
            configs.append(config)
    return configs


def write_spec(sweep_dir, base: dict, grid: dict) -> None:
    """Record what the sweep was asked to run (``sweep.toml`` in the sweep directory)."""
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(sweep_dir) / SPEC_FILE, dumps_toml({}, {"base": base, "grid": grid}))


def run_many(configs: list[RunConfig], *, workers: int = 1, restart: bool = False, progress: bool = True,
             log=print, launcher: str = "local", sweep_dir=None, cluster: str = "auto",
             slurm: dict | None = None) -> list[dict]:
    """Run every config (skipping finished ones); one status dict per config, in order.

    A status has ``run_id``, ``run_dir``, ``status`` (done | skipped | failed) and ``error``.
    A failed run does not stop the others. ``launcher="submitit"`` sends the pending runs to a
    scheduler as one job array (``launchers.py``; ``sweep_dir`` holds its files, ``cluster``
    and ``slurm`` say where and how); ``workers`` applies to the local launcher only.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {launcher!r}; expected one of {', '.join(LAUNCHERS)}")
    if launcher == "submitit" and sweep_dir is None:
        raise ValueError("run_many: launcher='submitit' needs sweep_dir (where its job files go)")
    statuses, pending = [], []
    for config in configs:
        status = {"run_id": config.run_id(), "run_dir": str(config.run_dir()), "status": "pending", "error": None}
        statuses.append(status)
        if not restart and is_finished(config):
            status["status"] = "skipped"
        else:
            pending.append((config, status))
    log(f"{len(configs)} runs: {len(configs) - len(pending)} already complete, {len(pending)} to run"
        + (f" with {workers} workers" if workers > 1 and pending and launcher == "local" else ""))
    if launcher == "submitit":
        run_with_submitit(pending, sweep_dir, restart=restart, cluster=cluster, slurm=slurm, log=log)
    elif workers == 1:
        for config, status in pending:
            try:
                train(config, restart=restart, progress=progress, log=log)
                status["status"] = "done"
            except Exception as exc:  # one broken run must not lose the rest of the sweep
                status.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                log(f"run {config.run_id()} failed: {status['error']}")
    else:
        _run_in_subprocesses(pending, workers, restart, progress, log)
    return statuses


def is_finished(config: RunConfig) -> bool:
    """Whether ``config``'s run is done: its directory has a result.json of this very configuration."""
    result = read_result(config.run_dir())
    return result is not None and result.get("config_hash") == config.config_hash()


def _run_in_subprocesses(pending, workers: int, restart: bool, progress: bool, log) -> None:
    """Each run in a ``sparsekern train`` subprocess, ``workers`` at a time. With ``progress``, each
    worker slot is one line of a ProgressConsole, drawn from the progress file its run writes."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    console = ProgressConsole() if progress else None
    say = log if console is None else (lambda message: console.write(log, message))
    queue = list(pending)
    running = {}  # worker slot -> (process, status)
    try:
        while queue or running:
            for slot in range(workers):
                while slot not in running and queue:
                    config, status = queue.pop(0)
                    process = _start_worker(config.replace(threads=config.threads or threads), status, restart,
                                            progress, say)
                    if process is not None:
                        running[slot] = (process, status)
            time.sleep(0.2)
            for slot, (process, status) in list(running.items()):
                returncode = process.poll()  # before reading the record: a finished run's last one is on disk
                progress_file = Path(status["run_dir"]) / PROGRESS_FILE
                record = read_progress_file(progress_file) if console is not None else None
                if record is not None:
                    console.show(slot, record, last=returncode is not None)
                if returncode is None:
                    continue
                del running[slot]
                progress_file.unlink(missing_ok=True)
                _finish_worker(returncode, status, say)
    finally:
        if console is not None:
            console.close()


def _start_worker(config: RunConfig, status: dict, restart: bool, progress: bool, say):
    """The ``sparsekern train`` subprocess of ``config`` (log in <run>/train.log), or None when another
    process holds the run's lock (the status says which)."""
    try:
        ensure_unlocked(config.run_dir())  # before touching its files; the worker takes the lock itself
    except RunLockedError as exc:
        status.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        say(f"run {status['run_id']} not started: {exc}")
        return None
    files = run_files(config.run_dir())
    config.run_dir().mkdir(parents=True, exist_ok=True)
    atomic_write_text(files["config"], config.to_toml())
    command = [sys.executable, "-m", "sparsekern", "train", "--config", str(files["config"]), "--no-progress"]
    if restart:
        command.append("--restart")
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads)}
    progress_file = config.run_dir() / PROGRESS_FILE
    progress_file.unlink(missing_ok=True)  # a killed attempt's record is not this one's progress
    env.pop(PROGRESS_FILE_ENV, None)
    if progress:
        env[PROGRESS_FILE_ENV] = str(progress_file)
    with (config.run_dir() / "train.log").open("w") as handle:  # the subprocess keeps its own copy
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    say(f"started {config.run_id()} ({config.threads} threads)")
    return process


def _finish_worker(returncode: int, status: dict, say) -> None:
    if returncode == 0:
        status["status"] = "done"
        say(f"finished {status['run_id']}")
        return
    tail = (Path(status["run_dir"]) / "train.log").read_text().strip().splitlines()[-1:]
    status.update(status="failed", error=f"exit code {returncode}: {' '.join(tail)}")
    say(f"run {status['run_id']} failed ({status['error']}); log: {status['run_dir']}/train.log")


# ---------------------------------------------------------------------- summary
def varying_fields(configs: list[dict]) -> list[str]:
    """Identity fields (seed excluded) that take more than one value across ``configs``."""
    if not configs:
        return []
    keys = [k for k in configs[0] if k != "seed"]
    return [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]


def group_label(config: dict, fields: list[str]) -> str:
    """A short name for a group: 'Adam L2 0.0005', 'mSGD WD 0.0001 b64', 'Adam no reg'."""
    parts = []
    for key in fields or ["optimizer", "reg", "reg_strength"]:
        value = config[key]
        if key == "optimizer":
            parts.append(OPTIMIZER_LABELS.get(value, value))
        elif key == "reg":
            parts.append("no reg" if value == "none" else value.upper())
        elif key == "reg_strength":
            if config["reg"] != "none":
                parts.append(f"{value:g}")
        elif key == "batch_size":
            parts.append(f"b{value}")
        elif key == "width":
            parts.append(f"w{value:g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def summarize(results: list[dict], labels: dict | None = None) -> dict:
    """Group results that differ only in the seed; mean +- std of the test error and sparsity.

    ``results``: result.json contents. ``labels``: optional run_id -> group label.
    """
    # A field missing from an older result.json (added to RunConfig since) takes its default, so
    # runs of the same configuration group together across package versions.
    defaults = {f.name: f.default for f in config_fields() if f.name not in NOT_IDENTITY}
    identities = [{k: r["config"].get(k, default) for k, default in defaults.items()} for r in results]
    fields = varying_fields(identities)
    groups: dict[str, dict] = {}
    for result, identity in zip(results, identities):
        key = json.dumps({k: v for k, v in identity.items() if k != "seed"}, sort_keys=True)
        group = groups.setdefault(key, {
            "label": (labels or {}).get(result["run_id"]) or group_label(identity, fields),
            "config": {k: v for k, v in identity.items() if k != "seed"},
            "runs": [], "seeds": [], "_results": [],
        })
        group["runs"].append(result["run_id"])
        group["seeds"].append(identity["seed"])
        group["_results"].append(result)
    summary_groups = []
    for group in groups.values():
        members = group.pop("_results")
        group["metrics"] = {"test_error_pct": mean_std([100.0 * r["test_error"] for r in members])}
        for key in TOTAL_METRICS:
            values = [r["total"][key] for r in members]
            group["metrics"][key] = None if any(v is None for v in values) else mean_std(values)
        group["layers"] = _layer_summary(members)
        summary_groups.append(group)
    return {"varying": fields, "groups": summary_groups}


def _layer_summary(members: list[dict]) -> list[dict]:
    """Per layer, mean +- std of the % of dead channels (by activation and by |gamma|)."""
    layers = []
    for index, layer in enumerate(members[0]["layers"]):
        row = {"label": layer["label"], "name": layer["name"], "channels": layer["channels"]}
        for key in LAYER_METRICS:
            values = [r["layers"][index][key] for r in members]
            row[f"{key}_pct"] = (None if any(v is None for v in values) or not layer["channels"]
                                 else mean_std([100.0 * v / layer["channels"] for v in values]))
        layers.append(row)
    return layers


def write_summary(sweep_dir, statuses: list[dict], labels: dict | None = None) -> dict:
    """Summarise the finished runs of ``statuses`` into ``<sweep_dir>/sweep_summary.json``."""
    results = [read_result(s["run_dir"]) for s in statuses if s["status"] in ("done", "skipped")]
    summary = summarize([r for r in results if r is not None], labels)
    summary["runs"] = [{**s, "run_dir": os.path.relpath(s["run_dir"], sweep_dir)} for s in statuses]
    summary["failed"] = [s["run_id"] for s in statuses if s["status"] == "failed"]
    atomic_write_text(Path(sweep_dir) / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    return summary


def run_sweep(sweep_dir, base: dict, grid: dict, *, workers: int = 1, restart: bool = False,
              progress: bool = True, log=print, launcher: str = "local", cluster: str = "auto",
              slurm: dict | None = None) -> dict:
    """Expand, run (resumably) and summarise a sweep; returns the summary. ``launcher``,
    ``cluster`` and ``slurm``: see :func:`run_many`."""
    configs = expand_grid(base, grid, sweep_dir)
    write_spec(sweep_dir, base, grid)
    statuses = run_many(configs, workers=workers, restart=restart, progress=progress, log=log,
                        launcher=launcher, sweep_dir=sweep_dir, cluster=cluster, slurm=slurm)
    summary = write_summary(sweep_dir, statuses)
    log(f"{Path(sweep_dir) / SUMMARY_FILE}: {len(summary['groups'])} groups"
        + (f", {len(summary['failed'])} failed runs" if summary["failed"] else ""))
    return summary
