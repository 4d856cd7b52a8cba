"""The ``prune``, ``bench`` and ``harvest`` subcommands (registered in ``sparsekern.cli.SUBCOMMANDS``).

    sparsekern prune runs/<run id> [--by activation|gamma|both] [--out DIR] [--manifest plan.json]
    sparsekern bench runs/<run id>/pruned-activation [--batch-sizes 1,256] [--repeat 5] [--layers] [--json speed.json]
    sparsekern bench runs/<run id> --manifest plan.json
    sparsekern harvest runs/<run id> --slimming-run runs/<slimming run id> [--fine-tune-steps 1500]

``prune``: checkpoint -> analysis over the training corpus -> plan -> exact surgery, verified
against the original -> manifest, pruned state_dict and report (JSON, markdown) in ``--out``
(default: ``<run dir>/pruned-<by>``). ``bench``: dense versus pruned inference speed, both with BN
folded and channels_last, plus the dense model with fused BN-ReLU; the source is a ``prune``
output directory, a run directory with ``--manifest``, or a bare run directory (pruned in memory
as ``prune`` would; ``sparsekern.bench``). ``harvest``: implicit sparsity versus L1-norm pruning and
Network Slimming at the same keep ratio (``sparsekern.experiments.harvest``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparsekern.cli import available_device, int_at_least, positive_int

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
    p = subparsers.add_parser("prune", help="remove a trained run's dead filters exactly; save manifest, weights, report",
                              description="Analyse a checkpoint over its training corpus, remove the dead filters "
                                          "exactly, verify, and save the manifest, pruned weights and a report.")
    p.add_argument("run", help="a run directory or its checkpoint.pt (config.toml beside it)")
    p.add_argument("--out", help="output directory (default: <run dir>/pruned-<by>)")
    p.add_argument("--manifest", metavar="PATH", help="also write the JSON manifest (the plan) here")
    p.add_argument("--test-samples", type=positive_int, help="compare original and pruned on the first N test images "
                                                    "(default: the run's test set)")
    _add_plan_flags(p)
    p.set_defaults(func=_cmd_prune)


def _run_dir(path: str) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


def _cmd_prune(args) -> int:
    from sparsekern.prune import PruneVerificationError, UnsupportedModelError
    from sparsekern.experiments.harvest import FILES, prune_run

    out = Path(args.out) if args.out else _run_dir(args.run) / f"pruned-{args.by}"
    try:
        summary = prune_run(args.run, out, manifest=args.manifest, test_samples=args.test_samples,
                            **_plan_options(args))
    except (PruneVerificationError, UnsupportedModelError) as exc:
        print(f"sparsekern prune: error: {exc}", file=sys.stderr)
        return 1
    held = summary["held_out"]
    print((out / FILES["markdown"]).read_text())
    print(json.dumps({"out": str(out), "filters_removed_pct": summary["filters_removed_pct"],
                      "flops_before": summary["flops_before"], "flops_after": summary["flops_after"],
                      "test_agreement": held["agreement"], "max_rel_logit_diff": held["max_rel_logit_diff"]}))
    return 0


# ---------------------------------------------------------------------- bench
def add_bench(subparsers) -> None:
    p = subparsers.add_parser("bench", help="dense vs pruned inference speed (BN folded, channels_last)",
                              description="Time the dense and the pruned model side by side (both BN-folded, "
                                          "channels_last; plus the dense model with fused BN-ReLU), eager and "
                                          "torch.compile, and check 1 - t_pruned/t_dense >= 0.7 * (1 - FLOPs ratio).")
    p.add_argument("source", help="a `sparsekern prune` output directory, or a run directory (pruned in memory, "
                                  "or with --manifest)")
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
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from sparsekern.prune import PruneVerificationError, UnsupportedModelError
    from sparsekern.bench.speed import repeat_summary
    from sparsekern.report.speed import repeat_markdown, speed_markdown

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
        result = {"source": str(args.source), "summary": repeat_summary(results), "runs": results}
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
    dense, pruned, sample_shape = dense_and_pruned(args.source, manifest=args.manifest, **_plan_options(args))
    device = next(dense.parameters()).device
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    result = speed_comparison(dense, pruned, sample_shape, batch_sizes=args.batch_sizes, device=device, dtype=dtype,
                              compile=not args.no_compile, fused=not args.no_fused, rounds=args.rounds,
                              log=lambda m: print(m, file=sys.stderr))
    result["source"] = str(args.source)
    if args.layers:
        batch = max(args.batch_sizes)
        dtype = getattr(torch, result["dtype"])
        models = {"dense": inference_model(dense, device=device, dtype=dtype),
                  "pruned": inference_model(pruned, device=device, dtype=dtype)}
        with flush_denormals(result["flush_denormal"]):
            result["layers"] = layer_profile(models, (batch,) + tuple(result["sample_shape"]), rounds=args.rounds)
        result["layers_markdown"] = f"Per layer, batch {batch}:\n\n" + profile_markdown(result["layers"], batch)
    return result


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
