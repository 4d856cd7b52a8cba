"""The extended reproduction's plan and tables (sparsekern.experiments.reproduction_extended):
which runs it trains, which it reads from the first reproduction, and the numbers in its tables."""
from __future__ import annotations

import json

import pytest

from sparsekern.experiments import reproduction_extended as rx


def _finish(run_dir, dead_act: float, dead_gamma: float, error: float) -> None:
    run_dir.mkdir(parents=True)
    total = {"dead_by_activation_pct": dead_act, "dead_by_gamma_pct": dead_gamma}
    (run_dir / "result.json").write_text(json.dumps({"total": total, "test_error": error}))


def test_plan_is_seed_major_without_duplicates(tmp_path):
    configs = rx.planned_configs(tmp_path, [0, 1])
    ids = [c.run_id() for c in configs]
    assert len(ids) == len(set(ids))
    # per seed: 1 unregularised + 5 strengths x {L2, WD} + 6 optimizers, minus Adam L2 2e-3 counted
    # twice, + 2 mechanism runs (their own identity: log_mechanism joins it) + 2 VGG-16 budgets
    assert len(ids) == 2 * (1 + 10 + 6 - 1 + 2 + 2)
    assert [c.seed for c in configs] == [0] * 20 + [1] * 20
    assert [(c.model, c.epochs) for c in configs if c.model == "vgg16" and c.seed == 1] == [("vgg16", 2), ("vgg16", 10)]
    lrs = {c.optimizer: c.lr for c in configs if c.reg == "l2" and c.reg_strength == 2e-3 and not c.log_mechanism}
    assert lrs == rx.OPTIMIZER_LRS
    mechanism = [c for c in configs if c.log_mechanism and c.seed == 0]
    assert [(c.optimizer, c.lr) for c in mechanism] == [("adam", 2e-3), ("momentum", 0.02)]
    with pytest.raises(ValueError, match="unknown group"):
        rx.planned_configs(tmp_path, [0], ["nope"])


def test_finished_runs_are_found_here_or_in_the_reused_sweep(tmp_path):
    out, reuse = tmp_path / "ext", tmp_path / "old"
    first, second = rx.planned_configs(out, [0], ["optimizers"])[:2]
    assert rx.finished_dir(first, out, reuse) is None
    _finish(reuse / "runs" / first.run_id(), 30.0, 20.0, 0.12)
    _finish(out / "runs" / second.run_id(), 1.0, 0.5, 0.2)
    assert rx.finished_dir(first, out, reuse) == reuse / "runs" / first.run_id()
    assert rx.finished_dir(second, out, reuse) == out / "runs" / second.run_id()


def test_tables_average_the_finished_seeds(tmp_path):
    out, reuse = tmp_path / "ext", tmp_path / "old"
    adam_l2 = [c for c in rx.planned_configs(out, [0, 1, 2], ["optimizers"])
               if c.optimizer == "adam"]
    for config, dead in zip(adam_l2, (30.0, 32.0, 34.0)):
        _finish(reuse / "runs" / config.run_id(), dead, dead / 2, 0.1)
    table = rx.optimizer_table(out, reuse, [0, 1, 2])
    adam = next(row for row in table.rows if row[0] == "Adam")
    assert adam[2] == 3 and adam[3]["mean"] == pytest.approx(32.0) and adam[3]["std"] == pytest.approx(2.0)
    assert adam[5]["mean"] == pytest.approx(10.0)
    adamax = next(row for row in table.rows if row[0] == "AdaMax")
    assert adamax[2:] == [0, None, None, None]
    written = rx.write_tables(out, reuse, [0, 1, 2])
    assert {p.name for p in written} >= {"table_strength.md", "table_optimizers.md", "table_matched_l2_wd.md",
                                         "fig_strength.png"}
    assert "| Adam | 0.002 | 3 | 32.0 ± 2.0 |" in (out / "table_optimizers.md").read_text()


def test_base_setting_is_the_quick_demo_setting():
    from sparsekern.demo import QUICK

    assert (rx.QUICK_WIDTH, rx.QUICK_BATCH, rx.QUICK_EVAL_EVERY, rx.ADAM_LR, rx.L2_STRENGTH) == (
        QUICK.width, QUICK.batch_size, QUICK.eval_every, QUICK.adam_lr, QUICK.l2_strength)
    assert QUICK.analyze_samples is None


# ---------------------------------------------------------------------- the mechanism
def _python_spearman(x, y) -> float:
    """Pearson's r of the mean ranks, computed with plain Python lists."""
    def ranks(v):
        ordered = sorted(v)
        first = {}
        for i, value in enumerate(ordered):
            first.setdefault(value, i)
        return [first[value] + (ordered.count(value) + 1) / 2 for value in v]

    rx_, ry_ = ranks(x), ranks(y)
    mx, my = sum(rx_) / len(rx_), sum(ry_) / len(ry_)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx_, ry_))
    return cov / (sum((a - mx) ** 2 for a in rx_) * sum((b - my) ** 2 for b in ry_)) ** 0.5


def test_spearman_matches_a_plain_computation_with_ties():
    import random

    rng = random.Random(0)
    for n in (2, 5, 40):
        x = [rng.choice([0.0, 0.1, 0.5, 1.0]) for _ in range(n)]  # many ties
        y = [rng.random() for _ in range(n)]
        if len(set(x)) > 1:
            assert rx.spearman(x, y) == pytest.approx(_python_spearman(x, y), abs=1e-12)
    assert rx.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert rx.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert rx.spearman([1, 1, 1], [1, 2, 3]) != rx.spearman([1, 1, 1], [1, 2, 3])  # NaN: constant sample
    with pytest.raises(ValueError, match="two samples"):
        rx.spearman([1.0], [2.0])


def _mechanism_run(run_dir, seed: int, intervals: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"config": {"seed": seed}, "total": {}, "test_error": 0.1}))
    lines = [{"step": 500 * (i + 1), "mechanism": rows} for i, rows in enumerate(intervals)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_mechanism_points_and_table_from_logged_runs(tmp_path):
    out = tmp_path / "ext"
    adam, sgd = [c for c in rx.planned_configs(out, [0, 1], ["mechanism"])][:2]
    # channel 0 selective with a large ratio, 1 universal with a small one, 2 inactive (max 0: left out),
    # 3 without loss gradient (left out), 4 NaN selectivity (left out)
    row = {"bn": "bn1", "selectivity": [0.8, 0.0, 1.0, 0.3, None], "window_max": [1.0, 2.0, 0.0, 1.0, 1.0],
           "reg_update": [4.0, 0.5, 1.0, 1.0, 1.0], "loss_update": [1.0, 5.0, 0.0, 0.0, 1.0]}
    second = dict(row, selectivity=[0.6, 0.05, 1.0, 0.3, None], reg_update=[3.0, 0.6, 1.0, 1.0, 1.0])
    _finish_dir = out / "runs" / adam.run_id()
    _mechanism_run(_finish_dir, 0, [{"f1": row}, {"f1": second}])
    selectivity, ratio = rx.mechanism_points(_finish_dir)
    assert selectivity.tolist() == [0.8, 0.0, 0.6, 0.05]
    assert ratio.tolist() == pytest.approx([4.0, 0.1, 3.0, 0.12])
    table = rx.mechanism_table(out, None, [0, 1])
    lines = {line[0]: line for line in table.rows}
    assert lines["Adam"][1:3] == [1, 4]
    assert lines["Adam"][3]["mean"] == pytest.approx(1.0)  # the ratio rises with selectivity
    assert lines["Adam"][4]["mean"] == pytest.approx(0.11)  # median of 0.1 and 0.12 (selectivity < 0.1)
    assert lines["Adam"][5]["mean"] == pytest.approx(3.5)  # median of 4 and 3 (selectivity >= 0.5)
    assert lines["Adam"][6]["mean"] == pytest.approx(50.0) and lines["Adam"][7]["mean"] == pytest.approx(0.3625)
    assert lines["momentum SGD"][1:] == [0, 0, None, None, None, None, None]
    written = rx.write_tables(out, None, [0, 1])
    assert {p.name for p in written} >= {"table_mechanism.md", "table_mechanism.csv", "fig_mechanism.png"}
    assert "| Adam | 1 | 4 | 1.00 |" in (out / "table_mechanism.md").read_text()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "metrics.jsonl").write_text(json.dumps({"step": 500}) + "\n")
    with pytest.raises(ValueError, match="no mechanism rows"):
        rx.mechanism_points(plain)


def test_pruning_rows_are_combined_over_the_seeds_written(tmp_path):
    from pathlib import Path

    source = json.loads((Path(__file__).parents[1] / "docs/results/method-table-xeon/method_table.json").read_text())
    out = tmp_path / "ext"
    assert rx.pruning_config(out, 2).methods == ("l1-norm", "apoz", "selectivity", "apoz-global", "selectivity-global")
    assert rx.pruning_config(out, 2).run_config("adam-l2").seed == 2
    for seed in (0, 1):
        table = json.loads(json.dumps(source))
        table["config"]["seed"] = seed
        directory = out / rx.PRUNING_DIR / f"seed-{seed}"
        directory.mkdir(parents=True)
        (directory / "method_table.json").write_text(json.dumps(table))
    assert rx.write_pruning_table(out, [0]) == [out / rx.PRUNING_DIR / "seed-0" / "method_table.md"]
    written = rx.write_pruning_table(out, [0, 1, 2])  # seed 2 not written yet: left out
    combined = json.loads(written[0].read_text())
    assert combined["seeds"] == [0, 1] and len(combined["rows"]) == len(source["rows"])
    assert "mean ± std over seeds 0, 1" in written[1].read_text()


def test_vgg_table_counts_dead_or_constant_filters_once(tmp_path):
    out, reuse = tmp_path / "ext", [tmp_path / "old", tmp_path / "harvest"]
    two_epochs = rx.planned_configs(out, [0], ["vgg16"])[0]
    layers = [
        # channel 1 dead and |gamma| tiny: counted once; channel 2 |gamma| < 1e-3 only; 3 alive
        {"channels": 4, "dead_mask": [False, True, False, False], "gamma": [0.5, 1e-4, -5e-4, 0.2]},
        {"channels": 2, "dead_mask": [True, False], "gamma": None},  # no BN scale: by activation only
    ]
    result = {"layers": layers, "total": {"dead_by_activation_pct": 33.3, "dead_by_gamma_pct": 25.0},
              "test_error": 0.15, "steps": 6000}
    assert rx.removable_exactly_pct(result) == pytest.approx(100 * 3 / 6)
    run_dir = reuse[1] / "runs" / two_epochs.run_id()  # found in the second reused sweep
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps(result))
    table = rx.vgg_table(out, reuse, [0, 1])
    assert table.rows[0][:3] == [2, 6000, 1] and table.rows[0][3]["mean"] == pytest.approx(50.0)
    assert table.rows[1] == [10, None, 0, None, None, None, None]
