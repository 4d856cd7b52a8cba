"""Dense versus pruned inference speed, and what counts as a speedup.

:func:`speed_comparison` times the dense and the pruned model side by side, both with BN folded
into the convs and channels_last, plus the dense model with fused BN-ReLU kernels, eager and
torch.compile, at batch 1 (latency) and a large batch (throughput), with the criterion

    1 - t_pruned / t_dense >= SPEED_CRITERION * (1 - flops_pruned / flops_dense)

:func:`repeat_summary` judges that criterion over repeated runs (``sparsekern bench --repeat``).
Every copy timed is made by :func:`inference_model`, with subnormal weights set to zero.
"""
from __future__ import annotations

import copy
import statistics
from typing import Callable, Optional

import torch
from torch import nn

from sparsekern._denormals import subnormal_count, subnormal_mask
from sparsekern.bench.environment import timing_environment
from sparsekern.bench.timing import time_models
from sparsekern.models import ConvBNReLU
from sparsekern.ops.bn_relu import FusedBNReLU, fuse_bn_relu
from sparsekern.prune.flops import count_flops
from sparsekern.prune.fold import fold_bn

SPEED_CRITERION = 0.7  # time saved must reach this fraction of the FLOPs saved
FUSED = "dense fused bn-relu"
UNFLUSHED = "eager, subnormals"


def fuse_units(model: nn.Module) -> nn.Module:
    """``model`` (eval mode) with every BN + ReLU pair replaced by one ``FusedBNReLU``, in place:
    pairs inside an nn.Sequential (``fuse_bn_relu``) and the ``bn`` / ``relu`` children of the
    models' ConvBNReLU units, whose forward is relu(bn(conv(x)))."""
    for unit in model.modules():
        if isinstance(unit, ConvBNReLU) and isinstance(unit.bn, nn.BatchNorm2d) and type(unit.relu) is nn.ReLU:
            unit.bn, unit.relu = FusedBNReLU.from_bn(unit.bn), nn.Identity()
    return fuse_bn_relu(model)


def inference_model(model: nn.Module, *, device=None, dtype: torch.dtype = torch.float32,
                    bn: str = "fold", subnormals: str = "zero") -> nn.Module:
    """A copy of ``model`` ready for timed inference: eval mode, on ``device`` (default: where it
    is), ``dtype``, channels_last, with its BNs folded into the convs (``bn="fold"``) or fused with
    their ReLU (``bn="fuse"``).

    subnormals: "zero" (default) sets subnormal parameters to zero, which is how a CPU with the
    denormals-are-zero flag reads them (each output moves by less than the smallest normal number
    times the fan-in); "keep" leaves them. L2-trained networks hold many (dead filters decay towards
    zero) and x86 CPUs compute with them many times slower, a cost pruning would otherwise be
    credited with removing. Setting the CPU flag (``torch.set_flush_denormal``) is not enough: it
    holds for the calling thread only, not torch's intra-op worker threads.
    """
    if bn not in ("fold", "fuse"):
        raise ValueError(f"bn must be 'fold' or 'fuse', got {bn!r}")
    if subnormals not in ("zero", "keep"):
        raise ValueError(f"subnormals must be 'zero' or 'keep', got {subnormals!r}")
    device = device or next(model.parameters()).device
    if bn == "fold":  # folded in the model's own precision (float32), then converted
        ready = _relu_in_place(fold_bn(model).eval().to(device=device, dtype=dtype, memory_format=torch.channels_last))
    else:  # fused after the conversion: FusedBNReLU keeps its scale / shift in float32
        ready = fuse_units(copy.deepcopy(model).eval().to(device=device, dtype=dtype, memory_format=torch.channels_last))
    if subnormals == "zero":
        _zero_subnormals(ready)
    return ready


def _zero_subnormals(model: nn.Module) -> None:
    """Set every subnormal floating-point parameter and buffer of ``model`` to zero, in place."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.masked_fill_(subnormal_mask(t), 0.0)


def _relu_in_place(model: nn.Module) -> nn.Module:
    """``model`` with the ReLU of every BN-folded ConvBNReLU unit made in-place. Exact: after folding
    the ReLU's input is the conv's fresh output, read by nothing else. It saves an allocation and a
    full write of every feature map, which on CPU is a sizeable share of a small network's time
    (about 10% for BasicNet at batch 256), for the dense and the pruned model alike."""
    for unit in model.modules():
        if isinstance(unit, ConvBNReLU) and isinstance(unit.bn, nn.Identity) and type(unit.relu) is nn.ReLU:
            unit.relu.inplace = True
    return model


def subnormal_parameters(model: nn.Module) -> int:
    """How many floating-point parameters and buffers of ``model`` are subnormal (0 < |w| < the
    smallest normal number). L2 / weight decay shrinks the weights of dead filters towards zero until
    many are subnormal, and x86 CPUs compute with subnormals many times slower (measured: dense
    BasicNet 4.5x slower on an Intel Xeon); :func:`inference_model` zeroes them for timing."""
    return subnormal_count(list(model.parameters()) + list(model.buffers()))


def _compiled(model: nn.Module, x: torch.Tensor):
    """(torch.compile of ``model`` checked against eager on ``x``, None) or (None, why it failed)."""
    try:
        compiled = torch.compile(model, dynamic=False)
        with torch.inference_mode():
            got, want = compiled(x), model(x)
        tol = 1e-3 if x.dtype == torch.float32 else 5e-2
        if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * max(1.0, float(want.abs().max()))):
            return None, "torch.compile output differs from eager"
        return compiled, None
    except Exception as exc:  # a missing compiler toolchain must not sink the whole comparison
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def speed_comparison(dense: nn.Module, pruned: nn.Module, sample_shape, *, batch_sizes=(1, 256),
                     device="cpu", dtype: Optional[torch.dtype] = None, compile: bool = True, fused: bool = True,
                     timer: Optional[Callable] = None, rounds: int = 15, subnormal_row: bool = True,
                     log: Callable = print) -> dict:
    """Dense versus pruned inference speed, side by side (see the module docstring).

    sample_shape: one input's shape, with or without a batch dim ((1, 28, 28) or (1, 1, 28, 28)).
    dtype: default float32 on CPU, float16 on CUDA. compile: also time torch.compile of each model
    (skipped, with the reason recorded, where compilation fails; the fused row runs eager only: its
    extension kernel is opaque to dynamo). fused: add the dense model with
    fused BN-ReLU kernels instead of folding. timer: ``sparsekern.bench.timing.interleaved_timer``
    (the default) or a function with its signature and result.
    All rows are timed with subnormal weights set to zero (``inference_model``) and, on CPU, the
    calling thread flushing subnormals (``flush_denormals``); subnormal_row: where either model
    holds subnormal weights (``subnormal_parameters``), also time dense and pruned eager with them
    kept and nothing flushed ("eager, subnormals"), to show what they cost.

    Returns {"flops_dense", "flops_pruned", "flop_ratio", "flops_saved", "criterion_factor",
    "rows": [one per (mode, batch)], "compile": {...}}; each row has the median ms of every variant,
    the speedup t_dense / t_pruned, time_saved = 1 - t_pruned / t_dense and ``criterion_met``:
    time_saved >= SPEED_CRITERION * flops_saved.
    """
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    sample_shape = tuple(sample_shape)[-3:]
    flops_dense, flops_pruned = count_flops(dense, (1,) + sample_shape), count_flops(pruned, (1,) + sample_shape)
    flops_saved = 1.0 - flops_pruned / flops_dense
    variants = {"dense": inference_model(dense, device=device, dtype=dtype),
                "pruned": inference_model(pruned, device=device, dtype=dtype)}
    if fused:
        variants[FUSED] = inference_model(dense, device=device, dtype=dtype, bn="fuse")
    kept = {"dense": inference_model(dense, device=device, dtype=dtype, subnormals="keep"),
            "pruned": inference_model(pruned, device=device, dtype=dtype, subnormals="keep")}
    result = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "sample_shape": list(sample_shape),
              "flops_dense": flops_dense, "flops_pruned": flops_pruned, "flop_ratio": flops_dense / flops_pruned,
              "flops_saved": flops_saved, "criterion": f"time_saved >= {SPEED_CRITERION} * flops_saved",
              "criterion_factor": SPEED_CRITERION, "compile": {}, "rows": [],
              "subnormal_parameters": {n: subnormal_parameters(kept[n]) for n in ("dense", "pruned")},
              "flush_denormal": device.type == "cpu", "environment": timing_environment(device)}
    with_subnormals = device.type == "cpu" and any(result["subnormal_parameters"].values())
    if with_subnormals:
        log(f"subnormal weights: dense {result['subnormal_parameters']['dense']}, pruned "
            f"{result['subnormal_parameters']['pruned']}; timed with them set to zero"
            + (" (and once as they are)" if subnormal_row else ""))
    for batch in batch_sizes:
        shape = (batch,) + sample_shape
        modes = {"eager": variants}
        if compile:
            modes["compile"] = _compile_all(variants, shape, device, dtype, result["compile"], log)
        if subnormal_row and with_subnormals:
            modes[UNFLUSHED] = kept
        for mode, models in modes.items():
            if "dense" not in models or "pruned" not in models:
                continue
            t = time_models(models, shape, device=device, dtype=dtype, timer=timer, rounds=rounds,
                            flush_denormal=mode != UNFLUSHED)
            row = _row(mode, batch, t, result["flop_ratio"], flops_saved)
            result["rows"].append(row)
            log(_row_line(row))
    return result


def _compile_all(variants: dict, shape, device, dtype, record: dict, log) -> dict:
    """torch.compile of each variant at input ``shape`` (those that compile and match eager); why
    each did or did not goes into ``record`` under "<variant> b<batch>"."""
    x = torch.randn(shape).to(device, dtype).contiguous(memory_format=torch.channels_last)
    compiled = {}
    torch.compiler.reset()  # dynamo caches per code object: start each batch size under its recompile limit
    for name, model in variants.items():
        key = f"{name} b{shape[0]}"
        if name == FUSED:  # the extension kernel is opaque to dynamo: only graph breaks
            record[key] = "not compiled: its kernel is opaque to torch.compile"
            continue
        compiled[name], why = _compiled(model, x)
        record[key] = "ok" if why is None else f"skipped: {why}"
        if why is not None:
            log(f"torch.compile skipped for {name} at batch {shape[0]}: {why}")
    return {n: m for n, m in compiled.items() if m is not None}


def _row(mode: str, batch: int, seconds: dict, flop_ratio: float, flops_saved: float) -> dict:
    """One (mode, batch) row of :func:`speed_comparison` from the median seconds of each variant."""
    time_saved = 1.0 - seconds["pruned"] / seconds["dense"]
    return {"mode": mode, "batch": batch, **{f"{n} ms": 1e3 * s for n, s in seconds.items()},
            "pruned images/s": batch / seconds["pruned"], "dense images/s": batch / seconds["dense"],
            "speedup": seconds["dense"] / seconds["pruned"], "flop_ratio": flop_ratio,
            "time_saved": time_saved, "flops_saved": flops_saved,
            "criterion_met": time_saved >= SPEED_CRITERION * flops_saved}


def _row_line(row: dict) -> str:
    """The progress line of one row."""
    fused = f", fused {row[f'{FUSED} ms']:.3f} ms" if f"{FUSED} ms" in row else ""
    return (f"{row['mode']:17s} batch {row['batch']:4d}: dense {row['dense ms']:.3f} ms, pruned "
            f"{row['pruned ms']:.3f} ms{fused} | speedup {row['speedup']:.2f}x vs FLOP ratio "
            f"{row['flop_ratio']:.2f}x | time saved {100 * row['time_saved']:.1f}% vs {SPEED_CRITERION} x FLOPs "
            f"saved {100 * SPEED_CRITERION * row['flops_saved']:.1f}%: {'met' if row['criterion_met'] else 'NOT met'}")


def repeat_summary(results: list) -> dict:
    """The criterion over repeated :func:`speed_comparison` runs (each in a fresh process, so the
    allocator, page placement and the host's load are sampled anew): for every (mode, batch) the
    median, min and max of time saved and speedup, and in how many runs the criterion held. The
    verdict ``criterion_met`` is taken on the median time saved: on a shared or virtual machine a
    single run can land on either side of the line."""
    if not results:
        raise ValueError("repeat_summary needs at least one speed_comparison result")
    first = results[0]
    rows = []
    for mode, batch in dict.fromkeys((r["mode"], r["batch"]) for r in first["rows"]):
        runs = [row for result in results for row in result["rows"] if (row["mode"], row["batch"]) == (mode, batch)]
        saved = [row["time_saved"] for row in runs]
        speedup = [row["speedup"] for row in runs]
        flops_saved = runs[0]["flops_saved"]
        rows.append({"mode": mode, "batch": batch, "runs": len(runs), "flops_saved": flops_saved,
                     "flop_ratio": runs[0]["flop_ratio"], "time_saved_median": statistics.median(saved),
                     "time_saved_min": min(saved), "time_saved_max": max(saved),
                     "speedup_median": statistics.median(speedup),
                     "dense_ms_median": statistics.median(row["dense ms"] for row in runs),
                     "pruned_ms_median": statistics.median(row["pruned ms"] for row in runs),
                     "runs_met": sum(row["criterion_met"] for row in runs),
                     "criterion_met": statistics.median(saved) >= SPEED_CRITERION * flops_saved})
    return {"repeats": len(results), "criterion": first["criterion"], "criterion_factor": SPEED_CRITERION,
            "rows": rows, "environment": first.get("environment", {}), "dtype": first["dtype"],
            "sample_shape": first["sample_shape"], "flops_dense": first["flops_dense"],
            "flops_pruned": first["flops_pruned"], "flush_denormal": first.get("flush_denormal")}
