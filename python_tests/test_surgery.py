"""Exact channel surgery: outputs unchanged, channel counts as planned, constants folded only
where that is exact, ties (residual adds, concatenation, depthwise convs) respected, and
unsupported models refused without being touched."""
import copy
import json

import pytest
import torch
import torchvision
from torch import nn

import sparsekern.prune
import sparsekern.prune.surgery
from sparsekern.models import build_model
from sparsekern.prune import (
    LayerSurgery, PrunePlan, PruneVerificationError, UnsupportedModelError, analyze_dependencies, fold_bn, prune_model,
)
from sparsekern.stats.features import find_features

from _helpers import make_constant, randomize_bn


RTOL = 1e-5


def assert_same_outputs(original, pruned, x):
    with torch.no_grad():
        ref, out = original.eval()(x).double(), pruned.eval()(x).double()
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= RTOL * max(1.0, ref.abs().max())


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


def small_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10),
    )
    return randomize_bn(net).eval()


def test_dead_channels_removed_exactly():
    net = small_net()
    make_constant(net[1], [1, 6], -1.0)
    make_constant(net[5], [0, 7, 15], -0.3)
    before = snapshot(net)
    plan = PrunePlan.from_dead_masks(
        {"0": torch.tensor([i in (1, 6) for i in range(8)]), "4": torch.tensor([i in (0, 7, 15) for i in range(16)])}
    )
    x = torch.randn(3, 1, 16, 16)
    pruned, report = prune_model(net, plan, x)
    assert_unchanged(net, before)
    assert_same_outputs(net, pruned, x)
    kept0 = [c for c in range(8) if c not in (1, 6)]
    kept4 = [c for c in range(16) if c not in (0, 7, 15)]
    assert (pruned[0].out_channels, pruned[1].num_features, pruned[4].in_channels) == (6, 6, 6)
    assert (pruned[4].out_channels, pruned[5].num_features, pruned[7].in_channels) == (13, 13, 13)
    assert torch.equal(pruned[0].weight, net[0].weight[kept0])
    assert torch.equal(pruned[4].weight, net[4].weight[kept4][:, kept0])
    assert torch.equal(pruned[5].running_var, net[5].running_var[kept4])
    assert torch.equal(pruned[7].weight, net[7].weight[:, kept4])
    assert report.layers["0"].channels_after == 6 and report.layers["4"].removed_dead == 3
    # Hand counts. Params: conv0 2 x (9 + 1), BN0 2 x 2, conv4 (16*8*9 + 16) - (13*6*9 + 13),
    # BN4 3 x 2, conv7 12 x 3 inputs. MACs per 16x16 sample: conv0 256*C0*9, conv4 64*C4*C0*9,
    # conv7 64*12*C4, Linear 12*10.
    assert report.params_before - report.params_after == 20 + 4 + 453 + 6 + 36
    assert report.macs_before == 256 * 8 * 9 + 64 * 16 * 8 * 9 + 64 * 12 * 16 + 120
    assert report.macs_after == 256 * 6 * 9 + 64 * 13 * 6 * 9 + 64 * 12 * 13 + 120
    assert report.max_abs_diff <= report.tolerance


def test_constants_folded_into_linear_and_unpadded_conv_kept_before_padded_conv():
    net = small_net()
    make_constant(net[1], [5], 0.7)   # relu(0.7) = 0.7, read by the zero-padded 3x3 conv: kept
    make_constant(net[5], [3], 0.4)   # read by the 1x1 conv (no padding): folded
    make_constant(net[8], [0], 0.9)   # global pool -> Linear: folded
    plan = PrunePlan.from_gamma(net)
    assert plan.layers["0"].constants == pytest.approx({5: 0.7})
    x = torch.randn(2, 1, 16, 16)
    pruned, report = prune_model(net, plan, x)
    assert_same_outputs(net, pruned, x)
    assert pruned[0].out_channels == 8 and "zero-padded conv '4'" in report.layers["0"].kept[5]
    assert pruned[4].out_channels == 15 and pruned[7].in_channels == 15
    assert pruned[7].out_channels == 11 and pruned[12].in_features == 11
    # Hand-computed folds: bias += k * (sum of the weights that read the removed channel).
    k3 = torch.relu(torch.tensor(0.4))
    expected7 = net[7].bias.detach().double() + k3 * net[7].weight.detach()[:, 3].double().sum((1, 2))
    assert torch.allclose(pruned[7].bias.double(), expected7[1:], atol=1e-6)
    expected12 = net[12].bias.detach().double() + 0.9 * net[12].weight.detach()[:, 0].double()
    assert torch.allclose(pruned[12].bias.double(), expected12, atol=1e-6)
    assert report.layers["7"].folded_in == 1 and report.layers["12"].folded_in == 1
    assert "kept channels [5]" in report.summary()
    assert json.loads(json.dumps(report.to_dict()))["layers"]["0"]["kept"] == {"5": report.layers["0"].kept[5]}


def test_constant_before_padded_conv_would_be_wrong_if_folded():
    """The reason the channel is kept: folding it into the padded conv's bias changes borders."""
    net = small_net()
    make_constant(net[1], [5], 0.7)
    folded = nn.Conv2d(7, 16, 3, padding=1)
    keep = [c for c in range(8) if c != 5]
    with torch.no_grad():
        folded.weight.copy_(net[4].weight[:, keep])
        folded.bias.copy_(net[4].bias + 0.7 * net[4].weight[:, 5].sum((1, 2)))
        h = net[:4](torch.randn(1, 1, 16, 16))
        diff = (folded(h[:, keep]) - net[4](h)).abs()
    assert diff[..., 1:-1, 1:-1].max() < 1e-5 and diff.max() > 1e-2


def test_basicnet_from_gamma():
    torch.manual_seed(0)
    net = randomize_bn(build_model("basicnet", in_channels=1, num_classes=10, width=0.125)).eval()
    make_constant(net.features.c2.bn, [0, 3], -1.0)
    make_constant(net.features.c5.bn, [1], -0.2)
    make_constant(net.features.c7.bn, [2, 4], 0.5)  # constants before the global pool: folded
    plan = PrunePlan.from_gamma(net)
    x = torch.randn(2, 1, 28, 28)
    pruned, report = prune_model(net, plan, x)
    assert_same_outputs(net, pruned, x)
    widths = [getattr(pruned.features, f"c{i}").conv.out_channels for i in range(1, 8)]
    original = list(net.widths)
    assert widths == [original[0], original[1] - 2, original[2], original[3], original[4] - 1, original[5], original[6] - 2]
    assert pruned.classifier.in_features == original[6] - 2
    assert report.layers["features.c7.conv"].removed_constant == 2 and report.layers["classifier"].folded_in == 2


def test_plan_keyed_by_bn_name_resolves_to_its_conv():
    net = small_net()
    make_constant(net[5], [2], -1.0)
    plan = PrunePlan.from_dead_masks({"5": torch.tensor([c == 2 for c in range(16)])})
    pruned, _ = prune_model(net, plan, (2, 1, 16, 16))
    assert pruned[4].out_channels == 15 and pruned[5].num_features == 15


def test_live_channel_fails_verification_and_names_the_layer():
    net = small_net()
    before = snapshot(net)
    plan = PrunePlan.from_dead_masks({"4": torch.tensor([c == 2 for c in range(16)])})  # not dead
    with pytest.raises(PruneVerificationError, match=r"first diverge at module '7'.*removed channel 2 of '4'.*not the planned"):
        prune_model(net, plan, torch.randn(2, 1, 16, 16))
    assert_unchanged(net, before)


def test_inplace_edits_the_model_itself():
    net = small_net()
    make_constant(net[1], [1], -1.0)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = net(x)
    plan = PrunePlan.from_gamma(net)
    copy_pruned, _ = prune_model(net, plan, x)
    same, _ = prune_model(net, plan, x, inplace=True)
    assert same is net and net[0].out_channels == 7
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), copy_pruned.state_dict().values()))
    with torch.no_grad():
        assert torch.allclose(net(x), ref, atol=1e-5)


def test_lossy_plan_equals_original_with_channels_zeroed():
    """A baseline plan removes live channels: the result must equal the original with those
    channels set to 0 at the unit output (an independent reference built with hooks)."""
    net = small_net()
    scores = {"0": torch.arange(8.0), "4": -torch.arange(16.0)}
    plan = PrunePlan.from_scores(net, scores, keep_ratio=0.5)
    assert not plan.exact
    x = torch.randn(2, 1, 16, 16)
    pruned, _ = prune_model(net, plan, x)
    zero0, zero4 = plan.layers["0"].removed, plan.layers["4"].removed
    assert zero0 == [0, 1, 2, 3] and zero4 == list(range(8, 16))

    def zero(channels):
        def hook(module, args, out):
            out = out.clone()
            out[:, channels] = 0
            return out
        return hook

    h1 = net[3].register_forward_hook(zero(zero0))  # unit 0 ends after its max-pool
    h2 = net[6].register_forward_hook(zero(zero4))
    try:
        assert_same_outputs(net, pruned, x)
    finally:
        h1.remove()
        h2.remove()
    assert pruned[0].out_channels == 4 and pruned[4].out_channels == 8


def test_resnet18_internal_and_residual_ties():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    model = randomize_bn(model).eval()
    graph = analyze_dependencies(model, torch.randn(1, 1, 16, 16))
    assert ["conv1", "layer1.0.conv2", "layer1.1.conv2"] in graph.tied_layers()
    assert ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"] in graph.tied_layers()
    # Channel 3 is dead in every layer tied by layer1's residual adds; channel 9 in all but one.
    for bn in (model.bn1, model.layer1[0].bn2, model.layer1[1].bn2):
        make_constant(bn, [3], -1.0)
    for bn in (model.bn1, model.layer1[0].bn2):
        make_constant(bn, [9], -1.0)
    make_constant(model.layer1[0].bn1, [5], -1.0)  # internal to a BasicBlock
    dead = lambda *cs: torch.tensor([c in cs for c in range(64)])
    plan = PrunePlan.from_dead_masks(
        {"conv1": dead(3, 9), "layer1.0.conv2": dead(3, 9), "layer1.1.conv2": dead(3), "layer1.0.conv1": dead(5)},
        model=model,
    )
    x = torch.randn(2, 1, 16, 16)
    pruned, report = prune_model(model, plan, x)
    assert_same_outputs(model, pruned, x)
    assert pruned.layer1[0].conv1.out_channels == 63 and pruned.layer1[0].conv2.in_channels == 63
    for conv in (pruned.conv1, pruned.layer1[0].conv2, pruned.layer1[1].conv2):
        assert conv.out_channels == 63
    for reader in (pruned.layer1[0].conv1, pruned.layer1[1].conv1, pruned.layer2[0].conv1, pruned.layer2[0].downsample[0]):
        assert reader.in_channels == 63
    assert pruned.bn1.num_features == 63 and pruned.layer1[1].bn2.num_features == 63
    keep3 = [c for c in range(64) if c != 3]
    assert torch.equal(pruned.layer2[0].downsample[0].weight, model.layer2[0].downsample[0].weight[:, keep3])
    for layer in ("conv1", "layer1.0.conv2"):
        assert list(report.layers[layer].kept) == [9]
        assert "layer1.1.conv2[9]" in report.layers[layer].kept[9]


def test_mobilenet_v2_expansion_conv_takes_its_depthwise_chain():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5)).eval()
    block = model.features[2].conv  # expansion 1x1 -> depthwise 3x3 -> projection 1x1
    make_constant(block[0][1], [1, 4], -1.0)  # dead after ReLU6
    # The depthwise conv turns a zero channel into its BN's constant; make it positive after
    # ReLU6 so that the projection conv must absorb it in a (new) bias.
    dw_bn = block[1][1]
    dw_bn.running_mean[[1, 4]] = 0.0
    dw_bn.bias.data[[1, 4]] = torch.tensor([0.8, 0.3])
    plan = PrunePlan.from_gamma(model)
    assert plan.layers["features.2.conv.0.0"].removed == [1, 4]
    x = torch.randn(2, 3, 16, 16)
    pruned, report = prune_model(model, plan, x)
    assert_same_outputs(model, pruned, x)
    new = pruned.features[2].conv
    assert new[0][0].out_channels == 46 and new[0][1].num_features == 46
    assert (new[1][0].in_channels, new[1][0].out_channels, new[1][0].groups) == (46, 46, 46)
    assert new[1][1].num_features == 46 and new[2].in_channels == 46
    project = block[2].weight.detach()[:, [1, 4], 0, 0].double()
    assert new[2].bias is not None
    assert torch.allclose(new[2].bias.double(), project @ torch.tensor([0.8, 0.3], dtype=torch.float64), atol=1e-6)
    assert report.layers["features.2.conv.1.0"].channels_after == 46


def test_densenet_dead_channels_feeding_concatenations():
    from torchvision.models.densenet import DenseNet

    torch.manual_seed(0)
    model = randomize_bn(DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10)).eval()
    first = model.features.denseblock1.denselayer1
    first.conv2.weight.data[[2, 5]] = 0.0  # its new features 2 and 5 are exactly 0
    plan = PrunePlan.from_dead_masks({"features.denseblock1.denselayer1.conv2": torch.tensor([c in (2, 5) for c in range(8)])})
    x = torch.randn(2, 3, 32, 32)
    pruned, report = prune_model(model, plan, x)
    assert_same_outputs(model, pruned, x)
    block = pruned.features.denseblock1
    assert block.denselayer1.conv2.out_channels == 6
    # The concatenation [16 init features, 8 new] loses positions 16+2 and 16+5 everywhere it is read.
    assert block.denselayer2.norm1.num_features == 22 and block.denselayer2.conv1.in_channels == 22
    assert pruned.features.transition1.norm.num_features == 30 and pruned.features.transition1.conv.in_channels == 30
    keep = [c for c in range(24) if c not in (18, 21)]
    assert torch.equal(block.denselayer2.norm1.running_mean, model.features.denseblock1.denselayer2.norm1.running_mean[keep])
    # A zero feature becomes relu(BN(0)) after the reader's own BN: folded into the 1x1 convs.
    assert report.layers["features.transition1.conv"].folded_in + report.layers["features.denseblock1.denselayer2.conv1"].folded_in > 0


class ChannelShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.conv2(x)


class HardCodedViewNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.relu(self.bn(self.conv(x))).view(-1, 4 * 6 * 6))


class RollNet(nn.Module):
    """torch.roll along channels: an op the channel analysis does not map."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(torch.roll(self.relu(self.bn1(self.conv1(x))), 1, 1))


@pytest.mark.parametrize("cls, layer, shape, node", [
    (RollNet, "conv1", (2, 3, 4, 4), "'roll'"),
    (HardCodedViewNet, "conv", (2, 1, 8, 8), "'view'"),
])
def test_unsupported_model_is_refused_untouched(cls, layer, shape, node):
    torch.manual_seed(0)
    model = randomize_bn(cls()).eval()
    make_constant(model.bn1 if hasattr(model, "bn1") else model.bn, [2], -1.0)
    before = snapshot(model)
    plan = PrunePlan.from_gamma(model)
    assert plan.layers[layer].removed == [2]
    with pytest.raises(UnsupportedModelError, match=rf"channel 2 of '{layer}'.*{node}"):
        prune_model(model, plan, shape, strict=True)
    assert_unchanged(model, before)
    # The default is a partial plan: the channel is kept, and the report names the op.
    pruned, report = prune_model(model, plan, shape)
    assert report.removed == 0 and report.requested == 1
    assert node in report.layers[layer].kept[2] and report.kept_by_cause() == {"unmapped op": 1}
    assert any(node in label for label in report.unmapped)
    assert_unchanged(model, before)


def test_channel_shuffle_ties_the_shuffled_channels():
    """A channel shuffle (view -> transpose -> view) is mapped: channel i of every group goes together."""
    torch.manual_seed(0)
    model = randomize_bn(ChannelShuffleNet()).eval()
    make_constant(model.bn1, [2], -1.0)
    pruned, report = prune_model(model, PrunePlan.from_gamma(model), (2, 3, 4, 4))
    assert report.removed == 0 and "tied" in report.layers["conv1"].kept[2] and "conv1[6]" in report.layers["conv1"].kept[2]
    make_constant(model.bn1, [2, 6], -1.0)
    x = torch.randn(2, 3, 4, 4)
    pruned, report = prune_model(model, PrunePlan.from_gamma(model), x)
    assert report.removed == 2 and pruned.conv1.out_channels == 6
    assert_same_outputs(model, pruned, x)


class DataDependentNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else -self.conv(x)


def test_untraceable_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="torch.fx cannot trace DataDependentNet"):
        prune_model(DataDependentNet(), PrunePlan.from_dead_masks({"conv": torch.tensor([True, False])}), (1, 1, 4, 4))


def test_grouped_conv_loses_only_whole_groups():
    torch.manual_seed(0)
    net = randomize_bn(nn.Sequential(
        nn.Conv2d(2, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )).eval()
    make_constant(net[1], [2, 3, 5], -1.0)  # group 1 (channels 2, 3) whole, group 2 only half
    x = torch.randn(2, 2, 8, 8)
    pruned, report = prune_model(net, PrunePlan.from_gamma(net), x)
    assert_same_outputs(net, pruned, x)
    assert (pruned[3].in_channels, pruned[3].out_channels, pruned[3].groups) == (6, 6, 3)
    assert pruned[0].out_channels == 6 and pruned[6].in_channels == 6
    assert list(report.layers["0"].kept) == [5] and "same number of input channels" in report.layers["0"].kept[5]


def test_example_inputs_are_checked():
    net = small_net()
    plan = PrunePlan.from_gamma(net)
    with pytest.raises(ValueError, match="example_inputs is required"):
        prune_model(net, plan)
    with pytest.raises(ValueError, match="NaN or Inf"):
        prune_model(net, plan, torch.full((1, 1, 8, 8), float("nan")))
    with pytest.raises(TypeError, match="example_inputs must be"):
        prune_model(net, plan, "x")
    with pytest.raises(ValueError, match="atol_rel"):
        prune_model(net, plan, (1, 1, 8, 8), atol_rel=0)


def test_plan_must_fit_the_model():
    net = small_net()
    with pytest.raises(ValueError, match="made for 9 channels"):
        prune_model(net, PrunePlan.from_dead_masks({"0": torch.zeros(9, dtype=torch.bool)}), (1, 1, 8, 8))
    with pytest.raises(ValueError, match="not a module"):
        prune_model(net, PrunePlan.from_dead_masks({"nope": torch.zeros(9, dtype=torch.bool)}), (1, 1, 8, 8))
    other = PrunePlan.from_dead_masks({"0": torch.zeros(8, dtype=torch.bool)})
    other.model_class = "somewhere.OtherNet"
    with pytest.raises(ValueError, match="made for a somewhere.OtherNet"):
        prune_model(net, other, (1, 1, 8, 8))


def test_classifier_outputs_are_never_removed():
    net = small_net()
    plan = PrunePlan.from_dead_masks({"12": torch.tensor([c == 0 for c in range(10)])})
    pruned, report = prune_model(net, plan, (2, 1, 8, 8), verify=False)
    assert pruned[12].out_features == 10 and "model output" in report.layers["12"].kept[0]


def test_pruned_weights_keep_channels_last_and_train_mode():
    net = small_net().train().to(memory_format=torch.channels_last)
    make_constant(net[5], [1], -1.0)
    pruned, _ = prune_model(net, PrunePlan.from_gamma(net), (2, 1, 8, 8))
    assert pruned.training and pruned[1].training and net.training
    assert pruned[4].weight.is_contiguous(memory_format=torch.channels_last) and pruned[4].out_channels == 15
    assert pruned[7].weight.is_contiguous(memory_format=torch.channels_last) and pruned[7].in_channels == 15


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prune_on_cuda():
    net = small_net().cuda()
    make_constant(net[5], [3], 0.4)
    make_constant(net[8], [0, 2], torch.tensor([0.9, -1.0], device="cuda"))
    x = torch.randn(2, 1, 16, 16, device="cuda")
    pruned, report = prune_model(net, PrunePlan.from_gamma(net), x)
    assert all(p.is_cuda for p in pruned.parameters())
    assert pruned[7].out_channels == 10 and report.layers["12"].folded_in == 1
    assert_same_outputs(net, pruned, x)


def test_sync_batchnorm_is_a_batchnorm_to_tracker_surgery_and_folding():
    """The same network with SyncBatchNorm (eval mode: the running statistics' affine, as a
    BatchNorm2d) has the same features for the tracker, the same plan, the same pruned weights,
    pruned exactly, and folds like the BatchNorm2d one."""
    net = small_net()
    make_constant(net[1], [2], -1.0)  # dead
    make_constant(net[5], [3, 7], 0.4)  # constant, folded into the 1x1 conv
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)).eval()
    assert isinstance(sync[1], nn.SyncBatchNorm) and isinstance(sync[5], nn.SyncBatchNorm)

    features = [(f.name, f.kind, f.bn_module_name, f.layer_module_name) for f in find_features(net)]
    assert [(f.name, f.kind, f.bn_module_name, f.layer_module_name) for f in find_features(sync)] == features
    assert features == [("1", "bn", "1", "0"), ("5", "bn", "5", "4"), ("8", "bn", "8", "7")]

    plan, sync_plan = PrunePlan.from_gamma(net), PrunePlan.from_gamma(sync)
    assert sync_plan.layers == plan.layers and sync_plan.layers["0"].removed == [2]
    x = torch.randn(4, 1, 8, 8)
    pruned, _ = prune_model(net, plan, x)
    sync_pruned, report = prune_model(sync, sync_plan, x)
    assert report.layers["4"].removed_constant == 2 and report.layers["7"].folded_in == 2
    assert isinstance(sync_pruned[5], nn.SyncBatchNorm) and sync_pruned[5].num_features == 14
    assert pruned.state_dict().keys() == sync_pruned.state_dict().keys()
    for key, value in pruned.state_dict().items():
        assert torch.equal(value, sync_pruned.state_dict()[key]), key
    assert_same_outputs(sync, sync_pruned, x)

    folded = fold_bn(sync)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[5], nn.Identity)
    assert_same_outputs(sync, folded, x)
    for key, value in fold_bn(net).state_dict().items():
        assert torch.equal(value, folded.state_dict()[key]), key


def test_layer_report_is_a_deprecated_name_of_layer_surgery():
    for module in (sparsekern.prune, sparsekern.prune.surgery):
        with pytest.warns(DeprecationWarning, match="LayerSurgery"):
            assert module.LayerReport is LayerSurgery
