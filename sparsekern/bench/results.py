"""Writing and printing benchmark results: one JSON file per run (device, versions and date in
its ``environment``), and an aligned plain-text table of its rows."""
from __future__ import annotations

import datetime
import json
from pathlib import Path


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
