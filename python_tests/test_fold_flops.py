"""BN folding (equal outputs in eval mode) and parameter / MAC counts against hand counts."""
import pytest
import torch
import torchvision
from torch import nn

from sparsekern.prune import (
    analyze_dependencies, count_flops, count_macs, count_params, fold_bn, foldable_pairs, macs_by_layer,
)
from sparsekern.prune.flops import graph_macs

from _helpers import randomize_bn


def mixed_net():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5, bias=False), nn.BatchNorm1d(5),
    ))


def assert_close(a, b):
    assert (a.double() - b.double()).abs().max() <= 1e-5 * max(1.0, b.abs().max())


def test_fold_bn_equals_eval_model():
    net = mixed_net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_bn(net)
    assert foldable_pairs(net) == [("0", "1"), ("3", "4"), ("8", "9")]
    assert all(isinstance(folded[i], nn.Identity) for i in (1, 4, 9))
    assert folded[0].bias is not None and folded[8].bias is not None  # created where missing
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        assert_close(folded(x), net(x))
    # Hand check of one fold: w' = w * gamma / sqrt(var + eps), b' = beta - mean * gamma / sqrt(var + eps).
    bn = net[1]
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    assert torch.allclose(folded[0].weight.double(), net[0].weight.double() * scale.view(-1, 1, 1, 1), atol=1e-6)
    assert torch.allclose(folded[0].bias.double(), bn.bias.double() - bn.running_mean.double() * scale, atol=1e-6)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fold_bn_keeps_channels_last_and_training_flags():
    net = mixed_net().train().to(memory_format=torch.channels_last)
    folded = fold_bn(net)
    assert folded.training and folded[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 2, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close(folded.eval()(x), net.eval()(x))


class ResidualBN(nn.Module):
    """A BN after an add (not after a layer) and a conv read twice: neither can be folded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv2(x)
        return self.bn(self.conv(x) + x) + self.bn2(y) + y


def test_fold_bn_leaves_unfoldable_bns():
    net = randomize_bn(ResidualBN()).eval()
    assert foldable_pairs(net) == []
    folded = fold_bn(net)
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn2, nn.BatchNorm2d)
    with pytest.raises(TypeError, match="nn.Module"):
        fold_bn("model")


def test_fold_bn_resnet18():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(folded(x), model(x))


def test_counts_match_hand_counts():
    net = mixed_net()
    # Params: conv0 6*2*9; BN 2*6; grouped conv 6*(6/3)*9 + 6; BN 2*6; Linear 5*96; BN1d 2*5.
    assert count_params(net) == 108 + 12 + 114 + 12 + 480 + 10
    net[0].weight.requires_grad_(False)
    assert count_params(net, trainable_only=True) == 12 + 114 + 12 + 480 + 10
    # MACs per sample at 8x8: conv0 64 px * 6 out * 2 in * 9; grouped conv 64 * 6 * 2 * 9;
    # Linear 5 * 96. The batch size of the shape does not matter.
    expected = {"0": 64 * 6 * 2 * 9, "3": 64 * 6 * 2 * 9, "8": 5 * 96}
    assert macs_by_layer(net, (torch.zeros(1, 2, 8, 8),)) == expected
    assert count_macs(net, (7, 2, 8, 8)) == sum(expected.values())
    assert count_flops(net, (1, 2, 8, 8)) == 2 * sum(expected.values())
    graph = analyze_dependencies(net, torch.zeros(1, 2, 8, 8))
    assert graph_macs(graph.gm) == sum(expected.values())
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(net, (2, 8, 8, 0))


def test_conv_transpose_and_sequence_linear_macs():
    net = nn.Sequential(nn.ConvTranspose2d(3, 4, 2, stride=2), nn.Flatten(2), nn.Linear(64, 7))
    # ConvTranspose: 16 input px * 3 in * 4 out * 4 taps; Linear on (N, 4, 64): 4 rows * 7 * 64.
    assert count_macs(net, (1, 3, 4, 4)) == 16 * 3 * 4 * 4 + 4 * 7 * 64
    graph = analyze_dependencies(net, torch.zeros(1, 3, 4, 4))
    assert graph_macs(graph.gm) == 16 * 3 * 4 * 4 + 4 * 7 * 64
