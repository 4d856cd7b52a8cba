"""bn_relu (fused BN + ReLU + per-(n, c) max) against torch eager, torch.compile and a copy.

Script mode (records JSON under benchmarks/results/):
    python benchmarks/bench_bn_relu.py [--mib 64] [--device cpu|cuda] [--dead 0,50,90] [--json PATH]
pytest-benchmark mode:
    python -m pytest benchmarks/bench_bn_relu.py --benchmark-only

Candidates, timed side by side in one run for every (layout, dead fraction):
  sparsekern[...]+max    bn_relu(x, scale, shift, dead_mask, return_max=True): y and m in one pass
  sparsekern[...]        the same without the max
  ... out=(+max)         into a preallocated y (bn_relu(..., out=y)): no allocation
  ... out= skip dead+max the same with write_dead=False: dead channels neither read nor written (y
                         holds 0 there from the start, so the result is the same)
  ... inplace+max        in place on a copy of x (dead channels skipped too, write_dead=False)
  eager bn+relu+amax     torch.relu(bn(x)) then y.amax((2, 3)): what a user writes to get y and m
  eager bn+relu          torch.relu(bn(x))
  compile bn+relu+amax   torch.compile of the eager code (skipped if compilation fails)
  copy (yardstick)       y.copy_(x) into a preallocated y: one read and one write of the tensor,
                         the floor for any op that reads x and writes y
  clone (yardstick)      x.clone(): the same plus allocating y, which every candidate above
                         also does on each call. On CPU a fresh 64 MiB block comes from mmap and
                         its first write faults in 16384 pages, which costs about as much as the
                         copy itself; clone is therefore the floor for an op returning a new y.

Allocation matters on CPU: with glibc, every fresh 64 MiB tensor is a new mmap whose pages
fault in on first write. torch's allocator can back large blocks with transparent huge pages
(THP_MEM_ALLOC_ENABLE=1 in the environment, read once by torch), which removes most of that
cost; the setting is recorded in the JSON, so run the script both ways to see both regimes.

GB/s counts the bytes a single pass must move, x read + y written (2 x tensor bytes), for every
candidate, so it compares like with like; with dead channels ours reads less than that.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsekern.bench as bench

import sparsekern
from sparsekern.ops.bn_relu import bn_affine, bn_relu

RESULTS = Path(__file__).resolve().parent / "results"  # where bench.write_json puts the JSON

CHANNELS, SIDE = 128, 64  # 2 MiB per float32 sample: 64 MiB is a batch of 32


def make_case(mib: int, layout: str, dead_pct: int, device: str, seed: int = 0):
    """(x, eval-mode bn, scale, shift, dead_mask or None); the BN outputs 0 on dead channels too."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, (mib << 20) // (CHANNELS * SIDE * SIDE * 4))
    x = torch.randn(n, CHANNELS, SIDE, SIDE, generator=g).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    bn = nn.BatchNorm2d(CHANNELS)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(CHANNELS, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(CHANNELS, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(CHANNELS, generator=g))
        bn.bias.copy_(torch.randn(CHANNELS, generator=g) * 0.1)
        dead = None
        k = round(CHANNELS * dead_pct / 100)
        if k:
            dead = torch.zeros(CHANNELS, dtype=torch.bool)
            dead[torch.randperm(CHANNELS, generator=g)[:k]] = True  # scattered, as training leaves them
            bn.weight[dead] = 0.0  # gamma = 0, beta = 0: what a dead filter looks like
            bn.bias[dead] = 0.0
    bn = bn.eval().to(device)
    scale, shift = bn_affine(bn)
    return x, bn, scale, shift, (dead.to(device) if dead is not None else None)


def eager_bn_relu_max(bn: nn.Module, x: torch.Tensor):
    y = torch.relu(bn(x))
    return y, y.amax((2, 3))


def eager_bn_relu(bn: nn.Module, x: torch.Tensor):
    return torch.relu(bn(x))


def compile_eager(bn: nn.Module, x: torch.Tensor):
    """torch.compile of eager_bn_relu_max for x's shape and layout, or (None, why) if it fails."""
    try:
        compiled = torch.compile(lambda t: eager_bn_relu_max(bn, t), dynamic=False)
        y, m = compiled(x)
        ref_y, ref_m = eager_bn_relu_max(bn, x)
        if not (torch.allclose(y, ref_y, atol=1e-5) and torch.allclose(m, ref_m, atol=1e-5)):
            return None, "torch.compile output differs from eager"
        return compiled, None
    except Exception as exc:  # a missing compiler toolchain must not sink the whole benchmark
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def ours_backends(device: torch.device) -> list[str]:
    order = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    return [b for b in order if sparsekern._backend.backend_supports(b, device)[0]]


def candidates(x, bn, scale, shift, dead, compiled) -> dict:
    y_copy = torch.empty_like(x)
    c = {}
    for b in ours_backends(x.device):
        y_out = torch.zeros_like(x)  # zero in the dead channels from the start: write_dead=False is exact
        x_in = x.clone()  # in place on a copy: y = relu(bn(y)) again and again stays finite, same work per call
        c[f"sparsekern[{b}]+max"] = lambda b=b: bn_relu(x, scale, shift, dead, return_max=True, backend=b)
        c[f"sparsekern[{b}]"] = lambda b=b: bn_relu(x, scale, shift, dead, backend=b)
        c[f"sparsekern[{b}] out=+max"] = lambda b=b, o=y_out: bn_relu(x, scale, shift, dead, return_max=True,
                                                                        backend=b, out=o)
        c[f"sparsekern[{b}] out="] = lambda b=b, o=y_out: bn_relu(x, scale, shift, dead, backend=b, out=o)
        if dead is not None:
            # the same x with no channel dead, interleaved with the rest: the 0%-dead time of this round
            c[f"sparsekern[{b}] out=+max, none dead"] = lambda b=b, o=y_out: bn_relu(x, scale, shift, None,
                                                                                    return_max=True, backend=b, out=o)
            c[f"sparsekern[{b}] out= skip dead+max"] = lambda b=b, o=y_out: bn_relu(
                x, scale, shift, dead, return_max=True, backend=b, out=o, write_dead=False)
        c[f"sparsekern[{b}] inplace+max"] = lambda b=b, t=x_in: bn_relu(t, scale, shift, dead, return_max=True,
                                                                          backend=b, inplace=True,
                                                                          write_dead=dead is None)
    c["eager bn+relu+amax"] = lambda: eager_bn_relu_max(bn, x)
    c["eager bn+relu"] = lambda: eager_bn_relu(bn, x)
    if compiled is not None:
        c["compile bn+relu+amax"] = lambda: compiled(x)
    c["copy (yardstick)"] = lambda: y_copy.copy_(x)
    c["clone (yardstick)"] = lambda: x.clone()
    return c


def run(mib: int, device: str, layouts, dead_pcts, use_compile: bool = True, rounds: int = 15) -> dict:
    dev = torch.device(device)
    env = bench.timing_environment(dev)
    results = {"environment": env, "mib": mib, "shape_note": f"(N, {CHANNELS}, {SIDE}, {SIDE}) float32",
               "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"), "compile": {}, "cases": []}
    rows = []
    with torch.inference_mode():
        for layout in layouts:
            compiled, compiled_bn = None, None
            if use_compile:
                x, compiled_bn, *_ = make_case(mib, layout, 0, device)
                compiled, why = compile_eager(compiled_bn, x)
                results["compile"][layout] = "ok" if compiled is not None else f"skipped: {why}"
                if compiled is None:
                    print(f"torch.compile skipped for {layout}: {why}")
            for dead_pct in dead_pcts:
                x, bn, scale, shift, dead = make_case(mib, layout, dead_pct, device)
                case_compiled = compiled
                if compiled is not None:
                    # The compiled code closes over compiled_bn: load this case's parameters into it.
                    compiled_bn.load_state_dict(bn.state_dict())
                    if not torch.allclose(compiled(x)[1], eager_bn_relu_max(bn, x)[1], atol=1e-5):
                        case_compiled = None
                        results["compile"][f"{layout}/{dead_pct}"] = "skipped: stale parameters"
                nbytes = x.numel() * x.element_size()
                timing = bench.interleaved_timer(
                    candidates(x, bn, scale, shift, dead, case_compiled), device=dev, rounds=rounds
                )
                ours_key = next(k for k in timing if k.endswith("+max"))
                out_key = next((k for k in timing if k.endswith("out=+max")), None)
                if out_key is not None:
                    results.setdefault("summary", []).append({
                        "layout": layout, "dead_pct": dead_pct,
                        "out_max_vs_copy": timing[out_key]["median_s"] / timing["copy (yardstick)"]["median_s"],
                        "skip_dead_max_ms": 1e3 * timing.get(out_key.replace("out=+max", "out= skip dead+max"),
                                                            timing[out_key])["median_s"],
                        "out_max_ms": 1e3 * timing[out_key]["median_s"],
                        "copy_ms": 1e3 * timing["copy (yardstick)"]["median_s"],
                        "skip_dead_vs_none_dead_same_run": (
                            timing[out_key.replace("out=+max", "out= skip dead+max")]["median_s"]
                            / timing[out_key.replace("out=+max", "out=+max, none dead")]["median_s"]
                            if dead is not None else None),
                    })
                eager = timing["eager bn+relu+amax"]["median_s"]
                copy = timing["copy (yardstick)"]["median_s"]
                clone = timing["clone (yardstick)"]["median_s"]
                for name, t in timing.items():
                    rows.append({
                        "layout": layout,
                        "dead_pct": dead_pct,
                        "shape": list(x.shape),
                        "candidate": name,
                        **bench.milliseconds(t),
                        "GBps": 2 * nbytes / t["median_s"] / 1e9,
                        "pct_of_copy": 100 * copy / t["median_s"],
                        "pct_of_clone": 100 * clone / t["median_s"],
                        "speedup_vs_eager_max": eager / t["median_s"],
                        "time_vs_ours": t["median_s"] / timing[ours_key]["median_s"],
                    })
    results["cases"] = rows
    print(f"device: {env['device_name']}  torch {env['torch']}  triton {env['triton']}  threads {env['torch_threads']}  "
          f"THP_MEM_ALLOC_ENABLE={results['THP_MEM_ALLOC_ENABLE']}")
    bench.print_table(rows, ["layout", "dead_pct", "candidate", "median_ms", "p20_ms", "p80_ms", "GBps",
                               "pct_of_copy", "pct_of_clone", "speedup_vs_eager_max"])
    summary = results.get("summary", [])
    for layout in layouts:
        base = next((r for r in summary if r["layout"] == layout and r["dead_pct"] == 0), None)
        for r in (r for r in summary if r["layout"] == layout):
            if base is not None:
                r["skip_dead_vs_0pct_dead"] = r["skip_dead_max_ms"] / base["out_max_ms"]
            print(f"{layout:>14} dead {r['dead_pct']:>3}%: out=+max {r['out_max_ms']:.2f} ms = "
                  f"{r['out_max_vs_copy']:.2f}x copy; skip dead {r['skip_dead_max_ms']:.2f} ms"
                  + (f" = {r['skip_dead_vs_0pct_dead']:.2f}x the 0%-dead case's out= time" if base is not None else "")
                  + (f"; {r['skip_dead_vs_none_dead_same_run']:.2f}x the same x with none dead, same rounds"
                     if r.get("skip_dead_vs_none_dead_same_run") else ""))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_activation_flags(p)
    p.add_argument("--dead", default="0,50,90", help="percentages of dead channels")
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args(argv)
    mib = bench.activation_mib(a)
    res = run(mib, a.device, a.layouts.split(","), [int(v) for v in a.dead.split(",")],
              use_compile=not a.no_compile, rounds=a.rounds)
    print("wrote", bench.write_json("bn_relu", res, a.json, directory=RESULTS))


# ---- pytest-benchmark suite (python -m pytest benchmarks/bench_bn_relu.py --benchmark-only) ----
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("impl, dead_pct", [
    ("sparsekern+max", 0), ("sparsekern+max", 50), ("sparsekern+max", 90), ("sparsekern", 0),
    ("eager+amax", 0), ("eager", 0), ("copy", 0), ("clone", 0),
])
def test_bn_relu_64mib(benchmark, impl, dead_pct, layout):
    x, bn, scale, shift, dead = make_case(64, layout, dead_pct, "cpu")
    y = torch.empty_like(x)
    fn = {
        "sparsekern+max": lambda: bn_relu(x, scale, shift, dead, return_max=True),
        "sparsekern": lambda: bn_relu(x, scale, shift, dead),
        "eager+amax": lambda: eager_bn_relu_max(bn, x),
        "eager": lambda: eager_bn_relu(bn, x),
        "copy": lambda: y.copy_(x),
        "clone": lambda: x.clone(),
    }[impl]
    benchmark.group = f"bn_relu 64 MiB {layout}"
    benchmark.extra_info["bytes_moved"] = 2 * x.numel() * 4
    with torch.inference_mode():
        benchmark(fn)


if __name__ == "__main__":
    main()
