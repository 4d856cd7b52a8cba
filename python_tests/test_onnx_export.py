"""A pruned model exports to ONNX (torch.onnx.export, dynamo=True) and onnxruntime computes what
torch computes: a torchvision ResNet-18 and a BasicNet with planted dead (gamma 0, beta -1) and
constant (gamma 0, beta > 0) channels, pruned exactly by PrunePlan.from_gamma + prune_model."""
import json
import sys

import pytest
import torch
import torchvision

from sparsekern.cli import main
from sparsekern.errors import MissingDependencyError
from sparsekern.models import BasicNet
from sparsekern.prune import PrunePlan, prune_model
from sparsekern.prune.export import export_onnx, onnx_max_diff

from _helpers import make_constant, randomize_bn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOLERANCE = 1e-4  # float32, relative to max(1, max |output|)


def basicnet():
    torch.manual_seed(0)
    model = randomize_bn(BasicNet(in_channels=1, num_classes=10, width=0.125)).eval()
    make_constant(model.features.c2.bn, [0, 3], -1.0)   # dead
    make_constant(model.features.c5.bn, [1], -0.5)      # dead
    make_constant(model.features.c7.bn, [2], 0.7)       # constant relu(0.7): folded into the classifier
    return model, (1, 28, 28), {"features.c2.conv": 2, "features.c5.conv": 1, "features.c7.conv": 1}


def resnet18():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    make_constant(model.layer1[0].bn1, [0, 5, 9], -1.0)
    make_constant(model.layer3[1].bn1, [4], -2.0)
    make_constant(model.layer2[0].bn1, [2], 0.3)       # constant relu(0.3): folded where exact, else kept
    return model, (3, 32, 32), {"layer1.0.conv1": 3, "layer3.1.conv1": 1}


def ort_outputs(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def conv_weight_shapes(path):
    model = onnx.load(str(path))
    return sorted(tuple(init.dims) for init in model.graph.initializer if len(init.dims) == 4)


@pytest.mark.parametrize("make", [basicnet, resnet18], ids=["basicnet", "resnet18"])
def test_a_pruned_model_exports_and_onnxruntime_agrees(tmp_path, make):
    model, shape, removed = make()
    example = torch.randn((4,) + shape, generator=torch.Generator().manual_seed(1))
    plan = PrunePlan.from_gamma(model)
    pruned, report = prune_model(model, plan, example)
    for layer, count in removed.items():  # what was planted is gone: the export below is of a smaller model
        assert report.layers[layer].channels_before - report.layers[layer].channels_after >= count, layer

    path = export_onnx(pruned, example, tmp_path / "pruned.onnx")
    fresh = torch.randn((7,) + shape, generator=torch.Generator().manual_seed(2))  # another batch size: dynamic
    got = ort_outputs(path, fresh)
    with torch.no_grad():
        expected, dense = pruned(fresh), model(fresh)
    scale = max(1.0, float(expected.abs().max()))
    assert got.shape == expected.shape == (7, 10)
    assert float((got.double() - expected.double()).abs().max()) <= TOLERANCE * scale
    assert float((got.double() - dense.double()).abs().max()) <= TOLERANCE * scale  # and the unpruned model
    # The file holds the pruned convs: the weights of the planted layers have fewer output channels.
    pruned_convs = sorted(tuple(m.weight.shape) for m in pruned.modules() if isinstance(m, torch.nn.Conv2d))
    dense_convs = sorted(tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert pruned_convs != dense_convs
    assert conv_weight_shapes(path) == pruned_convs
    check = onnx_max_diff(path, pruned, fresh)
    assert check["samples"] == 7 and check["max_abs_diff"] <= TOLERANCE * scale
    assert check["output_scale"] == pytest.approx(float(expected.abs().max()))


def test_prune_cli_writes_and_checks_an_onnx_file(tmp_path, capsys):
    model, shape, removed = resnet18()
    weights = tmp_path / "r18.pth"
    torch.save(model.state_dict(), weights)
    out, path = tmp_path / "pruned", tmp_path / "pruned.onnx"
    assert main(["prune", "--model", "torchvision:resnet18", "--model-args", "num_classes=10", "--weights",
                 str(weights), "--data", "synthetic:8", "--input-size", "32", "--by", "gamma", "--out", str(out),
                 "--onnx", str(path), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["onnx"]["path"] == str(path) and printed["onnx"]["max_rel_diff"] <= TOLERANCE
    x = torch.randn((3,) + shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)  # the original, unpruned: exact removal keeps its function
    got = ort_outputs(path, x)
    assert float((got.double() - expected.double()).abs().max()) <= TOLERANCE * max(1.0, float(expected.abs().max()))
    plan = PrunePlan.load(out / "manifest.json")
    for layer, count in removed.items():
        assert len(plan.layers[layer].removed) >= count


def test_export_without_onnx_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    model, shape, _ = basicnet()
    with pytest.raises(MissingDependencyError, match=r"ONNX export needs onnxscript.*sparsekern\[export\]"):
        export_onnx(model, torch.randn((1,) + shape), tmp_path / "m.onnx")
