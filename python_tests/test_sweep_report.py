"""Sweeps (grid expansion, mean +- std over seeds, resumable runs) and reports (tables, figures)."""
import csv
import json
import math

import numpy as np
import pytest

from sparsekern.train import ConfigError, RunConfig
from sparsekern.train.loop import _totals
from sparsekern.train.report import write_report
from sparsekern.train.sweep import expand_grid, group_label, load_sweep, run_sweep, summarize, write_summary

TINY_BASE = dict(dataset="synthetic", width=0.125, batch_size=8, num_train_samples=32, num_test_samples=16,
                 eval_batch_size=32, steps=4, eval_every=2, threads=1)


# ---------------------------------------------------------------------- synthetic results
def fake_result(sweep_dir, *, optimizer="adam", reg="l2", strength=5e-4, seed=0, batch_size=40,
                test_error=0.1, dead_act=(1, 2), dead_gamma=(0, 3), channels=(4, 8)):
    """A result.json (and metrics.jsonl) as a finished run writes them, with chosen numbers."""
    config = RunConfig(optimizer=optimizer, reg=reg, reg_strength=strength, seed=seed, batch_size=batch_size,
                       steps=100, out_dir=str(sweep_dir / "runs"))
    layers = []
    for i, (c, a, g) in enumerate(zip(channels, dead_act, dead_gamma), start=1):
        gamma = [0.0] * g + [0.5 + 0.1 * k for k in range(c - g)]
        layers.append({
            "label": f"C{i}", "name": f"features.c{i}", "kind": "bn", "channels": c,
            "dead_by_activation": a, "dead_by_activation_loose": a, "dead_by_gamma": g, "dead_by_gamma_loose": g,
            "mean_abs_gamma": sum(abs(x) for x in gamma) / c, "gamma": gamma, "beta": [0.1 * k - 0.2 for k in range(c)],
            "dead_mask": [k < a for k in range(c)], "selectivity": [1.0] * a + [0.2 + 0.05 * k for k in range(c - a)],
        })
    result = {
        "run_id": config.run_id(), "config_hash": config.config_hash(), "config": config.to_dict(), "steps": 100,
        "epochs": 2.0, "analysis_samples": 50, "test_error": test_error, "test_loss": 0.3, "train_loss": 0.2,
        "thresholds": {"activation": 1e-12, "activation_loose": 1e-4, "gamma": 1e-3, "gamma_loose": 1e-2,
                       "selectivity": 1e-3},
        "layers": layers, "total": _totals(layers),
    }
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps(result))
    lines = [{"step": s, "total": {"mean_abs_gamma": 1.0 / s, "dead_by_gamma_pct": float(s)}} for s in (50, 100)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return {"run_id": result["run_id"], "run_dir": str(run_dir), "status": "done", "error": None}, result


def stats(values):
    return pytest.approx(np.mean(values)), pytest.approx(np.std(values, ddof=1))


def test_summary_mean_and_std_over_seeds(tmp_path):
    made = [fake_result(tmp_path, seed=0, test_error=0.10, dead_act=(1, 2), dead_gamma=(0, 3)),
            fake_result(tmp_path, seed=1, test_error=0.14, dead_act=(3, 2), dead_gamma=(1, 4)),
            fake_result(tmp_path, optimizer="momentum", seed=0, test_error=0.2, dead_act=(0, 0), dead_gamma=(0, 1)),
            fake_result(tmp_path, optimizer="momentum", seed=1, test_error=0.3, dead_act=(0, 1), dead_gamma=(0, 0))]
    summary = write_summary(tmp_path, [status for status, _ in made])
    assert json.loads((tmp_path / "sweep_summary.json").read_text()) == summary
    assert summary["varying"] == ["optimizer"]
    adam, msgd = summary["groups"]
    assert (adam["label"], msgd["label"]) == ("Adam", "mSGD")
    assert adam["seeds"] == [0, 1] and len(adam["runs"]) == 2
    m = adam["metrics"]
    assert (m["test_error_pct"]["mean"], m["test_error_pct"]["std"]) == stats([10.0, 14.0])
    # 12 channels in total: (1 + 2) and (3 + 2) dead by activation, (0 + 3) and (1 + 4) by gamma
    assert (m["dead_by_activation_pct"]["mean"], m["dead_by_activation_pct"]["std"]) == stats([300 / 12, 500 / 12])
    assert (m["dead_by_gamma_pct"]["mean"], m["dead_by_gamma_pct"]["std"]) == stats([300 / 12, 500 / 12])
    c1 = adam["layers"][0]
    assert (c1["dead_by_activation_pct"]["mean"], c1["dead_by_activation_pct"]["std"]) == stats([25.0, 75.0])
    c2 = msgd["layers"][1]
    assert (c2["dead_by_gamma_pct"]["mean"], c2["dead_by_gamma_pct"]["std"]) == stats([12.5, 0.0])
    # a single seed has no sample std
    single = summarize([made[0][1]])
    assert single["groups"][0]["metrics"]["test_error_pct"] == {"mean": 10.0, "std": None, "n": 1, "values": [10.0]}


def test_results_written_before_a_config_field_existed_group_with_newer_ones(tmp_path):
    # result.json files from an older version lack fields added to RunConfig since (e.g. slbi_kappa);
    # they hold that field's default and must land in the same group as the newer seeds.
    old_status, old = fake_result(tmp_path, seed=0, test_error=0.1)
    new_status, new = fake_result(tmp_path, seed=1, test_error=0.2)
    for field in ("slbi_kappa", "slbi_nu"):
        del old["config"][field]
    summary = summarize([old, new])
    assert len(summary["groups"]) == 1 and summary["groups"][0]["seeds"] == [0, 1]


def test_group_labels():
    config = RunConfig(optimizer="momentum", reg="wd", reg_strength=1e-4, batch_size=64).to_dict()
    assert group_label(config, ["optimizer", "reg", "reg_strength", "batch_size"]) == "mSGD WD 0.0001 b64"
    assert group_label(RunConfig(reg="none").to_dict(), ["optimizer", "reg", "reg_strength"]) == "Adam no reg"


def test_grid_expansion_collapses_reg_none_and_validates(tmp_path):
    grid = {"optimizer": ["adam", "sgd"], "reg": ["none", "l2"], "reg_strength": [1e-4, 5e-4], "seed": [0, 1]}
    configs = expand_grid({"steps": 10}, grid, tmp_path)
    # per optimizer and seed: 1 'none' + 2 L2 strengths
    assert len(configs) == 2 * 2 * 3
    assert len({c.run_id() for c in configs}) == len(configs)
    assert all(c.out_dir == str(tmp_path / "runs") for c in configs)
    with pytest.raises(ConfigError, match="grid.seed"):
        expand_grid({}, {"seed": 3}, tmp_path)
    with pytest.raises(ConfigError, match="lr=-1.0"):
        expand_grid({"lr": -1.0}, {"seed": [0]}, tmp_path)
    with pytest.raises(ConfigError, match="out_dir"):
        expand_grid({"out_dir": "x"}, {"seed": [0]}, tmp_path)
    spec = tmp_path / "sweep.toml"
    spec.write_text('[base]\nsteps = 10\n[grid]\nseed = [0, 1]\n[extra]\nx = 1\n')
    with pytest.raises(ConfigError, match="extra"):
        load_sweep(spec)


# ---------------------------------------------------------------------- report
def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_report_tables_and_figures_from_synthetic_results(tmp_path):
    made = [fake_result(tmp_path, seed=s, batch_size=b, test_error=e, dead_act=a, dead_gamma=g)
            for s, b, e, a, g in [(0, 40, 0.10, (1, 2), (0, 3)), (1, 40, 0.12, (1, 4), (2, 3)),
                                  (0, 128, 0.08, (0, 1), (0, 0))]]
    made.append(fake_result(tmp_path, optimizer="sgd", reg="none", strength=0.0, batch_size=40, test_error=0.2,
                            dead_act=(0, 0), dead_gamma=(0, 0)))
    write_summary(tmp_path, [status for status, _ in made])
    report = write_report(tmp_path, log=lambda m: None)

    names = {p.name for p in tmp_path.iterdir()}
    assert {"report.md", "table1.md", "table1.csv", "table2_activation.csv", "table2_gamma.csv",
            "table_batch.csv", "fig3_selectivity.png", "fig4_gamma_decay.png"} <= names
    assert len([n for n in names if n.startswith("fig2_gamma_beta_")]) == 3
    for name in names:
        if name.endswith(".png"):
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = {r["setting"]: r for r in read_csv(tmp_path / "table1.csv")}
    assert set(rows) == {"Adam L2 0.0005 b40", "Adam L2 0.0005 b128", "SGD no reg b40"}
    b40 = rows["Adam L2 0.0005 b40"]
    assert b40["seeds"] == "2"
    assert float(b40["test error (%) mean"]) == pytest.approx(11.0)
    assert float(b40["test error (%) std"]) == pytest.approx(np.std([10, 12], ddof=1))
    assert float(b40["inactive, act. (%) mean"]) == pytest.approx(np.mean([300 / 12, 500 / 12]))
    assert float(b40["inactive, |γ| (%) mean"]) == pytest.approx(np.mean([300 / 12, 500 / 12]))
    assert rows["Adam L2 0.0005 b128"]["test error (%) std"] == ""  # one seed
    assert rows["SGD no reg b40"]["λ"] == "-"

    per_layer = {r["setting"]: r for r in read_csv(tmp_path / "table2_gamma.csv")}
    assert float(per_layer["Adam L2 0.0005 b40"]["C1 mean"]) == pytest.approx(25.0)  # 0/4 and 2/4
    assert float(per_layer["Adam L2 0.0005 b40"]["C2 mean"]) == pytest.approx(37.5)  # 3/8 twice
    assert float(per_layer["Adam L2 0.0005 b40"]["C2 std"]) == pytest.approx(0.0)

    batch = read_csv(tmp_path / "table_batch.csv")
    adam = next(r for r in batch if r["optimizer"] == "adam")
    assert float(adam["err % (batch 40) mean"]) == pytest.approx(11.0)
    assert float(adam["err % (batch 128) mean"]) == pytest.approx(8.0)

    text = report.read_text()
    assert "![Figure 3" in text and "(fig4_gamma_decay.png)" in text and "| Adam L2 0.0005 b40 |" in text
    assert "11.0 ± 1.4" in text


def test_report_of_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sweep_summary.json"):
        write_report(tmp_path)


# ---------------------------------------------------------------------- a real sweep
@pytest.mark.slow
def test_sweep_runs_in_workers_aggregates_and_skips_finished_runs(tmp_path):
    grid = {"optimizer": ["adam", "sgd"], "seed": [0, 1]}
    base = {**TINY_BASE, "reg": "l2", "reg_strength": 1e-3}
    summary = run_sweep(tmp_path, base, grid, workers=2, progress=False, log=lambda m: None)
    assert summary["failed"] == []
    assert [r["status"] for r in summary["runs"]] == ["done"] * 4
    results = [json.loads((tmp_path / r["run_dir"] / "result.json").read_text()) for r in summary["runs"]]
    for group, optimizer in zip(summary["groups"], ("adam", "sgd")):
        mine = [r for r in results if r["config"]["optimizer"] == optimizer]
        assert group["seeds"] == [0, 1]
        errors = [100 * r["test_error"] for r in mine]
        got = group["metrics"]["test_error_pct"]
        assert (got["mean"], got["std"]) == stats(errors)
        gamma = [r["total"]["dead_by_gamma_pct"] for r in mine]
        got = group["metrics"]["dead_by_gamma_pct"]
        assert got["mean"] == pytest.approx(np.mean(gamma)) and got["std"] == pytest.approx(np.std(gamma, ddof=1))
    assert (tmp_path / "sweep.toml").is_file()

    stamps = [(tmp_path / r["run_dir"] / "result.json").stat().st_mtime_ns for r in summary["runs"]]
    messages = []
    again = run_sweep(tmp_path, base, grid, workers=1, progress=False, log=messages.append)
    assert [r["status"] for r in again["runs"]] == ["skipped"] * 4
    assert "4 already complete, 0 to run" in messages[0]
    assert stamps == [(tmp_path / r["run_dir"] / "result.json").stat().st_mtime_ns for r in again["runs"]]
    assert again["groups"] == summary["groups"]
    assert not math.isnan(again["groups"][0]["metrics"]["test_error_pct"]["mean"])


# ---------------------------------------------------------------------- where the report lives
def test_the_report_of_runs_is_written_by_the_training_layer_and_the_old_names_still_work():
    """report/ makes tables and figures from data; reading run and sweep directories (train's files)
    is sparsekern.train.report's. The old names warn, naming the new place, and are the same objects."""
    import sparsekern.report
    import sparsekern.train.report as train_report

    for name in ("write_report", "load_source"):
        with pytest.warns(DeprecationWarning, match=f"use sparsekern.train.report.{name}"):
            assert getattr(sparsekern.report, name) is getattr(train_report, name)


def test_one_mean_std_for_sweep_summaries_and_experiment_tables(tmp_path):
    import sparsekern.experiments
    from sparsekern.report.tables import mean_std

    summary = summarize([fake_result(tmp_path, seed=s, test_error=e)[1] for s, e in ((0, 0.1), (1, 0.2))])
    assert summary["groups"][0]["metrics"]["test_error_pct"] == mean_std([100.0 * 0.1, 100.0 * 0.2])
    with pytest.warns(DeprecationWarning, match="use sparsekern.report.tables.mean_std"):
        assert sparsekern.experiments.mean_std is mean_std


@pytest.mark.parametrize("text", ["{not json", "[]", '{"runs": []}', '{"runs": [{"run_id": "x"}], "groups": []}'])
def test_a_malformed_sweep_summary_is_one_line_naming_the_file(tmp_path, capsys, text):
    from sparsekern.cli import main

    (tmp_path / "sweep_summary.json").write_text(text)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sweep_summary.json: not a sweep summary" in err
