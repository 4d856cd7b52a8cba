"""Experiments: run configs, training runs with checkpoints and resume, sweeps.

    from sparsekern.train import RunConfig, train
    result = train(RunConfig(model="basicnet", width=0.25, batch_size=20, steps=5000, eval_every=500))

See ``config.py`` (fields, TOML, run ids), ``optim.py`` (optimizers, L2 vs decoupled weight
decay, LR schedules, the regulariser registry), ``loop.py`` (one run), ``checkpoint.py`` (checked
checkpoints, the run-directory lock), ``progress.py`` (live progress lines), ``sweep.py`` (grids
of runs, parallel workers, mean +- std over seeds) and ``report.py`` (the report.md of a sweep or run).
"""
from sparsekern.train.checkpoint import CheckpointError, RunLockedError
from sparsekern.train.config import ConfigError, RunConfig
from sparsekern.train.loop import TrainingDivergedError, evaluate, read_metrics, read_result, train
from sparsekern.train.optim import Optimization, register_optimizer, register_regularizer
from sparsekern.train.report import write_report

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Optimization",
    "RunConfig",
    "RunLockedError",
    "TrainingDivergedError",
    "evaluate",
    "read_metrics",
    "read_result",
    "register_optimizer",
    "register_regularizer",
    "train",
    "write_report",
]
