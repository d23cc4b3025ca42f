"""Plots of the accuracy / compute trade-off. matplotlib is imported here only, when a plot is
asked for: it is in the `export` extra, not a server dependency."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

Point = tuple[float, float, float]  # (compute fraction, agreement, accuracy)


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():  # noqa: ANN202 - the module
    try:
        import matplotlib
    except ImportError as err:
        raise PlotUnavailable(
            "plotting needs matplotlib, which is in the export extra: pip install 'offramp[export]'"
        ) from err
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_frontiers(
    curves: Mapping[str, Sequence[Point]],
    path: str | Path,
    *,
    title: str = "",
    chosen: Mapping[str, Point] | None = None,
    target: tuple[str, float] | None = None,
) -> Path:
    """Agreement with the full model (left) and accuracy (right) against the compute fraction,
    one line per criterion; `chosen` marks each criterion's calibrated policy; `target` draws the
    target (`("target_agreement", 0.99)`, `("target_accuracy", ...)` or `("compute_budget", ...)`)."""
    plt = _pyplot()
    many = len(curves) > 8  # e.g. `offramp compare`: the legend goes beside the plots
    fig, axes = plt.subplots(1, 2, figsize=(15 if many else 11, 5.5 if many else 4.5), sharex=True)
    # 10 colours x 3 line styles: up to 30 curves stay distinguishable.
    colours = plt.get_cmap("tab10").colors
    styles = ("-", "--", ":")
    for i, (criterion, points) in enumerate(curves.items()):
        pts = sorted(points)
        if not pts:
            continue
        compute = [p[0] for p in pts]
        look = {"color": colours[i % 10], "linestyle": styles[(i // 10) % 3]}
        line = axes[0].plot(compute, [p[1] for p in pts], marker=".", label=criterion, **look)[0]
        axes[1].plot(compute, [p[2] for p in pts], marker=".", label=criterion, **look)
        if chosen and criterion in chosen:
            c, agreement, accuracy = chosen[criterion]
            axes[0].plot([c], [agreement], marker="*", markersize=14, color=line.get_color())
            axes[1].plot([c], [accuracy], marker="*", markersize=14, color=line.get_color())
    for ax, what in zip(axes, ("agreement with the full model", "accuracy"), strict=True):
        ax.set_xlabel("compute fraction (executed / full-depth FLOPs)")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
    if target is not None:
        kind, value = target
        if kind == "compute_budget":
            for ax in axes:
                ax.axvline(value, color="grey", linestyle="--", linewidth=1, label="compute budget")
        else:
            axes[0 if kind == "target_agreement" else 1].axhline(
                value, color="grey", linestyle="--", linewidth=1, label="target")
    if many:
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="x-small", ncol=1)
    else:
        axes[0].legend(loc="lower right", fontsize="small")
    fig.suptitle(title or "exit policies: quality against compute (calibration data; * = chosen)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
