"""Training-step time of LeNet-5 with explicit sparsity, side by side with plain training.

    python benchmarks/bench_explicit_step.py [--batch 64] [--threads 1] [--rounds 20] [--json PATH]

Candidates (each on its own copy of the same LeNet-5, stepped through sparsekern.train's
Optimization exactly as `sparsekern train` steps it, timed in interleaved rounds):
  plain         SGD with momentum, no regulariser
  cges          the same + the CGES prox (group then exclusive) on every conv / Linear weight
  lasso         the same + the lasso prox (soft threshold)
  group-lasso   the same + the group-lasso prox on filters / rows
  slbi          Split LBI (momentum on the loss gradient, W / V / Gamma updates, support tracking)
  slbi-group    Split LBI with Linear rows as groups
A step is forward + backward + optimizer step (+ prox) on one fixed batch of random images.
Prints the ratios to "plain" and writes JSON (device, versions, date) to benchmarks/results/.
Goal on CPU: CGES and Split LBI steps at most 1.3x a plain step.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsekern.bench as bench

from sparsekern.models import LeNet5
from sparsekern.train.config import RunConfig
from sparsekern.train.optim import Optimization

RESULTS = Path(__file__).resolve().parent / "results"  # where bench.write_json puts the JSON

CANDIDATES = {
    "plain": dict(optimizer="momentum", reg="none"),
    "cges": dict(optimizer="momentum", reg="cges", reg_strength=5e-3),
    "lasso": dict(optimizer="momentum", reg="lasso", reg_strength=2e-4),
    "group-lasso": dict(optimizer="momentum", reg="group-lasso", reg_strength=2e-3),
    "slbi": dict(optimizer="slbi", reg="none", slbi_nu=20.0),
    "slbi-group": dict(optimizer="slbi-group", reg="none", slbi_nu=20.0),
}


def train_step_fn(model, optimization: Optimization, x: torch.Tensor, y: torch.Tensor):
    def step():
        optimization.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimization.step()

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--min-round-s", type=float, default=0.25, help="each round runs a candidate this long")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated subset of the candidates")
    parser.add_argument("--json", default=None, help="output path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = [n for n in args.candidates.split(",") if n]
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown or "plain" not in names:
        raise SystemExit(f"--candidates: unknown {unknown}; choose from {', '.join(CANDIDATES)} (plain required)")

    torch.manual_seed(0)
    base = LeNet5().to(device).train()
    x = torch.randn(args.batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    # The lr schedule is constant and the budget large: the timed steps never reach its end.
    steps = {}
    for name in names:
        model = copy.deepcopy(base)
        config = RunConfig(model="lenet5", lr=0.05, lr_schedule="constant", steps=10**9, **CANDIDATES[name])
        steps[name] = train_step_fn(model, Optimization(config, model, total_steps=10**9), x, y)

    timings = bench.interleaved_timer(steps, device=device, rounds=args.rounds, min_round_s=args.min_round_s)
    reference = timings["plain"]["median_s"]
    rows = [{
        "candidate": name,
        "step_ms": 1e3 * t["median_s"],
        "p20_ms": 1e3 * t["p20_s"],
        "p80_ms": 1e3 * t["p80_s"],
        "ratio": t["median_s"] / reference,
    } for name, t in timings.items()]
    env = bench.timing_environment(device)
    print(f"LeNet-5, batch {args.batch}, 28x28, {env['device_name']}, {env['torch_threads']} threads, "
          f"{args.rounds} rounds of >= {args.min_round_s} s")
    bench.print_table(rows, ["candidate", "step_ms", "p20_ms", "p80_ms", "ratio"])
    config = {"model": "lenet5", "batch": args.batch, "rounds": args.rounds, "min_round_s": args.min_round_s,
              "threads": torch.get_num_threads(), "candidates": {n: CANDIDATES[n] for n in names}}
    path = bench.write_results("explicit_step", config, env, rows, args.json, directory=RESULTS,
                               name=f"explicit_step-{torch.get_num_threads()}threads")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
