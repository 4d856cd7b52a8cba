"""``sparsekern sweep --launcher submitit``: the same grid through submitit's local executor gives
the same run directories and summary as the local pool, a failed job is reported with its error
and log, and rerunning the sweep resubmits only what has no result."""
from __future__ import annotations

import json

import pytest

from sparsekern.errors import ConfigError
from sparsekern.train.sweep import run_sweep

submitit = pytest.importorskip("submitit")

TINY_BASE = dict(dataset="synthetic", width=0.125, batch_size=8, num_train_samples=32, num_test_samples=16,
                 eval_batch_size=32, steps=4, eval_every=2, threads=1, reg="l2", reg_strength=1e-3)


def _run(sweep_dir, grid, messages, **kw):
    return run_sweep(sweep_dir, TINY_BASE, grid, progress=False, log=messages.append, launcher="submitit",
                     cluster="local", **kw)


@pytest.mark.slow
def test_submitit_sweep_equals_the_local_pool_and_resumes(tmp_path):
    grid = {"optimizer": ["adam", "sgd"]}
    messages = []
    summary = _run(tmp_path / "submitit", grid, messages)
    assert summary["failed"] == [], messages
    assert [r["status"] for r in summary["runs"]] == ["done", "done"]
    assert any("submitted 2 jobs to submitit's local executor" in m for m in messages)
    assert list((tmp_path / "submitit" / "submitit").iterdir()), "no submitit job folders"

    local = run_sweep(tmp_path / "local", TINY_BASE, grid, workers=1, progress=False, log=lambda m: None)
    assert [r["run_dir"] for r in summary["runs"]] == [r["run_dir"] for r in local["runs"]]
    for a, b in zip(summary["runs"], local["runs"]):
        ra = json.loads((tmp_path / "submitit" / a["run_dir"] / "result.json").read_text())
        rb = json.loads((tmp_path / "local" / b["run_dir"] / "result.json").read_text())
        assert ra["config_hash"] == rb["config_hash"]
        # The same training in another process: the same numbers (one thread each, same seed).
        assert ra["test_error"] == rb["test_error"] and ra["total"] == rb["total"]
    assert summary["groups"] == local["groups"]

    messages.clear()
    again = _run(tmp_path / "submitit", grid, messages)
    assert [r["status"] for r in again["runs"]] == ["skipped", "skipped"]
    assert "2 already complete, 0 to run" in messages[0]
    assert not any("submitted" in m for m in messages)


@pytest.mark.slow
def test_a_failed_job_is_reported_with_its_log_and_rerun(tmp_path):
    grid = {"optimizer": ["adam"], "seed": [0, 1]}
    messages = []
    summary = _run(tmp_path, grid, messages)
    assert summary["failed"] == []
    # Seed 1's run loses its result and gets a corrupt checkpoint with no fallback: its job must fail.
    broken = tmp_path / summary["runs"][1]["run_dir"]
    (broken / "result.json").unlink()
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (broken / "checkpoint.prev.pt").unlink(missing_ok=True)
    messages.clear()
    summary = _run(tmp_path, grid, messages)
    assert [r["status"] for r in summary["runs"]] == ["skipped", "failed"]
    assert summary["failed"] == [summary["runs"][1]["run_id"]]
    error = summary["runs"][1]["error"]
    assert error.startswith("job ") and "checkpoint" in error.lower(), error
    assert any("failed" in m and "log:" in m and "submitit" in m for m in messages), messages
    # The user deletes the corrupt checkpoint and reruns: only the failed run is submitted, and trains.
    (broken / "checkpoint.pt").unlink()
    messages.clear()
    summary = _run(tmp_path, grid, messages)
    assert [r["status"] for r in summary["runs"]] == ["skipped", "done"]
    assert any("submitted 1 jobs" in m for m in messages)


def test_bad_launcher_options_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown launcher 'pbs'"):
        run_sweep(tmp_path, TINY_BASE, {"seed": [0]}, progress=False, log=lambda m: None, launcher="pbs")
    with pytest.raises(ConfigError, match="unknown slurm option 'partiton'"):
        _run(tmp_path, {"seed": [0]}, [], slurm={"partiton": "gpu"})
    with pytest.raises(ConfigError, match="cluster must be one of"):
        run_sweep(tmp_path, TINY_BASE, {"seed": [0]}, progress=False, log=lambda m: None, launcher="submitit",
                  cluster="pbs")


@pytest.mark.slow
def test_cli_sweep_with_the_submitit_launcher(tmp_path, capsys):
    from sparsekern.cli import main

    flags = ["--dataset", "synthetic", "--width", "0.125", "--batch-size", "8", "--num-train-samples", "32",
             "--num-test-samples", "16", "--eval-batch-size", "32", "--steps", "4", "--eval-every", "2",
             "--threads", "1", "--reg", "l2", "--reg-strength", "1e-3"]
    code = main(["sweep", "--out", str(tmp_path), "--launcher", "submitit", "--cluster", "local", "--seeds", "0,1",
                 "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "submitted 2 jobs to submitit's local executor" in err
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["done", "done"] and summary["groups"][0]["seeds"] == [0, 1]
