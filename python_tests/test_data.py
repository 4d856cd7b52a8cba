"""Data: IDX parsing, Fashion-MNIST discovery and normalisation, augmentation, loaders
(determinism, sharding), the get_dataset / dataset_info entry point, ImageFolder."""
import gzip
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import sparsekern.data.fashion_mnist as fmnist
from sparsekern.data import (
    DatasetInfo,
    FashionMNIST,
    InMemoryImageDataset,
    SyntheticDataset,
    TensorBatchLoader,
    dataset_info,
    first_samples,
    get_dataset,
    load_fashion_mnist,
    load_image_folder,
    make_loader,
    read_idx,
    run_dataset,
    sample_range,
    set_loader_epoch,
)

IDX_CODES = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype("int16"): 0x0B,
             np.dtype("int32"): 0x0C, np.dtype("float32"): 0x0D, np.dtype("float64"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written by hand from the format description."""
    header = bytes([0, 0, IDX_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array, compress):
    data = idx_bytes(np.asarray(array))
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture
def no_default_data(monkeypatch, tmp_path):
    """Hide $SPARSEKERN_DATA and the Debian folder so only the paths a test passes are searched."""
    monkeypatch.delenv("SPARSEKERN_DATA", raising=False)
    monkeypatch.setattr(fmnist, "DEBIAN_DIR", tmp_path / "no-debian-package")


def fake_fashion_mnist(folder, count=6, compress=True, seed=0):
    """Write a tiny Fashion-MNIST-shaped train split; return its (images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", images, compress)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", labels, compress)
    return images, labels


# --- IDX parsing ------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5),
        np.array([-70000, 1, 2**31 - 1], dtype=np.int32),
        np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        np.array([-3, 300, 7], dtype=np.int16),
    ],
    ids=["uint8-3d", "int32-1d", "float32-2d", "int16-1d"],
)
def test_read_idx_round_trip(tmp_path, array, compress):
    result = read_idx(write_idx(tmp_path / "file.idx", array, compress))
    assert result.dtype == array.dtype and result.dtype.isnative
    assert result.shape == array.shape
    np.testing.assert_array_equal(result, array)
    result[...] = 0  # a writable copy, not a view of the file's bytes


def test_read_idx_wrong_magic(tmp_path):
    data = bytearray(idx_bytes(np.zeros((2, 2), dtype=np.uint8)))
    data[0] = 0x12
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="magic number"):
        read_idx(tmp_path / "bad")
    data[0], data[2] = 0, 0x07  # no IDX type has code 7
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="type code 0x07"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_read_idx_truncated_and_oversized(tmp_path, compress):
    data = idx_bytes(np.ones((4, 3), dtype=np.int32))
    for name, payload, message in [
        ("short", data[:-5], "truncated"),
        ("header", data[:9], "truncated IDX header"),
        ("long", data + b"\x00", "trailing bytes"),
    ]:
        path = tmp_path / name
        path.write_bytes(gzip.compress(payload) if compress else payload)
        with pytest.raises(ValueError, match=message) as info:
            read_idx(path)
        assert str(path) in str(info.value)


def test_read_idx_truncated_gzip_stream(tmp_path):
    packed = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(tmp_path / "cut.gz")


# --- Fashion-MNIST discovery ---------------------------------------------------------------

@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_load_fashion_mnist_from_root(tmp_path, no_default_data, layout, compress):
    folder = tmp_path / "data" if layout == "flat" else tmp_path / "data" / "FashionMNIST" / "raw"
    images, labels = fake_fashion_mnist(folder, compress=compress)
    got_images, got_labels = load_fashion_mnist(tmp_path / "data", train=True)
    assert got_images.dtype == torch.uint8 and got_images.shape == (6, 28, 28)
    assert got_labels.dtype == torch.int64
    np.testing.assert_array_equal(got_images.numpy(), images)
    np.testing.assert_array_equal(got_labels.numpy(), labels.astype(np.int64))


def test_load_fashion_mnist_search_order(tmp_path, monkeypatch, no_default_data):
    from_root, _ = fake_fashion_mnist(tmp_path / "root", seed=1)
    from_env, _ = fake_fashion_mnist(tmp_path / "env", seed=2)
    monkeypatch.setenv("SPARSEKERN_DATA", str(tmp_path / "env"))
    np.testing.assert_array_equal(load_fashion_mnist(tmp_path / "root")[0].numpy(), from_root)
    np.testing.assert_array_equal(load_fashion_mnist()[0].numpy(), from_env)
    # A root without the files falls through to the next place.
    (tmp_path / "empty").mkdir()
    np.testing.assert_array_equal(load_fashion_mnist(tmp_path / "empty")[0].numpy(), from_env)
    monkeypatch.delenv("SPARSEKERN_DATA")
    monkeypatch.setattr(fmnist, "DEBIAN_DIR", tmp_path / "root")
    np.testing.assert_array_equal(load_fashion_mnist()[0].numpy(), from_root)


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10"])
def test_a_root_that_does_not_exist_is_an_error_not_the_default_copy(tmp_path, monkeypatch, name):
    # The data is there under $SPARSEKERN_DATA and in the "Debian" folder, but the explicit root
    # names a folder that is not: that is a mistake to report, not a reason to use another copy.
    fake_fashion_mnist(tmp_path / "env")
    monkeypatch.setenv("SPARSEKERN_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(fmnist, "DEBIAN_DIR", tmp_path / "env")
    missing = tmp_path / "typo"
    with pytest.raises(FileNotFoundError) as info:
        get_dataset(name, train=True, root=missing)
    assert f"data root {str(missing)!r}" in str(info.value) and "not an existing directory" in str(info.value)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        get_dataset(name, train=True, root=tmp_path / "a-file")
    assert len(get_dataset("fashion-mnist", train=True)) == 6  # the default places still work


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, no_default_data):
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(tmp_path, train=False)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-root" in message and "SPARSEKERN_DATA" in message
    assert "t10k-images-idx3-ubyte" in message and str(tmp_path) in message


def test_fashion_mnist_inconsistent_files(tmp_path, no_default_data):
    fake_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8), True)
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        load_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(6, 10, dtype=np.uint8), True)
    with pytest.raises(ValueError, match="label 10 outside 0..9"):
        load_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((6, 27, 28), dtype=np.uint8), True)
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_dataset_normalises(tmp_path, no_default_data):
    images, labels = fake_fashion_mnist(tmp_path)
    dataset = FashionMNIST(tmp_path, train=True)
    assert len(dataset) == 6 and dataset.info == DatasetInfo(1, 10, 28)
    for i in (0, 5):
        x, y = dataset[i]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and int(y) == labels[i]
        expected = (images[i].astype(np.float64) / 255.0 - 0.2860) / 0.3530
        np.testing.assert_allclose(x[0].numpy(), expected, rtol=0, atol=1e-5)


def real_fashion_mnist_available():
    try:
        fmnist.find_fashion_mnist(train=True)
        fmnist.find_fashion_mnist(train=False)
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(
    not real_fashion_mnist_available(),
    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist, or set SPARSEKERN_DATA)",
)
def test_real_fashion_mnist():
    for train, count in ((True, 60000), (False, 10000)):
        images, labels = load_fashion_mnist(train=train)
        assert images.shape == (count, 28, 28) and labels.shape == (count,)
        # Fashion-MNIST is balanced: every class 0..9 has a tenth of the samples.
        assert torch.bincount(labels, minlength=10).tolist() == [count // 10] * 10
    # Exact pixel statistics of the training set from its 256-level histogram, in float64.
    train_images, _ = load_fashion_mnist(train=True)
    counts = np.bincount(train_images.numpy().ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256) / 255.0
    mean = (counts * levels).sum() / counts.sum()
    std = np.sqrt((counts * (levels - mean) ** 2).sum() / counts.sum())
    assert abs(mean - 0.2860) < 5e-4 and abs(std - 0.3530) < 5e-4
    dataset = FashionMNIST(train=True)
    assert dataset.info == DatasetInfo(1, 10, 28) and len(dataset) == 60000
    x, _ = dataset.get_batch(torch.arange(2000))
    expected = (train_images[:2000, None].double() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)


# --- in-memory datasets and augmentation ------------------------------------------------

def indexed_dataset(count, **kw):
    """Images whose pixels all equal their index and labels equal to it: batches name their samples."""
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 1, 3, 3).clone()
    return InMemoryImageDataset(images, torch.arange(count), mean=0.0, std=1 / 255, num_classes=count, **kw)


def test_in_memory_dataset_rejects_bad_input():
    images = torch.zeros(4, 1, 5, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        InMemoryImageDataset(images.float(), torch.zeros(4, dtype=torch.int64), mean=0, std=1, num_classes=2)
    with pytest.raises(ValueError, match="int64"):
        InMemoryImageDataset(images, torch.zeros(4, dtype=torch.int32), mean=0, std=1, num_classes=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        InMemoryImageDataset(images, torch.tensor([0, 1, 2, 0]), mean=0, std=1, num_classes=2)
    with pytest.raises(ValueError, match="one per channel"):
        InMemoryImageDataset(images, torch.zeros(4, dtype=torch.int64), mean=(0, 0), std=1, num_classes=2)
    with pytest.raises(ValueError, match="std must be > 0"):
        InMemoryImageDataset(images, torch.zeros(4, dtype=torch.int64), mean=0, std=0, num_classes=2)


def test_get_batch_matches_per_sample_and_dataloader():
    dataset = SyntheticDataset(12, shape=(3, 5, 7), num_classes=4, seed=3)
    mean = dataset.mean.double().view(1, 3, 1, 1)
    std = dataset.std.double().view(1, 3, 1, 1)
    expected = (dataset.images.double() / 255 - mean) / std
    x, y = dataset.get_batch(torch.arange(12))
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(y, dataset.labels)
    xs, ys = next(iter(DataLoader(dataset, batch_size=12)))
    torch.testing.assert_close(xs, x)
    assert torch.equal(ys, y)


def test_synthetic_dataset_is_seeded_and_split():
    a = SyntheticDataset(50, shape=(2, 6, 6), num_classes=3, seed=5)
    b = SyntheticDataset(50, shape=(2, 6, 6), num_classes=3, seed=5)
    test = SyntheticDataset(50, shape=(2, 6, 6), num_classes=3, seed=5, train=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, test.images)
    assert a.info == DatasetInfo(2, 3, 6)
    # Normalised with its own statistics: per-channel mean 0, std 1 (float64 reference).
    x, _ = a.get_batch(torch.arange(50))
    per_channel = x.double().transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(per_channel.std(1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-5)
    # Learnable: a sample is closer to its own class template than to the others.
    templates = torch.stack([a.images[a.labels == c].double().mean(0) for c in range(3)])
    distances = ((a.images.double()[:, None] - templates[None]) ** 2).flatten(2).sum(2)
    assert (distances.argmin(1) == a.labels).float().mean() > 0.9


def test_augmentation_is_a_crop_and_flip_of_the_padded_image():
    dataset = SyntheticDataset(40, shape=(2, 5, 7), num_classes=3, seed=0, augment=True, crop_padding=2)
    generator = torch.Generator().manual_seed(0)
    x, y = dataset.get_batch(torch.arange(40), generator)
    mean = dataset.mean.double().view(2, 1, 1)
    std = dataset.std.double().view(2, 1, 1)
    used = set()
    for i in range(40):
        padded = F.pad(dataset.images[i].double(), (2, 2, 2, 2))  # black (0) border, as RandomCrop
        matches = [
            (dy, dx, flip)
            for dy in range(5) for dx in range(5) for flip in (False, True)
            if torch.allclose(
                x[i].double(),
                ((padded[:, dy:dy + 5, dx:dx + 7].flip(-1) if flip else padded[:, dy:dy + 5, dx:dx + 7]) / 255 - mean)
                / std,
                atol=1e-5,
            )
        ]
        assert matches, f"sample {i} is no crop/flip of its padded image"
        used.update(matches)
    assert torch.equal(y, dataset.labels)
    assert len({m[2] for m in used}) == 2 and len({m[:2] for m in used}) > 8  # flips and many offsets


# --- loaders ---------------------------------------------------------------------------

def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_fast_loader_is_deterministic_given_seed():
    dataset = SyntheticDataset(30, shape=(1, 6, 6), num_classes=3, seed=0, augment=True)
    first = make_loader(dataset, 8, shuffle=True, seed=7)
    second = make_loader(dataset, 8, shuffle=True, seed=7)
    assert isinstance(first, TensorBatchLoader) and len(first) == 4
    epoch0, epoch1 = collect(first), collect(first)
    assert same_batches(epoch0, collect(second)) and same_batches(epoch1, collect(second))
    assert not same_batches(epoch0, epoch1)  # a new order (and new crops) every epoch
    assert not same_batches(epoch0, collect(make_loader(dataset, 8, shuffle=True, seed=8)))
    set_loader_epoch(first, 0)
    assert same_batches(collect(first), epoch0)
    # Every sample once per epoch; drop_last drops the short batch.
    assert sorted(torch.cat([y for _, y in epoch0]).tolist()) == sorted(dataset.labels.tolist())
    assert [x.shape[0] for x, _ in epoch0] == [8, 8, 8, 6]
    assert [x.shape[0] for x, _ in make_loader(dataset, 8, True, 7, drop_last=True)] == [8, 8, 8]
    unshuffled = torch.cat([y for _, y in make_loader(indexed_dataset(10), 4)])
    assert unshuffled.tolist() == list(range(10))


def test_dataloader_path_is_deterministic_given_seed():
    dataset = TensorDataset(torch.arange(20).float(), torch.arange(20))
    orders = [[y.tolist() for _, y in make_loader(dataset, 6, shuffle=True, seed=s)] for s in (3, 3, 4)]
    assert orders[0] == orders[1] and orders[0] != orders[2]
    assert sorted(sum(orders[0], [])) == list(range(20))
    augmented = SyntheticDataset(12, shape=(1, 6, 6), num_classes=2, seed=0, augment=True)
    runs = [collect(make_loader(augmented, 4, shuffle=True, seed=1, num_workers=1)) for _ in range(2)]
    assert isinstance(make_loader(augmented, 4, num_workers=1), DataLoader)
    assert same_batches(runs[0], runs[1])


@pytest.mark.parametrize("count", [10, 11, 1])
@pytest.mark.parametrize("shuffle", [True, False])
def test_fast_loader_shards_like_distributed_sampler(count, shuffle):
    dataset = indexed_dataset(count)
    per_rank = []
    for rank in range(2):
        loader = make_loader(dataset, 3, shuffle=shuffle, seed=5, rank=rank, world_size=2)
        seen = torch.cat([y for _, y in loader]).tolist()
        reference = list(DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=shuffle, seed=5))
        assert seen == reference
        per_rank.append(seen)
    assert len(per_rank[0]) == len(per_rank[1]) == -(-count // 2)
    everything = per_rank[0] + per_rank[1]
    assert set(everything) == set(range(count))
    if count % 2 == 0:
        assert sorted(everything) == list(range(count))  # exactly once


def test_dataloader_path_shards_across_ranks():
    dataset = TensorDataset(torch.arange(14).float(), torch.arange(14))
    seen = [torch.cat([y for _, y in make_loader(dataset, 4, True, 0, rank=r, world_size=2)]).tolist() for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 7
    assert sorted(seen[0] + seen[1]) == list(range(14))


def test_loader_reads_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    loader = make_loader(indexed_dataset(6), 2, shuffle=False)
    assert (loader.rank, loader.world_size) == (1, 2)
    assert torch.cat([y for _, y in loader]).tolist() == [1, 3, 5]


def test_loader_rejects_bad_arguments():
    dataset = indexed_dataset(4)
    with pytest.raises(ValueError, match="both rank and world_size"):
        make_loader(dataset, 2, rank=0)
    with pytest.raises(ValueError, match="rank < world_size"):
        make_loader(dataset, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(dataset, 0)


# --- entry point -------------------------------------------------------------------------

def test_dataset_info_and_names():
    assert dataset_info("fashion_mnist") == DatasetInfo(1, 10, 28)
    assert dataset_info("Fashion-MNIST") == dataset_info("fashion_mnist")
    assert dataset_info("cifar10") == DatasetInfo(3, 10, 32)
    assert dataset_info("CIFAR-100") == DatasetInfo(3, 100, 32)
    assert dataset_info("imagenet") == DatasetInfo(3, 1000, 224)
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_info("mnist3d")
    with pytest.raises(ValueError, match="get_dataset"):
        dataset_info("imagefolder")


def test_get_dataset(tmp_path, no_default_data):
    images, _ = fake_fashion_mnist(tmp_path)
    dataset = get_dataset("fashion-mnist", train=True, root=tmp_path, augment=True)
    assert isinstance(dataset, FashionMNIST) and dataset.augment and dataset.crop_padding == 2
    assert torch.equal(dataset.images[:, 0], torch.from_numpy(images))
    synthetic = get_dataset("synthetic", train=False, num_samples=20, shape=(3, 32, 32), num_classes=5)
    assert len(synthetic) == 20 and synthetic.info == DatasetInfo(3, 5, 32)
    with pytest.raises(TypeError, match="no options"):
        get_dataset("cifar10", train=True, num_samples=3)
    with pytest.raises(FileNotFoundError, match="--data-root"):
        get_dataset("fashion_mnist", train=False, root=tmp_path)


def test_missing_cifar_raises_clear_error(tmp_path, no_default_data):
    pytest.importorskip("torchvision")
    for name in ("cifar10", "cifar100"):
        with pytest.raises(FileNotFoundError) as info:
            get_dataset(name, train=True, root=tmp_path)
        assert "download=True" in str(info.value) and "--data-root" in str(info.value)
        assert str(tmp_path) in str(info.value)


def test_image_folder(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    colours = {"cat": (255, 0, 51), "dog": (0, 128, 255)}
    for split in ("train", "val"):
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), colour).save(tmp_path / split / name / f"{i}.png")
    dataset = load_image_folder(tmp_path, train=False, image_size=16, resize_size=20)
    assert dataset.info == DatasetInfo(3, 2, 16) and dataset.classes == ["cat", "dog"]
    assert dataset.root.endswith("val")
    x, y = dataset[3]
    assert x.shape == (3, 16, 16) and y == 1
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(3, 1, 1)
    expected = (torch.tensor(colours["dog"], dtype=torch.float64).view(3, 1, 1) / 255 - mean) / std
    torch.testing.assert_close(x.double(), expected.expand(3, 16, 16), rtol=0, atol=1e-5)
    augmented = get_dataset("imagefolder", train=True, root=tmp_path, augment=True, image_size=12)
    assert augmented[0][0].shape == (3, 12, 12)
    with pytest.raises(FileNotFoundError, match="one sub-folder"):
        load_image_folder(tmp_path / "missing")


# ---------------------------------------------------------------------- a run's splits
def run_config(**fields):
    """The fields of a RunConfig that run_dataset reads."""
    return SimpleNamespace(**{"dataset": "synthetic", "data_root": None, "num_train_samples": None,
                              "num_test_samples": None, **fields})


def test_run_dataset_limits_each_split_as_the_config_says():
    full_train = get_dataset("synthetic", train=True)  # 512 samples by default
    full_test = get_dataset("synthetic", train=False)
    config = run_config(num_train_samples=40, num_test_samples=24)
    train, test = run_dataset(config, "train"), run_dataset(config, "test")
    assert (len(train), len(test)) == (40, 24)
    assert torch.equal(train.images, full_train.images[:40]) and torch.equal(test.labels, full_test.labels[:24])
    # Same normalisation as the whole corpus: the first samples' batches are the whole corpus' first batches.
    torch.testing.assert_close(train.get_batch(torch.arange(5))[0], full_train.get_batch(torch.arange(5))[0],
                               rtol=0, atol=0)
    assert len(run_dataset(config, "train", samples=10)) == 10
    assert len(run_dataset(config, "train", samples=1000)) == 40  # samples only ever narrows the config's limit
    assert len(run_dataset(run_config(), "test")) == len(full_test)
    assert not train.augment and run_dataset(config, "train", augment=True).augment
    with pytest.raises(ValueError, match="split must be one of"):
        run_dataset(config, "validation")


def test_run_dataset_moves_in_memory_data_to_the_device():
    dataset = run_dataset(run_config(num_test_samples=8), "test", torch.device("meta"))
    assert dataset.images.device.type == "meta" and dataset.labels.device.type == "meta"
    assert run_dataset(run_config(num_test_samples=8), "test").images.device.type == "cpu"


def test_sample_range_and_first_samples_of_any_dataset():
    tensors = TensorDataset(torch.arange(10.0), torch.arange(10))
    tensors.info = DatasetInfo(1, 10, 1)
    middle = sample_range(tensors, 3, 7)
    assert [int(middle[i][1]) for i in range(len(middle))] == [3, 4, 5, 6] and middle.info == tensors.info
    assert first_samples(tensors, None) is tensors and first_samples(tensors, 99) is tensors
    assert [int(y) for _, y in first_samples(tensors, 2)] == [0, 1]
    images = SyntheticDataset(12, shape=(1, 4, 4), num_classes=3, seed=1, augment=True, crop_padding=1)
    tail = sample_range(images, 8, 12)
    assert torch.equal(tail.images, images.images[8:]) and tail.augment and tail.crop_padding == 1
    assert torch.equal(tail.mean, images.mean) and tail.info == images.info
