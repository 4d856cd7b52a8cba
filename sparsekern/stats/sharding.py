"""Which samples of a rank's loader ``analyze`` measures, so that N ranks together measure every
sample of the corpus exactly once, and the bookkeeping that keeps ranks with no data in step.

torch's ``DistributedSampler`` gives every rank the same number of samples: without
``drop_last`` it pads the (possibly shuffled) index list to ``total_size = num_samples *
num_replicas`` by repeating its head, and rank r takes ``indices[r:total_size:num_replicas]``.
The padded positions are those >= len(dataset); on rank r they are the tail of its stream, so
the first ``real = #{k < num_samples : r + k * num_replicas < len(dataset)}`` samples it yields
are real and the rest are copies of samples another rank (or this one) measures anyway.
``Shard.keep`` cuts every batch to the real samples (a batch of copies only is not run at all).
With ``drop_last=True`` the sampler drops the tail of the index list instead (``len(dataset) -
total_size`` samples no rank sees).

The sampler is found on ``loader.batch_sampler.sampler`` or ``loader.sampler`` (a DataLoader's);
sparsekern's own ``TensorBatchLoader`` (what ``make_loader`` gives for an in-memory dataset) pads
its shards the same way and is cut the same way.
Only a DistributedSampler whose ``__iter__`` / ``__len__`` are torch's own is trusted to follow
that layout, and only under an order-keeping batch sampler (torch's ``BatchSampler``) and, with
workers, ``in_order=True``; where a padded shard cannot be cut exactly, ``Shard`` raises
ValueError rather than count a copy twice. Any other sampler or loader is trusted to give the
ranks disjoint shards (a custom sampler that repeats samples across ranks is counted as it is).

Dropped samples: a pass that was not stopped by ``max_batches`` and saw fewer samples than its
sampler holds (``DataLoader(drop_last=True)`` or a ``BatchSampler(drop_last=True)``), plus the
samples a ``DistributedSampler(drop_last=True)`` leaves out, are not measured; ``totals`` counts
them over all ranks and warns once per rank with their number.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler

from sparsekern.data import TensorBatchLoader

__all__ = ["Shard", "align_channels", "totals"]


def _own_layout(sampler) -> bool:
    """Whether ``sampler`` is a DistributedSampler that yields torch's layout (not overridden)."""
    kind = type(sampler)
    return (isinstance(sampler, DistributedSampler) and kind.__iter__ is DistributedSampler.__iter__
            and kind.__len__ is DistributedSampler.__len__)


def _find_sampler(loader):
    """(sampler, batch sampler) of a DataLoader-like ``loader`` (either may be None)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    if isinstance(inner, DistributedSampler):
        return inner, batch_sampler
    return getattr(loader, "sampler", None), batch_sampler


class Shard:
    """What one rank measures of what its loader yields (module docstring).

    ``real``: how many samples of this rank's stream per pass are real (None: all of them);
    ``expected``: the samples its sampler holds for this rank per pass, copies excluded (None:
    unknown); ``sampler_dropped``: corpus samples that a DistributedSampler(drop_last=True) gives
    no rank. Per pass (``start_pass``): ``seen`` samples measured, ``duplicates`` cut off.
    """

    def __init__(self, loader):
        self.real: int | None = None
        self.expected: int | None = None
        self.sampler_dropped = 0
        self.seen = self.duplicates = 0
        self._position = 0
        sampler, batch_sampler = _find_sampler(loader)
        if isinstance(sampler, DistributedSampler) and _own_layout(sampler):
            n, replicas, rank = len(sampler.dataset), sampler.num_replicas, sampler.rank
            if sampler.drop_last and n % replicas:
                self.sampler_dropped = n - sampler.total_size
                self.real = sampler.num_samples
            else:  # positions rank + k * replicas < n are real: a prefix of this rank's stream
                self.real = min(sampler.num_samples, max(0, -(-(n - rank) // replicas)))
            self.expected = self.real
            if self.real < sampler.num_samples:
                self._check_order_kept(loader, batch_sampler, sampler.num_samples - self.real)
        elif isinstance(loader, TensorBatchLoader) and loader.world_size > 1:
            # sparsekern's in-memory loader shards as DistributedSampler(drop_last=False) does:
            # the padded (wrapped-around) positions are the tail of each rank's stream.
            n, replicas = len(loader.dataset), loader.world_size
            self.real = self.expected = max(0, -(-(n - loader.rank) // replicas))
        elif sampler is not None and (batch_sampler is not None or getattr(loader, "batch_size", None)):
            try:
                self.expected = len(sampler)
            except TypeError:  # an IterableDataset's sampler, or one without a length
                self.expected = None

    @staticmethod
    def _check_order_kept(loader, batch_sampler, copies: int) -> None:
        """The padded copies are the tail of the sampler's order: refuse loaders that reorder it."""
        where = (f"analyze: this rank's DistributedSampler pads its shard with {copies} copy(ies) of samples "
                 "that are measured elsewhere, as the last sample(s) of its order")
        if batch_sampler is not None and not (
                isinstance(batch_sampler, BatchSampler) and type(batch_sampler).__iter__ is BatchSampler.__iter__):
            raise ValueError(f"{where}; the batch sampler {type(batch_sampler).__name__} may reorder samples, so "
                             "they cannot be found. Use torch's BatchSampler, DistributedSampler(drop_last=True), "
                             "or a sampler that gives the ranks disjoint shards")
        if getattr(loader, "num_workers", 0) > 0 and not getattr(loader, "in_order", True):
            raise ValueError(f"{where}; DataLoader(in_order=False) may reorder batches, so they cannot be found. "
                             "Use in_order=True")

    def start_pass(self) -> None:
        self.seen = self.duplicates = self._position = 0

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """The part of batch ``x`` (the next batch of this rank's stream) to measure."""
        n = x.shape[0]
        if self.real is None:
            self.seen += n
            return x
        take = max(0, min(n, self.real - self._position))
        self._position += n
        self.seen += take
        self.duplicates += n - take
        return x if take == n else x[:take]


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def align_channels(stats: dict, distributed: bool) -> None:
    """Before ``ChannelStats.all_reduce``: give a rank that measured nothing of a feature (an
    empty or short shard) that feature's channel count from the ranks that did, so every rank
    joins every collective. Raises ValueError on every rank when the ranks measure different
    features, or when no rank measured a sample at all."""
    if not distributed:
        return
    mine = {name: s.num_channels for name, s in stats.items()}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    names = [sorted(d) for d in everyone]
    if any(n != names[0] for n in names):
        raise ValueError("analyze: the ranks measured different features "
                         f"({', '.join(f'rank {r}: {n}' for r, n in enumerate(names))}); a feature found at run "
                         "time (a ReLU module called several times without a traced graph) must be seen by every rank")
    for name, s in stats.items():
        if s.num_channels is not None:
            continue
        known = [d[name] for d in everyone if d[name] is not None]
        if not known:
            raise ValueError(f"analyze: no rank's loader yielded a sample (feature {name!r} was never measured)")
        state = s.state_dict()  # the header of stats without data: only its channel count changes
        s.load_state_dict({**state, "num_channels": known[0]})


def totals(shard: Shard, complete: bool, distributed: bool, device: torch.device) -> tuple[int, int]:
    """(samples measured, samples dropped) over all ranks, for the first pass; warns when samples
    were dropped. ``complete``: this rank's pass ran to the end of its loader (not cut by
    max_batches), so what it did not see of its sampler was dropped."""
    dropped = max(0, shard.expected - shard.seen) if complete and shard.expected is not None else 0
    counts = [shard.seen, dropped]
    if distributed:
        t = torch.tensor(counts, dtype=torch.int64, device=_comm_device(device))
        dist.all_reduce(t)
        counts = t.tolist()
    seen, dropped = counts[0], counts[1] + shard.sampler_dropped
    if dropped:
        warnings.warn(f"analyze: {dropped} sample(s) of the corpus were dropped and not measured (drop_last of the "
                      f"DataLoader, its batch sampler or the DistributedSampler); num_images={seen} counts what "
                      "was measured", RuntimeWarning, stacklevel=3)
    return seen, dropped
