"""Models: shapes on 28x28x1 and 32x32x3, documented widths and names, LeNet-5's c5/f6,
the registry (own and torchvision models), deterministic initialisation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.models import BasicNet, ConvBNReLU, LeNet5, build_model, list_models, vgg11_bn, vgg16_bn

INPUTS = [(1, 28), (3, 32)]  # (channels, size): Fashion-MNIST-like and CIFAR-like


def spatial_sizes(model, module_name, x):
    """Output shape of submodule ``module_name`` when ``model`` runs on ``x``."""
    seen = {}
    # dict.update returns None: a hook that returned a value would replace the module's output.
    handle = model.get_submodule(module_name).register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    with torch.no_grad():
        model(x)
    handle.remove()
    return tuple(seen["shape"])


def conv_units(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ConvBNReLU)]


@pytest.mark.parametrize("channels,size", INPUTS)
@pytest.mark.parametrize(
    "make",
    [
        lambda c, s: BasicNet(in_channels=c, num_classes=7, width=0.25),
        lambda c, s: vgg11_bn(in_channels=c, num_classes=7, width=0.25),
        lambda c, s: vgg16_bn(in_channels=c, num_classes=7, width=0.125),
        lambda c, s: LeNet5(in_channels=c, num_classes=7, image_size=s),
    ],
    ids=["basicnet", "vgg11", "vgg16", "lenet5"],
)
def test_own_models_output_shape(make, channels, size):
    torch.manual_seed(0)
    model = make(channels, size).eval()
    with torch.no_grad():
        out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_basicnet_layout_and_names():
    model = BasicNet(in_channels=1, num_classes=10)
    assert [name for name, _ in model.features.named_children()] == [
        "c1", "c2", "pool1", "c3", "c4", "pool2", "c5", "c6", "pool3", "c7",
    ]
    names = dict(model.named_modules())
    for i in range(1, 8):
        assert isinstance(names[f"features.c{i}.conv"], nn.Conv2d)
        assert isinstance(names[f"features.c{i}.bn"], nn.BatchNorm2d)
        assert isinstance(names[f"features.c{i}.relu"], nn.ReLU)
        conv = names[f"features.c{i}.conv"]
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is None
    assert [m.conv.out_channels for _, m in conv_units(model)] == [64, 128, 128, 256, 256, 512, 512]
    # Three 2x2 pools: 28 -> 14 -> 7 -> 3 and 32 -> 16 -> 8 -> 4 at C7.
    assert spatial_sizes(model.eval(), "features.c7", torch.randn(1, 1, 28, 28)) == (1, 512, 3, 3)
    model3 = BasicNet(in_channels=3)
    assert spatial_sizes(model3.eval(), "features.c7", torch.randn(1, 3, 32, 32)) == (1, 512, 4, 4)


@pytest.mark.parametrize(
    "width,expected",
    [
        (0.5, (32, 64, 64, 128, 128, 256, 256)),
        (0.01, (1, 1, 1, 3, 3, 5, 5)),  # 0.64 -> 1 (at least 1), 2.56 -> 3, 5.12 -> 5
        (1.5, (96, 192, 192, 384, 384, 768, 768)),
    ],
)
def test_basicnet_width_multiplier(width, expected):
    model = BasicNet(in_channels=1, num_classes=10, width=width)
    units = [m for _, m in conv_units(model)]
    assert tuple(m.conv.out_channels for m in units) == expected
    assert model.widths == expected
    assert tuple(m.bn.num_features for m in units) == expected
    assert [m.conv.in_channels for m in units] == [1, *expected[:-1]]
    assert model.classifier.in_features == expected[-1]


def test_basicnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="width"):
        BasicNet(width=0)
    with pytest.raises(ValueError, match="widths"):
        BasicNet(widths=())
    with pytest.raises(ValueError, match="in_channels"):
        BasicNet(in_channels=0)


def test_conv_bn_relu_unit_matches_functional_reference():
    torch.manual_seed(0)
    unit = ConvBNReLU(3, 5)
    with torch.no_grad():
        unit.bn.running_mean.uniform_(-1, 1)
        unit.bn.running_var.uniform_(0.5, 2)
        unit.bn.weight.uniform_(-1, 1)
        unit.bn.bias.uniform_(-1, 1)
    unit.eval()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    unit.double()
    bn = unit.bn
    expected = F.relu(
        (F.conv2d(x, unit.conv.weight, padding=1) - bn.running_mean.view(1, -1, 1, 1))
        / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps) * bn.weight.view(1, -1, 1, 1)
        + bn.bias.view(1, -1, 1, 1)
    )
    with torch.no_grad():
        torch.testing.assert_close(unit(x), expected)


@pytest.mark.parametrize("make,convs", [(vgg11_bn, 8), (vgg16_bn, 13)])
@pytest.mark.parametrize("channels,size", INPUTS)
def test_vgg_depth_and_final_map(make, convs, channels, size):
    model = make(in_channels=channels, num_classes=10, width=0.125).eval()
    units = conv_units(model)
    assert len(units) == convs
    assert [name for name, _ in units] == [f"features.c{i}" for i in range(1, convs + 1)]
    assert units[-1][1].conv.out_channels == 64  # 512 * 0.125
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.ceil_mode for p in pools)
    # Five ceil-mode pools take both 28 and 32 to 1x1 (floor pooling would reach 0x0 from 28).
    assert spatial_sizes(model, "features", torch.randn(2, channels, size, size)) == (2, 64, 1, 1)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 64


@pytest.mark.parametrize("channels,size", INPUTS)
def test_lenet5_c5_and_f6(channels, size):
    model = LeNet5(in_channels=channels, num_classes=10, image_size=size).eval()
    assert isinstance(model.c5, nn.Conv2d) and model.c5.out_channels == 120 and model.c5.kernel_size == (5, 5)
    assert isinstance(model.f6, nn.Linear) and (model.f6.in_features, model.f6.out_features) == (120, 84)
    assert model.c1.padding == ((2, 2) if size == 28 else (0, 0))
    x = torch.randn(2, channels, size, size)
    seen = {}
    model.c5.register_forward_hook(lambda m, i, o: seen.update(c5_in=i[0].shape, c5_out=o.shape))
    with torch.no_grad():
        model(x)
    assert seen["c5_in"][-2:] == (5, 5)
    assert seen["c5_out"] == (2, 120, 1, 1)


def test_lenet5_matches_functional_reference():
    torch.manual_seed(0)
    model = LeNet5(in_channels=1, num_classes=10).double()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    h = F.max_pool2d(F.relu(F.conv2d(x, model.c1.weight, model.c1.bias, padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, model.c3.weight, model.c3.bias)), 2)
    h = F.relu(F.conv2d(h, model.c5.weight, model.c5.bias)).reshape(3, 120)
    h = F.relu(h @ model.f6.weight.T + model.f6.bias)
    expected = h @ model.output.weight.T + model.output.bias
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_lenet5_rejects_wrong_input_size():
    model = LeNet5(in_channels=1, num_classes=10, image_size=28)
    with pytest.raises(ValueError, match="28, 28"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="at most 32x32"):
        LeNet5(image_size=40)


def test_registry_own_models():
    names = list_models()
    assert names[:4] == ["basicnet", "vgg11", "vgg16", "lenet5"]
    assert isinstance(build_model("basicnet", in_channels=1, num_classes=10, width=0.5), BasicNet)
    vgg = build_model("vgg16", in_channels=3, num_classes=100, width=0.25)
    assert len(conv_units(vgg)) == 13 and vgg.classifier.out_features == 100
    lenet = build_model("lenet5", in_channels=3, num_classes=10, image_size=32)
    assert isinstance(lenet, LeNet5) and lenet.c1.in_channels == 3
    with pytest.raises(ValueError, match="width"):
        build_model("lenet5", in_channels=1, num_classes=10, width=0.5)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("no_such_net", in_channels=1, num_classes=10)


def first_conv(model):
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize(
    "name,small_input",
    [("resnet18", False), ("resnet18", True), ("mobilenet_v2", False), ("densenet121", True)],
)
def test_registry_torchvision_one_channel(name, small_input):
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=10, small_input=small_input).eval()
    stem = first_conv(model)
    assert stem.in_channels == 1
    if small_input:
        assert (stem.kernel_size, stem.stride, stem.padding) == ((3, 3), (1, 1), (1, 1))
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_registry_torchvision_stem_details():
    torchvision = pytest.importorskip("torchvision")
    plain = build_model("resnet18", in_channels=3, num_classes=10)
    assert (plain.conv1.in_channels, plain.conv1.kernel_size, plain.conv1.stride) == (3, (7, 7), (2, 2))
    assert isinstance(plain.maxpool, nn.MaxPool2d) and plain.fc.out_features == 10
    gray = build_model("resnet18", in_channels=1, num_classes=10)
    assert (gray.conv1.in_channels, gray.conv1.kernel_size, gray.conv1.stride) == (1, (7, 7), (2, 2))
    small = build_model("resnet18", in_channels=3, num_classes=10, small_input=True)
    assert isinstance(small.maxpool, nn.Identity)
    dense = build_model("densenet121", in_channels=1, num_classes=10, small_input=True)
    assert isinstance(dense.features.pool0, nn.Identity)
    # The prefix forces torchvision's builder (it reaches e.g. the ImageNet VGGs our vgg11/vgg16 shadow).
    assert isinstance(build_model("torchvision.resnet18", in_channels=3, num_classes=10), torchvision.models.ResNet)
    assert "resnet18" in list_models() and "densenet121" in list_models()
    with pytest.raises(ValueError, match="width"):
        build_model("resnet18", in_channels=3, num_classes=10, width=0.5)


@pytest.mark.parametrize(
    "name,kw",
    [("basicnet", dict(width=0.25)), ("vgg11", dict(width=0.25)), ("lenet5", {}), ("resnet18", {})],
)
def test_initialisation_is_deterministic(name, kw):
    if name == "resnet18":
        pytest.importorskip("torchvision")

    def build(seed):
        torch.manual_seed(seed)
        return build_model(name, in_channels=1, num_classes=10, **kw).state_dict()

    first, again, other = build(0), build(0), build(1)
    assert first.keys() == again.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())
