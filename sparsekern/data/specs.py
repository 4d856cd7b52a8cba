"""Corpora named on the command line (``--data``), brought to the input a model expects.

    from sparsekern.data.specs import parse_data_spec, load_data
    spec = parse_data_spec("imagefolder:photos")           # or "fashion-mnist", "synthetic:64"
    dataset = load_data(spec, train=True, input_size=(3, 64, 64), mean=IMAGENET_MEAN, std=IMAGENET_STD)

- ``fashion-mnist``: the IDX files (``root`` / ``$SPARSEKERN_DATA`` / Debian's package), kept in
  memory at 28 x 28 and per batch resized to the input size, repeated to 3 channels when the model
  takes 3, normalised with the model's mean / std (:class:`ResizedImageDataset`).
- ``imagefolder:DIR``: ``torchvision.datasets.ImageFolder`` over ``DIR/train`` or ``DIR/val`` (the
  split) when those exist, else ``DIR``; Resize(floor(size / crop_pct)) -> CenterCrop(size) ->
  normalise, as timm evaluates; grayscale images repeated to 3 channels (RGB images made grayscale
  for a 1-channel model).
- ``synthetic[:N]``: N (default 256) images of :class:`SyntheticDataset` at the input shape,
  normalised with their own per-channel statistics; for smoke runs, not for measuring sparsity.

The model's mean / std may have 3 values for a 1-channel model (ImageNet's): their average is used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

from sparsekern.data.datasets import ResizedImageDataset, SyntheticDataset, load_image_folder
from sparsekern.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from sparsekern.data.fashion_mnist import NUM_CLASSES as FASHION_MNIST_NUM_CLASSES
from sparsekern.data.fashion_mnist import load_fashion_mnist
from sparsekern.errors import DataError

DATA_FORMS = "fashion-mnist, imagefolder:DIR or synthetic[:N]"
DEFAULT_SYNTHETIC_SAMPLES = 256


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data``: ``kind`` is fashion_mnist, imagefolder or synthetic; ``root`` the folder of
    an imagefolder; ``samples`` the N of synthetic."""

    kind: str
    root: Optional[str] = None
    samples: Optional[int] = None

    def __str__(self) -> str:
        if self.kind == "imagefolder":
            return f"imagefolder:{self.root}"
        if self.kind == "synthetic":
            return f"synthetic:{self.samples}"
        return "fashion-mnist"


def parse_data_spec(text: str) -> DataSpec:
    """``fashion-mnist`` | ``imagefolder:DIR`` | ``synthetic[:N]`` -> a DataSpec; anything else is a
    DataError naming the forms."""
    kind, sep, rest = text.partition(":")
    key = kind.strip().lower().replace("_", "-")
    if key in ("fashion-mnist", "fashionmnist") and not sep:
        return DataSpec("fashion_mnist")
    if key == "imagefolder":
        if not rest:
            raise DataError(f"--data {text!r}: imagefolder needs a folder: imagefolder:DIR")
        return DataSpec("imagefolder", root=rest)
    if key == "synthetic":
        if not sep:
            return DataSpec("synthetic", samples=DEFAULT_SYNTHETIC_SAMPLES)
        try:
            samples = int(rest)
        except ValueError:
            samples = 0
        if samples < 1:
            raise DataError(f"--data {text!r}: synthetic:N needs a positive number of images N")
        return DataSpec("synthetic", samples=samples)
    raise DataError(f"--data {text!r}: unknown corpus; expected {DATA_FORMS}")


def channel_stats(values: Sequence[float], channels: int, name: str) -> Tuple[float, ...]:
    """``values`` (one per channel, one for all, or 3 for a 1-channel model: their mean) for ``channels``."""
    values = tuple(float(v) for v in (values if isinstance(values, (tuple, list)) else (values,)))
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise DataError(f"{name} has {len(values)} values, but the model takes {channels} input channels")


def load_data(spec: Union[str, DataSpec], *, train: bool, input_size: Tuple[int, int, int],
              mean: Sequence[float], std: Sequence[float], interpolation: str = "bilinear",
              crop_pct: float = 0.875, root: Optional[Union[str, Path]] = None, seed: int = 0):
    """The corpus ``spec`` names (split ``train``) as a dataset of normalised float32 images of
    ``input_size`` (C, H, W); see the module docstring. ``root``: where to look for Fashion-MNIST.
    Every returned dataset has an ``info`` attribute."""
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    channels, height, width = (int(v) for v in input_size)
    if channels not in (1, 3):
        raise DataError(f"--data {spec}: the model takes {channels} input channels; images give 1 or 3")
    mean, std = channel_stats(mean, channels, "mean"), channel_stats(std, channels, "std")
    interpolation = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    if spec.kind == "fashion_mnist":
        images, labels = load_fashion_mnist(root, train=train)
        return ResizedImageDataset(images.unsqueeze(1), labels, size=(height, width), channels=channels, mean=mean,
                                   std=std, num_classes=FASHION_MNIST_NUM_CLASSES, interpolation=interpolation,
                                   classes=FASHION_MNIST_CLASSES)
    if spec.kind == "synthetic":
        return SyntheticDataset(spec.samples, shape=(channels, height, width), seed=seed, train=train)
    if spec.kind == "imagefolder":
        if not Path(spec.root).expanduser().is_dir():
            raise DataError(f"--data {spec}: {spec.root} is not a directory (expected one sub-folder of images "
                            "per class: DIR/CLASS/IMAGE.jpg)")
        if not 0 < crop_pct <= 1:
            raise DataError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        resize = (math.floor(height / crop_pct) if height == width
                  else (math.floor(height / crop_pct), math.floor(width / crop_pct)))
        return load_image_folder(spec.root, train=train, image_size=height if height == width else (height, width),
                                 resize_size=resize, mean=mean, std=std, in_channels=channels,
                                 interpolation=interpolation)
    raise DataError(f"unknown corpus kind {spec.kind!r}; expected {DATA_FORMS}")
