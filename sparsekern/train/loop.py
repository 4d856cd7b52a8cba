"""One training run: train, evaluate, measure sparsity, checkpoint, resume.

    from sparsekern.train import RunConfig, train
    result = train(RunConfig(steps=5000, eval_every=500, width=0.25, batch_size=20))

Files in the run directory (``config.run_dir()``):

    config.toml     the run's configuration (``sparsekern train --config`` reads it back)
    checkpoint.pt   model, optimizer, schedule, RNG states, step, checksum; rewritten at every eval point
    checkpoint.prev.pt  the one before (used, with a warning, when checkpoint.pt is corrupt)
    metrics.jsonl   one JSON line per eval point (see ``_eval_point``)
    result.json     written once the budget is reached (see ``_final_result``)
    tb/             TensorBoard scalars, when torch.utils.tensorboard imports
    .lock           locked (flock) by the one process training the run; its PID and host

Per step, everything stays on the device: the loss and the number of correct predictions
are summed into device tensors and read back only at eval points, the regulariser's decay
factor is a host float, and the sparsity tracker's hooks do not synchronise either.

At each eval point (every ``eval_every`` steps, by default once per epoch, and at the end):
the tracker's report of the training stream since the previous eval point (% inactive by
activation on that window, with BN in training mode), |gamma| statistics, and the test
error are appended to metrics.jsonl; then the tracker starts a fresh window and a checkpoint
is written. Because a checkpoint is only ever taken at an eval point, a resumed run starts
with an empty window exactly like the uninterrupted one.

Resuming: rerunning the same configuration continues from checkpoint.pt. The order of the
training samples in epoch e is a pure function of (seed, e), so a run resumed mid-epoch
rebuilds that epoch's order and skips the batches already consumed; torch / numpy / python
RNG states are restored from the checkpoint. On a deterministic device (CPU) the resumed run
ends with bit-identical weights. A finished run (result.json present) returns its result.
Before anything else, train() takes the run directory's lock (a second process of the same
run stops with an error naming the first), removes temporary files of killed writers, and
cuts metrics.jsonl back to the checkpoint's step, so no eval point is ever logged twice.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern._denormals import flush_denormal_enabled, subnormal_count
from sparsekern.data import dataset_info, first_samples, get_dataset, make_loader, run_dataset, sample_range
from sparsekern.errors import ConfigError, TrainingDivergedError
from sparsekern.models import build_model
from sparsekern.stats.analyze import analyze
from sparsekern.stats.tracker import SparsityTracker
from sparsekern.train.checkpoint import (
    CheckpointError,
    RunLock,
    atomic_write_text,
    capture_rng_state,
    load_with_fallback,
    previous_path,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
)
from sparsekern.train import distributed
from sparsekern.train.config import RunConfig
from sparsekern.train.optim import Optimization
from sparsekern.train.progress import CountingLoader, RunProgress, run_progress

ACTIVATION_THRESHOLDS = (1e-12, 1e-4)  # SCIENCE.md default, and the paper's looser check
GAMMA_THRESHOLDS = (1e-3, 1e-2)
SELECTIVITY_THRESHOLD = 1e-3
SUBNORMAL_HINT_SHARE = 0.01  # hint at flushing once this share of the weights is subnormal
# Epoch e of seed s shuffles with seed s * _SEED_STRIDE + e: no two (seed, epoch) pairs share an order.
_SEED_STRIDE = 1_000_003


def run_files(run_dir) -> dict[str, Path]:
    """Paths of the files a run writes."""
    run_dir = Path(run_dir)
    return {
        "config": run_dir / "config.toml",
        "checkpoint": run_dir / "checkpoint.pt",
        "previous_checkpoint": previous_path(run_dir / "checkpoint.pt"),
        "corrupt_checkpoint": run_dir / "checkpoint.corrupt.pt",
        "metrics": run_dir / "metrics.jsonl",
        "result": run_dir / "result.json",
        "tensorboard": run_dir / "tb",
    }


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when one is available, else the CPU.

    A device this machine does not have (cuda without a GPU, cuda:N past the last one) or a name
    torch does not know is a ConfigError naming it and the devices there are.
    """

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch: "Expected one of cpu, cuda, ... device type at start of device string"
        raise ConfigError(f"device={name!r} is not a device name; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            available = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(count)])
            raise ConfigError(f"device={name!r} is not available on this machine ({count} CUDA GPUs); "
                              f"available: {available} (or auto)")
    return device


def read_result(run_dir) -> dict | None:
    """The result.json of a finished run, or None."""
    path = run_files(run_dir)["result"]
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(run_dir) -> list[dict]:
    """Every line of a run's metrics.jsonl (empty list if there is none)."""
    path = run_files(run_dir)["metrics"]
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(config: RunConfig, *, restart: bool = False, stop_after: int | None = None,
          progress: bool = True, log=print) -> dict | None:
    """Train one run to its budget (resuming from its checkpoint) and return result.json's content.

    ``restart``: discard the checkpoint, metrics and result of a previous attempt first.
    ``stop_after``: stop (after checkpointing) once step ``stop_after`` is reached, as an
    interruption would; returns None then. The step is rounded up to the next eval point,
    since checkpoints are only taken there.
    """
    with distributed.session(config.device) as context:
        config = _bind_ranks(config, context)
        if not context.is_main:  # rank 0 speaks for the run
            progress, log = False, _quiet
        config.run_dir().mkdir(parents=True, exist_ok=True)
        lock = RunLock(config.run_dir())  # held to the end, by rank 0: a second job of this run fails here
        context.on_main(lambda: lock.__enter__() and None)
        try:
            return _train_locked(config, restart, stop_after, progress, log, context)
        finally:
            if context.is_main:
                lock.__exit__(None, None, None)


def _quiet(*args, **kwargs) -> None:
    pass


def _bind_ranks(config: RunConfig, context) -> RunConfig:
    """The config with ``ranks`` from the launch (torchrun's WORLD_SIZE); a config that names
    another number of ranks (a run started with another --nproc_per_node) is a ConfigError."""
    if config.ranks is None and context.distributed:
        return config.replace(ranks=context.world)
    if (config.ranks or 1) != context.world:
        raise ConfigError(f"ranks={config.ranks}: this run trains on {config.ranks} data-parallel processes, but "
                          f"{context.world} were launched; use torchrun --nproc_per_node {config.ranks} (or "
                          "another run directory)")
    return config


def _config_text(config: RunConfig) -> str:
    text = config.to_toml()
    if config.ranks:
        bn = (f"BatchNorm batch {config.batch_size} (sync_bn)" if config.sync_bn
              else f"BatchNorm batch {config.rank_batch_size} (per rank)")
        text += (f"# global batch {config.batch_size} = {config.ranks} ranks x {config.rank_batch_size} samples; "
                 f"{bn}\n")
    return text


def _train_locked(config: RunConfig, restart: bool, stop_after: int | None, progress: bool, log,
                  context=distributed.Context()) -> dict | None:
    files = run_files(config.run_dir())

    def prepare():  # rank 0: the run directory's files
        for path in remove_stale_temp_files(config.run_dir()):
            log(f"{path}: removed (a temporary file of a process killed while writing)")
        if restart:
            for key in ("checkpoint", "previous_checkpoint", "metrics", "result"):
                files[key].unlink(missing_ok=True)
            shutil.rmtree(files["tensorboard"], ignore_errors=True)
        result = read_result(config.run_dir())
        if result is not None:
            if result.get("config_hash") != config.config_hash():
                raise CheckpointError(
                    f"{files['result']}: result of a different configuration (hash {result.get('config_hash')} vs "
                    f"{config.config_hash()}); rerun with --restart to discard it, or use another run directory."
                )
            log(f"{config.run_dir()}: already complete (test error {result['test_error']:.4f})")
            return result
        atomic_write_text(files["config"], _config_text(config))
        return None

    result = context.on_main(prepare)
    if result is not None:
        return result
    return _Run(config, files, progress, log, context).execute(stop_after)


class _Run:
    """The state of one run while it trains (built fresh, then restored from a checkpoint)."""

    def __init__(self, config: RunConfig, files: dict, progress: bool, log, context=distributed.Context()):
        self.config, self.files, self.progress, self.log = config, files, progress, log
        self.context = context
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.device = context.device(resolve_device(config.device))
        _seed_everything(config.seed)
        self.train_set, self.test_set, self.analysis_set = _load_datasets(config, self.device)
        info = self.train_set.info
        self.steps_per_epoch = len(self.train_set) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size={config.batch_size} is larger than the training set "
                             f"({len(self.train_set)} samples)")
        self.total_steps = config.steps if config.steps is not None else config.epochs * self.steps_per_epoch
        self.eval_every = config.eval_every or self.steps_per_epoch
        self.model = build_run_model(config, info).to(self.device)
        if context.distributed and config.sync_bn:
            self.model = distributed.convert_sync_batchnorm(self.model, self.device)
        self.optimization = Optimization(config, self.model, self.total_steps)
        # Training steps run through DDP (gradients averaged over ranks); everything else uses the model itself.
        self.train_model = self.model if not context.distributed else torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = 0
        self.train_seconds = 0.0

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self) -> dict:
        return {
            "config": self.config.identity(),
            "config_hash": self.config.config_hash(),
            "step": self.step,
            "total_steps": self.total_steps,
            "eval_every": self.eval_every,
            "train_seconds": self.train_seconds,
            "model": self.model.state_dict(),
            "optimization": self.optimization.state_dict(),
            "rng": capture_rng_state(),
        }

    def _resume(self) -> None:
        def load():  # on rank 0, which hands the state to the other ranks
            # Loaded to the CPU (RNG states must stay there); load_state_dict moves the rest to the device.
            state, source = load_with_fallback(
                self.files["checkpoint"], config_hash=self.config.config_hash(), config=self.config.identity(),
                schedule=(self.total_steps, self.eval_every), map_location="cpu", warn=self.log)
            if source != self.files["checkpoint"] and self.files["checkpoint"].exists():
                # Kept for inspection but out of the rotation: the next save must not make it the previous one.
                os.replace(self.files["checkpoint"], self.files["corrupt_checkpoint"])
            return state

        state = self.context.on_main(load)
        self.model.load_state_dict(state["model"])
        self.optimization.load_state_dict(state["optimization"])
        self.step, self.train_seconds = state["step"], state["train_seconds"]
        restore_rng_state(state["rng"])
        self.log(f"{self.config.run_dir()}: resuming at step {self.step}/{self.total_steps}")

    def _truncate_metrics(self) -> None:
        """Keep the metrics lines of the checkpointed steps only (all of them are redone otherwise).

        Lines after ``self.step`` come from an attempt that died before its next checkpoint (or
        before its first one, when there is no checkpoint: then none is kept).
        """
        path = self.files["metrics"]
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                step = json.loads(line)["step"]
            except ValueError:  # the partial last line of a process killed while appending it
                continue
            if step <= self.step:
                kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))

    # ------------------------------------------------------------------ training
    def execute(self, stop_after: int | None) -> dict | None:
        if self.context.broadcast(self.files["checkpoint"].exists() or self.files["previous_checkpoint"].exists()):
            self._resume()
        self.context.on_main(self._truncate_metrics)
        end = self.total_steps
        if stop_after is not None:  # only eval points are checkpointed: stop at the first one >= stop_after
            end = min(end, -(-stop_after // self.eval_every) * self.eval_every)
        progress = (run_progress(self.config.run_dir().name, self.progress) if self.context.is_main
                    else contextlib.nullcontext(RunProgress(self.config.run_dir().name, None)))
        with progress as self.report:
            self._train(end)
            result = self._final_result() if self.step == self.total_steps else None
        if result is None:
            self.log(f"{self.config.run_dir()}: stopped at step {self.step}/{self.total_steps} (checkpointed)")
            return None
        self.context.on_main(atomic_write_text, self.files["result"], json.dumps(result, indent=1) + "\n")
        return result

    def _train(self, end: int) -> None:
        """Train to step ``end``, with the tracker and the TensorBoard writer open meanwhile."""

        tracks = self.config.track_selectivity or self.config.log_mechanism
        self.tracker_mode = "histogram" if tracks else "none"
        self.tracker = SparsityTracker(self.model, selectivity=self.tracker_mode)
        # Events after the checkpointed step came from an attempt that did not reach its next
        # checkpoint: TensorBoard hides them (purge_step). The checkpointed step's own scalars were
        # written before that checkpoint and are not written again, so they stay.
        self.writer = _tensorboard_writer(self.files["tensorboard"], purge_after=self.step) if self.context.is_main else None
        self.report.start("train", self.step, self.total_steps)
        try:
            self._train_until(end)
        finally:
            self.tracker.remove()
            if self.writer is not None:
                self.writer.close()

    def _train_until(self, end: int) -> None:
        config, model, device = self.config, self.train_model, self.device
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        window_start, clock = self.step, time.perf_counter()
        model.train()  # evaluate() restores this mode after every eval point
        while self.step < end:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            batches = _train_batches(self.train_set, config, epoch, self.context)
            for x, y in itertools.islice(batches, offset, self.steps_per_epoch):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                self.optimization.zero_grad()
                loss.backward()
                self.optimization.step()
                loss_sum += loss.detach()
                correct += (logits.detach().argmax(1) == y).sum()
                seen += y.shape[0]
                self.step += 1
                self.report.advance(self.step)
                if self.step % self.steps_per_epoch == 0:  # before the eval point, so it is checkpointed
                    self.optimization.end_epoch(epoch)
                if self.step % self.eval_every == 0 or self.step == self.total_steps:
                    steps = self.step - window_start
                    train_loss = (loss_sum / steps).item()  # the one host sync of the interval
                    right = correct.item()
                    if self.context.distributed:  # every rank's loss is the mean over its equal share
                        loss_total, right, seen = self.context.sum([loss_sum.item(), right, seen], device)
                        train_loss, seen = loss_total / (steps * self.context.world), int(seen)
                    elapsed = time.perf_counter() - clock
                    self.train_seconds += elapsed
                    if not math.isfinite(train_loss):
                        raise TrainingDivergedError(
                            f"{self.config.run_dir()}: training loss is {train_loss} at step {self.step} "
                            f"(lr={config.lr}, optimizer={config.optimizer}); lower the learning rate"
                        )
                    metrics = self._eval_point(train_loss, 1.0 - right / seen, seen, elapsed / steps)
                    self.report.evaluated(self.step, metrics["test_error"], metrics["total"]["dead_by_activation_pct"])
                    loss_sum.zero_()
                    correct.zero_()
                    seen, window_start, clock = 0, self.step, time.perf_counter()
                if self.step >= end:
                    break

    def _eval_point(self, train_loss: float, train_error: float, window_samples: int, seconds_per_step: float) -> dict:
        """Log the interval's metrics, start a fresh tracker window, checkpoint."""

        distributed.reduce_tracker(self.tracker, self.context)  # every rank's window, summed
        report = self.tracker.report(ACTIVATION_THRESHOLDS, GAMMA_THRESHOLDS, SELECTIVITY_THRESHOLD)
        features = self.tracker.features
        tracked = next(iter(self.tracker.stats.values())).num_samples
        self.tracker.remove()  # evaluation forwards must not count as training-stream samples
        distributed.broadcast_buffers(self.model, self.context, self.device)  # rank 0's BN statistics
        test_loss, test_error = evaluate(self.model, self.test_set, self.config.eval_batch_size, self.device,
                                         context=self.context)
        layers = _layer_rows(report, self.model, features)
        self._warn_nonfinite(report)
        metrics = {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "lr": self.optimization.lr,
            "train_loss": train_loss,
            "train_error": train_error,
            "test_loss": test_loss,
            "test_error": test_error,
            "window_samples": window_samples,
            "tracked_samples": tracked,
            "seconds_per_step": seconds_per_step,
            "subnormal_weights": subnormal_count(self.model.parameters()),
            "layers": layers,
            "total": _totals(layers),
        }
        if self.optimization.update_split is not None:
            metrics["mechanism"] = _mechanism_rows(self.optimization.update_split.window(), self.tracker, features)
        self.tracker = SparsityTracker(self.model, selectivity=self.tracker_mode, features=features)
        self.context.on_main(self._write_eval_point, metrics)  # the other ranks wait for the checkpoint
        return metrics

    def _write_eval_point(self, metrics: dict) -> None:
        with self.files["metrics"].open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        self._subnormal_hint(metrics["subnormal_weights"])
        if self.writer is not None:
            for key in ("train_loss", "train_error", "test_loss", "test_error", "lr"):
                self.writer.add_scalar(key, metrics[key], self.step)
            for key, value in metrics["total"].items():
                if value is not None:
                    self.writer.add_scalar(f"sparsity/{key}", value, self.step)
        save_checkpoint(self.files["checkpoint"], self._checkpoint_state())

    def _warn_nonfinite(self, report) -> None:
        warning = report.nonfinite_warning()
        if warning:
            self.log(f"{self.config.run_dir()}: {warning}")

    def _subnormal_hint(self, count: int) -> None:
        """Once per run: say that subnormal weights slow CPU steps, and how to flush them."""
        total = sum(p.numel() for p in self.model.parameters())
        if (self.device.type != "cpu" or flush_denormal_enabled() or getattr(self, "_hinted", False)
                or count < SUBNORMAL_HINT_SHARE * total):
            return
        self._hinted = True
        self.log(f"{self.config.run_dir()}: {count} of {total} weights are subnormal (dead filters decayed "
                 f"towards zero); x86 CPUs compute with them several times slower (3.9x slower steps measured). "
                 f"Set SPARSEKERN_FLUSH_DENORMAL=1 to flush them (see sparsekern/_denormals.py).")

    # ------------------------------------------------------------------ the end
    def _final_result(self) -> dict:
        """result.json: final test error, per-layer sparsity over the training corpus, BN params, selectivity."""
        passes = 2 if self.config.selectivity == "two-pass" else 1
        corpus = rank_share(self.analysis_set, self.context)  # disjoint shares: analyze sums them
        self.report.start("analysis", 0, passes * len(corpus))
        loader = CountingLoader(make_loader(corpus, self.config.eval_batch_size, shuffle=False, rank=0, world_size=1),
                                self.report.advance)
        analysis = analyze(self.model, loader, device=self.device, selectivity=self.config.selectivity,
                           progress=False, activation_thresholds=ACTIVATION_THRESHOLDS,
                           gamma_thresholds=GAMMA_THRESHOLDS, selectivity_threshold=SELECTIVITY_THRESHOLD)
        self.report.flush()
        self._warn_nonfinite(analysis.report)
        layers = _layer_rows(analysis.report, self.model, analysis.features, analysis.stats,
                             with_selectivity=self.config.selectivity != "none")
        return self.context.on_main(self._result, layers, analysis)

    def _result(self, layers: list[dict], analysis) -> dict:
        last = read_metrics(self.config.run_dir())[-1]
        return {
            "run_id": self.config.run_id(),
            "config_hash": self.config.config_hash(),
            "config": self.config.to_dict(),
            "steps": self.total_steps,
            "epochs": self.total_steps / self.steps_per_epoch,
            "train_samples": len(self.train_set),
            # The global batch (one optimizer step) and each rank's share, which BatchNorm normalises
            # over unless sync_bn: the paper's sparsity depends on the BN batch.
            "batch": {"global": self.config.batch_size, "per_rank": self.config.rank_batch_size,
                      "ranks": self.context.world, "sync_bn": self.config.sync_bn and self.context.distributed,
                      "batchnorm": (self.config.batch_size if self.config.sync_bn and self.context.distributed
                                    else self.config.rank_batch_size)},
            "test_samples": len(self.test_set),
            "analysis_samples": analysis.num_images,
            "device": str(self.device),
            "flush_denormal": flush_denormal_enabled(),
            "train_seconds": self.train_seconds,
            "seconds_per_step": self.train_seconds / self.total_steps,
            "test_error": last["test_error"],
            "test_loss": last["test_loss"],
            "train_loss": last["train_loss"],
            "thresholds": {"activation": ACTIVATION_THRESHOLDS[0], "activation_loose": ACTIVATION_THRESHOLDS[1],
                           "gamma": GAMMA_THRESHOLDS[0], "gamma_loose": GAMMA_THRESHOLDS[1],
                           "selectivity": SELECTIVITY_THRESHOLD},
            "layers": layers,
            "total": _totals(layers),
            "analysis": analysis.to_dict(),
        }


def build_run_model(config: RunConfig, info) -> nn.Module:
    """The model of ``config`` for a dataset described by ``info`` (a DatasetInfo)."""

    size = info.image_size if isinstance(info.image_size, int) else max(info.image_size)
    # torchvision's ImageNet stems downsample 4x at once: adapt them for 28x28 / 32x32 inputs.
    return build_model(config.model, in_channels=info.in_channels, num_classes=info.num_classes,
                       width=config.width, small_input=size <= 64)


def load_trained(path, device: str = "auto") -> tuple[nn.Module, RunConfig]:
    """(model with the checkpoint's weights, its RunConfig) from a run directory or its checkpoint.pt.

    The run's config.toml (next to the checkpoint) says how to rebuild the model. The checkpoint
    is verified (checksum, config, step: see ``checkpoint.load_with_fallback``); the run's own
    checkpoint of a finished run must be at the step its result.json reports.
    """

    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    files = run_files(run_dir)
    checkpoint = path if path.is_file() else files["checkpoint"]
    if not files["config"].is_file() or not (checkpoint.is_file() or previous_path(checkpoint).is_file()):
        raise FileNotFoundError(f"{path}: expected a run directory with config.toml and checkpoint.pt "
                                "(written by `sparsekern train`)")
    config = RunConfig.from_toml(files["config"])
    try:
        info = dataset_info(config.dataset)
    except ValueError:  # a dataset whose classes depend on its files (imagefolder)
        info = get_dataset(config.dataset, train=False, root=config.data_root).info
    target = resolve_device(device)
    model = build_run_model(config, info).to(target)
    state, source = load_with_fallback(checkpoint, config_hash=config.config_hash(), config=config.identity(),
                                       map_location=target)
    result = read_result(run_dir)
    if checkpoint == files["checkpoint"] and result is not None and state["step"] != result["steps"]:
        raise CheckpointError(
            f"{source}: checkpoint is at step {state['step']}, but {files['result']} reports the run "
            f"complete at step {result['steps']}: these are not the weights of that result. Rerun the training "
            "with --restart.")
    model.load_state_dict(state["model"])
    return model.eval(), config


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device,
             context=None) -> tuple[float, float]:
    """(mean cross-entropy, error rate) of ``model`` in eval mode over ``dataset``.

    ``context`` (a ``distributed.Context`` of several ranks): each rank evaluates its contiguous
    share of ``dataset`` and the sums are all-reduced, so the whole set counts once.
    """
    context = context or distributed.Context()
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for x, y in make_loader(rank_share(dataset, context), batch_size, shuffle=False, rank=0, world_size=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        wrong += (logits.argmax(1) != y).sum()
        count += y.shape[0]
    model.train(was_training)
    if context.distributed:
        total_loss, total_wrong, count = context.sum([loss_sum.item(), wrong.item(), count], device)
        if count == 0:
            raise ValueError("evaluate: the test set is empty")
        return total_loss / count, int(total_wrong) / count
    if count == 0:
        raise ValueError("evaluate: the test set is empty")
    return loss_sum.item() / count, wrong.item() / count


def rank_share(dataset, context):
    """This rank's contiguous share of ``dataset`` (samples r N / R to (r + 1) N / R): the ranks'
    shares are disjoint and cover it once. The whole dataset for one process."""
    if not context.distributed:
        return dataset
    n = len(dataset)
    return sample_range(dataset, context.rank * n // context.world, (context.rank + 1) * n // context.world)


# ---------------------------------------------------------------------- helpers
def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _load_datasets(config: RunConfig, device: torch.device):
    """(train, test, analysis) datasets; in-memory ones are moved to ``device`` so batches are built there."""
    train_set = run_dataset(config, "train", device, augment=config.augment)
    test_set = run_dataset(config, "test", device)
    # The analysis corpus is the training set as the paper measures it: no augmentation.
    analysis_set = (first_samples(train_set, config.analyze_samples) if not config.augment
                    else run_dataset(config, "train", device, samples=config.analyze_samples))
    return train_set, test_set, analysis_set


def _train_batches(dataset, config: RunConfig, epoch: int, context=distributed.Context()):
    """Epoch ``epoch``'s batches on this rank: a shuffle that depends on (seed, epoch) only, last
    partial batch dropped. With R ranks, step k's global batch (samples k B to (k + 1) B of the
    epoch's order) is dealt out between them, rank r taking every R-th sample from the r-th
    (make_loader's sharding): batch_size / R samples each. The caller stops after len // B steps,
    before any sample that the sharding pads with."""

    return iter(make_loader(dataset, config.batch_size // context.world, shuffle=True,
                            seed=config.seed * _SEED_STRIDE + epoch, drop_last=True, rank=context.rank,
                            world_size=context.world))


def _bn_of(model: nn.Module, feature):
    name = getattr(feature, "bn_module_name", None)
    return None if name is None else model.get_submodule(name)


def _layer_rows(report, model: nn.Module, features, stats=None, with_selectivity: bool = False) -> list[dict]:
    """Per feature: counts at both thresholds, |gamma| summary; with ``stats``, the per-channel arrays."""
    by_name = {f.name: f for f in features}
    rows = []
    for index, layer in enumerate(report.layers, start=1):
        act = layer.inactive_by_activation or {}
        gam = layer.inactive_by_gamma or {}
        bn = _bn_of(model, by_name[layer.name])
        gamma = None if bn is None or bn.weight is None else bn.weight.detach().double().cpu()
        row = {
            "label": f"C{index}",
            "name": layer.name,
            "kind": layer.kind,
            "channels": layer.channels,
            "dead_by_activation": act.get(ACTIVATION_THRESHOLDS[0]),
            "dead_by_activation_loose": act.get(ACTIVATION_THRESHOLDS[1]),
            "dead_by_gamma": gam.get(GAMMA_THRESHOLDS[0]),
            "dead_by_gamma_loose": gam.get(GAMMA_THRESHOLDS[1]),
            "mean_abs_gamma": None if gamma is None else gamma.abs().mean().item(),
            "nonfinite_channels": layer.nonfinite_channels,  # NaN/Inf: neither dead nor active
        }
        if stats is not None:
            s = stats[layer.name]
            row["gamma"] = None if gamma is None else gamma.tolist()
            row["beta"] = None if bn is None or bn.bias is None else bn.bias.detach().double().cpu().tolist()
            row["dead_mask"] = s.dead_mask(ACTIVATION_THRESHOLDS[0], on_nan="exclude").cpu().tolist()
            row["selectivity"] = (
                [None if math.isnan(v) else v
                 for v in s.selectivity(SELECTIVITY_THRESHOLD, on_nan="exclude").value.double().cpu().tolist()]
                if with_selectivity else None
            )
        rows.append(row)
    return rows


def _mechanism_rows(updates: dict, tracker: SparsityTracker, features) -> dict:
    """metrics.jsonl's "mechanism": per feature with a BN scale, per channel over the interval, the
    sizes of gamma's regulariser and loss updates (``UpdateSplit.window``), and the selectivity and
    max on the training stream (the tracker's window: BN in training mode, histogram selectivity)."""
    rows = {}
    for feature in features:
        bn = getattr(feature, "bn_module_name", None)
        if bn not in updates:
            continue
        stats = tracker.stats[feature.name]
        selectivity = stats.selectivity(SELECTIVITY_THRESHOLD, on_nan="exclude").value.double().cpu().tolist()
        rows[feature.name] = {
            "bn": bn,
            "reg_update": updates[bn]["reg"],
            "loss_update": updates[bn]["loss"],
            "selectivity": [None if math.isnan(v) else v for v in selectivity],
            "window_max": stats.corpus_max.double().cpu().tolist(),
        }
    return rows


def _totals(layers: list[dict]) -> dict:
    """Counts and percentages over all layers (gamma ones over the layers that have a BN scale)."""
    out = {}
    for key in ("dead_by_activation", "dead_by_activation_loose", "dead_by_gamma", "dead_by_gamma_loose"):
        counted = [l for l in layers if l[key] is not None]
        channels = sum(l["channels"] for l in counted)
        out[key] = sum(l[key] for l in counted) if counted else None
        out[f"{key}_pct"] = 100.0 * out[key] / channels if counted and channels else None
    out["channels"] = sum(l["channels"] or 0 for l in layers)
    out["nonfinite_channels"] = sum(l.get("nonfinite_channels") or 0 for l in layers)
    with_gamma = [l for l in layers if l["mean_abs_gamma"] is not None]
    gamma_channels = sum(l["channels"] for l in with_gamma)
    # Mean |gamma| over every BN channel of the network (layer means weighted by their width).
    out["mean_abs_gamma"] = (sum(l["mean_abs_gamma"] * l["channels"] for l in with_gamma) / gamma_channels
                             if gamma_channels else None)
    return out


def _tensorboard_writer(directory: Path, purge_after: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: say so once per run, metrics.jsonl has the same scalars
        warnings.warn(f"tensorboard is not installed, so no TensorBoard curves are written to {directory} "
                      "(metrics.jsonl has the same scalars): pip install 'sparsekern[tensorboard]'",
                      RuntimeWarning, stacklevel=2)
        return None
    return SummaryWriter(str(directory), purge_step=purge_after + 1)  # hides steps >= purge_step
