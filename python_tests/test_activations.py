"""Features for any elementwise activation after a norm (issue 13, item 1): every activation as a
module and as a functional is found with its name, norm-act modules are kind "bn" features of
their own BN, timm CNNs (EfficientNet, MobileNetV3, CSPNet, ConvNeXt) get features and a report,
and "constant by activation" finds a planted constant channel (gamma = 0 before SiLU), checked
against forward hooks (an independent reference), whatever the CPU's rounding.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsekern._types import register_activation, register_norm_act
from sparsekern.stats.channel_stats import ChannelStats
from sparsekern.stats.features import Feature, find_features
from sparsekern.stats.tracker import SparsityTracker

# (module, functional call, report name)
ACTIVATIONS = [
    (nn.ReLU(), lambda x: F.relu(x), "relu"),
    (nn.ReLU6(), lambda x: F.relu6(x), "relu6"),
    (nn.LeakyReLU(0.2), lambda x: F.leaky_relu(x, 0.2), "leaky_relu"),
    (nn.Hardswish(), lambda x: F.hardswish(x), "hardswish"),
    (nn.SiLU(), lambda x: F.silu(x), "silu"),
    (nn.GELU(), lambda x: F.gelu(x, approximate="tanh"), "gelu"),
    (nn.Mish(), lambda x: F.mish(x), "mish"),
    (nn.ELU(0.5), lambda x: F.elu(x, alpha=0.5), "elu"),
    (nn.Hardtanh(-0.5, 0.5), lambda x: F.hardtanh(x, -0.5, 0.5), "hardtanh"),
]
IN_PLACE = [
    (lambda x: F.relu_(x), "relu"), (lambda x: torch.relu_(x), "relu"), (lambda x: x.relu_(), "relu"),
    (lambda x: x.relu(), "relu"), (lambda x: F.silu(x, inplace=True), "silu"),
    (lambda x: F.leaky_relu_(x, 0.1), "leaky_relu"), (lambda x: F.hardtanh_(x, -1.0, 2.0), "hardtanh"),
    (lambda x: F.elu_(x), "elu"), (lambda x: F.hardswish(x, inplace=True), "hardswish"),
]


class ModuleNet(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = act
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))).mean((2, 3)))


class FunctionalNet(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.bn(self.conv(x))).mean((2, 3))


def hooked(model, name, x, fn=None):
    """Independent reference: the output of module ``name`` (through ``fn`` if given) for input x."""
    seen = {}

    def hook(module, args, out):  # returns None: a hook's return value would replace the output
        seen.setdefault("y", out.detach().clone())

    handle = model.get_submodule(name).register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["y"] if fn is None else fn(seen["y"].clone())


def measured(model, x, **kwargs):
    model.eval()
    with SparsityTracker(model, selectivity="none", **kwargs) as tracker:
        with torch.no_grad():
            model(x)
    return tracker


@pytest.mark.parametrize("act, fn, name", ACTIVATIONS, ids=[a[2] for a in ACTIVATIONS])
def test_module_activation_is_a_bn_feature(act, fn, name):
    model = ModuleNet(act).eval()
    [f] = find_features(model)
    assert (f.kind, f.activation, f.relu_target, f.bn_module_name, f.layer_module_name, f.functional) == \
        ("bn", name, "act", "bn", "conv", False)
    x = torch.randn(4, 3, 8, 8)
    tracker = measured(model, x)
    y = hooked(model, "act", x)
    s = tracker.stats[f.name]
    assert torch.equal(s.corpus_max, y.abs().amax((0, 2, 3)))
    assert torch.equal(s.value_min, y.amin((0, 2, 3))) and torch.equal(s.value_max, y.amax((0, 2, 3)))
    assert tracker.report().layer(f.name).activation == name


@pytest.mark.parametrize("act, fn, name", ACTIVATIONS, ids=[a[2] for a in ACTIVATIONS])
def test_functional_activation_is_measured_with_its_arguments(act, fn, name):
    model = FunctionalNet(fn).eval()
    [f] = find_features(model)
    assert (f.kind, f.activation, f.functional, f.producer_module_name, f.bn_module_name) == ("bn", name, True, "bn", "bn")
    x = torch.randn(4, 3, 8, 8)
    tracker = measured(model, x)
    y = hooked(model, "bn", x, fn)  # the reference applies the model's own call, arguments and all
    s = tracker.stats[f.name]
    assert torch.equal(s.corpus_max, y.abs().amax((0, 2, 3)))
    assert torch.equal(s.value_min, y.amin((0, 2, 3))) and torch.equal(s.value_max, y.amax((0, 2, 3)))
    assert tracker.report().to_dict()["layers"][0]["activation"] == name


@pytest.mark.parametrize("fn, name", IN_PLACE, ids=[f"{n}-{i}" for i, (_, n) in enumerate(IN_PLACE)])
def test_in_place_forms_and_tensor_methods(fn, name):
    model = FunctionalNet(fn).eval()
    [f] = find_features(model)
    assert (f.activation, f.functional, f.bn_module_name) == (name, True, "bn")
    assert all(k != "inplace" for k, _ in f.activation_args)
    x = torch.randn(3, 3, 6, 6)
    tracker = measured(model, x)
    y = hooked(model, "bn", x, fn)
    assert torch.equal(tracker.stats[f.name].value_max, y.amax((0, 2, 3)))


def test_gates_are_not_features():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gate, self.t, self.hs = nn.Conv2d(3, 4, 1), nn.Sigmoid(), nn.Tanh(), nn.Hardsigmoid()

        def forward(self, x):
            y = self.conv(x)
            return y * self.gate(y) + self.t(y) * self.hs(y) + torch.sigmoid(y)

    assert find_features(Gated()) == []
    with pytest.raises(ValueError, match="no activation feature to measure"):
        SparsityTracker(Gated())


def test_registered_activation_class():
    class MySwish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    register_activation(MySwish, "silu")
    [f] = find_features(ModuleNet(MySwish()))
    assert (f.activation, f.kind, f.relu_target) == ("silu", "bn", "act")
    with pytest.raises(TypeError, match="not an nn.Module subclass"):
        register_activation(int, "x")
    with pytest.raises(ValueError, match="short identifier"):
        register_activation(MySwish, "not a name")


class BNAct(nn.BatchNorm2d):
    """A user's norm-then-activation module (registered below)."""

    def __init__(self, c, act):
        super().__init__(c)
        self.act = act

    def forward(self, x):
        return self.act(super().forward(x))


register_norm_act(BNAct)


class NormActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 5, 3, padding=1), BNAct(5, nn.SiLU())
        self.conv2, self.bn2 = nn.Conv2d(5, 5, 3, padding=1), BNAct(5, nn.Identity())
        self.act2 = nn.Hardswish()

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))


def test_norm_act_module_is_a_bn_feature_of_itself():
    features = find_features(NormActNet())
    assert [(f.relu_target, f.kind, f.bn_module_name, f.layer_module_name, f.activation) for f in features] == [
        ("bn1", "bn", "bn1", "conv1", "silu"),  # the norm-act module is the feature, its BN itself
        ("act2", "bn", "bn2", "conv2", "hardswish"),  # an identity activation: a plain BN
    ]
    model = NormActNet().eval()
    x = torch.randn(2, 3, 7, 7)
    tracker = measured(model, x)
    y = hooked(model, "bn1", x)
    assert torch.equal(tracker.stats[features[0].name].value_min, y.amin((0, 2, 3)))
    report = tracker.report()
    assert report.layer(features[0].name).gamma is not None  # gamma read from the norm-act module


def test_fallback_hooks_norm_act_modules_once_and_names_the_failing_module():
    class Dynamic(NormActNet):
        def forward(self, x):
            x = self.bn1(self.conv1(x))
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                x = x + 1
            return self.act2(self.bn2(self.conv2(x)))

    with pytest.warns(RuntimeWarning, match="could not trace Dynamic.*leaf_modules"):
        features = find_features(Dynamic())
    assert [(f.relu_target, f.kind, f.bn_module_name, f.activation) for f in features] == [
        ("bn1", "bn", "bn1", "silu"), ("act2", "bn", "bn2", "hardswish")]  # bn1.act is not a second feature


def test_leaf_modules_reach_the_tracer():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.odd, self.act = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), Branchy(), nn.GELU()

        def forward(self, x):
            return self.act(self.odd(self.bn(self.conv(x))))

    with pytest.warns(RuntimeWarning, match=r"inside module 'odd' \(Branchy\).*leaf_modules=\['odd'\]"):
        find_features(Net())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [f] = find_features(Net(), leaf_modules=["odd"])
        assert (f.kind, f.producer_module_name, f.activation) == ("other", "odd", "gelu")
        [f] = find_features(Net(), leaf_modules=[Branchy])
        tracker = measured(Net(), torch.randn(2, 3, 4, 4), leaf_modules=[Branchy])
    assert list(tracker.stats) == [f.name]
    with pytest.raises(TypeError, match="leaf_modules: expected module classes or qualified module names"):
        find_features(Net(), leaf_modules=[3])


def test_linear_on_channels_last_measures_the_last_dim():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc1, self.act = nn.LayerNorm(6), nn.Linear(6, 10), nn.GELU()

        def forward(self, x):  # (N, C, H, W) -> channels last -> MLP
            return self.act(self.fc1(self.norm(x.permute(0, 2, 3, 1))))

    model = Mlp().eval()
    [f] = find_features(model)
    assert (f.kind, f.layer_module_name, f.channel_dim) == ("linear", "fc1", -1)
    x = torch.randn(2, 6, 5, 4)
    tracker = measured(model, x)
    y = hooked(model, "act", x)
    s = tracker.stats[f.name]
    assert s.num_channels == 10 and torch.equal(s.value_max, y.amax((0, 1, 2)))


def test_feature_validation_is_one_clear_line():
    base = dict(name="a", relu_target="act", producer_module_name="bn", bn_module_name="bn", layer_module_name=None,
                kind="bn", call_index=0)
    with pytest.raises(ValueError, match="activation must be one of .*got 'sigmoid'"):
        Feature(**base, activation="sigmoid")
    with pytest.raises(ValueError, match="prelu' has no functional form"):
        Feature(**base, activation="prelu", functional=True)
    with pytest.raises(ValueError, match="channel_dim must be 1 or -1"):
        Feature(**base, channel_dim=2)
    with pytest.raises(ValueError, match="activation_args must be"):
        Feature(**base, activation_args=(3,))
    # a state dict that went through JSON (lists) gives back the same feature
    f = Feature(**base, activation="leaky_relu", functional=True, activation_args=(("negative_slope", 0.2),))
    assert Feature(**dict(base, activation="leaky_relu", functional=True, activation_args=[["negative_slope", 0.2]])) == f


# --- constant by activation ----------------------------------------------------------------------


def planted_silu_net(constant_channel=2, beta=0.75):
    torch.manual_seed(0)
    model = ModuleNet(nn.SiLU())
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.normal_()
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.weight[constant_channel] = 0.0  # the BN outputs beta, the unit silu(beta), everywhere
        model.bn.bias[constant_channel] = beta
    return model.eval()


def test_constant_by_activation_finds_the_planted_channel():
    model = planted_silu_net()
    batches = [torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    tracker = SparsityTracker(model, selectivity="none")
    with torch.no_grad():
        for x in batches:
            model(x)
    tracker.remove()
    [f] = tracker.features
    s = tracker.stats[f.name]
    # Independent reference: the hooked SiLU output over every batch, and the gamma-based rule.
    ys = torch.cat([hooked(model, "act", x) for x in batches])
    spread = (ys.double().amax((0, 2, 3)) - ys.double().amin((0, 2, 3)))
    assert torch.equal(s.value_range(), spread)
    expected = spread <= 1e-6
    assert expected.tolist() == (model.bn.weight.detach().abs() < 1e-3).tolist()  # only the planted one
    assert torch.equal(s.constant_mask(), expected)
    assert s.value_max[2].item() == pytest.approx(F.silu(torch.tensor(0.75)).item(), rel=1e-6)
    assert not s.dead_mask().any()  # silu(0.75) is no zero: constant, not dead
    layer = tracker.report().layer(f.name)
    assert layer.constant_by_activation == {1e-6: 1} and layer.constant_channels == [2]
    assert layer.inactive_by_gamma[1e-3] == 1
    text = str(tracker.report())
    assert "const<=1e-06" in text.splitlines()[0] and " silu " in text
    totals = tracker.report().to_dict()["totals"]
    assert totals["constant_by_activation"][0]["count"] == 1


def test_constant_holds_whatever_the_cpu_rounding(tmp_path):
    """The same check in a process with torch's scalar kernels and oneDNN limited to SSE4.1: a
    different rounding of SiLU must not change which channels are constant."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, %r)
        from test_activations import planted_silu_net, hooked
        from sparsekern.stats.tracker import SparsityTracker
        model = planted_silu_net()
        x = torch.randn(6, 3, 9, 9, generator=torch.Generator().manual_seed(5))
        with SparsityTracker(model, selectivity="none") as t, torch.no_grad():
            model(x)
        s = next(iter(t.stats.values()))
        y = hooked(model, "act", x).double()
        ref = (y.amax((0, 2, 3)) - y.amin((0, 2, 3))) <= 1e-6
        print(s.constant_mask().tolist() == ref.tolist() == [False, False, True, False, False, False])
    """ % str(__import__("pathlib").Path(__file__).parent))
    import os

    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", DNNL_MAX_CPU_ISA="SSE41")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "True"


def test_constant_mask_errors_and_nonfinite():
    s = ChannelStats(selectivity="none")
    x = torch.randn(4, 3, 5, 5)
    x[:, 1] = 0.25
    x[2, 2, 0, 0] = float("nan")
    s.update(x)
    with pytest.raises(Exception, match="channel 2"):
        s.constant_mask()
    assert s.constant_mask(on_nan="exclude").tolist() == [False, True, False]
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        s.constant_mask(-1.0)
    reduced = ChannelStats(selectivity="none")
    reduced.update_reduced(torch.rand(4, 3))
    with pytest.raises(ValueError, match="4 of 4 samples came through update_reduced"):
        reduced.constant_mask()
    assert reduced.summary()["constant_count"] is None


def test_range_merges_and_survives_a_state_dict():
    x = torch.randn(10, 4, 3, 3)
    x[:, 0] = -2.0
    whole, a, b = (ChannelStats(selectivity="none") for _ in range(3))
    whole.update(x)
    a.update(x[:6])
    b.update(x[6:])
    a.merge(b)
    for s in (a,):
        assert torch.equal(s.value_min, x.amin((0, 2, 3))) and torch.equal(s.value_max, x.amax((0, 2, 3)))
    restored = ChannelStats(selectivity="none")
    restored.load_state_dict(a.state_dict())
    assert torch.equal(restored.value_min, whole.value_min) and torch.equal(restored.constant_mask(), whole.constant_mask())
    assert restored.constant_mask().tolist() == [True, False, False, False]
    assert whole.summary()["constant_count"] == {"1e-06": 1}


# --- timm models ----------------------------------------------------------------------------------

timm = pytest.importorskip("timm")


def timm_report(name: str, size: int = 32, **kwargs):
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    features = find_features(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with SparsityTracker(model, selectivity="none") as tracker, torch.no_grad():
        model(x)
    return model, features, tracker, tracker.report()


def test_efficientnet_b0_silu_norm_act_features():
    model, features, tracker, report = timm_report("efficientnet_b0")
    from timm.layers import BatchNormAct2d

    norm_acts = [n for n, m in model.named_modules() if isinstance(m, BatchNormAct2d) and not isinstance(m.act, nn.Identity)]
    assert [f.relu_target for f in features if f.kind == "bn"] == norm_acts
    assert {f.activation for f in features if f.kind == "bn"} == {"silu"}
    assert all(f.bn_module_name == f.relu_target for f in features if f.kind == "bn")
    # each feature's stats are those of the hooked norm-act output (independent reference)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = hooked(model, norm_acts[3], x)
    s = tracker.stats[next(f.name for f in features if f.relu_target == norm_acts[3])]
    assert torch.equal(s.value_max, y.amax((0, 2, 3))) and torch.equal(s.corpus_max, y.abs().amax((0, 2, 3)))
    assert all(layer.constant_by_activation is not None for layer in report.layers)


def test_mobilenetv3_small_hardswish_and_relu():
    model, features, tracker, report = timm_report("mobilenetv3_small_100")
    acts = {f.activation for f in features}
    assert {"hardswish", "relu"} <= acts  # BNAct hardswish / relu units, SE's ReLU after conv_reduce
    assert "sigmoid" not in acts and all(f.activation != "hard_sigmoid" for f in features)
    assert any(f.kind == "conv" and f.activation == "hardswish" for f in features)  # act2 after conv_head
    assert len(report.layers) == len(features)


def test_cspnet_leaky_relu():
    model, features, tracker, report = timm_report("cspresnet50")
    assert features and {f.activation for f in features} == {"leaky_relu"}
    # ConvNormAct units (norm-act BNs), and act3(drop_path(conv3's BN, no act) + shortcut) residuals
    assert {f.kind for f in features} == {"bn", "residual"}
    assert all(f.bn_module_name is not None for f in features)
    residual = next(f for f in features if f.kind == "residual")
    assert residual.bn_module_name.endswith("conv3.bn") and residual.relu_target.endswith("act3")
    assert report.totals["channels"] == sum(tracker.stats[f.name].num_channels for f in features)


@pytest.mark.parametrize("conv_mlp", [True, False])
def test_convnext_atto_gelu_after_the_mlp_layer(conv_mlp):
    """ConvNeXt: dwconv -> LayerNorm -> fc1 -> GELU -> fc2. The norm is not right before the GELU:
    the feature is the GELU of fc1 (a 1x1 conv, or a Linear on channels-last maps), no BN."""
    model, features, tracker, report = timm_report("convnext_atto", conv_mlp=conv_mlp)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "ConvNeXtBlock"]
    assert [f.layer_module_name for f in features] == [f"{b}.mlp.fc1" for b in blocks]
    assert {f.activation for f in features} == {"gelu"}
    assert {f.kind for f in features} == {"conv" if conv_mlp else "linear"}
    assert all(f.bn_module_name is None for f in features)
    fc1 = model.get_submodule(features[0].layer_module_name)
    width = fc1.out_channels if conv_mlp else fc1.out_features
    assert tracker.stats[features[0].name].num_channels == width
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = hooked(model, features[0].relu_target, x)
    dims = (0, 2, 3) if conv_mlp else (0, 1, 2)
    assert torch.equal(tracker.stats[features[0].name].value_max, y.amax(dims))
    assert all(layer.inactive_by_gamma is None and layer.constant_by_activation is not None for layer in report.layers)
