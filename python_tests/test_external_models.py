"""sparsekern.models.external: model specs, --model-args, weights files read without pickles and
loaded strictly, and the input a model expects (timm's data config, else 224 / ImageNet)."""
import pickle

import pytest
import torch
import torchvision
from torch import nn

from sparsekern.errors import ModelSpecError, WeightsError
from sparsekern.models import BasicNet
from sparsekern.models.external import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_external,
    format_model_args,
    input_config,
    load_external,
    load_weights,
    parse_model_args,
    read_state_dict,
)


def tiny_factory(channels=4, classes=3):
    """A factory as a user would write one (module:function spec)."""
    return nn.Sequential(nn.Conv2d(1, channels, 3), nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(channels, classes))


def not_a_model():
    return 42


# ---------------------------------------------------------------------- --model-args
@pytest.mark.parametrize("text, expected", [
    (None, {}),
    ("", {}),
    ("num_classes=10", {"num_classes": 10}),
    ("num_classes=10, drop_rate=0.1,widths=(8, 16)", {"num_classes": 10, "drop_rate": 0.1, "widths": (8, 16)}),
    ("act_layer=relu,name='x,y',flag=True,none=None,neg=-1e-3", {"act_layer": "relu", "name": "x,y", "flag": True,
                                                                 "none": None, "neg": -1e-3}),
])
def test_model_args_are_python_literals(text, expected):
    assert parse_model_args(text) == expected
    assert parse_model_args(format_model_args(expected)) == expected  # what a prune report stores


@pytest.mark.parametrize("text, message", [
    ("num_classes=", "key=value"),
    ("10", "every item must be key=value"),
    ("num_classes=int('3')", "is not a Python literal"),
])
def test_bad_model_args_name_the_problem(text, message):
    with pytest.raises(ModelSpecError, match=message):
        parse_model_args(text)


# ---------------------------------------------------------------------- specs
def test_torchvision_and_factory_specs_build_what_they_name():
    torch.manual_seed(0)
    model = build_external("torchvision:resnet18", "num_classes=7")
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 7 and not model.training
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=7)
    for key, value in reference.state_dict().items():  # same builder, same seed: same weights
        assert torch.equal(model.state_dict()[key], value), key

    net = build_external(f"{__name__}:tiny_factory", {"channels": 5})
    assert net[0].out_channels == 5 and net[-1].out_features == 3
    basic = build_external("sparsekern.models:BasicNet", "width=0.125,num_classes=4")
    assert isinstance(basic, BasicNet) and basic.classifier.out_features == 4


def test_timm_specs_build_with_pretrained_false():
    timm = pytest.importorskip("timm")
    model = build_external("timm:resnet10t", "num_classes=5")
    assert type(model) is type(timm.create_model("resnet10t", pretrained=False)) and model.fc.out_features == 5
    with pytest.raises(ModelSpecError, match=r"timm has no model 'resnet10x'; did you mean resnet10t"):
        build_external("timm:resnet10x")


@pytest.mark.parametrize("spec, args, message", [
    ("resnet18", None, "expected torchvision:NAME, timm:NAME or package.module:factory"),
    ("torchvision:", None, "expected torchvision:NAME"),
    ("torchvision:resnet19", None, "torchvision has no model 'resnet19'; did you mean resnet18"),
    ("torchvision:resnet18", "bogus=1", "unexpected keyword argument 'bogus'"),
    ("torchvision:resnet18", "weights='IMAGENET1K_V1'", "nothing is downloaded here: pass a local file with --weights"),
    ("timm:resnet18", "pretrained=True", "nothing is downloaded"),
    ("no_such_package.nets:build", None, "cannot import module 'no_such_package.nets'"),
    (f"{__name__}:no_such_factory", None, "has no attribute 'no_such_factory'"),
    (f"{__name__}:IMAGENET_MEAN", None, "is a tuple, not a callable factory"),
    (f"{__name__}:not_a_model", None, "returned a int, not a torch.nn.Module"),
])
def test_unknown_or_bad_specs_are_one_clear_error(spec, args, message):
    with pytest.raises(ModelSpecError) as info:
        build_external(spec, args)
    assert message in str(info.value) and repr(spec) in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------- weights
def trained_like(seed=1):
    torch.manual_seed(seed)
    model = tiny_factory()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].weight.uniform_(0.5, 1.5)
    return model


def assert_same_state(a: nn.Module, b: nn.Module):
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "model_state", "module_prefix"])
def test_a_pth_state_dict_in_any_usual_layout_loads_exactly(tmp_path, layout):
    source = trained_like()
    state = source.state_dict()
    content = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "step": 10, "optimizer": {"lr": 0.1}},
        "model_state": {"model_state": state},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    path = tmp_path / "w.pth"
    torch.save(content, path)
    loaded = load_external(f"{__name__}:tiny_factory", weights=path)
    assert_same_state(source, loaded.model)
    assert loaded.weights == str(path.resolve())


def test_safetensors_load_exactly(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = trained_like(2)
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(source.state_dict(), str(path))
    assert_same_state(source, load_external(f"{__name__}:tiny_factory", weights=path).model)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_state_dict(broken)


class Payload:
    """A class a weights-only load must refuse to rebuild."""


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    whole = tmp_path / "whole_model.pth"
    torch.save(tiny_factory(), whole)  # the module object itself, pickled
    with pytest.raises(WeightsError) as info:
        read_state_dict(whole)
    message = str(info.value)
    assert "holds pickled Python objects" in message and str(whole) in message and "\n" not in message
    assert "torch.nn" in message or "Sequential" in message  # the global it refused is named
    custom = tmp_path / "custom.pt"
    with open(custom, "wb") as fh:
        pickle.dump(Payload(), fh)
    with pytest.raises(WeightsError, match="pickled Python objects|not a readable torch.save file"):
        read_state_dict(custom)


@pytest.mark.parametrize("name, content, message", [
    ("missing.pth", None, "does not exist"),
    ("weights.npz", b"xx", "unknown format '.npz'"),
    ("garbage.pth", b"this is not a torch file", "not a readable torch.save file"),
    ("list.pth", [torch.zeros(2)], "holds a list, not a state dict"),
    ("nested.pth", {"epoch": 3, "weights": {"a": 1}}, "no state dict in it (top-level keys: 'epoch', 'weights')"),
])
def test_unusable_weights_files_name_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_mismatched_keys_and_shapes_list_a_few_of_each():
    model = tiny_factory()
    state = dict(trained_like().state_dict())
    state["5.weight"] = torch.zeros(9, 4)          # shape mismatch
    del state["0.weight"]                          # missing
    for i in range(7):
        state[f"extra.{i}"] = torch.zeros(1)       # unexpected: 7, only 5 shown
    del state["1.num_batches_tracked"]             # a counter may be absent: not reported
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_weights(model, state, "weights file w.pth")
    message = str(info.value)
    assert message.startswith("weights file w.pth does not fit the model (Sequential): ")
    assert "1 missing keys: 0.weight;" in message
    assert "7 unexpected keys: extra.0, extra.1, extra.2, extra.3, extra.4, ... (2 more)" in message
    assert "1 shape mismatches: 5.weight (file (9, 4), model (3, 4))" in message
    assert "num_batches_tracked" not in message
    for key, value in model.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key
    good = dict(trained_like().state_dict())
    del good["1.num_batches_tracked"]
    load_weights(model, good)  # fits: loads, the counter left as it was
    assert torch.equal(model[1].weight, trained_like()[1].weight)


# ---------------------------------------------------------------------- the input a model expects
def test_input_config_from_timm_else_imagenet_defaults():
    default = input_config(build_external("torchvision:resnet18"))
    assert default["input_size"] == (3, 224, 224) and default["data_config"] == "default"
    assert default["mean"] == IMAGENET_MEAN and default["std"] == IMAGENET_STD
    gray = input_config(tiny_factory(), 48)
    assert gray["input_size"] == (1, 48, 48)  # channels of the first conv
    assert input_config(tiny_factory(), (30, 40))["input_size"] == (1, 30, 40)

    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False)
    cfg = model.pretrained_cfg
    got = input_config(model)
    assert got["data_config"] == "timm" and got["input_size"] == tuple(cfg["input_size"])
    assert got["mean"] == tuple(cfg["mean"]) and got["std"] == tuple(cfg["std"])
    assert got["interpolation"] == cfg["interpolation"] and got["crop_pct"] == cfg["crop_pct"]
    assert input_config(model, 64)["input_size"] == (3, 64, 64)
