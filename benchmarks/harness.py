"""Shared timing and reporting for the benchmark scripts.

Every comparison is measured side by side in one process and one run: each candidate is
timed in interleaved rounds (A, B, C, A, B, C, ...) so that drift in machine load hits all
of them alike, and the median of the rounds is reported with p20/p80.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from sparsekern.prune.harvest import device_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(
    candidates: dict[str, Callable[[], object]],
    *,
    device: torch.device,
    rounds: int = 15,
    min_round_s: float = 0.05,
    warmup: int = 2,
) -> dict[str, dict[str, float]]:
    """Median / p20 / p80 seconds per call of each candidate, interleaved round by round."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    # Calls per round so each round lasts at least min_round_s for the slowest-to-time candidate.
    reps = {}
    for name, fn in candidates.items():
        t0 = time.perf_counter()
        fn()
        _sync(device)
        one = max(time.perf_counter() - t0, 1e-7)
        reps[name] = max(1, int(min_round_s / one))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / reps[name])
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=10)
        out[name] = {"median_s": statistics.median(s), "p20_s": q[1], "p80_s": q[7], "rounds": len(s)}
    return out


def environment(device: torch.device) -> dict:
    """Device name and versions recorded with every result."""
    import sparsekern

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sparsekern": sparsekern.__version__,
        "backends": sparsekern.backends(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["device"] = device_name(device)
    return info


def copy_bandwidth(nbytes: int, device: torch.device) -> float:
    """Measured device copy bandwidth in GB/s, counting bytes read + bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_side_by_side({"copy": lambda: dst.copy_(src)}, device=device, rounds=9)["copy"]["median_s"]
    return 2 * src.numel() * 4 / t / 1e9


def write_json(name: str, payload: dict, path: str | None = None) -> Path:
    """Write results to `path`, or benchmarks/results/<name>-<device>-<date>.json."""
    if path is None:
        dev = payload.get("environment", {}).get("device", "device")
        slug = "".join(ch if ch.isalnum() else "-" for ch in dev).strip("-").lower()[:40]
        stamp = _dt.datetime.now().strftime("%Y%m%d")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{name}-{slug}-{stamp}.json"
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return Path(path)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
