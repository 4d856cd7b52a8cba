"""SPARSEKERN_FLUSH_DENORMAL=1: subnormals flushed on every torch CPU thread, set at import."""
import os
import subprocess
import sys

import pytest

PROBE = """
import torch
torch.set_num_threads(2)
import sparsekern
from sparsekern._denormals import flush_denormal_enabled
x = torch.full((1 << 20,), 1e-40)      # subnormal in float32; big enough to run on the worker threads
y = x * 1.0
print(flush_denormal_enabled(), float((y == 0).float().mean()))
"""


def probe(value):
    env = {k: v for k, v in os.environ.items() if k != "SPARSEKERN_FLUSH_DENORMAL"}
    if value is not None:
        env["SPARSEKERN_FLUSH_DENORMAL"] = value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)


def test_off_by_default_subnormals_survive():
    out = probe(None)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "0.0"]


def test_on_flushes_on_all_threads():
    out = probe("1")
    assert out.returncode == 0, out.stderr
    enabled, zero_fraction = out.stdout.split()
    if enabled == "False":
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    assert float(zero_fraction) == 1.0  # every element, whichever thread computed it


def test_a_bad_value_is_a_clear_error():
    out = probe("maybe")
    assert out.returncode != 0
    assert "SPARSEKERN_FLUSH_DENORMAL='maybe'" in out.stderr


def test_worker_processes_get_flushing_unless_the_user_chose(monkeypatch):
    from sparsekern._denormals import ENV_VAR, on_for_worker_processes

    monkeypatch.delenv(ENV_VAR, raising=False)
    with on_for_worker_processes() as value:
        assert value == "1" and os.environ[ENV_VAR] == "1"
    assert ENV_VAR not in os.environ
    monkeypatch.setenv(ENV_VAR, "0")
    with on_for_worker_processes() as value:
        assert value == "0" and os.environ[ENV_VAR] == "0"
    assert os.environ[ENV_VAR] == "0"
