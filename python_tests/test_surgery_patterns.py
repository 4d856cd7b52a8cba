"""Surgery through the patterns real CNN families use, each exact or kept with its reason.

Every model here is small and hand-written (plus a few real torchvision / timm ones at the end),
in float64, with channels planted in its BatchNorms: gamma = 0 with beta = -1 (dead after a
ReLU) or beta = +0.3 (a constant). Each test checks, on FRESH random inputs (never the example
batch the analysis saw), that the pruned model equals the original model itself (the
independent reference), that exactly the expected channels went (counted from the planting),
and that the planted channels that stay carry the expected cause.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.errors import UnsupportedModelError, UntraceableModelError
from sparsekern.prune import (
    ChannelHandler, PrunePlan, fold_bn, prune_model, register_channel_op, unregister_channel_op,
)

DEAD, CONSTANT = -1.0, 0.3


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, eval, every BN with non-trivial statistics (no channel accidentally constant)."""
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    return model


@torch.no_grad()
def plant(bn: nn.Module, dead=(), constant=(), dead_beta: float = DEAD) -> None:
    bn.weight[list(dead) + list(constant)] = 0.0
    bn.bias[list(dead)] = dead_beta
    bn.bias[list(constant)] = CONSTANT


def fresh(shape, seed: int = 123) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_exact(original: nn.Module, pruned: nn.Module, shape) -> None:
    x = fresh(shape)
    with torch.no_grad():
        ref, out = original.eval()(x), pruned.eval()(x)
    refs, outs = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
    for r, o in zip(refs, outs):
        assert o.shape == r.shape
        assert (o - r).abs().max() <= 1e-10 * max(1.0, float(r.abs().max()))


def prune(model, shape, **options):
    plan = PrunePlan.from_gamma(model, **{k: v for k, v in options.items() if k in ("leaf_modules",)})
    pruned, report = prune_model(model, plan, fresh(shape, seed=0), **options)
    assert_exact(model, pruned, shape)
    return plan, pruned, report


def causes(report, layer) -> set:
    return {why.cause for why in report.layers[layer].kept.values()}


def cbr(cin, cout, k=1, **kw):
    return nn.Sequential(nn.Conv2d(cin, cout, k, **kw), nn.BatchNorm2d(cout), nn.ReLU())


# --- squeeze-excitation -------------------------------------------------------------------------


class SEBlock(nn.Module):
    def __init__(self, c=8, r=4):
        super().__init__()
        self.unit = cbr(3, c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act, self.fc2, self.gate = nn.Conv2d(c, r, 1), nn.ReLU(), nn.Conv2d(r, c, 1), nn.Sigmoid()
        self.out = nn.Conv2d(c, 5, 3, padding=1)

    def forward(self, x):
        x = self.unit(x)
        return self.out(x * self.gate(self.fc2(self.act(self.fc1(self.pool(x))))))


def test_se_gate_dead_channel_goes_with_its_gate_channel_constant_is_kept():
    model = randomize(SEBlock())
    plant(model.unit[1], dead=[1, 4], constant=[6])
    plan, pruned, report = prune(model, (2, 3, 8, 8))
    assert plan.layers["unit.0"].removed == [1, 4, 6]
    assert pruned.unit[0].out_channels == 6 and pruned.fc1.in_channels == 6 and pruned.fc2.out_channels == 6
    assert report.layers["fc2"].removed_gated == 2 and report.layers["unit.0"].removed_dead == 2
    assert causes(report, "unit.0") == {"gated by a non-constant"} and list(report.layers["unit.0"].kept) == [6]
    assert "multiplied by a channel that is not constant" in report.layers["unit.0"].kept[6]


# --- split / chunk / getitem ----------------------------------------------------------------------


class SplitNet(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.unit = cbr(3, 8)
        self.a, self.b = cbr(4, 4), cbr(4, 4)
        self.out = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = self.unit(x)
        parts = torch.split(x, 4, 1) if self.how == "split" else x.chunk(2, dim=1)
        return self.out(torch.cat([self.a(parts[0]), self.b(parts[1])], 1))


@pytest.mark.parametrize("how", ["split", "chunk"])
def test_split_parts_are_mapped_split_input_is_kept(how):
    model = randomize(SplitNet(how))
    plant(model.unit[1], dead=[1])
    plant(model.a[1], dead=[0], constant=[3])
    plant(model.b[1], dead=[2])
    plan, pruned, report = prune(model, (2, 3, 6, 6))
    assert report.requested == 4 and report.removed == 3
    assert (pruned.a[0].out_channels, pruned.b[0].out_channels, pruned.out.in_channels) == (2, 3, 5)
    assert causes(report, "unit.0") == {"split, slice, view or norm over channels"}
    assert how in report.layers["unit.0"].kept[1] and "shift" in report.layers["unit.0"].kept[1]
    assert report.layers["out"].folded_in == 1


class GhostNet(nn.Module):
    """GhostNet's module: cat(primary, cheap(primary))[:, :out] then a 1x1 conv."""

    def __init__(self, stop):
        super().__init__()
        self.stop = stop
        self.primary = cbr(3, 4)
        self.cheap = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU())
        self.out = nn.Conv2d(stop, 5, 1)

    def forward(self, x):
        x1 = self.primary(x)
        return self.out(torch.cat([x1, self.cheap(x1)], 1)[:, :self.stop, :, :])


def test_slice_covering_every_channel_is_an_identity():
    model = randomize(GhostNet(8))
    plant(model.primary[1], dead=[1], constant=[2])
    plan, pruned, report = prune(model, (2, 3, 6, 6))
    # The dead channel goes with the depthwise channel it feeds; the constant one meets zero padding.
    assert report.removed == 1 and pruned.primary[0].out_channels == 3 and pruned.cheap[0].groups == 3
    assert pruned.out.in_channels == 6 and causes(report, "primary.0") == {"not constant"}


def test_partial_channel_slice_keeps_what_it_would_shift():
    model = randomize(GhostNet(6))
    plant(model.primary[1], dead=[1])
    plan, pruned, report = prune(model, (2, 3, 6, 6))
    assert report.removed == 0 and causes(report, "primary.0") == {"split, slice, view or norm over channels"}
    assert "slice of the channel dim" in report.layers["primary.0"].kept[1]


# --- channel shuffle ------------------------------------------------------------------------------


def channel_shuffle(x, groups: int):
    """torchvision's ShuffleNetV2 shuffle."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleNet(nn.Module):
    def __init__(self, module: bool):
        super().__init__()
        self.b1, self.b2 = cbr(3, 4), cbr(3, 4)
        self.shuffle = nn.ChannelShuffle(2) if module else None
        self.out = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = torch.cat([self.b1(x), self.b2(x)], 1)
        return self.out(self.shuffle(x) if self.shuffle is not None else channel_shuffle(x, 2))


@pytest.mark.parametrize("module", [False, True], ids=["view-transpose-view", "nn.ChannelShuffle"])
def test_channel_shuffle_removes_shuffled_pairs_together(module):
    model = randomize(ShuffleNet(module))
    plant(model.b1[1], dead=[1], constant=[3])
    plant(model.b2[1], dead=[1, 2], constant=[3])
    plan, pruned, report = prune(model, (2, 3, 5, 5))
    # Channel i of each half is shuffled next to the other's: 1 and 3 go in pairs, b2's 2 stays.
    assert report.removed == 4 and pruned.b1[0].out_channels == 2 and pruned.b2[0].out_channels == 2
    assert list(report.layers["b2.0"].kept) == [2] and causes(report, "b2.0") == {"tied to kept channels"}
    assert report.layers["out"].folded_in == 2


# --- interpolate, upsample, pad, pooling ----------------------------------------------------------


class ResizeNet(nn.Module):
    def __init__(self, pad_mode):
        super().__init__()
        self.pad_mode = pad_mode
        self.unit = cbr(3, 6)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.pool = nn.MaxPool2d(2, padding=1)
        self.out = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        x = self.pool(self.up(F.interpolate(self.unit(x), scale_factor=2, mode="nearest")))
        return self.out(F.pad(x, (1, 1, 1, 1), mode=self.pad_mode))


@pytest.mark.parametrize("pad_mode, removed", [("constant", 2), ("replicate", 3)])
def test_resize_and_pad_keep_constants_except_zero_padding(pad_mode, removed):
    model = randomize(ResizeNet(pad_mode))
    plant(model.unit[1], dead=[0, 4], constant=[2])
    plan, pruned, report = prune(model, (2, 3, 5, 5))
    assert report.removed == removed and pruned.out.in_channels == 6 - removed
    if pad_mode == "constant":  # zero padding a constant channel makes its borders 0: not constant
        assert plan.layers["unit.0"].removed == [0, 4]  # the pad ends the unit: from_gamma leaves it out
        assert any("channel 2" in n and "not constant" in n for n in plan.notes)
    else:  # replicate padding keeps the constant, folded into the unpadded conv
        assert report.layers["out"].folded_in == 1


# --- many-branch concatenation --------------------------------------------------------------------


class InceptionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList([cbr(3, 4), cbr(3, 5, 3, padding=1), cbr(3, 3, 5, padding=2), cbr(3, 6)])
        self.out = nn.Conv2d(18, 4, 1)

    def forward(self, x):
        return self.out(torch.cat([b(x) for b in self.branches], 1))


def test_many_branch_cat_removes_planted_channels_of_every_branch():
    model = randomize(InceptionNet())
    plants = [([0], [3]), ([1, 4], []), ([], [2]), ([5], [0, 1])]
    for branch, (dead, const) in zip(model.branches, plants):
        plant(branch[1], dead, const)
    plan, pruned, report = prune(model, (2, 3, 6, 6))
    assert report.removed == report.requested == 8 and pruned.out.in_channels == 10
    assert report.layers["out"].folded_in == 4 and not report.kept_by_cause()


# --- grouped convs --------------------------------------------------------------------------------


class GroupedNet(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.unit = cbr(3, 8)
        self.grouped = nn.Sequential(nn.Conv2d(8, 8, k, padding=k // 2, groups=2), nn.BatchNorm2d(8), nn.ReLU())
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.grouped(self.unit(x)))


@pytest.mark.parametrize("k, dead, const, removed, in_after, groups_after, kept", [
    (3, [1, 5], [3], 2, 6, 2, {3: "zero padding"}),               # equal per group; constant meets padding
    (3, [0, 1, 2, 3], [], 4, 4, 1, {}),                          # a whole group
    (3, [1, 2, 5], [], 2, 6, 2, {2: "grouped conv"}),             # 2 vs 1: one kept so the counts agree
    (1, [1, 5], [3, 6], 4, 4, 2, {}),                             # unpadded: constants folded per group
])
def test_grouped_conv_stays_representable(k, dead, const, removed, in_after, groups_after, kept):
    model = randomize(GroupedNet(k))
    plant(model.unit[1], dead, const)
    plan, pruned, report = prune(model, (2, 3, 6, 6))
    conv = pruned.grouped[0]
    assert report.removed == removed and (conv.in_channels, conv.groups) == (in_after, groups_after)
    assert {c: why.cause for c, why in report.layers["unit.0"].kept.items()} == kept
    if groups_after == 1:
        assert conv.out_channels == 4 and pruned.out.in_channels == 4


# --- eval-mode no-ops -----------------------------------------------------------------------------


class ResidualNet(nn.Module):
    def __init__(self, drop: nn.Module):
        super().__init__()
        self.stem = cbr(3, 6)
        self.unit = cbr(6, 8, 3, padding=1)
        self.conv, self.bn = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.drop = drop
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.drop(self.bn(self.conv(self.unit(x)))))


def _drops():
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth
    return [DropPath(0.3), StochasticDepth(0.3, "row"), nn.Dropout(0.3), nn.Identity()]


@pytest.mark.parametrize("index", range(4), ids=["timm DropPath", "torchvision StochasticDepth", "Dropout", "Identity"])
def test_eval_mode_no_ops_let_channels_through(index):
    model = randomize(ResidualNet(_drops()[index]))
    plant(model.unit[1], dead=[0, 5], constant=[2])
    plant(model.stem[1], dead=[1])
    plant(model.bn, dead=[1])  # tied to the stem's channel 1 across the add (its BN output is -1: a constant)
    plan, pruned, report = prune(model, (2, 3, 6, 6))
    assert pruned.unit[0].out_channels == 5 and report.layers["conv"].folded_in == 1
    assert pruned.stem[0].out_channels == 5 and pruned.conv.out_channels == 5 and report.removed == 5


# --- norm-act modules -----------------------------------------------------------------------------


class NormActNet(nn.Module):
    def __init__(self, act):
        super().__init__()
        from timm.layers import BatchNormAct2d
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = BatchNormAct2d(8, act_layer=act)
        self.mid = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = BatchNormAct2d(8, act_layer=act)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.bn2(self.mid(self.bn(self.conv(x)))))


@pytest.mark.parametrize("act, dead_beta", [(nn.SiLU, -1.0), (nn.Hardswish, -3.0), (nn.ReLU, -1.0)])
def test_norm_act_module_is_a_batchnorm_then_its_activation(act, dead_beta):
    model = randomize(NormActNet(act))
    plant(model.bn, dead=[0, 3], constant=[5], dead_beta=dead_beta)
    plan = PrunePlan.from_gamma(model)
    beta = {0: dead_beta, 3: dead_beta, 5: CONSTANT}
    expected = {c: float(act()(torch.tensor(b, dtype=torch.float64))) for c, b in beta.items()}
    assert plan.layers["conv"].removed == [0, 3, 5]
    assert plan.layers["conv"].constants == {c: v for c, v in expected.items() if v != 0.0}
    pruned, report = prune_model(model, plan, fresh((2, 3, 6, 6), seed=0))
    assert_exact(model, pruned, (2, 3, 6, 6))
    # A 0 passes the zero-padded depthwise conv; a nonzero constant does not (its borders differ).
    zero = [c for c, v in expected.items() if v == 0.0]
    assert len(zero) == (0 if act is nn.SiLU else 2)
    assert report.removed == len(zero) and pruned.bn.num_features == 8 - len(zero) == pruned.bn2.num_features
    assert causes(report, "conv") == {"not constant"}
    folded = fold_bn(model)
    assert type(folded.bn) is act and type(folded.bn2) is act
    assert_exact(model, folded, (2, 3, 6, 6))


# --- LayerNorm / GroupNorm over channels ----------------------------------------------------------


class NormNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm_kind = norm
        self.unit = cbr(3, 6)
        self.norm = nn.GroupNorm(2, 6) if norm == "group" else nn.LayerNorm([6, 5, 5])
        self.out = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = self.unit(x)
        return self.out(F.layer_norm(x, x.shape[1:]) if self.norm_kind == "functional" else self.norm(x))


@pytest.mark.parametrize("norm", ["layer", "functional", "group"])
def test_norm_over_channels_cannot_be_exact_and_says_so(norm):
    model = randomize(NormNet(norm))
    plant(model.unit[1], dead=[1], constant=[4])
    plan, pruned, report = prune(model, (2, 3, 5, 5))
    assert report.removed == 0 and causes(report, "unit.0") == {"split, slice, view or norm over channels"}
    assert "normalises over the channel dim" in report.layers["unit.0"].kept[1]


# --- partial plans, strict, ignored_layers --------------------------------------------------------


class Opaque(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


class TwoPathNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 6), cbr(3, 6)
        self.opaque = Opaque()
        self.out_a, self.out_b = nn.Conv2d(6, 2, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out_a(self.a(x)) + self.out_b(self.opaque(self.b(x)))


def test_untraceable_module_named_and_leaf_modules_give_a_partial_plan():
    model = randomize(TwoPathNet())
    plant(model.a[1], dead=[1, 2])
    plant(model.b[1], dead=[0], constant=[3])
    empty = PrunePlan.from_dead_masks({"a.0": torch.zeros(6, dtype=torch.bool)})
    with pytest.raises(UntraceableModelError, match=r"inside module 'opaque' \(Opaque\).*leaf_modules=\['opaque'\]"):
        prune_model(model, empty, (1, 3, 4, 4), strict=True)
    # Partial plans (the default): the submodule that cannot be traced is an opaque op, and the
    # report says so; the result is what declaring it a leaf gives.
    plan = PrunePlan.from_gamma(model)
    pruned, report = prune_model(model, plan, (2, 3, 4, 4))
    assert_exact(model, pruned, (2, 3, 4, 4))
    assert report.removed == 2 and pruned.b[0].out_channels == 6
    assert any("module 'opaque' (Opaque) cannot be traced" in n and "leaf_modules=['opaque']" in n for n in report.notes)
    plan, pruned, report = prune(model, (2, 3, 4, 4), leaf_modules=[Opaque])
    assert report.removed == 2 and pruned.a[0].out_channels == 4 and pruned.b[0].out_channels == 6
    assert causes(report, "b.0") == {"unmapped op"} and "module 'opaque'" in report.layers["b.0"].kept[0]
    assert list(report.unmapped) == ["module 'opaque' (opaque)"]
    with pytest.raises(UnsupportedModelError, match="channel 0 of 'b.0'.*module 'opaque'"):
        prune_model(model, plan, (2, 3, 4, 4), leaf_modules=["opaque"], strict=True)
    folded = fold_bn(model, leaf_modules=[Opaque])
    assert_exact(model, folded, (2, 3, 4, 4))


@pytest.mark.parametrize("ignored", ["a", "a.1", "a.0", "module"])
def test_ignored_layers_keep_their_channels(ignored):
    model = randomize(TwoPathNet())
    plant(model.a[1], dead=[1, 2])
    plant(model.b[1], dead=[0])
    plan = PrunePlan.from_gamma(model, leaf_modules=["opaque"])
    ignored = model.a if ignored == "module" else ignored
    pruned, report = prune_model(model, plan, (2, 3, 4, 4), leaf_modules=["opaque"], ignored_layers=[ignored])
    assert_exact(model, pruned, (2, 3, 4, 4))
    assert report.removed == 0 and causes(report, "a.0") == {"ignored_layers"}
    with pytest.raises(ValueError, match="not a module"):
        prune_model(model, plan, (2, 3, 4, 4), leaf_modules=["opaque"], ignored_layers=["nope"])


def test_empty_plan_on_a_model_with_batchnorms_is_never_silent():
    class AfterAdd(nn.Module):  # the only BN follows an add: no Conv/Linear unit has one
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.bn, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.out(self.bn(self.c1(x) + self.c2(x)))

    model = randomize(AfterAdd())
    with pytest.warns(UserWarning, match="none of the model's 1 BatchNorm layers"):
        plan = PrunePlan.from_gamma(model)
    assert not plan.layers and "'bn'" in plan.notes[0]
    with pytest.warns(UserWarning, match="the plan removes no channel"):
        _, report = prune_model(model, plan, (1, 3, 4, 4))
    assert any("removes no channel" in n for n in report.notes)


# --- the registry ---------------------------------------------------------------------------------


class Scale(nn.Module):
    """A per-channel scale (LayerScale): traced, it multiplies by a parameter the analysis cannot map."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class MyConv(nn.Module):
    """A 1x1 conv written by hand (F.conv2d is not mapped)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 1, 1) * 0.5)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias)


class MyConvHandler(ChannelHandler):
    def out_channels(self, module):
        return module.weight.shape[0]

    def fold(self, module, position, value):
        with torch.no_grad():
            module.bias += value * module.weight[:, position].flatten(1).sum(1)
        return True

    def prune(self, module, kept_in, kept_out):
        w = module.weight.detach()[kept_out][:, kept_in]
        module.weight = nn.Parameter(w.clone())
        module.bias = nn.Parameter(module.bias.detach()[kept_out].clone())


class RegistryNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act, self.scale = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), Swish(), Scale(6)
        self.mine, self.bn2, self.relu = MyConv(6, 5), nn.BatchNorm2d(5), nn.ReLU()
        self.out = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.out(self.relu(self.bn2(self.mine(self.scale(self.act(self.bn(self.conv(x))))))))


@pytest.fixture
def registered():
    register_channel_op(Swish, "elementwise")
    register_channel_op(Scale, "channelwise", params=("gamma",))
    register_channel_op(MyConv, "producer", handler=MyConvHandler())
    yield
    for cls in (Swish, Scale, MyConv):
        unregister_channel_op(cls)


def test_unregistered_custom_modules_keep_channels():
    model = randomize(RegistryNet())
    plant(model.bn, dead=[1], constant=[4])
    plan, pruned, report = prune(model, (2, 3, 4, 4))
    assert report.removed == 0 and report.kept_by_cause()


def test_registered_modules_let_channels_through(registered):
    model = randomize(RegistryNet())
    plant(model.bn, dead=[1], constant=[4])  # Swish(-1), Swish(0.3): both constants, folded into MyConv
    plant(model.bn2, dead=[0, 3])
    plan = PrunePlan.from_gamma(model)
    assert plan.layers["mine"].removed == [0, 3]
    pruned, report = prune_model(model, plan, fresh((2, 3, 4, 4), seed=0))
    assert_exact(model, pruned, (2, 3, 4, 4))
    assert report.removed == 4 and pruned.scale.gamma.shape == (4,) and pruned.mine.weight.shape == (3, 4, 1, 1)
    assert report.layers["mine"].folded_in == 2


def test_register_channel_op_rejects_what_it_cannot_use():
    with pytest.raises(ValueError, match="kind must be one of"):
        register_channel_op(Swish, "magic")
    with pytest.raises(ValueError, match="handler"):
        register_channel_op(MyConv, "producer")
    with pytest.raises(ValueError, match="module classes"):
        register_channel_op(torch.sin, "channelwise")


# --- real models ----------------------------------------------------------------------------------


def _torchvision(name):
    import torchvision
    if name == "resnext_small":
        from torchvision.models.resnet import Bottleneck, ResNet
        return ResNet(Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=8, num_classes=10)
    return getattr(torchvision.models, name)(weights=None, num_classes=10)


def _timm(name):
    import timm
    return timm.create_model(name, pretrained=False, num_classes=10)


REAL = [
    ("torchvision", "efficientnet_b0", 32), ("torchvision", "shufflenet_v2_x0_5", 64),
    ("torchvision", "resnext_small", 32), ("torchvision", "regnet_x_400mf", 32),
    ("timm", "efficientnet_b0", 32), ("timm", "mobilenetv3_small_100", 32),
    ("timm", "res2net50_14w_8s", 32), ("timm", "ghostnet_100", 32),
]


@pytest.fixture
def one_thread():
    """float64 convs on a shared 2-core machine: one thread is several times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("source, name, size", REAL, ids=[f"{s}:{n}" for s, n, _ in REAL])
def test_real_model_planted_channels_removed_exactly(source, name, size, one_thread):
    torch.manual_seed(0)
    model = randomize(_torchvision(name) if source == "torchvision" else _timm(name))
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            order = torch.randperm(m.num_features, generator=g).tolist()
            n_dead, n_const = round(0.12 * m.num_features), round(0.06 * m.num_features)
            plant(m, order[:n_dead], order[n_dead:n_dead + n_const])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never a silent (or warned) empty plan
        plan = PrunePlan.from_gamma(model)
    assert plan.num_removed > 0
    pruned, report = prune_model(model, plan, fresh((2, 3, size, size), seed=0))
    assert_exact(model, pruned, (2, 3, size, size))
    assert report.removed > 0 and report.macs_after < report.macs_before
    assert report.removed + sum(report.kept_by_cause().values()) == report.requested
