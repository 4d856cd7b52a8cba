"""The explicit-sparsity experiments in --quick mode on synthetic data: the keep-ratio table
(Plain / Rand / R-P / L-P / S-P / GL-P / GS-P on LeNet-5) and CGES versus L2.

References: the kept count max(1, floor(ratio * n + 0.5)) written out, masks recomputed from
the checkpoint's weights with torch.sort, accuracies recomputed with a plain forward pass,
zero counts of the checkpoints, LeNet-5's MACs counted by hand."""
import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from sparsekern.cli import main as cli_main
from sparsekern.experiments.cges_vs_l2 import CgesVsL2Config, macs_after_removal
from sparsekern.experiments.keep_ratio import ROWS, KeepRatioConfig, layer_mask
from sparsekern.models import LeNet5
from sparsekern.train import ConfigError

RATIOS = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0313, 0.0157)
RATIO_LABELS = ["100%", "50%", "25%", "12.5%", "6.25%", "3.13%", "1.57%"]
COMMON = ["--dataset", "synthetic", "--threads", "1", "--device", "cpu", "--no-progress"]


def expected_kept(ratio: float, n: int) -> int:
    return max(1, math.floor(ratio * n + 0.5))


def checkpoint_model(out, run_id) -> LeNet5:
    model = LeNet5()
    model.load_state_dict(torch.load(out / "runs" / run_id / "checkpoint.pt", weights_only=True)["model"])
    return model.eval()


def synthetic_test_set(n: int):
    from sparsekern.data import get_dataset

    test = get_dataset("synthetic", train=False)
    return test.get_batch(torch.arange(n))


# ---------------------------------------------------------------------- keep ratio
@pytest.fixture(scope="module")
def keep_ratio_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("keep-ratio")
    assert cli_main(["keep-ratio", "--quick", "--out", str(out), *COMMON]) == 0
    return out, json.loads((out / "keep_ratio.json").read_text())


def test_keep_ratio_writes_the_table_files(keep_ratio_run):
    out, results = keep_ratio_run
    assert results["config"]["rows"] == list(ROWS) and results["config"]["seeds"] == [0, 1]
    with open(out / "keep_ratio.csv") as fh:
        table = list(csv.reader(fh))
    header = ["layer", "row", "unit"] + [f"{label} {stat}" for label in RATIO_LABELS for stat in ("mean", "std")]
    assert table[0] == header
    expected_rows = [(layer, row) for layer in ("conv c5", "fc f6") for row in ROWS]
    assert [(line[0], line[1]) for line in table[1:]] == expected_rows
    for line in table[1:]:
        assert all(0 <= float(v) <= 100 for v in line[3::2])  # accuracies in %
    markdown = (out / "keep_ratio.md").read_text()
    assert "| layer | row | unit | " + " | ".join(RATIO_LABELS) + " |" in markdown
    assert markdown.count("| conv c5 |") == markdown.count("| fc f6 |") == len(ROWS)
    assert (out / "keep_ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keep_ratio_kept_counts_and_units(keep_ratio_run):
    _, results = keep_ratio_run
    cells = {(c["row"], c["layer"], c["keep_ratio"]): c for c in results["cells"]}
    assert len(cells) == len(ROWS) * 2 * len(RATIOS)
    for (row, layer, ratio), cell in cells.items():
        group = row in ("GL-P", "GS-P")
        units = {"c5": 120, "f6": 84 if group else 84 * 120}[layer]
        assert cell["unit"] == ("filter" if layer == "c5" or group else "weight")
        assert cell["units"] == units
        assert cell["kept"] == expected_kept(ratio, units), (row, layer, ratio)
        assert cell["accuracy_pct"]["n"] == 2 and len(cell["accuracy_pct"]["values"]) == 2
    # Keeping everything changes nothing: the 100% column is the unpruned network.
    for row in ROWS:
        for layer in ("c5", "f6"):
            assert cells[row, layer, 1.0]["accuracy_pct"]["values"] == results["unpruned_accuracy_pct"][row]["values"]
    # Rand prunes the very networks Plain trained.
    assert all(results["runs"][f"Rand/seed{s}"] == results["runs"][f"Plain/seed{s}"] for s in (0, 1))


def test_keep_ratio_plain_cell_matches_an_independent_pruning(keep_ratio_run):
    """Plain, conv c5 at 25%, seed 1: keep the 30 filters of largest L1 norm, forward the test set."""
    out, results = keep_ratio_run
    model = checkpoint_model(out, results["runs"]["Plain/seed1"])
    norms = model.c5.weight.detach().double().abs().flatten(1).sum(dim=1)
    keep = torch.zeros(120, dtype=torch.bool)
    keep[torch.sort(norms, descending=True, stable=True).indices[:30]] = True
    with torch.no_grad():
        model.c5.weight.mul_(keep.view(-1, 1, 1, 1))
        x, y = synthetic_test_set(results["test_samples"])
        accuracy = 100.0 * (model(x).argmax(1) == y).double().mean().item()
    cell = next(c for c in results["cells"] if (c["row"], c["layer"], c["keep_ratio"]) == ("Plain", "c5", 0.25))
    assert cell["accuracy_pct"]["values"][1] == pytest.approx(accuracy, abs=1e-9)


def test_keep_ratio_rerun_reuses_the_trained_runs(keep_ratio_run, capsys):
    out, results = keep_ratio_run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/checkpoint.pt")}
    assert len(stamps) == 12  # 7 rows x 2 seeds, Rand sharing Plain's runs
    assert cli_main(["keep-ratio", "--quick", "--out", str(out), *COMMON]) == 0
    assert "12 already complete, 0 to run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "keep_ratio.json").read_text()) == results


def masks_model() -> LeNet5:
    torch.manual_seed(0)
    model = LeNet5()
    with torch.no_grad():  # distinct magnitudes so the top-k sets are unambiguous
        model.c5.weight.mul_(torch.rand(120, 1, 1, 1) + 0.5)
    return model


@pytest.mark.parametrize("ratio", RATIOS)
def test_magnitude_and_random_masks_keep_the_right_units(ratio):
    model = masks_model()
    n = expected_kept(ratio, 120)
    mask = layer_mask(ROWS["Plain"], "c5", model, None, ratio, seed=0)
    norms = model.c5.weight.detach().double().abs().flatten(1).sum(dim=1)
    top = set(torch.sort(norms, descending=True).indices[:n].tolist())
    assert set(mask.flatten(1).all(dim=1).nonzero().flatten().tolist()) == top
    assert not (mask.flatten(1).any(dim=1) & ~mask.flatten(1).all(dim=1)).any()  # whole filters

    weights = layer_mask(ROWS["Plain"], "f6", model, None, ratio, seed=0)
    assert int(weights.sum()) == expected_kept(ratio, 84 * 120)
    if ratio < 1:
        assert model.f6.weight[weights].abs().min() >= model.f6.weight[~weights].abs().max()

    rand = [layer_mask(ROWS["Rand"], "c5", model, None, ratio, seed=s) for s in (0, 0, 1)]
    assert all(int(m.flatten(1).all(dim=1).sum()) == n for m in rand)
    assert torch.equal(rand[0], rand[1])
    if 1 < n < 120:
        assert not torch.equal(rand[0], rand[2])


def test_slbi_masks_keep_the_units_that_entered_first():
    from sparsekern.regularize import SplitLBI

    model = masks_model()
    optimizer = SplitLBI(model.parameters(), lr=0.5, nu=1.0)
    with torch.no_grad():
        model.c5.weight[:7] *= 40  # seven filters enter Gamma's support at once, the others never
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    support = optimizer.support(model.c5.weight)
    assert support.sum() == 7
    optimization = SimpleNamespace(optimizer=optimizer)  # what layer_mask reads of a run's Optimization
    for ratio in RATIOS:
        kept = layer_mask(ROWS["S-P"], "c5", model, optimization, ratio, seed=0).flatten(1).all(dim=1)
        assert int(kept.sum()) == expected_kept(ratio, 120)
        if kept.sum() >= 7:
            assert kept[support].all()
        else:
            assert support[kept].all()


def test_keep_ratio_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="rows"):
        KeepRatioConfig(rows=("Plain", "X-P"))
    with pytest.raises(ValueError, match="did you mean 0.5"):
        KeepRatioConfig(keep_ratios=(50.0,))
    with pytest.raises(ConfigError, match="slbi_nu"):
        KeepRatioConfig(slbi_nu=0.0)


# ---------------------------------------------------------------------- CGES versus L2
# Output positions x output channels x input channels x kernel area (Linear: out x in).
LENET_MACS = {"c1": 28 * 28 * 6 * 1 * 25, "c3": 10 * 10 * 16 * 6 * 25, "c5": 1 * 120 * 16 * 25, "f6": 84 * 120,
              "output": 10 * 84}


def test_macs_after_removal_counted_by_hand():
    model = LeNet5()
    dense = macs_after_removal(model, (1, 1, 28, 28))
    assert dense["macs"] == dense["macs_after_removal"] == sum(LENET_MACS.values())
    with torch.no_grad():
        model.c5.weight[60:] = 0  # half of c5's filters, so half of f6's inputs
        model.c3.weight[:, 0] = 0  # c3 ignores input channel 0, so c1's filter 0 is unused
    expected = (LENET_MACS["c1"] * 5 / 6 + LENET_MACS["c3"] * 5 / 6 + LENET_MACS["c5"] / 2 + LENET_MACS["f6"] / 2
                + LENET_MACS["output"])
    assert macs_after_removal(model, (1, 1, 28, 28))["macs_after_removal"] == pytest.approx(expected)


def test_cges_vs_l2_quick(tmp_path):
    out = tmp_path / "cg"
    assert cli_main(["cges-vs-l2", "--quick", "--out", str(out), "--cges-strength", "0.05", *COMMON]) == 0
    results = json.loads((out / "cges_vs_l2.json").read_text())
    assert [(g["model"], g["method"]) for g in results["groups"]] == [
        ("lenet5", "L2"), ("lenet5", "CGES"), ("basicnet", "L2"), ("basicnet", "CGES")]
    for key, run in results["runs"].items():
        model = torch.load(out / "runs" / run["run_id"] / "checkpoint.pt", weights_only=True)["model"]
        weights = [t for name, t in model.items() if name.endswith("weight") and t.dim() >= 2]
        zeros = 100.0 * sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert run["weight_sparsity_pct"] == pytest.approx(zeros), key
        assert (zeros > 1.0) if "/CGES/" in key else (zeros == 0.0), key
    lenet_l2 = results["groups"][0]
    assert lenet_l2["dense_macs_m"] == pytest.approx(sum(LENET_MACS.values()) / 1e6)
    assert lenet_l2["macs_pct"]["values"] == [100.0, 100.0]
    assert results["groups"][1]["weight_sparsity_pct"]["mean"] > lenet_l2["weight_sparsity_pct"]["mean"]
    with open(out / "cges_vs_l2.csv") as fh:
        header = next(csv.reader(fh))
    assert header[:4] == ["model", "method", "dense MACs (M)", "accuracy (%) mean"]
    assert "| basicnet (width 0.125) | CGES |" in (out / "cges_vs_l2.md").read_text()


def test_cges_vs_l2_rejects_unsupported_models():
    with pytest.raises(ConfigError, match="models"):
        CgesVsL2Config(models=("vgg16",))
