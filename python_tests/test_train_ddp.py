"""Data-parallel training under torchrun (gloo on the CPU, 2 ranks, the tiny synthetic model).

* 2 ranks x 10 samples with sync_bn follow 1 process x 20 (same data order, SGD): weights, losses,
  test error, the tracker's windows (summed over the ranks: 40 samples per eval point) and the
  final analysis; trained in two launches (stopped at step 2, resumed through
  ``torchrun -m sparsekern train --config``), each eval point logged once.
* a rank that fails is reported (torchrun exits non-zero with the rank's error), not a hang.
* a config's ranks must match the launch; the global batch must split evenly.

The failing rank's job runs this file as a script under torchrun.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from sparsekern.train import ConfigError, RunConfig, train
from sparsekern.train.loop import read_metrics, read_result, run_files

from _helpers import REPO

DDP = dict(dataset="synthetic", width=0.125, batch_size=20, num_train_samples=80, num_test_samples=31,
           eval_batch_size=16, analyze_samples=41, threads=1, optimizer="sgd", lr=0.05, steps=4, eval_every=2,
           sync_bn=True)


def torchrun(args, tmp_path, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", SPARSEKERN_DIST_TIMEOUT="60")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path, **changes):
    config = RunConfig(**{**DDP, "out_dir": str(tmp_path / "runs"), **changes})
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    return config, path


def test_two_ranks_with_sync_bn_follow_one_process_and_resume(tmp_path):
    config, path = write_config(tmp_path)
    first = torchrun(["-m", "sparsekern", "train", "--config", str(path), "--stop-after", "2", "--no-progress"],
                     tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    second = torchrun(["-m", "sparsekern", "train", "--config", str(path), "--no-progress"], tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming at step 2" in second.stdout + second.stderr

    ddp_dir = config.replace(ranks=2).run_dir()
    assert "b20r2" in ddp_dir.name
    printed = [json.loads(line) for line in second.stdout.splitlines() if line.startswith("{")]
    assert [p["run_dir"] for p in printed] == [str(ddp_dir)], second.stdout  # rank 0 only, the ranked run
    text = run_files(ddp_dir)["config"].read_text()
    assert "ranks = 2" in text and "sync_bn = true" in text and "2 ranks x 10 samples" in text
    one = train(config, progress=False, log=lambda *a: None)  # one process, batch 20, same order
    two = read_result(ddp_dir)
    assert two["batch"] == {"global": 20, "per_rank": 10, "ranks": 2, "sync_bn": True, "batchnorm": 20}
    assert one["batch"] == {"global": 20, "per_rank": 20, "ranks": 1, "sync_bn": False, "batchnorm": 20}

    m1, m2 = read_metrics(config.run_dir()), read_metrics(ddp_dir)
    assert [m["step"] for m in m2] == [m["step"] for m in m1] == [2, 4]  # each eval point once
    for a, b in zip(m1, m2):
        assert b["window_samples"] == a["window_samples"] == 40
        assert b["tracked_samples"] == a["tracked_samples"] == 40  # both ranks' 20 samples per step window
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
        assert b["test_error"] == a["test_error"]
        assert b["total"]["dead_by_activation"] == a["total"]["dead_by_activation"]
    w1 = torch.load(run_files(config.run_dir())["checkpoint"], weights_only=True)["model"]
    w2 = torch.load(run_files(ddp_dir)["checkpoint"], weights_only=True)["model"]
    assert w1.keys() == w2.keys()
    for key in w1:
        if w1[key].is_floating_point():
            torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)
    assert two["analysis_samples"] == one["analysis_samples"] == 41  # each sample of the corpus once
    assert two["test_samples"] == 31
    assert [l["dead_by_activation"] for l in two["layers"]] == [l["dead_by_activation"] for l in one["layers"]]


def test_a_failing_rank_is_reported_not_a_hang(tmp_path):
    _, path = write_config(tmp_path, sync_bn=False)
    start = time.monotonic()
    done = torchrun([os.path.abspath(__file__), str(path)], tmp_path, timeout=200)
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stdout + done.stderr
    assert time.monotonic() - start < 200


def test_ranks_must_match_the_launch_and_split_the_batch(tmp_path):
    with pytest.raises(ConfigError, match="must split evenly"):
        RunConfig(batch_size=25, ranks=2)
    config = RunConfig(**{**DDP, "out_dir": str(tmp_path), "ranks": 2})
    with pytest.raises(ConfigError, match="nproc_per_node 2"):
        train(config, progress=False)
    assert RunConfig(ranks=1).ranks is None and RunConfig(ranks=1).run_id() == RunConfig().run_id()


def _failing_rank(path: str) -> None:
    """Rank 1 raises at its first eval point, while rank 0 waits in that eval point's collectives."""
    from sparsekern.train import loop

    if os.environ.get("RANK") == "1":
        def fail(self, *args, **kwargs):
            raise RuntimeError("rank 1 fails on purpose")

        loop._Run._eval_point = fail
    train(RunConfig.from_toml(path), progress=False)


if __name__ == "__main__":
    _failing_rank(sys.argv[1])
