"""Sending a sweep's runs to a scheduler with submitit (Slurm on a cluster, its local executor here).

``sparsekern sweep --launcher submitit`` submits every pending run as one job of a job array:
each job runs :func:`train_run` on the run's ``config.toml`` (written into the run directory
first, as the local pool does), so the run directories, checkpoints, locks, resumption and
``result.json`` are exactly those of a local sweep. The sweep waits for the jobs, reports each
one that failed (with the last line of its error and the path of its submitit log) and writes
the same ``sweep_summary.json``; running the sweep again resubmits only the runs without a
result, which resume from their checkpoints.

Where jobs go: ``cluster="auto"`` is submitit's choice (Slurm when ``sbatch`` is on the PATH,
else its local executor); ``"local"`` forces the local executor (a subprocess per job, what the
tests use); ``"slurm"`` requires Slurm. ``slurm`` options (partition, time, CPUs, GPUs, memory,
array parallelism) are passed to submitit as ``slurm_<name>``.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

from sparsekern.errors import ConfigError
from sparsekern.train.checkpoint import RunLockedError, atomic_write_text, ensure_unlocked
from sparsekern.train.config import RunConfig
from sparsekern.train.loop import run_files, train

LAUNCHERS = ("local", "submitit")
CLUSTERS = ("auto", "local", "slurm")
SUBMITIT_DIR = "submitit"  # under the sweep directory: job scripts, pickles and logs
# Options a user may set, each as submitit's "slurm_<name>" (local jobs ignore them).
SLURM_OPTIONS = ("partition", "time", "cpus_per_task", "gpus_per_node", "mem_gb", "array_parallelism",
                 "account", "qos", "constraint")


def train_run(config_path: str, restart: bool = False) -> str:
    """One scheduled job: train the run whose config is ``config_path``; returns its run id."""
    config = RunConfig.from_toml(config_path)
    train(config, restart=restart, progress=False, log=lambda message: print(message, flush=True))
    return config.run_id()


def job_error(exc: Exception) -> str:
    """The exception line of a failed job's traceback ("CorruptCheckpointError: ..."), else the error."""
    found = None
    for line in str(exc).splitlines():
        match = re.match(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)): ?(.*)$", line)
        if match:
            found = f"{match.group(1)}: {match.group(2)}".rstrip(": ")
    text = found or f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text if len(text) <= 300 else text[:297] + "..."


def _executor(sweep_dir: Path, cluster: str, slurm: dict, threads: int):
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher submitit needs submitit: pip install submitit") from None
    if cluster not in CLUSTERS:
        raise ConfigError(f"cluster must be one of {CLUSTERS}, got {cluster!r}")
    unknown = sorted(set(slurm) - set(SLURM_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown slurm option {unknown[0]!r}; known: {', '.join(SLURM_OPTIONS)}")
    folder = sweep_dir / SUBMITIT_DIR / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=None if cluster == "auto" else cluster)
    params = {"name": f"sparsekern-{sweep_dir.name}", "cpus_per_task": threads}
    if executor.cluster == "slurm":
        params.update({f"slurm_{key}": value for key, value in slurm.items()})
    executor.update_parameters(**params)
    return executor


def run_with_submitit(pending: list, sweep_dir, *, restart: bool = False, cluster: str = "auto",
                      slurm: dict | None = None, poll_s: float = 1.0, log=print) -> None:
    """Submit every ``(config, status)`` of ``pending`` as one job array and wait for it; each
    status becomes done or failed (with the job's error and log path), as the local pool does."""
    if not pending:
        return
    sweep_dir = Path(sweep_dir)
    threads = max(1, min(c.threads or (os.cpu_count() or 1) for c, _ in pending))
    executor = _executor(sweep_dir, cluster, dict(slurm or {}), threads)
    paths, jobs_for = [], []
    for config, status in pending:
        try:
            ensure_unlocked(config.run_dir())
        except RunLockedError as exc:
            status.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            log(f"run {status['run_id']} not submitted: {exc}")
            continue
        config = config.replace(threads=config.threads or threads)
        config.run_dir().mkdir(parents=True, exist_ok=True)
        files = run_files(config.run_dir())
        atomic_write_text(files["config"], config.to_toml())
        paths.append(str(files["config"]))
        jobs_for.append(status)
    if not paths:
        return
    jobs = executor.map_array(train_run, paths, [restart] * len(paths))
    log(f"submitted {len(jobs)} jobs to submitit's {executor.cluster} executor "
        f"(logs: {sweep_dir / SUBMITIT_DIR}/<job id>/)")
    waiting = dict(zip((job.job_id for job in jobs), zip(jobs, jobs_for)))
    while waiting:
        for job_id, (job, status) in list(waiting.items()):
            if not job.done():
                continue
            del waiting[job_id]
            try:
                job.result()
                status["status"] = "done"
                log(f"finished {status['run_id']} (job {job_id})")
            except Exception as exc:  # submitit's FailedJobError carries the job's traceback
                status.update(status="failed", error=f"job {job_id}: {job_error(exc)}")
                log(f"run {status['run_id']} failed ({status['error']}); log: {job.paths.stderr}")
        if waiting:
            time.sleep(poll_s)
