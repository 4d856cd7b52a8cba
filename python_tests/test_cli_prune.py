"""`sparsekern prune` / `bench` / `harvest` end to end on a run trained a few hundred steps, with
some channels then made dead (gamma = 0, beta < 0) or constant (gamma = 0, beta > 0)."""
import json

import pytest
import torch

from sparsekern.cli import main
from sparsekern.data import get_dataset, make_loader
from sparsekern.prune import PrunePlan
from sparsekern.train.checkpoint import save_checkpoint
from sparsekern.train.loop import load_trained

from _helpers import channel_peaks, dead_channels

RUN_FLAGS = ["--dataset", "synthetic", "--width", "0.125", "--batch-size", "16", "--num-train-samples", "256",
             "--num-test-samples", "128", "--eval-batch-size", "128", "--steps", "200", "--eval-every", "100",
             "--selectivity", "none", "--threads", "1", "--no-progress"]
KILLED = {"features.c2": ([0, 3], -1.0), "features.c5": ([1], -0.5)}   # dead: relu(beta) = 0
CONSTANT = {"features.c7": ([2], 0.7)}                                 # constant relu(0.7), folded into the classifier
WIDTHS = [8, 16, 16, 32, 32, 64, 64]
SIDES = [28, 28, 14, 14, 7, 7, 3]  # BasicNet on 28x28: pools after C2, C4, C6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", *RUN_FLAGS, "--out-dir", str(out), "--name", "implicit"]) == 0
    path = out / "implicit" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    for unit, (channels, beta) in {**KILLED, **CONSTANT}.items():
        state["model"][f"{unit}.bn.weight"][channels] = 0.0
        state["model"][f"{unit}.bn.bias"][channels] = beta
    save_checkpoint(path, state)  # a new checksum over the edited weights
    # Which channels a short training leaves dead on the 256 training images (the corpus `prune`
    # analyses), and whether they are dead on the test images too, depends on the CPU's rounding
    # during training: a channel dead on the corpus but alive on a test image makes the held-out
    # comparison inexact. So every other channel is made clearly alive on the corpus, and only the
    # planted channels are dead or constant, for every input.
    model, _ = load_trained(out / "implicit", "cpu")
    corpus = first(datasets()[0], 256)[0]
    revive_unplanted(model.eval(), corpus)
    assert dead_units(model, corpus) == {f"features.c{i}": sorted(KILLED.get(f"features.c{i}", ([], 0))[0])
                                            for i in range(1, len(WIDTHS) + 1)}
    state["model"] = model.state_dict()
    save_checkpoint(path, state)
    return out / "implicit"


@torch.no_grad()
def revive_unplanted(model, images, margin=0.1):
    """Raise beta, layer by layer, of every channel not planted whose max post-BN value on ``images``
    is below ``margin``, so that it is at least ``margin`` (alive) on some image."""
    planted = {**KILLED, **CONSTANT}
    for i in range(1, len(WIDTHS) + 1):
        name = f"features.c{i}.bn"
        peak = channel_peaks(model, [name], [images])[name]
        low = peak < margin
        low[planted.get(f"features.c{i}", ([], 0))[0]] = False
        model.get_submodule(name).bias[low] += margin - peak[low]


def datasets():
    return (get_dataset("synthetic", train=True, num_samples=512), get_dataset("synthetic", train=False, num_samples=512))


def first(dataset, n):
    return next(iter(make_loader(dataset, n)))


def dead_units(model, images):
    """{unit: channels whose post-ReLU output is < 1e-12 on every image}, from forward hooks."""
    relus = [f"features.c{i}.relu" for i in range(1, len(WIDTHS) + 1)]
    return {name.removesuffix(".relu"): channels
            for name, channels in dead_channels(channel_peaks(model, relus, [images])).items()}


def hand_flops(widths, in_channels=1, classes=10):
    """2 * MACs of BasicNet's convs (3x3, same padding) and Linear, per sample."""
    macs, previous = 0, in_channels
    for w, side in zip(widths, SIDES):
        macs += side * side * w * previous * 9
        previous = w
    return 2 * (macs + previous * classes)


def assert_same_function(original, pruned, images):
    with torch.no_grad():
        a, b = original(images), pruned(images)
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert (a.double() - b.double()).abs().max() <= 1e-4 * max(1.0, float(a.abs().max()))


def test_prune_by_both_removes_dead_and_constant_channels_exactly(run_dir, tmp_path, capsys):
    out, manifest = tmp_path / "pruned", tmp_path / "plan.json"
    assert main(["prune", str(run_dir), "--by", "both", "--out", str(out), "--manifest", str(manifest),
                 "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["test_agreement"] == 1.0 and printed["max_rel_logit_diff"] <= 1e-4
    assert json.loads(manifest.read_text()) == json.loads((out / "manifest.json").read_text())

    original, _ = load_trained(run_dir, "cpu")
    train_x, _ = first(datasets()[0], 256)  # the run's 256 training images
    expected = dead_units(original, train_x)
    for unit, (channels, _) in {**KILLED, **CONSTANT}.items():
        expected[unit] = sorted(set(expected[unit]) | set(channels))

    # Manifest round trip: a fresh model from the checkpoint + the manifest == the saved pruned weights.
    rebuilt = PrunePlan.load(manifest).apply(load_trained(run_dir, "cpu")[0], train_x)
    saved = torch.load(out / "pruned_state_dict.pt", weights_only=True)
    assert rebuilt.state_dict().keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    widths = [WIDTHS[i] - len(expected[f"features.c{i + 1}"]) for i in range(7)]
    assert [rebuilt.get_submodule(f"features.c{i}.conv").out_channels for i in range(1, 8)] == widths
    assert rebuilt.classifier.in_features == widths[-1]

    assert_same_function(original, rebuilt, train_x)
    assert_same_function(original, rebuilt, first(datasets()[1], 128)[0])  # the run's test images
    report = json.loads((out / "prune_report.json").read_text())
    assert report["flops_before"] == hand_flops(WIDTHS) and report["flops_after"] == hand_flops(widths)
    assert report["filters_removed_pct"] == pytest.approx(100 * (1 - sum(widths) / sum(WIDTHS)))
    assert report["held_out"]["samples"] == 128 and report["held_out"]["agreement"] == 1.0
    assert "features.c7.conv" in (out / "prune_report.md").read_text()


def test_prune_by_activation_leaves_the_constant_channel(run_dir, tmp_path):
    assert main(["prune", str(run_dir), "--out", str(tmp_path), "--no-progress"]) == 0
    plan = PrunePlan.load(tmp_path / "manifest.json")
    train_x, _ = first(datasets()[0], 256)
    expected = dead_units(load_trained(run_dir, "cpu")[0], train_x)
    assert 2 not in expected["features.c7"]  # relu(0.7) is alive
    for i in range(1, 8):
        layer = plan.layers[f"features.c{i}.conv"]
        assert layer.removed == expected[f"features.c{i}"] and layer.constants == {}
    for unit, (channels, _) in KILLED.items():
        assert set(channels) <= set(plan.layers[f"{unit}.conv"].removed)


def test_bench_a_prune_directory_and_a_manifest(run_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(run_dir), "--by", "gamma", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    speed = tmp_path / "speed.json"
    assert main(["bench", str(out), "--batch-sizes", "1,3", "--rounds", "3", "--no-compile", "--threads", "1",
                 "--json", str(speed)]) == 0
    assert "| eager | 3 |" in capsys.readouterr().out
    result = json.loads(speed.read_text())
    original, _ = load_trained(run_dir, "cpu")
    widths = [int((original.get_submodule(f"features.c{i}.bn").weight.detach().abs() >= 1e-3).sum())
              for i in range(1, 8)]
    assert sum(WIDTHS) - sum(widths) >= 4  # at least the channels the fixture zeroed
    assert result["flops_dense"] == hand_flops(WIDTHS) and result["flops_pruned"] == hand_flops(widths)
    assert [(r["mode"], r["batch"]) for r in result["rows"]] == [("eager", 1), ("eager", 3)]
    for r in result["rows"]:
        assert r["dense ms"] > 0 and r["pruned ms"] > 0 and r["dense fused bn-relu ms"] > 0
        time_saved = 1 - r["pruned ms"] / r["dense ms"]
        assert r["time_saved"] == pytest.approx(time_saved)
        assert r["criterion_met"] == (time_saved >= 0.7 * (1 - hand_flops(widths) / hand_flops(WIDTHS)))

    assert main(["bench", str(run_dir), "--manifest", str(out / "manifest.json"), "--batch-sizes", "2",
                 "--rounds", "3", "--no-compile", "--no-fused", "--json", str(speed)]) == 0
    assert json.loads(speed.read_text())["flops_pruned"] == hand_flops(widths)


def test_harvest_with_a_slimming_run(run_dir, tmp_path, capsys):
    out = tmp_path / "harvest"
    assert main(["harvest", str(run_dir), "--train-slimming", "1e-3", "--fine-tune-steps", "5",
                 "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "harvest.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    dense, implicit = rows["dense"], rows["implicit sparsity (dead by activation)"]
    matched = rows["L1-norm (implicit's per-layer counts)"]
    slimming = rows["Network Slimming (global gamma threshold)"]

    original, config = load_trained(run_dir, "cpu")
    assert config.reg == "l2"
    test_x, test_y = first(datasets()[1], 128)
    with torch.no_grad():
        accuracy = float((original(test_x).argmax(1) == test_y).double().mean())
    assert dense["accuracy_before_ft"] == pytest.approx(accuracy)
    assert implicit["accuracy_before_ft"] == dense["accuracy_before_ft"]  # dead filters: nothing changes
    assert implicit["filters_removed_pct"] > 0 and result["keep_ratio"] == pytest.approx(implicit["keep_ratio"])
    assert (matched["params"], matched["flops"], matched["filters_kept"]) == (
        implicit["params"], implicit["flops"], implicit["filters_kept"])
    total = sum(WIDTHS)
    assert slimming["filters_kept"] == round(result["keep_ratio"] * total)
    for row in (matched, slimming, rows["L1-norm (same ratio per layer)"]):
        assert row["fine_tune_steps"] == 5 and 0 <= row["accuracy_after_ft"] <= 1
    slim_config = load_trained(result["slimming_run"], "cpu")[1]
    assert slim_config.reg == "slimming" and slim_config.reg_strength == 1e-3
    assert "Network Slimming" in (out / "harvest.md").read_text()


def test_bad_input_is_a_clear_error(run_dir, tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nothing")]) == 2
    assert "config.toml and checkpoint.pt" in capsys.readouterr().err
    out = tmp_path / "pruned"
    with pytest.raises(SystemExit) as info:
        main(["prune", str(run_dir), "--out", str(out), "--samples", "0", "--no-progress"])
    assert info.value.code == 2 and "argument --samples: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["prune", str(run_dir), "--out", str(out), "--samples", "64", "--no-progress"]) == 0
    assert main(["bench", str(out), "--manifest", str(out / "manifest.json")]) == 2
    assert "prune output directory" in capsys.readouterr().err
    assert main(["harvest", str(run_dir), "--slimming-run", str(run_dir)]) == 2
    assert "not 'slimming'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", str(out), "--batch-sizes", "0"])
    assert "positive integers" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("exact", "false", 'exact: expected true or false, got the string "false"'),
    ("kept", 2.7, 'layers["features.c2.conv"].kept[0]: expected an int, got 2.7'),
    ("channels", 10**12, 'layers["features.c2.conv"].channels: 1000000000000 is outside [1, 16777216] (2**24 '
                         'channels per layer at most: far beyond any real layer, so a corrupt file)'),
])
def test_a_bad_manifest_is_one_line_naming_the_field(run_dir, tmp_path, capsys, field, value, message):
    out = tmp_path / "pruned"
    assert main(["prune", str(run_dir), "--by", "gamma", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    data = json.loads((out / "manifest.json").read_text())
    if field == "exact":
        data["exact"] = value
    elif field == "kept":
        data["layers"]["features.c2.conv"]["kept"][0] = value
    else:
        data["layers"]["features.c2.conv"]["channels"] = value
    manifest = tmp_path / "bad.json"
    manifest.write_text(json.dumps(data))
    assert main(["bench", str(run_dir), "--manifest", str(manifest), "--batch-sizes", "1", "--rounds", "3",
                 "--no-compile", "--no-fused"]) == 2
    assert capsys.readouterr().err.strip() == f"sparsekern bench: error: {manifest}: {message}"


def test_bench_repeats_in_fresh_processes_and_profiles_layers(run_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(run_dir), "--by", "gamma", "--out", str(out), "--no-progress"]) == 0
    speed = tmp_path / "speed.json"
    assert main(["bench", str(out), "--batch-sizes", "1,4", "--rounds", "3", "--no-compile", "--no-fused",
                 "--threads", "1", "--repeat", "2", "--layers", "--json", str(speed)]) == 0
    printed = capsys.readouterr().out
    assert "2 runs, each in a fresh process" in printed and "Per layer, batch 4" in printed
    result = json.loads(speed.read_text())
    assert len(result["runs"]) == 2
    for batch in (1, 4):
        runs = [r for run in result["runs"] for r in run["rows"] if r["batch"] == batch]
        row = next(r for r in result["summary"]["rows"] if r["batch"] == batch)
        saved = sorted(r["time_saved"] for r in runs)
        assert row["time_saved_median"] == pytest.approx((saved[0] + saved[1]) / 2)
        assert (row["time_saved_min"], row["time_saved_max"]) == (saved[0], saved[1])
        assert row["runs_met"] == sum(r["criterion_met"] for r in runs)
    # The profile: every conv / relu / pool of both models, conv MACs per sample as counted by hand.
    layers = {r["layer"]: r for r in result["runs"][0]["layers"]}
    pruned_widths = [len(PrunePlan.load(out / "manifest.json").layers[f"features.c{i}.conv"].kept)
                     for i in range(1, 8)]
    previous = (1, 1)
    for i, (w, pw, side) in enumerate(zip(WIDTHS, pruned_widths, SIDES), start=1):
        row = layers[f"features.c{i}.conv"]
        assert row["dense MACs"] == side * side * w * previous[0] * 9
        assert row["pruned MACs"] == side * side * pw * previous[1] * 9
        assert row["dense ms"] > 0 and row["pruned ms"] > 0 and f"features.c{i}.relu" in layers
        previous = (w, pw)
    assert "features.c1.bn" not in layers  # folded: an Identity, not a layer
    assert layers["(total)"]["dense MACs"] == result["summary"]["flops_dense"] // 2
    with pytest.raises(SystemExit) as info:
        main(["bench", str(out), "--repeat", "0"])
    assert info.value.code == 2 and "argument --repeat: must be >= 1, got 0" in capsys.readouterr().err
