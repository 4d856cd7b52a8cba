"""The paper's tables, built from a sweep summary (``sweep_summary.json``), as markdown and CSV.

    table1          optimizer x regulariser x strength: % inactive by activation and by |gamma|
                    (default and loose thresholds), test error; mean +- std over seeds
    table2_*        the same per layer C1..Cn (one table by activation, one by |gamma|)
    table_batch     % inactive and test error per mini-batch size (only if batch sizes vary)
    table_width     the same per width multiplier (only if widths vary)

A cell is text, a number, None ("-") or a {"mean", "std", "n"} record (``mean_std``); markdown
(``markdown_table``) shows a record as ``mean ± std`` (std left out for a single seed), CSV as
two columns.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass

COLUMNS_TOTAL = (
    ("dead_by_activation_pct", "inactive, act. (%)"),
    ("dead_by_gamma_pct", "inactive, |γ| (%)"),
    ("dead_by_activation_loose_pct", "act<1e-4 (%)"),
    ("dead_by_gamma_loose_pct", "|γ|<1e-2 (%)"),
    ("test_error_pct", "test error (%)"),
)
OPTIMIZER_ORDER = ("adam", "adamax", "adagrad", "adadelta", "rmsprop", "momentum", "sgd")
REG_ORDER = ("none", "l2", "wd")


@dataclass
class Table:
    name: str  # file stem
    title: str
    columns: list[str]
    rows: list[list]
    digits: int = 1  # decimals per number in markdown (the paper's tables: one)

    def to_markdown(self) -> str:
        """The table in markdown, ``digits`` decimals per number."""
        return markdown_table(self.columns, self.rows, digits=self.digits)

    def to_csv(self) -> str:
        """One column per text/number cell; a mean +- std cell becomes '<col> mean' and '<col> std'."""
        stats_columns = {i for row in self.rows for i, c in enumerate(row) if isinstance(c, dict)}
        header = []
        for i, column in enumerate(self.columns):
            header += [f"{column} mean", f"{column} std"] if i in stats_columns else [column]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for row in self.rows:
            cells = []
            for i, c in enumerate(row):
                if i in stats_columns:
                    cells += ["", ""] if c is None else [_csv_number(c["mean"]), _csv_number(c["std"])]
                else:
                    cells.append("" if c is None else (_csv_number(c) if isinstance(c, float) else c))
            writer.writerow(cells)
        return out.getvalue()


def mean_std(values) -> dict:
    """The {"mean", "std" (sample std, None for one value), "n", "values"} cell of ``values``."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": values}


def markdown_table(columns: list, rows: list[list], digits: int = 2) -> str:
    """A markdown table of cells (see the module docstring); numbers with ``digits`` decimals."""
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("---" for _ in columns) + "|"]
    out += [line([format_cell(c, digits) for c in row]) for row in rows]
    return "\n".join(out)


def _csv_number(v) -> str:
    return "" if v is None else repr(float(v))


def format_cell(cell, digits: int = 1) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, dict):
        if cell["std"] is None:
            return f"{cell['mean']:.{digits}f}"
        return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"
    if isinstance(cell, float):
        return f"{cell:g}"
    return str(cell)


def _order_key(group: dict):
    c = group["config"]
    rank = lambda seq, v: seq.index(v) if v in seq else len(seq)  # noqa: E731
    return (rank(OPTIMIZER_ORDER, c["optimizer"]), c["optimizer"], rank(REG_ORDER, c["reg"]), c["reg"],
            c["reg_strength"], json.dumps(c, sort_keys=True))


def sorted_groups(summary: dict) -> list[dict]:
    """Groups ordered as in the paper's tables: adaptive optimizers first, then none / L2 / WD, by strength."""
    return sorted(summary["groups"], key=_order_key)


def _setting_columns(summary: dict, exclude=()) -> list[str]:
    """The config fields that identify a row: optimizer, reg, strength, plus whatever else varies."""
    fields = ["optimizer", "reg", "reg_strength"]
    return fields + [f for f in summary["varying"] if f not in fields and f not in exclude]


_HEADINGS = {"optimizer": "optimizer", "reg": "reg", "reg_strength": "λ", "batch_size": "batch", "width": "width"}


def _setting_cells(config: dict, fields: list[str]) -> list:
    cells = []
    for f in fields:
        value = config[f]
        cells.append("-" if f == "reg_strength" and config["reg"] == "none" else value)
    return cells


def table1(summary: dict) -> Table:
    """Table 1: % inactive filters (by activation, by |gamma|) and test error per setting."""
    fields = _setting_columns(summary)
    columns = ["setting"] + [_HEADINGS.get(f, f) for f in fields] + ["seeds"] + [title for _, title in COLUMNS_TOTAL]
    rows = []
    for g in sorted_groups(summary):
        rows.append([g["label"], *_setting_cells(g["config"], fields), len(g["seeds"]),
                     *(g["metrics"][key] for key, _ in COLUMNS_TOTAL)])
    return Table("table1", "Table 1: inactive filters and test error (mean ± std over seeds)", columns, rows)


def table2(summary: dict, metric: str) -> Table:
    """Table 2: per-layer % inactive, ``metric`` = 'dead_by_activation' or 'dead_by_gamma'."""
    groups = sorted_groups(summary)
    labels = []
    for g in groups:
        for layer in g["layers"]:
            if layer["label"] not in labels:
                labels.append(layer["label"])
    rows = []
    for g in groups:
        by_label = {layer["label"]: layer[f"{metric}_pct"] for layer in g["layers"]}
        rows.append([g["label"], *(by_label.get(label) for label in labels)])
    what = "by activation (max act. < 1e-12)" if metric == "dead_by_activation" else "by |γ| < 1e-3"
    suffix = "activation" if metric == "dead_by_activation" else "gamma"
    return Table(f"table2_{suffix}", f"Table 2: % inactive filters per layer, {what}", ["setting", *labels], rows)


def sweep_table(summary: dict, field: str) -> Table | None:
    """Tables 3-6: one row per other setting, % inactive and test error per value of ``field``."""
    if field not in summary["varying"]:
        return None
    values = sorted({g["config"][field] for g in summary["groups"]})
    fields = _setting_columns(summary, exclude=(field,))
    rows: dict[str, list] = {}
    for g in sorted_groups(summary):
        key = json.dumps({k: v for k, v in g["config"].items() if k != field}, sort_keys=True)
        row = rows.setdefault(key, [*_setting_cells(g["config"], fields), *([None] * (3 * len(values)))])
        at = len(fields) + 3 * values.index(g["config"][field])
        m = g["metrics"]
        row[at:at + 3] = [m["dead_by_activation_pct"], m["dead_by_gamma_pct"], m["test_error_pct"]]
    name = _HEADINGS.get(field, field)
    columns = [_HEADINGS.get(f, f) for f in fields]
    for v in values:
        columns += [f"act. % ({name} {v:g})", f"|γ| % ({name} {v:g})", f"err % ({name} {v:g})"]
    title = {"batch_size": "Tables 3-5: effect of the mini-batch size",
             "width": "Table 6: effect of the network width"}.get(field, f"effect of {field}")
    return Table(f"table_{'batch' if field == 'batch_size' else field}", title, columns, list(rows.values()))


def all_tables(summary: dict) -> list[Table]:
    tables = [table1(summary), table2(summary, "dead_by_activation"), table2(summary, "dead_by_gamma")]
    tables += [t for t in (sweep_table(summary, "batch_size"), sweep_table(summary, "width")) if t is not None]
    return tables
