"""Selectivity mode "exact": every per-sample maximum m[n, c] kept as float32 on the stats device."""
from __future__ import annotations

import torch
import torch.distributed as dist

from sparsekern.stats.checks import require, state_tensor
from sparsekern.stats.stores.base import Collective, SelectivityStore, count_below, rows_per_chunk


class ExactStore(SelectivityStore):
    """The maxima as a list of (N_i, C) blocks, concatenated when asked for (once per query,
    not per batch). N x C x 4 bytes of device memory."""

    mode = "exact"
    fields = ("maxima",)
    measures_selectivity = True
    keeps_input = True

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._blocks: list[torch.Tensor] = []
        self._num_channels: int | None = None
        self._device: torch.device | None = None

    def start(self, num_channels: int, device: torch.device, state: dict | None = None) -> None:
        self._num_channels, self._device = num_channels, device
        if state is not None and state["maxima"].shape[0]:
            self._blocks = [state["maxima"].to(device=device, dtype=torch.float32, copy=True)]

    @property
    def maxima(self) -> torch.Tensor:
        """(N, C) float32: every stored maximum, in the order the samples came."""
        if len(self._blocks) > 1:
            self._blocks = [torch.cat(self._blocks)]
        if not self._blocks:
            return torch.empty(0, self._num_channels, dtype=torch.float32, device=self._device)
        return self._blocks[0]

    def update(self, m: torch.Tensor) -> None:
        self._blocks.append(m)

    def selectivity(self, t: float, corpus_max: torch.Tensor, num_samples: int):
        chunks = self.maxima.split(rows_per_chunk(self._num_channels))
        return count_below(chunks, t, corpus_max).to(torch.float64) / num_samples, None

    def merge(self, other: "ExactStore") -> None:
        self._blocks.extend(block.to(self._device) for block in other._blocks)

    def all_reduce(self, collective: Collective) -> None:
        """An all_gather of every rank's maxima (padded to the largest shard), kept in rank order."""
        rows = collective.rows
        if max(rows) == 0:
            return
        local = self.maxima
        padded = torch.zeros(max(rows), self._num_channels, dtype=torch.float32, device=collective.device)
        padded[: local.shape[0]] = local.to(collective.device)
        gathered = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(gathered, padded, group=collective.group)
        self._blocks = [block[:n].to(self._device) for block, n in zip(gathered, rows) if n]

    def state_dict(self) -> dict:
        return {"maxima": self.maxima.clone()}

    def check_state(self, sd: dict, fields: dict, num_channels: int, num_samples: int, where: str) -> None:
        """The stored maxima are the evidence for every per-channel accumulator."""
        maxima = state_tensor(sd, "maxima", torch.float32, (num_samples, num_channels), where)
        require(torch.isnan(maxima).sum(dim=0) == fields["nan_samples"], where,
                "field 'nan_samples' must count the NaN samples in 'maxima'", fields["nan_samples"])
        require(torch.isinf(maxima).sum(dim=0) == fields["inf_samples"], where,
                "field 'inf_samples' must count the Inf samples in 'maxima'", fields["inf_samples"])
        require((maxima < 0).any(dim=0) == fields["negative"], where,
                "field 'negative' must flag the channels with negative 'maxima'", fields["negative"])
        if maxima.shape[0]:
            column_max = torch.where(torch.isnan(maxima), 0.0, maxima).amax(dim=0).clamp(min=0)
            require(column_max == fields["max"], where, "field 'max' must be the max over samples of 'maxima' "
                    "(NaN samples ignored)", fields["max"])
