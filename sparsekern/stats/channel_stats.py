"""ChannelStats: streaming per-channel statistics of one layer over a whole corpus.

Feed it activations batch by batch (``update(x)`` with x of shape (N, C, ...), or
``update_reduced(m)`` with per-sample maxima that a fused kernel already produced); at the end
ask for the numbers that SCIENCE.md section 1 defines, for every channel c:

    m[n, c]          = max over positions of |a[n, c, ...]|          (per sample; float32)
    corpus_max[c]    = max_n m[n, c]                                  (NaN samples ignored)
    dead_mask(t)[c]  = corpus_max[c] < t                              (float64 compare; t = 1e-12)
    selectivity(t)[c]= fraction of n with m[n, c] / corpus_max[c] < t (float64; t = 1e-3)
                       a channel whose corpus max is 0 (never active) has selectivity 1.0:
                       0/0 is undefined, and a feature that never fires is as selective as it gets
    apoz[c]          = 1 - (#elements > 0) / (#elements)              (Hu et al. 2016; post-ReLU inputs)
    value_min[c], value_max[c] = min / max over the corpus of a[n, c, ...] (signed; NaN samples ignored)
    constant_mask(t)[c] = value_max[c] - value_min[c] <= t            (float64; t = 1e-6)

"Constant by activation" holds for any activation function: a channel whose output never varies
over the corpus (a BN with gamma = 0 before SiLU outputs silu(beta) everywhere). Its default
threshold, 1e-6, is an absolute tolerance of a few float32 rounding steps of values up to ~4: an
exactly constant pre-activation can still come out of a vectorised and a scalar path of one
activation kernel one ulp apart. A dead ReLU channel (corpus max < 1e-12) is also constant.

The range is always kept: ``update`` gets it from the same kernel pass as the max |a|
(``ops.channel_absmax.channel_extrema``: two more vector min / max per element of a
memory-bound pass, and 8 bytes per channel of state), so it costs no extra launch or read.
Samples fed through ``update_reduced`` (per-sample maxima only) carry no range: the constant
mask is then unknown, as APoZ is without positive counts.

NaN / Inf are counted per channel on the device and reported, never turned into "dead" or
"active": the metrics raise NonFiniteActivationError naming the channels unless asked with
``on_nan="exclude"``, which reports them as not dead and gives NaN for their selectivity / APoZ
(``nan_mask()`` / ``nonfinite_mask()`` say which they are). An Inf activation makes a channel
certainly not dead, but its selectivity (a ratio to an infinite maximum) is undefined.

``update`` never synchronises with the host on a GPU: counters are device tensors, the sample
count comes from shapes, and non-finite values are accumulated on the device and only looked at
when a metric is asked for.

What every mode keeps lives here: the corpus max and the NaN / Inf / positive counts per channel
(~29 bytes a channel) and the sample counts. What a selectivity mode keeps per sample ("exact",
"memmap", "histogram", "none") is its store, and the two-pass counts of ``set_reference_max``
(exact with bounded memory, alongside any mode) are a ``TwoPassCounter``: see
``sparsekern.stats.stores`` for what each keeps and costs. ``selectivity(t)`` uses the two-pass
counts when t is one of their thresholds (mode "two_pass"), else the store.

Batch checksums (``checksums=True``): one int64 per update, on the device, that tells whether
two passes fed the same maxima batch by batch (``batch_checksums()``; analyze's two-pass check).

``load_state_dict`` checks a state before using it: every field present with its dtype and
shape, counts non-negative and within the sample count, and the fields consistent with each
other (NaN / Inf counts with the stored maxima or histogram, the corpus max with both, the
two-pass counts with their sample count). A violation raises StateDictError naming the field.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparsekern._backend import BACKENDS
from sparsekern._layout import check_activation
from sparsekern.errors import NonFiniteActivationError, StateDictError
from sparsekern.ops.channel_absmax import traced
from sparsekern.ops.channel_stats_update import HOST_FIELDS, channel_stats_update_impl, clamp_stats_update_impl
from sparsekern.stats.checks import HEADER_FIELDS, check_header, check_reduced
from sparsekern.stats.checksums import BatchChecksums
from sparsekern.stats.counters import CHANNEL_FIELDS, RANGE_STATE_FIELDS, ChannelCounters, RangeCounters
from sparsekern.stats.stores import MAX_MANTISSA_BITS, MODES, Collective, TwoPassCounter, make_store, same_reference

__all__ = ["ChannelStats", "SelectivityResult", "MODES", "NonFiniteActivationError", "StateDictError"]

_SHOWN_CHANNELS = 8  # how many channels an error message lists by index


@dataclass
class SelectivityResult:
    """Per-channel selectivity (float64, shape (C,)) and how far it can be from the truth.

    ``exact`` is True when every ``error_bound`` is 0. ``mode`` is where the numbers came from:
    "exact", "memmap", "histogram" or "two_pass". Channels excluded for NaN / Inf hold NaN.
    """

    value: torch.Tensor
    error_bound: torch.Tensor
    exact: bool
    mode: str
    threshold: float

    @property
    def universality(self) -> torch.Tensor:
        """1 - selectivity: the fraction of samples on which the channel is comparably active."""
        return 1.0 - self.value


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _json_float(v: float):
    return v if math.isfinite(v) else None


class ChannelStats:
    """Streaming per-channel statistics of one layer's activations over a corpus.

    ``num_channels`` and ``device`` are taken from the first update when not given.
    ``selectivity``: "exact" | "memmap" | "histogram" | "none" (see ``sparsekern.stats.stores``
    for what each keeps and costs); ``memmap_path`` names the file of the "memmap" mode, which
    this object then owns and rewrites from its first update (a temporary file, removed with the
    stats, when None); ``histogram_mantissa_bits`` sets the bucket width
    of "histogram" (relative width <= 2^-bits); ``backend`` is passed to ``channel_absmax``.
    ``checksums``: keep one checksum per update (``batch_checksums()``).
    """

    def __init__(
        self,
        num_channels: int | None = None,
        *,
        device=None,
        selectivity: str = "histogram",
        memmap_path=None,
        histogram_mantissa_bits: int = 3,
        backend: str = "auto",
        checksums: bool = False,
    ):
        if selectivity not in MODES:
            raise ValueError(f"ChannelStats: unknown selectivity mode {selectivity!r}; expected one of {MODES}")
        if memmap_path is not None and selectivity != "memmap":
            raise ValueError(f"ChannelStats: memmap_path only applies to selectivity='memmap', not {selectivity!r}")
        if num_channels is not None and (
            isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1
        ):
            raise ValueError(f"ChannelStats: num_channels must be a positive int, got {num_channels!r}")
        bits = histogram_mantissa_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= MAX_MANTISSA_BITS:
            raise ValueError(
                f"ChannelStats: histogram_mantissa_bits must be an int in [0, {MAX_MANTISSA_BITS}], got {bits!r}"
            )
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"ChannelStats: unknown backend {backend!r}; expected auto or one of {BACKENDS}")
        self.mode = selectivity
        self.memmap_path = None if memmap_path is None else os.fspath(memmap_path)
        self.histogram_mantissa_bits = bits
        self.backend = backend
        self.checksums = bool(checksums)
        self._given_channels = num_channels
        self._given_device = None if device is None else torch.device(device)
        self._store = make_store(selectivity, memmap_path=self.memmap_path, histogram_mantissa_bits=bits)
        self._clear()

    # ------------------------------------------------------------------ state
    def _clear(self) -> None:
        self._num_channels = self._given_channels
        self._device = self._given_device
        # Sample counts, known from shapes: a CPU int64 tensor (never read back from a GPU) that the
        # update op advances in place, so a compiled update needs no Python int arithmetic.
        # [num_samples, elements (positions counted for APoZ), apoz_samples (samples that came with
        # positive counts), range_samples (samples that came with their min / max)]
        self._host = torch.zeros(len(HOST_FIELDS), dtype=torch.int64)
        self._counters: ChannelCounters | None = None  # None until the channel count and device are known
        self._range: RangeCounters | None = None  # allocated with the counters
        self._store.clear()
        self._two_pass: TwoPassCounter | None = None
        self._checksums = BatchChecksums()

    def _ensure_state(self, num_channels: int, device: torch.device, state: dict | None = None) -> None:
        """Allocate the accumulators the first time the channel count and device are known,
        holding ``state`` (a checked state dict) when one is being loaded."""
        if self._counters is not None:
            return
        self._num_channels = num_channels
        self._device = device
        if state is None:
            self._counters = ChannelCounters(num_channels, device)
            self._range = RangeCounters(num_channels, device)
        else:
            self._counters = ChannelCounters.from_state(state, device)
            self._range = RangeCounters.from_state(state, device)
        self._store.start(num_channels, device, state)

    def _check_compatible(self, num_channels: int, device: torch.device, where: str) -> None:
        if num_channels < 1:
            raise ValueError(f"{where}: the input has no channels (C = 0)")
        if self._num_channels is not None and num_channels != self._num_channels:
            raise ValueError(
                f"{where}: got {num_channels} channels, but these stats hold {self._num_channels} "
                "(a different layer? use one ChannelStats per layer)"
            )
        if self._device is not None and not _same_device(device, self._device):
            raise ValueError(
                f"{where}: input is on {device}, but these stats live on {self._device}; "
                "move the input (a silent copy would synchronise every batch)"
            )

    def _host_count(index: int, doc: str):  # noqa: N805  (a property factory used in the class body)
        def get(self) -> int:
            return int(self._host[index])

        def set_(self, value: int) -> None:
            self._host[index] = value

        return property(get, set_, doc=doc)

    num_samples = _host_count(0, "Samples fed so far (a python int, from shapes).")
    _elements = _host_count(1, "Positions counted for APoZ (sum over samples of positions per sample).")
    _apoz_samples = _host_count(2, "Samples that came with positive counts.")
    _range_samples = _host_count(3, "Samples that came with their min / max (all those of update()).")
    del _host_count

    @property
    def num_channels(self) -> int | None:
        """Channel count (None until given or seen)."""
        return self._num_channels

    @property
    def device(self) -> torch.device | None:
        return self._device

    def _accumulator(self, name: str, dtype: torch.dtype, what: str) -> torch.Tensor:
        """A counter, or its initial zeros before any data (without fixing the device yet)."""
        if self._counters is not None:
            return getattr(self._counters, name)
        if self._num_channels is None:
            raise ValueError(f"ChannelStats.{what}: no data yet and num_channels unknown")
        return torch.zeros(self._num_channels, dtype=dtype, device=self._device or torch.device("cpu"))

    # ------------------------------------------------------------------ updates
    def update(self, x: torch.Tensor, *, enabled: torch.Tensor | None = None) -> None:
        """Accumulate one batch of activations x (N, C, ...): one call of the registered op
        ``torch.ops.sparsekern.channel_stats_update_``, which computes the per-sample max |a|, positive
        counts and min / max and folds them into every accumulator in place (one fused kernel on the
        cpp and triton backends; see ``sparsekern.ops.channel_stats_update``).

        ``enabled``: a 0-dim bool CPU tensor; when it holds False the batch is not counted (the
        tracker's ``every=k``: a tensor, so a compiled forward needs no Python branch on it).

        Under ``torch.compile`` (fullgraph) this traces to that one op for selectivity "histogram"
        and "none" (and two-pass counting); "exact", "memmap" and ``checksums=True`` keep per-sample
        data in Python lists and files, which a compiled graph cannot grow, and raise there.
        """
        where = "ChannelStats.update"
        check_activation(x, where)
        n, c = x.shape[0], x.shape[1]
        self._check_compatible(c, x.device, where)
        if n == 0:
            return
        keep = self.mode in ("exact", "memmap") or self.checksums
        if keep and torch.compiler.is_compiling():
            raise NotImplementedError(
                f"{where}: selectivity={self.mode!r}{' with checksums=True' if self.checksums else ''} keeps every "
                "per-sample maximum, which a compiled graph cannot do; use selectivity='histogram' or 'none' "
                "under torch.compile (or two-pass counting with set_reference_max)"
            )
        self._ensure_state(c, x.device)
        # Eager calls skip the torch.library dispatcher (see ops.channel_absmax.traced); traced
        # ones go through the registered op.
        update = torch.ops.sparsekern.channel_stats_update_ if traced(x) else channel_stats_update_impl
        m = update(x, *self._op_state(), enabled, keep, self.backend)
        if not keep or (enabled is not None and not bool(enabled)):
            return
        self._keep(m)

    def update_clamped(self, x: torch.Tensor, lo: float, hi: float, *, inplace: bool = False) -> torch.Tensor:
        """``y = torch.clamp(x, lo, hi)`` (into x itself with ``inplace``), measured as ``update(y)``
        would, and returned: a ReLU (lo = 0, hi = inf) or ReLU6 (0, 6) and its statistics in one pass
        over x where the kernel can (cpp backend, float32; otherwise torch.clamp, then ``update``).
        Eager only: analyze runs the model's ReLU modules through it (``SparsityTracker``'s
        ``fuse_activations``)."""
        where = "ChannelStats.update_clamped"
        check_activation(x, where)
        if traced(x):
            raise NotImplementedError(f"{where}: eager only; a traced graph measures with update()")
        n, c = x.shape[0], x.shape[1]
        self._check_compatible(c, x.device, where)
        y = x if inplace else torch.empty_like(x)
        if n == 0:
            return torch.clamp(x, lo, hi, out=y)
        keep = self.mode in ("exact", "memmap") or self.checksums
        self._ensure_state(c, x.device)
        m = clamp_stats_update_impl(x, y, lo, hi, *self._op_state(), keep_maxima=keep, backend=self.backend)
        if keep:
            self._keep(m)
        return y

    def _op_state(self) -> tuple:
        """The state arguments of the update op, from ``mx`` to ``pass2_samples`` (see
        ``sparsekern.ops.channel_stats_update``)."""
        counters, ranges, tp = self._counters, self._range, self._two_pass
        histogram = self._store.counts if self.mode == "histogram" else None
        return (counters.max, counters.nan_samples, counters.inf_samples, counters.positive,
                ranges.value_min, ranges.value_max, self._host, histogram, self.histogram_mantissa_bits,
                None if tp is None else tp.reference, None if tp is None else tp.thresholds_tensor,
                None if tp is None else tp.counts, None if tp is None else tp.max,
                None if tp is None else tp.samples_tensor)

    def _keep(self, m: torch.Tensor) -> None:
        """The per-sample maxima of one update into the per-sample store and the checksums."""
        self._store.update(m)
        if self.checksums:
            self._checksums.record(m)

    def update_reduced(
        self, m: torch.Tensor, positive: torch.Tensor | None = None, elements_per_sample: int | None = None
    ) -> None:
        """Accumulate per-sample maxima m (N, C) that a kernel already reduced (m >= 0).

        ``positive`` (N, C integer counts of elements > 0) and ``elements_per_sample`` (positions
        per sample and channel) feed APoZ; without them APoZ is unavailable for these samples.
        """
        where = "ChannelStats.update_reduced"
        check_reduced(m, positive, elements_per_sample, where)
        n, c = m.shape
        self._check_compatible(c, m.device, where)
        if n == 0:
            return
        # A store that keeps the tensor must not share memory with the caller's buffer.
        m = m.to(torch.float32, copy=self._store.keeps_input)
        self._ensure_state(c, m.device)
        self._counters.negative |= (m < 0).any(dim=0)
        self._accumulate(m, None if positive is None else positive.to(torch.int64), elements_per_sample)

    def _accumulate(self, m: torch.Tensor, positive: torch.Tensor | None, elements_per_sample: int | None) -> None:
        """Fold (N, C) float32 maxima into every accumulator. Device ops only: no host sync."""
        n, c = m.shape
        self._ensure_state(c, m.device)
        batch_max = self._counters.add(m, positive)
        if positive is not None:
            self._elements += n * elements_per_sample
            self._apoz_samples += n
        self._store.update(m)
        if self._two_pass is not None:
            self._two_pass.update(m, batch_max)
        if self.checksums:
            self._checksums.record(m)
        self.num_samples += n

    def batch_checksums(self) -> torch.Tensor:
        """(updates,) int64, on the stats device: one checksum of the maxima of every non-empty
        update since construction or ``reset()``, in order (needs ``checksums=True``).

        Equal checksums mean, up to a hash collision, that the same per-sample maxima were fed.
        They describe what this object was fed: merge, all_reduce and state_dict leave them out.
        """
        if not self.checksums:
            raise ValueError("ChannelStats.batch_checksums: construct with checksums=True to record them")
        return self._checksums.all(self._device or torch.device("cpu"))

    def set_reference_max(self, ref_max: torch.Tensor, thresholds=(1e-3,)) -> None:
        """Start exact two-pass counting against ``ref_max`` (C,), the corpus max of a first pass.

        Every later update counts, per threshold t, the samples with m / ref_max < t (float64).
        Calling it again restarts those counts; the other statistics are untouched.
        """
        where = "ChannelStats.set_reference_max"
        if not isinstance(ref_max, torch.Tensor) or ref_max.dim() != 1 or not ref_max.dtype.is_floating_point:
            raise ValueError(f"{where}: ref_max must be a 1-D floating tensor of per-channel maxima")
        thresholds = tuple(float(t) for t in (thresholds if isinstance(thresholds, (list, tuple)) else (thresholds,)))
        if not thresholds or any(not (math.isfinite(t) and t > 0) for t in thresholds):
            raise ValueError(f"{where}: thresholds must be positive finite numbers, got {thresholds}")
        if len(set(thresholds)) != len(thresholds):
            raise ValueError(f"{where}: duplicate thresholds {thresholds}")
        self._check_compatible(ref_max.shape[0], self._device or ref_max.device, where)
        self._ensure_state(ref_max.shape[0], self._device or ref_max.device)
        ref = ref_max.to(device=self._device, dtype=torch.float32)
        if not bool((torch.isfinite(ref) & (ref >= 0)).all()):
            raise ValueError(f"{where}: ref_max must be finite and >= 0 in every channel")
        self._two_pass = TwoPassCounter(ref, thresholds)

    # ------------------------------------------------------------------ metrics
    @property
    def corpus_max(self) -> torch.Tensor:
        """(C,) float32 max over samples of m[n, c], NaN samples ignored; 0 before any finite sample."""
        return self._accumulator("max", torch.float32, "corpus_max").clone()

    def nan_mask(self) -> torch.Tensor:
        """(C,) bool: channels that saw a NaN in any sample."""
        return self._accumulator("nan_samples", torch.int64, "nan_mask") > 0

    def nonfinite_mask(self) -> torch.Tensor:
        """(C,) bool: channels that saw a NaN or an Inf in any sample."""
        nan = self._accumulator("nan_samples", torch.int64, "nonfinite_mask")
        return (nan > 0) | (self._accumulator("inf_samples", torch.int64, "nonfinite_mask") > 0)

    def _require_samples(self, what: str) -> None:
        if self.num_samples == 0:
            raise ValueError(f"ChannelStats.{what}: no samples seen yet; call update() first")
        if bool(self._counters.negative.any()):
            bad = self._counters.negative.nonzero().flatten().tolist()
            raise ValueError(
                f"ChannelStats.{what}: update_reduced() received negative maxima in channels "
                f"{bad[:_SHOWN_CHANNELS]}{' ...' if len(bad) > _SHOWN_CHANNELS else ''}; "
                "maxima of |activation| are >= 0"
            )

    def _check_nonfinite(self, mask: torch.Tensor, on_nan: str, what: str) -> None:
        """Raise NonFiniteActivationError naming the channels in mask, unless excluding them."""
        if on_nan not in ("raise", "exclude"):
            raise ValueError(f"ChannelStats.{what}: on_nan must be 'raise' or 'exclude', got {on_nan!r}")
        if on_nan == "exclude" or not bool(mask.any()):
            return
        channels = mask.nonzero().flatten().tolist()
        nans = self._counters.nan_samples[mask].tolist()
        infs = self._counters.inf_samples[mask].tolist()
        parts = []
        for c, nan, inf in list(zip(channels, nans, infs))[:_SHOWN_CHANNELS]:
            seen = " and ".join(
                f"{kind} in {k} of {self.num_samples} samples" for kind, k in (("NaN", nan), ("Inf", inf)) if k
            )
            parts.append(f"channel {c} ({seen})")
        more = f", and {len(channels) - _SHOWN_CHANNELS} more" if len(channels) > _SHOWN_CHANNELS else ""
        raise NonFiniteActivationError(
            f"ChannelStats.{what}: {len(channels)} of {self._num_channels} channels saw non-finite activations: "
            f"{', '.join(parts)}{more}. They cannot be called dead or active; pass on_nan='exclude' to "
            "report them separately (nan_mask() / nonfinite_mask() list them).",
            channels, nans, infs,
        )

    def dead_mask(self, threshold: float = 1e-12, on_nan: str = "raise") -> torch.Tensor:
        """(C,) bool: corpus_max < threshold (float64). NaN channels raise, or with
        on_nan="exclude" are reported as not dead (``nan_mask()`` says why)."""
        self._require_samples("dead_mask")
        nan = self.nan_mask()
        self._check_nonfinite(nan, on_nan, "dead_mask")
        return (self._counters.max.to(torch.float64) < float(threshold)) & ~nan

    def _has_selectivity(self, t: float) -> bool:
        """Whether ``selectivity(t)`` has numbers to give: two-pass counts for t, or a store that keeps them."""
        return self._store.measures_selectivity or (self._two_pass is not None and t in self._two_pass.thresholds)

    def selectivity(self, threshold: float = 1e-3, on_nan: str = "raise") -> SelectivityResult:
        """Per channel, the fraction of samples n with m[n, c] / corpus_max[c] < threshold (float64).

        A channel with corpus max 0 (never active) has selectivity 1.0. Channels that saw NaN or
        Inf raise NonFiniteActivationError, or with on_nan="exclude" get NaN. Uses the two-pass
        counts when ``set_reference_max`` was given this threshold, else the selectivity mode.
        """
        self._require_samples("selectivity")
        t = float(threshold)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"ChannelStats.selectivity: threshold must be a positive finite number, got {threshold!r}")
        bad = self.nonfinite_mask()
        self._check_nonfinite(bad, on_nan, "selectivity")
        if self._two_pass is not None and t in self._two_pass.thresholds:
            corpus_max, mode = self._two_pass.reference, "two_pass"
            value, error = self._two_pass.selectivity(t, bad), None
        elif self._store.measures_selectivity:
            corpus_max, mode = self._counters.max, self.mode
            value, error = self._store.selectivity(t, corpus_max, self.num_samples)
        else:
            hint = "" if self._two_pass is None else \
                f" (its reference was set for thresholds {self._two_pass.thresholds})"
            raise ValueError(
                f"ChannelStats.selectivity: selectivity='none' keeps no per-sample maxima{hint}; construct with "
                "selectivity='exact' | 'memmap' | 'histogram', or call set_reference_max(ref, thresholds) "
                f"including {t} before a second pass"
            )
        if error is None:
            error = torch.zeros_like(value)
        never_active = corpus_max == 0
        value = torch.where(never_active, 1.0, value)
        error = torch.where(never_active, 0.0, error)
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=value.device)
        value, error = torch.where(bad, nan, value), torch.where(bad, nan, error)
        exact = not bool((error > 0).any())
        return SelectivityResult(value=value, error_bound=error, exact=exact, mode=mode, threshold=t)

    @property
    def value_min(self) -> torch.Tensor:
        """(C,) float32 min over the corpus of the activation values (signed), NaN samples ignored;
        +inf before any sample with a range."""
        return self._range_tensor("value_min", float("inf"))

    @property
    def value_max(self) -> torch.Tensor:
        """(C,) float32 max over the corpus of the activation values (signed), NaN samples ignored;
        -inf before any sample with a range."""
        return self._range_tensor("value_max", float("-inf"))

    def _range_tensor(self, name: str, identity: float) -> torch.Tensor:
        if self._range is not None:
            return getattr(self._range, name).clone()
        if self._num_channels is None:
            raise ValueError(f"ChannelStats.{name}: no data yet and num_channels unknown")
        return torch.full((self._num_channels,), identity, device=self._device or torch.device("cpu"))

    @property
    def has_range(self) -> bool:
        """Whether every sample came with its min / max (``constant_mask`` can answer)."""
        return self.num_samples > 0 and self._range_samples == self.num_samples

    def value_range(self, on_nan: str = "raise") -> torch.Tensor:
        """(C,) float64 value_max - value_min over the corpus. Channels that saw NaN or Inf raise
        NonFiniteActivationError, or with on_nan="exclude" get NaN."""
        self._require_range("value_range")
        bad = self.nonfinite_mask()
        self._check_nonfinite(bad, on_nan, "value_range")
        spread = self._range.value_max.to(torch.float64) - self._range.value_min.to(torch.float64)
        return torch.where(bad, float("nan"), spread)

    def constant_mask(self, threshold: float = 1e-6, on_nan: str = "raise") -> torch.Tensor:
        """(C,) bool "constant by activation": value_max - value_min <= threshold (float64), for
        any activation. Channels that saw NaN / Inf raise, or with on_nan="exclude" are reported
        as not constant (``nonfinite_mask()`` says why)."""
        t = float(threshold)
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"ChannelStats.constant_mask: threshold must be a finite number >= 0, got {threshold!r}")
        spread = self.value_range(on_nan)
        return ~torch.isnan(spread) & (spread <= t)

    def _require_range(self, what: str) -> None:
        self._require_samples(what)
        if self._range_samples != self.num_samples:
            raise ValueError(
                f"ChannelStats.{what}: {self.num_samples - self._range_samples} of {self.num_samples} samples came "
                "through update_reduced() (or a state saved before ranges were kept), which carries no min / max, "
                "so the value range is unknown"
            )

    def apoz(self, on_nan: str = "raise") -> torch.Tensor:
        """(C,) float64 average percentage of zeros, 1 - positives / elements (post-ReLU inputs).

        Channels that saw NaN raise NonFiniteActivationError, or with on_nan="exclude" get NaN.
        """
        self._require_samples("apoz")
        if self._apoz_samples != self.num_samples:
            raise ValueError(
                f"ChannelStats.apoz: {self.num_samples - self._apoz_samples} of {self.num_samples} samples came "
                "through update_reduced() without `positive` counts, so APoZ is unknown for them"
            )
        if self._elements == 0:
            raise ValueError("ChannelStats.apoz: the activations have no positions (0 elements per sample)")
        nan = self.nan_mask()
        self._check_nonfinite(nan, on_nan, "apoz")
        value = 1.0 - self._counters.positive.to(torch.float64) / self._elements
        return torch.where(nan, float("nan"), value)

    # ------------------------------------------------------------------ combining
    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Add the statistics of ``other`` (another shard of the same corpus) into self; returns self."""
        where = "ChannelStats.merge"
        if not isinstance(other, ChannelStats):
            raise TypeError(f"{where}: expected a ChannelStats, got {type(other).__name__}")
        if other is self:
            raise ValueError(f"{where}: cannot merge a ChannelStats with itself (it would count every sample twice)")
        if other.mode != self.mode or other.histogram_mantissa_bits != self.histogram_mantissa_bits:
            raise ValueError(
                f"{where}: modes differ ({self.mode}, {self.histogram_mantissa_bits} mantissa bits vs "
                f"{other.mode}, {other.histogram_mantissa_bits})"
            )
        if other._counters is None:
            if other._num_channels is not None and self._num_channels is not None:
                self._check_compatible(other._num_channels, self._device or torch.device("cpu"), where)
            return self
        self._check_compatible(other._num_channels, self._device or other._device, where)
        if not same_reference(self._two_pass, other._two_pass):
            raise ValueError(f"{where}: both shards need the same set_reference_max() reference and thresholds, "
                             "or none")
        self._store.check_merge(other._store, where)
        self._ensure_state(other._num_channels, self._device or other._device)
        self._counters.merge(other._counters)
        self._range.merge(other._range)
        self._range_samples += other._range_samples
        self._store.merge(other._store)
        if self._two_pass is not None:
            self._two_pass.merge(other._two_pass)
        self.num_samples += other.num_samples
        self._elements += other._elements
        self._apoz_samples += other._apoz_samples
        return self

    def all_reduce(self, group=None) -> None:
        """Combine the shards of all ranks in ``group``; afterwards every rank holds the whole corpus.

        MAX of corpus maxima, SUM of counts and histograms, all_gather of stored maxima (ranks may
        hold different N; "exact" keeps rank order, "memmap" appends the other ranks' rows after
        its own). Every rank must know num_channels (from data or the constructor). Call it once:
        a second call counts everything again.
        """
        where = "ChannelStats.all_reduce"
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{where}: torch.distributed is not initialised (call init_process_group first)")
        if self._num_channels is None:
            raise ValueError(f"{where}: this rank saw no data and num_channels was not given to the constructor")
        two_pass = self._two_pass
        thresholds, pass2_samples = (0, 0) if two_pass is None else (len(two_pass.thresholds), two_pass.samples)
        # One gather of every rank's configuration and python counters: checks that the ranks
        # agree, and gives the totals and the per-rank sample counts for the gathers below.
        collective, totals = Collective.start(
            group, self._device,
            [self._num_channels, MODES.index(self.mode), self.histogram_mantissa_bits, thresholds],
            [self.num_samples, self._elements, self._apoz_samples, pass2_samples, self._range_samples],
            "channels, mode, mantissa bits, two-pass thresholds", where,
        )
        self._ensure_state(self._num_channels, self._device or collective.device)
        if two_pass is not None:
            two_pass.check_ranks_agree(collective, where)
        self._counters.all_reduce(collective)
        self._range.all_reduce(collective)
        if two_pass is not None:
            two_pass.all_reduce(collective, totals[3])
        self._store.all_reduce(collective)
        self.num_samples, self._elements, self._apoz_samples = totals[:3]
        self._range_samples = totals[4]

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """A snapshot of everything accumulated (tensors cloned). "memmap" writes its staged rows
        out first and records the file's path and row count, not its contents."""
        sd = {
            "format": 1,
            "mode": self.mode,
            "histogram_mantissa_bits": self.histogram_mantissa_bits,
            "num_channels": self._num_channels,
            "num_samples": self.num_samples,
            "elements": self._elements,
            "apoz_samples": self._apoz_samples,
        }
        if self._counters is None:
            return sd
        sd.update(self._counters.state_dict())
        sd.update(self._range.state_dict(), range_samples=self._range_samples)
        sd.update(self._store.state_dict())
        if self._two_pass is not None:
            sd.update(self._two_pass.state_dict())
        return sd

    def check_state_dict(self, sd: dict) -> None:
        """Raise StateDictError unless ``sd`` is a consistent state these stats can load.

        Checks that every field is present with its type, dtype and shape, and the invariants
        the updates keep (module docstring). A "memmap" state whose file is gone raises
        FileNotFoundError; the file's rows are not read (that would be a pass over the corpus).
        """
        where = "ChannelStats.load_state_dict"
        c, n, elements = check_header(sd, self.mode, self.histogram_mantissa_bits, self._given_channels, where)
        expected = set(HEADER_FIELDS)
        if "max" in sd:
            expected |= set(CHANNEL_FIELDS) | set(self._store.fields)
            expected |= set(TwoPassCounter.fields) if "reference" in sd else set()
            # The range fields come all together, or not at all (a state saved before they existed).
            expected |= set(RANGE_STATE_FIELDS) if set(RANGE_STATE_FIELDS) & set(sd) else set()
        unknown, absent = sorted(set(sd) - expected), sorted(expected - set(sd))
        if unknown:
            hint = " (two-pass fields come with 'reference')" if set(unknown) & set(TwoPassCounter.fields) else ""
            raise StateDictError(f"{where}: unexpected field(s) {unknown} in a selectivity={self.mode!r} state{hint}")
        if absent:
            raise StateDictError(f"{where}: missing field(s) {absent}")
        if "max" not in sd:
            if n or elements:
                raise StateDictError(f"{where}: num_samples is {n} and elements {elements}, but the state holds no "
                                     "statistics (no field 'max')")
            return
        if c is None:
            raise StateDictError(f"{where}: field 'num_channels' is None but the state holds statistics")
        fields = ChannelCounters.check_state(sd, c, n, elements, where)
        if "range_samples" in sd:
            RangeCounters.check_state(sd, fields, c, n, where)
        self._store.check_state(sd, fields, c, n, where)
        if "reference" in sd:
            TwoPassCounter.check_state(sd, fields, c, n, where)

    def load_state_dict(self, sd: dict) -> None:
        """Replace this object's statistics by those in ``sd`` (from ``state_dict``).

        ``sd`` is checked first (``check_state_dict``); an invalid state leaves these stats as
        they were. "memmap": if this object's memmap_path is the file named in ``sd``, the file is
        resumed in place; otherwise its rows are copied into this object's own file (a temporary
        one when memmap_path is None), so two objects never share a file.
        """
        self.check_state_dict(sd)
        c = sd["num_channels"]
        self._clear()
        if "max" not in sd:
            self._num_channels = c if c is not None else self._given_channels
            return
        device = self._given_device or sd["max"].device
        self._ensure_state(c, device, state=sd)
        if "reference" in sd:
            self._two_pass = TwoPassCounter.from_state(sd, device)
        self.num_samples, self._elements, self._apoz_samples = sd["num_samples"], sd["elements"], sd["apoz_samples"]
        self._range_samples = sd.get("range_samples", 0)

    def reset(self) -> None:
        """Forget every sample and the two-pass reference (back to the constructor's state)."""
        self._clear()

    # ------------------------------------------------------------------ report
    def summary(
        self, dead_thresholds=(1e-12, 1e-4), selectivity_threshold: float = 1e-3, per_channel: bool = True,
        constant_thresholds=(1e-6,),
    ) -> dict:
        """JSON-able numbers: fraction of dead channels at each threshold, of constant ones at each
        constant threshold (None without a range), selectivity, APoZ.

        Never raises for NaN / Inf: those channels are listed under "nonfinite_channels",
        counted as not dead, and their per-channel values are None. Metrics that these stats
        cannot give (selectivity with mode "none", APoZ without positive counts) are None.
        """
        self._require_samples("summary")
        c = self._num_channels
        bad = self.nonfinite_mask()
        out = {
            "num_samples": self.num_samples,
            "num_channels": c,
            "mode": self.mode,
            "nan_channels": self.nan_mask().nonzero().flatten().tolist(),
            "nonfinite_channels": bad.nonzero().flatten().tolist(),
            "dead_fraction": {},
            "dead_count": {},
        }
        channels = {"corpus_max": [_json_float(v) for v in self._counters.max.tolist()]}
        for t in dead_thresholds:
            dead = self.dead_mask(t, on_nan="exclude")
            key = f"{t:g}"
            out["dead_count"][key] = int(dead.sum())
            out["dead_fraction"][key] = int(dead.sum()) / c
            channels[f"dead@{key}"] = dead.tolist()
        if self.has_range:
            out["constant_count"], out["constant_fraction"] = {}, {}
            channels["value_min"] = [_json_float(v) for v in self._range.value_min.tolist()]
            channels["value_max"] = [_json_float(v) for v in self._range.value_max.tolist()]
            for t in constant_thresholds:
                constant = self.constant_mask(t, on_nan="exclude")
                key = f"{t:g}"
                out["constant_count"][key] = int(constant.sum())
                out["constant_fraction"][key] = int(constant.sum()) / c
                channels[f"constant@{key}"] = constant.tolist()
        else:
            out["constant_count"] = out["constant_fraction"] = None
        if self._has_selectivity(float(selectivity_threshold)):
            sel = self.selectivity(selectivity_threshold, on_nan="exclude")
            good = ~torch.isnan(sel.value)
            out["selectivity"] = {
                "threshold": sel.threshold,
                "mode": sel.mode,
                "exact": sel.exact,
                "mean": _json_float(sel.value[good].mean().item()) if bool(good.any()) else None,
                "max_error_bound": _json_float(sel.error_bound[good].max().item()) if bool(good.any()) else None,
            }
            channels["selectivity"] = [_json_float(v) for v in sel.value.tolist()]
            channels["selectivity_error_bound"] = [_json_float(v) for v in sel.error_bound.tolist()]
        else:
            out["selectivity"] = None
        apoz = self.apoz(on_nan="exclude") if self._apoz_samples == self.num_samples and self._elements else None
        out["apoz_mean"] = None if apoz is None or bool(torch.isnan(apoz).all()) else apoz.nanmean().item()
        if apoz is not None:
            channels["apoz"] = [_json_float(v) for v in apoz.tolist()]
        if per_channel:
            out["channels"] = channels
        return out

