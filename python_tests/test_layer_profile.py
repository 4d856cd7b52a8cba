"""Per-layer timing (sparsekern.bench.layers) and the repeated-bench summary
(sparsekern.bench.speed.repeat_summary, its table sparsekern.report.speed) against hand-made references."""
import time

import pytest
import torch
from torch import nn

from sparsekern.bench import SPEED_CRITERION, layer_profile, leaf_times, repeat_summary
from sparsekern.report.speed import profile_markdown, repeat_markdown


class Sleep(nn.Module):
    """A leaf that takes a known time."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def test_leaf_times_measure_each_leaf_and_the_whole_forward():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Sleep(0.03), nn.Sequential(nn.ReLU(), Sleep(0.01)),
                          nn.Identity())
    times = leaf_times({"m": model}, torch.randn(2, 3, 8, 8), rounds=3, warmup=1)["m"]
    assert set(times) == {"0", "1", "2.0", "2.1", "(total)"}  # leaves by qualified name, Identity skipped
    assert 0.03 <= times["1"] < 0.1 and 0.01 <= times["2.1"] < 0.05
    assert times["(total)"] >= times["1"] + times["2.1"]
    assert not model._forward_hooks and not model[1]._forward_pre_hooks  # hooks removed


def test_a_leaf_called_twice_counts_both_calls():
    sleep = Sleep(0.01)
    model = nn.Sequential(sleep, sleep)
    times = leaf_times({"m": model}, torch.zeros(1), rounds=2, warmup=0)["m"]
    assert set(times) == {"0", "(total)"} and times["0"] >= 0.02


def test_layer_profile_lines_up_dense_and_pruned_layers_with_their_macs():
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    pruned = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1),
                           nn.ReLU())  # an extra leaf only the pruned model has
    rows = layer_profile({"dense": dense, "pruned": pruned}, (2, 3, 6, 6), rounds=2)
    by = {r["layer"]: r for r in rows}
    assert [r["layer"] for r in rows] == ["0", "1", "2", "3", "(other)", "(total)"]
    assert (by["0"]["dense MACs"], by["0"]["pruned MACs"]) == (36 * 8 * 27, 36 * 5 * 27)
    assert (by["2"]["dense MACs"], by["2"]["pruned MACs"]) == (36 * 4 * 72, 36 * 4 * 45)
    assert by["1"]["dense MACs"] == 0 and by["3"]["dense ms"] is None and by["3"]["pruned ms"] > 0
    assert by["(total)"]["dense MACs"] == 36 * 8 * 27 + 36 * 4 * 72
    for label in ("dense", "pruned"):
        leaves = sum(r[f"{label} ms"] or 0 for r in rows if not r["layer"].startswith("("))
        assert by["(other)"][f"{label} ms"] == pytest.approx(by["(total)"][f"{label} ms"] - leaves)
    table = profile_markdown(rows, batch=2)
    assert "| 0 |" in table and "| 3 | - |" in table and "38%" in table  # conv 0 saves 3/8 of its MACs


def _result(saved_by_batch, flops_saved=0.5):
    rows = [{"mode": "eager", "batch": b, "time_saved": s, "speedup": 1 / (1 - s), "dense ms": 10.0,
             "pruned ms": 10.0 * (1 - s), "flops_saved": flops_saved, "flop_ratio": 1 / (1 - flops_saved),
             "criterion_met": s >= SPEED_CRITERION * flops_saved} for b, s in saved_by_batch.items()]
    return {"rows": rows, "criterion": "c", "dtype": "float32", "sample_shape": [1, 28, 28],
            "flops_dense": 100, "flops_pruned": 50,
            "environment": {"device_name": "cpu", "torch_threads": 1, "torch": "x", "date": "2026-12-01"}}


def test_repeat_summary_judges_the_criterion_on_the_median_run():
    # 0.7 x 50% = 35%: runs at 30%, 36%, 40% -> median 36% met although one run is not.
    summary = repeat_summary([_result({256: 0.30, 1: 0.1}), _result({256: 0.40, 1: 0.2}),
                              _result({256: 0.36, 1: 0.5})])
    big = next(r for r in summary["rows"] if r["batch"] == 256)
    assert big["time_saved_median"] == pytest.approx(0.36) and big["criterion_met"]
    assert (big["time_saved_min"], big["time_saved_max"], big["runs_met"], big["runs"]) == (0.30, 0.40, 2, 3)
    small = next(r for r in summary["rows"] if r["batch"] == 1)
    assert small["time_saved_median"] == pytest.approx(0.2) and not small["criterion_met"] and small["runs_met"] == 1
    assert "36.0% [30.0, 40.0] | 35.0% | 2/3 | met |" in repeat_markdown(summary)
    with pytest.raises(ValueError, match="at least one"):
        repeat_summary([])
