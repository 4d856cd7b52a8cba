"""Reports of runs and sweeps: the paper's tables (markdown + CSV) and figures (PNG), in report.md.

    from sparsekern.report import write_report
    write_report("sweeps/table1")      # a sweep directory (sweep_summary.json) or one run's directory

Figures use one run per setting (the lowest seed); tables average over every seed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from sparsekern.report.figures import figure_gamma_beta, figure_gamma_decay, figure_selectivity
from sparsekern.report.tables import Table, all_tables, sorted_groups

MAX_FIGURE2_SETTINGS = 6  # one Figure 2 PNG per setting; beyond this the report gets unreadable


def load_source(source) -> tuple[dict, dict[str, Path]]:
    """(summary, run_id -> run directory) of a sweep directory or a single run's directory."""
    from sparsekern.train.loop import read_result
    from sparsekern.train.sweep import SUMMARY_FILE, summarize

    source = Path(source)
    if (source / SUMMARY_FILE).is_file():
        summary = json.loads((source / SUMMARY_FILE).read_text())
        run_dirs = {r["run_id"]: source / r["run_dir"] for r in summary["runs"] if r["status"] in ("done", "skipped")}
        return summary, run_dirs
    result = read_result(source)
    if result is not None:
        return summarize([result]), {result["run_id"]: source}
    raise FileNotFoundError(
        f"{source}: neither {SUMMARY_FILE} (a sweep) nor result.json (a finished run) is there; "
        "run `sparsekern sweep` or `sparsekern train` first (or point at their output directory)"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def write_report(source, out_dir=None, log=print) -> Path:
    """Write tables (``<name>.md``, ``<name>.csv``), figures (PNG) and ``report.md``; returns report.md's path."""
    from sparsekern.train.loop import read_metrics, read_result

    summary, run_dirs = load_source(source)
    out = Path(out_dir) if out_dir is not None else Path(source)
    out.mkdir(parents=True, exist_ok=True)
    groups = sorted_groups(summary)
    if not groups:
        raise ValueError(f"{source}: no finished run to report on")

    tables = all_tables(summary)
    for table in tables:
        (out / f"{table.name}.md").write_text(f"### {table.title}\n\n{table.to_markdown()}\n")
        (out / f"{table.name}.csv").write_text(table.to_csv())

    # One representative run per setting for the figures: the one with the lowest seed.
    representative = {}
    for g in groups:
        seed, run_id = min(zip(g["seeds"], g["runs"]))
        representative[g["label"]] = run_dirs[run_id]
    results = {label: read_result(d) for label, d in representative.items()}
    figures = []
    for label, result in list(results.items())[:MAX_FIGURE2_SETTINGS]:
        if any(l.get("gamma") is not None for l in result["layers"]):
            path = figure_gamma_beta(result, out / f"fig2_gamma_beta_{_slug(label)}.png", label)
            figures.append((f"Figure 2: BN γ vs β, {label}", path))
    if any(l.get("selectivity") for r in results.values() for l in r["layers"]):
        figures.append(("Figure 3: selectivity of live features per layer",
                        figure_selectivity(results, out / "fig3_selectivity.png")))
    metrics = {label: read_metrics(d) for label, d in representative.items()}
    if any(any(m["total"]["mean_abs_gamma"] is not None for m in lines) for lines in metrics.values()):
        figures.append(("Figure 4: decay of |γ| during training",
                        figure_gamma_decay(metrics, out / "fig4_gamma_decay.png",
                                           next(iter(results.values()))["thresholds"]["gamma"])))

    report = out / "report.md"
    report.write_text(_markdown(source, summary, results, tables, figures, out))
    log(f"report: {report}")
    return report


def _markdown(source, summary: dict, results: dict, tables: list[Table], figures, out: Path) -> str:
    first = next(iter(results.values()))
    t = first["thresholds"]
    config = first["config"]
    lines = [
        "# Implicit filter-level sparsity report",
        "",
        f"Source: `{source}`. {len(summary['groups'])} setting(s), "
        f"{sum(len(g['runs']) for g in summary['groups'])} run(s); varying: {', '.join(summary['varying']) or 'nothing'}.",
        f"Model `{config['model']}` on `{config['dataset']}`, {first['steps']} steps ({first['epochs']:.2f} epochs) "
        f"per run" + "".join(f", {key.replace('_', ' ')} {config[key]}" for key in ("width", "batch_size", "lr")
                             if key not in summary["varying"]) + ".",
        "",
        "A feature (filter) is **inactive by activation** when its post-BN+ReLU output, max-pooled over "
        f"positions, stays below {t['activation']:g} for every training sample ({first['analysis_samples']} "
        f"samples, BN in eval mode), and **inactive by scale** when its BN |γ| < {t['gamma']:g}. "
        f"Loose thresholds: {t['activation_loose']:g} and {t['gamma_loose']:g}. Mean ± sample std over seeds.",
        "",
    ]
    if summary.get("failed"):
        lines += [f"**Failed runs (not in the tables):** {', '.join(summary['failed'])}", ""]
    for table in tables:
        lines += [f"## {table.title}", "", table.to_markdown(), "", f"CSV: [{table.name}.csv]({table.name}.csv)", ""]
    if figures:
        lines += ["## Figures", ""]
        for caption, path in figures:
            rel = Path(path).relative_to(out)
            lines += [f"### {caption}", "", f"![{caption}]({rel.as_posix()})", ""]
    return "\n".join(lines)


__all__ = ["load_source", "write_report"]
