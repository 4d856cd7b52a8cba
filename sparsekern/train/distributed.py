"""Data-parallel training across processes: the torchrun environment, one writer, collectives.

``train()`` calls ``session()``: when the environment says this process is one of several
(torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) it joins the default
process group (initialising it unless the caller already has: gloo on the CPU, nccl on CUDA,
with a timeout of ``$SPARSEKERN_DIST_TIMEOUT`` seconds, default 1800, so that a rank lost
outside torchrun ends in an error, not a hang) and leaves it at the end if it initialised it.

Rank 0 is the one writer of a run directory (lock, config, checkpoints, metrics, result);
``Context.on_main`` runs a function there and hands its value, or its exception, to every rank,
so a failure on rank 0 (a locked run, a checkpoint of another config) is raised on all ranks
instead of leaving them waiting in the next collective.

BatchNorm across ranks (``sync_bn``): torch's SyncBatchNorm on CUDA; on any other device (torch's
SyncBatchNorm and DDP's check of it are CUDA-only) each BatchNorm gets a forward that all-reduces the per-channel sum, sum of squares and count (float64) through
``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces the gradients, so
the forward and backward are those of one batch norm over the global batch, as on CUDA.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

from sparsekern.stats.sharding import align_channels

TIMEOUT_ENV = "SPARSEKERN_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0


def launched_ranks() -> int:
    """How many processes the launcher (torchrun) started for this job: WORLD_SIZE, or 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass
class Context:
    """This process's place in the job: ``rank`` of ``world`` (1: a single process)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """A CUDA device per local rank (cuda:LOCAL_RANK unless an index was given)."""
        if self.distributed and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def on_main(self, fn, *args):
        """``fn(*args)`` on rank 0; its value (or its exception, raised here) on every rank."""
        if not self.distributed:
            return fn(*args)
        box = [None]
        if self.is_main:
            try:
                box = [("ok", fn(*args))]
            except BaseException as exc:  # noqa: BLE001 - handed to every rank, then re-raised
                box = [("error", exc)]
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            if self.is_main:
                raise value
            raise type(value)(*value.args) if _rebuildable(value) else RuntimeError(f"rank 0 failed: {value!r}")
        return value

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: list, device: torch.device) -> list:
        """Element-wise sum over ranks of a list of numbers (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device(device))
        dist.all_reduce(t)
        return t.tolist()


def _rebuildable(exc: BaseException) -> bool:
    try:
        type(exc)(*exc.args)
        return True
    except Exception:  # noqa: BLE001
        return False


def comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


@contextlib.contextmanager
def session(device_name: str):
    """The Context of this process; joins (and at the end leaves) the process group under torchrun."""
    initialised_here = False
    if dist.is_available() and dist.is_initialized():
        context = Context(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")))
    elif launched_ranks() > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        cuda = device_name != "cpu" and torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
        initialised_here = True
        context = Context(dist.get_world_size(), dist.get_rank(), local_rank)
    else:
        context = Context()
    try:
        yield context
    finally:
        if initialised_here and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------- models
def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` synchronised over the ranks: torch's SyncBatchNorm on CUDA;
    elsewhere each BatchNorm keeps its class and gains ``SyncedBatchNorm``'s forward (DDP refuses
    SyncBatchNorm modules off CUDA), so its parameters, buffers and kind stay what they were."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not isinstance(module, (nn.SyncBatchNorm, SyncedBatchNorm)):
            module.__class__ = _synced_class(type(module))
    return model


_SYNCED: dict[type, type] = {}


def _synced_class(cls: type) -> type:
    if cls not in _SYNCED:
        _SYNCED[cls] = type(f"Synced{cls.__name__}", (SyncedBatchNorm, cls), {"__module__": __name__})
    return _SYNCED[cls]


class SyncedBatchNorm(_BatchNorm):
    """The forward of a BatchNorm over the batches of all ranks, on any device (module
    docstring); eval mode and a single process are the plain BatchNorm's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        dims = [0] + list(range(2, input.dim()))
        x = input.double()
        count = torch.full((1,), float(input.numel() // input.shape[1]), dtype=torch.float64, device=input.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        stats = differentiable_all_reduce(stats)  # its backward all-reduces the gradients
        c = input.shape[1]
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        shape = [1, c] + [1] * (input.dim() - 2)
        y = ((x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)).to(input.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def broadcast_buffers(model: nn.Module, context: Context, device: torch.device) -> None:
    """Rank 0's buffers (BN running statistics) on every rank: without sync_bn each rank's
    running statistics follow its own shard, and evaluation and the checkpoint use rank 0's."""
    if not context.distributed:
        return
    for buffer in model.buffers():
        moved = buffer.to(comm_device(device))
        dist.broadcast(moved, src=0)
        buffer.copy_(moved)


def reduce_tracker(tracker, context: Context) -> None:
    """Sum the tracker's statistics over the ranks (at an eval point: no collective per step)."""
    if not context.distributed:
        return
    align_channels(tracker.stats, True)
    for s in tracker.stats.values():
        s.all_reduce()
