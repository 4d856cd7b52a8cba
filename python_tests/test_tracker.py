"""Feature discovery, SparsityTracker and SparsityReport against independent references.

References are computed by the tests' own forward hooks on modules named by hand (not from
the features under test), in float64: m[n, c] = max over positions of |post-ReLU activation|.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _helpers import make_constant, randomize_bn
from sparsekern.stats.features import Feature, find_features
from sparsekern.stats.report_table import LayerSparsity
from sparsekern.stats.tracker import SparsityTracker, gamma_sparsity

torchvision = pytest.importorskip("torchvision")


# --- reference ------------------------------------------------------------------------------


class ReferenceHooks:
    """Record float64 per-sample maxima of hand-chosen hook points.

    ``points``: feature name -> (module name, call index within one forward, apply relu?).
    """

    def __init__(self, model: nn.Module, points: dict):
        self.points = points
        self.maxima = {name: [] for name in points}
        self.zero_fraction_parts = {name: [] for name in points}  # (zeros, elements) per batch
        self._calls = {}
        modules = dict(model.named_modules())
        self._handles = [model.register_forward_pre_hook(lambda m, a: self._calls.clear())]
        for module_name in {p[0] for p in points.values()}:
            self._handles.append(modules[module_name].register_forward_hook(self._hook(module_name)))

    def _hook(self, module_name):
        def hook(module, args, out):
            call = self._calls.get(module_name, 0)
            self._calls[module_name] = call + 1
            for name, (m, k, apply_relu) in self.points.items():
                if m == module_name and k == call:
                    a = torch.relu(out.detach()) if apply_relu else out.detach()
                    a = a.double().reshape(a.shape[0], a.shape[1], -1)
                    self.maxima[name].append(a.abs().amax(dim=2))
                    self.zero_fraction_parts[name].append(((a == 0).sum(dim=(0, 2)), a.shape[0] * a.shape[2]))

        return hook

    def remove(self):
        for h in self._handles:
            h.remove()

    def m(self, name) -> torch.Tensor:
        return torch.cat(self.maxima[name])

    def corpus_max(self, name) -> torch.Tensor:
        return self.m(name).amax(dim=0)

    def selectivity(self, name, t=1e-3) -> torch.Tensor:
        m, mx = self.m(name), self.corpus_max(name)
        sel = (m / mx < t).double().mean(dim=0)
        return torch.where(mx == 0, 1.0, sel)  # never-active channels are fully selective

    def apoz(self, name) -> torch.Tensor:
        zeros = sum(z for z, _ in self.zero_fraction_parts[name])
        elements = sum(e for _, e in self.zero_fraction_parts[name])
        return zeros.double() / elements


# --- models ---------------------------------------------------------------------------------


def conv_bn_relu_sequential():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    )


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.conv3, self.bn3 = nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x)).relu().mean((2, 3))


class ReusedReLU(Functional):
    """Functional's layers, with one in-place ReLU module called three times."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.relu(self.bn3(self.conv3(x)))


class Mixed(nn.Module):
    """Every kind of hook point: a shared in-place ReLU module (BN, conv and linear inputs) and a
    functional relu after BN."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.conv3 = nn.Conv2d(5, 4, 3)
        self.fc = nn.Linear(4, 7)
        self.head = nn.Linear(7, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.conv3(x)).mean((2, 3))
        return self.head(self.relu(self.fc(x)))


MIXED_POINTS = {"bn1": ("relu", 0, False), "bn2": ("bn2", 0, True), "conv3": ("relu", 1, False), "fc": ("relu", 2, False)}


def make_mixed():
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():  # dead channels in every feature, so the dead masks are not all False
        model.bn1.weight[:2] = 0
        model.bn1.bias[:2] = -1
        model.bn2.weight[1] = 0
        model.bn2.bias[1] = -0.5
        model.conv3.weight[2] = 0
        model.conv3.bias[2] = -1
        model.fc.weight[3] = 0
        model.fc.bias[3] = -1
    return model


def train_steps(model, batches, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for x in batches:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def batches(count, shape=(4, 3, 8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(count)]


def summary(features):
    return [(f.name, f.kind, f.relu_target, f.bn_module_name, f.layer_module_name, f.call_index, f.functional)
            for f in features]


# --- feature discovery ----------------------------------------------------------------------


def test_features_sequential_conv_bn_relu():
    assert summary(find_features(conv_bn_relu_sequential())) == [
        ("1", "bn", "2", "1", "0", 0, False),
        ("4", "bn", "5", "4", "3", 0, False),
    ]


def test_features_functional_relu_hooks_the_producer():
    features = find_features(Functional())
    assert summary(features) == [
        ("bn1", "bn", "F.relu", "bn1", "conv1", 0, True),
        ("bn2", "bn", "torch.relu", "bn2", "conv2", 0, True),
        ("bn3", "bn", "Tensor.relu", "bn3", "conv3", 0, True),
    ]
    assert [f.hook_module_name for f in features] == ["bn1", "bn2", "bn3"]


def test_features_reused_relu_module_has_one_feature_per_call():
    assert summary(find_features(ReusedReLU())) == [
        ("bn1", "bn", "relu", "bn1", "conv1", 0, False),
        ("bn2", "bn", "relu", "bn2", "conv2", 1, False),
        ("bn3", "bn", "relu", "bn3", "conv3", 2, False),
    ]


def test_features_conv_and_linear_without_bn():
    assert summary(find_features(Mixed())) == [
        ("bn1", "bn", "relu", "bn1", "conv1", 0, False),
        ("bn2", "bn", "F.relu", "bn2", "conv2", 0, True),
        ("conv3", "conv", "relu", None, "conv3", 1, False),
        ("fc", "linear", "relu", None, "fc", 2, False),
    ]


def test_features_use_the_unit_container_name():
    class Unit(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(cin, cout, 3), nn.BatchNorm2d(cout), nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)))

    model = nn.Sequential()
    model.add_module("features", nn.Sequential())
    model.features.add_module("c1", Unit(1, 2))
    model.features.add_module("c2", Unit(2, 3))
    assert [f.name for f in find_features(model)] == ["features.c1", "features.c2"]


def test_features_torchvision_resnet18():
    features = find_features(torchvision.models.resnet18(num_classes=10))
    assert len(features) == 17  # the stem + 2 per BasicBlock x 8 blocks
    assert features[0].name == "bn1" and features[0].relu_target == "relu"
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    expected = [("bn1", "bn", "relu", "bn1", "conv1", 0, False)]
    for b in blocks:
        expected.append((f"{b}.bn1", "bn", f"{b}.relu", f"{b}.bn1", f"{b}.conv1", 0, False))
        expected.append((f"{b}.residual", "residual", f"{b}.relu", f"{b}.bn2", f"{b}.conv2", 1, False))
    assert summary(features) == expected


def test_features_torchvision_mobilenet_v2_relu6():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    features = find_features(model)
    relu6_modules = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU6)]
    # 1 stem + 1 (block 1, no expansion) + 2 x 16 blocks + 1 last conv; no ReLU after the adds.
    assert len(features) == len(relu6_modules) == 35
    assert [f.relu_target for f in features] == relu6_modules
    assert {f.activation for f in features} == {"relu6"} and {f.kind for f in features} == {"bn"}
    assert features[0].name == "features.0" and features[0].bn_module_name == "features.0.1"


def test_features_torchvision_densenet_preactivation_and_final_functional_relu():
    model = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2)
    features = find_features(model)
    # stem + 2 blocks x 2 layers x (norm1, norm2) + 1 transition + the final F.relu(norm5)
    assert len(features) == 1 + 8 + 1 + 1
    layer = "features.denseblock1.denselayer1"
    assert summary(features[1:3]) == [
        (f"{layer}.norm1", "bn", f"{layer}.relu1", f"{layer}.norm1", None, 0, False),  # BN of a concatenation
        (f"{layer}.norm2", "bn", f"{layer}.relu2", f"{layer}.norm2", f"{layer}.conv1", 0, False),
    ]
    assert summary(features[-1:]) == [("features.norm5", "bn", "F.relu", "features.norm5", None, 0, True)]


def test_features_skip_repeated_and_unhookable_relus():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = F.relu(F.relu(self.bn(self.conv(x))))  # the second relu is the same feature
            return F.relu(y + x)  # not a module output: cannot be hooked

    with pytest.warns(RuntimeWarning, match="not the output of a module"):
        features = find_features(Odd())
    assert summary(features) == [("bn", "bn", "F.relu", "bn", "conv", 0, True)]


def test_features_fused_bn_relu_module_is_a_feature():
    from sparsekern.ops.bn_relu import FusedBNReLU

    model = nn.Sequential(nn.Conv2d(3, 4, 3), FusedBNReLU(torch.ones(4), torch.tensor([-0.1, -9.0, 0.2, 0.0])))
    assert summary(find_features(model)) == [("1", "bn", "1", "1", "0", 0, False)]
    tracker = SparsityTracker(model, selectivity="none")
    x = batches(1)[0]
    with torch.no_grad():
        out = model(x)
    assert torch.equal(tracker.stats["1"].corpus_max, out.abs().amax(dim=(0, 2, 3)))


def test_features_transposed_convs_produce_features():
    """A transposed conv makes its output channels like any conv: it is the layer of its feature."""
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.ConvTranspose2d(4, 5, 3),
                          nn.ReLU())
    assert summary(find_features(model)) == [("1", "bn", "2", "1", "0", 0, False),
                                             ("3", "conv", "4", None, "3", 0, False)]


def sync_and_plain_bn_models():
    """Conv -> BN -> ReLU twice over: with a BatchNorm2d, and with a SyncBatchNorm of the same
    parameters and running statistics; channels 0 and 2 dead (gamma = 0, beta = -1). Eval mode:
    there a SyncBatchNorm normalises with its running statistics, no process group needed."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    randomize_bn(plain)
    make_constant(plain[1], [0, 2], -1.0)
    sync = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SyncBatchNorm(4), nn.ReLU())
    sync.load_state_dict(plain.state_dict())
    return plain.eval(), sync.eval()


def test_sync_batch_norm_is_measured_like_batch_norm2d():
    plain, sync = sync_and_plain_bn_models()
    assert summary(find_features(sync)) == summary(find_features(plain)) == [("1", "bn", "2", "1", "0", 0, False)]
    ref = ReferenceHooks(sync, {"1": ("2", 0, False)})
    with SparsityTracker(plain, selectivity="exact") as a, SparsityTracker(sync, selectivity="exact") as b:
        with torch.no_grad():
            for x in batches(3):
                assert torch.equal(sync(x), plain(x))
    ref.remove()
    assert torch.equal(b.stats["1"].dead_mask(), ref.corpus_max("1") < 1e-12)
    assert b.stats["1"].dead_mask().tolist() == [True, False, True, False]
    report = b.report()
    assert report.layer("1").inactive_by_activation[1e-12] == 2 and report.layer("1").inactive_by_gamma[1e-3] == 2
    assert report.to_dict() == a.report().to_dict()
    assert gamma_sparsity(sync).to_dict() == gamma_sparsity(plain).to_dict()


def test_layer_sparsity_is_the_row_of_a_report_and_its_old_name_warns():
    report = gamma_sparsity(make_two_layer())
    assert all(isinstance(layer, LayerSparsity) for layer in report.layers)
    with pytest.warns(DeprecationWarning, match="report_table.LayerReport is deprecated.*LayerSparsity"):
        from sparsekern.stats.report_table import LayerReport
    assert LayerReport is LayerSparsity


def test_find_features_does_not_modify_the_model():
    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_features(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_find_features_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        find_features(lambda x: x)


class Dynamic(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 5, 3, padding=1), nn.ReLU()

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        if x.mean() > 0:
            x = x * 2
        x = self.relu2(self.conv2(x))
        return self.relu2(x - 0.5)  # a second call of relu2


def test_fallback_without_graph_measures_every_call():
    torch.manual_seed(0)
    model = Dynamic()
    with pytest.warns(RuntimeWarning, match="could not trace Dynamic"):
        features = find_features(model)
    assert summary(features) == [
        ("bn1", "bn", "relu1", "bn1", "conv1", None, False),
        ("conv2", "conv", "relu2", None, "conv2", None, False),
    ]
    ref = ReferenceHooks(model, {"bn1": ("relu1", 0, False), "conv2": ("relu2", 0, False),
                                 "relu2:1": ("relu2", 1, False)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tracker = SparsityTracker(model, selectivity="exact")
    for x in batches(2):
        model(x)
    assert [f.name for f in tracker.features] == ["bn1", "conv2", "relu2:1"]
    assert tracker.features[2].kind == "other" and tracker.features[2].call_index == 1
    for name in ref.points:
        assert torch.equal(tracker.stats[name].corpus_max.double(), ref.corpus_max(name))
        assert torch.equal(tracker.stats[name].selectivity().value, ref.selectivity(name))
    # A fresh tracker has made no per-call features yet; loading a state recreates them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fresh = SparsityTracker(model, selectivity="exact")
    assert fresh.features == []
    fresh.load_state_dict(tracker.state_dict())
    assert fresh.features == tracker.features
    assert fresh.report().to_dict() == tracker.report().to_dict()


# --- tracker against the reference ----------------------------------------------------------


def test_tracker_matches_float64_reference_in_training():
    model = make_mixed().train()
    ref = ReferenceHooks(model, MIXED_POINTS)
    tracker = SparsityTracker(model, selectivity="exact")
    train_steps(model, batches(5))
    assert [f.name for f in tracker.features] == list(MIXED_POINTS)
    dead_somewhere = 0
    for name in MIXED_POINTS:
        s = tracker.stats[name]
        assert s.num_samples == 20
        assert torch.equal(s.corpus_max.double(), ref.corpus_max(name)), name
        for t in (1e-12, 1e-4):
            assert torch.equal(s.dead_mask(t), ref.corpus_max(name) < t), name
        sel = s.selectivity(1e-3)
        assert sel.exact and torch.equal(sel.value, ref.selectivity(name)), name
        torch.testing.assert_close(s.apoz(), ref.apoz(name), rtol=0, atol=1e-12)
        dead_somewhere += int(s.dead_mask().sum())
    assert dead_somewhere >= 5  # the channels killed in make_mixed


def test_tracker_histogram_mode_is_within_its_error_bound():
    model = make_mixed().train()
    ref = ReferenceHooks(model, MIXED_POINTS)
    tracker = SparsityTracker(model)  # default: histogram
    train_steps(model, batches(4))
    for name in MIXED_POINTS:
        sel = tracker.stats[name].selectivity(1e-3)
        assert sel.mode == "histogram"
        assert bool(((sel.value - ref.selectivity(name)).abs() <= sel.error_bound + 1e-12).all()), name


def test_tracker_every_k_measures_only_those_steps():
    model = make_mixed().train()
    data = batches(5)
    ref = ReferenceHooks(model, MIXED_POINTS)
    tracker = SparsityTracker(model, selectivity="exact", every=2)
    train_steps(model, data)  # steps 0, 2, 4 measured
    measured = [0, 2, 4]
    for name in MIXED_POINTS:
        expected = torch.cat([ref.maxima[name][i] for i in measured]).amax(dim=0)
        assert tracker.stats[name].num_samples == 4 * len(measured)
        assert torch.equal(tracker.stats[name].corpus_max.double(), expected)


def test_tracker_manual_step_replaces_forward_counting():
    model = make_mixed().eval()
    data = batches(4)
    tracker = SparsityTracker(model, selectivity="none", every=2)
    with torch.no_grad():
        tracker.step()  # step 1: not measured, and forwards no longer count
        model(data[0])
        model(data[1])
        assert tracker.stats["bn1"].num_samples == 0
        tracker.step()  # step 2: measured
        model(data[2])
        model(data[3])
    assert tracker.steps == 2
    assert tracker.stats["bn1"].num_samples == 8


def test_tracker_reset_remove_and_context_manager():
    model = make_mixed().eval()
    data = batches(3)
    with torch.no_grad():
        with SparsityTracker(model, selectivity="none") as tracker:
            model(data[0])
            tracker.reset()
            assert all(s.num_samples == 0 for s in tracker.stats.values())
            model(data[1])
        model(data[2])  # after the context: not measured
    assert all(s.num_samples == 4 for s in tracker.stats.values())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    ref = ReferenceHooks(model, MIXED_POINTS)
    with torch.no_grad():
        model(data[1])
    for name in MIXED_POINTS:
        assert torch.equal(tracker.stats[name].corpus_max.double(), ref.corpus_max(name))


def test_tracker_does_not_change_the_forward():
    model = make_mixed().eval()
    x = batches(1)[0]
    with torch.no_grad():
        expected = model(x)
        with SparsityTracker(model, selectivity="exact"):
            got = model(x)
    assert torch.equal(got, expected)


def test_tracker_state_dict_round_trip():
    model = make_mixed().train()
    tracker = SparsityTracker(model, selectivity="exact")
    train_steps(model, batches(3))
    state = tracker.state_dict()
    tracker.remove()
    other = SparsityTracker(model, selectivity="exact")
    other.load_state_dict(state)
    assert other.steps == 3
    assert other.report().to_dict() == tracker.report().to_dict()


def test_tracker_on_resnet18_counts_both_calls_of_the_block_relu():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
    block = "layer2.0"
    ref = ReferenceHooks(model, {f"{block}.bn1": (f"{block}.relu", 0, False),
                                 f"{block}.residual": (f"{block}.relu", 1, False)})
    tracker = SparsityTracker(model, selectivity="exact")
    with torch.no_grad():  # train mode (batch statistics), without the cost of an optimizer step
        for x in batches(2, shape=(2, 1, 16, 16)):
            model.train()(x)
    for name in ref.points:
        assert torch.equal(tracker.stats[name].corpus_max.double(), ref.corpus_max(name))
        assert torch.equal(tracker.stats[name].selectivity().value, ref.selectivity(name))


def test_tracker_rejects_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        SparsityTracker("model")
    with pytest.raises(ValueError, match="every"):
        SparsityTracker(make_mixed(), every=0)
    with pytest.raises(ValueError, match="selectivity mode"):
        SparsityTracker(make_mixed(), selectivity="approximate")
    with pytest.raises(ValueError, match="no ReLU"):
        SparsityTracker(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    bogus = Feature("x", "nope", None, None, None, "other", 0)
    with pytest.raises(ValueError, match="does not have"):
        SparsityTracker(make_mixed(), features=[bogus])
    with pytest.raises(ValueError, match="kind must be one of"):
        Feature("x", "relu", None, None, None, "attention", 0)


def test_tracker_reports_nan_channels_instead_of_calling_them_dead():
    model = make_mixed().eval()
    tracker = SparsityTracker(model, selectivity="exact")
    x = batches(1)[0]
    x[0, 0, 4, 4] = float("nan")
    with torch.no_grad():
        model(x)
    layer = tracker.report().layer("bn1")
    # conv1 spreads the NaN into every channel, and gamma = 0 does not stop it (0 * NaN = NaN).
    nan = tracker.stats["bn1"].nan_mask()
    assert bool(nan.all())
    assert layer.nonfinite_channels == int(nan.sum()) > 0
    assert layer.inactive_by_activation[1e-12] == int((tracker.stats["bn1"].dead_mask(on_nan="exclude")).sum())
    assert not bool((tracker.stats["bn1"].dead_mask(on_nan="exclude") & nan).any())


def test_tracker_report_table_shows_nan_channels_and_warns():
    model = make_two_layer().eval()
    with torch.no_grad():
        model.bn2.bias[1] = float("nan")  # one channel of bn2; fc averages it into all of its outputs
    points = {"bn1": ("relu1", 0, False), "bn2": ("relu2", 0, False), "fc": ("relu3", 0, False)}
    ref = ReferenceHooks(model, points)
    tracker = SparsityTracker(model, selectivity="exact")
    with torch.no_grad():
        model(batches(1, shape=(2, 3, 8, 8))[0])
    expected = {name: int((~torch.isfinite(ref.m(name))).any(dim=0).sum()) for name in points}
    assert expected == {"bn1": 0, "bn2": 1, "fc": 6}
    report = tracker.report()
    text, markdown = str(report), report.to_markdown()
    header = text.splitlines()[0].split()
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:] if line and not line.startswith("-")}
    column = header.index("NaN/Inf")
    for name, count in expected.items():
        assert rows[name][column] == str(count) and report.layer(name).nonfinite_channels == count
    assert rows["total"][column - 2] == "7" and report.totals["nonfinite_channels"] == 7
    warning = "WARNING: 7 channels in 2 layers (bn2, fc) had NaN/Inf activations; they are neither dead nor active"
    assert text.splitlines()[-1].startswith(warning) and warning in markdown
    # Without non-finite channels there is no warning line.
    clean = make_two_layer().eval()
    with SparsityTracker(clean, selectivity="none") as t:
        with torch.no_grad():
            clean(batches(1, shape=(2, 3, 8, 8))[0])
    assert "WARNING" not in str(t.report()) and str(t.report()).splitlines()[-1].startswith("total")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tracker_adds_no_host_synchronisation_on_cuda():
    model = make_mixed().cuda().train()
    tracker = SparsityTracker(model, selectivity="histogram")
    data = [x.cuda() for x in batches(3)]
    ref = ReferenceHooks(model, MIXED_POINTS)
    model(data[0])  # the first call allocates the accumulators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in data[1:]:
            model(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name in MIXED_POINTS:
        assert tracker.stats[name].num_samples == 12
        assert torch.equal(tracker.stats[name].corpus_max.double(), ref.corpus_max(name))


# --- report -------------------------------------------------------------------------------


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.fc, self.relu3 = nn.Linear(4, 6), nn.ReLU()

    def forward(self, x):
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.relu3(self.fc(x.mean((2, 3))))


# Per channel of bn1: (gamma, beta) and what follows in train-mode BN, where |x_hat| <= sqrt(M - 1)
# < 23 for M = 2 x 8 x 8... elements, so 5e-3 * x_hat - 1 < 0 always:
#   ch  gamma   beta   dead@1e-12 dead@1e-4 |g|<1e-3 |g|<1e-2  output
#   0   0       -1     yes        yes       yes      yes       0
#   1   0       0.5    -          -         yes      yes       0.5 everywhere (selectivity 0)
#   2   5e-4    -1     yes        yes       yes      yes       0
#   3   -5e-4   -1     yes        yes       yes      yes       0
#   4   5e-3    -1     yes        yes       -        yes       0
#   5   0       1e-6   -          yes       yes      yes       1e-6 everywhere
#   6,7 1       0      -          -         -        -         data dependent
BN1_GAMMA = [0.0, 0.0, 5e-4, -5e-4, 5e-3, 0.0, 1.0, 1.0]
BN1_BETA = [-1.0, 0.5, -1.0, -1.0, -1.0, 1e-6, 0.0, 0.0]


def make_two_layer():
    torch.manual_seed(0)
    model = TwoLayer()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor(BN1_GAMMA))
        model.bn1.bias.copy_(torch.tensor(BN1_BETA))
    return model


def test_report_numbers_equal_hand_computed_ones():
    model = make_two_layer().train()
    ref = ReferenceHooks(model, {"bn1": ("relu1", 0, False), "bn2": ("relu2", 0, False), "fc": ("relu3", 0, False)})
    tracker = SparsityTracker(model, selectivity="exact")
    with torch.no_grad():
        for x in batches(3, shape=(2, 3, 8, 8)):
            model(x)
    report = tracker.report(activation_thresholds=(1e-12, 1e-4), gamma_thresholds=(1e-3, 1e-2))
    assert [l.name for l in report.layers] == ["bn1", "bn2", "fc"]

    l1 = report.layer("bn1")
    assert (l1.channels, l1.num_samples, l1.nonfinite_channels) == (8, 6, 0)
    assert l1.inactive_by_activation == {1e-12: 4, 1e-4: 5}
    assert l1.inactive_by_gamma == {1e-3: 5, 1e-2: 6}
    f32 = lambda v: float(torch.tensor(v))  # noqa: E731  (the parameters are float32)
    # sorted gammas: -5e-4, 0, 0, 0, 5e-4, 5e-3, 1, 1 -> median (0 + 5e-4) / 2
    assert l1.gamma == {"min": f32(-5e-4), "median": f32(5e-4) / 2, "max": 1.0}
    # sorted betas: -1, -1, -1, -1, 0, 0, 1e-6, 0.5 -> median (-1 + 0) / 2
    assert l1.beta == {"min": -1.0, "median": -0.5, "max": 0.5}
    # Selectivity over the live channels 1, 5, 6, 7 (1 and 5 are constant: selectivity 0).
    live_sel = ref.selectivity("bn1")[[1, 5, 6, 7]]
    assert live_sel[0] == 0 and live_sel[1] == 0
    sel = l1.selectivity
    assert (sel["live_channels"], sel["mode"], sel["exact"], sel["max_error_bound"]) == (4, "exact", True, 0.0)
    assert sel["mean"] == pytest.approx(live_sel.mean().item(), abs=1e-15)
    assert sel["quantiles"]["median"] == pytest.approx(torch.quantile(live_sel, 0.5).item(), abs=1e-15)
    assert sum(sel["histogram"]) == 4 and sel["histogram"][0] >= 2
    # APoZ: 1 for the dead channels 0, 2, 3, 4; 0 for the constant ones 1, 5.
    apoz = ref.apoz("bn1")
    assert apoz[[0, 2, 3, 4]].tolist() == [1.0] * 4 and apoz[[1, 5]].tolist() == [0.0, 0.0]
    assert l1.apoz_mean == pytest.approx(apoz.mean().item(), abs=1e-15)

    l2, l3 = report.layer("bn2"), report.layer("fc")
    assert l2.inactive_by_gamma == {1e-3: 0, 1e-2: 0}
    assert l2.inactive_by_activation == {t: int((ref.corpus_max("bn2") < t).sum()) for t in (1e-12, 1e-4)}
    assert l3.kind == "linear" and l3.inactive_by_gamma is None and l3.gamma is None
    assert l3.inactive_by_activation[1e-12] == int((ref.corpus_max("fc") < 1e-12).sum())

    totals = report.totals
    assert totals["channels"] == 8 + 4 + 6 and totals["channels_with_gamma"] == 8 + 4
    assert totals["inactive_by_gamma"] == {1e-3: 5, 1e-2: 6}
    assert totals["inactive_by_activation"] == {
        t: sum(l.inactive_by_activation[t] for l in (l1, l2, l3)) for t in (1e-12, 1e-4)
    }

    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["layers"][0]["inactive_by_gamma"] == [
        {"threshold": 1e-3, "count": 5, "percent": 62.5}, {"threshold": 1e-2, "count": 6, "percent": 75.0}
    ]
    assert as_dict["totals"]["inactive_by_gamma"][0] == {"threshold": 1e-3, "count": 5, "percent": 100 * 5 / 12}

    text, markdown = str(report), report.to_markdown()
    assert "62.5% (5)" in text and "75.0% (6)" in text and "50.0% (4)" in text
    rows = [line for line in markdown.splitlines() if line.startswith("| bn1 ")]
    assert len(rows) == 1 and "62.5% (5)" in rows[0]
    assert markdown.splitlines()[-1].startswith("| total ")
    assert all(line.count("|") - line.count("\\|") == markdown.splitlines()[0].count("|")
               - markdown.splitlines()[0].count("\\|") for line in markdown.splitlines())


def test_report_without_selectivity_and_before_data():
    model = make_two_layer()
    tracker = SparsityTracker(model, selectivity="none")
    empty = tracker.report()
    assert empty.layer("bn1").inactive_by_activation is None and empty.layer("bn1").inactive_by_gamma == {
        1e-3: 5, 1e-2: 6}
    with torch.no_grad():
        model.eval()(batches(1)[0])
    assert tracker.report().layer("bn1").selectivity is None
    with pytest.raises(ValueError, match="activation_thresholds"):
        tracker.report(activation_thresholds=(-1.0,))


def test_report_residual_features_have_no_gamma_inactivity():
    model = torchvision.models.resnet18(num_classes=10)
    tracker = SparsityTracker(model, selectivity="none")
    report = tracker.report()
    residual = report.layer("layer1.0.residual")
    assert residual.inactive_by_gamma is None and residual.gamma is not None
    assert report.layer("layer1.0.bn1").inactive_by_gamma == {1e-3: 0, 1e-2: 0}


def test_gamma_sparsity_reads_every_bn_without_data():
    model = make_two_layer()
    report = gamma_sparsity(model, thresholds=(1e-3, 1e-2))
    assert [l.name for l in report.layers] == ["bn1", "bn2"]
    assert report.layer("bn1").inactive_by_gamma == {1e-3: 5, 1e-2: 6}
    assert report.totals["inactive_by_gamma"] == {1e-3: 5, 1e-2: 6}
    assert report.totals["channels_with_gamma"] == 12
    assert "41.7% (5)" in str(report)  # 5 of 12 channels
    with pytest.raises(ValueError, match="no BatchNorm"):
        gamma_sparsity(nn.Linear(2, 2))
