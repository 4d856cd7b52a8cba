"""Training-step time with and without SparsityTracker, eager and under torch.compile, side by side.

    python benchmarks/bench_compiled_tracker.py [--models basicnet,resnet18] [--batch 32] [--rounds 15]

For every model, four candidates on their own copies of the same weights, timed in interleaved
rounds (``sparsekern.bench.interleaved_timer``): a training step (forward + cross-entropy +
backward + Adam step) eager, eager with the tracker on every feature (selectivity "histogram"),
with the model under ``torch.compile(model, fullgraph=True)`` (inductor), and compiled with the
tracker. Models: BasicNet (width --width, 1x28x28 inputs) and torchvision resnet18 (3x--size^2).
Before timing, each compiled tracker is checked to have compiled with no graph break. The ratios
are medians (p20 / p80) of per-round paired ratios (both candidates timed in the same round). Prints
them and writes JSON (device, versions, date) to benchmarks/results/. Target (issue 14): the
tracker adds <= 3% to a compiled training step.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

import sparsekern.bench as bench
from sparsekern.models import build_model
from sparsekern.stats.tracker import SparsityTracker

RESULTS = Path(__file__).resolve().parent / "results"


def make_model(name: str, width: float) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "basicnet":
        return build_model("basicnet", in_channels=1, num_classes=10, width=width), (1, 28, 28)
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10), (3,)
    raise ValueError(f"unknown model {name!r}")


def train_step_fn(model: nn.Module, run: nn.Module, x, y):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(run(x), y).backward()
        opt.step()

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="basicnet,resnet18")
    parser.add_argument("--width", type=float, default=0.5, help="BasicNet width")
    parser.add_argument("--size", type=int, default=32, help="resnet18 input size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    # Several instances of one model class are compiled here, some with the tracker's hooks: by
    # default dynamo does not guard on module hooks, and would run a hook-free instance's graph for
    # a tracked one (see SparsityTracker's docstring).
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows, compile_s = [], {}
    for name in [m for m in args.models.split(",") if m]:
        torch.manual_seed(0)
        base, shape = make_model(name, args.width)
        if name == "resnet18":
            shape = (3, args.size, args.size)
        base = base.to(device).train()
        x = torch.randn(args.batch, *shape, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        candidates, trackers = {}, {}
        for compiled in (False, True):
            for tracked in (False, True):
                model = copy.deepcopy(base)
                if tracked:
                    trackers[compiled] = SparsityTracker(model, selectivity="histogram")
                run = torch.compile(model, fullgraph=True) if compiled else model
                step = train_step_fn(model, run, x, y)
                if compiled:
                    torch._dynamo.utils.counters.clear()
                    start = time.perf_counter()
                    step(), step()  # compile (the first forward also allocates the statistics)
                    compile_s[f"{name} tracked={tracked}"] = time.perf_counter() - start
                    breaks = dict(torch._dynamo.utils.counters["graph_break"])
                    if breaks:
                        raise RuntimeError(f"{name}: graph breaks under torch.compile: {breaks}")
                label = f"{name} {'compiled' if compiled else 'eager'}{' + tracker' if tracked else ''}"
                candidates[label] = step
        # Rounds of the interleaved timer one at a time, so that each round gives paired ratios
        # (tracked / untracked in the same round): on a shared machine the load drifts between
        # rounds by more than the overhead being measured, and the pairs cancel it.
        per_round = []
        for i in range(args.rounds):
            per_round.append(bench.interleaved_timer(candidates, device=device, rounds=1, min_round_s=0.3,
                                                     warmup=2 if i == 0 else 0))
        for label in candidates:
            times = [r[label]["median_s"] for r in per_round]
            base_label = label.replace(" + tracker", "")
            ratios = [r[label]["median_s"] / r[base_label]["median_s"] for r in per_round]
            vs_eager = [r[label]["median_s"] / r[f"{name} eager"]["median_s"] for r in per_round]
            q = lambda v, k: statistics.quantiles(v, n=10)[k] if len(v) > 1 else v[0]  # noqa: E731
            rows.append({"candidate": label, "step_ms": 1e3 * statistics.median(times),
                         "p20_ms": 1e3 * q(times, 1), "p80_ms": 1e3 * q(times, 7),
                         "vs untracked": statistics.median(ratios), "ratio_p20": q(ratios, 1),
                         "ratio_p80": q(ratios, 7), "overhead_%": 100 * (statistics.median(ratios) - 1),
                         "vs eager": statistics.median(vs_eager)})
        for tr in trackers.values():
            if any(s.num_samples == 0 for s in tr.stats.values()):
                raise RuntimeError(f"{name}: a tracker measured nothing: {tr.steps} steps, "
                                   f"{ {k: s.num_samples for k, s in tr.stats.items()} }")
    env = bench.timing_environment(device)
    print(f"batch {args.batch}, BasicNet width {args.width} (1x28x28), resnet18 at 3x{args.size}x{args.size}, "
          f"{env['device_name']}, {env['torch_threads']} threads; compile seconds: "
          + ", ".join(f"{k}: {v:.0f}" for k, v in compile_s.items()))
    bench.print_table(rows, ["candidate", "step_ms", "p20_ms", "p80_ms", "vs untracked", "ratio_p20", "ratio_p80",
                             "overhead_%", "vs eager"])
    config = {"models": args.models, "width": args.width, "size": args.size, "batch": args.batch,
              "optimizer": "Adam", "selectivity": "histogram", "rounds": args.rounds,
              "threads": torch.get_num_threads(), "compile_seconds": compile_s}
    path = bench.write_results("compiled_tracker", config, env, rows, args.json, directory=RESULTS,
                               name=f"compiled_tracker-{torch.get_num_threads()}threads")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
