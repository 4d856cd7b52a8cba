"""Writing and printing benchmark results: one JSON file per run (device, versions and date in
its ``environment``), and an aligned plain-text table of its rows."""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch


def write_json(name: str, payload: dict, path=None, *, directory=None) -> Path:
    """Write ``payload`` to ``path``, or to ``<directory>/<name>-<device>-<date>.json`` (the device
    from ``payload["environment"]["device_name"]``); returns the path written."""
    if path is None:
        if directory is None:
            raise ValueError("write_json needs a path or a directory")
        device = payload.get("environment", {}).get("device_name", "device")
        slug = "".join(ch if ch.isalnum() else "-" for ch in device).strip("-").lower()[:40]
        stamp = datetime.datetime.now().strftime("%Y%m%d")
        Path(directory).mkdir(parents=True, exist_ok=True)
        path = Path(directory) / f"{name}-{slug}-{stamp}.json"
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return Path(path)


def add_activation_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every memory-bound kernel benchmark shares: activation size, device, layouts, whether to
    time torch.compile, where the JSON goes. ``activation_mib(args)`` resolves the size."""
    parser.add_argument("--mib", type=int, default=None, help="activation size in MiB (default 64 on CPU, 256 on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layouts", default="contiguous,channels_last")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/...)")


def activation_mib(args: argparse.Namespace) -> int:
    """--mib, or its device default: 256 MiB on a GPU (well past its caches), 64 MiB on a CPU."""
    return args.mib or (256 if args.device == "cuda" else 64)


def write_results(benchmark: str, config: dict, environment: dict, rows: list, path=None, *, directory,
                  name: str | None = None) -> Path:
    """``write_json`` of the usual payload: which benchmark, its configuration, where it ran, its rows."""
    payload = {"benchmark": benchmark, "config": config, "environment": environment, "results": rows}
    return write_json(name or benchmark, payload, path, directory=directory)


def milliseconds(timing: dict) -> dict:
    """An ``interleaved_timer`` entry's median and deciles as the ``*_ms`` columns of a results row."""
    return {"median_ms": timing["median_s"] * 1e3, "p20_ms": timing["p20_s"] * 1e3, "p80_ms": timing["p80_s"] * 1e3}


def print_table(rows: list[dict], columns: list[str]) -> None:
    """``rows`` as left-aligned columns, a header line first (floats to 3 significant digits)."""
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_cell(r.get(c)).ljust(widths[c]) for c in columns))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)
