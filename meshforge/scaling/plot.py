"""The figures of a results CSV or sweep dir (matplotlib, Agg backend), each as PNG and SVG.

- ``isoflop``: loss vs N for each budget, the fitted parabolas (approach 2) and their minima.
- ``loss_vs_compute``: every run's final loss vs C, the training curves where present, and the
  frontier of approach 3 (the loss of the compute-optimal N, D at each C).
- ``optimal``: N_opt and D_opt vs C on log axes, the IsoFLOP minima and the power laws of
  approaches 1, 2 and 3.
- ``residuals``: the parametric fit's log residuals vs N and vs D.
- ``lr``: final loss vs learning rate per size and variant, with the LR sensitivity of each
  (:mod:`.lr_sensitivity`), when the results hold more than one learning rate.

A figure whose fit fails (too few budgets, say) is left out with a note.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import ScalingError
from .fit import Points, approach1, approach2, approach3, envelope_points, predict_power, read_points, resolve_inputs


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1])
    _pyplot().close(fig)
    return paths


def plot_isoflop(plt, pts: Points, a2: dict, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(a2["budgets"])))
    for b, color in zip(a2["budgets"], colors):
        idx = np.flatnonzero(np.isclose(np.log(pts.c), np.log(b["C"]), atol=0.12))
        ax.scatter(pts.n[idx], pts.loss[idx], color=color, s=18, label=f"C = {b['C']:.2g}")
        lo, hi = np.log(pts.n[idx].min()) - 0.2, np.log(pts.n[idx].max()) + 0.2
        v = np.log(b["N_opt"])  # reach an extrapolated vertex too (at most 1.5 e-folds out)
        x = np.linspace(min(lo, max(v, lo - 1.5)), max(hi, min(v, hi + 1.5)), 100)
        ax.plot(np.exp(x), np.polyval(b["parabola_logN"], x), color=color, lw=1)
        ax.scatter([b["N_opt"]], [b["loss_opt"]], color=color, marker="*", s=120, edgecolor="k", zorder=3)
    ax.set(
        xscale="log",
        xlabel="parameters N (non-embedding)",
        ylabel="final validation loss",
        title="IsoFLOP profiles (approach 2)",
    )
    ax.legend(fontsize=8)
    return _save(fig, out, "isoflop")


def plot_loss_vs_compute(plt, pts: Points, curves: Points | None, fit, k: float, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if curves is not None:
        ids = curves.extra.get("id", [])
        for rid in dict.fromkeys(ids):
            m = np.array([i == rid for i in ids])
            ax.plot(curves.c[m], curves.loss[m], color="0.8", lw=0.6, zorder=1)
    sc = ax.scatter(pts.c, pts.loss, c=np.log10(pts.n), cmap="viridis", s=20, zorder=2)
    fig.colorbar(sc, ax=ax, label="log10 N")
    if fit is not None:
        c = np.geomspace(pts.c.min() / 2, pts.c.max() * 4, 100)
        ax.plot(c, fit.optimal(c, k)[2], "r-", lw=1.5, label="compute-optimal frontier (approach 3)")
        ax.legend(fontsize=8)
    ax.set(xscale="log", xlabel="training compute C (FLOPs)", ylabel="loss", title="Loss vs compute")
    lo, hi = np.percentile(pts.loss, [0, 100])
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.5 * (hi - lo + 1e-9))
    return _save(fig, out, "loss_vs_compute")


def plot_optimal(plt, pts: Points, a1, a2, fit, k: float, out: Path) -> list[Path]:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    c = np.geomspace(pts.c.min() / 3, pts.c.max() * 10, 50)
    for ax, key, idx in ((axes[0], "N_opt", 0), (axes[1], "D_opt", 1)):
        if a2 is not None:
            ax.scatter(
                [b["C"] for b in a2["budgets"]],
                [b[key] for b in a2["budgets"]],
                color="C0",
                zorder=3,
                label="IsoFLOP minima",
            )
            ax.plot(c, predict_power(a2[key], c), "C0-", label=f"approach 2: C^{a2[key]['exponent']:.2f}")
        if a1 is not None:
            ax.scatter(
                [e["C"] for e in a1["envelope"]],
                [e[key[0]] for e in a1["envelope"]],
                color="C1",
                marker="s",
                s=16,
                zorder=3,
                label="envelope (approach 1)",
            )
            ax.plot(c, predict_power(a1[key], c), "C1--", label=f"approach 1: C^{a1[key]['exponent']:.2f}")
        if fit is not None:
            exp = fit.a if idx == 0 else fit.b
            ax.plot(c, fit.optimal(c, k)[idx], "C2:", label=f"approach 3: C^{exp:.2f}")
        ax.set(xscale="log", yscale="log", xlabel="C (FLOPs)", ylabel=key.replace("_opt", " optimal"))
        ax.legend(fontsize=8)
    fig.suptitle("Compute-optimal model size and tokens")
    return _save(fig, out, "optimal")


def _log_ticks(axis) -> None:
    """Log-axis ticks at 1, 2 and 5 per decade, labelled compactly (2e6); no labels on minor ticks,
    which matplotlib otherwise writes in full (``4 x 10^5``) and overlaps on a range under a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def label(x, _pos) -> str:
        mantissa, exponent = f"{x:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(NullFormatter())


def residual_figure(plt, pts: Points, fit):
    """The parametric fit's log residuals vs N and vs D: one shared y-axis (labelled once, on the
    left), compact log ticks, constrained layout so labels and the colorbar never overlap."""
    resid = np.log(fit.predict(pts.n, pts.d)) - np.log(pts.loss)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True, layout="constrained")
    for ax, x, label in ((axes[0], pts.n, "parameters N (non-embedding)"), (axes[1], pts.d, "tokens D")):
        sc = ax.scatter(x, resid, c=np.log10(pts.c), cmap="plasma", s=18)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel=label)
        _log_ticks(ax.xaxis)
    axes[0].set_ylabel("log L_fit - log L")
    fig.colorbar(sc, ax=axes, label="log10 C (FLOPs)")
    fig.suptitle(f"Parametric fit residuals (rms {np.sqrt(np.mean(resid**2)):.3g})")
    return fig


def plot_residuals(plt, pts: Points, fit, out: Path) -> list[Path]:
    fig = residual_figure(plt, pts, fit)
    paths = [out / "residuals.png", out / "residuals.svg"]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def plot_all(
    results: str | Path, output: str | Path | None = None, bootstrap: int = 0, log=print, envelope: str = "final"
) -> list[Path]:
    """Write every figure the results allow; returns the paths written."""
    results_path, curves_path = resolve_inputs(results)
    out = Path(output) if output else results_path.parent / "figures"
    with results_path.open() as f:
        header = f.readline().strip().split(",")
    if "lr" in header:
        import csv

        with results_path.open(newline="") as f:
            lrs = {r["lr"] for r in csv.DictReader(f)}
        if len(lrs) > 1:  # an LR sweep: its own figure (diverged rows take part there)
            from .lr_sensitivity import plot_lr

            out.mkdir(parents=True, exist_ok=True)
            return plot_lr(_pyplot(), results_path, out, _save)
    pts = read_points(results_path)
    plt = _pyplot()  # before anything is written: matplotlib is an extra
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    a1 = a2 = fit = None
    try:
        a2 = approach2(pts)
        paths += plot_isoflop(plt, pts, a2, out)
    except ScalingError as e:
        log(f"no IsoFLOP figure: {e}")
    curves = read_points(curves_path, ("flops",)) if curves_path else None
    try:
        a1 = approach1(envelope_points(results_path, curves_path, envelope))
    except ScalingError as e:
        log(f"approach 1 left out of the figures: {e}")
    try:
        fit = approach3(pts, bootstrap=bootstrap)
    except ScalingError as e:
        log(f"no parametric fit in the figures: {e}")
    k = float(np.median(pts.c / (pts.n * pts.d)))
    paths += plot_loss_vs_compute(plt, pts, curves, fit, k, out)
    paths += plot_optimal(plt, pts, a1, a2, fit, k, out)
    if fit is not None:
        paths += plot_residuals(plt, pts, fit, out)
    return paths
