"""Every benchmark script in its default configuration, one after another (`make bench`).

    python benchmarks/run_all.py [--only channel_absmax,bn_relu] [--list]

Each script times its candidates side by side in one run and writes its JSON (device, versions,
date) under benchmarks/results/; this runner only sequences them, so that no two compete for the
machine, and reports which failed. Scripts that need an input (a trained run: bench_subnormal_training,
bench_prune_speed --source, compare_torch_pruning --source) run here on their synthetic default,
or are skipped where they have none; compare_torch_pruning runs only if torch-pruning is installed
(a benchmark-only dependency: `pip install torch-pruning`).
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, arguments): the configurations the README quotes.
BENCHMARKS = {
    "channel_absmax": ("bench_channel_absmax.py", []),
    "bn_relu": ("bench_bn_relu.py", []),
    "tracker_overhead": ("bench_tracker_overhead.py", ["--threads", "1"]),
    "explicit_step": ("bench_explicit_step.py", ["--threads", "1", "--rounds", "30"]),
    "build_variants": ("bench_build_variants.py", ["--threads", "1"]),
    "prune_speed": ("bench_prune_speed.py", ["--model", "vgg16", "--width", "0.25", "--dead-pct", "60"]),
    "torch_pruning": ("compare_torch_pruning.py", ["--quick"]),
    "image_pipeline": ("bench_image_pipeline.py", ["--quick"]),
    "analyze_overhead": ("bench_analyze_overhead.py", []),
    "coverage_zoo": ("coverage_zoo.py", []),
}


def available(name: str) -> str | None:
    """None if benchmark ``name`` can run here, else why not."""
    if name == "torch_pruning" and importlib.util.find_spec("torch_pruning") is None:
        return "torch-pruning is not installed (pip install torch-pruning)"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--list", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)

    names = list(BENCHMARKS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; expected some of {', '.join(BENCHMARKS)}")
    outcomes = {}
    for name in names:
        script, extra = BENCHMARKS[name]
        command = [sys.executable, str(HERE / script), *extra]
        if args.list:
            print(" ".join(command))
            continue
        why = available(name)
        if why is not None:
            outcomes[name] = f"skipped: {why}"
            print(f"== {name}: {outcomes[name]}", flush=True)
            continue
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command, cwd=HERE.parent)
        outcomes[name] = f"{'ok' if code == 0 else f'FAILED (exit code {code})'} in {time.perf_counter() - start:.0f} s"
    if not args.list:
        print("\n".join(["", "summary:"] + [f"  {name}: {outcome}" for name, outcome in outcomes.items()]))
    return 1 if any(o.startswith("FAILED") for o in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
