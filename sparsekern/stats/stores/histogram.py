"""Selectivity mode "histogram": bounded memory, one pass, approximate with a reported bound.

Per channel, counts of m[n, c] in buckets taken from the float32 bits: the 8 exponent bits plus
the top ``bits`` mantissa bits, so a bucket spans a relative width of at most 2^-bits (12.5 %
for 3). Zero has its own bucket; NaN / Inf samples go to a last bucket that no metric uses. At
the end the samples in buckets entirely below ``t * corpus_max`` are counted exactly; only the
one bucket straddling the threshold is uncertain. The result is the midpoint,
``value = (below + straddle / 2) / N``, with ``error_bound = straddle / (2 N)``: the true
selectivity lies in [value - error_bound, value + error_bound], which is exactly the range the
histogram allows. 255 * 2^bits + 2 buckets per channel (2042 for 3 bits).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.distributed as dist

from sparsekern.stats.checks import require, state_tensor
from sparsekern.stats.stores.base import Collective, SelectivityStore

MAX_MANTISSA_BITS = 10  # 2^10 buckets per octave is already ~2 MB per channel


def num_buckets(bits: int) -> int:
    return (255 << bits) + 2


@lru_cache(maxsize=None)
def _bucket_bounds(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(smallest, largest) float32 value of every histogram bucket, as float64 (CPU).

    Bucket 0 holds exact zeros; bucket k + 1 holds the positive finite floats whose bit pattern
    shifted right by 23 - bits is k; the last bucket holds NaN / Inf and has NaN bounds, so no
    comparison ever counts it.
    """
    shift = 23 - bits
    keys = torch.arange(255 << bits, dtype=torch.int64)
    smallest = torch.clamp(keys << shift, min=1)  # key 0 starts at the smallest subnormal, not 0
    largest = ((keys + 1) << shift) - 1
    as_float = lambda b: b.to(torch.int32).view(torch.float32).to(torch.float64)  # noqa: E731
    zero = torch.zeros(1, dtype=torch.float64)
    nan = torch.full((1,), float("nan"), dtype=torch.float64)
    return torch.cat([zero, as_float(smallest), nan]), torch.cat([zero, as_float(largest), nan])


def _prefix_below(bounds: torch.Tensor, corpus_max: torch.Tensor, t: float) -> torch.Tensor:
    """Per channel, how many of the non-decreasing ``bounds`` satisfy ``bound / corpus_max < t``
    (float64, as written: the test is a prefix of the buckets). ``searchsorted`` on ``t * corpus_max``
    finds it up to the rounding of that product; one step either way makes it exact."""
    k = torch.searchsorted(bounds, t * corpus_max)
    last = bounds.shape[0]
    below = lambda i: bounds[i.clamp(0, last - 1)] / corpus_max < t  # noqa: E731
    k = torch.where((k < last) & below(k), k + 1, k)
    k = torch.where((k > 0) & ~below(k - 1), k - 1, k)
    return k


# Channels per step of _prefix_sums on the CPU: a step's masked copy (64 x 2041 int64, 1 MiB)
# stays in cache, where a masked copy or running sum of all C x 2041 counts at once (280 MB for
# MobileNetV2's 17k channels) went to memory and cost more than the analysis pass itself.
_CPU_CHANNEL_STEP = 64


def _prefix_sums(counts: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(C,) int64: the sum of counts[c, :k[c]] per channel."""
    step = _CPU_CHANNEL_STEP if counts.device.type == "cpu" else counts.shape[0]
    index = torch.arange(counts.shape[1], device=counts.device)
    return torch.cat([torch.where(index < k[i:i + step, None], counts[i:i + step], 0).sum(dim=1)
                      for i in range(0, counts.shape[0], step)])


# The widest window of buckets _count_below reads per channel; wider ones (thresholds far below
# 2^-32 of the max) take the full prefix sums.
_MAX_WINDOW = 1024


def _occupied_end(corpus_max: torch.Tensor, bits: int) -> torch.Tensor:
    """(C,) int64: one past the highest finite bucket a channel can occupy (its corpus max's bucket:
    the maxima are <= the corpus max and the buckets are ordered); -1 where the max is not finite
    (an Inf sample: the finite maxima may be anywhere)."""
    mx = corpus_max.to(torch.float32)
    key = torch.where(mx > 0, (mx.view(torch.int32) >> (23 - bits)).to(torch.int64) + 1, 0)
    return torch.where(torch.isfinite(mx), key + 1, -1)


def _count_below(counts: torch.Tensor, k: torch.Tensor, top: torch.Tensor, num_samples: int) -> torch.Tensor:
    """(C,) int64: the samples in finite buckets [0, k[c]) of every channel.

    Read as the finite samples minus those in buckets [k, top): the threshold sits within a few
    dozen buckets of the max (log2(1 / t) * 2^bits), so this window, not the whole row of 2041
    buckets, is all that needs reading. Channels without a finite top, or windows wider than
    _MAX_WINDOW, take the prefix sums."""
    finite_total = num_samples - counts[:, -1]
    width = (top - k).clamp(min=0)
    general = top < 0
    if bool(general.any()) or int(width.max()) > _MAX_WINDOW:
        return _prefix_sums(counts[:, :-1], k)
    w = int(width.max())
    if w == 0:
        return finite_total
    index = k.unsqueeze(1) + torch.arange(w, device=counts.device)
    inside = index < top.unsqueeze(1)
    window = counts.gather(1, index.clamp(max=counts.shape[1] - 2))
    return finite_total - torch.where(inside, window, 0).sum(dim=1)


class HistogramStore(SelectivityStore):
    """(C, buckets) int64 counts on the stats device: C x (255 * 2^bits + 2) x 8 bytes."""

    mode = "histogram"
    fields = ("histogram",)
    measures_selectivity = True

    def __init__(self, bits: int):
        self.bits = bits
        self.clear()

    def clear(self) -> None:
        self._counts: torch.Tensor | None = None
        self._offsets: torch.Tensor | None = None  # where each channel's row starts in the flat counts

    def start(self, num_channels: int, device: torch.device, state: dict | None = None) -> None:
        buckets = num_buckets(self.bits)
        self._counts = torch.zeros(num_channels, buckets, dtype=torch.int64, device=device)
        self._offsets = torch.arange(num_channels, device=device) * buckets
        if state is not None:
            self._counts.copy_(state["histogram"])

    @property
    def counts(self) -> torch.Tensor | None:
        """(C, buckets) int64 counts (None before ``start``); the fused update op adds to them in place."""
        return self._counts

    def update(self, m: torch.Tensor) -> None:
        # For non-negative floats the int32 bit pattern orders like the value, so shifting off
        # the low mantissa bits gives log-spaced buckets without any log().
        key = (m.view(torch.int32) >> (23 - self.bits)) + 1
        finite = torch.isfinite(m)
        bucket = torch.where(finite & (m > 0), key, 0)
        bucket = torch.where(finite, bucket, self._counts.shape[1] - 1)
        flat = (bucket.to(torch.int64) + self._offsets).reshape(-1)
        self._counts.view(-1).scatter_add_(0, flat, torch.ones_like(flat))

    def selectivity(self, t: float, corpus_max: torch.Tensor, num_samples: int):
        smallest, largest = (b.to(self._counts.device) for b in _bucket_bounds(self.bits))
        corpus_max = corpus_max.to(torch.float64)
        # Ratios are monotone in m, so a bucket is entirely below the threshold iff its largest
        # value is, and entirely at/above iff its smallest is; at most one bucket straddles. Both
        # tests hold on a prefix of the finite buckets: count them per channel, then sum each
        # channel's counts over its prefix.
        top = _occupied_end(corpus_max, self.bits)
        all_below = _count_below(self._counts, _prefix_below(largest[:-1], corpus_max, t), top, num_samples)
        some_below = _count_below(self._counts, _prefix_below(smallest[:-1], corpus_max, t), top, num_samples)
        below = all_below.to(torch.float64)
        straddle = (some_below - all_below).to(torch.float64)
        n = num_samples
        return (below + straddle / 2) / n, straddle / (2 * n)

    def merge(self, other: "HistogramStore") -> None:
        self._counts += other._counts.to(self._counts.device)

    def all_reduce(self, collective: Collective) -> None:
        collective.reduce_(self._counts, dist.ReduceOp.SUM)

    def state_dict(self) -> dict:
        return {"histogram": self._counts.clone()}

    def check_state(self, sd: dict, fields: dict, num_channels: int, num_samples: int, where: str) -> None:
        """Bucket counts against the sample count, the NaN / Inf counts and the corpus max."""
        hist = state_tensor(sd, "histogram", torch.int64, (num_channels, num_buckets(self.bits)), where)
        n = num_samples
        require(hist >= 0, where, "field 'histogram' must be >= 0", hist, "(channel, bucket)")
        require(hist.sum(dim=1) == n, where, f"every row of 'histogram' must sum to num_samples ({n})",
                hist.sum(dim=1))
        nonfinite = fields["nan_samples"] + fields["inf_samples"]
        require(hist[:, -1] == nonfinite, where, "the last bucket of 'histogram' (NaN / Inf samples) must hold "
                "'nan_samples' + 'inf_samples'", hist[:, -1])
        # A finite corpus max lies in the highest occupied finite bucket (the bucket rule of
        # update); without a finite sample it is 0. An infinite max bounds nothing.
        mx = fields["max"]
        occupied = hist[:, :-1] > 0
        highest = torch.where(occupied, torch.arange(occupied.shape[1], device=hist.device), -1).amax(dim=1)
        key = torch.where(mx > 0, (mx.view(torch.int32) >> (23 - self.bits)) + 1, 0)
        any_finite = occupied.any(dim=1)
        ok = torch.isinf(mx) | (any_finite & (highest == key)) | (~any_finite & (mx == 0))
        require(ok, where, "field 'max' must lie in the highest occupied finite bucket of 'histogram'", mx)
