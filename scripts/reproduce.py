"""Reproduce the paper's comparisons on Fashion-MNIST (3 seeds), as one resumable sweep.

    python scripts/reproduce.py [--out docs/results/reproduction] [--workers 2] [--seeds 0,1,2]

Rows (BasicNet width 0.25 unless stated, 2 epochs, so batch 20 = 6000 steps):
  Table 1:  Adam {none, L2, WD} and momentum SGD + L2, lambda = 2e-3, batch 20
  batch:    Adam + L2 at batch 80 (1500 steps: same epochs, as in the paper's batch-size tables)
  width:    Adam + L2 at width 0.125
The grid is not a cartesian product, so this script lists the runs itself and reuses the sweep
machinery (skip finished runs, resume partial ones, mean +- std over seeds, report). `--summarize-only`
reports what has finished so far without running anything.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sparsekern.demo import QUICK
from sparsekern.train.report import write_report
from sparsekern.train.loop import read_result
from sparsekern.train.sweep import expand_grid, run_many, write_summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results/reproduction")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--summarize-only", action="store_true",
                   help="run nothing: summarise and report the runs finished so far")
    a = p.parse_args(argv)
    out = Path(a.out)
    seeds = [int(s) for s in a.seeds.split(",")]
    base = dict(model="basicnet", dataset="fashion-mnist", width=QUICK.width, batch_size=QUICK.batch_size,
                epochs=2, eval_every=QUICK.eval_every, reg_strength=QUICK.l2_strength,
                analyze_samples=QUICK.analyze_samples)
    adam = dict(base, optimizer="adam", lr=QUICK.adam_lr)
    table1 = [dict(adam, reg="l2"), dict(base, optimizer="momentum", lr=QUICK.sgd_lr, reg="l2"),
              dict(adam, reg="none"), dict(adam, reg="wd")]
    sweeps = [dict(adam, reg="l2", batch_size=80), dict(adam, reg="l2", width=0.125)]
    # Seed-major order: if the budget runs out, every row has as many seeds as possible, and
    # Table 1's rows come before the batch-size / width rows.
    configs = [c for rows in (table1, sweeps) for seed in seeds for row in rows
               for c in expand_grid(row, {"seed": [seed]}, out)]
    if a.summarize_only:
        statuses = [{"run_id": c.run_id(), "run_dir": str(c.run_dir()), "error": None,
                     "status": "skipped" if read_result(c.run_dir()) is not None else "failed"}
                    for c in configs]
        statuses = [s for s in statuses if s["status"] == "skipped"]  # unfinished runs are not failures
    else:
        statuses = run_many(configs, workers=a.workers, progress=False)
    write_summary(out, statuses)
    print("report:", write_report(out))


if __name__ == "__main__":
    main()
