"""The method table's files: ``method_table.json`` (everything measured), ``method_table.md``
(the table with how it was made) and ``method_table.csv``, from the results of
``sparsekern.experiments.method_table.measure``."""
from __future__ import annotations

import json
from pathlib import Path

from sparsekern.experiments import write_text
from sparsekern.report.tables import Table, markdown_table

OUTPUT_STEM = "method_table"


def _r(value, digits: int = 2):
    return None if value is None else round(float(value), digits)


def table_rows(results: dict) -> tuple[list[str], list[list]]:
    """(columns, rows) of the table: one line per method."""
    batch = results["speed"]["batch"]
    columns = ["method", "trained with", "fraction chosen", "filters removed (%)", "filters left",
               "dense acc. (%)", "pruned acc. (%)", "params", "MFLOPs", f"pruned ms/batch (b{batch})",
               f"dense ms/batch (b{batch})", "speedup"]
    lines = []
    for r in results["rows"]:
        fraction = "exact" if r["method"] == "implicit" else ("-" if r["selected_fraction"] is None
                                                              else f"{r['selected_fraction']:g}")
        lines.append([r["label"], r["trained_with"], fraction, _r(r["filters_removed_pct"], 1),
                      f"{r['filters_kept']} / {r['filters']}", _r(r["dense_accuracy_pct"]),
                      _r(r["pruned_accuracy_pct"]), r["params"], _r(r["flops"] / 1e6), _r(r["ms_per_batch"]),
                      _r(r["dense_ms_per_batch"]), _r(r["speedup"])])
    return columns, lines


def _implicit_exactness(samples: int, on_corpus: dict | None, on_report: dict) -> str:
    """The implicit row's exactness sentence: measured on the plan's own corpus and on the report half."""
    def agreement(logits: dict) -> str:
        return (f"predictions agree with the dense network's on {100 * logits['agreement']:.2f}% of the images, max "
                f"|logit difference| {logits['max_abs_logit_diff']:.3g} (logit scale {logits['logit_scale']:.3g})")

    # Tables written before logits_on_corpus existed only have the report half.
    corpus = f": {agreement(on_corpus)}" if on_corpus else ""
    return (f"Implicit sparsity is exact on the training images its plan was measured on ({samples}){corpus}; on "
            f"the report half, images it never saw, its {agreement(on_report)}.")


def write_outputs(results: dict, out: Path) -> dict[str, Path]:
    """method_table.json / .md / .csv in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    config = results["config"]
    columns, lines = table_rows(results)
    budget = f"{config['steps']} steps" if config["steps"] is not None else f"{config['epochs']} epochs"
    speed = results["speed"]
    dense = results["rows"][0]
    implicit = next(r for r in results["rows"] if r["method"] == "implicit")
    logits = implicit["logits_vs_dense"]
    ranking = "\n".join(f"- **{r['label']}** ({r['trained_with']}): {r['ranking']}." for r in results["rows"])
    reused = [t for t, run in results["runs"].items() if run["reused"]]
    markdown = "\n".join([
        "# Filter pruning methods compared: BasicNet, no fine-tuning",
        "",
        f"BasicNet width {config['width']:g} on `{config['dataset']}`; every network trained for {budget}, batch "
        f"{config['batch_size']}, seed {config['seed']}. Dense: {dense['params_dense']:,} params, "
        f"{dense['flops_dense'] / 1e6:.2f} MFLOPs per {'x'.join(map(str, results['input_shape'][1:]))} image, "
        f"{dense['filters']} prunable filters (the Conv layers followed by a BN).",
        "",
        f"Selection and report on disjoint halves of the test split: each swept method takes the largest "
        f"fraction of {{{', '.join(f'{f:g}' for f in sorted(config['fractions']))}}} whose accuracy on the first "
        f"{results['test_samples']['select']} test images stays within {config['tolerance_pct']:g} points of its "
        f"dense network's; the accuracies below are on the other {results['test_samples']['report']} images. "
        "'filters removed' is what surgery removed at that fraction (per-layer rounding, at least one filter "
        "kept per layer).",
        "",
        ranking,
        "",
        markdown_table(columns, lines),
        "",
        f"Speed: {speed['device']}, {speed['dtype']}, {speed['threads']} thread(s), batch {speed['batch']}, BN "
        f"folded, channels_last, eager; median of {speed['rounds']} interleaved rounds, every network timed in "
        "the same measurement ('dense' is the row's own unpruned network).",
        "",
        _implicit_exactness(results['analysis_samples'], implicit.get("logits_on_corpus"), logits),
        "",
        f"Settings: L2 {config['l2_strength']:g}, slimming {config['slimming_strength']:g}, CGES "
        f"{config['cges_strength']:g} (momentum SGD lr {config['cges_lr']:g}); Split LBI lr {config['slbi_lr']:g}, "
        f"kappa {config['slbi_kappa']:g}, nu {config['slbi_nu']:g}. CGES and Split LBI are untuned here."
        + (f" Reused finished runs: {', '.join(reused)}." if reused else ""),
        "",
    ] + [f"- {note}" for note in results["notes"]] + ([""] if results["notes"] else []))
    return {
        "json": write_text(out / f"{OUTPUT_STEM}.json", json.dumps(results, indent=1) + "\n"),
        "md": write_text(out / f"{OUTPUT_STEM}.md", markdown),
        "csv": write_text(out / f"{OUTPUT_STEM}.csv", Table(OUTPUT_STEM, "", columns, lines).to_csv()),
    }
