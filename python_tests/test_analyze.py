"""sparsekern.analyze against a float64 reference computed with the tests' own hooks.

The reference runs the model in eval mode under no_grad and records, at hook points named by
hand, m[n, c] = max over positions of |post-ReLU activation| in float64; corpus max, dead mask
(max < t) and selectivity (fraction of n with m / max < 1e-3, 1 for never-active channels)
follow from it.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

from _helpers import PerPassLoader
from sparsekern.models import build_model
from sparsekern.stats.analyze import CorpusChangedError, analyze

FASHION_MNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def reference(model, batches, points, autocast_dtype=None):
    """{name: (N, C) float64 maxima} at points {name: (module name, call index)}, eval mode."""
    maxima = {name: [] for name in points}
    calls = {}
    modules = dict(model.named_modules())

    def hook_for(module_name):
        def hook(module, args, out):
            call = calls.get(module_name, 0)
            calls[module_name] = call + 1
            for name, (m, k) in points.items():
                if (m, k) == (module_name, call):
                    maxima[name].append(out.double().reshape(out.shape[0], out.shape[1], -1).abs().amax(dim=2))
        return hook

    handles = [model.register_forward_pre_hook(lambda m, a: calls.clear())]
    handles += [modules[m].register_forward_hook(hook_for(m)) for m in {m for m, _ in points.values()}]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                if autocast_dtype is None:
                    model(x)
                else:
                    with torch.autocast("cpu", dtype=autocast_dtype):
                        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: torch.cat(v) for name, v in maxima.items()}


def reference_selectivity(m: torch.Tensor, t: float = 1e-3) -> torch.Tensor:
    mx = m.amax(dim=0)
    return torch.where(mx == 0, 1.0, (m / mx < t).double().mean(dim=0))


def assert_matches(result, ref, *, exact_selectivity=True):
    assert [f.name for f in result.features] == list(ref)
    for name, m in ref.items():
        s = result.stats[name]
        assert s.num_samples == m.shape[0], name
        assert torch.equal(s.corpus_max.double(), m.amax(dim=0)), name
        for t in (1e-12, 1e-4):
            assert torch.equal(s.dead_mask(t), m.amax(dim=0) < t), name
        sel = s.selectivity(1e-3)
        if exact_selectivity:
            assert sel.exact and torch.equal(sel.value, reference_selectivity(m)), name
        else:
            assert bool(((sel.value - reference_selectivity(m)).abs() <= sel.error_bound + 1e-12).all()), name
        layer = result.report.layer(name)
        assert layer.inactive_by_activation == {t: int((m.amax(dim=0) < t).sum()) for t in (1e-12, 1e-4)}


def random_batches(count, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(count)]


def small_basicnet():
    torch.manual_seed(0)
    model = build_model("basicnet", in_channels=1, num_classes=10, width=0.25)
    with torch.no_grad():  # some dead channels (BN in eval mode: gamma = 0, beta < 0 gives relu 0)
        for unit, channels in (("c2", [0, 5]), ("c5", [3]), ("c7", [1, 2, 3])):
            bn = model.features.get_submodule(f"{unit}.bn")
            bn.weight[channels] = 0
            bn.bias[channels] = -1
    return model


BASICNET_POINTS = {f"features.c{i}": (f"features.c{i}.relu", 0) for i in range(1, 8)}


@pytest.fixture(scope="module")
def basicnet_case():
    model = small_basicnet()
    data = random_batches(4, (16, 1, 28, 28))
    # Uneven last batch: 4 x 16 + 7 samples.
    data.append(random_batches(1, (7, 1, 28, 28), seed=1)[0])
    return model, data, reference(model, data, BASICNET_POINTS)


@pytest.mark.parametrize("selectivity", ["two-pass", "exact"])
def test_analyze_basicnet_equals_float64_reference(basicnet_case, selectivity):
    model, data, ref = basicnet_case
    result = analyze(model, [(x, torch.zeros(len(x))) for x in data], selectivity=selectivity, progress=False)
    assert result.passes == (2 if selectivity == "two-pass" else 1)
    assert result.num_images == 71 and result.images_per_second > 0
    assert_matches(result, ref)
    assert result.report.layer("features.c7").inactive_by_activation[1e-12] >= 3


def test_analyze_histogram_is_within_its_error_bound(basicnet_case):
    model, data, ref = basicnet_case
    result = analyze(model, data, selectivity="histogram", progress=False)
    assert_matches(result, ref, exact_selectivity=False)


def test_analyze_restores_every_module_mode(basicnet_case):
    model, data, _ = basicnet_case
    model.train()
    model.features.c3.bn.eval()  # a mixed state must come back as it was
    before = [m.training for m in model.modules()]
    analyze(model, data[:1], selectivity="none", progress=False)
    assert [m.training for m in model.modules()] == before

    def failing_loader():
        yield data[0]
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        analyze(model, failing_loader(), selectivity="exact", progress=False)
    assert [m.training for m in model.modules()] == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model.eval()


def test_analyze_loader_kinds_and_max_batches(basicnet_case):
    model, data, ref = basicnet_case
    x = torch.cat(data)
    y = torch.zeros(len(x), dtype=torch.int64)
    dataset = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    from_loader = analyze(model, loader, selectivity="exact", progress=False)
    assert_matches(from_loader, ref)
    limited = analyze(model, loader, selectivity="two-pass", progress=False, max_batches=2)
    assert limited.num_images == 32
    first_two = {name: m[:32] for name, m in ref.items()}
    assert_matches(limited, first_two)


def test_analyze_progress_bar_and_result_formats(basicnet_case, capsys):
    model, data, _ = basicnet_case
    result = analyze(model, data[:2], selectivity="two-pass", progress=True)
    err = capsys.readouterr().err
    assert "pass 1/2" in err and "pass 2/2" in err and "img/s" in err
    as_dict = json.loads(json.dumps(result.to_dict()))
    assert as_dict["num_images"] == 32 and as_dict["passes"] == 2
    assert len(as_dict["report"]["layers"]) == 7
    assert "images/s" in str(result) and "features.c1" in str(result)


def test_analyze_under_bfloat16_autocast(basicnet_case):
    model, data, _ = basicnet_case
    ref = reference(model, data[:1], BASICNET_POINTS, autocast_dtype=torch.bfloat16)
    result = analyze(model, data[:1], selectivity="two-pass", amp_dtype=torch.bfloat16, progress=False)
    assert_matches(result, ref)


def test_analyze_two_pass_detects_a_changing_corpus(basicnet_case):
    model, data, _ = basicnet_case

    class Augmenting:
        """Yields different images on every pass, as random augmentation would."""

        def __init__(self):
            self.epoch = 0

        def __iter__(self):
            self.epoch += 1
            return iter(random_batches(2, (8, 1, 28, 28), seed=100 + self.epoch))

    with pytest.raises(CorpusChangedError, match="batch 0 .* holds different content in pass 2"):
        analyze(model, Augmenting(), selectivity="two-pass", progress=False)


def same_corpus_maxima(model, one, two) -> bool:
    """Whether two corpora give every layer the same corpus max (all the old check compared)."""
    a, b = reference(model, one, BASICNET_POINTS), reference(model, two, BASICNET_POINTS)
    return all(torch.equal(a[name].amax(dim=0), b[name].amax(dim=0)) for name in a)


@pytest.fixture(scope="module")
def strong_and_weak():
    """Two strong batches and a weak one (inputs x 0.05) whose maxima are nowhere a corpus max."""
    strong = random_batches(2, (16, 1, 28, 28), seed=20)
    weak = random_batches(1, (8, 1, 28, 28), seed=21)[0] * 0.05
    return strong[0], weak, strong[1]


def test_analyze_two_pass_rejects_fewer_batches_in_pass_2(basicnet_case, strong_and_weak):
    model = basicnet_case[0]
    strong, weak, _ = strong_and_weak
    assert same_corpus_maxima(model, [strong, weak], [strong])  # the corpus maxima alone cannot tell
    loader = PerPassLoader([strong, weak], [strong])
    with pytest.raises(CorpusChangedError, match=r"pass 2 yielded fewer batches, 1 \(16 images\) against 2 "
                                                 r"\(24 images\) in pass 1: batch 1 is missing"):
        analyze(model, loader, selectivity="two-pass", progress=False)
    more = PerPassLoader([strong], [strong, weak])
    with pytest.raises(CorpusChangedError, match="more batches.*batch 1 is extra"):
        analyze(model, more, selectivity="two-pass", progress=False)


def test_analyze_two_pass_rejects_a_batch_of_another_size(basicnet_case, strong_and_weak):
    model = basicnet_case[0]
    strong, weak, _ = strong_and_weak
    assert same_corpus_maxima(model, [strong, weak], [strong, weak[:4]])
    loader = PerPassLoader([strong, weak], [strong, weak[:4]])
    with pytest.raises(CorpusChangedError, match="batch 1 has 4 images in pass 2 but 8 in pass 1"):
        analyze(model, loader, selectivity="two-pass", progress=False)


def test_analyze_two_pass_rejects_a_rescaled_batch_that_holds_no_maximum(basicnet_case, strong_and_weak):
    model = basicnet_case[0]
    strong, weak, strong2 = strong_and_weak
    one, two = [strong, weak, strong2], [strong, weak * 0.5, strong2]
    assert same_corpus_maxima(model, one, two)  # what the old check compared agrees
    with pytest.raises(CorpusChangedError, match=r"batch 1 \(images 16 to 23\) holds different content in pass 2: "
                                                 r"the checksum of the per-sample maxima of layer 'features.c1'"):
        analyze(model, PerPassLoader(one, two), selectivity="two-pass", progress=False)


def test_analyze_two_pass_rejects_a_shuffled_order(basicnet_case, strong_and_weak):
    model = basicnet_case[0]
    strong, weak, strong2 = strong_and_weak
    loader = PerPassLoader([strong, weak, strong2], [strong2, weak, strong])
    with pytest.raises(CorpusChangedError, match="batch 0 .*different content.*no shuffle=True"):
        analyze(model, loader, selectivity="two-pass", progress=False)


def test_analyze_two_pass_with_identical_passes_equals_exact_mode(basicnet_case, strong_and_weak):
    model, data, _ = basicnet_case
    corpus = list(strong_and_weak) + data[:2]
    two_pass = analyze(model, PerPassLoader(corpus, [x.clone() for x in corpus]), selectivity="two-pass",
                       progress=False)
    exact = analyze(model, corpus, selectivity="exact", progress=False)
    assert two_pass.num_images == exact.num_images == 72 and two_pass.passes == 2
    for name, s in exact.stats.items():
        t = two_pass.stats[name]
        assert torch.equal(t.corpus_max, s.corpus_max) and torch.equal(t.dead_mask(), s.dead_mask()), name
        assert t.selectivity().mode == "two_pass"
        assert torch.equal(t.selectivity().value, s.selectivity().value), name
    for a, b in zip(two_pass.report.to_dict()["layers"], exact.report.to_dict()["layers"]):
        assert a["selectivity"].pop("mode") == "two_pass" and b["selectivity"].pop("mode") == "exact"
        assert a == b


def nan_channel_basicnet():
    """small_basicnet whose last feature's channel 2 is NaN on every input (BN bias NaN)."""
    model = small_basicnet()
    with torch.no_grad():
        model.features.c7.bn.bias[2] = float("nan")
    return model


def assert_reports_one_nan_channel(text: str):
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("features.", "total"))}
    header = text.splitlines()[0].split()
    column = header.index("NaN/Inf")
    assert rows["features.c7"][column] == "1" and rows["features.c6"][column] == "0"
    assert rows["total"][column - 2] == "1"  # the totals row leaves kind and samples empty
    assert ("WARNING: 1 channel in 1 layer (features.c7) had NaN/Inf activations; they are neither dead nor "
            "active") in text


@pytest.mark.parametrize("selectivity", ["two-pass", "exact"])
def test_analyze_report_shows_nan_channels(basicnet_case, selectivity):
    data = basicnet_case[1][:2]
    model = nan_channel_basicnet()
    result = analyze(model, data, selectivity=selectivity, progress=False)
    assert result.report.layer("features.c7").nonfinite_channels == 1
    assert_reports_one_nan_channel(str(result))
    assert "**WARNING: 1 channel in 1 layer" in result.report.to_markdown()
    m = reference(model, data, {"features.c7": BASICNET_POINTS["features.c7"]})["features.c7"]
    nan = torch.isnan(m).any(dim=0)
    assert nan.tolist() == [c == 2 for c in range(m.shape[1])]
    dead = (torch.where(torch.isnan(m), 0.0, m).amax(dim=0) < 1e-12) & ~nan  # the NaN channel is not dead
    assert result.report.layer("features.c7").inactive_by_activation[1e-12] == int(dead.sum())


def test_cli_analyze_prints_nan_channels(basicnet_case, monkeypatch, capsys):
    import sparsekern.cli
    from sparsekern.train import RunConfig

    model = nan_channel_basicnet()
    # Where the CLI looks the name up (it imports load_trained from train.loop at the top).
    monkeypatch.setattr(sparsekern.cli, "load_trained", lambda path, device: (model, RunConfig(dataset="synthetic")))
    assert sparsekern.cli.main(["analyze", "unused", "--samples", "16", "--batch-size", "8", "--no-progress"]) == 0
    assert_reports_one_nan_channel(capsys.readouterr().out)


def test_analyze_rejects_bad_input(basicnet_case):
    model, data, _ = basicnet_case
    with pytest.raises(TypeError, match="nn.Module"):
        analyze(lambda x: x, data)
    with pytest.raises(ValueError, match="unknown selectivity"):
        analyze(model, data, selectivity="three-pass")
    with pytest.raises(ValueError, match="max_batches"):
        analyze(model, data, max_batches=0)
    with pytest.raises(ValueError, match="amp_dtype"):
        analyze(model, data, amp_dtype=torch.float64)
    with pytest.raises(ValueError, match="no batches"):
        analyze(model, [], progress=False)
    with pytest.raises(ValueError, match="no batches on its second pass"):
        analyze(model, (x for x in data[:1]), selectivity="two-pass", progress=False)
    with pytest.raises(TypeError, match="first item is a str"):
        analyze(model, [("image.png", 3)], progress=False)
    with pytest.raises(TypeError, match="floating-point"):
        analyze(model, [torch.zeros(2, 1, 28, 28, dtype=torch.uint8)], progress=False)
    with pytest.raises(ValueError, match="model is on cpu"):
        analyze(model, data, device="cuda", progress=False)
    assert not model.training


def resnet18_points() -> dict:
    """The hook points of every feature of a torchvision-style ResNet-18: the stem, and per
    BasicBlock its first ReLU call (after bn1) and its second (after the residual add)."""
    points = {"bn1": ("relu", 0)}
    for i in range(1, 5):
        for j in range(2):
            b = f"layer{i}.{j}"
            points[f"{b}.bn1"] = (f"{b}.relu", 0)
            points[f"{b}.residual"] = (f"{b}.relu", 1)
    return points


def test_analyze_resnet18_equals_float64_reference():
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=1, num_classes=10)
    with torch.no_grad():
        model.layer1[0].bn1.weight[:4] = 0
        model.layer1[0].bn1.bias[:4] = -1
    data = random_batches(4, (16, 1, 16, 16))  # 64 small images: 4x4 maps in layer1, 1x1 in layer4
    points = resnet18_points()
    ref = reference(model, data, points)
    assert int((ref["layer1.0.bn1"].amax(dim=0) < 1e-12).sum()) >= 4
    for selectivity in ("two-pass", "exact"):
        result = analyze(model, data, selectivity=selectivity, progress=False)
        assert result.num_images == 64
        assert_matches(result, ref)


def test_analyze_mobilenet_v2_relu6_features():
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", in_channels=1, num_classes=10)
    bn = model.features[1].conv[0][1]
    with torch.no_grad():  # channel 0 dead; channel 1 saturates at the ReLU6 cap, so it is alive
        bn.weight[:2] = 0
        bn.bias[0], bn.bias[1] = -1.0, 10.0
    relu6 = [name for name, m in model.named_modules() if isinstance(m, nn.ReLU6)]
    points = {name.rpartition(".")[0]: (name, 0) for name in relu6}  # unit names: "features.0", ...
    data = random_batches(1, (8, 1, 32, 32))
    ref = reference(model, data, points)
    result = analyze(model, data, selectivity="exact", progress=False)
    assert len(result.features) == 35 and {f.activation for f in result.features} == {"relu6"}
    assert_matches(result, ref)
    s = result.stats["features.1.conv.0"]
    assert bool(s.dead_mask()[0]) and not bool(s.dead_mask()[1]) and s.corpus_max[1].item() == 6.0


@pytest.fixture(scope="module")
def fashion_mnist_test_batches():
    from sparsekern.data import get_dataset

    if not os.path.exists(FASHION_MNIST):
        pytest.skip("Fashion-MNIST IDX files not installed")
    dataset = get_dataset("fashion-mnist", train=False)
    x, _ = dataset.get_batch(torch.arange(len(dataset)))
    assert len(x) == 10000  # the whole test set
    return list(x.split(500))


@pytest.mark.slow
def test_analyze_fashion_mnist_test_set_basicnet(fashion_mnist_test_batches):
    batches = fashion_mnist_test_batches
    model = small_basicnet()
    ref = reference(model, batches, BASICNET_POINTS)
    result = analyze(model, [(b, None) for b in batches], selectivity="two-pass", progress=False)
    assert result.num_images == 10000
    assert_matches(result, ref)
    assert result.report.totals["inactive_by_activation"][1e-12] >= 6  # the channels killed above


@pytest.mark.slow
def test_analyze_fashion_mnist_test_set_resnet18(fashion_mnist_test_batches):
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=1, num_classes=10)
    with torch.no_grad():  # dead channels in a plain unit and before a residual add
        model.layer1[0].bn1.weight[:4] = 0
        model.layer1[0].bn1.bias[:4] = -1
        model.layer3[1].bn1.weight[:3] = 0
        model.layer3[1].bn1.bias[:3] = -2
    points = resnet18_points()
    ref = reference(model, fashion_mnist_test_batches, points)
    result = analyze(model, [(b, None) for b in fashion_mnist_test_batches], selectivity="two-pass", progress=False)
    assert result.num_images == 10000
    assert_matches(result, ref)
    assert int(result.stats["layer1.0.bn1"].dead_mask().sum()) >= 4
    assert int(result.stats["layer3.1.bn1"].dead_mask().sum()) >= 3
