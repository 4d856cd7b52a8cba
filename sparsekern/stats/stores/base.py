"""The interface every selectivity store implements, and what the stores share.

A store keeps what one selectivity mode needs of the per-sample maxima m (N, C float32) beyond
the per-channel accumulators every mode has (those stay in ``ChannelStats``). ``ChannelStats``
creates its store with the constructor's options, calls ``start`` once the channel count and
device are known, feeds it every batch, and asks it for selectivity, merging, the distributed
reduction and the store's part of a state dict.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

CHUNK_BYTES = 64 << 20  # float64 working set when re-reading stored maxima


def rows_per_chunk(num_channels: int) -> int:
    """Rows of maxima per chunk when re-reading them (read at call time, so tests can shrink it)."""
    return max(1, CHUNK_BYTES // (8 * num_channels))


def count_below(chunks, t: float, corpus_max: torch.Tensor) -> torch.Tensor:
    """(C,) int64 on corpus_max's device: the samples with m / corpus_max < t (float64), over
    blocks of stored maxima (on any device)."""
    count = torch.zeros(corpus_max.shape[0], dtype=torch.int64, device=corpus_max.device)
    for block in chunks:
        ratio = block.to(torch.float64) / corpus_max.to(device=block.device, dtype=torch.float64)
        count += (ratio < t).sum(dim=0).to(count.device)
    return count


@dataclass
class Collective:
    """One ``ChannelStats.all_reduce``: the process group, the device its collectives run on,
    this process's rank and every rank's sample count, in rank order (ranks may hold different N)."""

    group: object
    device: torch.device
    rank: int
    rows: list[int]

    @classmethod
    def start(cls, group, device: torch.device | None, config: list[int], counts: list[int], what: str,
              where: str) -> tuple["Collective", list[int]]:
        """Begin a reduction over ``group`` of stats on ``device`` (None: none yet) with one
        all_gather of every rank's ``config`` and python ``counts`` (the first: its samples).

        Raises ValueError on every rank unless the configs agree (``what`` names their entries);
        returns the collective and the counts summed over the ranks. NCCL collectives run on the
        current CUDA device when the stats are not on one.
        """
        if dist.get_backend(group) == "nccl" and (device is None or device.type != "cuda"):
            device = torch.device("cuda", torch.cuda.current_device())
        header = torch.tensor(config + counts, dtype=torch.int64, device=device)
        headers = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
        dist.all_gather(headers, header, group=group)
        headers = torch.stack(headers).cpu()
        configs, counts_per_rank = headers[:, :len(config)], headers[:, len(config):]
        if not bool((configs == configs[0]).all()):
            raise ValueError(f"{where}: ranks disagree on ({what}): {configs.tolist()}")
        collective = cls(group, device, dist.get_rank(group), counts_per_rank[:, 0].tolist())
        return collective, counts_per_rank.sum(dim=0).tolist()

    def reduce_(self, tensor: torch.Tensor, op) -> None:
        """All-reduce ``tensor`` in place with ``op``, through the collective's device."""
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=op, group=self.group)
        tensor.copy_(moved)


class SelectivityStore:
    """What a selectivity mode keeps per sample. This base keeps nothing: every method is the
    behaviour of a store without per-sample data, which is all mode "none" needs.

    ``fields``: the keys the store adds to a ChannelStats state dict. ``measures_selectivity``:
    whether ``selectivity`` can be asked. ``keeps_input``: ``update`` holds on to the tensor it
    is given, so a caller's reusable buffer must be copied first.
    """

    mode = "none"
    fields: tuple[str, ...] = ()
    measures_selectivity = False
    keeps_input = False

    def start(self, num_channels: int, device: torch.device, state: dict | None = None) -> None:
        """Allocate for ``num_channels`` on ``device``: empty, or holding the store's fields of
        ``state`` (a state dict that ``check_state`` accepted)."""

    def clear(self) -> None:
        """Forget everything ``start`` allocated (back to the constructor's state)."""

    def update(self, m: torch.Tensor) -> None:
        """Take one batch of maxima (N, C float32, on the stats device). Device ops only."""

    def selectivity(self, t: float, corpus_max: torch.Tensor, num_samples: int):
        """(value, error_bound or None), float64 (C,): the fraction of samples with
        m / corpus_max < t, before the never-active and NaN / Inf channels are set."""
        raise NotImplementedError(f"selectivity={self.mode!r} keeps no per-sample maxima")

    def check_merge(self, other: "SelectivityStore", where: str) -> None:
        """Raise ValueError when ``other`` (a started store of the same mode) cannot be merged
        into this one; asked before this store starts, so nothing has changed yet."""

    def merge(self, other: "SelectivityStore") -> None:
        """Add the samples of ``other`` (a started store of the same mode and channel count)."""

    def all_reduce(self, collective: Collective) -> None:
        """Combine the stores of every rank: afterwards each holds the samples of all of them."""

    def state_dict(self) -> dict:
        """The store's fields of a state dict (tensors cloned)."""
        return {}

    def check_state(self, sd: dict, fields: dict, num_channels: int, num_samples: int, where: str) -> None:
        """Raise StateDictError unless the store's fields of ``sd`` are consistent with the
        per-channel accumulators ``fields`` (already checked) and the sample count."""
