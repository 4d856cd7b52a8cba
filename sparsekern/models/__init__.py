"""Models for sparsity experiments: BasicNet, CIFAR-style VGG-11/16 with BN, LeNet-5, and
torchvision classifiers through one registry; any other model (torchvision, timm, a factory of
yours) with a local weights file through :mod:`sparsekern.models.external`.

    from sparsekern.models import build_model, list_models, load_external
    model = build_model("basicnet", in_channels=1, num_classes=10, width=0.5)
    ext = load_external("timm:resnet18", "num_classes=10", weights="r18.safetensors")   # ext.model, ext.input_size

Conv -> BN -> ReLU units are :class:`ConvBNReLU` modules with children ``conv``, ``bn``,
``relu``, so layer names read ``features.c3.conv``, ``features.c3.bn``, ``features.c3.relu``.
"""
from sparsekern.models.basicnet import DEFAULT_WIDTHS, BasicNet, ConvBNReLU, scaled_width
from sparsekern.models.external import ExternalModel, load_external, parse_model_args
from sparsekern.models.lenet import LeNet5
from sparsekern.models.registry import build_model, list_models
from sparsekern.models.vgg import CONFIGS, VGG, vgg11_bn, vgg16_bn

__all__ = [
    "DEFAULT_WIDTHS",
    "BasicNet",
    "ConvBNReLU",
    "scaled_width",
    "ExternalModel",
    "load_external",
    "parse_model_args",
    "LeNet5",
    "build_model",
    "list_models",
    "CONFIGS",
    "VGG",
    "vgg11_bn",
    "vgg16_bn",
]
