"""``torchrun -m sparsekern analyze``: each rank analyses its shard, every rank gets the one-process
result, rank 0 prints and writes it. The reference is the same command in one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from _helpers import REPO

ARGS = ["analyze", "--model", "torchvision:resnet18", "--model-args", "num_classes=10", "--data", "synthetic:21",
        "--input-size", "32", "--batch-size", "4", "--selectivity", "two-pass", "--no-progress"]


def _run(command, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", SPARSEKERN_DIST_TIMEOUT="60")
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_analyze_equals_one_process(tmp_path):
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "sparsekern", *ARGS, "--json", "two.json"], tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    one = _run([sys.executable, "-m", "sparsekern", *ARGS, "--json", "one.json"], tmp_path)
    assert one.returncode == 0, one.stdout + one.stderr
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("two.json", "one.json"))
    assert (a["ranks"], b["ranks"]) == (2, 1)
    assert a["num_images"] == b["num_images"] == 21  # 21 over 2 ranks: the sampler pads one copy, measured once
    assert a["report"] == b["report"]
    # Printed once (rank 0), the same table as one process.
    assert two.stdout.count("images, 2 pass(es)") == 1 and one.stdout.count("images, 2 pass(es)") == 1
    assert two.stdout == one.stdout.replace(one.stdout.splitlines()[-1], two.stdout.splitlines()[-1])
