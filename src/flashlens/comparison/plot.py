"""Agreement by layer as a PNG: one line per matrix (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from ..errors import FlashlensError
from .result import Comparison, percent

COLORS = {"up": "tab:blue", "gate": "tab:orange", "down": "tab:green"}


def plot_agreement(result: Comparison, path: str | Path) -> Path:
    """Three panels against the layer: same top-1 (%), top-k Jaccard, distance; one line per
    matrix. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise FlashlensError(f"--plot {path}: give a .png file name")
    dist_label = (
        "mean JSD (bits, exact)"
        if result.exact
        else "mean TV from top-k:\nlower bound (line) to upper (band)"
    )
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True, constrained_layout=True)
    for m in result.matrices:
        figs = [result.figures(m, layer) for layer in result.layers]
        style = {"color": COLORS.get(m), "marker": "o", "markersize": 3, "label": m}
        axes[0].plot(result.layers, [100 * f.same_top1 for f in figs], **style)
        axes[1].plot(result.layers, [f.jaccard for f in figs], **style)
        if result.exact:
            axes[2].plot(result.layers, [f.jsd for f in figs], **style)
        else:
            lo, hi = [f.tv_lo for f in figs], [f.tv_hi for f in figs]
            axes[2].plot(result.layers, lo, **style)
            axes[2].fill_between(result.layers, lo, hi, color=COLORS.get(m), alpha=0.15)
    overall = result.figures()
    axes[0].set_ylabel("same top-1 token (%)")
    axes[0].set_ylim(-2, 102)
    axes[0].set_title(
        f"A: {result.model_a}\nB: {result.model_b}\n"
        f"overall: {percent(overall.same_top1)} same top-1, "
        f"top-{result.top_k} Jaccard {overall.jaccard:.3f}",
        fontsize=9,
    )
    axes[1].set_ylabel(f"top-{result.top_k} Jaccard")
    axes[1].set_ylim(-0.02, 1.02)
    axes[2].set_ylabel(dist_label)
    axes[2].set_ylim(bottom=0)
    axes[2].set_xlabel("layer")
    from matplotlib.ticker import MaxNLocator

    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(title="matrix", fontsize=8, loc="best")
    for ax in axes:
        ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
