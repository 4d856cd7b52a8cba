"""Harvest implicit sparsity from a trained run, and compare it with explicit pruning.

    from sparsekern.experiments.harvest import prune_run, load_pruned, compare_methods
    summary = prune_run("runs/<run id>", "runs/<run id>/pruned")      # what `sparsekern prune` does
    dense, pruned, plan = load_pruned("runs/<run id>/pruned")
    table = compare_methods(model, train_set, test_set, slimming_model=slim)   # `sparsekern harvest`

- :func:`prune_trained` (in memory) / :func:`prune_run` (to disk): run directory -> analysis ->
  plan (``sparsekern.prune.implicit.implicit_plan``) -> exact surgery -> verification on held-out
  data -> manifest, pruned state_dict, report (JSON and markdown); :func:`load_pruned` reads it
  back, :func:`dense_and_pruned` gets the pair to time (``sparsekern bench``) from either.
  :func:`prune_loaded` / :func:`write_pruned` / :func:`dense_and_pruned_loaded` are the same
  steps for a model already in memory (``sparsekern prune --model``: torchvision, timm, a factory).
- :func:`compare_methods` / :func:`harvest_run`: implicit sparsity versus L1-norm filter pruning and
  Network Slimming at the same keep ratio (% filters removed, params, FLOPs, accuracy before and
  after fine-tuning, optionally measured speed).

Keep ratios and "% filters removed" count the filters of the unit layers (Conv/Linear followed by
a BN: :func:`sparsekern.prune.baselines.unit_layers`), the same set for every method.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from sparsekern.bench.speed import inference_model
from sparsekern.bench.timing import time_models
from sparsekern.data import first_samples, make_loader, run_dataset
from sparsekern.models.external import load_external, load_weights, read_state_dict
from sparsekern.prune.baselines import l1_norm_plan, slimming_plan, unit_layers
from sparsekern.prune.compare import compare_logits, unit_keep_ratio
from sparsekern.prune.flops import count_flops, count_params
from sparsekern.prune.implicit import implicit_plan
from sparsekern.prune.plan import PrunePlan
from sparsekern.prune.surgery import prune_model
from sparsekern.report.pruning import percent, prune_markdown
from sparsekern.train.finetune import fine_tune
from sparsekern.train.loop import evaluate, load_trained, resolve_device

FILES = {
    "manifest": "manifest.json",
    "state_dict": "pruned_state_dict.pt",
    "report": "prune_report.json",
    "markdown": "prune_report.md",
}


def first_batch(dataset, size: int) -> torch.Tensor:
    """The first ``size`` inputs of ``dataset`` (fewer if it is smaller)."""
    return next(iter(make_loader(dataset, min(size, len(dataset)), shuffle=False)))[0]


def accuracy(model: nn.Module, dataset, batch_size: int) -> float:
    """Top-1 accuracy of ``model`` (eval mode, on its device) over ``dataset``."""
    return 1.0 - evaluate(model, dataset, batch_size, next(model.parameters()).device)[1]


def _check_count(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# --- a run directory -> a pruned model on disk ----------------------------------------------------


def prune_loaded(model: nn.Module, corpus, *, by: str = "activation", activation_threshold: float = 1e-12,
                 gamma_threshold: float = 1e-3, verify_samples: int = 256, batch_size: int = 500,
                 progress: bool = False) -> dict:
    """Prune a model in memory by the channels it leaves dead over ``corpus`` (a dataset, already
    limited to the images to analyse): {"model", "pruned", "plan", "report", "corpus"}.

    The plan comes from ``implicit_plan``; surgery verifies the pruned model node by node against
    the original on the first ``verify_samples`` images of ``corpus``.
    """
    _check_count("verify_samples", verify_samples)
    shape = (2,) + tuple(first_batch(corpus, 1).shape[1:])
    plan = implicit_plan(model, make_loader(corpus, batch_size, shuffle=False), by=by,
                         activation_threshold=activation_threshold, gamma_threshold=gamma_threshold,
                         input_shape=shape, progress=progress)
    device = next(model.parameters()).device  # a DataLoader's batches are on the CPU
    pruned, report = prune_model(model, plan, first_batch(corpus, verify_samples).to(device))
    return {"model": model, "pruned": pruned, "plan": plan, "report": report, "corpus": corpus}


def prune_trained(run_dir, *, by: str = "activation", activation_threshold: float = 1e-12,
                  gamma_threshold: float = 1e-3, split: str = "train", samples: Optional[int] = None,
                  verify_samples: int = 256, batch_size: int = 500, device: str = "auto",
                  progress: bool = False) -> dict:
    """Prune a trained run in memory: {"model", "config", "pruned", "plan", "report", "corpus",
    "test_set"}.

    The plan comes from ``implicit_plan`` over the first ``samples`` images of ``split`` (default:
    the training split as the run used it, without augmentation). Surgery verifies the pruned model
    node by node against the original on the first ``verify_samples`` of those images.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _check_count("samples", samples)
    _check_count("verify_samples", verify_samples)
    model, config = load_trained(run_dir, device)
    target = resolve_device(device)
    test_set = run_dataset(config, "test", target)
    corpus = first_samples(run_dataset(config, "train", target) if split == "train" else test_set, samples)
    done = prune_loaded(model, corpus, by=by, activation_threshold=activation_threshold,
                        gamma_threshold=gamma_threshold, verify_samples=verify_samples, batch_size=batch_size,
                        progress=progress)
    return {**done, "config": config, "test_set": test_set}


def write_pruned(out_dir, done: dict, source: dict, *, by: str, activation_threshold: float, gamma_threshold: float,
                 split: str, test_samples: Optional[int] = None, batch_size: int = 500,
                 manifest: Optional[str] = None, extra_files: Optional[dict] = None) -> dict:
    """Compare a :func:`prune_loaded` result with its original over ``done["test_set"]`` (first
    ``test_samples``) and write it to ``out_dir`` (see ``FILES``; ``extra_files``: more name ->
    state dict to save there); returns the report dict, which starts with ``source``: where the
    model came from ({"run_dir", "model", "dataset"} of a run, or {"external": ..., "model",
    "dataset"}, what :func:`load_pruned` rebuilds it from) and ``source_title`` for the markdown."""
    _check_count("test_samples", test_samples)
    model, pruned, plan, report = done["model"], done["pruned"], done["plan"], done["report"]
    held_out = compare_logits(model, pruned, first_samples(done["test_set"], test_samples), batch_size=batch_size)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / FILES["manifest"])
    if manifest is not None:
        plan.save(manifest)
    torch.save(pruned.state_dict(), out / FILES["state_dict"])
    for name, state in (extra_files or {}).items():
        torch.save(state, out / name)
    layers = unit_layers(model)
    source = dict(source)
    title = source.pop("source_title", None)
    summary = {
        **source,
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
    titled = summary if title is None else {**summary, "run_dir": title}
    (out / FILES["markdown"]).write_text(prune_markdown(titled, report.summary()))
    return summary


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
    _check_count("test_samples", test_samples)
    done = prune_trained(run_dir, by=by, activation_threshold=activation_threshold, gamma_threshold=gamma_threshold,
                         split=split, samples=samples, verify_samples=verify_samples, batch_size=batch_size,
                         device=device, progress=progress)
    run_path = Path(run_dir).resolve()
    source = {"run_dir": str(run_path if run_path.is_dir() else run_path.parent),
              "model": done["config"].model, "dataset": done["config"].dataset}
    return write_pruned(out_dir, done, source, by=by, activation_threshold=activation_threshold,
                        gamma_threshold=gamma_threshold, split=split, test_samples=test_samples,
                        batch_size=batch_size, manifest=manifest)


def load_pruned(prune_dir, device: str = "auto") -> tuple:
    """(original model, pruned model, PrunePlan) from a directory written by :func:`prune_run` (or
    :func:`write_pruned`): the original rebuilt (a run's model from its checkpoint; a model from
    elsewhere from its spec, weights file or saved dense state dict), the manifest applied to it,
    the saved pruned weights loaded (a manifest that does not fit those weights fails with the
    mismatching shapes)."""
    prune_dir = Path(prune_dir)
    files = {key: prune_dir / name for key, name in FILES.items()}
    missing = [str(files[k]) for k in ("manifest", "state_dict", "report") if not files[k].is_file()]
    if missing:
        raise FileNotFoundError(f"{prune_dir}: not a `sparsekern prune` output directory "
                                f"(missing {', '.join(missing)})")
    summary = json.loads(files["report"].read_text())
    if summary.get("external"):
        model = load_external_original(summary["external"], prune_dir).to(resolve_device(device))
    else:
        model, _ = load_trained(summary["run_dir"], device)
    plan = PrunePlan.load(files["manifest"])
    # verify=False: the saved weights are the verified ones; the manifest only gives the shapes here.
    pruned, _ = prune_model(model, plan, verify=False)
    state = torch.load(files["state_dict"], map_location=next(model.parameters()).device, weights_only=True)
    pruned.load_state_dict(state)
    return model, pruned.eval(), plan


def load_external_original(described: dict, prune_dir) -> nn.Module:
    """The original model of an external prune (``summary["external"]``: :meth:`ExternalModel.describe`
    plus ``dense_state_dict``, the file in ``prune_dir`` holding its weights when no weights file did)."""
    dense_file = described.get("dense_state_dict")
    model = load_external(described["spec"], described.get("model_args") or None,
                          weights=None if dense_file else described.get("weights")).model
    if dense_file:
        load_weights(model, read_state_dict(Path(prune_dir) / dense_file), f"{Path(prune_dir) / dense_file}")
    return model.eval()


def dense_and_pruned_loaded(model: nn.Module, corpus, *, manifest=None, **plan_options) -> tuple:
    """(dense model, pruned model, one input's shape) for timing a model in memory: pruned with
    ``manifest`` (verified on the first ``verify_samples`` images of ``corpus``) or, without one, by
    :func:`prune_loaded` over ``corpus`` with ``plan_options``."""
    if manifest is not None:
        verify_samples = plan_options.get("verify_samples", 256)
        batch = first_batch(corpus, verify_samples).to(next(model.parameters()).device)
        pruned, _ = prune_model(model, PrunePlan.load(manifest), batch)
        return model, pruned, tuple(batch.shape[1:])
    done = prune_loaded(model, corpus, **plan_options)
    return done["model"], done["pruned"], tuple(done["plan"].input_shape[1:])


def dense_and_pruned(source, *, manifest=None, device: str = "auto", **plan_options) -> tuple:
    """(dense model, pruned model, one input's shape) for timing. ``source``: a :func:`prune_run`
    output directory (its saved model); or a run directory, pruned with ``manifest`` (verified on
    the first ``verify_samples`` training images) or, without one, by :func:`prune_trained` with
    ``plan_options``."""
    source = Path(source)
    if (source / FILES["report"]).is_file():
        if manifest is not None:
            raise ValueError(f"{source} is a prune output directory with its own manifest; a manifest is "
                             "applied to a run directory")
        dense, pruned, plan = load_pruned(source, device)
        return dense, pruned, tuple(plan.input_shape[1:])
    if manifest is not None:
        dense, config = load_trained(source, device)
        verify_samples = plan_options.get("verify_samples", 256)
        batch = first_batch(run_dataset(config, "train", resolve_device(device), samples=verify_samples),
                            verify_samples)
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

    Returns {"keep_ratio", "rows": [...], "notes": [...]}; see
    ``sparsekern.report.pruning.comparison_markdown``.
    """
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
            f"{percent(before)} -> {percent(after)}")

    def baseline(method: str, source: nn.Module, plan: PrunePlan):
        pruned, report = prune_model(source, plan, batch)
        before = accuracy(pruned, test_set, eval_batch_size)
        after = None
        if fine_tune_steps:
            loader = make_loader(train_set, batch_size, shuffle=True, seed=seed, drop_last=True)
            fine_tune(pruned, loader, fine_tune_steps, fine_tune_lr, optimizer=fine_tune_optimizer)
            after = accuracy(pruned, test_set, eval_batch_size)
        add_row(method, pruned, report=report, before=before, after=after, steps=fine_tune_steps)

    add_row("dense", model, before=accuracy(model, test_set, eval_batch_size))
    plan = implicit_plan(model, make_loader(corpus, eval_batch_size, shuffle=False), by=by)
    implicit, report = prune_model(model, plan, batch)
    add_row(f"implicit sparsity (dead by {by})", implicit, report=report,
            before=accuracy(implicit, test_set, eval_batch_size))
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
        add_row("dense (slimming-trained)", slimming_model, before=accuracy(slimming_model, test_set, eval_batch_size))
        baseline("Network Slimming (global gamma threshold)", slimming_model, slimming_plan(slimming_model, keep_ratio))
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    for speed_batch in speed_batch_sizes:
        timing = time_models({m: inference_model(net, dtype=dtype) for m, net in models.items()},
                             (speed_batch,) + input_shape[1:], device=device, dtype=dtype)
        for row in rows:
            row[f"ms_per_batch_b{speed_batch}"] = 1e3 * timing[row["method"]]
            row[f"images_per_s_b{speed_batch}"] = speed_batch / timing[row["method"]]
    return {"keep_ratio": keep_ratio, "input_shape": list(input_shape), "rows": rows, "notes": notes}


def slimming_config(config, strength: float = 1e-4):
    """The RunConfig of the Network Slimming counterpart of ``config``: same model, data, optimizer
    and budget, with the slimming penalty (strength ``strength``) as its only regulariser."""
    return config.replace(reg="slimming", reg_strength=strength, name=None)


def harvest_run(run_dir, *, slimming_run=None, device: str = "auto", **options) -> dict:
    """:func:`compare_methods` for a trained run (and optionally its slimming counterpart, a run
    directory trained with ``--reg slimming``, see :func:`slimming_config`). ``options`` go to
    :func:`compare_methods`; ``analysis_samples``, ``batch_size`` and ``seed`` default to the run's."""
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
    target = resolve_device(device)
    train_set, test_set = run_dataset(config, "train", target), run_dataset(config, "test", target)
    options.setdefault("analysis_samples", config.analyze_samples)
    options.setdefault("seed", config.seed)
    options.setdefault("batch_size", config.batch_size)
    result = compare_methods(model, train_set, test_set, slimming_model=slim, **options)
    result.update(run_dir=str(run_dir), slimming_run=None if slimming_run is None else str(slimming_run),
                  model=config.model, width=config.width, dataset=config.dataset, run_id=config.run_id())
    return result
