"""What subnormal weights cost a CPU training step, and what SPARSEKERN_FLUSH_DENORMAL=1 gives back.

    python benchmarks/bench_subnormal_training.py runs/<run id> [--steps 200] [--threads 1] [--rounds 2]

Resumes a finished (or interrupted) `sparsekern train` run from its checkpoint: model weights,
optimizer state (Adam's moments decay to subnormals with the weights) and regulariser, exactly as
the training loop would, and times training steps on random batches of the run's batch size, in
fresh processes with and without SPARSEKERN_FLUSH_DENORMAL=1, alternating (A, B, A, B...) so load
drift hits both alike. The flag must be set before torch starts its worker threads, hence one
process per measurement. Prints seconds per step, the ratio and the number of subnormal values in
the weights and optimizer state; writes JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # where bench.write_json puts the JSON

CHILD = r"""
import json, sys, time, torch
import sparsekern
import torch.nn.functional as F
from sparsekern._denormals import flush_denormal_enabled, subnormal_count
from sparsekern.data import dataset_info
from sparsekern.train.checkpoint import load_checkpoint
from sparsekern.train.loop import load_trained
from sparsekern.train.optim import Optimization

run_dir, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
model, config = load_trained(run_dir, "cpu")
model.train()
state = load_checkpoint(f"{run_dir}/checkpoint.pt", config_hash=config.config_hash(), config=config.identity(),
                        map_location="cpu")
optimization = Optimization(config, model, total_steps=max(state["step"], 1) + steps + 10)
optimization.load_state_dict(state["optimization"])
def tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from tensors(v)
sub_weights = subnormal_count(model.parameters())
sub_state = subnormal_count(tensors(optimization.optimizer.state_dict()["state"]))
info = dataset_info(config.dataset)
g = torch.Generator().manual_seed(0)
size = info.image_size if isinstance(info.image_size, tuple) else (info.image_size, info.image_size)
x = torch.randn((config.batch_size, info.in_channels, *size), generator=g)
y = torch.randint(0, info.num_classes, (config.batch_size,), generator=g)
def step():
    optimization.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimization.step()
for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"flush_denormal": flush_denormal_enabled(), "seconds_per_step": (time.perf_counter() - start) / steps,
                  "subnormal_weights": sub_weights, "subnormal_optimizer_state": sub_state}))
"""


def measure(run_dir: str, steps: int, threads: int, flush: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SPARSEKERN_FLUSH_DENORMAL"}
    env["SPARSEKERN_FLUSH_DENORMAL"] = "1" if flush else "0"
    out = subprocess.run([sys.executable, "-c", CHILD, run_dir, str(steps), str(threads)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a `sparsekern train` run directory with checkpoint.pt")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements per setting")
    parser.add_argument("--json", help="output path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)

    import torch

    import sparsekern.bench as bench

    samples = {False: [], True: []}
    for _ in range(args.rounds):
        for flush in (False, True):
            samples[flush].append(measure(args.run_dir, args.steps, args.threads, flush))
    t = {flush: statistics.median(s["seconds_per_step"] for s in runs) for flush, runs in samples.items()}
    first = samples[False][0]
    print(f"{args.run_dir}: {first['subnormal_weights']} subnormal weights, {first['subnormal_optimizer_state']} "
          f"subnormal optimizer-state values")
    print(f"seconds per step, {args.threads} thread(s), batch from the run's config, median of {args.rounds}:")
    print(f"  as it is:                     {t[False]:.4f}")
    flushed = samples[True][0]["flush_denormal"]
    print(f"  SPARSEKERN_FLUSH_DENORMAL=1: {t[True]:.4f}" + ("" if flushed else " (flushing unavailable here)"))
    print(f"  ratio: {t[False] / t[True]:.2f}x")
    payload = {"environment": bench.timing_environment(torch.device("cpu")), "run_dir": args.run_dir,
               "steps": args.steps, "threads": args.threads, "samples": {str(k): v for k, v in samples.items()},
               "seconds_per_step": {"as_is": t[False], "flushed": t[True]}, "ratio": t[False] / t[True]}
    path = bench.write_json(f"subnormal_training-{args.threads}threads", payload, args.json, directory=RESULTS)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
