"""Learning-rate sensitivity (Wortsman et al., "Small-scale proxies for large-scale Transformer
training instabilities", 2023, section 3.1):

    LR sensitivity = E_{eta in [a, b]} [ min(L(eta), L_0) - min_{eta' in [a, b]} L(eta') ]

the mean, over the learning rates tried (log-spaced in the paper), of how much worse than the
best learning rate each one ends, where a run that diverged or ends above the loss at
initialisation L_0 counts as L_0. Lower means the final loss depends less on the LR. The paper
shows that QK-layernorm and the z-loss lower it, and that without them it grows with model size.

The results of an ``lr`` sweep (``meshforge scaling plan --kind lr``) give one value per
(size, variant); diverged and failed rows take part with L_0 (their ``init_loss`` column, the
validation loss at step 0, else the largest initial loss of the sweep).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import ScalingError


def lr_sensitivity(losses, init_loss: float) -> float:
    """The measure over one LR sweep of one model: ``losses`` at each learning rate (NaN/inf: diverged)."""
    if not math.isfinite(init_loss):
        raise ScalingError(f"the loss at initialisation must be finite, got {init_loss}")
    capped = np.array([min(float(v), init_loss) if math.isfinite(float(v)) else init_loss for v in losses])
    if not len(capped):
        raise ScalingError("LR sensitivity needs at least one learning rate")
    return float(np.mean(capped - capped.min()))


def read_lr_results(path: str | Path) -> dict[tuple[str, float], dict]:
    """{(variant, N): {"lr": [...], "loss": [...], "init_loss": L_0}} from an LR sweep's results.csv."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"N", "lr", "loss"}
    if not rows or not need <= set(rows[0]):
        raise ScalingError(f"{path}: an LR sweep's results need columns N, lr, loss")

    def num(text) -> float:
        try:
            return float(text)
        except (TypeError, ValueError):
            return math.nan

    inits = [num(r.get("init_loss")) for r in rows]
    fallback = max((v for v in inits if math.isfinite(v)), default=math.nan)
    groups: dict[tuple[str, float], dict] = defaultdict(lambda: {"lr": [], "loss": [], "init_loss": math.nan})
    for r, init in zip(rows, inits):
        g = groups[(r.get("variant", "") or "", num(r["N"]))]
        ok = r.get("status", "ok") == "ok"
        g["lr"].append(num(r["lr"]))
        g["loss"].append(num(r["loss"]) if ok else math.nan)
        g["init_loss"] = (
            init if math.isfinite(init) else (g["init_loss"] if math.isfinite(g["init_loss"]) else fallback)
        )
    for g in groups.values():
        order = np.argsort(g["lr"])
        g["lr"], g["loss"] = [g["lr"][i] for i in order], [g["loss"][i] for i in order]
        g["sensitivity"] = lr_sensitivity(g["loss"], g["init_loss"]) if math.isfinite(g["init_loss"]) else math.nan
    return dict(groups)


def plot_lr(plt, results: str | Path, out: Path, save) -> list[Path]:
    """Loss vs LR per size (a panel per variant) and LR sensitivity vs N per variant."""
    groups = read_lr_results(results)
    variants = sorted({v for v, _ in groups})
    sizes = sorted({n for _, n in groups})
    colors = dict(zip(sizes, plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))))
    fig, axes = plt.subplots(1, len(variants) + 1, figsize=(4.5 * (len(variants) + 1), 4), squeeze=False)
    top = max(g["init_loss"] for g in groups.values() if math.isfinite(g["init_loss"]))
    for ax, v in zip(axes[0], variants):
        for n in sizes:
            g = groups.get((v, n))
            if g is None:
                continue
            shown = [min(x, g["init_loss"]) if math.isfinite(x) else g["init_loss"] for x in g["loss"]]
            ax.plot(g["lr"], shown, "o-", color=colors[n], ms=3, label=f"N={n:.3g}")
        ax.set(
            xscale="log",
            xlabel="peak learning rate",
            ylabel="final validation loss",
            title=v or "runs",
            ylim=(None, top * 1.02),
        )
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for v in variants:
        pts = sorted((n, groups[(v, n)]["sensitivity"]) for n in sizes if (v, n) in groups)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=v or "runs")
    ax.set(xscale="log", xlabel="parameters N", ylabel="LR sensitivity", title="LR sensitivity (Wortsman et al.)")
    ax.legend(fontsize=8)
    return save(fig, out, "lr")
