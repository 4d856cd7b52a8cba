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
    # per seed: 1 unregularised + 5 strengths x {L2, WD} + 6 optimizers, minus Adam L2 2e-3 counted twice
    assert len(ids) == 2 * (1 + 10 + 6 - 1)
    assert [c.seed for c in configs] == [0] * 16 + [1] * 16
    lrs = {c.optimizer: c.lr for c in configs if c.reg == "l2" and c.reg_strength == 2e-3}
    assert lrs == rx.OPTIMIZER_LRS
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
