"""ChannelStats against float64 references written here from SCIENCE.md section 1.

m[n, c] = max |a[n, c, ...]|; corpus max ignores NaN samples; dead: corpus_max < t;
selectivity: fraction of n with m / corpus_max < t (1.0 when the corpus max is 0);
APoZ: 1 - (#elements > 0) / #elements. Every comparison in float64.
"""
import gc
import json
import math
import os
import zlib

import numpy as np
import pytest
import torch

import sparsekern
from sparsekern import _backend
from sparsekern.stats import checksums as checksums_module
from sparsekern.stats.stores import base as store_base
from sparsekern.stats.stores import memmap as memmap_module
from sparsekern.stats.channel_stats import ChannelStats, NonFiniteActivationError

BACKENDS = [
    "torch",
    pytest.param(
        "cpp",
        marks=pytest.mark.skipif(
            not _backend.backend_supports("cpp", torch.device("cpu"))[0], reason="sparsekern._C not built"
        ),
    ),
]
EXACT_MODES = ["exact", "memmap"]


# ---------------------------------------------------------------- float64 reference
def ref_maxima(x: torch.Tensor) -> torch.Tensor:
    """(N, C) float64 max |x| over positions, NaN where the (n, c) saw a NaN."""
    flat = x.double().reshape(x.shape[0], x.shape[1], -1)
    m = flat.abs().amax(dim=2)
    return torch.where(torch.isnan(flat).any(dim=2), float("nan"), m)


def ref_corpus_max(m: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(m), 0.0, m).amax(dim=0)  # m >= 0, so 0 is a neutral fill


def ref_selectivity(m: torch.Tensor, t: float) -> torch.Tensor:
    corpus_max = ref_corpus_max(m)
    fraction = ((m / corpus_max) < t).double().mean(dim=0)
    return torch.where(corpus_max == 0, 1.0, fraction)


def ref_apoz(x: torch.Tensor) -> torch.Tensor:
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return 1.0 - (flat > 0).sum(dim=1).double() / flat.shape[1]


def make_activations(n=37, c=9, h=5, w=3, seed=0) -> torch.Tensor:
    """Post-ReLU-like activations with the channels the metrics must tell apart."""
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, c, h, w, generator=g))
    x[:, 0] = 0  # dead
    x[:, 1] = 0
    x[n // 2, 1, 2, 1] = 5.0  # selective: fires on one sample
    x[:, 2] *= 1e-13  # "active" but below the 1e-12 dead threshold
    x[:, 3] *= 1e-8  # dead at 1e-4, alive at 1e-12
    x[: n // 3, 4] *= 1e-5  # a third of the samples far below 1e-3 of the max
    x[:, 5] = torch.randn(n, h, w, generator=g)  # negative values: |x| counts, APoZ counts > 0 only
    return x


def feed(stats: ChannelStats, x: torch.Tensor, sizes) -> ChannelStats:
    start = 0
    for size in sizes:
        stats.update(x[start:start + size])
        start += size
    assert start == x.shape[0]
    return stats


def assert_matches_reference(stats: ChannelStats, x: torch.Tensor, thresholds=(1e-3, 0.05, 0.5)):
    m = ref_maxima(x)
    assert stats.num_samples == x.shape[0]
    assert stats.num_channels == x.shape[1]
    torch.testing.assert_close(stats.corpus_max, ref_corpus_max(m).float(), rtol=0, atol=0)
    for t in (1e-12, 1e-4):
        assert torch.equal(stats.dead_mask(t), ref_corpus_max(m) < t)
    torch.testing.assert_close(stats.apoz(), ref_apoz(x), rtol=0, atol=1e-15)
    for t in thresholds:
        result = stats.selectivity(t)
        truth = ref_selectivity(m, t)
        if result.mode == "histogram":
            assert torch.all(result.value - result.error_bound <= truth + 1e-12)
            assert torch.all(truth <= result.value + result.error_bound + 1e-12)
        else:
            assert result.exact and torch.equal(result.error_bound, torch.zeros_like(truth))
            torch.testing.assert_close(result.value, truth, rtol=0, atol=0)
            torch.testing.assert_close(result.universality, 1 - truth, rtol=0, atol=0)


def make_stats(mode: str, tmp_path, backend="torch", name="maxima.f32", **kwargs) -> ChannelStats:
    path = tmp_path / name if mode == "memmap" else None
    return ChannelStats(selectivity=mode, memmap_path=path, backend=backend, **kwargs)


# ---------------------------------------------------------------- definitions
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["exact", "memmap", "histogram", "none"])
def test_matches_float64_reference(mode, backend, tmp_path):
    x = make_activations()
    stats = feed(make_stats(mode, tmp_path, backend), x, [10, 1, 19, 7])
    if mode == "none":
        assert_matches_reference(stats, x, thresholds=())
        with pytest.raises(ValueError, match="keeps no per-sample maxima"):
            stats.selectivity()
    else:
        assert_matches_reference(stats, x)
    # The channels built to be told apart are.
    dead = stats.dead_mask()
    assert dead[:3].tolist() == [True, False, True] and not dead[3:].any()
    assert stats.dead_mask(1e-4)[3]


def test_known_values_by_hand():
    # Two samples, two channels, (N, C) activations: m = |x| directly.
    stats = ChannelStats(selectivity="exact")
    stats.update(torch.tensor([[0.0, -4.0], [2.0, 0.002]]))
    assert stats.corpus_max.tolist() == [2.0, 4.0]
    assert stats.dead_mask().tolist() == [False, False]
    # channel 0: 0/2 < 1e-3 on sample 0 only; channel 1: 0.002/4 = 5e-4 < 1e-3 on sample 1 only.
    assert stats.selectivity(1e-3).value.tolist() == [0.5, 0.5]
    assert stats.selectivity(1e-4).value.tolist() == [0.5, 0.0]
    assert stats.apoz().tolist() == [0.5, 0.5]  # -4 is not > 0


def test_never_active_channel_has_selectivity_one():
    for mode in ("exact", "histogram"):
        stats = ChannelStats(selectivity=mode)
        stats.update(torch.zeros(4, 3, 2))
        assert stats.selectivity().value.tolist() == [1.0, 1.0, 1.0]
        assert stats.dead_mask().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_and_channels_last(dtype, backend):
    x = make_activations(n=12, seed=1).to(dtype)
    x[:, 2:4] = 0  # keep out of fp16 subnormal / underflow territory
    stats = feed(ChannelStats(selectivity="exact", backend=backend), x.to(memory_format=torch.channels_last), [5, 7])
    assert_matches_reference(stats, x)


# ---------------------------------------------------------------- streaming, merge
@pytest.mark.parametrize("mode", ["exact", "memmap", "histogram", "none"])
def test_streaming_equals_one_batch(mode, tmp_path):
    x = make_activations(n=30, seed=2)
    streamed = feed(make_stats(mode, tmp_path, name="a.f32"), x, [3, 0, 8, 1, 18])
    whole = feed(make_stats(mode, tmp_path, name="b.f32"), x, [30])
    assert_same_statistics(streamed, whole)


def assert_same_statistics(a: ChannelStats, b: ChannelStats, thresholds=(1e-3, 0.3)):
    assert a.num_samples == b.num_samples
    assert torch.equal(a.corpus_max, b.corpus_max)
    assert torch.equal(a.nonfinite_mask(), b.nonfinite_mask())
    on_nan = "exclude"
    assert torch.equal(a.dead_mask(on_nan=on_nan), b.dead_mask(on_nan=on_nan))
    torch.testing.assert_close(a.apoz(on_nan=on_nan), b.apoz(on_nan=on_nan), rtol=0, atol=0, equal_nan=True)
    if a.mode != "none" or a._two_pass is not None:
        for t in thresholds:
            ra, rb = a.selectivity(t, on_nan=on_nan), b.selectivity(t, on_nan=on_nan)
            assert ra.exact == rb.exact and (ra.mode == rb.mode or a.mode != b.mode)
            torch.testing.assert_close(ra.value, rb.value, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(ra.error_bound, rb.error_bound, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("mode", ["exact", "memmap", "histogram", "none", "two_pass"])
def test_merge_of_shards_equals_whole(mode, tmp_path):
    x = make_activations(n=40, seed=3)
    x[7, 6, 0, 0] = float("nan")  # NaN counts must merge too
    base = "none" if mode == "two_pass" else mode
    reference_max = feed(ChannelStats(selectivity="none"), x, [40]).corpus_max

    def stats(name):
        s = make_stats(base, tmp_path, name=name)
        if mode == "two_pass":
            s.set_reference_max(reference_max, thresholds=(1e-3, 0.3))
        return s

    whole = feed(stats("whole.f32"), x, [40])
    merged = stats("merged.f32")
    bounds = [0, 5, 5, 25, 40]  # includes an empty shard
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        merged.merge(feed(stats(f"shard{i}.f32"), x[lo:hi], [hi - lo]))
    assert_same_statistics(merged, whole)
    # A shard that never saw data (not even the channel count) is a no-op.
    merged.merge(stats("never.f32"))
    assert merged.num_samples == 40
    # Into a fresh object: adopts the shard's shape.
    fresh = stats("fresh.f32").merge(whole)
    assert_same_statistics(fresh, whole)


def test_merge_rejects_incompatible(tmp_path):
    a = ChannelStats(selectivity="exact")
    a.update(torch.rand(3, 4))
    with pytest.raises(ValueError, match="modes differ"):
        a.merge(ChannelStats(selectivity="histogram"))
    other = ChannelStats(selectivity="exact")
    other.update(torch.rand(2, 5))
    with pytest.raises(ValueError, match="5 channels"):
        a.merge(other)
    with pytest.raises(ValueError, match="itself"):
        a.merge(a)
    b = ChannelStats(selectivity="exact")
    b.update(torch.rand(2, 4))
    b.set_reference_max(torch.ones(4))
    with pytest.raises(ValueError, match="reference"):
        a.merge(b)
    with pytest.raises(TypeError):
        a.merge({"not": "stats"})
    shared = tmp_path / "shared.f32"
    writer = ChannelStats(selectivity="memmap", memmap_path=shared)
    writer.update(torch.rand(3, 4))
    writer.state_dict()  # writes the staged rows to the file
    with pytest.raises(ValueError, match="own file"):
        ChannelStats(selectivity="memmap", memmap_path=shared).merge(writer)
    assert os.path.getsize(shared) == 3 * 4 * 4  # the shard's rows were not clobbered


# ---------------------------------------------------------------- histogram
def heavy_tailed(kind: str, n: int, c: int, g: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.rand(n, c, generator=g)
    if kind == "lognormal":
        return torch.exp(4.0 * torch.randn(n, c, generator=g))
    if kind == "cauchy":
        return torch.tan(math.pi * (torch.rand(n, c, generator=g) - 0.5))  # |x| taken by the stats
    if kind == "pareto":
        return torch.rand(n, c, generator=g).clamp_min(1e-7) ** (-1.0 / 0.7)
    if kind == "sparse":  # mostly exact zeros, a few huge activations, a few tiny ones
        x = torch.zeros(n, c)
        u = torch.rand(n, c, generator=g)
        x[u < 0.2] = 1e-3
        x[u > 0.95] = 1e4
        return x * torch.rand(n, c, generator=g)
    raise AssertionError(kind)


@pytest.mark.parametrize("bits", [0, 3, 5])
@pytest.mark.parametrize("kind", ["uniform", "lognormal", "cauchy", "pareto", "sparse"])
def test_histogram_bound_contains_truth(kind, bits):
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}-{bits}".encode()))
    x = heavy_tailed(kind, 400, 6, g)
    stats = ChannelStats(selectivity="histogram", histogram_mantissa_bits=bits)
    feed(stats, x, [150, 250])
    m = x.double().abs()
    corpus_max = m.amax(dim=0)
    for t in (1e-3, 0.01, 0.05, 0.3, 0.9):
        result = stats.selectivity(t)
        truth = ref_selectivity(m, t)
        assert result.mode == "histogram"
        assert torch.all(result.value - result.error_bound <= truth + 1e-12), (t, result, truth)
        assert torch.all(truth <= result.value + result.error_bound + 1e-12), (t, result, truth)
        # Tightness from first principles: only samples within one bucket width (relative
        # 2^-bits) of the threshold can be uncertain.
        width = 1.0 + 2.0 ** -bits
        threshold = t * corpus_max
        near = ((m >= threshold / width) & (m <= threshold * width)).sum(dim=0).double() / m.shape[0]
        assert torch.all(2 * result.error_bound <= near + 1e-12)


def test_histogram_ties_on_bucket_edges():
    # Every value is a lower bucket edge for 3 mantissa bits: 2^e * (1 + j/8), plus zeros;
    # corpus max 2^10 in every channel. t * max = 2^-10 * 2^10 = 1 and 1.375 are edges too.
    g = torch.Generator().manual_seed(5)
    e = torch.randint(-6, 10, (300, 4), generator=g).double()
    j = torch.randint(0, 8, (300, 4), generator=g).double()
    m = torch.ldexp(1 + j / 8, e.long())
    m[torch.rand(300, 4, generator=g) < 0.1] = 0.0
    m[0] = 2.0 ** 10
    m[1:40, 0] = 1.0  # many ties exactly at the threshold value
    m[40:60, 1] = 1.375
    x = m.float()
    for t in (2.0 ** -10, 1.375 / 1024):
        truth = ref_selectivity(m, t)
        exact = ChannelStats(selectivity="histogram", histogram_mantissa_bits=3)
        exact.update(x)
        result = exact.selectivity(t)
        assert result.exact and torch.equal(result.error_bound, torch.zeros(4, dtype=torch.float64))
        assert torch.equal(result.value, truth)
        # With one mantissa bit 1.375 sits inside bucket [1, 1.5): uncertain but bounded.
        coarse = ChannelStats(selectivity="histogram", histogram_mantissa_bits=1)
        coarse.update(x)
        result = coarse.selectivity(t)
        assert torch.all((result.value - result.error_bound <= truth) & (truth <= result.value + result.error_bound))
    assert not result.exact  # t = 1.375 / 1024 straddles a 1-bit bucket


def test_histogram_extreme_values():
    # Subnormals, the largest float and zeros all land in buckets with correct bounds.
    tiny = torch.tensor(1e-45)  # smallest float32 subnormal
    x = torch.tensor([[0.0, 1e-40], [float(tiny), 3.4e38], [1e-39, 1.0], [3.4e38, 2e-38]], dtype=torch.float32)
    for bits in (0, 3, 10):
        stats = ChannelStats(selectivity="histogram", histogram_mantissa_bits=bits)
        stats.update(x)
        for t in (1e-3, 0.5):
            truth = ref_selectivity(x.double(), t)
            r = stats.selectivity(t)
            assert torch.all((r.value - r.error_bound <= truth + 1e-15) & (truth <= r.value + r.error_bound + 1e-15))


# ---------------------------------------------------------------- two-pass, memmap
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_pass_equals_exact(backend):
    x = make_activations(n=33, seed=4)
    thresholds = (1e-3, 0.05, 0.5)
    exact = feed(ChannelStats(selectivity="exact", backend=backend), x, [33])
    first = feed(ChannelStats(selectivity="none", backend=backend), x, [20, 13])
    second = ChannelStats(selectivity="none", backend=backend)
    second.set_reference_max(first.corpus_max, thresholds=thresholds)
    feed(second, x, [4, 29])
    for t in thresholds:
        r = second.selectivity(t)
        assert r.mode == "two_pass" and r.exact
        assert torch.equal(r.value, exact.selectivity(t).value)
        assert torch.equal(r.value, ref_selectivity(ref_maxima(x), t))
    with pytest.raises(ValueError, match="set_reference_max"):
        second.selectivity(0.2)  # not one of the two-pass thresholds, and mode "none"
    # A histogram object with a reference uses the exact counts for those thresholds.
    hist = ChannelStats(selectivity="histogram", backend=backend)
    hist.set_reference_max(first.corpus_max, thresholds=(0.05,))
    feed(hist, x, [33])
    assert hist.selectivity(0.05).mode == "two_pass"
    assert hist.selectivity(0.5).mode == "histogram"


def test_two_pass_rejects_wrong_reference():
    x = make_activations(n=10, seed=5)
    stats = ChannelStats(selectivity="none")
    stats.set_reference_max(ref_corpus_max(ref_maxima(x)).float() * 2)
    stats.update(x)
    with pytest.raises(ValueError, match="reference max differs"):
        stats.selectivity()
    restarted = ChannelStats(selectivity="none")
    restarted.set_reference_max(torch.ones(3))
    restarted.update(torch.ones(2, 3))
    restarted.set_reference_max(torch.ones(3))  # restarts the counts: nothing counted since
    with pytest.raises(ValueError, match="no samples were counted"):
        restarted.selectivity()
    with pytest.raises(ValueError, match="finite"):
        ChannelStats().set_reference_max(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="thresholds"):
        ChannelStats().set_reference_max(torch.ones(2), thresholds=(0.0,))
    with pytest.raises(ValueError, match="channels"):
        stats.set_reference_max(torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_memmap_equals_exact_across_chunks(backend, tmp_path, monkeypatch):
    # Tiny staging / read chunks so the test crosses many flush and read boundaries.
    monkeypatch.setattr(memmap_module, "STAGING_BYTES", 3 * 4 * 9)  # 3 rows of 9 channels
    monkeypatch.setattr(store_base, "CHUNK_BYTES", 5 * 8 * 9)  # read back 5 rows at a time
    x = make_activations(n=37, seed=6)
    path = tmp_path / "layer.f32"
    memmap = feed(ChannelStats(selectivity="memmap", memmap_path=path, backend=backend), x, [2, 7, 1, 27])
    exact = feed(ChannelStats(selectivity="exact", backend=backend), x, [37])
    assert_same_statistics(memmap, exact, thresholds=(1e-3, 0.05, 0.5))
    assert_matches_reference(memmap, x)
    # The file holds exactly the per-sample maxima, row per sample.
    on_disk = np.fromfile(path, dtype=np.float32).reshape(-1, 9)
    assert torch.equal(torch.from_numpy(on_disk), ref_maxima(x).float())


def test_memmap_temporary_file_is_removed():
    stats = ChannelStats(selectivity="memmap")
    stats.update(torch.rand(4, 3))
    path = stats._store.path
    assert os.path.exists(path)
    del stats
    gc.collect()
    assert not os.path.exists(path)


# ---------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["exact", "histogram"])
def test_nan_channel_is_reported_never_dead_or_active(mode, backend):
    x = make_activations(n=20, seed=7)
    x[4, 2, 1, 1] = float("nan")  # channel 2 is below the dead threshold otherwise
    x[9, 7, 0, 0] = float("nan")
    x[11, 7, 0, 2] = float("nan")
    stats = feed(ChannelStats(selectivity=mode, backend=backend), x, [6, 14])
    assert stats.nan_mask().tolist() == [c in (2, 7) for c in range(9)]
    assert torch.equal(stats.nonfinite_mask(), stats.nan_mask())
    # The corpus max ignores the NaN samples.
    m = ref_maxima(x)
    assert torch.equal(stats.corpus_max, ref_corpus_max(m).float())
    with pytest.raises(NonFiniteActivationError, match=r"2 of 9 channels") as err:
        stats.dead_mask()
    assert err.value.channels == [2, 7] and err.value.nan_samples == [1, 2]
    assert "channel 2 (NaN in 1 of 20 samples)" in str(err.value)
    assert "channel 7 (NaN in 2 of 20 samples)" in str(err.value)
    for call in (stats.selectivity, stats.apoz):
        with pytest.raises(NonFiniteActivationError, match="channel 7"):
            call()
    dead = stats.dead_mask(on_nan="exclude")
    expected = ref_corpus_max(m) < 1e-12
    expected[[2, 7]] = False  # reported as not dead; nan_mask() says why
    assert torch.equal(dead, expected)
    sel = stats.selectivity(0.05, on_nan="exclude")
    assert torch.isnan(sel.value[[2, 7]]).all() and torch.isnan(sel.error_bound[[2, 7]]).all()
    keep = [c for c in range(9) if c not in (2, 7)]
    truth = ref_selectivity(m, 0.05)[keep]
    value, error = sel.value[keep], sel.error_bound[keep]
    assert torch.all((value - error <= truth) & (truth <= value + error))
    apoz = stats.apoz(on_nan="exclude")
    assert torch.isnan(apoz[[2, 7]]).all()
    torch.testing.assert_close(apoz[keep], ref_apoz(x)[keep], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="on_nan"):
        stats.dead_mask(on_nan="ignore")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_channel(backend):
    x = make_activations(n=8, seed=8)
    x[3, 1, 0, 0] = float("-inf")
    stats = feed(ChannelStats(selectivity="exact", backend=backend), x, [8])
    assert stats.nonfinite_mask().tolist() == [c == 1 for c in range(9)]
    assert not stats.nan_mask().any()
    assert math.isinf(stats.corpus_max[1].item())
    assert not stats.dead_mask()[1]  # an infinite activation is certainly not dead
    with pytest.raises(NonFiniteActivationError, match=r"channel 1 \(Inf in 1 of 8 samples\)"):
        stats.selectivity()  # a ratio to an infinite max is undefined
    sel = stats.selectivity(on_nan="exclude")
    assert math.isnan(sel.value[1].item())
    assert torch.equal(sel.value[2:], ref_selectivity(ref_maxima(x), 1e-3)[2:])


# ---------------------------------------------------------------- persistence
@pytest.mark.parametrize("mode", ["exact", "histogram", "none", "two_pass"])
def test_state_dict_round_trip(mode, tmp_path):
    x = make_activations(n=25, seed=9)
    x[3, 4, 0, 0] = float("nan")
    base = "none" if mode == "two_pass" else mode

    def fresh():
        s = ChannelStats(selectivity=base)
        if mode == "two_pass":
            s.set_reference_max(ref_corpus_max(ref_maxima(x)).float(), thresholds=(1e-3, 0.3))
        return s

    original = feed(fresh(), x[:15], [15])
    torch.save(original.state_dict(), tmp_path / "stats.pt")
    restored = ChannelStats(selectivity=base)
    restored.load_state_dict(torch.load(tmp_path / "stats.pt"))
    # Two-pass selectivity is only defined once every sample of its reference was counted.
    assert_same_statistics(restored, original, thresholds=() if mode == "two_pass" else (1e-3, 0.3))
    # Both continue identically, and equal an object that saw everything.
    for s in (original, restored):
        s.update(x[15:])
    assert_same_statistics(restored, original)
    assert_same_statistics(restored, feed(fresh(), x, [25]))
    with pytest.raises(ValueError, match="selectivity="):
        ChannelStats(selectivity="exact" if base != "exact" else "none").load_state_dict(original.state_dict())


def format_1_state(mode: str, tmp_path) -> dict:
    """The state dict (format 1, as checkpoints hold it) of ``test_known_values_by_hand``'s two
    samples, written out field by field: m = [[0, 4], [2, 0.002]], one positive element per channel."""
    maxima = torch.tensor([[0.0, 4.0], [2.0, 0.002]])
    sd = {"format": 1, "mode": "none" if mode == "two_pass" else mode, "histogram_mantissa_bits": 3,
          "num_channels": 2, "num_samples": 2, "elements": 2, "apoz_samples": 2,
          "max": torch.tensor([2.0, 4.0]), "nan_samples": torch.zeros(2, dtype=torch.int64),
          "inf_samples": torch.zeros(2, dtype=torch.int64), "positive": torch.tensor([1, 1]),
          "negative": torch.tensor([False, False])}
    if mode == "exact":
        sd["maxima"] = maxima
    elif mode == "memmap":
        maxima.numpy().tofile(tmp_path / "saved.f32")
        sd.update(memmap_path=str(tmp_path / "saved.f32"), memmap_rows=2)
    elif mode == "histogram":
        # Bucket of a positive float: its bits without the low 20 mantissa bits, plus 1; 0 for zero.
        histogram = torch.zeros(2, (255 << 3) + 2, dtype=torch.int64)
        for n in range(2):
            for c in range(2):
                v = maxima[n, c].numpy()
                histogram[c, 0 if v == 0 else (int(v.view(np.int32)) >> 20) + 1] += 1
        sd["histogram"] = histogram
    elif mode == "two_pass":  # m / reference < 1e-3: sample 0 of channel 0, sample 1 of channel 1
        sd.update(reference=torch.tensor([2.0, 4.0]), thresholds=(1e-3,), pass2_counts=torch.tensor([[1], [1]]),
                  pass2_max=torch.tensor([2.0, 4.0]), pass2_samples=2)
    return sd


@pytest.mark.parametrize("mode", ["exact", "memmap", "histogram", "none", "two_pass"])
def test_state_dict_format_1_loads_and_is_what_state_dict_writes(mode, tmp_path):
    """Checkpoints written before the stores were split out still load, and state_dict still writes them."""
    saved = format_1_state(mode, tmp_path)
    base = saved["mode"]
    loaded = ChannelStats(selectivity=base, memmap_path=tmp_path / "own.f32" if base == "memmap" else None)
    loaded.load_state_dict(saved)
    assert loaded.corpus_max.tolist() == [2.0, 4.0] and loaded.apoz().tolist() == [0.5, 0.5]
    if mode != "none":
        result = loaded.selectivity(1e-3)
        assert result.value.tolist() == [0.5, 0.5] and result.exact
        assert result.mode == mode
    fed = ChannelStats(selectivity=base, memmap_path=tmp_path / "fed.f32" if base == "memmap" else None)
    if mode == "two_pass":
        fed.set_reference_max(torch.tensor([2.0, 4.0]))
    fed.update(torch.tensor([[0.0, -4.0], [2.0, 0.002]]))
    written = fed.state_dict()
    # Since the value range is kept, state_dict adds its three fields; a state without them (an
    # older checkpoint) loads with the range unknown.
    assert written.keys() == saved.keys() | {"value_min", "value_max", "range_samples"}
    assert written["range_samples"] == 2
    assert written["value_min"].tolist() == [0.0, -4.0]
    assert written["value_max"].tolist() == [2.0, pytest.approx(0.002)]
    assert not loaded.has_range
    with pytest.raises(ValueError, match="2 of 2 samples came through update_reduced.*value range is unknown"):
        loaded.constant_mask()
    with_range = dict(saved, value_min=written["value_min"], value_max=written["value_max"], range_samples=2)
    again = ChannelStats(selectivity=base, memmap_path=tmp_path / "again.f32" if base == "memmap" else None)
    again.load_state_dict(with_range)
    assert again.has_range and again.constant_mask().tolist() == [False, False]
    for key, value in saved.items():
        if key == "memmap_path":
            assert np.fromfile(written[key], dtype=np.float32).tolist() == np.fromfile(value, dtype=np.float32).tolist()
        elif isinstance(value, torch.Tensor):
            assert written[key].dtype == value.dtype and torch.equal(written[key], value), key
        else:
            assert written[key] == value, key


def test_state_dict_is_a_snapshot():
    stats = ChannelStats(selectivity="histogram")
    stats.update(torch.rand(3, 4))
    sd = stats.state_dict()
    stats.update(torch.rand(5, 4) + 10)
    restored = ChannelStats(selectivity="histogram")
    restored.load_state_dict(sd)
    assert restored.num_samples == 3 and restored.corpus_max.max() < 1.0


def test_state_dict_memmap_paths(tmp_path):
    x = make_activations(n=21, seed=10)
    a_path = tmp_path / "a.f32"
    original = feed(ChannelStats(selectivity="memmap", memmap_path=a_path), x[:12], [5, 7])
    sd = original.state_dict()
    assert sd["memmap_path"] == str(a_path) and sd["memmap_rows"] == 12
    whole = feed(ChannelStats(selectivity="exact"), x, [21])

    # A different file: rows are copied, the original file is left alone.
    copy = ChannelStats(selectivity="memmap", memmap_path=tmp_path / "b.f32")
    copy.load_state_dict(sd)
    copy.update(x[12:])
    assert_same_statistics(copy, whole)
    assert os.path.getsize(a_path) == 12 * 9 * 4

    # No path: a private temporary copy.
    temp = ChannelStats(selectivity="memmap")
    temp.load_state_dict(sd)
    assert temp._store.path != str(a_path)
    temp.update(x[12:])
    assert_same_statistics(temp, whole)

    # The same file (resuming a checkpoint): used in place, rows written after the checkpoint
    # by the original are overwritten rather than counted.
    original.update(x[12:15])
    original.state_dict()  # flushes 3 more rows into a.f32
    resumed = ChannelStats(selectivity="memmap", memmap_path=a_path)
    resumed.load_state_dict(sd)
    assert resumed.num_samples == 12
    resumed.update(x[12:])
    assert_same_statistics(resumed, whole)
    assert os.path.getsize(a_path) == 21 * 9 * 4

    missing = dict(sd, memmap_path=str(tmp_path / "gone.f32"))
    with pytest.raises(FileNotFoundError, match="gone.f32"):
        ChannelStats(selectivity="memmap").load_state_dict(missing)


def test_reset_forgets_everything():
    stats = ChannelStats(selectivity="exact")
    stats.update(torch.rand(4, 3))
    stats.set_reference_max(torch.ones(3))
    stats.reset()
    assert stats.num_samples == 0 and stats.num_channels is None
    stats.update(torch.rand(2, 5))  # a new channel count is fine after reset
    assert stats.num_channels == 5 and stats.selectivity(0.5).mode == "exact"


# ---------------------------------------------------------------- inputs
def test_empty_batch_is_a_noop():
    stats = ChannelStats(selectivity="exact")
    stats.update(torch.empty(0, 4, 3, 3))
    assert stats.num_samples == 0 and stats.num_channels is None
    stats.update(torch.rand(3, 4, 3, 3))
    before = stats.state_dict()
    stats.update(torch.empty(0, 4, 3, 3))
    stats.update_reduced(torch.empty(0, 4))
    after = stats.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], torch.Tensor):
            assert torch.equal(before[key], after[key]), key
        else:
            assert before[key] == after[key], key
    with pytest.raises(ValueError, match="5 channels"):
        stats.update(torch.empty(0, 5, 3, 3))  # still validated


def test_bad_inputs_raise_clear_errors():
    stats = ChannelStats(selectivity="exact")
    with pytest.raises(ValueError, match="no samples seen"):
        stats.dead_mask()
    with pytest.raises(ValueError, match="num_channels unknown"):
        stats.corpus_max
    stats.update(torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match="got 5 channels, but these stats hold 4"):
        stats.update(torch.rand(2, 5, 3))
    with pytest.raises(TypeError, match="dtype"):
        stats.update(torch.ones(2, 4, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="float64"):
        stats.update(torch.rand(2, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank"):
        stats.update(torch.rand(4))
    with pytest.raises(ValueError, match="no channels"):
        ChannelStats().update(torch.rand(3, 0, 2))
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        stats.update_reduced(torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match="both"):
        stats.update_reduced(torch.rand(2, 4), positive=torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer counts"):
        stats.update_reduced(torch.rand(2, 4), positive=torch.ones(2, 4), elements_per_sample=3)
    with pytest.raises(ValueError, match="selectivity mode"):
        ChannelStats(selectivity="approximate")
    with pytest.raises(ValueError, match="memmap_path"):
        ChannelStats(selectivity="exact", memmap_path="x.f32")
    with pytest.raises(ValueError, match="histogram_mantissa_bits"):
        ChannelStats(histogram_mantissa_bits=24)
    with pytest.raises(ValueError, match="backend"):
        ChannelStats(backend="gpu")
    with pytest.raises(ValueError, match="threshold"):
        stats.selectivity(0.0)
    # Negative maxima cannot come from |x|: reported when a metric is asked for.
    bad = ChannelStats()
    bad.update_reduced(torch.tensor([[1.0, -2.0, 0.5]]))
    with pytest.raises(ValueError, match=r"negative maxima in channels \[1\]"):
        bad.dead_mask()


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_reduced_matches_update(backend):
    x = make_activations(n=14, seed=11)
    for mode in ("exact", "histogram"):
        direct = feed(ChannelStats(selectivity=mode, backend=backend), x, [14])
        reduced = ChannelStats(selectivity=mode)
        for block in x.split(5):
            m, positive = sparsekern.channel_absmax(block, count_positive=True, backend=backend)
            reduced.update_reduced(m, positive.to(torch.int32), elements_per_sample=15)
        assert_same_statistics(reduced, direct)
    # Without positive counts APoZ is unknown for those samples, the rest still works.
    partial = ChannelStats(selectivity="exact")
    partial.update_reduced(sparsekern.channel_absmax(x, backend=backend))
    assert torch.equal(partial.dead_mask(), direct.dead_mask())
    with pytest.raises(ValueError, match="without `positive`"):
        partial.apoz()


def test_exact_mode_does_not_alias_the_callers_buffer():
    stats = ChannelStats(selectivity="exact")
    m = torch.tensor([[1.0, 2.0], [0.0, 0.001]])
    stats.update_reduced(m)
    m.fill_(7.0)  # a kernel reusing its output buffer
    # 0/1 and 0.001/2 are below 1e-3; an aliased store would now hold 7s and give 0.
    assert stats.selectivity(1e-3).value.tolist() == [0.5, 0.5]


def test_summary_is_json_and_consistent():
    x = make_activations(n=16, seed=12)
    x[2, 6, 0, 0] = float("nan")
    stats = feed(ChannelStats(selectivity="histogram"), x, [16])
    summary = stats.summary()
    json.dumps(summary, allow_nan=False)  # strict JSON: non-finite values are None
    assert summary["num_samples"] == 16 and summary["nan_channels"] == [6]
    dead = stats.dead_mask(on_nan="exclude")
    assert summary["dead_count"]["1e-12"] == int(dead.sum())
    assert summary["dead_fraction"]["0.0001"] == int(stats.dead_mask(1e-4, on_nan="exclude").sum()) / 9
    assert summary["channels"]["selectivity"][6] is None
    assert summary["channels"]["apoz"][0] == 1.0
    none = feed(ChannelStats(selectivity="none"), x, [16]).summary(per_channel=False)
    assert none["selectivity"] is None and "channels" not in none


# ---------------------------------------------------------------- batch checksums
def reference_checksum(x: torch.Tensor) -> int:
    """Sum of the float32 bit patterns of the per-sample maxima; NaN counts -1, zeros 0."""
    m = ref_maxima(x).float().numpy()  # maxima of float32 values are float32 values: exact
    bits = m.view(np.int32).astype(np.int64)
    bits[np.isnan(m)] = -1
    bits[m == 0] = 0
    return int(bits.sum())


def test_batch_checksums_follow_the_maxima_of_every_update(monkeypatch):
    monkeypatch.setattr(checksums_module, "CHECKSUM_BLOCK", 2)  # stacking happens within these 5 updates
    x = make_activations(n=20, seed=14)
    x[3, 6, 0, 0] = float("nan")
    stats = feed(ChannelStats(selectivity="none", checksums=True), x, [4] * 5)
    assert stats.batch_checksums().tolist() == [reference_checksum(x[i:i + 4]) for i in range(0, 20, 4)]
    changed = x.clone()
    changed[9] *= 0.5  # one sample of batch 2
    other = feed(ChannelStats(selectivity="none", checksums=True), changed, [4] * 5)
    assert (other.batch_checksums() != stats.batch_checksums()).tolist() == [False, False, True, False, False]
    stats.reset()
    assert stats.batch_checksums().tolist() == []
    with pytest.raises(ValueError, match="checksums=True"):
        ChannelStats().batch_checksums()


def test_batch_checksums_ignore_the_sign_of_zero_and_the_nan_payload():
    nan_bits = torch.tensor([0x7FC00000, 0x7FC00123], dtype=torch.int32).view(torch.float32)
    a, b = ChannelStats(selectivity="none", checksums=True), ChannelStats(selectivity="none", checksums=True)
    a.update_reduced(torch.stack([torch.tensor([0.0, 2.0]), torch.stack([nan_bits[0], torch.tensor(1.0)])]))
    b.update_reduced(torch.stack([torch.tensor([-0.0, 2.0]), torch.stack([nan_bits[1], torch.tensor(1.0)])]))
    assert torch.equal(a.batch_checksums(), b.batch_checksums())


@pytest.mark.skipif(_backend.extension() is None, reason="needs the C++ extension")
def test_host_checksum_equals_the_torch_definition():
    """The extension's one-pass sum against checksums.checksum (torch ops) and the numpy reference:
    NaNs of either sign and any payload, +-0.0, +-Inf, subnormals, and sums beyond int32."""
    from sparsekern.ops.channel_stats_update import host_checksum
    from sparsekern.stats.checksums import checksum

    g = torch.Generator().manual_seed(3)
    m = torch.rand(64, 1280, generator=g) * 1e30  # bit patterns near 2^31: the int64 sum overflows int32
    specials = torch.tensor([0x7FC00000, 0xFFC00001 - 2**32, 0x7F800001, 0x00000001, 0x80000000 - 2**32,
                             0x7F800000, 0xFF800000 - 2**32], dtype=torch.int64).to(torch.int32).view(torch.float32)
    m.view(-1)[:: 997][: specials.numel()] = specials
    bits = m.numpy().view(np.int32).astype(np.int64)
    bits[np.isnan(m.numpy())] = -1
    bits[m.numpy() == 0] = 0
    assert host_checksum(m) == int(checksum(m)) == int(bits.sum())
    assert abs(int(bits.sum())) > 2**31
    assert host_checksum(m[:, ::2]) is None and host_checksum(m.double()) is None  # torch ops take those


# ---------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["exact", "memmap", "histogram", "none"])
def test_cuda_update_never_synchronises_and_matches_cpu(mode, tmp_path):
    x = make_activations(n=24, seed=13)
    x[5, 3, 0, 0] = float("nan")
    gpu = make_stats(mode, tmp_path, backend="auto", name="gpu.f32")
    gpu.set_reference_max(ref_corpus_max(ref_maxima(x)).float().cuda(), thresholds=(1e-3,))
    xc = x.cuda()
    gpu.update(xc[:4])  # first update allocates the state (pinned buffers for memmap)
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu.update(xc[4:16])
        m, positive = sparsekern.channel_absmax(xc[16:], count_positive=True)
        gpu.update_reduced(m, positive, elements_per_sample=15)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = make_stats(mode, tmp_path, name="cpu.f32")
    cpu.set_reference_max(ref_corpus_max(ref_maxima(x)).float(), thresholds=(1e-3,))
    feed(cpu, x, [24])
    assert torch.equal(gpu.corpus_max.cpu(), cpu.corpus_max)
    assert torch.equal(gpu.nan_mask().cpu(), cpu.nan_mask())
    assert torch.equal(gpu.dead_mask(on_nan="exclude").cpu(), cpu.dead_mask(on_nan="exclude"))
    assert torch.equal(gpu.apoz(on_nan="exclude").cpu().nan_to_num(-1), cpu.apoz(on_nan="exclude").nan_to_num(-1))
    thresholds = (1e-3, 0.3) if mode != "none" else (1e-3,)
    for t in thresholds:
        g, c = gpu.selectivity(t, on_nan="exclude"), cpu.selectivity(t, on_nan="exclude")
        assert g.mode == c.mode
        torch.testing.assert_close(g.value.cpu(), c.value, rtol=0, atol=0, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batch_checksums_never_synchronise_and_equal_cpu():
    x = make_activations(n=24, seed=15)
    x[5, 3, 0, 0] = float("nan")
    gpu = ChannelStats(selectivity="none", checksums=True, backend="auto")
    xc = x.cuda()
    gpu.update(xc[:4])  # first update allocates the state
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu.update(xc[4:16])
        gpu.update(xc[16:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = feed(ChannelStats(selectivity="none", checksums=True), x, [4, 12, 8])
    # The maxima are the same floats on both devices (a max is exact), so are their checksums.
    assert torch.equal(gpu.batch_checksums().cpu(), cpu.batch_checksums())


@pytest.mark.parametrize("bits", [1, 3, 5])
def test_histogram_selectivity_matches_the_bucket_mask_definition(bits):
    """The window / prefix-count selectivity equals the definition: buckets whose largest (smallest)
    value over the corpus max is below t, as a C x buckets float64 mask; zero, infinite, tiny and
    huge maxima, NaN samples and thresholds far below the max too."""
    from sparsekern.stats.stores.histogram import HistogramStore, _bucket_bounds

    c, n = 50, 405
    g = torch.Generator().manual_seed(bits)
    base = torch.cat([torch.rand(400, c, generator=g) * torch.logspace(-40, 30, c).float(), torch.zeros(5, c)])
    with_nan = base.clone()
    with_nan[3, 7] = float("nan")
    with_inf = with_nan.clone()
    with_inf[4, 8] = float("inf")  # the window needs a finite max: this store takes the prefix sums
    tiny = torch.where(base > base.median(), 1e-45, 0.0)
    wide = base.clone()
    wide[0] = 1e30  # thresholds far below the max: windows wider than _MAX_WINDOW
    smallest, largest = _bucket_bounds(bits)
    # The store's contract: corpus_max is the max of the (non-NaN) maxima it counted.
    for m in (base, with_nan, with_inf, base * 0.37, torch.zeros(n, c), tiny, wide):
        store = HistogramStore(bits)
        store.start(c, torch.device("cpu"))
        store.update(m)
        corpus_max = torch.where(torch.isnan(m), 0.0, m).amax(dim=0)
        for t in (1e-30, 1e-3, 0.1234567, 0.5, 1.0):
            value, bound = store.selectivity(t, corpus_max, n)
            ratio_max = corpus_max.double().unsqueeze(1)
            all_below, some_below = largest / ratio_max < t, smallest / ratio_max < t
            below = (store.counts * all_below).sum(dim=1).double()
            straddle = (store.counts * (some_below & ~all_below)).sum(dim=1).double()
            assert torch.equal(value, (below + straddle / 2) / n) and torch.equal(bound, straddle / (2 * n))
