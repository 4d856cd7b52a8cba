"""In-memory image datasets, their fast batch loader, CIFAR, ImageFolder and synthetic data.

Small corpora (Fashion-MNIST, CIFAR, synthetic) live in memory as one uint8 tensor
``(N, C, H, W)`` (Fashion-MNIST train: 47 MB) in an :class:`InMemoryImageDataset`.
Normalisation and augmentation run on whole batches, so :class:`TensorBatchLoader` yields a
batch with a handful of tensor ops instead of B ``__getitem__`` calls and a collate; a
regular ``DataLoader`` still works through ``__getitem__``. :func:`make_loader` picks the
fast path when it can, is deterministic given ``seed`` and shards across ranks.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from sparsekern.errors import DataError

DATA_ENV = "SPARSEKERN_DATA"

CIFAR_STATS = {  # per-channel mean and std of the training images, in [0, 1] units
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset. ``image_size`` is H for square images, else (H, W)."""

    in_channels: int
    num_classes: int
    image_size: Union[int, Tuple[int, int]]


def dataset_not_found(what: str, searched: Sequence[Path], how_to_get: str) -> FileNotFoundError:
    """The FileNotFoundError every loader raises: what is missing, where it looked, how to get it."""
    places = ", ".join(str(p) for p in searched) or "(no folder given)"
    return FileNotFoundError(
        f"{what} not found; looked in: {places}. {how_to_get} "
        f"Or pass --data-root (root=...) or set {DATA_ENV} to the folder that holds it."
    )


def data_roots(root: Optional[Union[str, Path]]) -> List[Path]:
    """Folders to search, in order: ``root`` if given, then ``$SPARSEKERN_DATA`` if set.

    A ``root`` that is not an existing directory raises FileNotFoundError naming it: it is a typo
    or another machine's path, and searching on would quietly use some other copy of the data.
    """
    if root is not None and not Path(root).expanduser().is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} (--data-root / root=) is not an existing directory; "
                                f"leave it unset to search ${DATA_ENV} and the default places")
    return [Path(p).expanduser() for p in (root, os.environ.get(DATA_ENV)) if p]


class InMemoryImageDataset(Dataset):
    """A whole image corpus as one uint8 tensor, normalised (and augmented) per batch.

    ``images``: uint8 (N, C, H, W); ``labels``: int64 (N,) in [0, num_classes). ``mean`` /
    ``std``: per-channel statistics in [0, 1] units (one value is broadcast), so a sample
    becomes ``(image / 255 - mean) / std`` as float32. ``augment=True`` applies a random crop
    of the zero-padded image (``crop_padding`` pixels each side; padding is black, i.e. 0
    before normalisation, as torchvision's RandomCrop) and a horizontal flip with
    probability 1/2, independently per sample.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: Union[float, Sequence[float]],
        std: Union[float, Sequence[float]],
        num_classes: int,
        augment: bool = False,
        crop_padding: int = 0,
        classes: Optional[Sequence[str]] = None,
    ):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {_describe(images)}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise ValueError(f"labels must be an int64 tensor (N,), got {_describe(labels)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), found [{int(labels.min())}, {int(labels.max())}]")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        channels = images.shape[1]
        mean_t, std_t = (_per_channel(v, channels, name) for v, name in ((mean, "mean"), (std, "std")))
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be > 0 for every channel, got {std_t.tolist()}")
        self.images = images.contiguous()
        self.labels = labels
        self.mean = mean_t
        self.std = std_t
        self.augment = augment
        self.crop_padding = crop_padding
        self.classes = list(classes) if classes is not None else None
        height, width = images.shape[2], images.shape[3]
        self.info = DatasetInfo(channels, num_classes, height if height == width else (height, width))

    @property
    def targets(self) -> torch.Tensor:
        """The labels (torchvision datasets' name for them)."""
        return self.labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        # Augmentation here draws from torch's global RNG, which DataLoader seeds per worker.
        x, y = self.get_batch(torch.tensor([index]))
        return x[0], y[0]

    def get_batch(
        self, indices: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Samples ``indices`` as (float32 (B, C, H, W) normalised images, int64 (B,) labels).

        Augmentation randomness comes from ``generator`` (a CPU generator; the global RNG if None).
        """
        indices = indices.to(self.images.device)
        images = self.images[indices]
        if self.augment:
            images = self._crop_and_flip(images, generator)
        mean, std = self.mean.view(1, -1, 1, 1), self.std.view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std, self.labels[indices]

    def _crop_and_flip(self, images: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        count, channels, height, width = images.shape
        pad = self.crop_padding
        offsets = torch.randint(0, 2 * pad + 1, (2, count), generator=generator).to(images.device)
        flip = (torch.rand(count, generator=generator) < 0.5).to(images.device)
        padded = F.pad(images, (pad, pad, pad, pad))
        rows = offsets[0, :, None] + torch.arange(height, device=images.device)
        columns = torch.arange(width, device=images.device).expand(count, width)
        # A flip is a reversed column order inside the crop window: one gather does both.
        columns = torch.where(flip[:, None], columns.flip(1), columns) + offsets[1, :, None]
        return padded[
            torch.arange(count, device=images.device)[:, None, None, None],
            torch.arange(channels, device=images.device)[None, :, None, None],
            rows[:, None, :, None],
            columns[:, None, None, :],
        ]

    def to(self, device: Union[str, torch.device]) -> "InMemoryImageDataset":
        """Move the stored corpus (uint8) to ``device`` in place, so batches are built there; returns self."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def slice(self, start: int, stop: int) -> "InMemoryImageDataset":
        """Samples ``start`` to ``stop`` over views of the stored corpus, with the same normalisation
        and augmentation (what :func:`sample_range` returns; a subclass that batches differently
        overrides it)."""
        return InMemoryImageDataset(
            self.images[start:stop], self.labels[start:stop], mean=self.mean, std=self.std,
            num_classes=self.info.num_classes, augment=self.augment, crop_padding=self.crop_padding,
            classes=self.classes,
        )


class ResizedImageDataset(InMemoryImageDataset):
    """An in-memory uint8 corpus brought to a model's input per batch: scaled to [0, 1], resized to
    ``size`` (H, W) with ``interpolation`` (bilinear / bicubic antialiased, or nearest; clamped to
    [0, 1]), a single channel repeated to ``channels``, then normalised with the model's per-channel
    ``mean`` / ``std``. No augmentation. Used for Fashion-MNIST (1 x 28 x 28) fed to ImageNet models."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, size: Tuple[int, int], channels: int,
                 mean: Union[float, Sequence[float]], std: Union[float, Sequence[float]], num_classes: int,
                 interpolation: str = "bilinear", classes: Optional[Sequence[str]] = None):
        super().__init__(images, labels, mean=0.0, std=1.0, num_classes=num_classes, classes=classes)
        if images.shape[1] not in (1, channels):
            raise ValueError(f"cannot make {channels}-channel inputs of {images.shape[1]}-channel images")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, got {interpolation!r}")
        self.size = (int(size[0]), int(size[1]))
        self.channels = channels
        self.interpolation = interpolation
        self.mean, self.std = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
        if not bool((self.std > 0).all()):
            raise ValueError(f"std must be > 0 for every channel, got {self.std.tolist()}")
        height, width = self.size
        self.info = DatasetInfo(channels, num_classes, height if height == width else self.size)

    def get_batch(
        self, indices: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        indices = indices.to(self.images.device)
        images = self.images[indices].float() / 255.0
        if tuple(images.shape[-2:]) != self.size:
            smooth = self.interpolation != "nearest"
            images = F.interpolate(images, size=self.size, mode=self.interpolation, antialias=smooth,
                                   **({"align_corners": False} if smooth else {})).clamp_(0.0, 1.0)
        if images.shape[1] != self.channels:
            images = images.expand(-1, self.channels, -1, -1)
        mean, std = self.mean.view(1, -1, 1, 1), self.std.view(1, -1, 1, 1)
        return (images - mean) / std, self.labels[indices]

    def slice(self, start: int, stop: int) -> "ResizedImageDataset":
        return ResizedImageDataset(self.images[start:stop], self.labels[start:stop], size=self.size,
                                   channels=self.channels, mean=self.mean, std=self.std,
                                   num_classes=self.info.num_classes, interpolation=self.interpolation,
                                   classes=self.classes)


def sample_range(dataset, start: int, stop: int):
    """Samples ``start`` to ``stop`` of ``dataset``, in order, as a dataset with the same ``info``:
    an InMemoryImageDataset over views of the stored corpus (``dataset.slice``: same normalisation
    and augmentation), or a Subset of any other dataset."""
    if isinstance(dataset, InMemoryImageDataset):
        return dataset.slice(start, stop)
    subset = Subset(dataset, range(start, stop))
    subset.info = dataset.info
    return subset


def first_samples(dataset, n: Optional[int]):
    """The first ``n`` samples of ``dataset`` (the whole of it when n is None or larger)."""
    if n is None or n >= len(dataset):
        return dataset
    return sample_range(dataset, 0, n)


class SyntheticDataset(InMemoryImageDataset):
    """A learnable synthetic classification task of uint8 images, for tests and smoke runs.

    Each class has a random template image (drawn from ``seed``); a sample is half its class
    template plus uniform noise in [0, 127]. ``train=True`` and ``train=False`` share the
    templates but draw different samples and labels. Normalised with the dataset's own
    per-channel mean and std. ``shape`` is (C, H, W).
    """

    def __init__(
        self,
        num_samples: int,
        shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        seed: int = 0,
        *,
        train: bool = True,
        augment: bool = False,
        crop_padding: int = 2,
    ):
        shape = tuple(shape)
        if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"shape must be (C, H, W) with positive ints, got {shape!r}")
        if not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        templates = torch.randint(0, 256, (num_classes, *shape), generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.uint8)
        # A second stream per split; 2 * seed + 1 / 2 * seed + 2 never collides with another seed's.
        split = torch.Generator().manual_seed(2 * seed + (1 if train else 2))
        labels = torch.randint(0, num_classes, (num_samples,), generator=split)
        noise = torch.randint(0, 128, (num_samples, *shape), generator=split, dtype=torch.uint8)
        images = templates[labels] // 2 + noise
        pixels = images.transpose(0, 1).reshape(shape[0], -1).double() / 255.0
        mean = pixels.mean(dim=1) if num_samples else torch.full((shape[0],), 0.5, dtype=torch.float64)
        std = pixels.std(dim=1) if num_samples > 1 else torch.full((shape[0],), 0.25, dtype=torch.float64)
        super().__init__(
            images, labels, mean=mean.tolist(), std=std.clamp_min(1e-6).tolist(), num_classes=num_classes,
            augment=augment, crop_padding=crop_padding,
        )


def load_cifar(
    num_classes: int = 10, root: Optional[Union[str, Path]] = None, *, train: bool = True, augment: bool = False
) -> InMemoryImageDataset:
    """CIFAR-10 or CIFAR-100 (``num_classes``) from disk via torchvision, as an in-memory dataset.

    Looks in ``root`` then ``$SPARSEKERN_DATA`` for torchvision's layout (``cifar-10-batches-py`` /
    ``cifar-100-python``); never downloads. Augmentation: random crop with padding 4 + flip.
    """
    if num_classes not in CIFAR_STATS:
        raise ValueError(f"CIFAR has 10 or 100 classes, not {num_classes!r}")
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if num_classes == 10 else CIFAR100
    searched = data_roots(root)
    for folder in searched:
        try:
            corpus = cls(str(folder), train=train, download=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            continue
        images = torch.from_numpy(corpus.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        mean, std = CIFAR_STATS[num_classes]
        return InMemoryImageDataset(
            images, torch.tensor(corpus.targets, dtype=torch.int64), mean=mean, std=std,
            num_classes=num_classes, augment=augment, crop_padding=4, classes=corpus.classes,
        )
    raise dataset_not_found(
        f"CIFAR-{num_classes} ({'train' if train else 'test'})",
        searched,
        f"On a machine with internet run torchvision.datasets.CIFAR{num_classes}(ROOT, download=True) "
        "and copy ROOT here.",
    )


def load_image_folder(
    root: Union[str, Path],
    *,
    train: bool = True,
    image_size: Union[int, Tuple[int, int]] = 224,
    resize_size: Union[int, Tuple[int, int]] = 256,
    augment: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    in_channels: int = 3,
    interpolation: str = "bilinear",
):
    """An ImageNet-style corpus (one sub-folder per class) as ``torchvision.datasets.ImageFolder``.

    Uses ``root/train`` or ``root/val`` for the split when that sub-folder exists, else ``root``.
    Eval transform: Resize(resize_size) -> CenterCrop(image_size) -> normalise; with
    ``augment``: RandomResizedCrop(image_size) -> horizontal flip -> normalise. Images are read as
    RGB (grayscale ones repeated to 3 channels) or, with ``in_channels=1``, as grayscale;
    ``interpolation`` is torchvision's (bilinear, bicubic, nearest). The returned dataset has an
    ``info`` attribute (:class:`DatasetInfo`). A folder with no class sub-folder or no image is a
    DataError naming it; an image that cannot be decoded is a DataError naming the file when it is
    read.
    """
    from torchvision import datasets, transforms

    if in_channels not in (1, 3):
        raise ValueError(f"an image folder gives 1- or 3-channel images, not in_channels={in_channels!r}")
    base = Path(root).expanduser()
    split = base / ("train" if train else "val")
    folder = split if split.is_dir() else base
    if not folder.is_dir():
        raise dataset_not_found(
            f"image folder {folder}", [folder], "It must hold one sub-folder of images per class."
        )
    mode = transforms.InterpolationMode(interpolation)
    if augment:
        steps = [transforms.RandomResizedCrop(image_size, interpolation=mode), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(resize_size, interpolation=mode), transforms.CenterCrop(image_size)]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    loader = functools.partial(read_image, mode="RGB" if in_channels == 3 else "L")
    try:
        dataset = datasets.ImageFolder(str(folder), transform=transforms.Compose(steps), loader=loader)
    except FileNotFoundError as exc:  # torchvision: no class folder, or no file with an image extension
        raise DataError(f"image folder {folder} holds no images ({_first_line(exc)}); it must hold one "
                        "sub-folder per class with image files in it (DIR/CLASS/IMAGE.jpg)") from None
    except OSError as exc:  # e.g. a folder that cannot be listed
        raise DataError(f"image folder {folder} cannot be read ({exc})") from None
    size = image_size if isinstance(image_size, int) or image_size[0] != image_size[1] else image_size[0]
    dataset.info = DatasetInfo(in_channels, len(dataset.classes), size if isinstance(size, int) else tuple(size))
    return dataset


def read_image(path: str, mode: str = "RGB"):
    """One image file as a PIL image in ``mode``; a file PIL cannot decode is a DataError naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            return image.convert(mode)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: UnidentifiedImageError (an OSError), truncated
        raise DataError(f"image {path} cannot be read ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class TensorBatchLoader:
    """Batches of an :class:`InMemoryImageDataset` without per-sample Python work.

    Yields ``(images, labels)`` like a DataLoader. The order of epoch ``e`` is
    ``torch.randperm(N)`` from a generator seeded ``seed + e`` (or ``arange(N)`` without
    ``shuffle``), padded by wrapping around to a multiple of ``world_size`` and dealt out
    ``[rank::world_size]`` -- the same indices ``DistributedSampler(shuffle, seed)`` gives,
    so every sample is seen once per epoch across ranks (plus the few wrapped ones). The
    epoch counter advances after each pass; :meth:`set_epoch` sets it explicitly.
    """

    def __init__(
        self,
        dataset: InMemoryImageDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not isinstance(dataset, InMemoryImageDataset):
            raise TypeError(f"TensorBatchLoader needs an InMemoryImageDataset, got {type(dataset).__name__}")
        _check_batch_size(batch_size)
        _check_rank(rank, world_size)
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order on the next pass (as ``DistributedSampler.set_epoch``)."""
        self.epoch = epoch

    def _samples_per_rank(self) -> int:
        return math.ceil(len(self.dataset) / self.world_size)

    def __len__(self) -> int:
        per_rank = self._samples_per_rank()
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        total = len(self.dataset)
        order = torch.randperm(total, generator=generator) if self.shuffle else torch.arange(total)
        padding = self._samples_per_rank() * self.world_size - total
        if padding:
            order = torch.cat([order, order.repeat(math.ceil(padding / total))[:padding]])
        shard = order[self.rank :: self.world_size]
        # Each rank's augmentation gets its own stream, derived from the same epoch generator.
        augment_seed = int(torch.randint(0, 2**62, (self.world_size,), generator=generator)[self.rank])
        augment_generator = torch.Generator().manual_seed(augment_seed)
        for batch in range(len(self)):
            indices = shard[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self.dataset.get_batch(indices, augment_generator)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    pin_memory: bool = False,
):
    """A batch iterator over ``dataset``, deterministic given ``seed``, sharded across ranks.

    An :class:`InMemoryImageDataset` with ``num_workers=0`` gets the fast
    :class:`TensorBatchLoader`; anything else a ``DataLoader`` (with a ``DistributedSampler``
    when sharded). ``rank`` / ``world_size`` default to torch.distributed's when it is
    initialised, else 0 / 1. Call :func:`set_loader_epoch` before each epoch to make the
    order depend on the epoch explicitly (the fast loader also advances by itself).
    """
    _check_batch_size(batch_size)
    rank, world_size = _resolve_distributed(rank, world_size)
    if isinstance(dataset, InMemoryImageDataset) and num_workers == 0:
        return TensorBatchLoader(
            dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size
        )
    # The generator fixes RandomSampler's order and the workers' base seeds (their augmentation).
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        pin_memory=pin_memory,
    )


def set_loader_epoch(loader, epoch: int) -> None:
    """Set the epoch of a loader from :func:`make_loader` (fast loader or distributed sampler)."""
    if isinstance(loader, TensorBatchLoader):
        loader.set_epoch(epoch)
    elif isinstance(getattr(loader, "sampler", None), DistributedSampler):
        loader.sampler.set_epoch(epoch)


def _resolve_distributed(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    if rank is None and world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
    _check_rank(rank, world_size)
    return rank, world_size


def _check_rank(rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _per_channel(value, channels: int, name: str) -> torch.Tensor:
    values = torch.as_tensor(value, dtype=torch.float32).flatten()
    if values.numel() == 1:
        values = values.expand(channels)
    if values.numel() != channels:
        raise ValueError(f"{name} needs 1 or {channels} values (one per channel), got {values.numel()}")
    return values.clone()


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
