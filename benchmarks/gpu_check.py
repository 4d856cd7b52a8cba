#!/usr/bin/env python
"""One GPU command: rebuild, validate every CUDA / Triton path against torch, and measure.

    python benchmarks/gpu_check.py [--out DIR] [--sections build,validate,bandwidth,analyze,speed]
    python benchmarks/gpu_check.py --dry-run          # the same code path on the CPU, tiny shapes (CI)

On the lent GPU machine (the device tool): one ``run`` call, timeout about 540 s, e.g.

    run(command="python benchmarks/gpu_check.py --out \"$OUT\" 2>&1 | tee \"$OUT/gpu_check.log\"; "
                "exit ${PIPESTATUS[0]}", timeout_s=540)

The ``build`` section (on by default on CUDA) runs ``SPARSEKERN_BUILD_EXT=1 pip install -q
--no-build-isolation --no-deps -e .`` itself, in a subprocess, before sparsekern is imported
(``sparsekern/_C*.so`` is git-ignored, so the device machine has no extension until then; a
separate ``pip install -e . &&`` before the script would only build it twice). ``SPARSEKERN_CUDA_ARCHS``
is set to the device's own arch (unless already set) to keep the build short; when pip fails,
``python setup.py build_ext --inplace`` is tried. Then copy ``$OUT/gpu_check-*.json`` into
benchmarks/results/ and commit it.

Sections, each with its own time budget (``--budget SECTION=SECONDS``; the whole run keeps to
``--time-budget``): a section whose budget runs out stops before its next item and records
``"cut": true`` and the items it skipped (an item already running is not interrupted).
  build      rebuild the extension; check that sparsekern._C loads with CUDA kernels for this arch
  validate   every backend (cuda, triton on a GPU; cpp, torch, and triton only under an already set
             TRITON_INTERPRET=1 on the CPU) against the references of python_tests/: channel_absmax
             (+count_positive), channel_extrema, bn_relu (functional, return_max, dead_mask, out=,
             write_dead=False, in place, when bn_relu has them), ChannelStats.update per selectivity
             mode and two-pass; ResNet stage shapes, 112x112x64, (N, C), odd H*W, unaligned views;
             fp32 / fp16 / bf16, NCHW / channels_last; NaN / -0.0 / subnormals; on a GPU also a tensor
             over 2^31 elements (when memory allows), a non-default stream, CUDA-graph capture of one
             call and no host sync (torch.cuda.set_sync_debug_mode("error")). Every check records
             pass / fail and its max error; a failure never stops the others.
  bandwidth  GB/s of channel_absmax and bn_relu (+max; out=) next to the measured copy bandwidth,
             torch eager and torch.compile of the eager code, at 64 and 512 MiB (interleaved timer)
  analyze    sparsekern.analyze (two-pass) per pass against plain eval of the same batches:
             torchvision ResNet-50 (random weights), batch 256, channels_last, fp32 and bf16 autocast
  speed      sparsekern.bench.speed_comparison: dense vs pruned (BN folded, channels_last) VGG-16
             (CIFAR-style, 32 px) and ResNet-50 (224 px) with dead filters planted (gamma = 0,
             beta = -1 in half the channels of every BN whose removal is exact), PrunePlan.from_gamma
             + prune_model, fp16 / bf16, batch 1 and 256, eager and (while the budget lasts) compiled

Writes ``<out>/gpu_check-<device>-<date>.json`` (``gpu_check-dryrun-...`` for --dry-run) with the
device, versions, date, every check and every measurement, prints a summary table, and exits 1 when
any check failed (2 when a section crashed outright is also recorded as a failed check).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the source tree's sparsekern, built in place, before any installed copy
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (sparsekern itself is imported only after the build section)

SECTIONS = ("build", "validate", "bandwidth", "analyze", "speed")
# Seconds per section on the GPU: the five sum to 460 s, under the 8 minutes of one device command.
GPU_BUDGETS = {"build": 100, "validate": 130, "bandwidth": 70, "analyze": 55, "speed": 105}
DRY_BUDGETS = {"build": 5, "validate": 25, "bandwidth": 15, "analyze": 15, "speed": 20}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------ bookkeeping
class Section:
    """One section's record: its checks, measurements, notes, and whether its budget cut it short."""

    def __init__(self, name: str, budget_s: float):
        self.name, self.budget_s = name, budget_s
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        self.checks: list[dict] = []
        self.measurements: list[dict] = []
        self.notes: list[str] = []
        self.skipped: list[str] = []
        self.cut = False

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def over(self, item: str) -> bool:
        """True (and the item recorded as skipped) when the budget is spent."""
        if time.perf_counter() < self.deadline:
            return False
        self.cut = True
        self.skipped.append(item)
        return True

    def check(self, name: str, fn) -> dict | None:
        """Run one check: fn() returns {"ok": bool, "max_err": float, ...} or raises (a failure)."""
        if self.over(name):
            return None
        t0 = time.perf_counter()
        try:
            result = dict(fn())
        except Exception as exc:  # a failing check must never stop the others
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500],
                      "traceback": traceback.format_exc(limit=4)[-1500:]}
        result.setdefault("max_err", None)
        result["ok"] = bool(result["ok"])
        record = {"name": name, "passed": result.pop("ok"), **result, "seconds": round(time.perf_counter() - t0, 4)}
        self.checks.append(record)
        return record

    def record(self, name: str, ok: bool, **extra) -> None:
        """A check whose work is already done (never cut by the budget)."""
        self.checks.append({"name": name, "passed": bool(ok), "max_err": None, **extra})

    def note(self, text: str) -> None:
        self.notes.append(text)

    def as_dict(self) -> dict:
        return {"budget_s": self.budget_s, "seconds": round(time.perf_counter() - self.start, 2), "cut": self.cut,
                "skipped": self.skipped, "notes": self.notes,
                "checks_passed": sum(c["passed"] for c in self.checks),
                "checks_failed": sum(not c["passed"] for c in self.checks),
                "checks": self.checks, "measurements": self.measurements}


class Context:
    """What every section needs: the device, the scale (GPU or dry run), the backends under test."""

    def __init__(self, args):
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry or not torch.cuda.is_available() else "cuda")
        self.cuda = self.device.type == "cuda"
        self.rounds = 2 if self.dry else args.rounds
        self.min_round_s = 0.002 if self.dry else 0.03
        # torch.compile on a GPU unless --no-compile; in the dry run only with --compile (inductor's CPU
        # compiles take tens of seconds on a small shared VM; the dry run times eager and notes the skip)
        self.compile = (not args.no_compile) and (args.compile or not self.dry)
        self.seed = 0
        self.build = False

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    def skip(self, backend: str, dtype: torch.dtype) -> bool:
        """The Triton interpreter (CPU) has no bf16 math: those cases are the GPU's."""
        return backend == "triton" and not self.cuda and dtype == torch.bfloat16

    def backends(self) -> list[str]:
        from sparsekern import _backend

        if self.cuda:
            return ["cuda", "triton"]  # both must be there on a GPU: an unavailable one fails its checks
        names = ["cpp", "torch"]
        if _backend.triton_interpret() and _backend.backend_supports("triton", self.device)[0]:
            names.append("triton")
        return names


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _float(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------------------ build
def section_build(ctx: Context, sec: Section) -> None:
    if not ctx.build:
        sec.note("not run: " + ("dry run" if ctx.dry else "--no-build"))
        return
    if not torch.cuda.is_available():
        sec.note("no CUDA device: nothing to rebuild for")
        return
    major, minor = torch.cuda.get_device_capability(0)
    arch = f"{major}{minor}"
    env = dict(os.environ, SPARSEKERN_BUILD_EXT="1")
    env.setdefault("SPARSEKERN_CUDA_ARCHS", arch)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 4))
    attempts = [[sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", str(ROOT)],
                [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]]
    built = None
    for cmd in attempts:
        left = sec.left()
        if left < 5:
            sec.over(" ".join(cmd))
            break
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
            rc, tail = r.returncode, (r.stdout + r.stderr)[-3000:]
        except subprocess.TimeoutExpired as exc:
            rc, tail = "timeout", str(exc)[-3000:]
            sec.cut = True
        sec.measurements.append({"command": " ".join(cmd[1:]), "returncode": rc,
                                 "seconds": round(time.perf_counter() - t0, 1), "output_tail": tail,
                                 "SPARSEKERN_CUDA_ARCHS": env["SPARSEKERN_CUDA_ARCHS"]})
        if rc == 0:
            built = cmd
            break
    sec.check("build: extension rebuilt for the device",
              lambda: {"ok": built is not None, "command": None if built is None else " ".join(built[1:])})

    def loaded():
        import sparsekern

        info = sparsekern.backends()
        ext = info["extension"] or {}
        archs = str(ext.get("cuda_archs", ""))
        ok = bool(ext) and bool(ext.get("cuda")) and arch in archs.replace(",", ";").split(";")
        return {"ok": ok, "cuda_archs": archs, "device_arch": arch, "extension_cuda": ext.get("cuda"),
                "available_cuda_backends": info["available"]["cuda"], "extension_error": info["extension_error"]}

    sec.check("build: sparsekern._C loads with CUDA kernels for this arch", loaded)


# ------------------------------------------------------------------------------ references and comparisons
def ref_extrema(x: torch.Tensor):
    """float64 (max |x|, min, max) and int64 positive counts per (n, c); NaN where a NaN was seen."""
    n, c = x.shape[0], x.shape[1]
    flat = x.detach().double().reshape(n, c, math.prod(x.shape[2:]))
    nan = torch.isnan(flat).any(dim=2)
    m, lo, hi = flat.abs().amax(dim=2), flat.amin(dim=2), flat.amax(dim=2)
    fill = torch.full_like(m, float("nan"))
    return (torch.where(nan, fill, m), torch.where(nan, fill, lo), torch.where(nan, fill, hi),
            (flat > 0).sum(dim=2))


def compare_exact(got: torch.Tensor, want: torch.Tensor, what: str) -> tuple[bool, float, str]:
    """(equal, max |diff| over finite values, why not): NaN exactly where want has NaN, -0 == +0."""
    got, want = got.double().to(want.device), want.double()
    if got.shape != want.shape:
        return False, math.inf, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    gn, wn = torch.isnan(got), torch.isnan(want)
    if not torch.equal(gn, wn):
        return False, math.inf, f"{what}: NaN at {int((gn != wn).sum())} wrong places"
    same = (got == want) | wn
    diff = torch.where(same, torch.zeros_like(got), (got - want).abs())
    err = float(diff.max()) if diff.numel() else 0.0
    if not bool(same.all()):
        return False, err, f"{what}: {int((~same).sum())} of {same.numel()} values differ"
    return True, err, ""


class Verdict:
    """Collects sub-comparisons of one check into {"ok", "max_err", "failures"}."""

    def __init__(self):
        self.ok, self.err, self.failures = True, 0.0, []

    def add(self, ok: bool, err: float, why: str = "") -> None:
        self.ok &= ok
        self.err = max(self.err, err)
        if not ok:
            self.failures.append(why)

    def exact(self, got, want, what) -> None:
        self.add(*compare_exact(got, want, what))

    def result(self, **extra) -> dict:
        return {"ok": self.ok, "max_err": _float(self.err) if self.err != math.inf else "inf",
                "failures": self.failures[:6], **extra}


def sample(shape, dtype, layout: str, device, seed: int) -> torch.Tensor:
    """Fresh random activations: mixed signs, a few all-zero and all-negative channels."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 2
    if len(shape) >= 2 and shape[1] > 3:
        x[:, ::5] = 0.0
        x[:, 3::7] = -x[:, 3::7].abs()
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def bn_params(c: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    scale, shift = torch.randn(c, generator=g), torch.randn(c, generator=g)
    dead = torch.rand(c, generator=g) < 0.4
    return scale.to(device), shift.to(device), dead.to(device)


def check_bn_relu_output(v: Verdict, y, m, x, scale, shift, dead, what: str) -> None:
    """The tolerance of python_tests/test_bn_relu_cuda.py: |y - ref| <= 1e-6 * |x * scale| + |shift|
    (+ one ulp of |ref| in half precision; fp32 must match to that bound), NaN where the reference has
    NaN, and m exactly the max of y per (n, c)."""
    from sparsekern.ops.bn_relu import bn_relu_reference

    ref_y = bn_relu_reference(x, scale, shift, dead, return_max=False)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    mag = torch.nan_to_num((x.double() * scale.double().reshape(shape)).abs() + shift.double().abs().reshape(shape))
    ulp = 0.0 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps
    err = (y.double() - ref_y.double()).abs()
    both_nan = torch.isnan(y) & torch.isnan(ref_y)
    within = (err <= 1e-6 * mag + ulp * ref_y.double().abs()) | both_nan
    e = float(torch.nan_to_num(torch.where(both_nan, 0.0, err), nan=math.inf).max()) if err.numel() else 0.0
    v.add(bool(within.all()) and torch.equal(torch.isnan(y), torch.isnan(ref_y)), e,
          f"{what}: y outside the tolerance at {int((~within).sum())} elements")
    if dead is not None and bool(dead.any()):
        dy = y.transpose(0, 1)[dead]
        v.add(bool((dy == 0).all()), 0.0 if bool((dy == 0).all()) else math.inf, f"{what}: dead channels not 0")
    if m is not None:
        flat = y.reshape(y.shape[0], y.shape[1], -1).float()
        want = flat.amax(2) if flat.shape[2] else torch.zeros(y.shape[:2], device=y.device)
        want = torch.where(torch.isnan(flat).any(2), torch.full_like(want, float("nan")), want)
        v.exact(m, want.double(), f"{what}: max")


def bn_relu_forms() -> dict:
    """Which keyword forms sparsekern.ops.bn_relu.bn_relu has (another agent may be adding them)."""
    import sparsekern.ops.bn_relu as mod

    params = inspect.signature(mod.bn_relu).parameters
    return {"out": "out" in params, "inplace": "inplace" in params, "write_dead": "write_dead" in params}


# ------------------------------------------------------------------------------ validate
def validate_channel_absmax(x: torch.Tensor, backend: str) -> dict:
    import sparsekern
    import sparsekern.ops.channel_absmax as ca

    v = Verdict()
    before = x.clone()
    want_m, want_lo, want_hi, want_pos = ref_extrema(x)
    m, pos = sparsekern.channel_absmax(x, count_positive=True, backend=backend)
    v.add(m.dtype == torch.float32 and pos.dtype == torch.int64 and m.device == x.device, 0.0, "dtype / device")
    v.exact(m, want_m, "absmax (count_positive=True)")
    v.exact(pos, want_pos.double(), "positive counts")
    v.exact(sparsekern.channel_absmax(x, backend=backend), want_m, "absmax")
    for count in (False, True):
        r = ca.channel_extrema(x, count_positive=count, backend=backend)
        v.exact(r.absmax, want_m, f"extrema absmax (count_positive={count})")
        v.exact(r.minimum, want_lo, "extrema min")
        v.exact(r.maximum, want_hi, "extrema max")
        if count:
            v.exact(r.positive, want_pos.double(), "extrema positive")
    v.add(torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num()), 0.0,
          "the input was modified")
    return v.result()


def validate_bn_relu(x: torch.Tensor, backend: str, seed: int, forms: dict) -> dict:
    import sparsekern.ops.bn_relu as br

    v = Verdict()
    scale, shift, dead = bn_params(x.shape[1], x.device, seed)
    for d in (None, dead):
        tag = "dead mask" if d is not None else "no mask"
        with torch.no_grad():
            y = br.bn_relu(x, scale, shift, d, backend=backend)
            check_bn_relu_output(v, y, None, x, scale, shift, d, f"functional, {tag}")
            y, m = br.bn_relu(x, scale, shift, d, return_max=True, backend=backend)
            check_bn_relu_output(v, y, m, x, scale, shift, d, f"return_max, {tag}")
            if forms["out"]:
                poisoned = torch.full_like(x, float("nan"))  # every element must be written
                y2, m2 = br.bn_relu(x, scale, shift, d, return_max=True, backend=backend, out=poisoned)
                v.exact(y2, y.double(), f"out=, {tag}")
                v.exact(m2, m.double(), f"out= max, {tag}")
                if forms["write_dead"]:
                    zeros = torch.zeros_like(x)
                    y3, m3 = br.bn_relu(x, scale, shift, d, return_max=True, backend=backend, out=zeros,
                                        write_dead=False)
                    v.exact(y3, y.double(), f"out= write_dead=False, {tag}")
                    v.exact(m3, m.double(), f"out= write_dead=False max, {tag}")
            if forms["inplace"]:
                xi = x.clone()
                yi, mi = br.bn_relu(xi, scale, shift, d, return_max=True, backend=backend, inplace=True)
                v.exact(xi, y.double(), f"in place, {tag}")
                v.add(yi is xi, 0.0, "in place returns x")
                v.exact(mi, m.double(), f"in place max, {tag}")
    return v.result()


SPECIAL = [float("nan"), -0.0, 0.0, 1.0, -1.0, float("inf"), -float("inf")]


def special_values(dtype, device, c=16, hw=(7, 7)) -> torch.Tensor:
    tiny = torch.finfo(dtype).tiny
    vals = torch.tensor([float("nan"), -0.0, 0.0, tiny / 4, -tiny / 4, tiny, 1.0, -1.0, -tiny / 2, 3.0],
                        dtype=torch.float32)
    n = 2 * c * hw[0] * hw[1]
    x = vals.repeat(n // vals.numel() + 1)[:n].reshape(2, c, *hw).to(device, dtype)
    x[:, 1] = -0.0  # a channel of only -0.0
    x[:, 2] = tiny / 4  # a channel of only subnormals (positive)
    x[:, 3] = 1.0
    return x


def validate_special_absmax(x: torch.Tensor, backend: str) -> dict:
    return validate_channel_absmax(x, backend)


def validate_special_bn_relu(x: torch.Tensor, backend: str) -> dict:
    """No flush-to-zero: subnormal * 1 + 0 stays subnormal, -0 -> +0, NaN stays NaN, bit for bit as torch."""
    import sparsekern.ops.bn_relu as br

    v = Verdict()
    c = x.shape[1]
    scale, shift = torch.ones(c, device=x.device), torch.zeros(c, device=x.device)
    with torch.no_grad():
        y, m = br.bn_relu(x, scale, shift, return_max=True, backend=backend)
    expected = br.bn_relu_reference(x, scale, shift)  # relu(x * 1 + 0): -0 comes out +0
    v.add(torch.equal(torch.isnan(y), torch.isnan(expected)), 0.0, "NaN positions")
    ok = ~torch.isnan(expected)
    bits = torch.int16 if x.dtype != torch.float32 else torch.int32
    same = torch.equal(y[ok].view(bits), expected[ok].view(bits))
    v.add(same, 0.0 if same else float((y[ok].double() - expected[ok].double()).abs().max()),
          "not bit-equal to the torch reference (-0 -> +0, subnormals kept)")
    sub = (x.float() > 0) & (x.float() < torch.finfo(x.dtype).tiny)
    v.add(bool((y.float()[sub] > 0).all()), 0.0, "a positive subnormal was flushed to zero")
    check_bn_relu_output(v, y, m, x, scale, shift, None, "special values")
    return v.result()


def validate_stats(x_batches, backend: str, mode: str) -> dict:
    """ChannelStats fed on ``backend`` equals the same fed on the torch reference: every tensor of
    the state (max, NaN / Inf / positive counts, range, histogram or stored maxima) and selectivity."""
    from sparsekern import ChannelStats

    v = Verdict()
    two_pass = mode == "two_pass"
    store = "none" if two_pass else mode
    tmp = tempfile.TemporaryDirectory() if store == "memmap" else None

    def make(b, name):
        path = os.path.join(tmp.name, f"{name}.f32") if tmp else None
        return ChannelStats(selectivity=store, backend=b, memmap_path=path)

    try:
        got, want = make(backend, "got"), make("torch", "want")
        if two_pass:
            first = make("torch", "first")
            for x in x_batches:
                first.update(x)
            ref = first.corpus_max.clone()  # the reference must be the corpus max of the same samples
            for s in (got, want):
                s.set_reference_max(ref, thresholds=(1e-3, 0.5))
        for x in x_batches:
            got.update(x)
            want.update(x)
        sg, sw = got.state_dict(), want.state_dict()
        for key, w in sw.items():
            if key == "memmap_path":
                continue
            g = sg.get(key)
            if isinstance(w, torch.Tensor):
                v.exact(g, w.double(), f"state {key}")
            else:
                v.add(g == w, 0.0, f"state {key}: {g!r} != {w!r}")
        if store != "none" or two_pass:
            for t in ((1e-3, 0.5) if two_pass else (1e-3,)):
                rg, rw = got.selectivity(t, on_nan="exclude"), want.selectivity(t, on_nan="exclude")
                v.exact(rg.value, rw.value, f"selectivity({t})")
                v.exact(rg.error_bound, rw.error_bound, f"selectivity({t}) error bound")
                v.add(rg.mode == rw.mode, 0.0, f"selectivity mode {rg.mode} != {rw.mode}")
        v.exact(got.apoz(on_nan="exclude"), want.apoz(on_nan="exclude").double(), "apoz")
        v.exact(got.dead_mask(on_nan="exclude").double(), want.dead_mask(on_nan="exclude").double(), "dead_mask")
        return v.result(num_samples=got.num_samples)
    finally:
        if tmp is not None:
            del got, want
            tmp.cleanup()


def shapes_for(ctx: Context) -> list[tuple]:
    if ctx.dry:
        return [(2, 16, 8, 8), (2, 12, 7, 7), (3, 9, 13, 13), (2, 8, 14, 14), (5, 40), (3, 7, 5, 3)]
    return [(8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14), (8, 2048, 7, 7), (4, 64, 112, 112),
            (256, 2048), (1000, 97), (4, 97, 13, 13), (3, 2048, 7, 7), (3, 97, 5, 3)]


def _label(shape) -> str:
    return "x".join(map(str, shape))


def section_validate(ctx: Context, sec: Section) -> None:
    from sparsekern import _backend
    from sparsekern.stats.channel_stats import MODES

    dev = ctx.device
    forms = bn_relu_forms()
    for form, present in forms.items():
        if not present:
            sec.note(f"bn_relu has no {form}= parameter: its {form} checks are skipped")
    backends = ctx.backends()
    sec.note(f"backends under test: {backends}")
    usable = []
    for b in backends:
        ok, why = _backend.backend_supports(b, dev)
        sec.check(f"backend {b} available on {dev.type}", lambda ok=ok, why=why: {"ok": ok, "why": why})
        if ok:
            usable.append(b)
    if ctx.cuda:  # first: the checks only a GPU can do, so that a budget cut never drops them
        for b in usable:
            gpu_only_checks(ctx, sec, b, forms)
    else:
        sec.note("large tensor, non-default stream, CUDA graph and host-sync checks need a GPU: not run")
    if any(ctx.skip(b, torch.bfloat16) for b in usable):
        sec.note("triton under TRITON_INTERPRET=1: bf16 cases skipped (the interpreter has no bf16 math)")
    for dname, dtype in DTYPES.items():
        for b in usable:
            if ctx.skip(b, dtype):
                continue
            # unaligned: an offset view, whose runs start off the vector width
            shape = (2, 2048, 7, 7) if ctx.cuda else (2, 24, 7, 7)
            flat = sample((math.prod(shape) + 3,), dtype, "contiguous", dev, ctx.next_seed())
            xo = flat[3:].view(shape)
            sec.check(f"channel_absmax[{b}] offset view {_label(shape)} {dname}",
                      lambda x=xo, b=b: validate_channel_absmax(x, b))
            sec.check(f"bn_relu[{b}] offset view {_label(shape)} {dname}",
                      lambda x=xo, b=b, s=ctx.next_seed(): validate_bn_relu(x, b, s, forms))
            xs = special_values(dtype, dev)
            sec.check(f"channel_absmax[{b}] NaN/-0/subnormal/inf {dname}", lambda x=xs, b=b: validate_special_absmax(x, b))
            xb = special_values(dtype, dev)
            xb = torch.where(torch.isinf(xb), torch.zeros_like(xb), xb)
            sec.check(f"bn_relu[{b}] NaN/-0/subnormal {dname}", lambda x=xb, b=b: validate_special_bn_relu(x, b))
            xl = special_values(dtype, dev).contiguous(memory_format=torch.channels_last)
            sec.check(f"channel_absmax[{b}] NaN/-0/subnormal/inf {dname} channels_last",
                      lambda x=xl, b=b: validate_special_absmax(x, b))
    for shape in shapes_for(ctx):  # backends innermost: a cut hits every backend alike
        for dname, dtype in DTYPES.items():
            for layout in (("contiguous", "channels_last") if len(shape) == 4 else ("contiguous",)):
                seed = ctx.next_seed()
                x = sample(shape, dtype, layout, dev, seed)
                for b in usable:
                    if ctx.skip(b, dtype):
                        continue
                    tag = f"[{b}] {_label(shape)} {dname} {layout}"
                    sec.check(f"channel_absmax{tag}", lambda x=x, b=b: validate_channel_absmax(x, b))
                    sec.check(f"bn_relu{tag}", lambda x=x, b=b, s=seed: validate_bn_relu(x, b, s, forms))
                del x
    stat_shapes = [(6, 96, 13, 13), (8, 2048, 7, 7), (64, 512)] if ctx.cuda else [(4, 12, 5, 5), (6, 10)]
    for mode in tuple(MODES) + ("two_pass",):
        for shape in stat_shapes:
            for dname in ("fp32", "bf16"):
                for layout in (("contiguous", "channels_last") if len(shape) == 4 else ("contiguous",)):
                    batches = [sample(shape, DTYPES[dname], layout, dev, ctx.next_seed()) for _ in range(2)]
                    batches[1][1, 2].view(-1)[0] = float("nan")  # one NaN sample in channel 2
                    for b in usable:
                        if ctx.skip(b, DTYPES[dname]):
                            continue
                        sec.check(f"ChannelStats.update[{b}] {mode} {_label(shape)} {dname} {layout}",
                                  lambda xs=batches, b=b, mode=mode: validate_stats(xs, b, mode))


# ---- GPU-only checks
def _absmax_call(b):
    import sparsekern

    return lambda x: sparsekern.channel_absmax(x, count_positive=True, backend=b)


def _bn_relu_call(b, scale, shift, dead):
    import sparsekern.ops.bn_relu as br

    return lambda x: br.bn_relu(x, scale, shift, dead, return_max=True, backend=b)


def _check_pair(v: Verdict, op_name: str, got, x, scale=None, shift=None, dead=None) -> None:
    if op_name == "channel_absmax":
        want_m, _, _, want_pos = ref_extrema(x)
        v.exact(got[0], want_m, "absmax")
        v.exact(got[1], want_pos.double(), "positive")
    else:
        check_bn_relu_output(v, got[0], got[1], x, scale, shift, dead, "bn_relu")


def gpu_only_checks(ctx: Context, sec: Section, b: str, forms: dict) -> None:
    dev = ctx.device
    shape, dtype = (8, 512, 28, 28), torch.bfloat16
    scale, shift, dead = bn_params(shape[1], dev, ctx.next_seed())
    ops = {"channel_absmax": _absmax_call(b), "bn_relu": _bn_relu_call(b, scale, shift, dead)}
    for op_name, op in ops.items():
        for layout in ("contiguous", "channels_last"):
            def stream_check(op=op, op_name=op_name, layout=layout):
                v = Verdict()
                x = sample(shape, dtype, layout, dev, ctx.next_seed())
                xs = torch.full_like(x, float("nan"))  # what a kernel on the wrong stream would read
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    torch.cuda._sleep(50_000_000)  # tens of ms: a kernel on the default stream runs first
                    xs.copy_(x)
                    with torch.no_grad():
                        got = op(xs)
                torch.cuda.current_stream(dev).wait_stream(side)
                _sync(dev)
                _check_pair(v, op_name, got, x, scale, shift, dead)
                return v.result()

            sec.check(f"{op_name}[{b}] non-default stream {layout}", stream_check)

            def graph_check(op=op, op_name=op_name, layout=layout):
                v = Verdict()
                static = sample(shape, dtype, layout, dev, ctx.next_seed())
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side), torch.no_grad():
                    for _ in range(2):
                        op(static)
                torch.cuda.current_stream(dev).wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(g):
                    out = op(static)
                fresh = sample(shape, dtype, layout, dev, ctx.next_seed())
                static.copy_(fresh)
                g.replay()
                _sync(dev)
                _check_pair(v, op_name, out, fresh, scale, shift, dead)
                return v.result()

            sec.check(f"{op_name}[{b}] CUDA graph capture + replay {layout}", graph_check)

    def no_sync_check():
        import sparsekern
        import sparsekern.ops.channel_absmax as ca
        import sparsekern.ops.bn_relu as br
        from sparsekern import ChannelStats

        x = sample(shape, dtype, "channels_last", dev, ctx.next_seed())
        calls = {"channel_absmax": lambda: sparsekern.channel_absmax(x, count_positive=True, backend=b),
                 "channel_extrema": lambda: ca.channel_extrema(x, count_positive=True, backend=b),
                 "bn_relu": lambda: br.bn_relu(x, scale, shift, dead, return_max=True, backend=b)}
        if forms["out"]:
            y = torch.empty_like(x)
            calls["bn_relu out="] = lambda: br.bn_relu(x, scale, shift, dead, return_max=True, backend=b, out=y)
        for mode in ("histogram", "none"):
            s = ChannelStats(selectivity=mode, backend=b)
            s.update(x)  # the first update allocates the state
            calls[f"ChannelStats.update[{mode}]"] = lambda s=s: s.update(x)
        tp = ChannelStats(selectivity="none", backend=b)
        tp.set_reference_max(torch.ones(shape[1], device=dev), thresholds=(1e-3,))
        tp.update(x)
        calls["ChannelStats.update[two_pass]"] = lambda: tp.update(x)
        failures = []
        for name, fn in calls.items():
            fn()  # warm (Triton compiles, allocator) outside the guarded call
            _sync(dev)
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.no_grad():
                    fn()
            except Exception as exc:
                failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
            finally:
                torch.cuda.set_sync_debug_mode(0)
        _sync(dev)
        return {"ok": not failures, "max_err": 0.0, "failures": failures, "calls": list(calls)}

    sec.check(f"no host sync [{b}] (set_sync_debug_mode('error'))", no_sync_check)

    def large_check(op_name):
        free, _ = torch.cuda.mem_get_info(dev)
        c, length = 8, (1 << 27) + 17  # 2 * 8 * (2^27 + 17) = 2^31 + 272 elements of fp16 (4.3 GB)
        numel = 2 * c * length
        need = numel * 2 * (6 if op_name == "channel_absmax" else 10)
        if free < need:
            return {"ok": True, "max_err": None, "skipped": f"{free / 2**30:.1f} GiB free, {need / 2**30:.1f} needed"}
        v = Verdict()
        g = torch.Generator(device=dev).manual_seed(ctx.next_seed())
        x = torch.empty(2, c, length, device=dev, dtype=torch.float16).uniform_(-1, 1, generator=g)
        x[1, 7, -1] = 3.0  # past element 2^31: a kernel indexing with int32 misses or misplaces these
        x[1, 3, -5] = -4.0
        x[1, 6, length // 2] = float("nan")
        if op_name == "channel_absmax":
            import sparsekern

            m, pos = sparsekern.channel_absmax(x, count_positive=True, backend=b)
            for i in range(2):
                for j in range(c):
                    row = x[i, j].float()
                    want = row.abs().amax()
                    v.exact(m[i, j], want.double(), f"absmax [{i}, {j}]")
                    v.exact(pos[i, j], (row > 0).sum().double(), f"positive [{i}, {j}]")
            del x
            torch.cuda.empty_cache()
            return v.result(numel=numel)
        s, sh, d = bn_params(c, dev, ctx.next_seed())
        import sparsekern.ops.bn_relu as br

        with torch.no_grad():
            y, m = br.bn_relu(x, s, sh, d, return_max=True, backend=b)
        for i in range(2):
            for j in range(c):
                xr = x[i : i + 1, j : j + 1]
                check_bn_relu_output(v, y[i : i + 1, j : j + 1], m[i : i + 1, j : j + 1], xr, s[j : j + 1],
                                     sh[j : j + 1], d[j : j + 1], f"row [{i}, {j}]")
        del x, y
        torch.cuda.empty_cache()
        return v.result(numel=numel)

    for op_name in ("channel_absmax", "bn_relu"):
        sec.check(f"{op_name}[{b}] over 2^31 elements (fp16, 2x8x(2^27+17))", lambda o=op_name: large_check(o))


# ------------------------------------------------------------------------------ bandwidth
def section_bandwidth(ctx: Context, sec: Section) -> None:
    import sparsekern
    import sparsekern.bench as bench
    import sparsekern.ops.bn_relu as br

    dev = ctx.device
    backends = [b for b in ctx.backends() if b != "torch" and sparsekern._backend.backend_supports(b, dev)[0]]
    forms = bn_relu_forms()
    sizes = (1, 4) if ctx.dry else (64, 512)
    channels, side = (32, 16) if ctx.dry else (256, 56)

    def eager_absmax(x):
        return x.abs().amax((2, 3))

    def eager_bn_relu_max(x, s, b):
        y = torch.relu(x * s.view(1, -1, 1, 1).to(x.dtype) + b.view(1, -1, 1, 1).to(x.dtype))
        return y, y.amax((2, 3))

    compiled = {}
    if ctx.compile:
        compiled = {"absmax": torch.compile(eager_absmax, dynamic=False),
                    "bn_relu": torch.compile(eager_bn_relu_max, dynamic=False)}
    copy_bws = {}
    cases = [(sizes[0], "contiguous"), (sizes[1], "contiguous"), (sizes[1], "channels_last"), (sizes[0], "channels_last")]
    for mib, layout in cases:
        item = f"{mib} MiB {layout}"
        if sec.over(item):
            continue
        nbytes = mib << 20
        if mib not in copy_bws:
            copy_bws[mib] = bench.copy_bandwidth(nbytes, dev)
            sec.measurements.append({"what": "copy bandwidth", "mib": mib, "GBps": copy_bws[mib]})
        copy_bw = copy_bws[mib]
        n = max(1, nbytes // (channels * side * side * 4))
        x = sample((n, channels, side, side), torch.float32, layout, dev, ctx.next_seed())
        xbytes = x.numel() * x.element_size()
        scale, shift, dead = bn_params(channels, dev, ctx.next_seed())
        y_out = torch.empty_like(x)
        y_copy = torch.empty_like(x)
        cands = {"copy (yardstick)": lambda: y_copy.copy_(x), "x.amax (yardstick)": lambda: x.amax((2, 3))}
        for b in backends:
            cands[f"channel_absmax[{b}]"] = lambda b=b: sparsekern.channel_absmax(x, backend=b)
            cands[f"bn_relu[{b}]+max"] = lambda b=b: br.bn_relu(x, scale, shift, None, return_max=True, backend=b)
            if forms["out"]:
                cands[f"bn_relu[{b}] out=+max"] = lambda b=b: br.bn_relu(x, scale, shift, None, return_max=True,
                                                                         backend=b, out=y_out)
        cands["eager abs().amax"] = lambda: eager_absmax(x)
        cands["eager bn+relu+amax"] = lambda: eager_bn_relu_max(x, scale, shift)
        for key, fn in compiled.items():
            name = "torch.compile abs().amax" if key == "absmax" else "torch.compile bn+relu+amax"
            try:
                with torch.no_grad():
                    (fn(x) if key == "absmax" else fn(x, scale, shift))
                cands[name] = (lambda fn=fn: fn(x)) if key == "absmax" else (lambda fn=fn: fn(x, scale, shift))
            except Exception as exc:
                sec.note(f"{name} unavailable at {item}: {type(exc).__name__}: {str(exc)[:200]}")
        with torch.no_grad():
            timing = bench.interleaved_timer(cands, device=dev, rounds=ctx.rounds, min_round_s=ctx.min_round_s)
        compiled_t = {"channel_absmax": timing.get("torch.compile abs().amax"),
                      "bn_relu": timing.get("torch.compile bn+relu+amax")}
        for name, t in timing.items():
            moved = xbytes * (2 if ("bn" in name or "copy" in name) else 1)  # read x (+ write y)
            gbps = moved / t["median_s"] / 1e9
            row = {"case": item, "shape": list(x.shape), "dtype": "float32", "candidate": name, "bytes_moved": moved,
                   **bench.milliseconds(t), "GBps": gbps, "pct_of_copy_bw": 100 * gbps / copy_bw}
            op = name.split("[")[0] if "[" in name else None
            if op in compiled_t and compiled_t[op] is not None:  # < 1: faster than torch.compile of the eager code
                row["time_vs_compile"] = t["median_s"] / compiled_t[op]["median_s"]
            sec.measurements.append(row)
        del x, y_out, y_copy
    if not ctx.compile:
        sec.note("torch.compile not timed (" + ("dry run without --compile" if ctx.dry else "--no-compile") + ")")


# ------------------------------------------------------------------------------ analyze
def _resnet(name: str, num_classes: int = 1000):
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)


class _Corpus:
    """A re-iterable loader of a few fixed batches already on the device (two-pass needs re-iteration)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def section_analyze(ctx: Context, sec: Section) -> None:
    import sparsekern

    dev = ctx.device
    name, px, batch, count = ("resnet18", 32, 2, 1) if ctx.dry else ("resnet50", 224, 256, 6)
    torch.manual_seed(0)
    model = _resnet(name).eval().to(dev, memory_format=torch.channels_last)
    g = torch.Generator(device=dev).manual_seed(ctx.next_seed())
    batches = [torch.randn(batch, 3, px, px, device=dev, generator=g).contiguous(memory_format=torch.channels_last)
               for _ in range(count)]
    corpus = _Corpus(batches)
    reps = 1 if ctx.dry else 2
    for label, amp in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        item = f"{name} {label}"
        if sec.over(item):
            continue

        def plain():
            with torch.no_grad(), (torch.autocast(dev.type, dtype=amp) if amp else contextlib.nullcontext()):
                for x in batches:
                    model(x)

        def analysed():
            return sparsekern.analyze(model, corpus, device=dev, amp_dtype=amp, progress=False)

        try:
            if not ctx.dry:  # warm-up: kernel compiles, cuDNN plans, tracker set-up
                plain()
                analysed()
            plain_s, per_pass_s = [], []
            for _ in range(reps):  # interleaved: plain, analyze, plain, analyze...
                _sync(dev)
                t0 = time.perf_counter()
                plain()
                _sync(dev)
                plain_s.append(time.perf_counter() - t0)
                result = analysed()  # its own wall clock (set-up, every pass, the report) over its passes
                _sync(dev)
                per_pass_s.append(result.seconds / result.passes)
            plain_med, pass_med = sorted(plain_s)[len(plain_s) // 2], sorted(per_pass_s)[len(per_pass_s) // 2]
            layers = len(result.features)
            sec.measurements.append({"model": name, "precision": label, "batch": batch, "batches": count,
                                     "image_px": px, "channels_last": True, "plain_eval_s": plain_med,
                                     "analyze_per_pass_s": pass_med, "per_pass_over_plain": pass_med / plain_med,
                                     "speed_vs_plain": plain_med / pass_med, "repeats": reps, "features": layers,
                                     "passes": result.passes, "images_per_second": result.images_per_second,
                                     "plain_all_s": plain_s, "per_pass_all_s": per_pass_s})
            sec.record(f"analyze {item} ran", True)
        except Exception as exc:
            sec.record(f"analyze {item} ran", False, error=f"{type(exc).__name__}: {exc}"[:500])


# ------------------------------------------------------------------------------ speed
def plant_dead_filters(model, fraction: float = 0.5, seed: int = 0) -> list[str]:
    """gamma = 0, beta = -1 (relu(-1) = 0: dead) in ``fraction`` of the channels of every BN whose
    removal is exact: every BN of the sparsekern models' Conv-BN-ReLU units; in torchvision ResNets the
    bn1 / bn2 of each block (bn3 and the downsample BN feed the residual add, tied across the stage,
    and the stem's BN feeds layer1's adds)."""
    from torch import nn

    resnet = hasattr(model, "layer1")
    names = []
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, nn.BatchNorm2d):
                continue
            if resnet and not (name.startswith("layer") and name.rsplit(".", 1)[-1] in ("bn1", "bn2")):
                continue
            dead = torch.randperm(m.num_features, generator=g)[: int(round(fraction * m.num_features))]
            m.weight[dead] = 0.0
            m.bias[dead] = -1.0
            names.append(name)
    return names


def dense_and_pruned(name: str, px: int, ctx: Context, sec: Section):
    from sparsekern.models import BasicNet, vgg16_bn
    from sparsekern.prune import PrunePlan, prune_model

    torch.manual_seed(0)
    if name == "basicnet":
        model = BasicNet(in_channels=3, width=0.25)
    elif name == "vgg16":
        model = vgg16_bn(in_channels=3, num_classes=10)
    else:
        model = _resnet(name)
    model.eval()
    planted = plant_dead_filters(model)
    shape = (3, px, px)
    plan = PrunePlan.from_gamma(model, 1e-3, input_shape=(1,) + shape)
    example = torch.randn((2 if ctx.dry else 4,) + shape, generator=torch.Generator().manual_seed(1))
    pruned, report = prune_model(model, plan, example_inputs=example)  # verified node by node on the CPU
    total = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    sec.measurements.append({"model": name, "what": "pruning", "bns_planted": len(planted),
                             "channels_removed": plan.num_removed, "bn_channels": total,
                             "removed_fraction": plan.num_removed / total, "notes": list(plan.notes)[:5]})
    return model, pruned, shape


def section_speed(ctx: Context, sec: Section) -> None:
    import sparsekern.bench as bench

    dev = ctx.device
    if ctx.dry:
        models, dtypes, batches = [("basicnet", 16), ("resnet18", 32)], (torch.float32,), (1, 2)
    else:
        models, dtypes, batches = [("vgg16", 32), ("resnet50", 224)], (torch.float16, torch.bfloat16), (1, 256)
    pairs = {}
    for name, px in models:
        if sec.over(f"prune {name}"):
            continue
        try:
            pairs[name] = dense_and_pruned(name, px, ctx, sec)
            sec.record(f"speed: {name} pruned exactly (prune_model verified)", True)
        except Exception as exc:
            sec.record(f"speed: {name} pruned exactly (prune_model verified)", False,
                       error=f"{type(exc).__name__}: {exc}"[:500])
    log = lambda line: print(f"  [speed] {line}", flush=True)  # noqa: E731
    jobs = [(n, d, batches, False) for n in pairs for d in dtypes]  # eager first: every row
    if ctx.compile:  # then compiled, largest batch first, while the budget lasts
        jobs += [(n, d, (b,), True) for b in sorted(batches, reverse=True) for d in dtypes for n in pairs]
    if not ctx.compile:
        sec.note("compiled models not timed (" + ("dry run without --compile" if ctx.dry else "--no-compile") + ")")
    for name, dtype, bs, comp in jobs:
        dname = str(dtype).replace("torch.", "")
        item = f"{name} {dname} batch {','.join(map(str, bs))} {'compile' if comp else 'eager'}"
        if sec.over(item):
            continue
        if comp and not ctx.dry and sec.left() < (60 if name == "resnet50" else 25):
            sec.cut = True
            sec.skipped.append(f"{item} (under a compile's expected time left)")
            continue
        dense, pruned, shape = pairs[name]
        try:
            r = bench.speed_comparison(dense, pruned, shape, batch_sizes=bs, device=dev, dtype=dtype, compile=comp,
                                       fused=not comp, rounds=ctx.rounds, subnormal_row=False, log=log)
        except Exception as exc:
            sec.record(f"speed: {item} ran", False, error=f"{type(exc).__name__}: {exc}"[:500])
            continue
        for row in r["rows"]:
            if comp and row["mode"] != "compile":
                continue  # the eager rows of a compile job repeat the eager job's
            sec.measurements.append({"model": name, "dtype": dname, **row})
        if comp:
            sec.measurements.append({"model": name, "dtype": dname, "compile_status": r["compile"]})


# ------------------------------------------------------------------------------ main
RUNNERS = {"build": section_build, "validate": section_validate, "bandwidth": section_bandwidth,
           "analyze": section_analyze, "speed": section_speed}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, backends cpp / torch, no build")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--build", dest="build", action="store_true", default=None, help="rebuild first (default on CUDA)")
    p.add_argument("--no-build", dest="build", action="store_false")
    p.add_argument("--no-compile", action="store_true", help="do not time torch.compile")
    p.add_argument("--compile", action="store_true", help="time torch.compile in the dry run too")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory of the JSON")
    p.add_argument("--rounds", type=int, default=11, help="interleaved timing rounds on the GPU (dry run: 2)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (GPU 470, dry 90)")
    p.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    return args


def _versions() -> dict:
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": version("triton"),
            "torchvision": version("torchvision"), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}


def _summary_rows(payload: dict) -> list[str]:
    lines = [f"{'section':10s} {'s':>6s} {'budget':>6s} {'cut':>4s} {'pass':>5s} {'fail':>5s}  notes"]
    for name, s in payload["sections"].items():
        lines.append(f"{name:10s} {s['seconds']:6.1f} {s['budget_s']:6.0f} {'yes' if s['cut'] else '':>4s} "
                     f"{s['checks_passed']:5d} {s['checks_failed']:5d}  {'; '.join(s['notes'])[:90]}")
    bw = payload["sections"].get("bandwidth", {}).get("measurements", [])
    rows = [m for m in bw if "candidate" in m]
    if rows:
        lines.append("")
        lines.append(f"{'bandwidth case':26s} {'candidate':30s} {'ms':>8s} {'GB/s':>8s} {'% copy':>7s}")
        for m in rows:
            lines.append(f"{m['case']:26s} {m['candidate']:30s} {m['median_ms']:8.3f} {m['GBps']:8.1f} "
                         f"{m['pct_of_copy_bw']:7.1f}")
    for m in payload["sections"].get("analyze", {}).get("measurements", []):
        lines.append(f"analyze {m['model']} {m['precision']}: per pass {1e3 * m['analyze_per_pass_s']:.1f} ms, "
                     f"plain eval {1e3 * m['plain_eval_s']:.1f} ms: {m['speed_vs_plain']:.3f}x plain-eval speed")
    for m in payload["sections"].get("speed", {}).get("measurements", []):
        if "speedup" in m:
            lines.append(f"speed {m['model']:9s} {m['dtype']:8s} {m['mode']:7s} b{m['batch']:<4d} dense "
                         f"{m['dense ms']:8.3f} ms pruned {m['pruned ms']:8.3f} ms speedup {m['speedup']:.2f}x, FLOP "
                         f"ratio {m['flop_ratio']:.2f}x, time saved {100 * m['time_saved']:.1f}% / FLOPs saved "
                         f"{100 * m['flops_saved']:.1f}%")
    failed = payload["failed_checks"]
    lines.append("")
    lines.append(f"checks: {payload['checks_passed']} passed, {len(failed)} failed")
    for f in failed[:40]:
        lines.append(f"  FAILED {f['section']}: {f['name']}: {f.get('error') or '; '.join(f.get('failures') or [])}"[:240])
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = Context(args)
    budgets = dict(DRY_BUDGETS if ctx.dry else GPU_BUDGETS)
    for spec in args.budget:
        key, _, value = spec.partition("=")
        if key not in SECTIONS:
            raise SystemExit(f"--budget: unknown section {key!r}")
        budgets[key] = float(value)
    total = args.time_budget if args.time_budget is not None else (90.0 if ctx.dry else 470.0)
    ctx.build = (args.build if args.build is not None else ctx.cuda) and not ctx.dry
    sections = args.sections
    start = time.perf_counter()
    payload = {"script": "benchmarks/gpu_check.py", "argv": list(argv if argv is not None else sys.argv[1:]),
               "dry_run": ctx.dry, "device": str(ctx.device),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "versions": _versions(), "time_budget_s": total, "section_budgets_s": budgets, "sections": {}}
    if ctx.cuda:
        payload["device_name"] = torch.cuda.get_device_name(0)
        payload["device_capability"] = list(torch.cuda.get_device_capability(0))
    for name in sections:
        left = total - (time.perf_counter() - start)
        sec = Section(name, max(0.0, min(budgets[name], left)))
        print(f"== {name} (budget {sec.budget_s:.0f} s)", flush=True)
        if sec.budget_s <= 0:
            sec.cut = True
            sec.skipped.append("whole section: the run's time budget is spent")
        else:
            try:
                RUNNERS[name](ctx, sec)
            except Exception as exc:  # a crashed section is a failed check, and the next section still runs
                sec.checks.append({"name": f"{name}: section crashed", "passed": False,
                                   "error": f"{type(exc).__name__}: {exc}"[:500],
                                   "traceback": traceback.format_exc(limit=6)[-2000:], "max_err": None})
        payload["sections"][name] = sec.as_dict()
        s = payload["sections"][name]
        print(f"   {s['checks_passed']} passed, {s['checks_failed']} failed, {s['seconds']:.1f} s"
              + (", CUT by its budget" if s["cut"] else ""), flush=True)
    from sparsekern.bench import timing_environment, write_json

    payload["environment"] = timing_environment(ctx.device)
    payload["backends"] = payload["environment"].get("backends")
    failed = [{"section": n, **c} for n, s in payload["sections"].items() for c in s["checks"] if not c["passed"]]
    payload["checks_passed"] = sum(s["checks_passed"] for s in payload["sections"].values())
    payload["failed_checks"] = [{k: f.get(k) for k in ("section", "name", "error", "failures", "max_err")} for f in failed]
    payload["passed"] = not failed
    payload["seconds"] = round(time.perf_counter() - start, 1)
    path = write_json("gpu_check-dryrun" if ctx.dry else "gpu_check", payload, directory=args.out)
    print()
    print("\n".join(_summary_rows(payload)))
    print(f"\n{'PASSED' if not failed else 'FAILED'} in {payload['seconds']:.0f} s; wrote {path}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
