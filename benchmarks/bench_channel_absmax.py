"""channel_absmax and ChannelStats.update against torch eager, torch.compile and x.amax.

Script mode (records JSON under benchmarks/results/):
    python benchmarks/bench_channel_absmax.py [--mib 64] [--device cpu|cuda] [--json PATH]
pytest-benchmark mode:
    python -m pytest benchmarks/bench_channel_absmax.py --benchmark-only

Bandwidth = bytes of x read once / time. `x.amax((2, 3))` is the read-bandwidth yardstick
(torch's own single-pass reduction); on CUDA the measured copy bandwidth is the ceiling.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import sparsekern.bench as bench

import sparsekern
from sparsekern import ChannelStats

RESULTS = Path(__file__).resolve().parent / "results"  # where bench.write_json puts the JSON

CHANNELS, SIDE = 128, 32


def make_input(mib: int, dtype: torch.dtype, layout: str, device: str) -> torch.Tensor:
    elem = torch.tensor([], dtype=dtype).element_size()
    n = max(1, (mib << 20) // (CHANNELS * SIDE * SIDE * elem))
    x = torch.randn(n, CHANNELS, SIDE, SIDE, device=device).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def eager_absmax(x):
    return x.abs().amax((2, 3))


def candidates(x: torch.Tensor, compiled) -> dict:
    dev = x.device
    c = {}
    if dev.type == "cuda":
        for b in ("cuda", "triton"):
            if sparsekern._backend.backend_supports(b, dev)[0]:
                c[f"sparsekern[{b}]"] = lambda b=b: sparsekern.channel_absmax(x, backend=b)
    else:
        c["sparsekern[cpp]"] = lambda: sparsekern.channel_absmax(x, backend="cpp")
        c["sparsekern[cpp]+count"] = lambda: sparsekern.channel_absmax(x, count_positive=True, backend="cpp")
    for mode in ("none", "histogram", "exact"):
        stats = ChannelStats(CHANNELS, device=dev, selectivity=mode)

        def update(stats=stats, mode=mode):
            if mode == "exact" and stats.num_samples > 64 * x.shape[0]:
                stats.reset()  # keep stored maxima bounded during timing
            stats.update(x)

        c[f"ChannelStats.update[{mode}]"] = update
    c["eager abs().amax"] = lambda: eager_absmax(x)
    if compiled is not None:
        c["torch.compile abs().amax"] = lambda: compiled(x)
    c["x.amax (yardstick)"] = lambda: x.amax((2, 3))
    return c


def run(mib: int, device: str, dtypes, layouts, use_compile: bool = True) -> dict:
    dev = torch.device(device)
    compiled = None
    if use_compile:
        try:
            compiled = torch.compile(eager_absmax, dynamic=False)
            compiled(make_input(1, torch.float32, "contiguous", device))
        except Exception as exc:  # a missing compiler toolchain must not sink the whole benchmark
            print(f"torch.compile unavailable: {exc!r}")
            compiled = None
    env = bench.timing_environment(dev)
    results = {"environment": env, "mib": mib, "cases": []}
    if dev.type == "cuda":
        results["copy_bandwidth_GBps"] = bench.copy_bandwidth(mib << 20, dev)
    rows = []
    for dtype in dtypes:
        for layout in layouts:
            x = make_input(mib, dtype, layout, device)
            nbytes = x.numel() * x.element_size()
            timing = bench.interleaved_timer(candidates(x, compiled), device=dev)
            base = timing["x.amax (yardstick)"]["median_s"]
            eager = timing["eager abs().amax"]["median_s"]
            ours_key = "sparsekern[cpp]" if dev.type == "cpu" else next(k for k in timing if k.startswith("sparsekern["))
            for name, t in timing.items():
                row = {
                    "dtype": str(dtype).replace("torch.", ""),
                    "layout": layout,
                    "shape": list(x.shape),
                    "candidate": name,
                    **bench.milliseconds(t),
                    "GBps": nbytes / t["median_s"] / 1e9,
                    "bw_vs_amax": base / t["median_s"],
                    "speedup_vs_eager": eager / t["median_s"],
                    "time_vs_ours": t["median_s"] / timing[ours_key]["median_s"],
                }
                if "copy_bandwidth_GBps" in results:
                    row["pct_of_copy_bw"] = 100 * row["GBps"] / results["copy_bandwidth_GBps"]
                rows.append(row)
    results["cases"] = rows
    cols = ["dtype", "layout", "candidate", "median_ms", "GBps", "bw_vs_amax", "speedup_vs_eager", "time_vs_ours"]
    if "copy_bandwidth_GBps" in results:
        cols.append("pct_of_copy_bw")
        print(f"measured copy bandwidth: {results['copy_bandwidth_GBps']:.0f} GB/s")
    print(f"device: {env['device_name']}  torch {env['torch']}  threads {env['torch_threads']}")
    bench.print_table(rows, cols)
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_activation_flags(p)
    p.add_argument("--dtypes", default="float32,float16")
    a = p.parse_args(argv)
    mib = bench.activation_mib(a)
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    res = run(mib, a.device, dtypes, a.layouts.split(","), use_compile=not a.no_compile)
    print("wrote", bench.write_json("channel_absmax", res, a.json, directory=RESULTS))


# ---- pytest-benchmark suite (python -m pytest benchmarks/bench_channel_absmax.py) ----
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("impl", ["sparsekern", "eager", "amax"])
def test_channel_absmax_64mib(benchmark, impl, layout):
    x = make_input(64, torch.float32, layout, "cpu")
    fn = {
        "sparsekern": lambda: sparsekern.channel_absmax(x),
        "eager": lambda: eager_absmax(x),
        "amax": lambda: x.amax((2, 3)),
    }[impl]
    benchmark.extra_info["bytes"] = x.numel() * 4
    benchmark(fn)


if __name__ == "__main__":
    main()
