"""The per-channel accumulators every selectivity mode has: the corpus max and the NaN / Inf /
positive counts (~29 bytes a channel), and the corpus min / max of the values (8 bytes a channel,
``RangeCounters``), with their update, merge, distributed reduction and state."""
from __future__ import annotations

import torch
import torch.distributed as dist

from sparsekern.errors import StateDictError
from sparsekern.stats.checks import require, state_count, state_tensor
from sparsekern.stats.stores import Collective

# The state-dict fields of the counters, with their dtypes; each of shape (C,).
CHANNEL_FIELDS = {"max": torch.float32, "nan_samples": torch.int64, "inf_samples": torch.int64,
                  "positive": torch.int64, "negative": torch.bool}


class ChannelCounters:
    """``max``: the corpus max, NaN samples ignored; ``nan_samples`` / ``inf_samples``: samples
    whose maximum was NaN / Inf; ``positive``: elements > 0 (APoZ); ``negative``: channels that
    update_reduced got a negative maximum for (checked when a metric is asked)."""

    def __init__(self, num_channels: int, device: torch.device):
        zeros = lambda dtype: torch.zeros(num_channels, dtype=dtype, device=device)  # noqa: E731
        self.max = zeros(torch.float32)
        self.nan_samples = zeros(torch.int64)
        self.inf_samples = zeros(torch.int64)
        self.positive = zeros(torch.int64)
        self.negative = zeros(torch.bool)

    def add(self, m: torch.Tensor, positive: torch.Tensor | None) -> torch.Tensor:
        """Fold in a batch of maxima m (N, C float32) and its positive counts (N, C, or None);
        returns the batch's per-channel max without its NaN samples. Device ops only."""
        nan = torch.isnan(m)
        self.nan_samples += nan.sum(dim=0)
        self.inf_samples += torch.isinf(m).sum(dim=0)
        batch_max = torch.where(nan, 0.0, m).amax(dim=0)  # NaN samples do not enter the corpus max
        torch.maximum(self.max, batch_max, out=self.max)
        if positive is not None:
            self.positive += positive.sum(dim=0)
        return batch_max

    def merge(self, other: "ChannelCounters") -> None:
        device = self.max.device
        torch.maximum(self.max, other.max.to(device), out=self.max)
        self.nan_samples += other.nan_samples.to(device)
        self.inf_samples += other.inf_samples.to(device)
        self.positive += other.positive.to(device)
        self.negative |= other.negative.to(device)

    def all_reduce(self, collective: Collective) -> None:
        collective.reduce_(self.max, dist.ReduceOp.MAX)
        for tensor in (self.nan_samples, self.inf_samples, self.positive):
            collective.reduce_(tensor, dist.ReduceOp.SUM)
        negative = self.negative.to(torch.int32)  # collectives do not take bools
        collective.reduce_(negative, dist.ReduceOp.MAX)
        self.negative = negative.bool()

    def state_dict(self) -> dict:
        return {key: getattr(self, key).clone() for key in CHANNEL_FIELDS}

    @classmethod
    def from_state(cls, sd: dict, device: torch.device) -> "ChannelCounters":
        """The counters of a state dict that ``check_state`` accepted, on ``device``."""
        counters = cls(sd["max"].shape[0], device)
        for key in CHANNEL_FIELDS:
            getattr(counters, key).copy_(sd[key])
        return counters

    @staticmethod
    def check_state(sd: dict, num_channels: int, num_samples: int, elements: int, where: str) -> dict:
        """The counters' fields of ``sd`` (typed and shaped) checked against each other and the
        sample counts; returns them by name."""
        f = {key: state_tensor(sd, key, dtype, (num_channels,), where) for key, dtype in CHANNEL_FIELDS.items()}
        mx, nan, inf, n = f["max"], f["nan_samples"], f["inf_samples"], num_samples
        require(~torch.isnan(mx), where, "field 'max' must not be NaN (NaN samples never enter the corpus max; "
                "'nan_samples' counts them)", mx)
        require(mx >= 0, where, "field 'max' must be >= 0", mx)
        for key in ("nan_samples", "inf_samples", "positive"):
            require(f[key] >= 0, where, f"field {key!r} must be >= 0", f[key])
        require(nan + inf <= n, where, f"'nan_samples' + 'inf_samples' must be <= num_samples ({n})", nan + inf)
        require(~torch.isinf(mx) | (inf > 0), where, "field 'max' is +Inf, so 'inf_samples' must be > 0", inf)
        # A -Inf from update_reduced counts as Inf without raising the max; it also sets 'negative'.
        require((inf == 0) | torch.isinf(mx) | f["negative"], where,
                "field 'inf_samples' is > 0, so 'max' must be +Inf", mx)
        require(f["positive"] <= elements, where, f"field 'positive' must be <= elements ({elements})", f["positive"])
        if n == 0:
            require(mx == 0, where, "field 'max' must be 0 while num_samples is 0", mx)
        return f


# The state-dict fields of the value range, each (C,) float32, plus the int ``range_samples``.
# Optional in a state: checkpoints written before the range existed lack all three.
RANGE_FIELDS = {"value_min": torch.float32, "value_max": torch.float32}
RANGE_STATE_FIELDS = (*RANGE_FIELDS, "range_samples")


class RangeCounters:
    """The corpus min and max of the activation values per channel (signed, NaN samples ignored):
    ``value_min`` starts at +inf and ``value_max`` at -inf, the identities, so merging is exact."""

    def __init__(self, num_channels: int, device: torch.device):
        self.value_min = torch.full((num_channels,), float("inf"), dtype=torch.float32, device=device)
        self.value_max = torch.full((num_channels,), float("-inf"), dtype=torch.float32, device=device)

    def add(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Fold in per-sample minima / maxima (N, C float32; NaN for a sample that saw NaN). Device ops only."""
        nan = torch.isnan(lo) | torch.isnan(hi)
        torch.minimum(self.value_min, torch.where(nan, float("inf"), lo).amin(dim=0), out=self.value_min)
        torch.maximum(self.value_max, torch.where(nan, float("-inf"), hi).amax(dim=0), out=self.value_max)

    def merge(self, other: "RangeCounters") -> None:
        device = self.value_min.device
        torch.minimum(self.value_min, other.value_min.to(device), out=self.value_min)
        torch.maximum(self.value_max, other.value_max.to(device), out=self.value_max)

    def all_reduce(self, collective: Collective) -> None:
        collective.reduce_(self.value_min, dist.ReduceOp.MIN)
        collective.reduce_(self.value_max, dist.ReduceOp.MAX)

    def state_dict(self) -> dict:
        return {key: getattr(self, key).clone() for key in RANGE_FIELDS}

    @classmethod
    def from_state(cls, sd: dict, device: torch.device) -> "RangeCounters":
        ranges = cls(sd["max"].shape[0], device)
        if "value_min" in sd:
            for key in RANGE_FIELDS:
                getattr(ranges, key).copy_(sd[key])
        return ranges

    @staticmethod
    def check_state(sd: dict, counters: dict, num_channels: int, num_samples: int, where: str) -> int:
        """The range fields of ``sd`` checked (types, shapes, against each other, the sample count
        and the corpus max |a| in ``counters``); returns range_samples."""
        k = state_count(sd, "range_samples", where)
        if k > num_samples:
            raise StateDictError(f"{where}: field 'range_samples' ({k}) must be <= num_samples ({num_samples})")
        f = {key: state_tensor(sd, key, dtype, (num_channels,), where) for key, dtype in RANGE_FIELDS.items()}
        lo, hi, mx = f["value_min"], f["value_max"], counters["max"]
        require(~torch.isnan(lo) & ~torch.isnan(hi), where, "fields 'value_min' / 'value_max' must not be NaN "
                "(NaN samples never enter the range)", torch.where(torch.isnan(lo), lo, hi))
        untouched = (lo == float("inf")) & (hi == float("-inf"))
        if k == 0:
            require(untouched, where, "fields 'value_min' / 'value_max' must be +inf / -inf while range_samples "
                    "is 0", lo)
        require(untouched | (lo <= hi), where, "field 'value_min' must be <= 'value_max'", lo)
        bound = torch.maximum(-lo, hi)
        require(untouched | (bound <= mx), where, "max(-'value_min', 'value_max') must be <= 'max' (the corpus "
                "max |a|)", bound)
        return k
