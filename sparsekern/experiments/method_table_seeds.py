"""The method table over several seeds: mean ± sample std of the ``method_table.json`` of runs
that differ only in the seed (``sparsekern compare-methods --aggregate``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from sparsekern.errors import ConfigError
from sparsekern.experiments.method_table_output import OUTPUT_STEM
from sparsekern.report.tables import markdown_table, mean_std

# Config fields that may differ between the tables combined: where things ran, not what was run.
_NOT_COMPARED = ("seed", "out_dir", "reuse_runs", "workers", "threads", "device")
SEEDS_STEM = "method_table_seeds"


def aggregate_tables(directories) -> dict:
    """Mean and sample std over the ``method_table.json`` of several runs of this experiment that
    differ only in the seed (one directory each): per method, filters removed, dense and pruned
    accuracy, MFLOPs and speedup, with every seed's value kept. Tables made with other settings
    (anything but the seed and where it ran) are refused, naming the field."""
    tables = []
    for directory in directories:
        path = Path(directory) / f"{OUTPUT_STEM}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {OUTPUT_STEM}.json (not a `sparsekern compare-methods` output)")
        tables.append((str(directory), json.loads(path.read_text())))
    if len(tables) < 2:
        raise ConfigError(f"aggregate needs at least two tables (one per seed), got {len(tables)}")
    first_dir, first = tables[0]
    seeds = [t["config"]["seed"] for _, t in tables]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"the tables' seeds {seeds} repeat: each table must be another seed")
    for directory, table in tables[1:]:
        for key, value in first["config"].items():
            if key not in _NOT_COMPARED and table["config"].get(key) != value:
                raise ConfigError(f"{directory}: {key}={table['config'].get(key)!r} differs from {first_dir}'s "
                                  f"{value!r}; only the seed may differ")
        if [r["method"] for r in table["rows"]] != [r["method"] for r in first["rows"]]:
            raise ConfigError(f"{directory}: its methods differ from {first_dir}'s")
    rows = []
    for i, row in enumerate(first["rows"]):
        per_seed = [t["rows"][i] for _, t in tables]
        values = {
            "filters_removed_pct": [r["filters_removed_pct"] for r in per_seed],
            "dense_accuracy_pct": [r["dense_accuracy_pct"] for r in per_seed],
            "pruned_accuracy_pct": [r["pruned_accuracy_pct"] for r in per_seed],
            "mflops": [r["flops"] / 1e6 for r in per_seed],
            "speedup": [r["speedup"] for r in per_seed],
        }
        rows.append({"method": row["method"], "label": row["label"], "trained_with": row["trained_with"],
                     "selected_fraction": [r["selected_fraction"] for r in per_seed],
                     **{key: mean_std(v) for key, v in values.items()},
                     "per_seed": values})
    return {"seeds": seeds, "directories": [d for d, _ in tables], "config": first["config"],
            "flops_dense": first["rows"][0]["flops_dense"], "rows": rows}


def aggregate_markdown(result: dict, where=None) -> str:
    """:func:`aggregate_tables` as a markdown table, mean ± sample std over the seeds; links to
    the per-seed tables are relative to ``where`` (the directory the table goes to), if given."""
    def link(directory):
        target = Path(directory) / f"{OUTPUT_STEM}.md"
        return os.path.relpath(target, where) if where is not None else str(target)

    columns = ["method", "trained with", "filters removed (%)", "per seed", "dense acc. (%)", "pruned acc. (%)",
               "MFLOPs", "speedup"]
    lines = [[r["label"], r["trained_with"], r["filters_removed_pct"],
              ", ".join(f"{v:.1f}" for v in r["per_seed"]["filters_removed_pct"]), r["dense_accuracy_pct"],
              r["pruned_accuracy_pct"], r["mflops"], r["speedup"]] for r in result["rows"]]
    config = result["config"]
    return "\n".join([
        f"# Filter pruning methods compared: BasicNet, mean ± std over seeds {', '.join(map(str, result['seeds']))}",
        "",
        f"BasicNet width {config['width']:g} on `{config['dataset']}`, dense {result['flops_dense'] / 1e6:.2f} "
        f"MFLOPs; one `sparsekern compare-methods` table per seed (same settings otherwise): "
        + ", ".join(f"[seed {s}]({link(d)})" for s, d in zip(result["seeds"], result["directories"]))
        + ". Each seed trains every network anew and selects its own fraction; speedups are from each "
        "table's own timing.",
        "",
        markdown_table(columns, lines),
        "",
    ])
