"""The clamp epilogue of the statistics kernel: ``ChannelStats.update_clamped`` and the tracker's
``fuse_activations`` (what ``analyze`` runs), against independent references.

References: the activation module's own output (nn.ReLU / nn.ReLU6 / nn.Hardtanh, compared bit for
bit, -0.0 and NaN included) and a ChannelStats fed that output with the torch backend (the float
reference of every statistic).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsekern.ops.channel_stats_update as csu
from _helpers import prepare_kind
from sparsekern.stats.channel_stats import ChannelStats
from sparsekern.stats.tracker import SparsityTracker

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "relu6": lambda: nn.ReLU6(),
    "hardtanh": lambda: nn.Hardtanh(-0.5, 1.25),
}
BOUNDS = {"relu": (0.0, float("inf")), "relu6": (0.0, 6.0), "hardtanh": (-0.5, 1.25)}

# Every path of the kernel: NCHW rows (long, 8..31, < 8), channels_last slices of 32/16/8
# channels with a scalar channel tail, several channel blocks, positions split across tasks, (N, C).
SHAPES = {
    "rows-400": ((3, 5, 20, 20), False),
    "rows-9": ((3, 5, 3, 3), False),
    "rows-4": ((4, 3, 2, 2), False),
    "cl-41x9": ((3, 41, 3, 3), True),
    "cl-300x65": ((2, 300, 5, 13), True),
    "cl-split": ((1, 16, 40, 41), True),
    "nc": ((7, 45), False),
}
MODES = ("none", "histogram", "exact")


def activations(shape, channels_last: bool, seed=0) -> torch.Tensor:
    """Values on both sides of every bound, exact bounds, zeros, -0.0, NaN in a lane and a tail."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 4
    u = torch.rand(shape, generator=g)
    x[u < 0.1] = 0.0
    x[(u >= 0.1) & (u < 0.15)] = -0.0
    x[(u >= 0.15) & (u < 0.2)] = 6.0
    x[(u >= 0.2) & (u < 0.25)] = -0.5
    flat = x.view(shape[0], shape[1], -1)
    flat[0, 0, 0] = float("nan")
    flat[-1, -1, -1] = float("nan")
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def assert_same_stats(got: ChannelStats, want: ChannelStats) -> None:
    g, w = got.state_dict(), want.state_dict()
    assert set(g) == set(w)
    for key, value in w.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(torch.nan_to_num(g[key].double(), nan=-1.0), torch.nan_to_num(value.double(), nan=-1.0)), key
        elif key != "backend":
            assert g[key] == value, key


@pytest.fixture
def fused_only(monkeypatch):
    """Fail if the fused pass falls back to clamp + update (the fallback calls channel_stats_update_impl)."""
    def refuse(*args, **kwargs):
        raise AssertionError("update_clamped fell back to torch.clamp + channel_stats_update_impl")

    monkeypatch.setattr(csu, "channel_stats_update_impl", refuse)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("case", list(SHAPES))
def test_update_clamped_is_the_module_then_update(case, act, inplace, mode, fused_only):
    prepare_kind("cpp")
    shape, channels_last = SHAPES[case]
    x = activations(shape, channels_last)
    want_y = ACTIVATIONS[act]()(x.clone(memory_format=torch.preserve_format))
    want = ChannelStats(selectivity=mode, backend="torch")
    want.set_reference_max(torch.full((shape[1],), 2.0), thresholds=(1e-3, 0.25))
    want.update(want_y)

    stats = ChannelStats(selectivity=mode, backend="cpp")
    stats.set_reference_max(torch.full((shape[1],), 2.0), thresholds=(1e-3, 0.25))
    given = x.clone(memory_format=torch.preserve_format)
    y = stats.update_clamped(given, *BOUNDS[act], inplace=inplace)

    assert_bits_equal(y, want_y)
    assert (y.data_ptr() == given.data_ptr()) == inplace
    if not inplace:
        assert_bits_equal(given, x)  # the input is left as it was
    assert_same_stats(stats, want)
    if mode == "exact":  # the per-sample maxima the fused pass kept
        assert torch.equal(torch.nan_to_num(stats._store.maxima, nan=-1.0), torch.nan_to_num(want._store.maxima, nan=-1.0))


@pytest.mark.parametrize("variant", ["fp16", "bf16", "strided", "torch-backend", "empty-batch"])
def test_update_clamped_falls_back_exactly(variant):
    """What the fused pass does not take (low precision, a non-dense view, another backend, no
    samples) gives the module's output and the statistics of update() on it."""
    prepare_kind("cpp")
    x = activations((4, 6, 5, 5), False)
    backend = "torch" if variant == "torch-backend" else "cpp"
    if variant == "fp16":
        x = x.half()
    elif variant == "bf16":
        x = x.bfloat16()
    elif variant == "strided":
        x = x[:, ::2]
    elif variant == "empty-batch":
        x = x[:0]
    want_y = F.relu6(x)
    want = ChannelStats(selectivity="histogram", backend=backend)
    want.update(want_y)
    stats = ChannelStats(selectivity="histogram", backend=backend)
    y = stats.update_clamped(x, 0.0, 6.0)
    assert torch.equal(y.contiguous().view(torch.int16 if y.element_size() == 2 else torch.int32),
                       want_y.contiguous().view(torch.int16 if y.element_size() == 2 else torch.int32))
    assert stats.num_samples == want.num_samples
    if want.num_samples:
        assert_same_stats(stats, want)


def test_update_clamped_rejects_bad_input():
    stats = ChannelStats(selectivity="none")
    with pytest.raises(TypeError, match="unsupported dtype torch.int64"):
        stats.update_clamped(torch.zeros(2, 3, dtype=torch.int64), 0.0, 6.0)
    with pytest.raises(ValueError, match="rank >= 2"):
        stats.update_clamped(torch.zeros(3), 0.0, 6.0)
    stats.update_clamped(torch.zeros(2, 3), 0.0, 6.0)
    with pytest.raises(ValueError, match="got 4 channels, but these stats hold 3"):
        stats.update_clamped(torch.zeros(2, 4), 0.0, 6.0)


class Net(nn.Module):
    """Every kind of feature the tracker fuses or must not: an in-place ReLU called twice per
    forward (a residual block's), an out-of-place ReLU6, a Hardtanh, and a functional ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.relu = nn.ReLU(inplace=True)
        self.conv3, self.bn3 = nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.relu6 = nn.ReLU6()
        self.conv4, self.bn4 = nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)
        self.tanh = nn.Hardtanh(-0.25, 0.5)
        self.conv5, self.bn5 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)) + h)
        h = self.relu6(self.bn3(self.conv3(h)))
        h = self.tanh(self.bn4(self.conv4(h)))
        return F.relu(self.bn5(self.conv5(h))).mean((2, 3))


def randomized_net(seed=0) -> Net:
    torch.manual_seed(seed)
    net = Net().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-1.0, 1.0)
            m.bias.data[::3] = -50.0  # dead channels
            m.running_var.data.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("mode", ["histogram", "exact"])
def test_tracker_fuse_activations_same_output_and_statistics(mode, channels_last):
    prepare_kind("cpp")
    net = randomized_net()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    batches = [torch.randn(5, 3, 9, 9).contiguous(memory_format=fmt) for _ in range(3)]
    with torch.no_grad():
        with SparsityTracker(net, selectivity=mode) as plain:
            want = [net(x) for x in batches]
        with SparsityTracker(net, selectivity=mode, fuse_activations=True) as fused:
            assert len(fused._fused) == 3  # relu, relu6, tanh; the functional F.relu keeps its hook
            got = [net(x) for x in batches]
    for g, w in zip(got, want):
        assert_bits_equal(g, w)
    assert list(fused.stats) == list(plain.stats)
    for name in plain.stats:
        assert_same_stats(fused.stats[name], plain.stats[name])
    assert all("forward" not in vars(m) for m in net.modules())  # remove() restored the modules


def test_tracker_fuse_activations_under_autograd_uses_the_module():
    """With gradients on, the fused forward is the module's own: backward works and the
    statistics equal the unfused tracker's."""
    prepare_kind("cpp")
    net = randomized_net().train()
    x = torch.randn(4, 3, 9, 9)
    with SparsityTracker(net, selectivity="none") as plain:
        want = net(x)
    grads_want = torch.autograd.grad(want.sum(), net.conv1.weight)
    with SparsityTracker(net, selectivity="none", fuse_activations=True) as fused:
        got = net(x)
    grads_got = torch.autograd.grad(got.sum(), net.conv1.weight)
    assert torch.equal(got, want)
    assert torch.equal(grads_got[0], grads_want[0])
    for name in plain.stats:
        assert_same_stats(fused.stats[name], plain.stats[name])
