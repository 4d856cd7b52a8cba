"""Two-pass selectivity, exact with bounded memory, alongside any mode: against the corpus max
of a first pass (``ChannelStats.set_reference_max``), every later batch counts exactly, per
threshold t, the samples with m / reference < t. C x (8 T + 8) bytes for T thresholds.

The counts are the definition's only if the reference really is the maximum of the samples
counted, so the counter also keeps that maximum and ``selectivity`` compares the two.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from sparsekern.errors import StateDictError
from sparsekern.stats.checks import require, state_count, state_tensor
from sparsekern.stats.stores.base import Collective


class TwoPassCounter:
    """Counts against ``reference`` (C,) float32 for each of ``thresholds`` (distinct, > 0)."""

    fields = ("reference", "thresholds", "pass2_counts", "pass2_max", "pass2_samples")

    def __init__(self, reference: torch.Tensor, thresholds: tuple[float, ...]):
        self.reference = reference.clone()
        self.thresholds = thresholds
        self.thresholds_tensor = torch.tensor(thresholds, dtype=torch.float64, device=reference.device)
        self.counts = torch.zeros(reference.shape[0], len(thresholds), dtype=torch.int64, device=reference.device)
        self.max = torch.zeros_like(reference)  # of the samples counted
        # A CPU tensor, so that the fused update op counts it in place (torch.compile) and reading
        # it never synchronises with a GPU.
        self.samples_tensor = torch.zeros((), dtype=torch.int64)

    @property
    def samples(self) -> int:
        return int(self.samples_tensor)

    @samples.setter
    def samples(self, value: int) -> None:
        self.samples_tensor.fill_(value)

    def update(self, m: torch.Tensor, batch_max: torch.Tensor) -> None:
        """Count a batch of maxima m (N, C float32) whose per-channel max without the NaN
        samples is ``batch_max``. Device ops only."""
        ratio = m.to(torch.float64) / self.reference.to(torch.float64)
        self.counts += (ratio.unsqueeze(-1) < self.thresholds_tensor).sum(dim=0)
        torch.maximum(self.max, batch_max, out=self.max)
        self.samples += m.shape[0]

    def selectivity(self, t: float, nonfinite: torch.Tensor) -> torch.Tensor:
        """(C,) float64 fraction of the counted samples below threshold ``t`` (one of the
        thresholds), once the reference is checked against them (``nonfinite`` channels aside)."""
        if self.samples == 0:
            raise ValueError(
                "ChannelStats.selectivity: set_reference_max() was called but no samples were counted after it"
            )
        mismatch = (self.max != self.reference) & ~nonfinite
        if bool(mismatch.any()):
            channels = mismatch.nonzero().flatten().tolist()
            c = channels[0]
            raise ValueError(
                f"ChannelStats.selectivity: the reference max differs from the max of the samples counted since "
                f"set_reference_max() in {len(channels)} channels (channel {c}: reference "
                f"{self.reference[c].item()!r}, counted samples' max {self.max[c].item()!r}); pass the "
                "corpus max of a first pass over the same data (no random augmentation)"
            )
        return self.counts[:, self.thresholds.index(t)].to(torch.float64) / self.samples

    def merge(self, other: "TwoPassCounter") -> None:
        """Add the counts of ``other``, which counts against the same reference and thresholds."""
        device = self.counts.device
        self.counts += other.counts.to(device)
        torch.maximum(self.max, other.max.to(device), out=self.max)
        self.samples += other.samples

    def check_ranks_agree(self, collective: Collective, where: str) -> None:
        """Raise ValueError on every rank unless all ranks count against the same reference and
        thresholds (their number is known to agree)."""
        reference = self.reference.to(collective.device)
        low, high = reference.clone(), reference.clone()
        thresholds = torch.tensor(self.thresholds, dtype=torch.float64, device=collective.device)
        low_t, high_t = thresholds.clone(), thresholds.clone()
        for tensor, op in ((low, dist.ReduceOp.MIN), (high, dist.ReduceOp.MAX),
                           (low_t, dist.ReduceOp.MIN), (high_t, dist.ReduceOp.MAX)):
            dist.all_reduce(tensor, op=op, group=collective.group)
        if not (torch.equal(low, high) and torch.equal(low_t, high_t)):
            raise ValueError(f"{where}: ranks hold different set_reference_max() references or thresholds")

    def all_reduce(self, collective: Collective, total_samples: int) -> None:
        """Sum the counts of every rank (which counted ``total_samples`` samples together)."""
        collective.reduce_(self.counts, dist.ReduceOp.SUM)
        collective.reduce_(self.max, dist.ReduceOp.MAX)
        self.samples = total_samples

    def state_dict(self) -> dict:
        return {"reference": self.reference.clone(), "thresholds": self.thresholds, "pass2_counts": self.counts.clone(),
                "pass2_max": self.max.clone(), "pass2_samples": self.samples}

    @classmethod
    def from_state(cls, sd: dict, device: torch.device) -> "TwoPassCounter":
        """The counter of a state dict that ``check_state`` accepted, on ``device``."""
        thresholds = tuple(float(t) for t in sd["thresholds"])
        counter = cls(sd["reference"].to(device=device, dtype=torch.float32), thresholds)
        counter.counts.copy_(sd["pass2_counts"])
        counter.max.copy_(sd["pass2_max"])
        counter.samples = sd["pass2_samples"]
        return counter

    @staticmethod
    def check_state(sd: dict, fields: dict, num_channels: int, num_samples: int, where: str) -> None:
        """The reference, its thresholds, and the counts made against it (``fields``: the
        per-channel accumulators, already checked)."""
        c, n = num_channels, num_samples
        ref = state_tensor(sd, "reference", torch.float32, (c,), where)
        require(torch.isfinite(ref) & (ref >= 0), where, "field 'reference' must be finite and >= 0", ref)
        thresholds = sd["thresholds"]
        if (not isinstance(thresholds, (tuple, list)) or not thresholds or len(set(thresholds)) != len(thresholds)
                or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0)
                       for t in thresholds)):
            raise StateDictError(f"{where}: field 'thresholds' must be distinct positive finite numbers, "
                                 f"got {thresholds!r}")
        samples = state_count(sd, "pass2_samples", where)
        if samples > n:
            raise StateDictError(f"{where}: field 'pass2_samples' ({samples}) must be <= num_samples ({n})")
        counts = state_tensor(sd, "pass2_counts", torch.int64, (c, len(thresholds)), where)
        require((counts >= 0) & (counts <= samples), where,
                f"field 'pass2_counts' must lie in [0, pass2_samples] = [0, {samples}]", counts, "(channel, threshold)")
        # m / ref < t holds for every larger t too: counts grow with the threshold.
        order = sorted(range(len(thresholds)), key=lambda i: thresholds[i])
        grows = torch.ones_like(counts, dtype=torch.bool)
        grows[:, order[1:]] = counts[:, order[1:]] >= counts[:, order[:-1]]
        require(grows, where, "field 'pass2_counts' must not decrease as the threshold grows", counts,
                "(channel, threshold)")
        pass2_max = state_tensor(sd, "pass2_max", torch.float32, (c,), where)
        require(pass2_max >= 0, where, "field 'pass2_max' must be >= 0 and not NaN", pass2_max)
        # The samples counted since set_reference_max are among all the samples.
        require(pass2_max <= fields["max"], where, "field 'pass2_max' must be <= 'max'", pass2_max)
        if samples == 0:
            require(pass2_max == 0, where, "field 'pass2_max' must be 0 while pass2_samples is 0", pass2_max)


def same_reference(a: TwoPassCounter | None, b: TwoPassCounter | None) -> bool:
    """Whether two counters (or their absence) count against the same reference and thresholds."""
    if a is None or b is None:
        return a is b
    return a.thresholds == b.thresholds and torch.equal(a.reference, b.reference.to(a.reference.device))
