"""``analyze`` per pass against plain eval of the same batches (issue 14's "analyze per pass >= 0.95x
plain eval" on ResNet-18 and MobileNetV2).

    python benchmarks/bench_analyze_overhead.py [--models resnet18,mobilenet_v2] [--size 96]
        [--batch 64] [--batches 4] [--rounds 7] [--threads 2]

Candidates, interleaved round by round (``sparsekern.bench.interleaved_timer``), on the same
in-memory batches: ``eval`` (the model under ``torch.no_grad`` over every batch) and ``analyze``
with selectivity "none", "histogram" and "two-pass" (time divided by its number of passes).
Prints eval time / analyze time per pass (1.0 = no overhead) and writes JSON under
benchmarks/results/. Random-init torchvision models: speed does not depend on the weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision

import sparsekern.bench as bench
from sparsekern.stats.analyze import analyze

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("none", "histogram", "two-pass")


def measure(name: str, size: int, batch: int, batches: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval().to(memory_format=torch.channels_last)
    data = [(torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last),
             torch.zeros(batch, dtype=torch.long)) for _ in range(batches)]

    def plain():
        with torch.no_grad():
            for x, _ in data:
                model(x)

    candidates = {"eval": plain}
    for mode in MODES:
        candidates[f"analyze[{mode}]"] = lambda mode=mode: analyze(model, data, selectivity=mode, progress=False)
    timing = bench.interleaved_timer(candidates, device="cpu", rounds=rounds, min_round_s=0.0, warmup=1)
    rows = {"eval_s": timing["eval"]["median_s"]}
    for mode in MODES:
        passes = 2 if mode == "two-pass" else 1
        per_pass = timing[f"analyze[{mode}]"]["median_s"] / passes
        rows[mode] = {"per_pass_s": per_pass, "eval_over_analyze": timing["eval"]["median_s"] / per_pass}
    return {"model": name, "size": size, "batch": batch, "batches": batches, "timing": timing, **rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="output file (default: benchmarks/results/analyze_overhead-...)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [measure(m.strip(), args.size, args.batch, args.batches, args.rounds)
               for m in args.models.split(",") if m.strip()]
    print(f"{'model':14s} {'eval ms':>9s} " + " ".join(f"{'eval/' + m + ' per pass':>24s}" for m in MODES))
    for r in results:
        print(f"{r['model']:14s} {1e3 * r['eval_s']:9.1f} "
              + " ".join(f"{r[m]['eval_over_analyze']:24.3f}" for m in MODES))
    env = bench.timing_environment(torch.device("cpu"))
    path = bench.write_json(f"analyze_overhead-{args.threads}threads", {"environment": env, "args": vars(args) | {
        "json": str(args.json) if args.json else None}, "results": results}, args.json, directory=RESULTS)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
