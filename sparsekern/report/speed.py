"""Markdown of speed results: a ``sparsekern bench`` comparison, its repeated runs, and the
per-layer profile (the numbers come from ``sparsekern.bench``; the criterion's factor from the
result itself)."""
from __future__ import annotations

FUSED_MS = "dense fused bn-relu ms"


def _where(env, fallback: str) -> str:
    """'<device> (<threads> threads, torch <version>, <date>)' from a timing_environment dict."""
    if not env:
        return fallback
    return f"{env['device_name']} ({env['torch_threads']} threads, torch {env['torch']}, {env['date'][:10]})"


def _setting(result: dict, where: str) -> str:
    """'<where>, <dtype>, input <shape>; FLOPs/sample <dense>M -> <pruned>M'."""
    return (f"{where}, {result['dtype']}, input {result['sample_shape']}; FLOPs/sample "
            f"{result['flops_dense'] / 1e6:.1f}M -> {result['flops_pruned'] / 1e6:.1f}M")


def speed_markdown(result: dict) -> str:
    """The rows of ``sparsekern.bench.speed_comparison`` as a markdown table."""
    factor = result["criterion_factor"]
    fused = any(FUSED_MS in r for r in result["rows"])
    header = ["mode", "batch", "dense ms", "pruned ms"] + (["fused bn-relu ms"] if fused else []) + [
        "speedup", "FLOP ratio", "time saved", f"{factor} x FLOPs saved", "criterion"]
    lines = [_setting(result, _where(result.get("environment"), result["device"]))
             + ("; subnormal weights set to zero except in 'eager, subnormals' rows"
                if result.get("flush_denormal") else ""), "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in result["rows"]:
        cells = [r["mode"], str(r["batch"]), f"{r['dense ms']:.3f}", f"{r['pruned ms']:.3f}"]
        if fused:
            cells.append(f"{r[FUSED_MS]:.3f}" if FUSED_MS in r else "-")
        cells += [f"{r['speedup']:.2f}x", f"{r['flop_ratio']:.2f}x", f"{100 * r['time_saved']:.1f}%",
                  f"{100 * factor * r['flops_saved']:.1f}%", "met" if r["criterion_met"] else "not met"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"- torch.compile of {k}: {v}" for k, v in result["compile"].items() if v != "ok"]
    if any(result.get("subnormal_parameters", {}).values()):
        lines.append(f"- subnormal parameters: dense {result['subnormal_parameters']['dense']}, "
                     f"pruned {result['subnormal_parameters']['pruned']}")
    return "\n".join(lines) + "\n"


def repeat_markdown(summary: dict) -> str:
    """``sparsekern.bench.repeat_summary`` as a markdown table."""
    factor = summary["criterion_factor"]
    lines = [f"{_setting(summary, _where(summary['environment'], 'device unknown'))}; "
             f"{summary['repeats']} runs, each in a fresh process; criterion judged on the median", "",
             "| mode | batch | dense ms | pruned ms | speedup | FLOP ratio | time saved, median [min, max] "
             f"| {factor} x FLOPs saved | runs met | criterion |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['dense_ms_median']:.3f} | {r['pruned_ms_median']:.3f} | "
                     f"{r['speedup_median']:.2f}x | {r['flop_ratio']:.2f}x | {100 * r['time_saved_median']:.1f}% "
                     f"[{100 * r['time_saved_min']:.1f}, {100 * r['time_saved_max']:.1f}] | "
                     f"{100 * factor * r['flops_saved']:.1f}% | {r['runs_met']}/{r['runs']} | "
                     f"{'met' if r['criterion_met'] else 'not met'} |")
    return "\n".join(lines) + "\n"


def profile_markdown(rows: list, batch: int, labels=("dense", "pruned")) -> str:
    """A markdown table of ``sparsekern.bench.layer_profile`` rows for two models, timed at
    ``batch``: ms and MACs each, the share of time and of MACs each layer saves, and the first
    model's nanoseconds per multiply-add (what a MAC costs in that layer: the number that says why
    time need not track FLOPs)."""
    a, b = labels
    header = ["layer", f"{a} ms", f"{b} ms", "time saved", f"{a} MACs", f"{b} MACs", "MACs saved",
              f"{a} ns/MAC"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]

    def pct(before, after):
        return "-" if not before or after is None else f"{100 * (1 - after / before):.0f}%"

    def ms(v):
        return "-" if v is None else f"{v:.2f}"

    def count(v):
        return "-" if v is None else (f"{v / 1e6:.2f}M" if v else "0")

    for r in rows:
        ta, tb, ma, mb = r[f"{a} ms"], r[f"{b} ms"], r[f"{a} MACs"], r[f"{b} MACs"]
        per_mac = "-" if not ma or ta is None else f"{1e6 * ta / (ma * batch):.3f}"
        lines.append("| " + " | ".join([r["layer"], ms(ta), ms(tb), pct(ta, tb), count(ma), count(mb),
                                        pct(ma, mb), per_mac]) + " |")
    return "\n".join(lines) + "\n"
