"""The README's Python examples, run as they are written (taken from README.md, not copied here)
on a small BasicNet with planted dead channels, give what the README says they give.
Deprecated names are errors while they run: the README shows only the current API."""
import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparsekern
from sparsekern.models import BasicNet

from _helpers import REPO, channel_peaks, dead_channels, make_constant, randomize_bn

DEAD = {"features.c2": [0, 3], "features.c5": [1]}   # gamma = 0, beta < 0: relu(beta) = 0 for any input


def readme_blocks() -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    assert len(blocks) == 3, "the README's Python examples changed: update this test with them"
    return blocks


def run_block(code: str, namespace: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
        exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def batches(count: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(count)]


def planted_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(BasicNet(width=0.125))
    for unit, channels in DEAD.items():
        make_constant(model.get_submodule(f"{unit}.bn"), channels, -0.5)
    return model


def test_using_it_block_measures_what_it_says():
    activations = [torch.randn(8, 128, 5, 5, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    ns = run_block(readme_blocks()[0], {"activations": activations})
    x = ns["x"]
    assert torch.equal(ns["m"], x.abs().amax((2, 3)))
    assert torch.equal(ns["pos"].long(), (x > 0).sum((2, 3)))
    corpus = torch.cat(activations)
    assert torch.equal(ns["stats"].corpus_max, corpus.abs().amax((0, 2, 3)))
    assert not ns["stats"].dead_mask().any()


def test_measuring_and_harvesting_blocks_remove_the_dead_channels_exactly(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # plan.json is written where the code runs
    model = planted_model()
    loader, test_loader = batches(3, seed=1), batches(4, seed=2)
    ns = run_block(readme_blocks()[1], {"sparsekern": sparsekern, "F": F, "model": model, "loader": loader,
                                        "test_loader": test_loader})
    printed = capsys.readouterr().out
    assert "features.c2" in printed and "features.c5" in printed  # both reports name the layers

    relus = {f"features.c{i}.conv": f"features.c{i}.relu" for i in range(1, 8)}  # producer -> its ReLU
    peaks = channel_peaks(copy.deepcopy(model).eval(), relus.values(), [x for x, _ in test_loader])
    reference = {conv: dead_channels(peaks)[relu] for conv, relu in relus.items()}
    for unit, channels in DEAD.items():
        assert set(channels) <= set(reference[f"{unit}.conv"])
    bn = model.features.c1.bn.eval()
    h = model.features.c1.conv(test_loader[0][0]).detach()
    dead = torch.zeros(bn.num_features, dtype=torch.bool)
    dead[[1, 4]] = True
    ns.update(fresh_model=copy.deepcopy(model), bn=bn, h=h, dead=dead)
    ns = run_block(readme_blocks()[2], ns)

    removed = {name: sorted(layer.removed) for name, layer in ns["plan"].layers.items() if layer.removed}
    assert removed == {name: channels for name, channels in reference.items() if channels}
    x = ns["x"]
    with torch.no_grad():
        want, got = model.eval()(x), ns["pruned"].eval()(x)  # prune_model keeps the original's mode
        assert (want - got).abs().max() <= 1e-5 * want.abs().max()
        rebuilt = sparsekern.prune.PrunePlan.load(tmp_path / "plan.json").apply(copy.deepcopy(model), x).eval()
        assert torch.equal(rebuilt(x), got)

    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    y_want = torch.relu(h * scale[:, None, None] + (bn.bias - bn.running_mean * scale)[:, None, None]).detach()
    y_want[:, dead] = 0
    torch.testing.assert_close(ns["y"], y_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ns["m"], y_want.amax((2, 3)), rtol=1e-5, atol=1e-5)
