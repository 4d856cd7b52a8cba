"""Fashion-MNIST from its IDX files (gzip or plain), parsed here with numpy.

Search order for the four files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
``t10k-...``): ``root`` if given, then ``$SPARSEKERN_DATA``, each as the folder itself or its
torchvision layout ``FashionMNIST/raw``; then the Debian package's folder
``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``). The first
folder holding both files of the requested split wins.

IDX format (LeCun): two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, then one big-endian
uint32 per dimension, then the data, big-endian, row-major.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from sparsekern.data.datasets import InMemoryImageDataset, data_roots, dataset_not_found

MEAN = 0.2860  # mean and std of the training pixels in [0, 1] units
STD = 0.3530
NUM_CLASSES = 10
IMAGE_SIZE = 28
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Parse one IDX file (gzip-compressed or plain, detected from its first bytes) into an array.

    Raises ValueError naming the file for a bad magic number, an unknown type code, a
    truncated or oversized payload, or a corrupt gzip stream.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}, expected 0000TTDD)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02x}")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header_size} for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header_size
    if found != expected:
        state = "truncated" if found < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX data {state}: shape {shape} needs {expected} bytes, found {found}")
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


def _split_files(train: bool) -> Tuple[str, str]:
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _candidate_dirs(root: Optional[Union[str, Path]]) -> List[Path]:
    folders = []
    for base in data_roots(root):
        folders += [base, base / "FashionMNIST" / "raw"]
    return folders + [DEBIAN_DIR]


def _find_file(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(root: Optional[Union[str, Path]] = None, train: bool = True) -> Tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of one split; FileNotFoundError says how to get them."""
    stems = _split_files(train)
    searched = _candidate_dirs(root)
    for folder in searched:
        found = [_find_file(folder, stem) for stem in stems]
        if all(found):
            return found[0], found[1]
    raise dataset_not_found(
        f"Fashion-MNIST {'train' if train else 'test'} split ({stems[0]}[.gz], {stems[1]}[.gz])",
        searched,
        "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, into "
        f"{DEBIAN_DIR}), or on a machine with internet run "
        "torchvision.datasets.FashionMNIST(ROOT, download=True) and pass --data-root ROOT.",
    )


def load_fashion_mnist(
    root: Optional[Union[str, Path]] = None, train: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One split as (uint8 images (N, 28, 28), int64 labels (N,)), checked for consistency."""
    images_path, labels_path = find_fashion_mnist(root, train)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{images_path}: expected uint8 images (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected uint8 labels (N,), got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{labels_path}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(InMemoryImageDataset):
    """Fashion-MNIST in memory: samples are float32 (1, 28, 28) normalised with mean 0.2860,
    std 0.3530; ``augment=True`` adds random crops (padding 2) and horizontal flips.
    ``source`` is the images file that was read."""

    def __init__(self, root: Optional[Union[str, Path]] = None, train: bool = True, augment: bool = False):
        self.source, _ = find_fashion_mnist(root, train)
        images, labels = load_fashion_mnist(root, train)
        super().__init__(
            images.unsqueeze(1), labels, mean=MEAN, std=STD, num_classes=NUM_CLASSES,
            augment=augment, crop_padding=2, classes=CLASSES,
        )
