"""The portable build of sparsekern._C (runtime CPU dispatch) against a -march=native build.

    python benchmarks/bench_build_variants.py [--threads N] [--mib 64] [--rounds 41] [--build-dir DIR] [--json PATH]

Builds the extension twice from this source tree, SPARSEKERN_NATIVE=0 (the default: baseline,
AVX2 and AVX-512 variants of the CPU kernels, one picked at load) and SPARSEKERN_NATIVE=1
(everything -march=native), both without CUDA, into --build-dir (a temporary directory unless
given; a kept one makes reruns incremental). Both modules are then loaded side by side in this
process and their kernel entry points are called on the same tensors:

  channel_absmax  NCHW and channels_last, fp32, the README's 64 MiB shape 128x128x32x32
  bn_relu + max   the same inputs, into a preallocated y (no allocation timed)

For the portable build each variant this CPU runs is timed too (forced with set_cpu_isa): what a
CPU without AVX-512 or without AVX2 gets. Every candidate is timed in each of --rounds rounds,
back to back, in an order that rotates from round to round; a candidate's figure against native
is the median over rounds of its time / native's time in the same round, so load that drifts
slower than a round cancels. Each sample records the wall time and the process CPU time: with
--threads 1 the CPU time leaves out the time the process was descheduled, which on a machine
shared with other jobs is most of the noise. The acceptance figure is portable (the variant the
dispatch picks) / native, per case: at most 1.05.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import sparsekern.bench as bench

from sparsekern._layout import DTYPE_CODE, as_view4

RESULTS = Path(__file__).resolve().parent / "results"  # where bench.write_json puts the JSON

ROOT = Path(__file__).resolve().parents[1]
SHAPE_64MIB = (128, 128, 32, 32)
LIMIT = 1.05
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def build(kind: str, build_dir: Path) -> Path:
    """Build sparsekern._C with SPARSEKERN_NATIVE=0 (portable) or 1 (native); return the .so path."""
    lib, temp = build_dir / kind / "lib", build_dir / kind / "temp"
    env = dict(os.environ, SPARSEKERN_NATIVE="1" if kind == "native" else "0", SPARSEKERN_CUDA="0",
               SPARSEKERN_BUILD_EXT="1")
    env.pop("SPARSEKERN_CPU_ISA", None)
    print(f"building the {kind} extension into {lib} ...", flush=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp", str(temp)],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    (so,) = (lib / "sparsekern").glob("_C*.so")
    return so


def load(so: Path, kind: str):
    """Import one build under its own name (sparsekern_<kind>._C), so that both can be loaded at once."""
    spec = importlib.util.spec_from_file_location(f"sparsekern_{kind}._C", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernels(ext, isa: str | None, x: torch.Tensor, scale, shift, y, out_max) -> dict:
    """The two kernel calls of one build (forcing variant `isa` first when given)."""
    _, vx = as_view4(x)
    _, vy = as_view4(y)
    code = DTYPE_CODE[x.dtype]

    def absmax():
        if isa:
            ext.set_cpu_isa(isa)
        ext.channel_absmax_cpu(x.data_ptr(), code, *vx.args(), out_max.data_ptr(), 0)

    def bn_relu():
        if isa:
            ext.set_cpu_isa(isa)
        ext.bn_relu_cpu(x.data_ptr(), code, *vx.args(), scale.data_ptr(), shift.data_ptr(), 0, y.data_ptr(),
                        vy.sn, vy.sc, vy.sr, vy.sl, out_max.data_ptr())

    return {"channel_absmax": absmax, "bn_relu+max": bn_relu}


def paired_rounds(candidates: dict[str, Callable[[], None]], rounds: int, min_round_s: float = 0.05,
                  warmup: int = 2) -> dict[str, dict[str, list[float]]]:
    """Seconds per call, by clock, of every candidate in every round; each round starts one candidate later."""
    reps = {}
    for name, fn in candidates.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, int(min_round_s / max(time.perf_counter() - t0, 1e-7)))
    names = list(candidates)
    samples = {name: {clock: [] for clock in CLOCKS} for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = {clock: read() for clock, read in CLOCKS.items()}
            for _ in range(reps[name]):
                candidates[name]()
            for clock, read in CLOCKS.items():
                samples[name][clock].append((read() - start[clock]) / reps[name])
    return samples


def summarise(op: str, layout: str, name: str, picked: bool, s: dict, native: dict, nbytes: int) -> dict:
    row = {"op": op, "layout": layout, "candidate": name, "picked": picked}
    for clock in CLOCKS:
        q = statistics.quantiles(s[clock], n=10)
        ratios = statistics.quantiles([a / b for a, b in zip(s[clock], native[clock])], n=10)
        row[f"{clock}_ms"] = statistics.median(s[clock]) * 1e3
        row[f"{clock}_p20_ms"], row[f"{clock}_p80_ms"] = q[1] * 1e3, q[7] * 1e3
        row[f"{clock}_vs_native"] = statistics.median(a / b for a, b in zip(s[clock], native[clock]))
        row[f"{clock}_vs_native_p20"], row[f"{clock}_vs_native_p80"] = ratios[1], ratios[7]
    row["GBps"] = nbytes / (row["wall_ms"] / 1e3) / 1e9
    return row


def run(mib: int, rounds: int, build_dir: Path) -> dict:
    portable = load(build(build_dir=build_dir, kind="portable"), "portable")
    native = load(build(build_dir=build_dir, kind="native"), "native")
    picked = portable.cpu_isa()
    shape = SHAPE_64MIB if mib == 64 else (max(1, (mib << 20) // (4 * 128 * 32 * 32)), 128, 32, 32)
    results = {
        "environment": bench.timing_environment(torch.device("cpu")),
        "builds": {"portable": dict(portable.build_info(), cpu_isa=picked),
                   "native": dict(native.build_info(), cpu_isa=native.cpu_isa())},
        "mib": mib, "shape": list(shape), "rounds": rounds, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cases": [],
    }
    rows = []
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        x = torch.randn(shape)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        n, c = shape[:2]
        scale, shift = torch.rand(c) + 0.5, torch.randn(c)
        y, out_max = torch.empty_like(x), torch.empty(n, c)
        builds = {"native": kernels(native, None, x, scale, shift, y, out_max)}
        for isa in portable.cpu_isas_supported():
            builds[f"portable[{isa}]"] = kernels(portable, isa, x, scale, shift, y, out_max)
        for op in ("channel_absmax", "bn_relu+max"):
            samples = paired_rounds({name: fns[op] for name, fns in builds.items()}, rounds)
            nbytes = x.numel() * x.element_size() * (2 if op == "bn_relu+max" else 1)  # bn_relu writes y too
            for name, s in samples.items():
                rows.append(summarise(op, layout, name, name == f"portable[{picked}]", s, samples["native"], nbytes))
    portable.set_cpu_isa("auto")
    results["cases"] = rows
    verdict = [r for r in rows if r["picked"]]
    clock = "cpu" if os.environ.get("OMP_NUM_THREADS") == "1" else "wall"
    results["acceptance_clock"] = clock
    results["portable_vs_native"] = {f"{r['op']} {r['layout']}": r[f"{clock}_vs_native"] for r in verdict}
    results["within_5pct"] = all(r[f"{clock}_vs_native"] <= LIMIT for r in verdict)
    env = results["environment"]
    print(f"device: {env['device_name']}  torch {env['torch']}  compiler {results['builds']['portable']['compiler']}  "
          f"OMP_NUM_THREADS={results['omp_num_threads']}  portable build picked {picked} of "
          f"{portable.cpu_isas_supported()}")
    bench.print_table(rows, ["op", "layout", "candidate", "wall_ms", "wall_p20_ms", "wall_p80_ms", "GBps",
                               "wall_vs_native", "cpu_ms", "cpu_vs_native", "cpu_vs_native_p20", "cpu_vs_native_p80"])
    worst = max(results["portable_vs_native"].values())
    print(f"portable ({picked}) / native by {clock} time: worst case {worst:.3f} "
          f"({'within' if results['within_5pct'] else 'NOT within'} {LIMIT - 1:.0%})")
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads of the kernels (default: OpenMP's); 1 makes the CPU-time figures exact")
    p.add_argument("--mib", type=int, default=64, help="fp32 tensor size in MiB (default 64: 128x128x32x32)")
    p.add_argument("--rounds", type=int, default=41, help="interleaved timing rounds per case")
    p.add_argument("--build-dir", default=None, help="where to build both extensions (default: a temporary dir)")
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/...)")
    a = p.parse_args(argv)
    if a.threads is not None and os.environ.get("OMP_NUM_THREADS") != str(a.threads):
        # OpenMP reads OMP_NUM_THREADS once, when the extension first loads it: start again with it set.
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
    if a.build_dir:
        res = run(a.mib, a.rounds, Path(a.build_dir).resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="sparsekern-builds-") as tmp:
            res = run(a.mib, a.rounds, Path(tmp))
    suffix = f"-{a.threads}threads" if a.threads else ""
    print("wrote", bench.write_json(f"build_variants{suffix}", res, a.json, directory=RESULTS))


if __name__ == "__main__":
    main()
