"""Markdown of pruning results: the report of ``sparsekern prune`` and the method comparison of
``sparsekern harvest`` (the numbers come from ``sparsekern.experiments.harvest``)."""
from __future__ import annotations


def percent(value) -> str:
    """A fraction as '12.34%', or '-' for None (not measured)."""
    return "-" if value is None else f"{100 * value:.2f}%"


def prune_markdown(summary: dict, surgery_table: str) -> str:
    """prune_report.md: the plan, the surgery table (``PruneReport.summary()``) and the held-out check."""
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


def comparison_markdown(result: dict) -> str:
    """The rows of ``compare_methods`` as a markdown table."""
    speed_keys = [k for k in (result["rows"][0] if result["rows"] else {}) if k.startswith("ms_per_batch_")]
    header = ["method", "filters removed", "params", "MFLOPs", "accuracy", "accuracy fine-tuned"] + [
        f"ms/batch (b={k.rsplit('b', 1)[1]})" for k in speed_keys]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in result["rows"]:
        cells = [r["method"], f"{r['filters_removed_pct']:.1f}%", f"{r['params']:,}", f"{r['flops'] / 1e6:.1f}",
                 percent(r["accuracy_before_ft"]), percent(r["accuracy_after_ft"])]
        if r["accuracy_after_ft"] is not None:
            cells[-1] += f" ({r['fine_tune_steps']} steps)"
        cells += [f"{r[k]:.3g}" for k in speed_keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines) + "\n"
