"""benchmarks/gpu_check.py: its CPU dry run (what CI runs of the one GPU command), that a broken
kernel is reported as a failed check with a non-zero exit code, and that a spent budget cuts a
section (recorded) instead of failing it."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import sparsekern

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
# Generous budgets: on a loaded CI machine a cut section would hide what this test looks for.
BUDGETS = ["--time-budget", "900", "--budget", "validate=300", "--budget", "bandwidth=200",
           "--budget", "analyze=200", "--budget", "speed=300"]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_json(directory: Path) -> dict:
    files = sorted(directory.glob("gpu_check-dryrun-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.fixture(scope="module")
def gpu_check():
    return load_script()


@pytest.fixture(autouse=True)
def cpu_backends_only(monkeypatch):
    """conftest.py turns the Triton interpreter on in a process without a GPU; the dry run then adds
    triton, interpreted (minutes). These tests are about the script: cpp and torch are enough."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_dry_run_every_section_passes(gpu_check, tmp_path):
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), *BUDGETS])
    payload = read_json(tmp_path)
    assert rc == 0, payload["failed_checks"]
    assert payload["passed"] and payload["dry_run"] and not payload["failed_checks"]
    assert set(payload["sections"]) == set(gpu_check.SECTIONS)
    for key in ("torch", "triton", "cuda", "python"):
        assert key in payload["versions"]
    assert payload["environment"]["device_name"] and payload["date"]
    for name, section in payload["sections"].items():
        assert section["checks_failed"] == 0, (name, [c for c in section["checks"] if not c["passed"]])
        assert not section["cut"], (name, section["skipped"])
    assert payload["sections"]["build"]["notes"] == ["not run: dry run"]

    checks = {c["name"]: c for c in payload["sections"]["validate"]["checks"]}
    assert all(c["passed"] for c in checks.values())
    for backend in ("cpp", "torch"):
        for op in ("channel_absmax", "bn_relu"):
            for dtype in ("fp32", "fp16", "bf16"):
                assert f"{op}[{backend}] 2x16x8x8 {dtype} channels_last" in checks
                assert f"{op}[{backend}] 5x40 {dtype} contiguous" in checks
                assert f"{op}[{backend}] 3x9x13x13 {dtype} contiguous" in checks
        for mode in ("exact", "memmap", "histogram", "none", "two_pass"):
            assert f"ChannelStats.update[{backend}] {mode} 4x12x5x5 bf16 channels_last" in checks
        assert f"bn_relu[{backend}] NaN/-0/subnormal fp16" in checks
        assert f"channel_absmax[{backend}] NaN/-0/subnormal/inf bf16" in checks
    exact = [c for n, c in checks.items() if n.startswith("channel_absmax[")]
    assert all(c["max_err"] == 0.0 for c in exact)  # the max is exact in every precision

    bandwidth = payload["sections"]["bandwidth"]["measurements"]
    assert any(m.get("what") == "copy bandwidth" for m in bandwidth)
    candidates = {m["candidate"] for m in bandwidth if "candidate" in m}
    assert {"channel_absmax[cpp]", "bn_relu[cpp]+max", "eager abs().amax", "copy (yardstick)"} <= candidates
    assert all(m["GBps"] > 0 for m in bandwidth if "candidate" in m)

    analyze = payload["sections"]["analyze"]["measurements"]
    assert {m["precision"] for m in analyze} == {"fp32", "bf16 autocast"}
    assert all(m["per_pass_over_plain"] > 0 and m["passes"] == 2 for m in analyze)

    speed = payload["sections"]["speed"]["measurements"]
    pruning = {m["model"]: m for m in speed if m.get("what") == "pruning"}
    assert set(pruning) == {"basicnet", "resnet18"}
    assert all(0.3 < m["removed_fraction"] <= 0.6 for m in pruning.values())
    rows = [m for m in speed if "speedup" in m]
    assert {(m["model"], m["batch"]) for m in rows} == {(n, b) for n in pruning for b in (1, 2)}
    assert all(m["flop_ratio"] > 1 for m in rows)


def test_a_broken_backend_fails_its_checks_and_the_exit_code(gpu_check, tmp_path, monkeypatch):
    real = sparsekern.channel_absmax

    def broken(x, *, count_positive=False, backend="auto"):
        out = real(x, count_positive=count_positive, backend=backend)
        if backend != "cpp":
            return out
        return (out[0] * 1.5, out[1]) if count_positive else out * 1.5

    monkeypatch.setattr(sparsekern, "channel_absmax", broken)
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "validate", *BUDGETS])
    assert rc != 0
    payload = read_json(tmp_path)
    assert not payload["passed"]
    checks = payload["sections"]["validate"]["checks"]
    failed = {c["name"] for c in checks if not c["passed"]}
    assert failed and all(name.startswith("channel_absmax[cpp]") for name in failed)
    assert "channel_absmax[cpp] 2x16x8x8 fp32 contiguous" in failed
    assert {f["name"] for f in payload["failed_checks"]} == failed
    one = next(c for c in checks if c["name"] == "channel_absmax[cpp] 2x16x8x8 fp32 contiguous")
    assert one["max_err"] is None or one["max_err"] == "inf" or one["max_err"] > 0
    assert one["failures"]
    # the failure stopped nothing: the other backend and op still ran and passed
    passed = {c["name"] for c in checks if c["passed"]}
    assert "channel_absmax[torch] 2x16x8x8 fp32 contiguous" in passed
    assert "bn_relu[cpp] 2x16x8x8 fp32 contiguous" in passed
    assert any(n.startswith("ChannelStats.update[cpp]") for n in passed)


def test_a_spent_budget_cuts_the_section_and_records_it(gpu_check, tmp_path):
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "validate,analyze",
                         "--budget", "validate=0.2", "--budget", "analyze=0"])
    payload = read_json(tmp_path)
    validate, analyze = payload["sections"]["validate"], payload["sections"]["analyze"]
    assert validate["cut"] and validate["skipped"] and validate["checks_failed"] == 0
    assert analyze["cut"] and analyze["skipped"] and not analyze["measurements"]
    assert rc == 0  # cut short is recorded, not a failure
    assert list(payload["sections"]) == ["validate", "analyze"]


def test_sections_option_rejects_unknown_names(gpu_check):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--sections", "validate,nope"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry-run backends are the CPU ones")
def test_dry_run_uses_the_cpu_backends(gpu_check):
    ctx = gpu_check.Context(gpu_check.parse_args(["--dry-run"]))
    assert ctx.device.type == "cpu" and "cpp" in ctx.backends() and "cuda" not in ctx.backends()
