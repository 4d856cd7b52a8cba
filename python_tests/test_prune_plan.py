"""PrunePlan constructors, the JSON manifest, and the baseline score helpers."""
import json

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.models import build_model
from sparsekern.prune import LayerPlan, PrunePlan, bn_gamma_scores, filter_l1_scores, prune_model
from sparsekern.prune import plan as plan_module

from _helpers import channel_peaks, dead_channels, randomize_bn


def unit_net(activation=nn.ReLU, pool=None):
    """Conv-BN-act(-pool) -> 1x1 conv -> global pool -> Linear."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), activation()]
    if pool is not None:
        layers.append(pool)
    layers += [nn.Conv2d(6, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)]
    return randomize_bn(nn.Sequential(*layers)).eval()


def test_layer_plan_validation():
    layer = LayerPlan(channels=5, kept=[4, 0, 2], constants={1: 0.5, 3: 0.0})
    assert layer.kept == [0, 2, 4] and layer.removed == [1, 3] and layer.constants == {1: 0.5}
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        LayerPlan(channels=5, kept=[5])
    with pytest.raises(ValueError, match="distinct"):
        LayerPlan(channels=5, kept=[1, 1])
    with pytest.raises(ValueError, match="only for removed"):
        LayerPlan(channels=5, kept=[0, 1], constants={1: 2.0})
    with pytest.raises(ValueError, match="finite"):
        LayerPlan(channels=5, kept=[0], constants={1: float("inf")})
    with pytest.raises(ValueError, match="positive int"):
        LayerPlan(channels=0, kept=[])


def test_from_dead_masks():
    net = unit_net()
    plan = PrunePlan.from_dead_masks({"0": torch.tensor([True, False, False, True, False, False])}, model=net)
    assert plan.layers["0"].kept == [1, 2, 4, 5] and plan.layers["0"].removed == [0, 3]
    assert plan.exact and plan.model_class == "torch.nn.modules.container.Sequential" and plan.num_removed == 2
    with pytest.raises(TypeError, match="bool tensor"):
        PrunePlan.from_dead_masks({"0": torch.zeros(6)})
    with pytest.raises(ValueError, match="1-D"):
        PrunePlan.from_dead_masks({"0": torch.zeros(2, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="has 6 output channels, but 5"):
        PrunePlan.from_dead_masks({"0": torch.zeros(5, dtype=torch.bool)}, model=net)


def test_from_gamma_constants_follow_the_activation():
    net = unit_net(activation=nn.ReLU6, pool=nn.MaxPool2d(2))
    bn = net[1]
    bn.weight.data[[0, 1, 2, 3]] = torch.tensor([0.0, 9.99e-4, 1e-3, 0.0])
    bn.bias.data[[0, 1, 3]] = torch.tensor([-0.5, 0.25, 7.0])
    plan = PrunePlan.from_gamma(net, threshold=1e-3)
    layer = plan.layers["0"]
    # |gamma| < 1e-3 in float64: channel 2 (gamma = float32(1e-3) > 1e-3) stays.
    assert layer.removed == [0, 1, 3]
    # relu6(beta): 0 (dead, no entry), 0.25, and 7 clipped to 6.
    assert layer.constants == pytest.approx({1: 0.25, 3: 6.0})
    assert "4" not in plan.layers  # the 1x1 conv has no BN: not a gamma candidate


def test_from_gamma_leaves_out_constants_a_padded_average_pool_would_spread():
    net = unit_net(pool=nn.AvgPool2d(3, stride=1, padding=1))
    net[1].weight.data[[0, 1]] = 0.0
    net[1].bias.data[[0, 1]] = torch.tensor([-1.0, 0.5])
    plan = PrunePlan.from_gamma(net)
    assert plan.layers["0"].removed == [0]  # relu(-1) = 0 averages to 0 everywhere
    assert any("channel 1" in note for note in plan.notes)
    pruned, _ = prune_model(net, plan, (2, 1, 8, 8))
    assert pruned[0].out_channels == 5


def test_manifest_round_trip_applies_to_a_fresh_instance(tmp_path):
    net = unit_net()
    net[1].weight.data[[1, 4]] = 0.0
    net[1].bias.data[[1, 4]] = torch.tensor([-0.3, 0.6])  # 4 is a constant: folded via the 1x1 conv
    plan = PrunePlan.from_gamma(net, input_shape=(2, 1, 8, 8))
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "sparsekern.prune_plan" and data["version"] == 1
    assert data["layers"]["0"] == {"channels": 6, "kept": [0, 2, 3, 5], "constants": {"4": pytest.approx(0.6)}}
    loaded = PrunePlan.load(path)
    assert loaded.to_dict() == plan.to_dict() and loaded.input_shape == (2, 1, 8, 8)

    fresh = unit_net()  # a new instance of the same definition, given the trained weights
    fresh.load_state_dict(net.state_dict())
    expected = plan.apply(net)  # example inputs default to the plan's input shape
    got = loaded.apply(fresh)
    assert expected.state_dict().keys() == got.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(value, got.state_dict()[key]), key
    assert got[0].out_channels == 4 and got[3].in_channels == 4


def test_manifest_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON"):
        PrunePlan.load(path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a prune plan"):
        PrunePlan.load(path)
    path.write_text(json.dumps({"format": "sparsekern.prune_plan", "version": 99, "layers": {}}))
    with pytest.raises(ValueError, match="version 99"):
        PrunePlan.load(path)


def good_manifest() -> dict:
    """A valid manifest as plain data: layer "0" keeps 3 of 6 channels, channel 4 outputs 0.5."""
    layers = {"0": LayerPlan(channels=6, kept=[0, 2, 3], constants={4: 0.5})}
    return PrunePlan(layers=layers, input_shape=(2, 1, 8, 8), source="test").to_dict()


def _set(path: tuple, value):
    """A change to good_manifest(): the value at ``path`` (keys / indices) becomes ``value``."""
    def change(data):
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set(("exact",), "false"), 'exact: expected true or false, got the string "false"'),
    (_set(("exact",), 0), "exact: expected true or false, got 0"),
    (_set(("layers", "0", "kept"), [2.7]), 'layers["0"].kept[0]: expected an int, got 2.7'),
    (_set(("layers", "0", "kept"), [0, True]), 'layers["0"].kept[1]: expected an int, got true'),
    (_set(("layers", "0", "kept"), [3, 2]), 'layers["0"].kept[1]: 2 after 3: kept must be increasing'),
    (_set(("layers", "0", "kept"), [2, 2]), 'layers["0"].kept[1]: 2 after 2'),
    (_set(("layers", "0", "kept"), [0, 6]), 'layers["0"].kept[1]: 6 is not a channel index in [0, 6)'),
    (_set(("layers", "0", "kept"), "0,2"), 'layers["0"].kept: expected an array of channel indices'),
    (_set(("layers", "0", "channels"), 10**12), 'layers["0"].channels: 1000000000000 is outside [1, 16777216]'),
    (_set(("layers", "0", "channels"), "6"), 'layers["0"].channels: expected an int, got the string "6"'),
    (_set(("layers", "0", "constants"), {"x": 1.0}), 'layers["0"].constants["x"]: the key must be a channel index'),
    (_set(("layers", "0", "constants"), {"4": "0.5"}), 'layers["0"].constants["4"]: expected a finite number'),
    (_set(("layers", "0", "constants"), {"2": 1.0}), 'layers["0"].constants["2"]: constants are only for removed'),
    (_set(("layers", "0", "kapt"), [0]), 'layers["0"]: unknown key "kapt"; allowed: channels, kept, constants'),
    (_set(("layers", ""), {"channels": 1, "kept": [0]}), 'layers[""]: a layer is named by its module'),
    (_set(("exactly",), True), 'unknown key "exactly"; allowed: format, version'),
    (_set(("version",), True), "version true is not supported"),
    (_set(("input_shape",), [2.5, 1, 8, 8]), "input_shape[0]: expected an int, got 2.5"),
    (_set(("notes",), [["nested"]]), "notes[0]: expected a string, got an array"),
    (_set(("model_class",), 3), "model_class: expected a string or null, got 3"),
])
def test_manifest_is_read_strictly(tmp_path, change, message):
    data = good_manifest()
    change(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        PrunePlan.load(path)
    assert info.type is plan_module.ManifestError
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_manifest_nested_too_deeply_is_a_clean_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):  # not a RecursionError
        PrunePlan.load(path)


def test_manifest_size_is_limited(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    PrunePlan.from_dict(good_manifest()).save(path)
    assert PrunePlan.load(path).num_removed == 3
    monkeypatch.setattr(plan_module, "MAX_MANIFEST_BYTES", path.stat().st_size - 1)
    with pytest.raises(ValueError, match=f"larger than {path.stat().st_size - 1} bytes"):
        PrunePlan.load(path)


def test_manifest_duplicate_keys_are_refused(tmp_path):
    # With plain json.loads the second "0" would silently replace the first.
    path = tmp_path / "plan.json"
    path.write_text('{"format": "sparsekern.prune_plan", "version": 1, "layers": {"0": {"channels": 2, "kept": [0]}, '
                    '"0": {"channels": 2, "kept": [0, 1]}}}')
    with pytest.raises(ValueError, match='duplicate key "0"'):
        PrunePlan.load(path)


def test_layer_plan_refuses_float_indices_and_absurd_channel_counts():
    with pytest.raises(ValueError, match="channel indices must be ints, got 2.7"):
        LayerPlan(channels=5, kept=[2.7])
    with pytest.raises(ValueError, match=r"2\*\*24"):
        LayerPlan(channels=10**12, kept=[])
    # numpy / torch integers are indices like ints
    assert LayerPlan(channels=5, kept=[torch.tensor(3), 1]).kept == [1, 3]
    plan = PrunePlan(layers={"a": LayerPlan(channels=5, kept=[1, 3]), "b": LayerPlan(channels=2, kept=[])})
    assert plan.num_removed == 3 + 2


def test_from_scores_per_layer_and_global():
    net = unit_net()
    scores = {"0": torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2]), "3": torch.tensor([0.95, 0.6, 0.01, 0.7])}
    per_layer = PrunePlan.from_scores(net, scores, keep_ratio=0.5)
    assert per_layer.layers["0"].kept == [1, 2, 4] and per_layer.layers["3"].kept == [0, 3]
    assert not per_layer.exact
    # Global: the 5 best of 10 scores are 0.95, 0.9, 0.8, 0.7, 0.6.
    global_plan = PrunePlan.from_scores(net, scores, keep_ratio=0.5, scope="global")
    assert global_plan.layers["0"].kept == [1, 4] and global_plan.layers["3"].kept == [0, 1, 3]
    tiny = PrunePlan.from_scores(net, scores, keep_ratio=0.1, scope="global")
    assert tiny.layers["3"].kept == [0] and tiny.layers["0"].kept == [1]  # every layer keeps its best
    with pytest.raises(ValueError, match="keep_ratio"):
        PrunePlan.from_scores(net, scores, keep_ratio=0.0)
    with pytest.raises(ValueError, match="has 6 output channels, but 2"):
        PrunePlan.from_scores(net, {"0": torch.ones(2)}, keep_ratio=0.5)
    with pytest.raises(ValueError, match="NaN"):
        PrunePlan.from_scores(net, {"0": torch.full((6,), float("nan"))}, keep_ratio=0.5)


def test_baseline_scores():
    net = unit_net()
    l1 = filter_l1_scores(net)
    assert set(l1) == {"0", "3", "6"}
    assert torch.allclose(l1["0"], net[0].weight.detach().double().abs().sum((1, 2, 3)))
    gamma = bn_gamma_scores(net)
    assert set(gamma) == {"0"} and torch.equal(gamma["0"], net[1].weight.detach().double().abs())


def test_from_analysis_matches_hooked_activations():
    torch.manual_seed(0)
    net = build_model("basicnet", in_channels=1, num_classes=10, width=0.125).eval()
    net.features.c3.bn.weight.data[[0, 2]] = 0.0
    net.features.c3.bn.bias.data[[0, 2]] = -1.0
    batches = [torch.randn(4, 1, 16, 16) for _ in range(2)]
    result = sparsekern.analyze(net, batches, progress=False, selectivity="none")
    plan = PrunePlan.from_analysis(result)

    # Independent reference: corpus max of every post-ReLU map, from forward hooks.
    dead = dead_channels(channel_peaks(net, [f"features.c{i}.relu" for i in range(1, 8)], batches))
    for i in range(1, 8):
        assert plan.layers[f"features.c{i}.conv"].removed == dead[f"features.c{i}.relu"]
    assert {0, 2} <= set(plan.layers["features.c3.conv"].removed)
    pruned = plan.apply(net, torch.cat(batches))
    with torch.no_grad():
        x = torch.cat(batches)
        assert torch.allclose(pruned(x), net(x), atol=1e-5)
