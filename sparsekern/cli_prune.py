"""The ``prune``, ``bench`` and ``harvest`` subcommands (registered in ``sparsekern.cli.SUBCOMMANDS``).

    sparsekern prune runs/<run id> [--by activation|gamma|both] [--out DIR] [--manifest plan.json]
    sparsekern bench runs/<run id>/pruned-activation [--batch-sizes 1,256] [--repeat 5] [--layers] [--json speed.json]
    sparsekern bench runs/<run id> --manifest plan.json
    sparsekern prune --model timm:resnet18 --weights r18.safetensors --data imagefolder:photos --out DIR [--onnx p.onnx]
    sparsekern bench --model torchvision:resnet18 --weights r18.pth --data imagefolder:photos --by both
    sparsekern harvest runs/<run id> --slimming-run runs/<slimming run id> [--fine-tune-steps 1500]

``prune``: checkpoint -> analysis over the training corpus -> plan -> exact surgery, verified
against the original -> manifest, pruned state_dict and report (JSON, markdown) in ``--out``
(default: ``<run dir>/pruned-<by>``). ``bench``: dense versus pruned inference speed, both with BN
folded and channels_last, plus the dense model with fused BN-ReLU; the source is a ``prune``
output directory, a run directory with ``--manifest``, or a bare run directory (pruned in memory
as ``prune`` would; ``sparsekern.bench``). ``harvest``: implicit sparsity versus L1-norm pruning and
Network Slimming at the same keep ratio (``sparsekern.experiments.harvest``).

``prune`` and ``bench`` also take a model from elsewhere instead of a run directory (``--model``,
``--model-args``, ``--weights``, ``--data``, ``--input-size``: see ``sparsekern.cli.add_model_flags``):
the corpus is ``--data``'s ``--split`` (``imagefolder:DIR``: ``DIR/train`` or ``DIR/val`` when they
exist, else ``DIR``), the held-out comparison its other split. ``prune --model`` needs ``--out``;
its directory holds the same files, and a ``dense_state_dict.pt`` when no weights file gave the
original, so that ``bench DIR`` rebuilds both models. ``--onnx PATH`` also exports the pruned model
to ONNX (``sparsekern.prune.export``) and checks onnxruntime's output against torch's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sparsekern.errors import ConfigError
from sparsekern.cli import (
    add_model_flags,
    available_device,
    check_one_source,
    external_data_from_args,
    external_model_from_args,
    int_at_least,
    positive_int,
)

DTYPES = ("auto", "float32", "float16", "bfloat16")


def _int_list(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_plan_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("what is removed")
    group.add_argument("--by", choices=("activation", "gamma", "both"), default="activation",
                       help="dead by activation over the corpus, |gamma| below threshold (constant relu(beta), "
                            "folded where exact), or both (default: activation)")
    group.add_argument("--activation-threshold", type=float, default=1e-12,
                       help="a channel is dead when its max |activation| over the corpus is below this (default 1e-12)")
    group.add_argument("--gamma-threshold", type=float, default=1e-3, help="|gamma| threshold (default 1e-3)")
    group.add_argument("--split", choices=("train", "test"), default="train", help="corpus split (default: train)")
    group.add_argument("--samples", type=positive_int, help="only the first N images of the corpus (default: all)")
    group.add_argument("--verify-samples", type=positive_int, default=256,
                       help="images the surgery is verified on, node by node (default 256)")
    group.add_argument("--batch-size", type=positive_int, default=500, help="analysis / evaluation batch size")
    p.add_argument("--device", type=available_device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true")


def _plan_options(args) -> dict:
    return {"by": args.by, "activation_threshold": args.activation_threshold, "gamma_threshold": args.gamma_threshold,
            "split": args.split, "samples": args.samples, "verify_samples": args.verify_samples,
            "batch_size": args.batch_size, "device": args.device, "progress": not args.no_progress}


# ---------------------------------------------------------------------- prune
def add_prune(subparsers) -> None:
    p = subparsers.add_parser("prune", help="remove a trained run's (or any model's) dead filters exactly; save "
                                            "manifest, weights, report",
                              description="Analyse a checkpoint over its training corpus (or a model from elsewhere "
                                          "over --data), remove the dead filters exactly, verify, and save the "
                                          "manifest, pruned weights and a report.")
    p.add_argument("run", nargs="?", help="a run directory or its checkpoint.pt (config.toml beside it); or use --model")
    p.add_argument("--out", help="output directory (default: <run dir>/pruned-<by>; required with --model)")
    p.add_argument("--manifest", metavar="PATH", help="also write the JSON manifest (the plan) here")
    p.add_argument("--test-samples", type=positive_int, help="compare original and pruned on the first N test images "
                                                    "(default: the run's test set)")
    p.add_argument("--onnx", metavar="PATH", help="also export the pruned model to ONNX here (needs sparsekern[export]) "
                                                  "and compare onnxruntime's output with torch's")
    _add_plan_flags(p)
    p.add_argument("--data-root", help="with --model --data fashion-mnist: where Fashion-MNIST is")
    add_model_flags(p)
    p.set_defaults(func=_cmd_prune)


def _run_dir(path: str) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


def _cmd_prune(args) -> int:
    from sparsekern.prune import PruneVerificationError, UnsupportedModelError
    from sparsekern.experiments.harvest import FILES, prune_run

    check_one_source(args, "run", "prune")
    if args.model is not None and not args.out:
        raise ConfigError("--out is required with --model (there is no run directory to write next to)")
    out = Path(args.out) if args.out else _run_dir(args.run) / f"pruned-{args.by}"
    try:
        if args.model is None:
            summary = prune_run(args.run, out, manifest=args.manifest, test_samples=args.test_samples,
                                **_plan_options(args))
        else:
            summary = _prune_external(args, out)
        if args.onnx:
            summary["onnx"] = _export_onnx(args, out)
    except (PruneVerificationError, UnsupportedModelError) as exc:
        print(f"sparsekern prune: error: {exc}", file=sys.stderr)
        return 1
    held = summary["held_out"]
    print((out / FILES["markdown"]).read_text())
    printed = {"out": str(out), "filters_removed_pct": summary["filters_removed_pct"],
               "flops_before": summary["flops_before"], "flops_after": summary["flops_after"],
               "test_agreement": held["agreement"], "max_rel_logit_diff": held["max_rel_logit_diff"]}
    if args.onnx:
        printed["onnx"] = summary["onnx"]
    print(json.dumps(printed))
    return 0


def _external_corpus(args, ext):
    """The analysed corpus of a model from elsewhere: the first --samples of --data's --split."""
    from sparsekern.data import first_samples

    return first_samples(external_data_from_args(args, ext, args.split), args.samples)


def _prune_external(args, out: Path) -> dict:
    """``prune --model``: build and load the model, prune it over --data, write ``out``."""
    from sparsekern.experiments.harvest import prune_loaded, write_pruned
    from sparsekern.train.loop import resolve_device

    ext = external_model_from_args(args, "prune")
    options = _plan_options(args)
    model = ext.model.to(resolve_device(options["device"]))
    corpus = _external_corpus(args, ext)
    held_out = external_data_from_args(args, ext, "test" if args.split == "train" else "train")
    done = prune_loaded(model, corpus, by=args.by, activation_threshold=args.activation_threshold,
                        gamma_threshold=args.gamma_threshold, verify_samples=args.verify_samples,
                        batch_size=args.batch_size, progress=not args.no_progress)
    described = ext.describe()
    extra = {}
    if ext.weights is None:  # random weights: keep them, or the original could not be rebuilt
        described["dense_state_dict"] = DENSE_STATE_DICT
        extra[DENSE_STATE_DICT] = model.state_dict()
    source = {"external": described, "model": args.model, "dataset": str(_data_spec(args)),
              "source_title": f"weights {ext.weights}" if ext.weights else f"random initialisation, seed {args.seed}"}
    return write_pruned(out, {**done, "test_set": held_out}, source, by=args.by,
                        activation_threshold=args.activation_threshold, gamma_threshold=args.gamma_threshold,
                        split=args.split, test_samples=args.test_samples, batch_size=args.batch_size,
                        manifest=args.manifest, extra_files=extra)


DENSE_STATE_DICT = "dense_state_dict.pt"


def _data_spec(args):
    from sparsekern.data.specs import parse_data_spec

    return parse_data_spec(args.data)


def _export_onnx(args, out: Path) -> dict:
    """Export the pruned model saved in ``out`` to ``args.onnx`` and compare onnxruntime's output with
    torch's on 8 seeded random inputs (both run the same pruned model, so any input checks the export)."""
    from sparsekern.experiments.harvest import load_pruned
    from sparsekern.prune.export import export_onnx, onnx_max_diff

    _, pruned, plan = load_pruned(out, "cpu")
    example = torch.randn((2,) + tuple(plan.input_shape[1:]))
    path = export_onnx(pruned, example, args.onnx)
    inputs = torch.randn((8,) + tuple(plan.input_shape[1:]), generator=torch.Generator().manual_seed(0))
    check = onnx_max_diff(path, pruned, inputs)
    return {"path": str(path), **check}


# ---------------------------------------------------------------------- bench
def add_bench(subparsers) -> None:
    p = subparsers.add_parser("bench", help="dense vs pruned inference speed (BN folded, channels_last)",
                              description="Time the dense and the pruned model side by side (both BN-folded, "
                                          "channels_last; plus the dense model with fused BN-ReLU), eager and "
                                          "torch.compile, and check 1 - t_pruned/t_dense >= 0.7 * (1 - FLOPs ratio).")
    p.add_argument("source", nargs="?", help="a `sparsekern prune` output directory, or a run directory (pruned in "
                                             "memory, or with --manifest); or use --model")
    p.add_argument("--manifest", metavar="PATH", help="apply this manifest to the run's model")
    p.add_argument("--batch-sizes", type=_int_list, default=(1, 256), help="comma-separated (default 1,256)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float32 on CPU, float16 on CUDA")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-fused", action="store_true", help="skip the fused BN-ReLU row")
    p.add_argument("--rounds", type=int_at_least(3), default=15, help="interleaved timing rounds (median reported; "
                                                                    "at least 3)")
    p.add_argument("--threads", type=positive_int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeat", type=positive_int, default=1,
                   help="run the whole comparison N times, each in a fresh process, and judge the criterion on "
                        "the median time saved (single runs on shared or virtual machines scatter by several "
                        "points)")
    p.add_argument("--layers", action="store_true",
                   help="also profile every layer of both models at the largest batch size: ms and MACs side "
                        "by side, to see where time does not follow FLOPs")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    _add_plan_flags(p)
    p.add_argument("--data-root", help="with --model --data fashion-mnist: where Fashion-MNIST is")
    add_model_flags(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from sparsekern.prune import PruneVerificationError, UnsupportedModelError
    from sparsekern.bench.speed import repeat_summary
    from sparsekern.report.speed import repeat_markdown, speed_markdown

    check_one_source(args, "source", "bench")
    try:
        if args.repeat == 1:
            results = [_bench_once(args)]
        else:
            results = _bench_in_fresh_processes(args)
    except (PruneVerificationError, UnsupportedModelError) as exc:
        print(f"sparsekern bench: error: {exc}", file=sys.stderr)
        return 1
    if args.repeat == 1:
        result = results[0]
        print(speed_markdown(result))
    else:
        result = {"source": _bench_source(args), "summary": repeat_summary(results), "runs": results}
        print(repeat_markdown(result["summary"]))
    if results[0].get("layers"):
        print(results[0]["layers_markdown"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _bench_once(args) -> dict:
    """One speed comparison (and, with ``--layers``, one per-layer profile at the largest batch)."""
    import torch

    from sparsekern.bench import flush_denormals, inference_model, layer_profile, speed_comparison
    from sparsekern.experiments.harvest import dense_and_pruned
    from sparsekern.report.speed import profile_markdown

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model is None:
        dense, pruned, sample_shape = dense_and_pruned(args.source, manifest=args.manifest, **_plan_options(args))
    else:
        dense, pruned, sample_shape = _external_dense_and_pruned(args)
    device = next(dense.parameters()).device
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    result = speed_comparison(dense, pruned, sample_shape, batch_sizes=args.batch_sizes, device=device, dtype=dtype,
                              compile=not args.no_compile, fused=not args.no_fused, rounds=args.rounds,
                              log=lambda m: print(m, file=sys.stderr))
    result["source"] = _bench_source(args)
    if args.layers:
        batch = max(args.batch_sizes)
        dtype = getattr(torch, result["dtype"])
        models = {"dense": inference_model(dense, device=device, dtype=dtype),
                  "pruned": inference_model(pruned, device=device, dtype=dtype)}
        with flush_denormals(result["flush_denormal"]):
            result["layers"] = layer_profile(models, (batch,) + tuple(result["sample_shape"]), rounds=args.rounds)
        result["layers_markdown"] = f"Per layer, batch {batch}:\n\n" + profile_markdown(result["layers"], batch)
    return result


def _bench_source(args) -> str:
    return str(args.source) if args.model is None else f"{args.model} ({args.weights or 'random weights'})"


def _external_dense_and_pruned(args) -> tuple:
    """``bench --model``: the model and its pruned copy (by --manifest, or the plan flags over --data)."""
    from sparsekern.experiments.harvest import dense_and_pruned_loaded
    from sparsekern.train.loop import resolve_device

    ext = external_model_from_args(args, "bench")
    model = ext.model.to(resolve_device(args.device))
    corpus = _external_corpus(args, ext)
    options = {} if args.manifest else {"by": args.by, "activation_threshold": args.activation_threshold,
                                        "gamma_threshold": args.gamma_threshold, "batch_size": args.batch_size,
                                        "progress": not args.no_progress}
    return dense_and_pruned_loaded(model, corpus, manifest=args.manifest, verify_samples=args.verify_samples,
                                   **options)


def _bench_in_fresh_processes(args) -> list:
    """``args.repeat`` runs of :func:`_bench_once`, one after another, each in a new interpreter
    (spawned): repeats in one process would share its allocator state and page placement, which
    are part of what varies from run to run."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    results = []
    for i in range(args.repeat):
        print(f"sparsekern bench: run {i + 1} of {args.repeat}", file=sys.stderr)
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results.append(pool.submit(_bench_once, args).result())
    return results


# ---------------------------------------------------------------------- harvest
def add_harvest(subparsers) -> None:
    p = subparsers.add_parser("harvest", help="implicit sparsity vs L1-norm pruning and Network Slimming "
                                              "at the same keep ratio",
                              description="Remove a run's dead filters, then prune the same fraction with L1-norm "
                                          "filter pruning and Network Slimming; accuracy before and after "
                                          "fine-tuning, params, FLOPs, optionally speed.")
    p.add_argument("run", help="a run trained with implicit sparsity (e.g. Adam + L2)")
    slim = p.add_mutually_exclusive_group()
    slim.add_argument("--slimming-run", help="the same model trained with --reg slimming")
    slim.add_argument("--train-slimming", type=float, metavar="STRENGTH",
                      help="train that run first (the run's config with reg=slimming, reg_strength=STRENGTH, "
                           "e.g. 1e-4), next to the run; resumes if interrupted")
    p.add_argument("--by", choices=("activation", "gamma", "both"), default="activation",
                   help="what implicit sparsity removes (default: dead by activation)")
    p.add_argument("--analysis-samples", type=positive_int, help="training images the dead filters are measured on "
                                                        "(default: the run's)")
    p.add_argument("--fine-tune-steps", type=int_at_least(0),
                   help="fine-tuning steps of each baseline (default: one epoch; 0: none)")
    p.add_argument("--fine-tune-lr", type=float, default=1e-4)
    p.add_argument("--fine-tune-optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--batch-size", type=positive_int, help="fine-tuning batch size (default: the run's)")
    p.add_argument("--speed-batch-sizes", type=_int_list, default=(), help="also time each row, e.g. 1,256")
    p.add_argument("--out", help="output directory for harvest.json / harvest.md (default: <run dir>/harvest)")
    p.add_argument("--device", type=available_device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_harvest)


def _cmd_harvest(args) -> int:
    from sparsekern.experiments.harvest import harvest_run, slimming_config
    from sparsekern.report.pruning import comparison_markdown
    from sparsekern.train.config import RunConfig, check_data_root
    from sparsekern.train.loop import train

    run_dir = _run_dir(args.run)
    config = RunConfig.from_toml(run_dir / "config.toml") if (run_dir / "config.toml").is_file() else None
    if config is None:
        raise FileNotFoundError(f"{args.run}: expected a run directory with config.toml (written by `sparsekern train`)")
    check_data_root(config.data_root, str(run_dir / "config.toml"))  # before --train-slimming trains anything
    slimming_run = args.slimming_run
    if args.train_slimming is not None:
        slim = slimming_config(config, args.train_slimming).replace(out_dir=str(run_dir.parent))
        train(slim, progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr))
        slimming_run = slim.run_dir()
    options = {"analysis_samples": args.analysis_samples, "batch_size": args.batch_size}
    result = harvest_run(run_dir, slimming_run=slimming_run, device=args.device, by=args.by,
                         fine_tune_steps=args.fine_tune_steps, fine_tune_lr=args.fine_tune_lr,
                         fine_tune_optimizer=args.fine_tune_optimizer, speed_batch_sizes=args.speed_batch_sizes,
                         log=lambda m: print(m, file=sys.stderr),
                         **{k: v for k, v in options.items() if v is not None})  # unset: the run's own
    out = Path(args.out) if args.out else run_dir / "harvest"
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_markdown(result)
    (out / "harvest.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "harvest.md").write_text(f"# {result['model']} (width {result['width']}) on {result['dataset']}: "
                                    f"keep ratio {result['keep_ratio']:.3f}\n\n{table}")
    print(table)
    return 0
