"""Build any supported model by name: this package's CNNs or torchvision's classifiers.

Own models: ``basicnet``, ``vgg11`` and ``vgg16`` (the CIFAR-style VGGs with BN of
:mod:`sparsekern.models.vgg`), ``lenet5``. Every other name is a torchvision classification
model (``resnet18``, ``vgg16_bn``, ``mobilenet_v2``, ``densenet121``, ...), built with
``torchvision.models.get_model(name, weights=None, num_classes=...)`` -- never with
pretrained weights, so nothing is downloaded. torchvision's own ``vgg11`` / ``vgg16`` (ImageNet
layout) are shadowed by ours; reach them as ``torchvision.vgg11``. A ``torchvision.`` prefix
works for any torchvision name.

Adapting torchvision's ImageNet stems (only ever the stem; the rest is torchvision's model):
- ``in_channels != 3``: the first Conv2d of the model (in module registration order, which is
  the stem for every torchvision classifier) is replaced by a Conv2d with the same kernel,
  stride, padding, dilation and bias but ``in_channels`` inputs.
- ``small_input=True`` (for 28x28 / 32x32 images; the usual CIFAR adaptation of ResNet and
  DenseNet): that first conv becomes 3x3, stride 1, padding 1, and a max-pool that follows it
  before any other conv (resnet ``maxpool``, densenet ``features.pool0``) is replaced by
  ``nn.Identity``. Without it the stem downsamples 4x at once; resnet* and mobilenet* still
  run on 28x28, densenet* only with ``small_input=True``. torchvision's VGGs (stem already
  3x3 stride 1, five floor-mode pools) reach 0x0 on 28x28 either way: use our ``vgg11`` /
  ``vgg16`` there.
A replaced conv is initialised Kaiming-normal (fan_out, ReLU; zero bias), as torchvision
initialises its ResNet and MobileNet stems. Our own models are built for small inputs and
ignore ``small_input``.
"""
from __future__ import annotations

from typing import List

from torch import nn

from sparsekern.models.basicnet import BasicNet, check_positive_int
from sparsekern.models.lenet import LeNet5
from sparsekern.models.vgg import vgg11_bn, vgg16_bn

_OWN_MODELS = {
    "basicnet": BasicNet,
    "vgg11": vgg11_bn,
    "vgg16": vgg16_bn,
    "lenet5": LeNet5,
}
_TORCHVISION_PREFIX = "torchvision."


def _torchvision_names() -> List[str]:
    try:
        import torchvision.models
    except ImportError:
        return []
    # module= restricts the list to image classifiers (no detection / segmentation / video).
    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> List[str]:
    """Names :func:`build_model` accepts: ours first, then torchvision's classifiers (if installed)."""
    return list(_OWN_MODELS) + [n for n in _torchvision_names() if n not in _OWN_MODELS]


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    width: float = 1.0,
    small_input: bool = False,
    **kw,
) -> nn.Module:
    """Build model ``name`` for ``in_channels``-channel inputs and ``num_classes`` outputs.

    ``width`` is the width multiplier of basicnet / vgg11 / vgg16; other models take only 1.0.
    ``small_input=True`` gives torchvision models a stem for 28x28 / 32x32 images (see the
    module docstring).
    Extra keyword arguments go to the model's constructor (e.g. ``widths=`` for basicnet,
    ``image_size=`` for lenet5, torchvision builder options). Initialisation is deterministic
    given ``torch.manual_seed``; no weights are ever loaded.
    """
    check_positive_int(in_channels, "in_channels")
    check_positive_int(num_classes, "num_classes")
    key = name.lower()
    if key in ("basicnet", "vgg11", "vgg16"):
        return _OWN_MODELS[key](in_channels=in_channels, num_classes=num_classes, width=width, **kw)
    if width != 1.0:
        raise ValueError(f"model {name!r} has no width multiplier (width={width!r}); only basicnet, vgg11, vgg16 do")
    if key == "lenet5":
        return LeNet5(in_channels=in_channels, num_classes=num_classes, **kw)
    if key.startswith(_TORCHVISION_PREFIX):
        key = key[len(_TORCHVISION_PREFIX):]
    return _build_torchvision(key, in_channels, num_classes, small_input, **kw)


def _build_torchvision(name: str, in_channels: int, num_classes: int, small_input: bool, **kw) -> nn.Module:
    available = _torchvision_names()
    if name not in available:
        hint = "" if available else " (torchvision is not installed: pip install torchvision)"
        raise ValueError(f"unknown model {name!r}{hint}; list_models() gives the supported names")
    import torchvision.models

    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
    if in_channels != 3 or small_input:
        _adapt_stem(model, in_channels, small_input)
    return model


def _adapt_stem(model: nn.Module, in_channels: int, small_input: bool) -> None:
    """Replace the first Conv2d (new input channels; 3x3 stride 1 if ``small_input``), and with
    ``small_input`` drop a max-pool that follows it before any other conv."""
    modules = list(model.named_modules())
    first = next((i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d stem that could be adapted")
    stem_name, stem = modules[first]
    if stem.groups != 1:
        raise ValueError(f"cannot adapt the grouped first conv {stem_name!r} of {type(model).__name__}")
    geometry = (
        dict(kernel_size=3, stride=1, padding=1, dilation=1)
        if small_input
        else dict(kernel_size=stem.kernel_size, stride=stem.stride, padding=stem.padding, dilation=stem.dilation)
    )
    replacement = nn.Conv2d(
        in_channels, stem.out_channels, bias=stem.bias is not None, padding_mode=stem.padding_mode, **geometry
    )
    nn.init.kaiming_normal_(replacement.weight, mode="fan_out", nonlinearity="relu")
    if replacement.bias is not None:
        nn.init.zeros_(replacement.bias)
    _set_submodule(model, stem_name, replacement)
    if not small_input:
        return
    for name, module in modules[first + 1:]:
        if isinstance(module, nn.Conv2d):
            break
        if isinstance(module, nn.MaxPool2d):
            _set_submodule(model, name, nn.Identity())
            break


def _set_submodule(model: nn.Module, qualified_name: str, module: nn.Module) -> None:
    parent_name, _, attr = qualified_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
