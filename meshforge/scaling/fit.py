"""Chinchilla's three approaches on (N, D, loss) points.

Input: any CSV with columns ``N``, ``D``, ``loss`` (others ignored), or a sweep dir (its
results.csv; approach 1 reads its curves.csv). A ``status`` column keeps only ``ok`` rows. C
is the ``budget`` column where present (IsoFLOP groups), else the ``flops`` column, else 6ND.

1. Minimum-loss envelope. By default over each run's **final** loss (the end of its own
   schedule): per IsoFLOP budget (or, without a ``budget`` column, per log-spaced bin of C) the
   run of lowest loss gives (C, N, D); log N_opt and log D_opt are fitted linearly in log C. A
   cosine run's intermediate points are not at the end of any schedule (its LR has not
   decayed there), so their envelope is biased; ``envelope="curves"`` reads the training curves
   (curves.csv) instead, for schedules whose intermediate points are valid (constant LR, or
   Chinchilla's several cosine lengths per size).
2. IsoFLOP profiles: for each budget a parabola of loss in log N (and one in log D); its vertex
   is (N_opt, D_opt) of that budget; then N_opt ~ C^a, D_opt ~ C^b by least squares in logs
   (intervals: +-1.96 standard errors of the slope, with 3 or more budgets).
3. The parametric law (:mod:`.parametric`). Its compute-optimal allocation needs C in terms of
   N and D: C = k N D with k the median of C / (N D) over the input rows (6 for data whose C is
   6ND; larger for our small models, whose attention and output projection are outside N).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import ScalingError

REQUIRED = ("N", "D", "loss")


@dataclass
class Points:
    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray
    c: np.ndarray
    grouped: bool
    """C came from a ``budget`` column (IsoFLOP groups as planned)."""
    source: str
    extra: dict[str, list[str]] = field(default_factory=dict)
    """Every other column, as text."""
    dropped: int = 0
    """Rows left out for their status (failed or diverged runs)."""


def resolve_inputs(path: str | Path) -> tuple[Path, Path | None]:
    """(results CSV, curves CSV or None) of a sweep dir or a CSV file."""
    path = Path(path)
    if path.is_dir():
        results = path / "results.csv"
        if not results.is_file():
            raise ScalingError(f"{path}: no results.csv (run the sweep with `meshforge scaling run {path}`)")
        curves = path / "curves.csv"
        return results, curves if curves.is_file() else None
    if not path.is_file():
        raise ScalingError(f"{path}: no such file")
    return path, None


def read_points(path: str | Path, compute_from: tuple[str, ...] = ("budget", "flops")) -> Points:
    """The ok rows of a CSV; C from the first column of ``compute_from`` present in every row, else 6ND."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
        raise ScalingError(
            f"{path} is not a CSV text file ({why}); pass a results CSV with columns "
            f"{', '.join(REQUIRED)}, or a sweep dir"
        ) from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ScalingError(
            f"{path}: missing column(s) {', '.join(missing)}; a results file needs columns "
            f"{', '.join(REQUIRED)} (found: {', '.join(header) or 'none'})"
        )
    dropped = 0
    if "status" in header:
        kept = [r for r in rows if r["status"] == "ok"]
        dropped, rows = len(rows) - len(kept), kept
    if not rows:
        raise ScalingError(f"{path}: no rows to fit" + (f" ({dropped} not ok)" if dropped else ""))

    def column(name: str) -> np.ndarray:
        out, bad = [], []
        for i, r in enumerate(rows, 2):
            try:
                v = float(r[name])
            except (TypeError, ValueError):
                v = math.nan
            if not math.isfinite(v) or v <= 0:
                bad.append(i)
            out.append(v)
        if bad:
            rows_text = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
            raise ScalingError(
                f"{path}: column {name} has {len(bad)} missing, NaN, infinite or non-positive "
                f"value(s) (line {rows_text}); remove those rows or mark them with a status column"
            )
        return np.array(out)

    n, d, loss = column("N"), column("D"), column("loss")
    c, grouped = 6.0 * n * d, False
    for name in compute_from:
        if name in header and all(r[name] not in ("", None) for r in rows):
            c, grouped = column(name), name == "budget"
            break
    extra = {k: [r[k] for r in rows] for k in header if k not in REQUIRED}
    return Points(n, d, loss, c, grouped, str(path), extra, dropped)


def power_law(c: np.ndarray, y: np.ndarray) -> dict:
    """Least squares of log y = slope * log C + intercept; the slope's +-1.96 SE interval when it has one."""
    x, z = np.log(c), np.log(y)
    slope, intercept = np.polyfit(x, z, 1)
    interval = None
    if len(x) > 2:
        resid = z - (slope * x + intercept)
        se = math.sqrt(resid @ resid / (len(x) - 2) / ((x - x.mean()) @ (x - x.mean())))
        interval = (slope - 1.96 * se, slope + 1.96 * se)
    return {"exponent": float(slope), "interval": interval, "coefficient": float(math.exp(intercept))}


def predict_power(law: dict, c) -> np.ndarray:
    return law["coefficient"] * np.asarray(c, float) ** law["exponent"]


def fit_parabola(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients (highest power first) of y = p0 x^2 + p1 x + p2 and the vertex x; needs p0 > 0."""
    if len(x) < 3 or len(set(np.round(x, 12))) < 3:
        raise ScalingError(f"a parabola needs at least 3 distinct points, got {len(set(np.round(x, 12)))}")
    p = np.polyfit(x, y, 2)
    if p[0] <= 0:
        raise ScalingError("the points curve downwards (no minimum): widen the size range around the optimum")
    return p, float(-p[1] / (2 * p[0]))


def isoflop_groups(pts: Points, tolerance_dex: float = 0.05) -> list[np.ndarray]:
    """Indices of the points of each budget: equal ``budget`` values, or C within ``tolerance_dex`` of its neighbour."""
    logc = np.log10(pts.c)
    order = np.argsort(logc, kind="stable")
    groups, cur = [], [order[0]]
    for i, j in zip(order, order[1:]):
        same = logc[j] == logc[i] if pts.grouped else logc[j] - logc[i] <= tolerance_dex
        if same:
            cur.append(j)
        else:
            groups.append(np.array(cur))
            cur = [j]
    groups.append(np.array(cur))
    return groups


def approach2(pts: Points) -> dict:
    """IsoFLOP parabolas, their minima, and the power laws through them."""
    budgets, notes = [], []
    for idx in isoflop_groups(pts):
        c = float(np.exp(np.log(pts.c[idx]).mean()))
        if len(idx) < 3:
            notes.append(f"C={c:.3g}: {len(idx)} point(s), a parabola needs 3: left out")
            continue
        try:
            pn, xn = fit_parabola(np.log(pts.n[idx]), pts.loss[idx])
            pd, xd = fit_parabola(np.log(pts.d[idx]), pts.loss[idx])
        except ScalingError as e:
            notes.append(f"C={c:.3g}: {e}: left out")
            continue
        inside = bool(pts.n[idx].min() <= math.exp(xn) <= pts.n[idx].max())
        budgets.append(
            {
                "C": c,
                "N_opt": math.exp(xn),
                "D_opt": math.exp(xd),
                "loss_opt": float(np.polyval(pn, xn)),
                "parabola_logN": pn.tolist(),
                "parabola_logD": pd.tolist(),
                "points": len(idx),
                "vertex_inside": inside,
            }
        )
        if not inside:
            notes.append(f"C={c:.3g}: the minimum lies outside the sizes tried (extrapolated)")
    if len(budgets) < 2:
        raise ScalingError(
            f"approach 2 needs at least 2 IsoFLOP budgets with 3 or more sizes each and a minimum; "
            f"{pts.source} has {len(budgets)} usable" + (f" ({'; '.join(notes)})" if notes else "")
        )
    c = np.array([b["C"] for b in budgets])
    n_law = power_law(c, np.array([b["N_opt"] for b in budgets]))
    d_law = power_law(c, np.array([b["D_opt"] for b in budgets]))
    return {
        "budgets": budgets,
        "N_opt": n_law,
        "D_opt": d_law,
        "a": n_law["exponent"],
        "b": d_law["exponent"],
        "notes": notes,
    }


def approach1(pts: Points, bins: int = 20) -> dict:
    """The minimum-loss envelope: per IsoFLOP budget when ``pts`` has a budget column (final points of
    a ladder), else per log-spaced bin of C (training curves, or final points of any runs)."""
    if len(set(pts.n.tolist())) < 2:
        raise ScalingError("approach 1 needs points of at least 2 model sizes")
    if pts.grouped:
        groups = isoflop_groups(pts)
    else:
        logc = np.log(pts.c)
        edges = np.linspace(logc.min(), logc.max(), bins + 1)
        which = np.clip(np.digitize(logc, edges) - 1, 0, bins - 1)
        groups = [np.flatnonzero(which == k) for k in range(bins)]
    env = []
    for idx in groups:
        if len(idx):
            j = idx[np.argmin(pts.loss[idx])]
            env.append((pts.c[j], pts.n[j], pts.d[j], pts.loss[j]))
    if len(env) < 2:
        raise ScalingError("approach 1 needs points at 2 or more compute budgets")
    env_a = np.array(env)
    if len(set(env_a[:, 1].tolist())) < 2:
        raise ScalingError(
            "approach 1: one model size is best at every compute; the envelope has no slope "
            "(add smaller or larger sizes)"
        )
    n_law, d_law = power_law(env_a[:, 0], env_a[:, 1]), power_law(env_a[:, 0], env_a[:, 2])
    return {
        "envelope": [{"C": c, "N": n, "D": d, "loss": l} for c, n, d, l in env],
        "N_opt": n_law,
        "D_opt": d_law,
        "a": n_law["exponent"],
        "b": d_law["exponent"],
    }


def approach3(pts: Points, bootstrap: int = 100, seed: int = 0):
    from .parametric import fit_parametric

    return fit_parametric(pts.n, pts.d, pts.loss, bootstrap=bootstrap, seed=seed)


def _interval(v: float, iv) -> dict:
    return {"value": v, "interval": list(iv) if iv is not None else None}


ENVELOPES = ("final", "curves")


def envelope_points(results: Path, curves: Path | None, envelope: str = "final") -> Points:
    """The points approach 1 reads: each run's final loss (``final``), or its training curve (``curves``)."""
    if envelope not in ENVELOPES:
        raise ScalingError(f"envelope {envelope!r} is not one of {', '.join(ENVELOPES)}")
    if envelope == "final":
        return read_points(results)
    if curves is None:
        raise ScalingError(f"--envelope curves needs a sweep dir with a curves.csv; {results} has none")
    return read_points(curves, compute_from=("flops",))


def fit_report(
    path: str | Path,
    approach: str = "all",
    budgets: list[float] | None = None,
    bootstrap: int = 100,
    seed: int = 0,
    envelope: str = "final",
) -> dict:
    """Everything ``meshforge scaling fit`` prints, as one JSON-able dict.

    One approach: its fit, or its ScalingError. ``all``: every approach that can be fitted, and
    in ``left_out`` why each other one could not (a ScalingError only if none can).
    """
    results, curves = resolve_inputs(path)
    pts = read_points(results)
    report: dict = {"source": str(results), "points": len(pts.n), "left_out_not_ok": pts.dropped}
    fits = {
        "3": lambda: _report3(pts, budgets, bootstrap, seed),
        "2": lambda: _report2(pts, budgets),
        "1": lambda: _report1(results, curves, envelope, budgets),
    }
    which = ("1", "2", "3") if approach == "all" else (approach,)
    left_out = {}
    for name in sorted(which, reverse=True):
        try:
            report.update(fits[name]())
        except ScalingError as e:
            if approach != "all":
                raise
            left_out[name] = str(e)
    if left_out:
        if len(left_out) == len(which):
            raise ScalingError(
                "no approach could be fitted: " + "; ".join(f"approach {k}: {v}" for k, v in sorted(left_out.items()))
            )
        report["left_out"] = dict(sorted(left_out.items()))
    return report


def _report3(pts: Points, budgets, bootstrap: int, seed: int) -> dict:
    fit = approach3(pts, bootstrap=bootstrap, seed=seed)
    iv = fit.intervals
    report = {
        name: _interval(float(getattr(fit, name)), iv.get(name)) for name in ("E", "A", "B", "alpha", "beta", "a", "b")
    }
    k = float(np.median(pts.c / (pts.n * pts.d)))
    report["flops_per_param_token"] = k
    report["at_bound"] = [name for name in ("alpha", "beta") if not 1e-6 < getattr(fit, name) < 4 - 1e-6]
    report["huber_loss"] = fit.loss
    preds = []
    for c in budgets or []:
        n, d, l = fit.optimal(c, k)
        entry = {"C": c, "N_opt": float(n), "D_opt": float(d), "loss": float(l)}
        if fit.samples is not None:
            bn, bd, bl = (np.array(x) for x in zip(*(optimal_samples(s, c, k) for s in fit.samples)))
            for key, vals in (("N_opt", bn), ("D_opt", bd), ("loss", bl)):
                vals = vals[np.isfinite(vals)]
                entry[f"{key}_interval"] = np.percentile(vals, [2.5, 97.5]).tolist() if len(vals) else None
        preds.append(entry)
    report["budgets"] = preds
    return report


def _report2(pts: Points, budgets) -> dict:
    a2 = approach2(pts)
    a2["predictions"] = [
        {"C": c, "N_opt": float(predict_power(a2["N_opt"], c)), "D_opt": float(predict_power(a2["D_opt"], c))}
        for c in budgets or []
    ]
    return {"approach2": a2}


def _report1(results: Path, curves: Path | None, envelope: str, budgets) -> dict:
    cpts = envelope_points(results, curves, envelope)
    a1 = approach1(cpts)
    a1["source"], a1["envelope_of"] = cpts.source, envelope
    a1["predictions"] = [
        {"C": c, "N_opt": float(predict_power(a1["N_opt"], c)), "D_opt": float(predict_power(a1["D_opt"], c))}
        for c in budgets or []
    ]
    return {"approach1": a1}


def optimal_samples(sample: np.ndarray, c: float, k: float):
    from .parametric import optimal_allocation

    return tuple(float(x) for x in optimal_allocation(sample, c, k))


def format_report(r: dict) -> str:
    """The report as text."""

    def iv(entry) -> str:
        i = entry.get("interval")
        return f"{entry['value']:.4g}" + (f"  [{i[0]:.4g}, {i[1]:.4g}]" if i else "")

    lines = [
        f"{r['source']}: {r['points']} points"
        + (f" ({r['left_out_not_ok']} rows not ok left out)" if r["left_out_not_ok"] else "")
    ]
    if "approach1" in r:
        a = r["approach1"]
        what = "final losses" if a.get("envelope_of", "final") == "final" else "training curves"
        lines.append(
            f"approach 1 (min-loss envelope of the {what}, {len(a['envelope'])} compute bins): "
            f"N_opt ~ C^{a['a']:.3f}, D_opt ~ C^{a['b']:.3f}"
        )
        lines += (
            [f"  best run at C={p['C']:.3g}: N={p['N']:.4g} D={p['D']:.4g} loss={p['loss']:.4f}" for p in a["envelope"]]
            if len(a["envelope"]) <= 8
            else []
        )
        lines += [f"  C={p['C']:.3g}: N_opt={p['N_opt']:.4g} D_opt={p['D_opt']:.4g}" for p in a["predictions"]]
    if "approach2" in r:
        a = r["approach2"]
        lines.append("approach 2 (IsoFLOP parabolas):")
        for b in a["budgets"]:
            lines.append(
                f"  C={b['C']:.3g}: N_opt={b['N_opt']:.4g} D_opt={b['D_opt']:.4g} loss={b['loss_opt']:.4f}"
                f" ({b['points']} sizes)"
            )
        for name in ("N_opt", "D_opt"):
            law = a[name]
            i = law["interval"]
            lines.append(
                f"  {name} = {law['coefficient']:.4g} * C^{law['exponent']:.3f}"
                + (f"  [{i[0]:.3f}, {i[1]:.3f}]" if i else "")
            )
        lines += [f"  note: {n}" for n in a["notes"]]
        lines += [f"  C={p['C']:.3g}: N_opt={p['N_opt']:.4g} D_opt={p['D_opt']:.4g}" for p in a["predictions"]]
    if "E" in r:
        lines.append("approach 3 (L = E + A/N^alpha + B/D^beta, Huber on log residuals, 95% bootstrap intervals):")
        for name in ("E", "A", "B", "alpha", "beta"):
            lines.append(f"  {name:5s} = {iv(r[name])}")
        lines.append(f"  a = beta/(alpha+beta) = {iv(r['a'])};  b = alpha/(alpha+beta) = {iv(r['b'])}")
        if r.get("at_bound"):
            lines.append(f"  note: {', '.join(r['at_bound'])} at the bound of [0, 4]: the data do not determine it")
        lines.append(f"  compute-optimal with C = {r['flops_per_param_token']:.3g} N D:")
        for p in r["budgets"]:
            lines.append(
                f"  C={p['C']:.3g}: N_opt={p['N_opt']:.4g} D_opt={p['D_opt']:.4g} predicted loss {p['loss']:.4f}"
            )
    lines += [f"approach {k} not fitted: {why}" for k, why in r.get("left_out", {}).items()]
    return "\n".join(lines)
