"""Datasets for sparsity experiments, behind one entry point.

    from sparsekern.data import get_dataset, dataset_info, make_loader
    train = get_dataset("fashion_mnist", train=True, augment=True)
    loader = make_loader(train, batch_size=40, shuffle=True, seed=0)
    info = dataset_info("fashion_mnist")   # DatasetInfo(in_channels=1, num_classes=10, image_size=28)
    train, test = run_dataset(config, "train", device), run_dataset(config, "test", device)   # a run's

Names: ``fashion_mnist`` (default of the project), ``cifar10``, ``cifar100``, ``imagenet``
(an ImageFolder tree with 1000 classes), ``imagefolder`` (any ImageFolder tree; ``root``
required), ``synthetic``. Hyphens and case are ignored (``Fashion-MNIST`` works). Nothing is
ever downloaded: a missing corpus raises FileNotFoundError saying how to get it.

For a model from elsewhere, :mod:`sparsekern.data.specs` reads a command line's ``--data``
(``fashion-mnist``, ``imagefolder:DIR``, ``synthetic[:N]``) and brings it to the model's input size,
channels and normalisation (``load_data``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from sparsekern.data.datasets import (
    DATA_ENV,
    DatasetInfo,
    InMemoryImageDataset,
    ResizedImageDataset,
    SyntheticDataset,
    TensorBatchLoader,
    dataset_not_found,
    first_samples,
    load_cifar,
    load_image_folder,
    make_loader,
    sample_range,
    set_loader_epoch,
)
from sparsekern.data.fashion_mnist import FashionMNIST, load_fashion_mnist, read_idx
from sparsekern.data.specs import DataSpec, load_data, parse_data_spec

_INFO = {
    "fashion_mnist": DatasetInfo(1, 10, 28),
    "cifar10": DatasetInfo(3, 10, 32),
    "cifar100": DatasetInfo(3, 100, 32),
    "imagenet": DatasetInfo(3, 1000, 224),
    "synthetic": DatasetInfo(1, 10, 28),  # SyntheticDataset's defaults
}
DATASETS = tuple(_INFO) + ("imagefolder",)


def _canonical(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10", "cifar_100": "cifar100"}.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """Input channels, class count and image size of dataset ``name``.

    ``imagefolder`` has no fixed answer: use the ``info`` attribute of the loaded dataset.
    """
    key = _canonical(name)
    if key == "imagefolder":
        raise ValueError("an imagefolder's class count depends on the folder: use get_dataset(...).info")
    return _INFO[key]


def get_dataset(
    name: str,
    *,
    train: bool,
    root: Optional[Union[str, Path]] = None,
    augment: bool = False,
    **options,
):
    """Load dataset ``name`` (split ``train``) from ``root`` (or the default places).

    Every returned dataset has an ``info`` attribute (:class:`DatasetInfo`). Options:
    ``synthetic`` takes ``num_samples`` (default 512), ``shape``, ``num_classes``, ``seed``;
    ``imagenet`` / ``imagefolder`` take ``image_size`` and ``resize_size``.
    """
    key = _canonical(name)
    if key not in ("synthetic", "imagenet", "imagefolder") and options:
        raise TypeError(f"dataset {key!r} takes no options {sorted(options)}")
    if key == "fashion_mnist":
        return FashionMNIST(root, train=train, augment=augment)
    if key in ("cifar10", "cifar100"):
        return load_cifar(10 if key == "cifar10" else 100, root, train=train, augment=augment)
    if key == "synthetic":
        options.setdefault("num_samples", 512)
        return SyntheticDataset(train=train, augment=augment, **options)
    if key == "imagenet":
        if root is None:
            if not os.environ.get(DATA_ENV):
                raise dataset_not_found(
                    "ImageNet", [], f"Point root (or ${DATA_ENV}/imagenet) at a folder with train/ and val/."
                )
            root = Path(os.environ[DATA_ENV]) / "imagenet"
        return load_image_folder(root, train=train, augment=augment, **options)
    if root is None:
        raise ValueError("the imagefolder dataset needs root= (the folder with one sub-folder per class)")
    return load_image_folder(root, train=train, augment=augment, **options)


SPLITS = ("train", "test")


def run_dataset(config, split: str, device: Optional[torch.device] = None, *, augment: bool = False,
                samples: Optional[int] = None):
    """Split ``split`` ("train" or "test") of a run's dataset, as its config says.

    ``config`` (a RunConfig, or anything with its fields): ``dataset`` from ``data_root``, limited
    to the first ``num_train_samples`` / ``num_test_samples``, and further to the first
    ``samples`` when given. ``augment``: random crops and flips (the training loop passes the
    run's ``augment`` for its training split; everything measured on a run uses none). An
    in-memory dataset is moved to ``device`` (when given), so batches are built there.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train = split == "train"
    dataset = get_dataset(config.dataset, train=train, root=config.data_root, augment=augment)
    limits = [n for n in (config.num_train_samples if train else config.num_test_samples, samples) if n is not None]
    dataset = first_samples(dataset, min(limits) if limits else None)
    if device is not None and isinstance(dataset, InMemoryImageDataset):
        dataset.to(device)
    return dataset


__all__ = [
    "DATA_ENV",
    "DATASETS",
    "DatasetInfo",
    "FashionMNIST",
    "InMemoryImageDataset",
    "DataSpec",
    "ResizedImageDataset",
    "SyntheticDataset",
    "TensorBatchLoader",
    "dataset_info",
    "first_samples",
    "get_dataset",
    "load_cifar",
    "load_fashion_mnist",
    "load_data",
    "load_image_folder",
    "make_loader",
    "parse_data_spec",
    "read_idx",
    "run_dataset",
    "sample_range",
    "set_loader_epoch",
]
