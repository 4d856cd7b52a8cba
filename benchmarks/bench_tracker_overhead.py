"""Training-step time of BasicNet with and without sparsity measurement, side by side.

    python benchmarks/bench_tracker_overhead.py [--width 0.5] [--batch 40] [--rounds 15] [--json PATH]

Candidates (each on its own copy of the same model, timed in interleaved rounds):
  no tracking                    forward + backward + Adam step
  SparsityTracker[<mode>]        the same with the tracker on every BN -> ReLU feature
  naive hooks                    a forward hook per ReLU storing out.abs().amax(dim=(2, 3))
                                 in a list (what one writes by hand; no corpus statistics)
  measurement only: ...           the measuring work alone, replayed on the post-ReLU maps of
                                 one forward (ChannelStats.update per feature, or the naive
                                 amax): small and steady, so it resolves overheads that the
                                 noise of whole training steps on a shared machine would hide
Prints the ratios to "no tracking" and writes JSON (device, versions, date) to
benchmarks/results/. Goal on CPU: the tracker adds at most 10% to a training step.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsekern.bench as bench

from sparsekern.models import build_model
from sparsekern.stats.channel_stats import ChannelStats
from sparsekern.stats.tracker import SparsityTracker

RESULTS = Path(__file__).resolve().parent / "results"  # where bench.write_json puts the JSON


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def add_naive_hooks(model: nn.Module) -> list:
    stored = []

    def hook(module, args, out):
        stored.append(out.detach().abs().amax(dim=(2, 3)))

    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(hook)
    return stored


def post_relu_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every ReLU module in one training-mode forward."""
    maps = []
    handles = [m.register_forward_hook(lambda m, a, out: maps.append(out.detach().clone()))
               for m in model.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return maps


def replay_updates(maps: list[torch.Tensor], mode: str):
    stats = [ChannelStats(selectivity=mode) for _ in maps]

    def measure():
        for s, a in zip(stats, maps):
            if mode == "exact" and s.num_samples > 1000 * a.shape[0]:
                s.reset()  # keep the stored maxima bounded while timing
            s.update(a)

    return measure


def replay_naive(maps: list[torch.Tensor]):
    stored = []

    def measure():
        if len(stored) > 10000:
            stored.clear()
        stored.extend(a.abs().amax(dim=(2, 3)) for a in maps)

    return measure


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--modes", default="histogram,none,exact", help="tracker selectivity modes to time")
    parser.add_argument("--json", default=None, help="output path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = build_model("basicnet", in_channels=1, num_classes=10, width=args.width).to(device).train()
    x = torch.randn(args.batch, 1, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    candidates = {"no tracking": train_step_fn(copy.deepcopy(base), x, y)}
    trackers = {}
    for mode in [m for m in args.modes.split(",") if m]:
        model = copy.deepcopy(base)
        trackers[mode] = SparsityTracker(model, selectivity=mode)
        candidates[f"SparsityTracker[{mode}]"] = train_step_fn(model, x, y)
    naive_model = copy.deepcopy(base)
    stored = add_naive_hooks(naive_model)
    candidates["naive hooks"] = train_step_fn(naive_model, x, y)

    maps = post_relu_maps(copy.deepcopy(base), x)
    for mode in trackers:
        candidates[f"measurement only: ChannelStats[{mode}]"] = replay_updates(maps, mode)
    candidates["measurement only: naive amax"] = replay_naive(maps)

    timings = bench.interleaved_timer(candidates, device=device, rounds=args.rounds, min_round_s=0.3)
    reference = timings["no tracking"]["median_s"]
    rows = []
    for name, t in timings.items():
        rows.append({
            "candidate": name,
            "step_ms": 1e3 * t["median_s"],
            "p20_ms": 1e3 * t["p20_s"],
            "p80_ms": 1e3 * t["p80_s"],
            "ratio": t["median_s"] / reference,
            "overhead_%": 100 * (t["median_s"] / reference - 1),
        })
    env = bench.timing_environment(device)
    print(f"BasicNet width {args.width}, batch {args.batch}, {args.size}x{args.size}, {env['device_name']}, "
          f"{env['torch_threads']} threads")
    bench.print_table(rows, ["candidate", "step_ms", "p20_ms", "p80_ms", "ratio", "overhead_%"])
    if not stored or any(s.num_samples == 0 for t in trackers.values() for s in t.stats.values()):
        raise RuntimeError("a candidate measured nothing: the comparison would be meaningless")
    config = {"model": "basicnet", "width": args.width, "batch": args.batch, "size": args.size,
              "optimizer": "Adam", "rounds": args.rounds, "threads": torch.get_num_threads()}
    path = bench.write_results("tracker_overhead", config, env, rows, args.json, directory=RESULTS,
                               name=f"tracker_overhead-{torch.get_num_threads()}threads")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
