"""`sparsekern analyze / prune / bench --model ... --weights ... --data ...` end to end on a timm
ResNet (random init, some channels planted dead) saved as .safetensors and .pth, over an ImageFolder
of PNG / JPEG files written here; results checked against forward hooks on the same model fed the
same images through an independent PIL + numpy pipeline."""
import json
import math

import numpy as np
import pytest
import torch

from sparsekern.cli import main
from sparsekern.prune import PrunePlan

from _helpers import channel_peaks, make_constant

timm = pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")

MODEL, ARGS, SIZE = "timm:resnet10t", "num_classes=5", 32
PLANTED = {"bn1": [1, 5], "layer1.0.bn1": [0, 3], "layer2.0.bn1": [7]}  # gamma 0, beta -1: dead after ReLU


def build(seed=1):
    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    for name, channels in PLANTED.items():
        make_constant(model.get_submodule(name), channels, -1.0)
    return model


def write_images(folder, count, seed):
    rng = np.random.default_rng(seed)
    for i in range(count):
        cls = folder / f"class{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        if i % 3 == 2:
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), mode="L").save(cls / f"{i}.png")
        else:
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode="RGB").save(cls / f"{i}.{'jpg' if i % 3 else 'png'}")


def hand_batch(folder, model):
    """The folder's images (sorted by class, then file name, as ImageFolder orders them) as timm
    evaluates them: RGB, resize to floor(size / crop_pct) (bicubic), centre crop, normalise."""
    cfg = model.pretrained_cfg
    assert cfg["interpolation"] == "bicubic"
    scaled = math.floor(SIZE / cfg["crop_pct"])
    top = int(round((scaled - SIZE) / 2.0))
    batch = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        image = Image.open(path).convert("RGB").resize((scaled, scaled), Image.BICUBIC)
        array = np.asarray(image.crop((top, top, top + SIZE, top + SIZE)), dtype=np.float64) / 255.0
        array = (array - np.array(cfg["mean"])) / np.array(cfg["std"])
        batch.append(torch.from_numpy(array.transpose(2, 0, 1)).float())
    return torch.stack(batch)


def measured_module(layer):
    """(module to hook, apply ReLU to its output?) for a report row of a timm ResNet."""
    if layer["name"].endswith(".residual"):  # the ReLU after the residual add
        return layer["name"][: -len("residual")] + "act2", False
    if layer["kind"] == "bn":
        return layer["bn_module_name"], True
    return layer["name"], False


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    write_images(root / "photos" / "train", 10, seed=0)
    write_images(root / "photos" / "val", 6, seed=1)
    model = build()
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(root / "r10t.safetensors"))
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, root / "r10t.pth")
    return root


@pytest.mark.parametrize("weights,workers", [("r10t.safetensors", "0"), ("r10t.pth", "2")])
def test_analyze_a_timm_model_from_a_weights_file_over_an_image_folder(files, tmp_path, capsys, weights, workers):
    out = tmp_path / "stats.json"
    assert main(["analyze", "--model", MODEL, "--model-args", ARGS, "--weights", str(files / weights),
                 "--data", f"imagefolder:{files / 'photos'}", "--input-size", str(SIZE), "--selectivity", "none",
                 "--workers", workers, "--json", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "randomly initialised" not in captured.err
    result = json.loads(out.read_text())
    assert result["model"] == MODEL and result["weights"] == str((files / weights).resolve())
    assert result["input_size"] == [3, SIZE, SIZE] and result["num_images"] == 10 and result["split"] == "train"

    model = build()  # the same weights, built independently
    x = hand_batch(files / "photos" / "train", model)
    layers = result["report"]["layers"]
    hooked = {measured_module(layer)[0] for layer in layers}
    peaks = channel_peaks(model, sorted(hooked), [x])
    compared = 0
    for layer in layers:
        name, relu = measured_module(layer)
        peak = peaks[name].clamp_min(0) if relu else peaks[name]
        assert layer["channels"] == peak.numel(), layer["name"]
        count = next(t["count"] for t in layer["inactive_by_activation"] if t["threshold"] == 1e-12)
        assert count == int((peak.double() < 1e-12).sum()), layer["name"]
        compared += 1
    assert compared == len(layers) >= 8
    stem = next(layer for layer in layers if layer["name"] == "bn1")
    assert next(t["count"] for t in stem["inactive_by_activation"]) >= len(PLANTED["bn1"])
    assert "bn1" in captured.out and "total" in captured.out  # the printed table


def test_without_weights_the_model_is_random_and_says_so(files, tmp_path, capsys):
    out = tmp_path / "stats.json"
    assert main(["analyze", "--model", MODEL, "--model-args", ARGS, "--data", "synthetic:4", "--input-size", "16",
                 "--selectivity", "none", "--json", str(out), "--no-progress"]) == 0
    assert "no --weights: timm:resnet10t is randomly initialised (seed 0)" in capsys.readouterr().err
    stem = next(layer for layer in json.loads(out.read_text())["report"]["layers"] if layer["name"] == "bn1")
    assert stem["gamma"]["min"] == 1.0  # timm's init, not the planted weights


def test_prune_a_timm_model_then_bench_its_directory(files, tmp_path, capsys):
    out, manifest = tmp_path / "pruned", tmp_path / "plan.json"
    data = f"imagefolder:{files / 'photos'}"
    assert main(["prune", "--model", MODEL, "--model-args", ARGS, "--weights", str(files / "r10t.pth"),
                 "--data", data, "--input-size", str(SIZE), "--by", "both", "--out", str(out),
                 "--manifest", str(manifest), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["test_agreement"] == 1.0 and printed["max_rel_logit_diff"] <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "prune_report.json", "prune_report.md",
                                                     "pruned_state_dict.pt"]  # the weights file is the original
    report = json.loads((out / "prune_report.json").read_text())
    assert report["external"]["spec"] == MODEL and report["held_out"]["samples"] == 6  # photos/val
    assert report["corpus"] == {"split": "train", "samples": 10}

    original = build()
    train_x, val_x = hand_batch(files / "photos" / "train", original), hand_batch(files / "photos" / "val", original)
    plan = PrunePlan.load(manifest)
    # Every planted channel is gone, and every removed channel of these layers was dead on the corpus
    # or constant (|gamma| < 1e-3): from hooks, not from the analysis.
    producers = {"bn1": "conv1.6", "layer1.0.bn1": "layer1.0.conv1", "layer2.0.bn1": "layer2.0.conv1",
                 "layer3.0.bn1": "layer3.0.conv1", "layer4.0.bn1": "layer4.0.conv1"}
    peaks = channel_peaks(original, list(producers), [train_x])
    for bn, conv in producers.items():
        removed = set(plan.layers[conv].removed) if conv in plan.layers else set()
        assert set(PLANTED.get(bn, [])) <= removed, conv
        gamma = original.get_submodule(bn).weight.detach().abs()
        allowed = {c for c in range(gamma.numel()) if peaks[bn][c] < 1e-12 or gamma[c] < 1e-3}
        assert removed <= allowed, conv

    rebuilt = plan.apply(build(), train_x)
    saved = torch.load(out / "pruned_state_dict.pt", weights_only=True)
    assert rebuilt.state_dict().keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    with torch.no_grad():
        for x in (train_x, val_x):
            a, b = original(x), rebuilt(x)
            assert (a - b).abs().max() <= 1e-4 * max(1.0, float(a.abs().max()))
    assert report["flops_after"] < report["flops_before"]

    speed = tmp_path / "speed.json"
    assert main(["bench", str(out), "--batch-sizes", "2", "--rounds", "3", "--no-compile", "--no-fused",
                 "--threads", "1", "--json", str(speed)]) == 0
    result = json.loads(speed.read_text())
    assert (result["flops_dense"], result["flops_pruned"]) == (report["flops_before"], report["flops_after"])


def test_bench_a_model_from_elsewhere_and_prune_a_random_one(files, tmp_path, capsys):
    speed = tmp_path / "speed.json"
    assert main(["bench", "--model", MODEL, "--model-args", ARGS, "--weights", str(files / "r10t.safetensors"),
                 "--data", "synthetic:4", "--input-size", "16", "--by", "gamma", "--batch-sizes", "2",
                 "--rounds", "3", "--no-compile", "--no-fused", "--threads", "1", "--json", str(speed)]) == 0
    result = json.loads(speed.read_text())
    assert result["flops_pruned"] < result["flops_dense"] and result["sample_shape"] == [3, 16, 16]
    assert result["source"] == f"{MODEL} ({files / 'r10t.safetensors'})"

    # Random weights: the prune directory keeps them, so the original can be rebuilt from it.
    out = tmp_path / "random"
    assert main(["prune", "--model", MODEL, "--model-args", ARGS, "--data", "synthetic:4", "--input-size", "16",
                 "--by", "gamma", "--out", str(out), "--no-progress"]) == 0
    from sparsekern.experiments.harvest import load_pruned

    dense, _, _ = load_pruned(out, "cpu")
    torch.manual_seed(0)
    fresh = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    for key, value in fresh.state_dict().items():
        assert torch.equal(dense.state_dict()[key], value), key


@pytest.fixture
def pickled(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(build(), path)  # a pickled module object, not a state dict
    return path


@pytest.fixture
def mismatched(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=5).state_dict(), path)
    return path


@pytest.mark.parametrize("argv, message", [
    (["analyze", "--model", "resnet50", "--data", "synthetic:2"],
     "model spec 'resnet50': expected torchvision:NAME, timm:NAME or package.module:factory"),
    (["analyze", "--model", "timm:resnet10q", "--data", "synthetic:2"], "timm has no model 'resnet10q'"),
    (["analyze", "--model", MODEL, "--weights", "{tmp}/absent.pth", "--data", "synthetic:2"],
     "weights file {tmp}/absent.pth does not exist"),
    (["analyze", "--model", MODEL, "--weights", "{pickled}", "--data", "synthetic:2"],
     "weights file {pickled} holds pickled Python objects, not only tensors, and is not loaded"),
    (["analyze", "--model", MODEL, "--model-args", ARGS, "--weights", "{mismatched}", "--data", "synthetic:2"],
     "weights file {mismatched} does not fit the model (ResNet): "),
    (["analyze", "--model", MODEL, "--data", "imagefolder:{tmp}"], "image folder {tmp} holds no images"),
    (["analyze", "--model", MODEL, "--data", "cifar10"], "--data 'cifar10': unknown corpus; expected fashion-mnist, "
                                                         "imagefolder:DIR or synthetic[:N]"),
    (["analyze", "--model", MODEL], "--model needs --data"),
    (["analyze", "--weights", "x.pth", "runs/x"], "--weights goes with --model"),
    (["analyze", "runs/x", "--model", MODEL, "--data", "synthetic:2"], "give a run directory or --model, not both"),
    (["analyze"], "sparsekern analyze needs a run directory or --model SPEC"),
    (["prune", "--model", MODEL, "--data", "synthetic:2"], "--out is required with --model"),
    (["bench", "runs/x", "--data", "synthetic:2"], "--data goes with --model"),
    (["prune", "runs/x", "--weights", "w.pth", "--input-size", "32"], "--weights, --input-size go with --model"),
])
def test_bad_external_input_is_one_line(tmp_path, pickled, mismatched, capsys, argv, message):
    names = {"tmp": tmp_path, "pickled": pickled, "mismatched": mismatched}
    argv = [a.format(**names) for a in argv]
    assert main(argv + ["--no-progress"]) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "randomly initialised" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"sparsekern {argv[0]}: error: "), lines
    assert message.format(**names) in lines[0]
    if "does not fit" in message:
        assert "missing keys" in lines[0] and "unexpected keys" in lines[0] and "shape mismatches" in lines[0]
