"""sparsekern.data.specs: --data fashion-mnist | imagefolder:DIR | synthetic[:N], brought to a model's
input (size, channels, normalisation); ImageFolder on real JPEG / PNG files written here, checked
against an independent PIL + numpy pipeline."""
import math
import re

import numpy as np
import pytest
import torch

from sparsekern.data import make_loader
from sparsekern.data.datasets import ResizedImageDataset, first_samples
from sparsekern.data.specs import DataSpec, channel_stats, load_data, parse_data_spec
from sparsekern.errors import DataError

Image = pytest.importorskip("PIL.Image")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_folder(root, classes=("cat", "dog"), per_class=3, side=40, seed=0):
    """root/<class>/<i>.{png,jpg}: noise images, RGB PNG, RGB JPEG and grayscale PNG in turn."""
    rng = np.random.default_rng(seed)
    paths = []
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            kind = i % 3
            if kind == 2:
                image = Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), mode="L")
            else:
                image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), mode="RGB")
            path = root / name / f"{i}.{'jpg' if kind == 1 else 'png'}"
            image.save(path)
            paths.append(path)
    return paths


def reference_image(path, size, crop_pct, mean, std, mode="RGB", resample=Image.BICUBIC):
    """What an eval pipeline should give, by hand: PIL decode -> mode -> resize the (square) image to
    floor(size / crop_pct) -> centre crop -> [0, 1] -> per-channel normalise; (C, H, W) float64."""
    image = Image.open(path).convert(mode)
    scaled = math.floor(size / crop_pct)
    image = image.resize((scaled, scaled), resample)
    top = int(round((scaled - size) / 2.0))
    image = image.crop((top, top, top + size, top + size))
    array = np.asarray(image, dtype=np.float64) / 255.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return (array - np.array(mean).reshape(-1, 1, 1)) / np.array(std).reshape(-1, 1, 1)


@pytest.mark.parametrize("text, expected", [
    ("fashion-mnist", DataSpec("fashion_mnist")),
    ("Fashion_MNIST", DataSpec("fashion_mnist")),
    ("imagefolder:/data/photos", DataSpec("imagefolder", root="/data/photos")),
    ("imagefolder:C:/x", DataSpec("imagefolder", root="C:/x")),
    ("synthetic", DataSpec("synthetic", samples=256)),
    ("synthetic:12", DataSpec("synthetic", samples=12)),
])
def test_parse_data_spec(text, expected):
    assert parse_data_spec(text) == expected


@pytest.mark.parametrize("text, message", [
    ("cifar10", "unknown corpus; expected fashion-mnist, imagefolder:DIR or synthetic[:N]"),
    ("imagefolder", "imagefolder needs a folder"),
    ("imagefolder:", "imagefolder needs a folder"),
    ("synthetic:0", "positive number of images"),
    ("synthetic:many", "positive number of images"),
    ("fashion-mnist:x", "unknown corpus"),
])
def test_bad_data_specs_name_the_forms(text, message):
    with pytest.raises(DataError) as info:
        parse_data_spec(text)
    assert message in str(info.value) and repr(text) in str(info.value)


def test_channel_stats():
    assert channel_stats(MEAN, 3, "mean") == MEAN
    assert channel_stats(MEAN, 1, "mean") == pytest.approx((sum(MEAN) / 3,))
    assert channel_stats((0.5,), 3, "mean") == (0.5, 0.5, 0.5)
    with pytest.raises(DataError, match="2 values, but the model takes 3"):
        channel_stats((0.1, 0.2), 3, "std")


@pytest.mark.parametrize("channels, mode", [(3, "RGB"), (1, "L")])
def test_imagefolder_matches_a_hand_pipeline(tmp_path, channels, mode):
    paths = write_folder(tmp_path)
    mean, std = channel_stats(MEAN, channels, "mean"), channel_stats(STD, channels, "std")
    dataset = load_data(f"imagefolder:{tmp_path}", train=True, input_size=(channels, 32, 32), mean=MEAN, std=STD,
                        interpolation="bicubic", crop_pct=0.875)
    assert dataset.info.in_channels == channels and dataset.info.num_classes == 2 and dataset.info.image_size == 32
    assert len(dataset) == len(paths)
    images, labels = next(iter(make_loader(dataset, len(dataset))))
    assert images.shape == (len(paths), channels, 32, 32) and images.dtype == torch.float32
    by_path = {p: i for i, (p, _) in enumerate(dataset.samples)}
    for path in paths:
        i = by_path[str(path)]
        expected = reference_image(path, 32, 0.875, mean, std, mode=mode)
        np.testing.assert_allclose(images[i].double().numpy(), expected, rtol=0, atol=1e-5, err_msg=str(path))
        assert int(labels[i]) == ("cat", "dog").index(path.parent.name)
    gray = next(p for p in paths if p.suffix == ".png" and Image.open(p).mode == "L")
    if channels == 3:  # a grayscale file, repeated to 3 channels (then normalised per channel)
        x = images[by_path[str(gray)]].double() * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
        torch.testing.assert_close(x[0], x[1], rtol=0, atol=1e-5)
        torch.testing.assert_close(x[0], x[2], rtol=0, atol=1e-5)


def test_imagefolder_uses_the_split_folders(tmp_path):
    write_folder(tmp_path / "train", per_class=2)
    write_folder(tmp_path / "val", per_class=1, seed=1)
    args = dict(input_size=(3, 16, 16), mean=MEAN, std=STD)
    train, test = (load_data(f"imagefolder:{tmp_path}", train=t, **args) for t in (True, False))
    assert (len(train), len(test)) == (4, 2) and test.root.endswith("val")


def test_bad_image_folders_are_clear_errors(tmp_path):
    args = dict(train=True, input_size=(3, 16, 16), mean=MEAN, std=STD)
    with pytest.raises(DataError, match="is not a directory"):
        load_data(f"imagefolder:{tmp_path / 'absent'}", **args)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=re.escape(f"image folder {empty} holds no images")):
        load_data(f"imagefolder:{empty}", **args)
    (empty / "cat").mkdir()
    (empty / "cat" / "notes.txt").write_text("no image here")
    with pytest.raises(DataError, match=re.escape(f"image folder {empty} holds no images")):
        load_data(f"imagefolder:{empty}", **args)
    broken = tmp_path / "broken"
    write_folder(broken, per_class=1)
    bad = broken / "cat" / "truncated.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dataset = load_data(f"imagefolder:{broken}", **args)
    with pytest.raises(DataError) as info:
        next(iter(make_loader(dataset, len(dataset))))
    assert f"image {bad} cannot be read" in str(info.value)


def test_resized_dataset_resizes_repeats_and_normalises():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 1, 7, 7), generator=g, dtype=torch.uint8)
    labels = torch.arange(5)
    dataset = ResizedImageDataset(images, labels, size=(14, 14), channels=3, mean=MEAN, std=STD, num_classes=10,
                                  interpolation="nearest")
    x, y = dataset.get_batch(torch.arange(5))
    # nearest, 2x: every pixel becomes a 2x2 block, the one channel repeated to three.
    pixels = images.double().repeat_interleave(2, 2).repeat_interleave(2, 3) / 255
    expected = (pixels.expand(-1, 3, -1, -1) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(y, labels) and dataset.info.in_channels == 3 and dataset.info.image_size == 14
    # first_samples keeps the resizing (a slice of the same kind), and the fast loader uses it.
    head = first_samples(dataset, 2)
    assert isinstance(head, ResizedImageDataset) and len(head) == 2
    torch.testing.assert_close(next(iter(make_loader(head, 2)))[0], x[:2])
    smooth = ResizedImageDataset(images, labels, size=(32, 32), channels=1, mean=0.5, std=0.25, num_classes=10,
                                 interpolation="bicubic")
    out = smooth.get_batch(torch.arange(5))[0] * 0.25 + 0.5
    assert out.shape == (5, 1, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1  # clamped


def test_synthetic_at_the_model_input():
    dataset = load_data("synthetic:6", train=True, input_size=(3, 20, 24), mean=MEAN, std=STD)
    x, _ = next(iter(make_loader(dataset, 6)))
    assert x.shape == (6, 3, 20, 24) and torch.isfinite(x).all()


def test_fashion_mnist_for_a_three_channel_model():
    from sparsekern.data.fashion_mnist import load_fashion_mnist

    try:
        images, labels = load_fashion_mnist(train=False)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed here")
    dataset = load_data("fashion-mnist", train=False, input_size=(3, 56, 56), mean=MEAN, std=STD,
                        interpolation="nearest")
    assert len(dataset) == len(labels) == 10000 and dataset.info.in_channels == 3
    x, y = next(iter(make_loader(first_samples(dataset, 4), 4)))
    pixels = images[:4, None].double().repeat_interleave(2, 2).repeat_interleave(2, 3) / 255
    expected = (pixels.expand(-1, 3, -1, -1) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(y, labels[:4])
