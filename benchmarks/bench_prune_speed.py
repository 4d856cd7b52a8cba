"""Dense versus pruned inference speed: does removing dead filters pay off in time?

Script mode (records JSON under benchmarks/results/):
    python benchmarks/bench_prune_speed.py --source runs/<run id>/pruned-activation   # `sparsekern prune` output
    python benchmarks/bench_prune_speed.py --source runs/<run id> [--manifest plan.json]
    python benchmarks/bench_prune_speed.py --model vgg16 --dead-pct 75        # synthetic dead filters
    python benchmarks/bench_prune_speed.py --quick                              # tiny smoke run
pytest-benchmark mode:
    python -m pytest benchmarks/bench_prune_speed.py --benchmark-only

Candidates, timed side by side in one run (``interleaved_timer``) for every batch size,
eager and torch.compile (skipped with the reason recorded where compilation fails):
  dense                 the original model, BN folded into the convs, channels_last
  pruned                the pruned model, BN folded, channels_last
  dense fused bn-relu   the original model with fused BN-ReLU kernels (``FusedBNReLU``) instead of
                        folding; eager only (the extension kernel is opaque to torch.compile)
fp32 on CPU, fp16 on CUDA by default (``--dtype``). Batch 1 gives latency, batch 256 throughput.
Printed: speedup t_dense / t_pruned next to the FLOP ratio, and the criterion
``1 - t_pruned/t_dense >= 0.7 * (1 - flops_pruned/flops_dense)``.

Without ``--source`` the models have synthetic weights: ``--dead-pct`` percent of each unit's
filters (scattered, as training leaves them) get gamma = 0, beta < 0, i.e. dead, and are removed
exactly (``PrunePlan.from_gamma``). Speed depends only on the shapes, so this measures what a
trained network with that much implicit sparsity would gain; with ``--source`` the per-layer
pattern is the real one.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsekern.bench import inference_model, interleaved_timer, speed_comparison, timing_environment, write_json
from sparsekern.experiments.harvest import dense_and_pruned
from sparsekern.models import ConvBNReLU, build_model
from sparsekern.prune import PrunePlan, prune_model
from sparsekern.report.speed import speed_markdown

RESULTS = Path(__file__).resolve().parent / "results"  # where write_json puts the JSON

IMAGE = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def synthetic_case(model: str = "basicnet", width: float = 1.0, dead_pct: float = 75.0,
                   constant_pct: float = 0.0, image=(1, 28, 28), seed: int = 0):
    """(dense, pruned, report, plan): ``model`` with random eval-mode BN statistics, where in every
    Conv-BN-ReLU unit ``dead_pct`` % of the channels are dead (gamma = 0, beta < 0) and
    ``constant_pct`` % output the constant relu(beta) > 0 (gamma = 0, beta > 0), pruned exactly
    by |gamma| (constants folded into the next layer where that is exact, kept otherwise)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = build_model(model, in_channels=image[0], num_classes=10, width=width).eval()
    with torch.no_grad():
        for unit in net.modules():
            if not isinstance(unit, ConvBNReLU):
                continue
            bn, c = unit.bn, unit.bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
            order = torch.randperm(c, generator=g)
            dead = order[: int(round(c * dead_pct / 100))]
            constant = order[len(dead): len(dead) + int(round(c * constant_pct / 100))]
            if len(dead) == c:  # a layer keeps at least one channel, or the network outputs a constant
                dead = dead[1:]
            bn.weight[dead], bn.bias[dead] = 0.0, -(torch.rand(len(dead), generator=g) + 0.1)
            bn.weight[constant], bn.bias[constant] = 0.0, torch.rand(len(constant), generator=g) + 0.1
    shape = (2,) + tuple(image)
    plan = PrunePlan.from_gamma(net, input_shape=shape)
    pruned, report = prune_model(net, plan, shape)
    return net, pruned, report, plan


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.source:
        dense, pruned, sample_shape = dense_and_pruned(args.source, manifest=args.manifest, device=str(device),
                                                       samples=args.samples, progress=False)
        case = {"source": str(args.source), "manifest": args.manifest}
    else:
        image = IMAGE[args.dataset]
        dense, pruned, _, _ = synthetic_case(args.model, args.width, args.dead_pct, image=image)
        sample_shape = image
        case = {"model": args.model, "width": args.width, "dead_pct": args.dead_pct, "dataset": args.dataset}
    result = speed_comparison(dense, pruned, sample_shape, batch_sizes=args.batch_sizes, device=device, dtype=dtype,
                              compile=not args.no_compile, timer=interleaved_timer, rounds=args.rounds)
    env = timing_environment(device)
    print(f"device: {env['device_name']}  torch {env['torch']}  threads {env['torch_threads']}")
    print(speed_markdown(result))
    return {"environment": env, "case": case, **result}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="a `sparsekern prune` output directory or a run directory")
    p.add_argument("--manifest", help="with a run directory: apply this manifest")
    p.add_argument("--samples", type=int, help="run directory without manifest: analyse only N training images")
    p.add_argument("--model", default="basicnet", help="synthetic case: basicnet | vgg11 | vgg16")
    p.add_argument("--width", type=float, default=1.0, help="synthetic case: width multiplier")
    p.add_argument("--dead-pct", type=float, default=75.0, help="synthetic case: %% dead filters per layer")
    p.add_argument("--dataset", choices=sorted(IMAGE), default="fashion_mnist", help="synthetic case: input size")
    p.add_argument("--batch-sizes", default="1,256")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: basicnet width 0.25, batches 1,8, 5 rounds")
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    args.batch_sizes = tuple(int(v) for v in args.batch_sizes.split(","))
    if args.quick:
        args.width, args.batch_sizes, args.rounds = 0.25, (1, 8), 5
    print("wrote", write_json("prune_speed", run(args), args.json, directory=RESULTS))


# ---- pytest-benchmark suite (python -m pytest benchmarks/bench_prune_speed.py --benchmark-only) ----
@pytest.fixture(scope="module")
def basicnet_75pct_dead():
    dense, pruned, _, _ = synthetic_case("basicnet", 0.5, 75.0)
    return {"dense": inference_model(dense), "pruned": inference_model(pruned),
            "dense fused bn-relu": inference_model(dense, bn="fuse")}


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("variant", ["dense", "pruned", "dense fused bn-relu"])
def test_basicnet_half_width_75pct_dead(benchmark, basicnet_75pct_dead, variant, batch):
    model: nn.Module = basicnet_75pct_dead[variant]
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    benchmark.group = f"basicnet w0.5, 75% dead filters, batch {batch}"
    with torch.inference_mode():
        benchmark(lambda: model(x))


if __name__ == "__main__":
    main()
