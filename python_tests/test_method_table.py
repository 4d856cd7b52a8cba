"""`sparsekern compare-methods` (sparsekern.experiments.method_table): the CGES and Split LBI
rankings recomputed by hand, the choice of the fraction on a hand-made accuracy curve, an
end-to-end --quick run on synthetic data (plans re-applied to the checkpoints, accuracies
recomputed with a plain forward pass), reuse of finished runs, and config errors."""
import csv
import json

import pytest
import torch

from sparsekern.cli import main as cli_main
from sparsekern.experiments.method_table import (
    METHODS,
    MethodTableConfig,
    cges_plan,
    select_fraction,
    slbi_plan,
)
from sparsekern.models import BasicNet
from sparsekern.prune import PrunePlan, prune_model
from sparsekern.train import ConfigError

COMMON = ["--dataset", "synthetic", "--threads", "1", "--device", "cpu", "--no-progress"]
# A large lr and L2 so that 30 steps of Adam + L2 already leave dead filters (the implicit row
# removes some, exactly); tolerance 100 makes every swept method take the largest fraction.
QUICK = ["--quick", "--adam-lr", "0.02", "--l2-strength", "0.05", "--tolerance-pct", "100", *COMMON]
LAYERS = ("features.c1.conv", "features.c2.conv", "features.c3.conv")


# ---------------------------------------------------------------------- CGES ranking
def cges_model() -> BasicNet:
    """BasicNet with 4 + 6 + 8 filters, distinct gammas, and four exactly-zero filters."""
    torch.manual_seed(0)
    model = BasicNet(widths=(4, 6, 8)).eval()
    gammas = torch.randperm(18).double().add(1).div(10).mul(torch.tensor([1.0, -1.0]).repeat(9))  # |g| 0.1..1.8
    with torch.no_grad():
        start = 0
        for name in LAYERS:
            bn = model.get_submodule(name.replace(".conv", ".bn"))
            bn.weight.copy_(gammas[start:start + bn.num_features])
            start += bn.num_features
        model.features.c1.conv.weight[2] = 0  # its own weights are all zero
        model.features.c3.conv.weight[5] = 0
        model.features.c3.conv.weight[:, 3] = 0  # c2's filter 3 is read by nothing
        model.classifier.weight[:, 1] = 0  # c3's filter 1 is read by nothing
        model.features.c2.conv.weight[0] *= 1e-6  # tiny but nonzero: ranked by its gamma like any other
    return model


def expected_cges_kept(model: BasicNet, keep_ratio: float) -> dict:
    """Sort (is not zero, |gamma|) over all 18 filters, keep the best round(r * 18), at least one per layer."""
    zero = {("features.c1.conv", 2), ("features.c3.conv", 5), ("features.c2.conv", 3), ("features.c3.conv", 1)}
    keys = []
    for name in LAYERS:
        gamma = model.get_submodule(name.replace(".conv", ".bn")).weight.detach().abs()
        keys += [((name, c) not in zero, float(gamma[c]), name, c) for c in range(gamma.numel())]
    keys.sort(reverse=True)
    best = keys[:max(1, round(keep_ratio * len(keys)))]
    kept = {name: sorted(c for _, _, n, c in best if n == name) for name in LAYERS}
    for name in LAYERS:
        if not kept[name]:
            kept[name] = [max(k for k in keys if k[2] == name)[3]]
    return kept


@pytest.mark.parametrize("keep_ratio", [1.0, 0.9, 14 / 18, 0.5, 0.25, 0.1])
def test_cges_plan_removes_zero_filters_first_then_smallest_gamma(keep_ratio):
    model = cges_model()
    plan = cges_plan(model, keep_ratio)
    assert not plan.exact
    assert {name: plan.layers[name].kept for name in LAYERS} == expected_cges_kept(model, keep_ratio)
    if keep_ratio == 14 / 18:  # exactly the four zero filters go
        assert {(n, c) for n in LAYERS for c in plan.layers[n].removed} == {
            ("features.c1.conv", 2), ("features.c3.conv", 5), ("features.c2.conv", 3), ("features.c3.conv", 1)}
    pruned, report = prune_model(model, plan, (4, 1, 28, 28))
    assert sum(report.layers[n].channels_after for n in LAYERS) == sum(len(v.kept) for v in plan.layers.values())
    assert pruned(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_slbi_plan_keeps_the_filters_that_entered_first():
    from sparsekern.regularize import SplitLBI

    model = cges_model()
    optimizer = SplitLBI(model.parameters(), lr=0.5, nu=1.0, fc_mode="group")
    with torch.no_grad():
        model.features.c3.conv.weight[[0, 4, 6]] *= 100  # these enter Gamma's support, the others never
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    support = optimizer.support(model.features.c3.conv.weight)
    assert support.nonzero().flatten().tolist() == [0, 4, 6]
    plan = slbi_plan(model, optimizer, 0.375)  # 3 of c3's 8 filters, 2 of 6, 2 of 4
    assert plan.layers["features.c3.conv"].kept == [0, 4, 6]
    assert [len(plan.layers[n].kept) for n in LAYERS] == [2, 2, 3]
    for name in LAYERS:  # the same order as the optimizer's own ranking
        order = optimizer.importance(model.get_submodule(name).weight).tolist()
        assert plan.layers[name].kept == sorted(order[:len(plan.layers[name].kept)])


# ---------------------------------------------------------------------- the fraction
def test_select_fraction_takes_the_largest_fraction_within_tolerance():
    curve = [(0.0, 90.0), (0.1, 90.2), (0.2, 89.6), (0.3, 89.4), (0.4, 85.0), (0.5, 89.5), (0.6, 70.0)]
    assert select_fraction(curve, 90.0, 0.5) == 0.5  # not monotone: 0.5 is back within 0.5 points (boundary)
    assert select_fraction(curve, 90.0, 0.0) == 0.1
    assert select_fraction(list(reversed(curve)), 90.0, 0.45) == 0.2
    assert select_fraction(curve, 90.0, 100.0) == 0.6
    assert select_fraction(curve[1:], 95.0, 0.5) is None


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("method-table")
    assert cli_main(["compare-methods", "--out", str(out), *QUICK]) == 0
    return out, json.loads((out / "method_table.json").read_text())


def synthetic_test_halves(n: int = 256):
    from sparsekern.data import get_dataset

    x, y = get_dataset("synthetic", train=False).get_batch(torch.arange(n))
    return (x[: n // 2], y[: n // 2]), (x[n // 2:], y[n // 2:])


def test_quick_run_writes_one_row_per_method(quick_run):
    out, results = quick_run
    rows = results["rows"]
    assert [r["method"] for r in rows] == list(METHODS)
    assert results["test_samples"] == {"select": 128, "report": 128}
    for r in rows:
        assert 0.0 <= r["filters_removed_pct"] <= 100.0
        assert r["filters"] == 8 + 16 + 16 + 32 + 32 + 64 + 64  # BasicNet width 0.125
        assert r["ms_per_batch"] > 0 and r["dense_ms_per_batch"] > 0
        if r["method"] != "implicit":  # tolerance 100: the largest fraction of the grid
            assert r["selected_fraction"] == 0.75
            assert r["selected_fraction"] == select_fraction(
                [(p["fraction"], p["select_accuracy_pct"]) for p in r["curve"]], r["dense_select_accuracy_pct"], 100)
            assert r["filters_removed_pct"] > 70.0
            assert r["params"] < r["params_dense"] and r["flops"] < r["flops_dense"]
    with open(out / "method_table.csv") as fh:
        table = list(csv.reader(fh))
    assert table[0][:4] == ["method", "trained with", "fraction chosen", "filters removed (%)"]
    assert [line[0] for line in table[1:]] == [m.label for m in METHODS.values()]
    markdown = (out / "method_table.md").read_text()
    assert all(f"| {m.label} |" in markdown for m in METHODS.values())
    assert "first 128 test images" in markdown and "other 128 images" in markdown


def analysis_corpus(n: int = 64):
    """The training images the quick run's implicit plan was measured on (QUICK: analyze_samples 64)."""
    from sparsekern.data import get_dataset

    return get_dataset("synthetic", train=True, num_samples=512).get_batch(torch.arange(n))


def test_quick_run_implicit_row_is_exact_and_plans_rebuild_the_rows(quick_run):
    """Exactness is asserted where it is guaranteed: on the images the plan was measured on. Which
    channels a 30-step training leaves dead, and whether they stay dead on other images, depends on
    the CPU's rounding during training, so the report-half numbers are recomputed, not assumed."""
    from sparsekern.prune.compare import compare_logits
    from sparsekern.train.loop import load_trained

    out, results = quick_run
    rows = {r["method"]: r for r in results["rows"]}
    dense, _ = load_trained(results["runs"]["adam-l2"]["run_dir"], "cpu")
    (x_select, _), (x, y) = synthetic_test_halves()
    x_corpus, y_corpus = analysis_corpus(results["analysis_samples"])
    implicit = rows["implicit"]
    plan = PrunePlan.load(out / implicit["plan"])
    pruned, _ = prune_model(dense, plan, x_select, verify=False)
    with torch.no_grad():
        want, got = dense(x_corpus), pruned(x_corpus)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    assert implicit["logits_on_corpus"]["samples"] == len(x_corpus)
    assert implicit["logits_on_corpus"]["agreement"] == 1.0
    assert implicit["logits_on_corpus"]["max_rel_logit_diff"] <= 1e-4
    # The report half: the row's numbers are those of the plan's network on those images.
    recomputed = compare_logits(dense, pruned, torch.utils.data.TensorDataset(x, y), batch_size=256)
    for key in ("agreement", "accuracy_original", "accuracy_pruned"):
        assert implicit["logits_vs_dense"][key] == pytest.approx(recomputed[key], abs=1e-12), key
    assert implicit["logits_vs_dense"]["max_abs_logit_diff"] == pytest.approx(
        recomputed["max_abs_logit_diff"], rel=1e-3, abs=1e-6)
    assert implicit["pruned_accuracy_pct"] == pytest.approx(100 * recomputed["accuracy_pruned"], abs=1e-9)
    assert implicit["dense_accuracy_pct"] == pytest.approx(100 * recomputed["accuracy_original"], abs=1e-9)
    # The L1-norm row's accuracy, from its plan and a plain forward pass over the report half.
    l1 = rows["l1-norm"]
    pruned, report = prune_model(dense, PrunePlan.load(out / l1["plan"]), x_select)
    with torch.no_grad():
        accuracy = 100.0 * (pruned(x).argmax(1) == y).double().mean().item()
        dense_accuracy = 100.0 * (dense(x).argmax(1) == y).double().mean().item()
    assert l1["pruned_accuracy_pct"] == pytest.approx(accuracy, abs=1e-9)
    assert l1["dense_accuracy_pct"] == pytest.approx(dense_accuracy, abs=1e-9)
    assert sum(r.channels_after for r in report.layers.values() if r.name.startswith("features")) == l1["filters_kept"]


def test_implicit_plan_removes_planted_dead_and_constant_filters_exactly_on_any_input():
    """What the quick run cannot promise (that something is dead), planted: channels with gamma = 0,
    beta = -1 are 0 after ReLU for every input, gamma = 0, beta = 0.3 a constant. The plan, measured on
    64 images, removes exactly those and is exact on fresh inputs, in float64."""
    import copy

    from sparsekern.prune.implicit import implicit_plan

    torch.manual_seed(0)
    model = BasicNet(width=0.125).eval()
    dead = {"features.c2.conv": [1, 5], "features.c5.conv": [0, 7, 8]}
    constant = {"features.c4.conv": [3], "features.c6.conv": [2, 9]}
    with torch.no_grad():  # BN statistics of the data, so that every unplanted channel fires somewhere
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # cumulative average
        model.train()(torch.randn(256, 1, 28, 28))
        model.eval()
        for planted, beta in ((dead, -1.0), (constant, 0.3)):
            for name, channels in planted.items():
                bn = model.get_submodule(name.replace(".conv", ".bn"))
                bn.weight[channels] = 0.0
                bn.bias[channels] = beta
    corpus = torch.utils.data.TensorDataset(torch.randn(64, 1, 28, 28), torch.zeros(64, dtype=torch.long))
    plan = implicit_plan(model, torch.utils.data.DataLoader(corpus, batch_size=16), by="both")  # float32 kernels
    removed = {name: layer.removed for name, layer in plan.layers.items() if layer.removed}
    assert removed == {name: sorted(c) for name, c in {**dead, **constant}.items()}
    model = copy.deepcopy(model).double()
    pruned, _ = prune_model(model, plan, corpus.tensors[0][:8].double())
    fresh = 3 * torch.randn(32, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        want, got = model(fresh), pruned(fresh)
    assert (got - want).abs().max() <= 1e-12 * float(want.abs().max())


def test_finished_runs_are_reused_from_another_directory(quick_run, tmp_path, capsys):
    out, results = quick_run
    capsys.readouterr()
    other = tmp_path / "other"
    assert cli_main(["compare-methods", "--out", str(other), "--reuse-runs", str(out / "runs"), *QUICK]) == 0
    err = capsys.readouterr().err
    assert "0 runs: 0 already complete, 0 to run" in err and err.count("reusing the finished run") == 4
    assert not (other / "runs").exists()
    again = json.loads((other / "method_table.json").read_text())
    assert all(run["reused"] for run in again["runs"].values())
    for key in ("filters_removed_pct", "pruned_accuracy_pct", "dense_accuracy_pct", "params", "flops", "curve"):
        assert [r[key] for r in again["rows"]] == [r[key] for r in results["rows"]], key


def test_methods_restrict_the_rows_and_the_trainings(quick_run, tmp_path, capsys):
    """--methods l1-norm,apoz,selectivity,selectivity-global needs the Adam + L2 network only; the APoZ
    and selectivity rows' plans are what their criteria choose, per layer or under one global
    threshold, on an independent (exact-mode) analysis of the corpus."""
    from sparsekern import analyze
    from sparsekern.prune.criteria import APoZ, Selectivity
    from sparsekern.train.loop import load_trained

    out, results = quick_run
    capsys.readouterr()
    other = tmp_path / "subset"
    assert cli_main(["compare-methods", "--out", str(other), "--reuse-runs", str(out / "runs"),
                     "--methods", "l1-norm,apoz,selectivity,selectivity-global", *QUICK]) == 0
    assert capsys.readouterr().err.count("reusing the finished run") == 1
    again = json.loads((other / "method_table.json").read_text())
    assert list(again["runs"]) == ["adam-l2"]
    assert [r["method"] for r in again["rows"]] == ["implicit", "l1-norm", "apoz", "selectivity", "selectivity-global"]
    before = {r["method"]: r for r in results["rows"]}
    for row in again["rows"]:  # the same network and corpus: the same rows as in the full table
        assert row["curve"] == before[row["method"]]["curve"], row["method"]
    dense, _ = load_trained(results["runs"]["adam-l2"]["run_dir"], "cpu")
    x_corpus, _ = analysis_corpus(results["analysis_samples"])
    exact = analyze(dense, [x_corpus], progress=False, selectivity="exact")
    assert len(set(torch.cat(list(Selectivity(exact).scores().values())).tolist())) > 1  # not all tied
    for key, criterion, scope in (("apoz", APoZ(exact), "layer"), ("selectivity", Selectivity(exact), "layer"),
                                  ("selectivity-global", Selectivity(exact), "global")):
        row = next(r for r in again["rows"] if r["method"] == key)
        plan = PrunePlan.load(other / row["plan"])
        want = PrunePlan.from_criterion(criterion, dense, 1.0 - row["selected_fraction"], scope=scope)
        assert {n: layer.kept for n, layer in plan.layers.items()} == \
            {n: layer.kept for n, layer in want.layers.items()}, key
        if scope == "global":  # the scope matters here: per layer, the same fraction keeps other filters
            per_layer = PrunePlan.from_criterion(criterion, dense, 1.0 - row["selected_fraction"], scope="layer")
            assert {n: l.kept for n, l in per_layer.layers.items()} != {n: l.kept for n, l in plan.layers.items()}


# ---------------------------------------------------------------------- config errors
def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="tolerance_pct"):
        MethodTableConfig(tolerance_pct=-0.1)
    with pytest.raises(ConfigError, match="fractions"):
        MethodTableConfig(fractions=(0.0, 0.5, 1.0))
    with pytest.raises(ConfigError, match="fractions"):
        MethodTableConfig(fractions=(-0.05, 0.5))
    with pytest.raises(ConfigError, match="fractions"):
        MethodTableConfig(fractions=())
    with pytest.raises(ConfigError, match="cges_strength"):
        MethodTableConfig(cges_strength=0.0)
    with pytest.raises(ConfigError, match="methods=.*expected distinct methods of l1-norm"):
        MethodTableConfig(methods=("l1-norm", "magnitude"))
    with pytest.raises(ConfigError, match="methods"):
        MethodTableConfig(methods=("apoz", "apoz"))
    assert MethodTableConfig(methods=("apoz",)).trainings() == ("adam-l2",)
    assert MethodTableConfig(methods=("cges", "l1-norm")).trainings() == ("adam-l2", "cges")
    assert cli_main(["compare-methods", "--out", "/nonexistent/never", "--fractions", "0.5,1", *COMMON]) == 2


def test_the_implicit_run_is_the_reproductions():
    """Same RunConfig as scripts/reproduce.py's Adam + L2 row (seed 0), so a finished one is reused."""
    config = MethodTableConfig()
    assert (config.run_config("adam-l2").run_id()
            == "basicnet-w0.25_fashion-mnist_adam-lr0.002_l2-0.002_b20_e2_s0_3dab02f0")
    assert (config.run_config("slimming").run_id()
            == "basicnet-w0.25_fashion-mnist_adam-lr0.002_slimming-0.0001_b20_e2_s0_4c7589a0")


# ---------------------------------------------------------------------- several seeds
def test_aggregate_gives_mean_and_sample_std_over_seed_tables(quick_run, tmp_path, capsys):
    import statistics

    _, results = quick_run
    directories = []
    for seed, shift in ((0, 0.0), (1, 3.0), (2, -1.5)):  # the quick table, as if from three seeds
        table = json.loads(json.dumps(results))
        table["config"].update(seed=seed, out_dir=f"elsewhere-{seed}", workers=seed + 1)  # where: may differ
        for row in table["rows"]:
            row["filters_removed_pct"] += shift
            row["speedup"] *= 1 + shift / 10
        directory = tmp_path / f"seed-{seed}"
        directory.mkdir()
        (directory / "method_table.json").write_text(json.dumps(table))
        directories.append(directory)
    out = tmp_path / "combined"
    assert cli_main(["compare-methods", "--aggregate", ",".join(map(str, directories)), "--out", str(out)]) == 0
    combined = json.loads((out / "method_table_seeds.json").read_text())
    assert combined["seeds"] == [0, 1, 2]
    for row, original in zip(combined["rows"], results["rows"]):
        removed = [original["filters_removed_pct"] + s for s in (0.0, 3.0, -1.5)]
        assert row["filters_removed_pct"]["mean"] == pytest.approx(statistics.mean(removed))
        assert row["filters_removed_pct"]["std"] == pytest.approx(statistics.stdev(removed))
        speedups = [original["speedup"] * (1 + s / 10) for s in (0.0, 3.0, -1.5)]
        assert row["speedup"]["std"] == pytest.approx(statistics.stdev(speedups))
        assert row["mflops"]["mean"] == pytest.approx(original["flops"] / 1e6) and row["mflops"]["std"] == pytest.approx(0, abs=1e-12)
        assert row["per_seed"]["filters_removed_pct"] == pytest.approx(removed)
    markdown = (out / "method_table_seeds.md").read_text()
    assert "mean ± std over seeds 0, 1, 2" in markdown and "[seed 1](../seed-1/method_table.md)" in markdown
    implicit = combined["rows"][0]
    assert f"{implicit['filters_removed_pct']['mean']:.2f} ± {implicit['filters_removed_pct']['std']:.2f}" in markdown

    # Tables that differ in more than the seed, repeat a seed, or are missing: clear errors.
    changed = json.loads((directories[2] / "method_table.json").read_text())
    changed["config"]["width"] = 0.5
    (directories[2] / "method_table.json").write_text(json.dumps(changed))
    assert cli_main(["compare-methods", "--aggregate", ",".join(map(str, directories)), "--out", str(out)]) == 2
    assert "width=0.5 differs" in capsys.readouterr().err
    assert cli_main(["compare-methods", "--aggregate", f"{directories[0]},{directories[0]}", "--out", str(out)]) == 2
    assert "seeds [0, 0] repeat" in capsys.readouterr().err
    assert cli_main(["compare-methods", "--aggregate", f"{directories[0]},{tmp_path}", "--out", str(out)]) == 2
    assert "no method_table.json" in capsys.readouterr().err
    assert cli_main(["compare-methods", "--aggregate", str(directories[0])]) == 2
    assert "needs --out" in capsys.readouterr().err
