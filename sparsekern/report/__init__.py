"""Reports: the paper's tables (markdown + CSV, ``tables.py``) and figures (PNG, ``figures.py``),
and the report.md that shows them, from data already read (a sweep summary, results, metrics).

Reading a sweep's or a run's directory is the training layer's: ``sparsekern.train.report``'s
``write_report("sweeps/table1")`` reads it and calls ``write_markdown_report`` here.
"""
from __future__ import annotations

import re
from pathlib import Path

from sparsekern._deprecated import deprecated_paths
from sparsekern.report.figures import figure_gamma_beta, figure_gamma_decay, figure_selectivity
from sparsekern.report.tables import Table, all_tables

MAX_FIGURE2_SETTINGS = 6  # one Figure 2 PNG per setting; beyond this the report gets unreadable


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def write_markdown_report(out: Path, source, summary: dict, results: dict[str, dict],
                          metrics: dict[str, list[dict]]) -> Path:
    """Write the tables (``<name>.md``, ``<name>.csv``), the figures (PNG) and ``report.md`` of a
    sweep summary into ``out``; returns report.md's path.

    ``results`` / ``metrics``: per setting label, the result.json and the metrics.jsonl lines of
    the run that stands for it in the figures; ``source`` is named in the text.
    """
    out.mkdir(parents=True, exist_ok=True)
    tables = all_tables(summary)
    for table in tables:
        (out / f"{table.name}.md").write_text(f"### {table.title}\n\n{table.to_markdown()}\n")
        (out / f"{table.name}.csv").write_text(table.to_csv())

    figures = []
    for label, result in list(results.items())[:MAX_FIGURE2_SETTINGS]:
        if any(l.get("gamma") is not None for l in result["layers"]):
            path = figure_gamma_beta(result, out / f"fig2_gamma_beta_{_slug(label)}.png", label)
            figures.append((f"Figure 2: BN γ vs β, {label}", path))
    if any(l.get("selectivity") for r in results.values() for l in r["layers"]):
        figures.append(("Figure 3: selectivity of live features per layer",
                        figure_selectivity(results, out / "fig3_selectivity.png")))
    if any(any(m["total"]["mean_abs_gamma"] is not None for m in lines) for lines in metrics.values()):
        figures.append(("Figure 4: decay of |γ| during training",
                        figure_gamma_decay(metrics, out / "fig4_gamma_decay.png",
                                           next(iter(results.values()))["thresholds"]["gamma"])))

    report = out / "report.md"
    report.write_text(_markdown(source, summary, results, tables, figures, out))
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


# Moved up to the training layer, which owns the run and sweep files they read.
__getattr__ = deprecated_paths(__name__, {"load_source": "sparsekern.train.report.load_source",
                                          "write_report": "sparsekern.train.report.write_report"})

__all__ = ["write_markdown_report"]
