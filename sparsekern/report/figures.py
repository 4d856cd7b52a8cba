"""The paper's figures as PNG files (matplotlib, Agg backend: no display needed).

    figure_gamma_beta   Figure 2: per layer, BN gamma against beta for every feature; features
                        inactive by activation are marked, the |gamma| < 1e-3 band is shaded
    figure_selectivity  Figure 3: per layer, the distribution of feature selectivity over the
                        live features, one box per setting (e.g. Adam versus SGD)
    figure_gamma_decay  Figure 4: mean |gamma| and % of |gamma| < 1e-3 over training steps,
                        one line per setting (e.g. L2-Adam versus WD-Adam versus L2-SGD)
    pyplot              matplotlib.pyplot (Agg), or an ImportError naming the ``figures`` extra
"""
from __future__ import annotations

import math
from functools import cache
from pathlib import Path


@cache
def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, never a window).

    matplotlib is an optional dependency (the ``figures`` extra), imported only when a figure is
    drawn, so that the tables of sparsekern.report work without it.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("drawing figures needs matplotlib, which is not installed: "
                          "pip install 'sparsekern[figures]'") from exc
    matplotlib.use("Agg")  # before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _layer_axes(count: int, title: str, height: float = 2.6):
    plt = pyplot()
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, height * rows), squeeze=False)
    fig.suptitle(title)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _save(fig, path, top: float = 1.0) -> Path:
    """Lay out (leaving the fraction above ``top`` to a legend under the title), write, close."""
    path = Path(path)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def figure_gamma_beta(result: dict, path, title: str) -> Path:
    """Figure 2 from one result.json: gamma (x) vs beta (y) per layer, dead features in red."""
    layers = [l for l in result["layers"] if l.get("gamma") is not None]
    if not layers:
        raise ValueError(f"{result['run_id']}: no layer has BatchNorm parameters to plot")
    threshold = result["thresholds"]["gamma"]
    fig, axes = _layer_axes(len(layers), f"BN γ vs β per layer: {title}")
    for ax, layer in zip(axes, layers):
        dead = layer["dead_mask"]
        live_points = [(g, b) for g, b, d in zip(layer["gamma"], layer["beta"], dead) if not d]
        dead_points = [(g, b) for g, b, d in zip(layer["gamma"], layer["beta"], dead) if d]
        ax.axvspan(-threshold, threshold, color="0.85", zorder=0)
        if live_points:
            ax.scatter(*zip(*live_points), s=8, color="tab:blue")
        if dead_points:
            ax.scatter(*zip(*dead_points), s=14, marker="x", color="tab:red")
        ax.set_title(f"{layer['label']}: {sum(dead)}/{layer['channels']} inactive", fontsize=9)
        ax.set_xlabel("γ")
        ax.set_ylabel("β")
    # One legend for the figure: a given layer may have no dead (or no live) features to label.
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], ls="", marker="o", ms=4, color="tab:blue", label="active"),
               Line2D([], [], ls="", marker="x", ms=5, color="tab:red", label="inactive by activation"),
               Patch(color="0.85", label=f"|γ| < {threshold:g}")]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=3, fontsize=8, frameon=False)
    return _save(fig, path, top=0.9)


def figure_selectivity(results: dict[str, dict], path) -> Path:
    """Figure 3: per layer, box plots of the selectivity of live features, one box per setting."""
    labels = list(results)
    usable = {k: r for k, r in results.items() if any(l.get("selectivity") for l in r["layers"])}
    if not usable:
        raise ValueError("no result has per-feature selectivity (run with selectivity='two-pass')")
    layer_labels = [l["label"] for l in next(iter(usable.values()))["layers"]]
    fig, axes = _layer_axes(len(layer_labels), "Feature selectivity per layer (live features)", height=3.0)
    for ax, layer_label in zip(axes, layer_labels):
        data, names = [], []
        for label in labels:
            layer = next((l for l in results[label]["layers"] if l["label"] == layer_label), None)
            if layer is None or not layer.get("selectivity"):
                continue
            values = [s for s, d in zip(layer["selectivity"], layer["dead_mask"]) if not d and s is not None]
            data.append(values if values else [math.nan])
            names.append(label)
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(layer_label, fontsize=9)
        ax.set_ylabel("selectivity")
    return _save(fig, path)


def figure_gamma_decay(metrics: dict[str, list[dict]], path, gamma_threshold: float = 1e-3) -> Path:
    """Figure 4: mean |gamma| (log scale) and % |gamma| < threshold against the training step."""
    if not any(metrics.values()):
        raise ValueError("no metrics.jsonl lines to plot")
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.6))
    for label, lines in metrics.items():
        steps = [m["step"] for m in lines]
        left.plot(steps, [m["total"]["mean_abs_gamma"] for m in lines], marker=".", label=label)
        right.plot(steps, [m["total"]["dead_by_gamma_pct"] for m in lines], marker=".", label=label)
    left.set_yscale("log")
    left.set_title("mean |γ| over all BN features")
    right.set_title(f"% features with |γ| < {gamma_threshold:g}")
    for ax in (left, right):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    return _save(fig, path)
