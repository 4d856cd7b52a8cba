"""Backend discovery and dispatch: what `import sparsekern` does with and without sparsekern._C."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsekern
from sparsekern import _backend


def _run(code: str, env_extra=None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_import_without_extension_falls_back_with_one_warning():
    # sys.modules[name] = None makes `from sparsekern import _C` raise ImportError, as a failed build would.
    proc = _run("""
        import sys, warnings, json
        sys.modules["sparsekern._C"] = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, sparsekern
            x = torch.randn(3, 5, 4, 4)
            a = sparsekern.channel_absmax(x)
            b = sparsekern.channel_absmax(x)
            info = sparsekern.backends()
        ours = [str(w.message) for w in caught if "sparsekern._C" in str(w.message)]
        try:
            sparsekern.channel_absmax(x, backend="cpp")
            explicit = "no error"
        except sparsekern.BackendUnavailableError as e:
            explicit = str(e)
        print(json.dumps({"warnings": ours, "ok": bool(torch.equal(a, x.abs().amax((2, 3)))),
                          "available": info["available"]["cpu"], "extension": info["extension"],
                          "explicit": explicit}))
    """)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "Falling back to the pure-torch reference" in out["warnings"][0]
    assert out["ok"]
    assert "cpp" not in out["available"] and "torch" in out["available"] and out["extension"] is None
    assert "backend 'cpp' is unavailable" in out["explicit"] and "could not be loaded" in out["explicit"]


def test_import_touches_no_cuda_driver():
    # Nothing at import time may initialise CUDA (DESIGN.md): a GPU-less machine must import cleanly.
    proc = _run("""
        import torch, sparsekern, sparsekern.stats.channel_stats, sparsekern.ops.bn_relu
        print(torch.cuda.is_initialized())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_backends_reports_build_and_availability():
    info = sparsekern.backends()
    assert info["torch"] == torch.__version__
    assert "torch" in info["available"]["cpu"]
    if _backend.extension() is not None:
        assert "cpp" in info["available"]["cpu"]
        build = info["extension"]
        assert {"compiler", "pybind11", "openmp", "cpu_simd", "cuda"} <= set(build)


def test_env_default_backend_is_used_for_auto(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_BACKEND", "torch")
    assert _backend.resolve("auto", torch.device("cpu"), op="t") == "torch"
    monkeypatch.setenv("SPARSEKERN_BACKEND", "cuda")
    with pytest.raises(sparsekern.BackendUnavailableError, match="cuda"):
        _backend.resolve("auto", torch.device("cpu"), op="t")


def test_auto_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    expected = "cpp" if _backend.extension() is not None else "torch"
    assert _backend.resolve("auto", torch.device("cpu"), op="t") == expected
