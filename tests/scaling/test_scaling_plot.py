"""Scaling figures from synthetic results, and the LR-sensitivity measure of Wortsman et al."""

from __future__ import annotations

import math

import numpy as np
import pytest

from meshforge.cli import main as cli_main
from meshforge.scaling import ScalingError
from meshforge.scaling.lr_sensitivity import lr_sensitivity, read_lr_results
from test_scaling_fit import isoflop_rows, write_csv


def test_plot_writes_every_figure_from_synthetic_results(tmp_path, capsys):
    rows = isoflop_rows(sizes=6, noise=0.002)
    results = write_csv(tmp_path / "results.csv", [{"id": f"r{i}", **r, "status": "ok"} for i, r in enumerate(rows)])
    curves = [
        {
            "id": f"r{i}",
            "N": r["N"],
            "D": r["D"] * f,
            "flops": 6 * r["N"] * r["D"] * f,
            "loss": r["loss"] + 0.5 * (1 - f),
        }
        for i, r in enumerate(rows)
        for f in (0.25, 0.5, 1.0)
    ]
    write_csv(tmp_path / "curves.csv", curves)
    out = tmp_path / "figs"
    assert cli_main(["scaling", "plot", str(tmp_path), "--output", str(out)]) == 0
    for name in ("isoflop", "loss_vs_compute", "optimal", "residuals"):
        for ext in ("png", "svg"):
            f = out / f"{name}.{ext}"
            assert f.is_file() and f.stat().st_size > 5000, f
    assert (out / "isoflop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "optimal.svg").read_text().lstrip().startswith("<?xml")
    assert results.is_file()


def test_lr_sensitivity_measure():
    # best 2.0; others 2.5 and 3.0, a diverged run counts as the initial loss 4.0, one above L0 is capped
    assert lr_sensitivity([2.5, 2.0, 3.0, math.nan, 9.0], init_loss=4.0) == pytest.approx((0.5 + 0 + 1 + 2 + 2) / 5)
    assert lr_sensitivity([3.0, 3.0], init_loss=5.0) == 0.0
    flat = lr_sensitivity(2.0 + 0.01 * np.arange(5) ** 2, 6.0)
    sharp = lr_sensitivity(2.0 + 0.5 * np.arange(5) ** 2, 6.0)
    assert 0 < flat < sharp <= 4.0
    with pytest.raises(ScalingError, match="initialisation"):
        lr_sensitivity([2.0], math.nan)


def test_lr_sweep_results_give_sensitivity_per_size_and_variant_and_a_figure(tmp_path):
    rows = []
    lrs = np.geomspace(1e-4, 1e-1, 7)
    for variant, width in (("plain", 0.6), ("qk_norm+z_loss", 1.5)):
        for n, shift in ((1e5, 0.0), (1e6, -0.5)):
            for lr in lrs:  # a parabola in log LR around an optimum that moves with N; wider with qk-norm
                loss = 3.0 + ((np.log10(lr) + 2.5 - shift) / width) ** 2
                diverged = variant == "plain" and lr > 0.05
                rows.append(
                    {
                        "N": n,
                        "lr": lr,
                        "variant": variant,
                        "loss": "" if diverged else loss,
                        "init_loss": 6.5,
                        "status": "diverged" if diverged else "ok",
                    }
                )
    path = write_csv(tmp_path / "results.csv", rows)
    groups = read_lr_results(path)
    assert set(groups) == {(v, n) for v in ("plain", "qk_norm+z_loss") for n in (1e5, 1e6)}
    for n in (1e5, 1e6):
        assert groups[("qk_norm+z_loss", n)]["sensitivity"] < groups[("plain", n)]["sensitivity"]
    assert groups[("plain", 1e5)]["loss"][-1] != groups[("plain", 1e5)]["loss"][-1]  # NaN: diverged
    assert cli_main(["scaling", "plot", str(path), "--output", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "lr.png").stat().st_size > 5000 and (tmp_path / "figs" / "lr.svg").is_file()


class _KeepFigures:
    """pyplot, except that closing a figure keeps it here for the test to measure."""

    def __init__(self, plt):
        self._plt, self.figures = plt, []

    def __getattr__(self, name):
        return getattr(self._plt, name)

    def close(self, fig=None):
        self.figures.append(fig)


def _drawn_tick_labels(axis, renderer):
    lo, hi = sorted(axis.get_view_interval())
    ticks = axis.get_major_ticks() + axis.get_minor_ticks()
    return [
        t.label1.get_window_extent(renderer)
        for t in ticks
        if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi
    ]


def test_residual_figure_labels_do_not_overlap(tmp_path):
    """The CPU ladder's recorded results (D within one decade, where matplotlib labels minor log
    ticks in full): no two tick labels of an axis overlap, and no y-label reaches another panel."""
    from pathlib import Path

    from meshforge.scaling.fit import approach3, read_points
    from meshforge.scaling.plot import _pyplot, plot_residuals

    pts = read_points(Path(__file__).resolve().parents[2] / "docs" / "scaling" / "results.csv")
    plt = _KeepFigures(_pyplot())
    plot_residuals(plt, pts, approach3(pts, bootstrap=0), tmp_path)
    (fig,) = plt.figures
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_xlabel()]  # the two residual panels (not the colorbar)
    assert len(panels) == 2
    for ax in panels:
        boxes = _drawn_tick_labels(ax.xaxis, renderer)
        assert len(boxes) >= 2
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1 :]), f"overlapping tick labels on {ax.get_xlabel()}"
    for ax in panels:
        if not ax.get_ylabel():
            continue
        label = ax.yaxis.label.get_window_extent(renderer)
        for other in fig.axes:
            if other is not ax:
                assert not label.overlaps(other.get_window_extent(renderer)), "a y-label runs into the next panel"
    _pyplot().close(fig)
