"""Torch-Pruning on the channels implicit sparsity removes: is its output still the original's?

    python benchmarks/compare_torch_pruning.py --source runs/<run id> [--by both] [--samples 10000]
    python benchmarks/compare_torch_pruning.py --quick        # synthetic BasicNet, dead + constant filters

Torch-Pruning (``pip install torch-pruning``; a benchmark-only dependency, imported lazily: the
script says so and exits when it is absent) removes a channel's conv filter, its BN entries and
the next layer's input slice with a dependency graph, as sparsekern's surgery does, but it does
not fold what the removed channel contributed. A dead channel (output 0) contributes nothing, so
both give the original function; a channel with gamma = 0 outputs the constant relu(beta), which
sparsekern folds into the next layer's bias (where exact) and Torch-Pruning drops.

Both tools get exactly the channels sparsekern's exact surgery removed (plan by activation,
|gamma| or both, minus what surgery kept for exactness); both pruned models are compared with the
original on the same images: max |logit difference| relative to the logit scale, prediction
agreement, params.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune_speed import synthetic_case  # noqa: E402

import sparsekern.bench as bench  # noqa: E402
from sparsekern.prune import count_params  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"  # where bench.write_json puts the JSON


def removed_channels(plan, report) -> dict:
    """layer -> the channels sparsekern's surgery actually removed (planned, not kept for exactness)."""
    out = {}
    for name, layer in plan.layers.items():
        kept_anyway = report.layers[name].kept if name in report.layers else {}
        channels = [c for c in layer.removed if c not in kept_anyway]
        if channels:
            out[name] = channels
    return out


def torch_pruning_model(model: nn.Module, channels: dict, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with ``channels`` ({conv name: output channels}) removed by Torch-Pruning."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example)
    for name, idxs in channels.items():
        group = graph.get_pruning_group(pruned.get_submodule(name), tp.prune_conv_out_channels, idxs=idxs)
        if not graph.check_pruning_group(group):
            raise RuntimeError(f"Torch-Pruning refuses to prune {name} channels {idxs}")
        group.prune()
    return pruned


@torch.no_grad()
def compare(original: nn.Module, candidate: nn.Module, batches) -> dict:
    """Max |logit diff| (absolute and relative to max(1, max |logit|)) and prediction agreement."""
    diff = scale = 0.0
    agree = count = 0
    for x in batches:
        a, b = original(x).double(), candidate(x).double()
        diff = max(diff, float((a - b).abs().max()))
        scale = max(scale, float(a.abs().max()))
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        count += x.shape[0]
    return {"max_abs_logit_diff": diff, "max_rel_logit_diff": diff / max(1.0, scale), "agreement": agree / count,
            "params": count_params(candidate)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="a trained run directory")
    p.add_argument("--by", choices=("activation", "gamma", "both"), default="both",
                   help="run directory: which implicit sparsity to remove (default both)")
    p.add_argument("--samples", type=int, help="run directory: analyse only the first N training images")
    p.add_argument("--eval-samples", type=int, default=2000, help="images the outputs are compared on")
    p.add_argument("--quick", action="store_true", help="synthetic BasicNet (width 0.25): 50%% dead, 10%% constant")
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if not args.source and not args.quick:
        p.error("give --source RUN_DIR or --quick")
    try:
        import torch_pruning
    except ImportError:
        print("torch-pruning is not installed (pip install torch-pruning): nothing to compare, skipping")
        return 0

    if args.source:
        from sparsekern.data import first_samples, make_loader
        from sparsekern.experiments.harvest import prune_trained

        done = prune_trained(args.source, by=args.by, samples=args.samples, progress=False)
        model, ours, plan, report = done["model"], done["pruned"], done["plan"], done["report"]
        batches = [x for x, _ in make_loader(first_samples(done["test_set"], args.eval_samples), 500)]
        case = {"source": args.source, "by": args.by, "eval": f"first {args.eval_samples} test images"}
    else:
        model, ours, report, plan = synthetic_case("basicnet", 0.25, dead_pct=50, constant_pct=10)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(250, 1, 28, 28, generator=g) for _ in range(4)]
        case = {"synthetic": "basicnet w0.25, 50% dead and 10% constant filters per layer", "eval": "1000 noise images"}
    channels = removed_channels(plan, report)
    tp_model = torch_pruning_model(model, channels, batches[0][:2])
    dead = sum(1 for name, cs in channels.items() for c in cs if plan.layers[name].constants.get(c, 0.0) == 0.0)
    constant = sum(len(cs) for cs in channels.values()) - dead
    rows = [{"tool": "original", "params": count_params(model), "max_abs_logit_diff": 0.0, "max_rel_logit_diff": 0.0,
             "agreement": 1.0},
            {"tool": "sparsekern", **compare(model, ours, batches)},
            {"tool": f"torch-pruning {torch_pruning.__version__}", **compare(model, tp_model, batches)}]
    for row in rows:
        row["equals_original"] = row["max_rel_logit_diff"] <= 1e-4
    print(f"removed: {dead} dead channels (output 0) and {constant} constant channels (relu(beta) != 0) "
          f"in {len(channels)} layers")
    bench.print_table(rows, ["tool", "params", "max_abs_logit_diff", "max_rel_logit_diff", "agreement",
                               "equals_original"])
    payload = {"environment": bench.timing_environment(torch.device("cpu")), "case": case, "removed_dead": dead,
               "removed_constant": constant, "channels": channels, "rows": rows}
    print("wrote", bench.write_json("torch_pruning", payload, args.json, directory=RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
