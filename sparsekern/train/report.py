"""The report of a sweep or run directory: read its summary and the results and metrics of its
runs (files this package writes), then let ``sparsekern.report`` write report.md, the tables
and the figures.

    from sparsekern.train.report import write_report
    write_report("sweeps/table1")      # a sweep directory (sweep_summary.json) or one run's directory

Figures use one run per setting (the lowest seed); tables average over every seed.
"""
from __future__ import annotations

import json
from pathlib import Path

from sparsekern.errors import ConfigError
from sparsekern.report import write_markdown_report
from sparsekern.report.tables import sorted_groups
from sparsekern.train.loop import read_metrics, read_result
from sparsekern.train.sweep import SUMMARY_FILE, summarize


def load_source(source) -> tuple[dict, dict[str, Path]]:
    """(summary, run_id -> run directory) of a sweep directory or a single run's directory."""
    source = Path(source)
    if (source / SUMMARY_FILE).is_file():
        return _read_summary(source / SUMMARY_FILE)
    result = read_result(source)
    if result is not None:
        return summarize([result]), {result["run_id"]: source}
    raise FileNotFoundError(
        f"{source}: neither {SUMMARY_FILE} (a sweep) nor result.json (a finished run) is there; "
        "run `sparsekern sweep` or `sparsekern train` first (or point at their output directory)"
    )


def _read_summary(path: Path) -> tuple[dict, dict[str, Path]]:
    """A sweep summary and its finished runs' directories; a file that is not one is a ConfigError naming it."""
    try:
        summary = json.loads(path.read_text())
        runs = summary["runs"]
        run_dirs = {r["run_id"]: path.parent / r["run_dir"] for r in runs if r["status"] in ("done", "skipped")}
        summary["groups"]  # what the tables are made of
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a sweep summary written by `sparsekern sweep` ({type(exc).__name__}: "
                          f"{exc}); rerun the sweep to rewrite it") from None
    return summary, run_dirs


def representative_runs(summary: dict, run_dirs: dict[str, Path]) -> dict[str, Path]:
    """Setting label -> the directory of its run with the lowest seed (the one its figures show)."""
    representative = {}
    for group in sorted_groups(summary):
        _, run_id = min(zip(group["seeds"], group["runs"]))
        representative[group["label"]] = run_dirs[run_id]
    return representative


def write_report(source, out_dir=None, log=print) -> Path:
    """Write tables (``<name>.md``, ``<name>.csv``), figures (PNG) and ``report.md`` of ``source``
    into ``out_dir`` (default: ``source``); returns report.md's path."""
    summary, run_dirs = load_source(source)
    out = Path(out_dir) if out_dir is not None else Path(source)
    out.mkdir(parents=True, exist_ok=True)
    if not summary["groups"]:
        raise ValueError(f"{source}: no finished run to report on")
    representative = representative_runs(summary, run_dirs)
    results = {label: read_result(d) for label, d in representative.items()}
    metrics = {label: read_metrics(d) for label, d in representative.items()}
    report = write_markdown_report(out, source, summary, results, metrics)
    log(f"report: {report}")
    return report


__all__ = ["load_source", "representative_runs", "write_report"]
