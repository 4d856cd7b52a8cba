"""Harvest implicit sparsity from a trained run, and compare it with explicit pruning.

    from sparsekern.prune.harvest import prune_run, load_pruned, compare_methods, speed_comparison
    summary = prune_run("runs/<run id>", "runs/<run id>/pruned")      # what `sparsekern prune` does
    dense, pruned, plan = load_pruned("runs/<run id>/pruned")
    table = compare_methods(model, train_set, test_set, slimming_model=slim)   # `sparsekern harvest`
    speed = speed_comparison(dense, pruned, (1, 1, 28, 28))                  # `sparsekern bench`

- :func:`implicit_plan`: the channels implicit sparsity kills, by activation (dead over the
  training corpus, ``sparsekern.analyze``), by BN scale (|gamma| small: the unit outputs the
  constant relu(beta), folded into the next layer where exact), or both.
- :func:`prune_trained` (in memory) / :func:`prune_run` (to disk): run directory -> analysis ->
  plan -> exact surgery -> verification on held-out data -> manifest, pruned state_dict, report
  (JSON and markdown); :func:`load_pruned` reads it back, :func:`dense_and_pruned` gets the pair
  to time from either.
- :func:`compare_methods` / :func:`harvest_run`: implicit sparsity versus L1-norm filter pruning and
  Network Slimming at the same keep ratio (% filters removed, params, FLOPs, accuracy before and
  after fine-tuning, optionally measured speed).
- :func:`speed_comparison`: dense versus pruned inference, both with BN folded into the convs and
  channels_last, plus the dense model with fused BN-ReLU kernels, eager and torch.compile, batch-1
  latency and large-batch throughput, with the criterion
  ``1 - t_pruned / t_dense >= 0.7 * (1 - flops_pruned / flops_dense)``.

Keep ratios and "% filters removed" count the filters of the unit layers (Conv/Linear followed by
a BN: :func:`sparsekern.prune.baselines.unit_layers`), the same set for every method.
"""
from __future__ import annotations

import contextlib
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from sparsekern._denormals import subnormal_count, subnormal_mask
from sparsekern.prune.baselines import fine_tune, l1_norm_plan, slimming_plan, unit_layers
from sparsekern.prune.flops import count_flops, count_params
from sparsekern.prune.fold import fold_bn
from sparsekern.prune.plan import LayerPlan, PrunePlan
from sparsekern.prune.surgery import prune_model

PLAN_KINDS = ("activation", "gamma", "both")
FILES = {
    "manifest": "manifest.json",
    "state_dict": "pruned_state_dict.pt",
    "report": "prune_report.json",
    "markdown": "prune_report.md",
}
SPEED_CRITERION = 0.7  # time saved must reach this fraction of the FLOPs saved


# --- plans ---------------------------------------------------------------------------------------


def implicit_plan(model: nn.Module, loader=None, *, by: str = "activation", activation_threshold: float = 1e-12,
                  gamma_threshold: float = 1e-3, input_shape=None, progress: bool = False) -> PrunePlan:
    """The exact plan that removes what implicit sparsity left dead.

    by "activation": channels whose post-ReLU output stays below ``activation_threshold`` over
    every batch of ``loader`` (the training corpus); "gamma": |gamma| < ``gamma_threshold`` (no
    data needed); "both": the union, where a channel dead by activation is taken as 0.
    """
    if by not in PLAN_KINDS:
        raise ValueError(f"by must be one of {PLAN_KINDS}, got {by!r}")
    gamma_plan = activation_plan = None
    if by in ("gamma", "both"):
        gamma_plan = PrunePlan.from_gamma(model, gamma_threshold, input_shape=input_shape)
    if by in ("activation", "both"):
        if loader is None:
            raise ValueError(f"implicit_plan(by={by!r}) needs a loader over the training corpus")
        from sparsekern.stats.analyze import analyze

        result = analyze(model, loader, selectivity="none", progress=progress,
                         activation_thresholds=(activation_threshold,))
        activation_plan = PrunePlan.from_analysis(result, activation_threshold, input_shape=input_shape)
    if gamma_plan is None or activation_plan is None:
        return gamma_plan or activation_plan
    return _union(activation_plan, gamma_plan)


def _union(dead: PrunePlan, constant: PrunePlan) -> PrunePlan:
    """Channels removed by either plan; ``dead``'s channels output 0, the others keep ``constant``'s value."""
    layers = {}
    for name in list(dead.layers) + [n for n in constant.layers if n not in dead.layers]:
        a, b = dead.layers.get(name), constant.layers.get(name)
        first = a or b
        removed_dead = set(a.removed) if a else set()
        removed = removed_dead | (set(b.removed) if b else set())
        constants = {c: v for c, v in (b.constants if b else {}).items() if c not in removed_dead}
        layers[name] = LayerPlan(channels=first.channels, kept=[c for c in range(first.channels) if c not in removed],
                                 constants=constants)
    return PrunePlan(layers=layers, exact=True, model_class=constant.model_class, input_shape=constant.input_shape,
                     source=f"{dead.source} + {constant.source}", notes=dead.notes + constant.notes)


def unit_keep_ratio(report, layers) -> float:
    """Fraction of the filters of ``layers`` a PruneReport kept."""
    before = sum(report.layers[n].channels_before for n in layers)
    after = sum(report.layers[n].channels_after for n in layers)
    return after / before


# --- data helpers --------------------------------------------------------------------------------


def run_datasets(config, device: torch.device):
    """(train set without augmentation, test set) of a run, limited as the run limited them,
    moved to ``device`` when they live in memory."""
    from sparsekern.data import InMemoryImageDataset, get_dataset
    from sparsekern.train.loop import first_samples

    def load(train: bool, limit):
        dataset = first_samples(get_dataset(config.dataset, train=train, root=config.data_root), limit)
        return dataset.to(device) if isinstance(dataset, InMemoryImageDataset) else dataset

    return load(True, config.num_train_samples), load(False, config.num_test_samples)


def first_batch(dataset, size: int) -> torch.Tensor:
    """The first ``size`` inputs of ``dataset`` (fewer if it is smaller)."""
    from sparsekern.data import make_loader

    return next(iter(make_loader(dataset, min(size, len(dataset)), shuffle=False)))[0]


@torch.no_grad()
def compare_logits(original: nn.Module, pruned: nn.Module, dataset, *, batch_size: int = 500,
                   device: Optional[torch.device] = None) -> dict:
    """How closely ``pruned`` reproduces ``original`` over ``dataset`` (both in eval mode):
    prediction agreement, max |logit difference|, the logit scale max |logit| and their ratio,
    and both accuracies."""
    from sparsekern.data import make_loader

    device = device or next(original.parameters()).device
    modes = (original.training, pruned.training)
    original.eval()
    pruned.eval()
    agree = correct_a = correct_b = count = 0
    max_diff = scale = 0.0
    for x, y in make_loader(dataset, batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        a, b = original(x), pruned(x)
        max_diff = max(max_diff, float((a.double() - b.double()).abs().max()))
        scale = max(scale, float(a.abs().max()))
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        correct_a += int((a.argmax(1) == y).sum())
        correct_b += int((b.argmax(1) == y).sum())
        count += y.shape[0]
    original.train(modes[0])
    pruned.train(modes[1])
    if count == 0:
        raise ValueError("compare_logits: the dataset is empty")
    return {"samples": count, "agreement": agree / count, "max_abs_logit_diff": max_diff, "logit_scale": scale,
            "max_rel_logit_diff": max_diff / max(1.0, scale),
            "accuracy_original": correct_a / count, "accuracy_pruned": correct_b / count}


def _accuracy(model: nn.Module, dataset, batch_size: int) -> float:
    from sparsekern.train.loop import evaluate

    return 1.0 - evaluate(model, dataset, batch_size, next(model.parameters()).device)[1]


# --- a run directory -> a pruned model on disk ----------------------------------------------------


def prune_trained(run_dir, *, by: str = "activation", activation_threshold: float = 1e-12,
                  gamma_threshold: float = 1e-3, split: str = "train", samples: Optional[int] = None,
                  verify_samples: int = 256, batch_size: int = 500, device: str = "auto",
                  progress: bool = False) -> dict:
    """Prune a trained run in memory: {"model", "config", "pruned", "plan", "report", "corpus",
    "test_set"}.

    The plan comes from :func:`implicit_plan` over the first ``samples`` images of ``split`` (default:
    the training split as the run used it, without augmentation). Surgery verifies the pruned model
    node by node against the original on the first ``verify_samples`` of those images.
    """
    from sparsekern.data import make_loader
    from sparsekern.train.loop import first_samples, load_trained, resolve_device

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    for name, value in (("samples", samples), ("verify_samples", verify_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    model, config = load_trained(run_dir, device)
    train_set, test_set = run_datasets(config, resolve_device(device))
    corpus = first_samples(train_set if split == "train" else test_set, samples)
    shape = (2,) + tuple(first_batch(corpus, 1).shape[1:])
    plan = implicit_plan(model, make_loader(corpus, batch_size, shuffle=False), by=by,
                         activation_threshold=activation_threshold, gamma_threshold=gamma_threshold,
                         input_shape=shape, progress=progress)
    pruned, report = prune_model(model, plan, first_batch(corpus, verify_samples))
    return {"model": model, "config": config, "pruned": pruned, "plan": plan, "report": report,
            "corpus": corpus, "test_set": test_set}


def prune_run(run_dir, out_dir, *, by: str = "activation", activation_threshold: float = 1e-12,
              gamma_threshold: float = 1e-3, split: str = "train", samples: Optional[int] = None,
              verify_samples: int = 256, test_samples: Optional[int] = None, batch_size: int = 500,
              device: str = "auto", manifest: Optional[str] = None, progress: bool = False) -> dict:
    """Prune a trained run exactly (:func:`prune_trained`) and write the result to ``out_dir``;
    returns the report dict.

    After surgery both models are compared over the test split (first ``test_samples``): a channel
    dead on the training corpus need not be dead on test images, so agreement there is measured,
    not assumed. Files in ``out_dir`` (see ``FILES``): manifest.json (the PrunePlan; also written
    to ``manifest`` when given), pruned_state_dict.pt, prune_report.json and prune_report.md.
    """
    from sparsekern.train.loop import first_samples

    if test_samples is not None and (isinstance(test_samples, bool) or not isinstance(test_samples, int)
                                     or test_samples < 1):
        raise ValueError(f"test_samples must be a positive int, got {test_samples!r}")
    done = prune_trained(run_dir, by=by, activation_threshold=activation_threshold, gamma_threshold=gamma_threshold,
                         split=split, samples=samples, verify_samples=verify_samples, batch_size=batch_size,
                         device=device, progress=progress)
    model, pruned, plan, report = done["model"], done["pruned"], done["plan"], done["report"]
    held_out = compare_logits(model, pruned, first_samples(done["test_set"], test_samples), batch_size=batch_size)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / FILES["manifest"])
    if manifest is not None:
        plan.save(manifest)
    torch.save(pruned.state_dict(), out / FILES["state_dict"])
    layers = unit_layers(model)
    run_path = Path(run_dir).resolve()
    summary = {
        "run_dir": str(run_path if run_path.is_dir() else run_path.parent),
        "model": done["config"].model, "dataset": done["config"].dataset,
        "by": by, "activation_threshold": activation_threshold, "gamma_threshold": gamma_threshold,
        "corpus": {"split": split, "samples": len(done["corpus"])},
        "filters": sum(report.layers[n].channels_before for n in layers),
        "filters_removed_pct": 100.0 * (1.0 - unit_keep_ratio(report, layers)),
        "flops_before": report.flops_before, "flops_after": report.flops_after,
        "surgery": report.to_dict(),
        "held_out": {"split": "test", **held_out},
        "plan_notes": plan.notes,
    }
    (out / FILES["report"]).write_text(json.dumps(summary, indent=1) + "\n")
    (out / FILES["markdown"]).write_text(_prune_markdown(summary, report.summary()))
    return summary


def _prune_markdown(summary: dict, surgery_table: str) -> str:
    held = summary["held_out"]
    return "\n".join([
        f"# Pruned {summary['model']} ({summary['run_dir']})",
        "",
        f"Plan: dead by {summary['by']} (activation < {summary['activation_threshold']:g} over "
        f"{summary['corpus']['samples']} {summary['corpus']['split']} images; "
        f"|gamma| < {summary['gamma_threshold']:g}). "
        f"{summary['filters_removed_pct']:.1f}% of {summary['filters']} filters removed.",
        "",
        surgery_table,
        "",
        f"Held-out check on {held['samples']} test images: predictions agree on {100 * held['agreement']:.2f}%, "
        f"max |logit diff| {held['max_abs_logit_diff']:.3g} (logit scale {held['logit_scale']:.3g}), accuracy "
        f"{100 * held['accuracy_original']:.2f}% -> {100 * held['accuracy_pruned']:.2f}%.",
        "",
    ])


def load_pruned(prune_dir, device: str = "auto") -> tuple:
    """(original model, pruned model, PrunePlan) from a directory written by :func:`prune_run`: the
    run's model rebuilt from its checkpoint, the manifest applied to it, the saved pruned weights
    loaded (a manifest that does not fit those weights fails with the mismatching shapes)."""
    from sparsekern.train.loop import load_trained

    prune_dir = Path(prune_dir)
    files = {key: prune_dir / name for key, name in FILES.items()}
    missing = [str(files[k]) for k in ("manifest", "state_dict", "report") if not files[k].is_file()]
    if missing:
        raise FileNotFoundError(f"{prune_dir}: not a `sparsekern prune` output directory "
                                f"(missing {', '.join(missing)})")
    summary = json.loads(files["report"].read_text())
    model, _ = load_trained(summary["run_dir"], device)
    plan = PrunePlan.load(files["manifest"])
    # verify=False: the saved weights are the verified ones; the manifest only gives the shapes here.
    pruned, _ = prune_model(model, plan, verify=False)
    state = torch.load(files["state_dict"], map_location=next(model.parameters()).device, weights_only=True)
    pruned.load_state_dict(state)
    return model, pruned.eval(), plan


def dense_and_pruned(source, *, manifest=None, device: str = "auto", **plan_options) -> tuple:
    """(dense model, pruned model, one input's shape) for timing. ``source``: a :func:`prune_run`
    output directory (its saved model); or a run directory, pruned with ``manifest`` (verified on
    the first ``verify_samples`` training images) or, without one, by :func:`prune_trained` with
    ``plan_options``."""
    from sparsekern.train.loop import load_trained, resolve_device

    source = Path(source)
    if (source / FILES["report"]).is_file():
        if manifest is not None:
            raise ValueError(f"{source} is a prune output directory with its own manifest; a manifest is "
                             "applied to a run directory")
        dense, pruned, plan = load_pruned(source, device)
        return dense, pruned, tuple(plan.input_shape[1:])
    if manifest is not None:
        dense, config = load_trained(source, device)
        train_set, _ = run_datasets(config, resolve_device(device))
        batch = first_batch(train_set, plan_options.get("verify_samples", 256))
        pruned, _ = prune_model(dense, PrunePlan.load(manifest), batch)
        return dense, pruned, tuple(batch.shape[1:])
    done = prune_trained(source, device=device, **plan_options)
    return done["model"], done["pruned"], tuple(done["plan"].input_shape[1:])


# --- implicit sparsity versus the baselines -------------------------------------------------------


def compare_methods(model: nn.Module, train_set, test_set, *, slimming_model: Optional[nn.Module] = None,
                    by: str = "activation", analysis_samples: Optional[int] = None,
                    fine_tune_steps: Optional[int] = 0, fine_tune_lr: float = 1e-4, fine_tune_optimizer: str = "adam",
                    batch_size: int = 64, eval_batch_size: int = 500, seed: int = 0,
                    speed_batch_sizes=(), log: Callable = print) -> dict:
    """Implicit sparsity versus L1-norm pruning and Network Slimming at the same keep ratio.

    ``model``: trained with implicit sparsity (e.g. Adam + L2); its dead filters (``by``, over the
    first ``analysis_samples`` of ``train_set``) are removed exactly, which fixes the keep ratio.
    At that ratio: L1-norm filter pruning of ``model`` with the same ratio in every layer, and with
    the per-layer counts implicit sparsity left (same architecture, other filters); Network
    Slimming's global |gamma| threshold on ``slimming_model`` (trained with the slimming penalty;
    rows skipped without it). Baselines are evaluated on ``test_set`` before and after
    ``fine_tune_steps`` of fine-tuning on ``train_set`` (None: one epoch at ``batch_size``).
    ``speed_batch_sizes``: also time every row (BN folded, channels_last, eager) at these batch sizes.

    Returns {"keep_ratio", "rows": [...], "notes": [...]}; see :func:`comparison_markdown`.
    """
    from sparsekern.data import make_loader
    from sparsekern.train.loop import first_samples

    device = next(model.parameters()).device
    if fine_tune_steps is None:
        fine_tune_steps = max(1, len(train_set) // batch_size)
    corpus = first_samples(train_set, analysis_samples)
    batch = first_batch(corpus, 256)
    layers = unit_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv/Linear followed by a BatchNorm: nothing to compare")
    filters = sum(model.get_submodule(n).weight.shape[0] for n in layers)
    input_shape = (1,) + tuple(batch.shape[1:])
    rows, notes, models = [], [], {}

    def add_row(method: str, pruned: nn.Module, *, report=None, before=None, after=None, steps=0):
        kept = unit_keep_ratio(report, layers) if report is not None else 1.0
        rows.append({
            "method": method, "keep_ratio": kept, "filters_removed_pct": 100.0 * (1.0 - kept),
            "filters_kept": int(round(kept * filters)), "params": count_params(pruned),
            "flops": count_flops(pruned, input_shape), "accuracy_before_ft": before,
            "accuracy_after_ft": after, "fine_tune_steps": steps,
        })
        models[method] = pruned
        log(f"{method}: {rows[-1]['filters_removed_pct']:.1f}% filters removed, accuracy "
            f"{_pct(before)} -> {_pct(after)}")

    def baseline(method: str, source: nn.Module, plan: PrunePlan):
        pruned, report = prune_model(source, plan, batch)
        before = _accuracy(pruned, test_set, eval_batch_size)
        after = None
        if fine_tune_steps:
            loader = make_loader(train_set, batch_size, shuffle=True, seed=seed, drop_last=True)
            fine_tune(pruned, loader, fine_tune_steps, fine_tune_lr, optimizer=fine_tune_optimizer)
            after = _accuracy(pruned, test_set, eval_batch_size)
        add_row(method, pruned, report=report, before=before, after=after, steps=fine_tune_steps)

    add_row("dense", model, before=_accuracy(model, test_set, eval_batch_size))
    plan = implicit_plan(model, make_loader(corpus, eval_batch_size, shuffle=False), by=by)
    implicit, report = prune_model(model, plan, batch)
    add_row(f"implicit sparsity (dead by {by})", implicit, report=report,
            before=_accuracy(implicit, test_set, eval_batch_size))
    keep_ratio = unit_keep_ratio(report, layers)
    if keep_ratio == 1.0:
        notes.append("implicit sparsity removed no filter: the baselines are compared at keep ratio 1")
    counts = {n: report.layers[n].channels_after for n in layers}
    baseline("L1-norm (same ratio per layer)", model, l1_norm_plan(model, keep_ratio))
    baseline("L1-norm (implicit's per-layer counts)", model, l1_norm_plan(model, counts))
    if slimming_model is None:
        notes.append("Network Slimming rows skipped: no model trained with the slimming penalty was given")
    else:
        slimming_model = slimming_model.to(device).eval()
        add_row("dense (slimming-trained)", slimming_model, before=_accuracy(slimming_model, test_set, eval_batch_size))
        baseline("Network Slimming (global gamma threshold)", slimming_model, slimming_plan(slimming_model, keep_ratio))
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    for speed_batch in speed_batch_sizes:
        timing = time_models({m: inference_model(net, dtype=dtype) for m, net in models.items()},
                             (speed_batch,) + input_shape[1:], device=device, dtype=dtype)
        for row in rows:
            row[f"ms_per_batch_b{speed_batch}"] = 1e3 * timing[row["method"]]
            row[f"images_per_s_b{speed_batch}"] = speed_batch / timing[row["method"]]
    return {"keep_ratio": keep_ratio, "input_shape": list(input_shape), "rows": rows, "notes": notes}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def slimming_config(config, strength: float = 1e-4):
    """The RunConfig of the Network Slimming counterpart of ``config``: same model, data, optimizer
    and budget, with the slimming penalty (strength ``strength``) as its only regulariser."""
    return config.replace(reg="slimming", reg_strength=strength, name=None)


def harvest_run(run_dir, *, slimming_run=None, device: str = "auto", **options) -> dict:
    """:func:`compare_methods` for a trained run (and optionally its slimming counterpart, a run
    directory trained with ``--reg slimming``, see :func:`slimming_config`). ``options`` go to
    :func:`compare_methods`; ``analysis_samples``, ``batch_size`` and ``seed`` default to the run's."""
    from sparsekern.train.loop import load_trained, resolve_device

    model, config = load_trained(run_dir, device)
    slim = None
    if slimming_run is not None:
        slim, slim_config = load_trained(slimming_run, device)
        if (slim_config.model, slim_config.width, slim_config.dataset) != (config.model, config.width, config.dataset):
            raise ValueError(f"{slimming_run}: model/width/dataset ({slim_config.model}, {slim_config.width}, "
                             f"{slim_config.dataset}) differ from {run_dir}'s ({config.model}, {config.width}, "
                             f"{config.dataset})")
        if slim_config.reg != "slimming":
            raise ValueError(f"{slimming_run}: trained with reg={slim_config.reg!r}, not 'slimming'")
    train_set, test_set = run_datasets(config, resolve_device(device))
    options.setdefault("analysis_samples", config.analyze_samples)
    options.setdefault("seed", config.seed)
    options.setdefault("batch_size", config.batch_size)
    result = compare_methods(model, train_set, test_set, slimming_model=slim, **options)
    result.update(run_dir=str(run_dir), slimming_run=None if slimming_run is None else str(slimming_run),
                  model=config.model, width=config.width, dataset=config.dataset, run_id=config.run_id())
    return result


def comparison_markdown(result: dict) -> str:
    """The rows of :func:`compare_methods` as a markdown table."""
    speed_keys = [k for k in (result["rows"][0] if result["rows"] else {}) if k.startswith("ms_per_batch_")]
    header = ["method", "filters removed", "params", "MFLOPs", "accuracy", "accuracy fine-tuned"] + [
        f"ms/batch (b={k.rsplit('b', 1)[1]})" for k in speed_keys]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in result["rows"]:
        cells = [r["method"], f"{r['filters_removed_pct']:.1f}%", f"{r['params']:,}", f"{r['flops'] / 1e6:.1f}",
                 _pct(r["accuracy_before_ft"]), _pct(r["accuracy_after_ft"])]
        if r["accuracy_after_ft"] is not None:
            cells[-1] += f" ({r['fine_tune_steps']} steps)"
        cells += [f"{r[k]:.3g}" for k in speed_keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines) + "\n"


# --- speed --------------------------------------------------------------------------------------


def fuse_units(model: nn.Module) -> nn.Module:
    """``model`` (eval mode) with every BN + ReLU pair replaced by one ``FusedBNReLU``, in place:
    pairs inside an nn.Sequential (``fuse_bn_relu``) and the ``bn`` / ``relu`` children of the
    models' ConvBNReLU units, whose forward is relu(bn(conv(x)))."""
    from sparsekern.models import ConvBNReLU
    from sparsekern.ops.bn_relu import FusedBNReLU, fuse_bn_relu

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
    from sparsekern.models import ConvBNReLU

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


@contextlib.contextmanager
def flush_denormals(enabled: bool = True):
    """Within the block, the calling thread's CPU float ops flush subnormals to zero
    (``torch.set_flush_denormal``, the FTZ/DAZ flags). Only that thread: torch's worker threads keep
    the flags they were created with, which is why timing copies also zero subnormal weights
    (:func:`inference_model`). Yields whether flushing is on (False where the CPU lacks SSE3).
    Afterwards the flag is off again, torch's default, unless ``SPARSEKERN_FLUSH_DENORMAL=1``
    turned it on for the whole process (then it is left on)."""
    from sparsekern._denormals import flush_denormal_enabled

    if flush_denormal_enabled():
        yield True
        return
    on = bool(enabled) and torch.set_flush_denormal(True)
    try:
        yield on
    finally:
        if on:
            torch.set_flush_denormal(False)


def interleaved_timer(candidates: dict, *, device: torch.device, rounds: int = 15, min_round_s: float = 0.05,
                      warmup: int = 2) -> dict:
    """Median seconds per call of each candidate, timed in interleaved rounds (A, B, C, A, B, C...)
    so load drift hits all alike: the method of ``benchmarks/harness.time_side_by_side``, whose
    result format ({name: {"median_s", ...}}) it shares, so either can be passed as ``timer``."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    reps = {}
    for name, fn in candidates.items():
        sync()
        start = time.perf_counter()
        fn()
        sync()
        reps[name] = max(1, int(min_round_s / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / reps[name])
    return {name: {"median_s": statistics.median(s)} for name, s in samples.items()}


def time_models(models: dict, input_shape, *, device: torch.device, dtype: torch.dtype = torch.float32,
                timer: Optional[Callable] = None, rounds: int = 15, flush_denormal: bool = True) -> dict:
    """Median seconds per forward of each model on one random batch of ``input_shape``
    (channels_last, ``dtype``), side by side under inference mode, with subnormals flushed to zero
    on CPU unless ``flush_denormal=False`` (:func:`flush_denormals`)."""
    timer = timer or interleaved_timer
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), flush_denormals(flush_denormal and torch.device(device).type == "cpu"):
        timing = timer({name: (lambda m=m: m(x)) for name, m in models.items()}, device=device, rounds=rounds)
    return {name: t["median_s"] for name, t in timing.items()}


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
    fused BN-ReLU kernels instead of folding. timer: ``interleaved_timer`` or harness's.
    All rows are timed with subnormal weights set to zero (``inference_model``) and, on CPU, the
    calling thread flushing subnormals (:func:`flush_denormals`); subnormal_row: where either model
    holds subnormal weights (``subnormal_parameters``), also time dense and pruned eager with them
    kept and nothing flushed ("eager, subnormals"), to show what they cost.

    Returns {"flops_dense", "flops_pruned", "flop_ratio", "flops_saved", "rows": [one per (mode,
    batch)], "compile": {...}}; each row has the median ms of every variant, the speedup
    t_dense / t_pruned, time_saved = 1 - t_pruned / t_dense and ``criterion_met``:
    time_saved >= 0.7 * flops_saved.
    """
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    sample_shape = tuple(sample_shape)[-3:]
    flops_dense, flops_pruned = count_flops(dense, (1,) + sample_shape), count_flops(pruned, (1,) + sample_shape)
    flops_saved = 1.0 - flops_pruned / flops_dense
    variants = {"dense": inference_model(dense, device=device, dtype=dtype),
                "pruned": inference_model(pruned, device=device, dtype=dtype)}
    if fused:
        variants["dense fused bn-relu"] = inference_model(dense, device=device, dtype=dtype, bn="fuse")
    kept = {"dense": inference_model(dense, device=device, dtype=dtype, subnormals="keep"),
            "pruned": inference_model(pruned, device=device, dtype=dtype, subnormals="keep")}
    result = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "sample_shape": list(sample_shape),
              "flops_dense": flops_dense, "flops_pruned": flops_pruned, "flop_ratio": flops_dense / flops_pruned,
              "flops_saved": flops_saved, "criterion": f"time_saved >= {SPEED_CRITERION} * flops_saved",
              "compile": {}, "rows": [],
              "subnormal_parameters": {n: subnormal_parameters(kept[n]) for n in ("dense", "pruned")},
              "flush_denormal": device.type == "cpu", "environment": timing_environment(device)}
    if device.type == "cpu" and any(result["subnormal_parameters"].values()):
        log(f"subnormal weights: dense {result['subnormal_parameters']['dense']}, pruned "
            f"{result['subnormal_parameters']['pruned']}; timed with them set to zero"
            + (" (and once as they are)" if subnormal_row else ""))
    for batch in batch_sizes:
        shape = (batch,) + sample_shape
        modes = {"eager": variants}
        if compile:
            x = torch.randn(shape).to(device, dtype).contiguous(memory_format=torch.channels_last)
            compiled = {}
            torch.compiler.reset()  # dynamo caches per code object: start each batch size under its recompile limit
            for name, m in variants.items():
                if name == "dense fused bn-relu":  # the extension kernel is opaque to dynamo: only graph breaks
                    result["compile"][f"{name} b{batch}"] = "not compiled: its kernel is opaque to torch.compile"
                    continue
                compiled[name], why = _compiled(m, x)
                result["compile"][f"{name} b{batch}"] = "ok" if why is None else f"skipped: {why}"
                if why is not None:
                    log(f"torch.compile skipped for {name} at batch {batch}: {why}")
            modes["compile"] = {n: m for n, m in compiled.items() if m is not None}
        if subnormal_row and device.type == "cpu" and any(result["subnormal_parameters"].values()):
            modes["eager, subnormals"] = kept
        for mode, models in modes.items():
            if "dense" not in models or "pruned" not in models:
                continue
            t = time_models(models, shape, device=device, dtype=dtype, timer=timer, rounds=rounds,
                            flush_denormal=mode != "eager, subnormals")
            time_saved = 1.0 - t["pruned"] / t["dense"]
            row = {"mode": mode, "batch": batch, **{f"{n} ms": 1e3 * s for n, s in t.items()},
                   "pruned images/s": batch / t["pruned"], "dense images/s": batch / t["dense"],
                   "speedup": t["dense"] / t["pruned"], "flop_ratio": result["flop_ratio"],
                   "time_saved": time_saved, "flops_saved": flops_saved,
                   "criterion_met": time_saved >= SPEED_CRITERION * flops_saved}
            result["rows"].append(row)
            log(f"{mode:17s} batch {batch:4d}: dense {row['dense ms']:.3f} ms, pruned {row['pruned ms']:.3f} ms"
                + (f", fused {row['dense fused bn-relu ms']:.3f} ms" if "dense fused bn-relu ms" in row else "")
                + f" | speedup {row['speedup']:.2f}x vs FLOP ratio {row['flop_ratio']:.2f}x | time saved "
                f"{100 * time_saved:.1f}% vs {SPEED_CRITERION} x FLOPs saved {100 * SPEED_CRITERION * flops_saved:.1f}%: "
                f"{'met' if row['criterion_met'] else 'NOT met'}")
    return result


def timing_environment(device) -> dict:
    """Date, device name, versions and thread count, recorded with every speed result."""
    import datetime
    import platform

    import sparsekern

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device_name": device_name(device), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "sparsekern": sparsekern.__version__}


def device_name(device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (platform's guess elsewhere)."""
    import platform

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _where(env, fallback: str) -> str:
    """'<device> (<threads> threads, torch <version>, <date>)' from a timing_environment dict."""
    if not env:
        return fallback
    return f"{env['device_name']} ({env['torch_threads']} threads, torch {env['torch']}, {env['date'][:10]})"


def speed_markdown(result: dict) -> str:
    """The rows of :func:`speed_comparison` as a markdown table."""
    fused = any("dense fused bn-relu ms" in r for r in result["rows"])
    header = ["mode", "batch", "dense ms", "pruned ms"] + (["fused bn-relu ms"] if fused else []) + [
        "speedup", "FLOP ratio", "time saved", "0.7 x FLOPs saved", "criterion"]
    lines = [f"{_where(result.get('environment'), result['device'])}, {result['dtype']}, input {result['sample_shape']}; FLOPs/sample "
             f"{result['flops_dense'] / 1e6:.1f}M -> {result['flops_pruned'] / 1e6:.1f}M"
             + ("; subnormal weights set to zero except in 'eager, subnormals' rows"
                if result.get("flush_denormal") else ""), "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in result["rows"]:
        cells = [r["mode"], str(r["batch"]), f"{r['dense ms']:.3f}", f"{r['pruned ms']:.3f}"]
        if fused:
            cells.append(f"{r['dense fused bn-relu ms']:.3f}" if "dense fused bn-relu ms" in r else "-")
        cells += [f"{r['speedup']:.2f}x", f"{r['flop_ratio']:.2f}x", f"{100 * r['time_saved']:.1f}%",
                  f"{100 * SPEED_CRITERION * r['flops_saved']:.1f}%", "met" if r["criterion_met"] else "not met"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"- torch.compile of {k}: {v}" for k, v in result["compile"].items() if v != "ok"]
    if any(result.get("subnormal_parameters", {}).values()):
        lines.append(f"- subnormal parameters: dense {result['subnormal_parameters']['dense']}, "
                     f"pruned {result['subnormal_parameters']['pruned']}")
    return "\n".join(lines) + "\n"


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
    return {"repeats": len(results), "criterion": first["criterion"], "rows": rows,
            "environment": first.get("environment", {}), "dtype": first["dtype"],
            "sample_shape": first["sample_shape"], "flops_dense": first["flops_dense"],
            "flops_pruned": first["flops_pruned"], "flush_denormal": first.get("flush_denormal")}


def repeat_markdown(summary: dict) -> str:
    """:func:`repeat_summary` as a markdown table."""
    lines = [f"{_where(summary['environment'], 'device unknown')}, {summary['dtype']}, input {summary['sample_shape']}; FLOPs/sample "
             f"{summary['flops_dense'] / 1e6:.1f}M -> {summary['flops_pruned'] / 1e6:.1f}M; "
             f"{summary['repeats']} runs, each in a fresh process; criterion judged on the median", "",
             "| mode | batch | dense ms | pruned ms | speedup | FLOP ratio | time saved, median [min, max] "
             "| 0.7 x FLOPs saved | runs met | criterion |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['dense_ms_median']:.3f} | {r['pruned_ms_median']:.3f} | "
                     f"{r['speedup_median']:.2f}x | {r['flop_ratio']:.2f}x | {100 * r['time_saved_median']:.1f}% "
                     f"[{100 * r['time_saved_min']:.1f}, {100 * r['time_saved_max']:.1f}] | "
                     f"{100 * SPEED_CRITERION * r['flops_saved']:.1f}% | {r['runs_met']}/{r['runs']} | "
                     f"{'met' if r['criterion_met'] else 'not met'} |")
    return "\n".join(lines) + "\n"
