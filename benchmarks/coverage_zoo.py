"""Coverage of real model families: planted dead / constant channels measured and removed exactly.

    python benchmarks/coverage_zoo.py                  # every family below; writes the table
    python benchmarks/coverage_zoo.py --only timm:     # a subset (substring match)

For each model (see ``sparsekern.bench.coverage``): BN statistics randomised, ~12% of each
BatchNorm's channels planted with gamma = 0, beta = -1 and ~6% with gamma = 0, beta = +0.3,
``PrunePlan.from_gamma`` + ``prune_model`` in float64, compared with the original on fresh
inputs; the tracker's features and one ``analyze`` pass. Writes
docs/results/coverage/coverage.json and coverage.md (the README's table). Resumable: rows
already in the JSON are kept unless ``--restart``.

The models are ``sparsekern.bench.coverage.ZOO`` (how they were chosen is said there).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparsekern.bench.coverage import ZOO as MODELS, coverage_row, exact  # noqa: E402
from sparsekern.bench.environment import timing_environment  # noqa: E402

OUT = REPO / "docs" / "results" / "coverage"


def _pct(a, b) -> str:
    return f"{100.0 * a / b:.0f}%" if b else "-"


def table(rows: list) -> str:
    """The README's coverage table (markdown)."""
    lines = [
        "| model | BatchNorms | planted | removed | MACs saved | exact | features | kept (reason: channels) |",
        "|---|---:|---:|---:|---:|:---:|---:|---|",
    ]
    for r in rows:
        if r.get("error"):
            status = f"error: {r['error'][:90]}"
        elif not r.get("planted"):
            status = "no BatchNorm: nothing planted" + (f" ({r['norm_layers']} LayerNorm / GroupNorm)" if r.get("norm_layers") else "")
        else:
            status = "; ".join(f"{why}: {n}" for why, n in list(r["kept"].items())[:3]) or "-"
        saved = _pct(r.get("macs_before", 0) - r.get("macs_after", 0), r.get("macs_before", 0))
        ok = "yes" if exact(r) else ("-" if r.get("error") else "NO")
        removed = f"{r.get('removed', 0)} ({_pct(r.get('removed', 0), r.get('planted', 0))})"
        feats = r.get("features", 0) if not r.get("analyze_error") else f"error: {r['analyze_error'][:60]}"
        lines.append(f"| {r['model']} | {r.get('batch_norms', '-')} | {r.get('planted', 0)} | {removed} | "
                     f"{saved} | {ok} | {feats} | {status} |")
    with_norm = [r for r in rows if r.get("planted")]
    good = [r for r in with_norm if exact(r) and r.get("removed", 0) > 0]
    measured = [r for r in rows if r.get("features", 0) > 0 and not r.get("analyze_error")]
    lines.append("")
    lines.append(f"Exact removal with removal > 0: {len(good)} of {len(with_norm)} models with a BatchNorm; "
                 f"features measured (tracker + analyze): {len(measured)} of {len(rows)} models.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="run only models whose spec contains this")
    p.add_argument("--restart", action="store_true", help="recompute every row")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "coverage.json"
    done = {} if args.restart or not path.exists() else {r["model"]: r for r in json.loads(path.read_text())["rows"]}
    rows = []
    for i, (spec, size) in enumerate(MODELS):
        if args.only and args.only not in spec:
            if spec in done:
                rows.append(done[spec])
            continue
        if spec in done and not args.restart and args.only is None:
            rows.append(done[spec])
            continue
        row = coverage_row(spec, size)
        rows.append(row)
        print(f"[{i + 1}/{len(MODELS)}] {spec}: removed {row.get('removed')} of {row.get('planted')}, "
              f"diff {row.get('max_rel_diff')}, features {row.get('features')}, {row['seconds']} s"
              + (f", ERROR {row['error']}" if row.get("error") else "")
              + (f", ANALYZE {row['analyze_error']}" if row.get("analyze_error") else ""), flush=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"environment": timing_environment(torch.device("cpu")), "rows": rows}, indent=1, default=str))
        os.replace(tmp, path)
    (args.out / "coverage.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
