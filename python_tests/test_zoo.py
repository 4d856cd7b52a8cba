"""The model zoo: torchvision's CNN families and a broad set of timm families, planted with dead and
constant channels, measured and pruned (``sparsekern.bench.coverage``; its ZOO says how the models
were chosen).

Per model: no crash (a refused model raises a SparsekernError with a message, which the row
records); the caller's model is never changed; whenever anything was removed, the pruned model
equals the original on fresh float64 inputs (the reference is the original model itself). Over
the zoo: exact removal with removal > 0 in at least 90% of the models that have a BatchNorm (where
channels are planted: LayerNorm-only models such as ConvNeXt have none), and
features measured by the tracker and ``analyze`` in at least 90% of all models.

Float64 and relative differences make these checks independent of the CPU's rounding, so the
zoo runs once in CI (marker ``zoo``), not again under the second rounding setting.
"""
from __future__ import annotations

import math

import pytest
import torch

from sparsekern.bench.coverage import ZOO, coverage_row, exact
from sparsekern.errors import SparsekernError

pytestmark = pytest.mark.zoo

TOLERANCE = 1e-9  # relative to max(1, max |output|), in float64
_ROWS: dict = {}


def _available(spec: str) -> bool:
    if spec.startswith("timm:"):
        try:
            import timm  # noqa: F401
        except ImportError:
            return False
    return True


def _row(spec: str, size: int) -> dict:
    if spec not in _ROWS:
        torch.manual_seed(0)
        _ROWS[spec] = coverage_row(spec, size)
    return _ROWS[spec]


def _refused_cleanly(row: dict) -> bool:
    """An error is acceptable only as one of ours (a message naming the problem), never a crash."""
    return row["error"].split(":")[0] in {cls.__name__ for cls in _sparsekern_errors()}


def _sparsekern_errors():
    stack, seen = [SparsekernError], []
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen


@pytest.mark.parametrize("spec,size", ZOO, ids=[s for s, _ in ZOO])
def test_model_is_pruned_exactly_or_refused_clearly(spec, size):
    if not _available(spec):
        pytest.skip("timm is not installed (pip install sparsekern[timm])")
    row = _row(spec, size)
    if row["error"] is not None:
        assert _refused_cleanly(row), f"{spec}: crashed instead of a clear refusal:\n{row.get('traceback')}"
        return
    assert row["caller_unchanged"], f"{spec}: prune_model changed the caller's model"
    if row["removed"] > 0:
        assert row["max_rel_diff"] <= TOLERANCE, (
            f"{spec}: pruned output differs from the original by {row['max_rel_diff']:.3g} (relative) on fresh inputs")
        assert row["macs_after"] < row["macs_before"]
    assert row["removed"] <= row["planted"], f"{spec}: removed more channels than were planted"
    # Never a silent empty plan: a model with planted channels either removes some or says why.
    if row["planted"] and row["removed"] == 0:
        assert row["kept"] or row["notes"], f"{spec}: nothing removed and nothing said why"


def test_zoo_coverage():
    specs = [(s, n) for s, n in ZOO if _available(s)]
    if len(specs) < len(ZOO) // 2:
        pytest.skip("timm is not installed: the zoo's coverage figures need it")
    rows = [_row(s, n) for s, n in specs]
    # Channels are planted in BatchNorms (gamma = 0): the models with one are those with planted channels.
    with_norm = [r for r in rows if r.get("planted")]
    good = [r["model"] for r in with_norm if exact(r, TOLERANCE) and r["removed"] > 0]
    bad = [f"{r['model']} ({r['error'] or ('removed 0' if not r.get('removed') else 'diff %.3g' % r['max_rel_diff'])})"
           for r in with_norm if r["model"] not in good]
    assert len(good) >= math.ceil(0.9 * len(with_norm)), (
        f"exact removal in {len(good)} of {len(with_norm)} models with a BatchNorm; not: {bad}")
    measured = [r["model"] for r in rows if r.get("features", 0) > 0 and r.get("analyze_error") is None]
    missing = [f"{r['model']} ({r.get('analyze_error')})" for r in rows if r["model"] not in measured]
    assert len(measured) >= math.ceil(0.9 * len(rows)), (
        f"features measured in {len(measured)} of {len(rows)} models; not: {missing}")
