"""The paper's remaining claims on Fashion-MNIST (3 seeds), as one resumable sweep.

    python scripts/reproduce_extended.py [--out docs/results/reproduction-extended] [--workers 1]
                                         [--seeds 0,1,2] [--only strength,optimizers,mechanism,pruning]
                                         [--tables-only]

Every run is the quick setting of ``scripts/reproduce.py`` (BasicNet width 0.25, batch 20,
2 epochs = 6000 steps) with one thing changed:
  strength:    Adam + L2 and Adam + WD at lambda in {0, 1e-4, 5e-4, 1e-3, 2e-3, 5e-3}
               (lambda = 0 is the unregularised run; WD 5e-4 is also the accuracy-matched WD row)
  optimizers:  Adam, AdaMax, AdaGrad, AdaDelta, RMSprop, momentum SGD with L2 2e-3. Learning-rate
               rule: twice the optimizer's torch default (Adam 2e-3, AdaMax 4e-3, AdaGrad 2e-2,
               AdaDelta 2.0, RMSprop 2e-2), momentum SGD 0.02 = twice the full setting's 0.01;
               the quick setting raised Adam and SGD by the same factor.
  mechanism:   Adam and momentum SGD with L2 2e-3 and log_mechanism (gamma's regulariser vs loss
               updates per BN channel and 500-step interval, next to its selectivity)
  vgg16:       VGG-16 width 0.25, Adam + L2 2e-3, 2 and 10 epochs: % of filters removable exactly
  pruning:     `sparsekern compare-methods --methods l1-norm,apoz,selectivity,apoz-global,selectivity-global`
               per seed (the Adam + L2 network trained again, keeping its checkpoint), combined over seeds
Runs that ``scripts/reproduce.py`` or the harvest already made (same identity) are read from their
directories, not trained again. ``--tables-only`` trains nothing and writes the tables from the runs finished
so far (``sparsekern.experiments.reproduction_extended``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsekern.experiments import reproduction_extended as rx
from sparsekern.experiments.method_table import run_method_table
from sparsekern.experiments.method_table_output import OUTPUT_STEM
from sparsekern.train.sweep import run_many

GROUPS = (*rx.GROUPS, "pruning")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results/reproduction-extended")
    p.add_argument("--reuse", default="docs/results/reproduction,docs/results/harvest",
                   help="comma-separated sweep directories whose finished runs are read instead of trained again")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {list(GROUPS)}")
    p.add_argument("--tables-only", action="store_true", help="train nothing: tables from the finished runs")
    a = p.parse_args(argv)
    out, reuse = Path(a.out), [Path(r) for r in a.reuse.split(",") if r]
    seeds = [int(s) for s in a.seeds.split(",")]
    groups = [g for g in a.only.split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        p.error(f"unknown group(s) {unknown}: expected some of {list(GROUPS)}")
    if not a.tables_only:
        runs = [g for g in groups if g != "pruning"]
        pending = [c for c in rx.planned_configs(out, seeds, runs) if rx.finished_dir(c, out, reuse) is None]
        print(f"{len(pending)} run(s) to train", flush=True)
        run_many(pending, workers=a.workers, progress=False)
        if "pruning" in groups:
            for seed in seeds:
                config = rx.pruning_config(out, seed)
                table = Path(config.out_dir) / f"{OUTPUT_STEM}.json"
                # measured again (training reused) when the rows planned changed since
                if not table.is_file() or json.loads(table.read_text())["config"]["methods"] != list(config.methods):
                    run_method_table(config, progress=False)
    for path in rx.write_tables(out, reuse, seeds):
        print("wrote", path)


if __name__ == "__main__":
    main()
