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

NaN / Inf are counted per channel on the device and reported, never turned into "dead" or
"active": the metrics raise NonFiniteActivationError naming the channels unless asked with
``on_nan="exclude"``, which reports them as not dead and gives NaN for their selectivity / APoZ
(``nan_mask()`` / ``nonfinite_mask()`` say which they are). An Inf activation makes a channel
certainly not dead, but its selectivity (a ratio to an infinite maximum) is undefined.

``update`` never synchronises with the host on a GPU: counters are device tensors, the sample
count comes from shapes, and non-finite values are accumulated on the device and only looked at
when a metric is asked for.

Selectivity modes and what they cost
------------------------------------
Selectivity needs the corpus max before a sample can be classified, so a one-pass method must
either keep every per-sample maximum or approximate. The modes (``selectivity=...``):

* ``"exact"``: keeps every m[n, c] (float32) on the device. Exact.
* ``"memmap"``: the same maxima in a raw float32 (N, C) file on the host. Rows go
  device -> pinned host buffer asynchronously (two staging buffers of 2 MiB each, so a batch
  never waits for the GPU) and are written to the file a chunk at a time. Exact; read back in
  chunks, so the host never needs the whole array in memory.
* ``"histogram"``: bounded memory, one pass, approximate with a reported bound. Per channel,
  counts of m[n, c] in buckets taken from the float32 bits: the 8 exponent bits plus the top
  ``histogram_mantissa_bits`` (b) mantissa bits, so a bucket spans a relative width of at most
  2^-b (12.5 % for b = 3). Zero has its own bucket; NaN / Inf samples go to a last bucket that
  no metric uses. At the end the samples in buckets entirely below ``t * corpus_max`` are
  counted exactly; only the one bucket straddling the threshold is uncertain. The result is
  the midpoint, ``value = (below + straddle / 2) / N``, with ``error_bound = straddle / (2 N)``:
  the true selectivity lies in [value - error_bound, value + error_bound], which is exactly the
  range the histogram allows. 255 * 2^b + 2 buckets per channel (2042 for b = 3).
* ``"none"``: no per-sample storage (corpus max, dead mask, APoZ only).
* two-pass, exact with bounded memory (any mode): ``set_reference_max(ref, thresholds)`` with
  the corpus max from a first pass; every later update counts exactly, per threshold, the
  samples with m / ref < t. ``selectivity(t)`` uses these counts when t is one of the
  thresholds (mode "two_pass"), and checks that ``ref`` really is the maximum of the samples
  counted, since otherwise the ratio is not the one the definition asks for.

Memory for an ImageNet-sized corpus, N = 1.28M samples, ResNet-50 (26,560 post-BN channels in
53 BN layers; the largest layer has C = 2048):

==============  ==========================  ==============  ==================================
mode            bytes                       C = 2048 layer  all of ResNet-50
==============  ==========================  ==============  ==================================
exact           N x C x 4 (device)          10.5 GB         136 GB
memmap          N x C x 4 (disk) + 4 MiB    10.5 GB disk    136 GB disk + 212 MiB pinned host
                pinned host per layer
histogram b=3   C x 2042 x 8                33 MB           434 MB   (b = 1: 109 MB, b = 0: 55 MB)
two-pass        C x (8 T + 8), T thresholds 33 KB (T = 1)   425 KB (T = 1)
none            about C x 29                59 KB           0.8 MB
==============  ==========================  ==============  ==================================

Every mode also keeps the ~29 bytes per channel of "none" (max, NaN / Inf / positive counts).

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
import tempfile
import weakref
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from sparsekern._backend import BACKENDS
from sparsekern.errors import NonFiniteActivationError, StateDictError
from sparsekern._layout import SUPPORTED_DTYPES, check_activation
from sparsekern.ops.channel_absmax import channel_absmax

MODES = ("exact", "memmap", "histogram", "none")
_MAX_MANTISSA_BITS = 10  # 2^10 buckets per octave is already ~2 MB per channel
_STAGING_BYTES = 2 << 20  # one pinned staging buffer of the memmap mode
_CHUNK_BYTES = 64 << 20  # float64 working set when re-reading stored maxima
_SHOWN_CHANNELS = 8  # how many channels an error message lists by index
_CHECKSUM_BLOCK = 1024  # batch checksums are stacked into one tensor per this many updates


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


def _num_buckets(bits: int) -> int:
    return (255 << bits) + 2


def _read_rows(path: str, num_channels: int, start: int, count: int) -> torch.Tensor:
    """Rows [start, start + count) of a raw float32 (rows, C) file, as a CPU tensor."""
    array = np.memmap(path, dtype=np.float32, mode="r", offset=start * num_channels * 4, shape=(count, num_channels))
    return torch.from_numpy(np.array(array))  # copy: the memmap closes when `array` goes away


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class _MemmapStore:
    """Per-sample maxima in a raw float32 (rows, C) file, written a chunk at a time.

    On CUDA, rows are copied into pinned staging buffers with non_blocking copies on the
    caller's stream; a full buffer is written to the file only when it is needed again, one
    chunk later, so waiting for its copies almost never stalls anything. On the CPU a single
    (ordinary) buffer is written as soon as it fills.
    """

    def __init__(self, path, num_channels: int, device: torch.device, existing_rows: int = 0):
        if path is None:
            fd, path = tempfile.mkstemp(prefix="sparsekern_maxima_", suffix=".f32")
            os.close(fd)
            weakref.finalize(self, _remove_file, path)  # a temporary file lives as long as its store
        self.path = os.fspath(path)
        self.num_channels = num_channels
        self.rows_on_disk = existing_rows
        if existing_rows == 0:
            open(self.path, "wb").close()  # start empty
        elif os.path.getsize(self.path) < existing_rows * num_channels * 4:
            raise ValueError(
                f"memmap file {self.path} holds {os.path.getsize(self.path)} bytes, fewer than the "
                f"{existing_rows} rows x {num_channels} channels x 4 bytes its state says"
            )
        self._cuda = device.type == "cuda"
        rows = max(1, _STAGING_BYTES // (4 * num_channels))
        self._buffers = [
            torch.empty(rows, num_channels, dtype=torch.float32, pin_memory=self._cuda)
            for _ in range(2 if self._cuda else 1)
        ]
        self._events = [None] * len(self._buffers)
        self._active = 0  # buffer being filled
        self._filled = 0  # rows in it
        self._queued: list[tuple[int, int]] = []  # (buffer, rows) full and waiting for the file

    @property
    def rows(self) -> int:
        return self.rows_on_disk + sum(rows for _, rows in self._queued) + self._filled

    def append(self, m: torch.Tensor) -> None:
        """Queue rows of m (N, C float32, on the stats device) without waiting for them."""
        start = 0
        while start < m.shape[0]:
            buffer = self._buffers[self._active]
            take = min(buffer.shape[0] - self._filled, m.shape[0] - start)
            buffer[self._filled:self._filled + take].copy_(m[start:start + take], non_blocking=self._cuda)
            self._filled += take
            start += take
            if self._cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(m.device))
                self._events[self._active] = event
            if self._filled == buffer.shape[0]:
                self._queued.append((self._active, self._filled))
                self._active = (self._active + 1) % len(self._buffers)
                self._filled = 0
                # The buffer about to be refilled must reach the file first.
                while self._queued and self._queued[0][0] == self._active:
                    self._write(*self._queued.pop(0))

    def append_host(self, rows: torch.Tensor) -> None:
        """Write CPU rows straight to the file (merging, loading, gathering)."""
        self.flush()
        self._write_array(rows.to(torch.float32).contiguous().numpy())

    def flush(self) -> None:
        """Write every staged row to the file (waits for their device copies)."""
        while self._queued:
            self._write(*self._queued.pop(0))
        if self._filled:
            self._write(self._active, self._filled)
            self._filled = 0

    def read_rows(self, start: int, count: int) -> torch.Tensor:
        self.flush()
        return _read_rows(self.path, self.num_channels, start, count)

    def chunks(self):
        """The stored rows, in CPU chunks of bounded size."""
        self.flush()
        step = max(1, _CHUNK_BYTES // (8 * self.num_channels))
        for start in range(0, self.rows_on_disk, step):
            yield _read_rows(self.path, self.num_channels, start, min(step, self.rows_on_disk - start))

    def _write(self, buffer: int, rows: int) -> None:
        if self._events[buffer] is not None:
            self._events[buffer].synchronize()
        self._write_array(self._buffers[buffer][:rows].numpy())

    def _write_array(self, array: np.ndarray) -> None:
        with open(self.path, "r+b") as f:
            f.seek(self.rows_on_disk * self.num_channels * 4)
            array.tofile(f)
            f.truncate()  # a resumed file may hold stale rows past this point
        self.rows_on_disk += array.shape[0]


def _checksum(m: torch.Tensor) -> torch.Tensor:
    """0-dim int64 checksum of a batch of maxima m (N, C float32): the sum of their bit patterns.

    Stays on the device (no host sync). Integer addition is associative, so the sum does not
    depend on the order in which a reduction kernel adds (a float sum on a GPU may differ
    bitwise between two runs); the maxima themselves are order-independent too (a max, even one
    merged with atomics), so the same activations always give the same checksum. Zero and NaN
    are mapped to one pattern each first: a max may return -0.0, or any NaN payload. At most
    N C 2^31 in magnitude: no overflow below 2^32 maxima per batch.
    """
    bits = torch.where(torch.isnan(m), -1, m.view(torch.int32))
    return torch.where(m == 0, 0, bits).sum(dtype=torch.int64)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _json_float(v: float):
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------- state dict checks
_HEADER_FIELDS = ("format", "mode", "histogram_mantissa_bits", "num_channels", "num_samples", "elements",
                  "apoz_samples")
_CHANNEL_FIELDS = {"max": torch.float32, "nan_samples": torch.int64, "inf_samples": torch.int64,
                   "positive": torch.int64, "negative": torch.bool}
_MODE_FIELDS = {"exact": ("maxima",), "memmap": ("memmap_path", "memmap_rows"), "histogram": ("histogram",), "none": ()}
_TWO_PASS_FIELDS = ("reference", "thresholds", "pass2_counts", "pass2_max", "pass2_samples")


def _state_count(sd: dict, key: str, where: str) -> int:
    value = sd[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateDictError(f"{where}: field {key!r} must be a non-negative int, got {value!r}")
    return value


def _state_tensor(sd: dict, key: str, dtype: torch.dtype, shape: tuple, where: str) -> torch.Tensor:
    value = sd[key]
    if isinstance(value, torch.Tensor) and value.dtype == dtype and tuple(value.shape) == shape:
        return value
    got = f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
    raise StateDictError(f"{where}: field {key!r} must be a {dtype} tensor of shape {shape}, got {got}")


def _require(ok: torch.Tensor, where: str, what: str, values: torch.Tensor, label: str = "channel") -> None:
    """Raise StateDictError saying ``what`` unless all of ``ok`` holds, naming the first place
    where it does not (its index, called ``label``) and the value of ``values`` there."""
    if bool(ok.all()):
        return
    index = tuple((~ok).nonzero()[0].tolist())
    at = index[0] if len(index) == 1 else index
    raise StateDictError(f"{where}: {what}; not so at {label} {at} (value {values[index].item()!r}), "
                         f"{int((~ok).sum())} place(s) in all")


def _check_channel_fields(f: dict, n: int, elements: int, where: str) -> None:
    """The per-channel accumulators against each other and the sample counts."""
    mx, nan, inf = f["max"], f["nan_samples"], f["inf_samples"]
    _require(~torch.isnan(mx), where, "field 'max' must not be NaN (NaN samples never enter the corpus max; "
             "'nan_samples' counts them)", mx)
    _require(mx >= 0, where, "field 'max' must be >= 0", mx)
    for key in ("nan_samples", "inf_samples", "positive"):
        _require(f[key] >= 0, where, f"field {key!r} must be >= 0", f[key])
    _require(nan + inf <= n, where, f"'nan_samples' + 'inf_samples' must be <= num_samples ({n})", nan + inf)
    _require(~torch.isinf(mx) | (inf > 0), where, "field 'max' is +Inf, so 'inf_samples' must be > 0", inf)
    # A -Inf from update_reduced counts as Inf without raising the max; it also sets 'negative'.
    _require((inf == 0) | torch.isinf(mx) | f["negative"], where,
             "field 'inf_samples' is > 0, so 'max' must be +Inf", mx)
    _require(f["positive"] <= elements, where, f"field 'positive' must be <= elements ({elements})", f["positive"])
    if n == 0:
        _require(mx == 0, where, "field 'max' must be 0 while num_samples is 0", mx)


def _check_maxima(maxima: torch.Tensor, f: dict, where: str) -> None:
    """The "exact" mode: the stored per-sample maxima must give the per-channel accumulators."""
    _require(torch.isnan(maxima).sum(dim=0) == f["nan_samples"], where,
             "field 'nan_samples' must count the NaN samples in 'maxima'", f["nan_samples"])
    _require(torch.isinf(maxima).sum(dim=0) == f["inf_samples"], where,
             "field 'inf_samples' must count the Inf samples in 'maxima'", f["inf_samples"])
    _require((maxima < 0).any(dim=0) == f["negative"], where,
             "field 'negative' must flag the channels with negative 'maxima'", f["negative"])
    if maxima.shape[0]:
        column_max = torch.where(torch.isnan(maxima), 0.0, maxima).amax(dim=0).clamp(min=0)
        _require(column_max == f["max"], where, "field 'max' must be the max over samples of 'maxima' "
                 "(NaN samples ignored)", f["max"])


def _check_memmap(sd: dict, c: int, n: int, where: str) -> None:
    path = sd["memmap_path"]
    if not isinstance(path, str):
        raise StateDictError(f"{where}: field 'memmap_path' must be a str, got {type(path).__name__}")
    rows = _state_count(sd, "memmap_rows", where)
    if rows != n:
        raise StateDictError(f"{where}: field 'memmap_rows' ({rows}) must equal num_samples ({n})")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: the state's memmap file {path} does not exist")
    if os.path.getsize(path) < rows * c * 4:
        raise StateDictError(f"{where}: memmap file {path} holds {os.path.getsize(path)} bytes, fewer than the "
                             f"{rows} rows x {c} channels x 4 bytes of 'memmap_rows'")


def _check_histogram(hist: torch.Tensor, f: dict, n: int, bits: int, where: str) -> None:
    """The "histogram" mode: bucket counts against the sample count, the NaN / Inf counts, the max."""
    _require(hist >= 0, where, "field 'histogram' must be >= 0", hist, "(channel, bucket)")
    _require(hist.sum(dim=1) == n, where, f"every row of 'histogram' must sum to num_samples ({n})", hist.sum(dim=1))
    nonfinite = f["nan_samples"] + f["inf_samples"]
    _require(hist[:, -1] == nonfinite, where, "the last bucket of 'histogram' (NaN / Inf samples) must hold "
             "'nan_samples' + 'inf_samples'", hist[:, -1])
    # A finite corpus max lies in the highest occupied finite bucket (the bucket rule of
    # _histogram_add); without a finite sample it is 0. An infinite max bounds nothing.
    mx = f["max"]
    occupied = hist[:, :-1] > 0
    highest = torch.where(occupied, torch.arange(occupied.shape[1], device=hist.device), -1).amax(dim=1)
    key = torch.where(mx > 0, (mx.view(torch.int32) >> (23 - bits)) + 1, 0)
    any_finite = occupied.any(dim=1)
    ok = torch.isinf(mx) | (any_finite & (highest == key)) | (~any_finite & (mx == 0))
    _require(ok, where, "field 'max' must lie in the highest occupied finite bucket of 'histogram'", mx)


def _check_two_pass(sd: dict, f: dict, c: int, n: int, where: str) -> None:
    """set_reference_max: the reference, its thresholds, and the counts made against it."""
    ref = _state_tensor(sd, "reference", torch.float32, (c,), where)
    _require(torch.isfinite(ref) & (ref >= 0), where, "field 'reference' must be finite and >= 0", ref)
    thresholds = sd["thresholds"]
    if (not isinstance(thresholds, (tuple, list)) or not thresholds or len(set(thresholds)) != len(thresholds)
            or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0)
                   for t in thresholds)):
        raise StateDictError(f"{where}: field 'thresholds' must be distinct positive finite numbers, "
                             f"got {thresholds!r}")
    samples = _state_count(sd, "pass2_samples", where)
    if samples > n:
        raise StateDictError(f"{where}: field 'pass2_samples' ({samples}) must be <= num_samples ({n})")
    counts = _state_tensor(sd, "pass2_counts", torch.int64, (c, len(thresholds)), where)
    _require((counts >= 0) & (counts <= samples), where,
             f"field 'pass2_counts' must lie in [0, pass2_samples] = [0, {samples}]", counts, "(channel, threshold)")
    # m / ref < t holds for every larger t too: counts grow with the threshold.
    order = sorted(range(len(thresholds)), key=lambda i: thresholds[i])
    grows = torch.ones_like(counts, dtype=torch.bool)
    grows[:, order[1:]] = counts[:, order[1:]] >= counts[:, order[:-1]]
    _require(grows, where, "field 'pass2_counts' must not decrease as the threshold grows", counts,
             "(channel, threshold)")
    pass2_max = _state_tensor(sd, "pass2_max", torch.float32, (c,), where)
    _require(pass2_max >= 0, where, "field 'pass2_max' must be >= 0 and not NaN", pass2_max)
    # The samples counted since set_reference_max are among all the samples.
    _require(pass2_max <= f["max"], where, "field 'pass2_max' must be <= 'max'", pass2_max)
    if samples == 0:
        _require(pass2_max == 0, where, "field 'pass2_max' must be 0 while pass2_samples is 0", pass2_max)


class ChannelStats:
    """Streaming per-channel statistics of one layer's activations over a corpus.

    ``num_channels`` and ``device`` are taken from the first update when not given.
    ``selectivity``: "exact" | "memmap" | "histogram" | "none" (see the module docstring for
    what each keeps and costs); ``memmap_path`` names the file of the "memmap" mode, which this
    object then owns and rewrites from its first update (a temporary file, removed with the
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
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= _MAX_MANTISSA_BITS:
            raise ValueError(
                f"ChannelStats: histogram_mantissa_bits must be an int in [0, {_MAX_MANTISSA_BITS}], got {bits!r}"
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
        self._clear()

    # ------------------------------------------------------------------ state
    def _clear(self) -> None:
        self._num_channels = self._given_channels
        self._device = self._given_device
        self.num_samples = 0  # python int: known from shapes, never read back from the device
        self._elements = 0  # positions counted for APoZ (sum over samples of positions per sample)
        self._apoz_samples = 0  # samples that came with positive counts
        self._max = None  # (C,) float32: the corpus max; None until the state exists
        self._nan_samples = self._inf_samples = self._positive = self._negative = None
        self._histogram = None
        self._maxima: list[torch.Tensor] = []  # "exact": (N_i, C) float32 blocks
        self._store: _MemmapStore | None = None
        self._reference = None  # two-pass: (C,) float32 corpus max of a first pass
        self._thresholds: tuple[float, ...] = ()
        self._thresholds_tensor = None
        self._pass2_counts = self._pass2_max = None
        self._pass2_samples = 0
        self._checksum_blocks: list[torch.Tensor] = []  # stacked checksums, _CHECKSUM_BLOCK each
        self._recent_checksums: list[torch.Tensor] = []  # 0-dim checksums not stacked yet

    def _ensure_state(self, num_channels: int, device: torch.device, memmap_rows: int = 0) -> None:
        """Allocate the accumulators the first time the channel count and device are known."""
        if self._max is not None:
            return
        self._num_channels = num_channels
        self._device = device
        zeros = lambda dtype: torch.zeros(num_channels, dtype=dtype, device=device)  # noqa: E731
        self._max = zeros(torch.float32)
        self._nan_samples = zeros(torch.int64)
        self._inf_samples = zeros(torch.int64)
        self._positive = zeros(torch.int64)
        self._negative = zeros(torch.bool)  # update_reduced got m < 0: checked when a metric is asked
        if self.mode == "histogram":
            buckets = _num_buckets(self.histogram_mantissa_bits)
            self._histogram = torch.zeros(num_channels, buckets, dtype=torch.int64, device=device)
            self._bucket_offsets = torch.arange(num_channels, device=device) * buckets
        if self.mode == "memmap":
            self._store = _MemmapStore(self.memmap_path, num_channels, device, memmap_rows)

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

    @property
    def num_channels(self) -> int | None:
        """Channel count (None until given or seen)."""
        return self._num_channels

    @property
    def device(self) -> torch.device | None:
        return self._device

    def _accumulator(self, name: str, dtype: torch.dtype, what: str) -> torch.Tensor:
        """An accumulator, or its initial zeros before any data (without fixing the device yet)."""
        if self._max is not None:
            return getattr(self, name)
        if self._num_channels is None:
            raise ValueError(f"ChannelStats.{what}: no data yet and num_channels unknown")
        return torch.zeros(self._num_channels, dtype=dtype, device=self._device or torch.device("cpu"))

    # ------------------------------------------------------------------ updates
    def update(self, x: torch.Tensor) -> None:
        """Accumulate one batch of activations x (N, C, ...): one channel_absmax pass with counts."""
        where = "ChannelStats.update"
        check_activation(x, where)
        n, c = x.shape[0], x.shape[1]
        self._check_compatible(c, x.device, where)
        if n == 0:
            return
        m, positive = channel_absmax(x, count_positive=True, backend=self.backend)
        self._accumulate(m, positive, math.prod(x.shape[2:]))

    def update_reduced(
        self, m: torch.Tensor, positive: torch.Tensor | None = None, elements_per_sample: int | None = None
    ) -> None:
        """Accumulate per-sample maxima m (N, C) that a kernel already reduced (m >= 0).

        ``positive`` (N, C integer counts of elements > 0) and ``elements_per_sample`` (positions
        per sample and channel) feed APoZ; without them APoZ is unavailable for these samples.
        """
        where = "ChannelStats.update_reduced"
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{where}: expected a torch.Tensor of maxima, got {type(m).__name__}")
        if m.dim() != 2:
            raise ValueError(f"{where}: expected maxima of shape (N, C), got shape {tuple(m.shape)}")
        if m.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where}: maxima must be float32, float16 or bfloat16, got {m.dtype}")
        if (positive is None) != (elements_per_sample is None):
            raise ValueError(f"{where}: give both `positive` and `elements_per_sample` (for APoZ), or neither")
        if positive is not None:
            if not isinstance(positive, torch.Tensor):
                raise TypeError(f"{where}: positive must be a tensor, got {type(positive).__name__}")
            if positive.shape != m.shape:
                raise ValueError(f"{where}: positive has shape {tuple(positive.shape)}, maxima {tuple(m.shape)}")
            if positive.dtype.is_floating_point or positive.dtype.is_complex or positive.dtype == torch.bool:
                raise TypeError(f"{where}: positive must hold integer counts, got {positive.dtype}")
            if positive.device != m.device:
                raise ValueError(f"{where}: positive is on {positive.device}, maxima on {m.device}")
            eps = elements_per_sample
            if isinstance(eps, bool) or not isinstance(eps, int) or eps < 0:
                raise ValueError(f"{where}: elements_per_sample must be a non-negative int, got {eps!r}")
        n, c = m.shape
        self._check_compatible(c, m.device, where)
        if n == 0:
            return
        # "exact" keeps the tensor, so it must not share memory with the caller's buffer.
        m = m.to(torch.float32, copy=self.mode == "exact")
        self._ensure_state(c, m.device)
        self._negative |= (m < 0).any(dim=0)
        self._accumulate(m, None if positive is None else positive.to(torch.int64), elements_per_sample)

    def _accumulate(self, m: torch.Tensor, positive: torch.Tensor | None, elements_per_sample: int | None) -> None:
        """Fold (N, C) float32 maxima into every accumulator. Device ops only: no host sync."""
        n, c = m.shape
        self._ensure_state(c, m.device)
        nan = torch.isnan(m)
        self._nan_samples += nan.sum(dim=0)
        self._inf_samples += torch.isinf(m).sum(dim=0)
        finite_or_inf = torch.where(nan, 0.0, m)  # NaN samples do not enter the corpus max
        torch.maximum(self._max, finite_or_inf.amax(dim=0), out=self._max)
        if positive is not None:
            self._positive += positive.sum(dim=0)
            self._elements += n * elements_per_sample
            self._apoz_samples += n
        if self.mode == "exact":
            self._maxima.append(m)
        elif self.mode == "memmap":
            self._store.append(m)
        elif self.mode == "histogram":
            self._histogram_add(m)
        if self._reference is not None:
            ratio = m.to(torch.float64) / self._reference.to(torch.float64)
            self._pass2_counts += (ratio.unsqueeze(-1) < self._thresholds_tensor).sum(dim=0)
            torch.maximum(self._pass2_max, finite_or_inf.amax(dim=0), out=self._pass2_max)
            self._pass2_samples += n
        if self.checksums:
            self._record_checksum(m)
        self.num_samples += n

    def _record_checksum(self, m: torch.Tensor) -> None:
        self._recent_checksums.append(_checksum(m))
        # Stacked now and then, so a long pass holds a few tensors rather than one per batch.
        if len(self._recent_checksums) == _CHECKSUM_BLOCK:
            self._checksum_blocks.append(torch.stack(self._recent_checksums))
            self._recent_checksums = []

    def batch_checksums(self) -> torch.Tensor:
        """(updates,) int64, on the stats device: one checksum of the maxima of every non-empty
        update since construction or ``reset()``, in order (needs ``checksums=True``).

        Equal checksums mean, up to a hash collision, that the same per-sample maxima were fed.
        They describe what this object was fed: merge, all_reduce and state_dict leave them out.
        """
        if not self.checksums:
            raise ValueError("ChannelStats.batch_checksums: construct with checksums=True to record them")
        blocks = self._checksum_blocks + ([torch.stack(self._recent_checksums)] if self._recent_checksums else [])
        if not blocks:
            return torch.zeros(0, dtype=torch.int64, device=self._device or torch.device("cpu"))
        return torch.cat(blocks)

    def _histogram_add(self, m: torch.Tensor) -> None:
        # For non-negative floats the int32 bit pattern orders like the value, so shifting off
        # the low mantissa bits gives log-spaced buckets without any log().
        key = (m.view(torch.int32) >> (23 - self.histogram_mantissa_bits)) + 1
        finite = torch.isfinite(m)
        bucket = torch.where(finite & (m > 0), key, 0)
        bucket = torch.where(finite, bucket, self._histogram.shape[1] - 1)
        flat = (bucket.to(torch.int64) + self._bucket_offsets).reshape(-1)
        self._histogram.view(-1).scatter_add_(0, flat, torch.ones_like(flat))

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
        self._reference = ref.clone()
        self._thresholds = thresholds
        self._thresholds_tensor = torch.tensor(thresholds, dtype=torch.float64, device=self._device)
        self._pass2_counts = torch.zeros(ref.shape[0], len(thresholds), dtype=torch.int64, device=self._device)
        self._pass2_max = torch.zeros_like(ref)
        self._pass2_samples = 0

    # ------------------------------------------------------------------ metrics
    @property
    def corpus_max(self) -> torch.Tensor:
        """(C,) float32 max over samples of m[n, c], NaN samples ignored; 0 before any finite sample."""
        return self._accumulator("_max", torch.float32, "corpus_max").clone()

    def nan_mask(self) -> torch.Tensor:
        """(C,) bool: channels that saw a NaN in any sample."""
        return self._accumulator("_nan_samples", torch.int64, "nan_mask") > 0

    def nonfinite_mask(self) -> torch.Tensor:
        """(C,) bool: channels that saw a NaN or an Inf in any sample."""
        nan = self._accumulator("_nan_samples", torch.int64, "nonfinite_mask")
        return (nan > 0) | (self._accumulator("_inf_samples", torch.int64, "nonfinite_mask") > 0)

    def _require_samples(self, what: str) -> None:
        if self.num_samples == 0:
            raise ValueError(f"ChannelStats.{what}: no samples seen yet; call update() first")
        if bool(self._negative.any()):
            bad = self._negative.nonzero().flatten().tolist()
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
        nans = self._nan_samples[mask].tolist()
        infs = self._inf_samples[mask].tolist()
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
        return (self._max.to(torch.float64) < float(threshold)) & ~nan

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
        if self._reference is not None and t in self._thresholds:
            corpus_max = self._reference
            value, error, mode = self._two_pass_selectivity(t, bad), None, "two_pass"
        elif self.mode in ("exact", "memmap"):
            corpus_max = self._max
            chunks = self._store.chunks() if self.mode == "memmap" else self._exact_chunks()
            value, error, mode = self._count_below(chunks, t).to(torch.float64) / self.num_samples, None, self.mode
        elif self.mode == "histogram":
            corpus_max = self._max
            (value, error), mode = self._histogram_selectivity(t), "histogram"
        else:
            hint = f" (its reference was set for thresholds {self._thresholds})" if self._reference is not None else ""
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

    def _exact_chunks(self):
        if len(self._maxima) > 1:
            self._maxima = [torch.cat(self._maxima)]  # once per query, not per batch
        step = max(1, _CHUNK_BYTES // (8 * self._num_channels))
        return self._maxima[0].split(step) if self._maxima else ()

    def _count_below(self, chunks, t: float) -> torch.Tensor:
        """(C,) int64: samples with m / corpus_max < t, over stored blocks of maxima."""
        count = torch.zeros(self._num_channels, dtype=torch.int64, device=self._device)
        for block in chunks:
            corpus_max = self._max.to(device=block.device, dtype=torch.float64)
            below = (block.to(torch.float64) / corpus_max) < t
            count += below.sum(dim=0).to(self._device)
        return count

    def _two_pass_selectivity(self, t: float, bad: torch.Tensor) -> torch.Tensor:
        if self._pass2_samples == 0:
            raise ValueError(
                "ChannelStats.selectivity: set_reference_max() was called but no samples were counted after it"
            )
        # The counts are the definition's only if ref is the max of the very samples counted.
        mismatch = (self._pass2_max != self._reference) & ~bad
        if bool(mismatch.any()):
            channels = mismatch.nonzero().flatten().tolist()
            c = channels[0]
            raise ValueError(
                f"ChannelStats.selectivity: the reference max differs from the max of the samples counted since "
                f"set_reference_max() in {len(channels)} channels (channel {c}: reference "
                f"{self._reference[c].item()!r}, counted samples' max {self._pass2_max[c].item()!r}); pass the "
                "corpus max of a first pass over the same data (no random augmentation)"
            )
        column = self._thresholds.index(t)
        return self._pass2_counts[:, column].to(torch.float64) / self._pass2_samples

    def _histogram_selectivity(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        smallest, largest = (b.to(self._device) for b in _bucket_bounds(self.histogram_mantissa_bits))
        corpus_max = self._max.to(torch.float64).unsqueeze(1)
        # Ratios are monotone in m, so a bucket is entirely below the threshold iff its largest
        # value is, and entirely at/above iff its smallest is; at most one bucket straddles.
        all_below = (largest / corpus_max) < t
        some_below = (smallest / corpus_max) < t
        below = (self._histogram * all_below).sum(dim=1).to(torch.float64)
        straddle = (self._histogram * (some_below & ~all_below)).sum(dim=1).to(torch.float64)
        n = self.num_samples
        return (below + straddle / 2) / n, straddle / (2 * n)

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
        value = 1.0 - self._positive.to(torch.float64) / self._elements
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
        if other._max is None:
            if other._num_channels is not None and self._num_channels is not None:
                self._check_compatible(other._num_channels, self._device or torch.device("cpu"), where)
            return self
        self._check_compatible(other._num_channels, self._device or other._device, where)
        same_reference = (self._reference is None) == (other._reference is None) and (
            self._reference is None
            or (self._thresholds == other._thresholds
                and torch.equal(self._reference, other._reference.to(self._reference.device)))
        )
        if not same_reference:
            raise ValueError(f"{where}: both shards need the same set_reference_max() reference and thresholds, or none")
        if self.mode == "memmap":
            own_path = self._store.path if self._store is not None else self.memmap_path
            if own_path is not None and os.path.exists(own_path) and os.path.samefile(own_path, other._store.path):
                raise ValueError(f"{where}: both stats write the memmap file {own_path}; give each shard its own file")
        self._ensure_state(other._num_channels, self._device or other._device)
        to_here = lambda t: t.to(self._device)  # noqa: E731
        torch.maximum(self._max, to_here(other._max), out=self._max)
        self._nan_samples += to_here(other._nan_samples)
        self._inf_samples += to_here(other._inf_samples)
        self._positive += to_here(other._positive)
        self._negative |= to_here(other._negative)
        if self.mode == "exact":
            self._maxima.extend(to_here(block) for block in other._maxima)
        elif self.mode == "memmap":
            for block in other._store.chunks():
                self._store.append_host(block)
        elif self.mode == "histogram":
            self._histogram += to_here(other._histogram)
        if self._reference is not None:
            self._pass2_counts += to_here(other._pass2_counts)
            torch.maximum(self._pass2_max, to_here(other._pass2_max), out=self._pass2_max)
            self._pass2_samples += other._pass2_samples
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
        import torch.distributed as dist

        where = "ChannelStats.all_reduce"
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{where}: torch.distributed is not initialised (call init_process_group first)")
        if self._num_channels is None:
            raise ValueError(f"{where}: this rank saw no data and num_channels was not given to the constructor")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        comm = self._device
        if dist.get_backend(group) == "nccl" and (comm is None or comm.type != "cuda"):
            comm = torch.device("cuda", torch.cuda.current_device())
        self._ensure_state(self._num_channels, self._device or comm)

        # One gather of every rank's configuration and python counters: checks that the ranks
        # agree, and gives the totals and the per-rank sample counts for the gathers below.
        header = torch.tensor(
            [self._num_channels, MODES.index(self.mode), self.histogram_mantissa_bits,
             len(self._thresholds), self.num_samples, self._elements, self._apoz_samples, self._pass2_samples],
            dtype=torch.int64, device=comm,
        )
        headers = [torch.empty_like(header) for _ in range(world)]
        dist.all_gather(headers, header, group=group)
        headers = torch.stack(headers).cpu()
        if not bool((headers[:, :4] == headers[0, :4]).all()):
            raise ValueError(
                f"{where}: ranks disagree on (channels, mode, mantissa bits, two-pass thresholds): "
                f"{headers[:, :4].tolist()}"
            )
        if self._reference is not None:
            reference = self._reference.to(comm)
            low, high = reference.clone(), reference.clone()
            thresholds = torch.tensor(self._thresholds, dtype=torch.float64, device=comm)
            low_t, high_t = thresholds.clone(), thresholds.clone()
            for tensor, op in ((low, dist.ReduceOp.MIN), (high, dist.ReduceOp.MAX),
                               (low_t, dist.ReduceOp.MIN), (high_t, dist.ReduceOp.MAX)):
                dist.all_reduce(tensor, op=op, group=group)
            if not (torch.equal(low, high) and torch.equal(low_t, high_t)):
                raise ValueError(f"{where}: ranks hold different set_reference_max() references or thresholds")

        def reduce_(tensor: torch.Tensor, op) -> None:
            moved = tensor.to(comm)
            dist.all_reduce(moved, op=op, group=group)
            tensor.copy_(moved)

        reduce_(self._max, dist.ReduceOp.MAX)
        for tensor in (self._nan_samples, self._inf_samples, self._positive):
            reduce_(tensor, dist.ReduceOp.SUM)
        negative = self._negative.to(torch.int32)
        reduce_(negative, dist.ReduceOp.MAX)
        self._negative = negative.bool()
        if self.mode == "histogram":
            reduce_(self._histogram, dist.ReduceOp.SUM)
        if self._reference is not None:
            reduce_(self._pass2_counts, dist.ReduceOp.SUM)
            reduce_(self._pass2_max, dist.ReduceOp.MAX)

        rows = headers[:, 4].tolist()
        if self.mode == "exact" and max(rows) > 0:
            local = torch.cat(self._maxima) if self._maxima else torch.empty(0, self._num_channels, device=self._device)
            padded = torch.zeros(max(rows), self._num_channels, dtype=torch.float32, device=comm)
            padded[: local.shape[0]] = local.to(comm)
            gathered = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(gathered, padded, group=group)
            self._maxima = [block[:n].to(self._device) for block, n in zip(gathered, rows) if n]
        elif self.mode == "memmap":
            step = max(1, _STAGING_BYTES // (4 * self._num_channels))
            for src in range(world):
                global_src = src if group is None else dist.get_global_rank(group, src)
                for start in range(0, rows[src], step):
                    count = min(step, rows[src] - start)
                    if src == rank:
                        block = self._store.read_rows(start, count).to(comm)
                    else:
                        block = torch.empty(count, self._num_channels, dtype=torch.float32, device=comm)
                    dist.broadcast(block, src=global_src, group=group)
                    if src != rank:
                        self._store.append_host(block.cpu())

        totals = headers.sum(dim=0).tolist()
        self.num_samples, self._elements, self._apoz_samples, self._pass2_samples = totals[4:8]

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
        if self._max is None:
            return sd
        for key in ("max", "nan_samples", "inf_samples", "positive", "negative"):
            sd[key] = getattr(self, "_" + key).clone()
        if self.mode == "exact":
            sd["maxima"] = (
                torch.cat(self._maxima) if self._maxima
                else torch.empty(0, self._num_channels, dtype=torch.float32, device=self._device)
            )
        elif self.mode == "memmap":
            self._store.flush()
            sd["memmap_path"] = os.path.abspath(self._store.path)
            sd["memmap_rows"] = self._store.rows_on_disk
        elif self.mode == "histogram":
            sd["histogram"] = self._histogram.clone()
        if self._reference is not None:
            sd["reference"] = self._reference.clone()
            sd["thresholds"] = self._thresholds
            sd["pass2_counts"] = self._pass2_counts.clone()
            sd["pass2_max"] = self._pass2_max.clone()
            sd["pass2_samples"] = self._pass2_samples
        return sd

    def check_state_dict(self, sd: dict) -> None:
        """Raise StateDictError unless ``sd`` is a consistent state these stats can load.

        Checks that every field is present with its type, dtype and shape, and the invariants
        the updates keep (module docstring). A "memmap" state whose file is gone raises
        FileNotFoundError; the file's rows are not read (that would be a pass over the corpus).
        """
        where = "ChannelStats.load_state_dict"
        if not isinstance(sd, dict) or sd.get("format") != 1:
            raise StateDictError(f"{where}: not a ChannelStats state dict (format 1)")
        missing = [key for key in _HEADER_FIELDS if key not in sd]
        if missing:
            raise StateDictError(f"{where}: missing field(s) {missing}")
        if sd["mode"] != self.mode or sd["histogram_mantissa_bits"] != self.histogram_mantissa_bits:
            raise StateDictError(
                f"{where}: state is for selectivity={sd['mode']!r} with {sd['histogram_mantissa_bits']} mantissa bits, "
                f"these stats use {self.mode!r} with {self.histogram_mantissa_bits}"
            )
        n, elements, apoz_samples = (_state_count(sd, k, where) for k in ("num_samples", "elements", "apoz_samples"))
        c = sd["num_channels"]
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise StateDictError(f"{where}: field 'num_channels' must be a positive int or None, got {c!r}")
        if self._given_channels is not None and c is not None and c != self._given_channels:
            raise StateDictError(f"{where}: state has {c} channels, these stats were built for {self._given_channels}")
        if apoz_samples > n:
            raise StateDictError(f"{where}: field 'apoz_samples' ({apoz_samples}) must be <= num_samples ({n})")
        if apoz_samples == 0 and elements != 0:
            raise StateDictError(f"{where}: field 'elements' is {elements} but apoz_samples is 0 (no positions "
                                 "counted)")
        expected = set(_HEADER_FIELDS)
        if "max" in sd:
            expected |= set(_CHANNEL_FIELDS) | set(_MODE_FIELDS[self.mode])
            expected |= set(_TWO_PASS_FIELDS) if "reference" in sd else set()
        unknown, absent = sorted(set(sd) - expected), sorted(expected - set(sd))
        if unknown:
            hint = " (two-pass fields come with 'reference')" if set(unknown) & set(_TWO_PASS_FIELDS) else ""
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
        fields = {key: _state_tensor(sd, key, dtype, (c,), where) for key, dtype in _CHANNEL_FIELDS.items()}
        _check_channel_fields(fields, n, elements, where)
        if self.mode == "exact":
            _check_maxima(_state_tensor(sd, "maxima", torch.float32, (n, c), where), fields, where)
        elif self.mode == "memmap":
            _check_memmap(sd, c, n, where)
        elif self.mode == "histogram":
            hist = _state_tensor(sd, "histogram", torch.int64, (c, _num_buckets(self.histogram_mantissa_bits)), where)
            _check_histogram(hist, fields, n, self.histogram_mantissa_bits, where)
        if "reference" in sd:
            _check_two_pass(sd, fields, c, n, where)

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
        resume_in_place = self.mode == "memmap" and self.memmap_path is not None and os.path.exists(self.memmap_path) \
            and os.path.samefile(self.memmap_path, sd["memmap_path"])
        self._ensure_state(c, device, memmap_rows=sd["memmap_rows"] if resume_in_place else 0)
        for key in ("max", "nan_samples", "inf_samples", "positive", "negative"):
            getattr(self, "_" + key).copy_(sd[key])
        if self.mode == "exact" and sd["maxima"].shape[0]:
            self._maxima = [sd["maxima"].to(device=device, dtype=torch.float32, copy=True)]
        elif self.mode == "memmap" and not resume_in_place:
            step = max(1, _CHUNK_BYTES // (8 * c))
            for start in range(0, sd["memmap_rows"], step):
                self._store.append_host(_read_rows(sd["memmap_path"], c, start, min(step, sd["memmap_rows"] - start)))
        elif self.mode == "histogram":
            self._histogram.copy_(sd["histogram"])
        if "reference" in sd:
            self.set_reference_max(sd["reference"], sd["thresholds"])
            self._pass2_counts.copy_(sd["pass2_counts"])
            self._pass2_max.copy_(sd["pass2_max"])
            self._pass2_samples = sd["pass2_samples"]
        self.num_samples, self._elements, self._apoz_samples = sd["num_samples"], sd["elements"], sd["apoz_samples"]

    def reset(self) -> None:
        """Forget every sample and the two-pass reference (back to the constructor's state)."""
        self._clear()

    # ------------------------------------------------------------------ report
    def summary(
        self, dead_thresholds=(1e-12, 1e-4), selectivity_threshold: float = 1e-3, per_channel: bool = True
    ) -> dict:
        """JSON-able numbers: fraction of dead channels at each threshold, selectivity, APoZ.

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
        channels = {"corpus_max": [_json_float(v) for v in self._max.tolist()]}
        for t in dead_thresholds:
            dead = self.dead_mask(t, on_nan="exclude")
            key = f"{t:g}"
            out["dead_count"][key] = int(dead.sum())
            out["dead_fraction"][key] = int(dead.sum()) / c
            channels[f"dead@{key}"] = dead.tolist()
        two_pass = self._reference is not None and float(selectivity_threshold) in self._thresholds
        sel = self.selectivity(selectivity_threshold, on_nan="exclude") if two_pass or self.mode != "none" else None
        if sel is None:
            out["selectivity"] = None
        else:
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
        apoz = self.apoz(on_nan="exclude") if self._apoz_samples == self.num_samples and self._elements else None
        out["apoz_mean"] = None if apoz is None or bool(torch.isnan(apoz).all()) else apoz.nanmean().item()
        if apoz is not None:
            channels["apoz"] = [_json_float(v) for v in apoz.tolist()]
        if per_channel:
            out["channels"] = channels
        return out
