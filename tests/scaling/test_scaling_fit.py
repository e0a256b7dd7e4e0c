"""Scaling laws: parameter and FLOP counts, the planner, and Chinchilla's three fitting approaches
on synthetic data drawn from a known law (tolerances stated in each test)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from meshforge.cli import main as cli_main
from meshforge.config import config_from_dict, load_config
from meshforge.models import build_model
from meshforge.scaling import ScalingError
from meshforge.scaling.fit import Points, approach1, approach2, fit_parabola, fit_report, read_points
from meshforge.scaling.flops import flops_per_token
from meshforge.scaling.parametric import fit_parametric
from meshforge.scaling.plan import PlanSpec, plan_rows, write_plan
from meshforge.scaling.shapes import count_params, shape_for

CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
FINE = {"model.dim": 64, "model.n_heads": 4, "model.ffn_multiple_of": 16}
"""A base with head dim 16 and FFN widths in steps of 16: the shape rule's finest grid."""


def law(n, d, p=CHINCHILLA):
    return p["E"] + p["A"] / np.asarray(n, float) ** p["alpha"] + p["B"] / np.asarray(d, float) ** p["beta"]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def isoflop_rows(budgets=(1e18, 1e19, 1e20), sizes=9, noise=0.0, seed=0) -> list[dict]:
    """Synthetic IsoFLOP profiles of the Chinchilla law, C = 6ND, N around each optimum."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        n_star = 0.6 * (c / 6) ** (0.28 / 0.62)
        for n in np.geomspace(n_star / 8, n_star * 8, sizes):
            d = c / (6 * n)
            rows.append({"N": n, "D": d, "loss": float(law(n, d)) * math.exp(rng.normal(0, noise)), "budget": c})
    return rows


# --------------------------------------------------------------------------- counts


def test_param_and_flop_counts_match_a_hand_count_and_the_built_model():
    m = load_config("tiny-test").model  # d=64, L=2, 4 heads of 16, 2 kv heads, V=512, QK-norm, tied
    assert (m.dim, m.n_layers, m.n_heads, m.kv_heads, m.vocab_size, m.hidden_dim) == (64, 2, 4, 2, 512, 192)
    per_block = (64 * 64 + 2 * 64 * 32 + 64 * 64) + 2 * 16 + 3 * 64 * 192 + 2 * 64  # attn, qk-norm, SwiGLU, norms
    assert per_block == 49312
    counts = count_params(m)
    assert counts.non_embedding == 2 * per_block + 64 == 98688
    assert counts.total == counts.active == 98688 + 512 * 64
    model = build_model(m)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.non_embedding == model.num_params(exclude_embeddings=True)
    untied = dataclasses.replace(m, tie_embeddings=False, qk_norm=False)
    assert count_params(untied).total == sum(p.numel() for p in build_model(untied).parameters())
    olmo_qwen = dataclasses.replace(m, head_size=24, qkv_bias=True, qk_norm_scope="projection")  # the import options
    assert count_params(olmo_qwen).total == sum(p.numel() for p in build_model(olmo_qwen).parameters())
    # 6 * (non-embedding + output projection) + 12 * L * H * q * T  at T = 32
    assert flops_per_token(m, 32) == 6 * 131456 + 12 * 2 * 4 * 16 * 32 == 837888


def test_shape_rule_hits_the_requested_n():
    """Within 8% for N in [1e5, 1e8], within 1% from 1e6 up (head dim 16, FFN step 16)."""
    base = load_config(None, FINE).model
    for target in np.geomspace(1e5, 1e8, 10):
        shape, n = shape_for(target, base)
        assert n == count_params(shape.apply(base)).non_embedding
        assert abs(n / target - 1) <= (0.01 if target >= 1e6 else 0.08), (target, n, shape)
        assert 16 <= shape.dim / shape.n_layers <= 64 and shape.dim % 16 == 0
    for target in (2.5e4, 1e5, 4e5):  # fixed depth (muP width sweeps): the width alone moves
        shape, n = shape_for(target, base, layers=2)
        assert shape.n_layers == 2 and abs(n / target - 1) <= 0.08, (target, n, shape)


# --------------------------------------------------------------------------- planner


def test_isoflop_plan_rows_hold_resolved_configs_and_report_skipped_sizes(tmp_path):
    spec = PlanSpec(
        "isoflop",
        tmp_path / "sweep",
        None,
        {**FINE, "model.vocab_size": 512},
        budgets=[1e12, 4e12],
        n_sizes=7,
        n_min=2e3,
        n_max=2e6,
        min_steps=60,
    )
    rows, skipped = plan_rows(spec)
    assert rows and skipped
    reasons = " ".join(s["reason"] for s in skipped)
    assert "too large for the budget" in reasons and "too small" in reasons
    for r in rows:
        cfg = config_from_dict(r["config"])  # a valid, complete config
        assert cfg.train.steps == r["steps"] >= 60
        assert abs(r["flops"] / r["budget"] - 1) <= 0.5 / r["steps"] + 1e-9  # whole steps only
        assert r["D"] == r["steps"] * cfg.train.global_batch_size * cfg.data.seq_len
        assert r["N"] == count_params(cfg.model).non_embedding
        assert cfg.train.eval_interval == r["steps"] and Path(cfg.train.output_dir).name == r["id"]
    same = {
        (
            r["config"]["data"]["seq_len"],
            r["config"]["train"]["seed"],
            r["config"]["train"]["global_batch_size"],
            r["config"]["train"]["eval_batches"],
            r["config"]["data"]["valid_fraction"],
        )
        for r in rows
    }
    assert len(same) == 1  # one held-out set for every run
    write_plan(spec)
    assert len((tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()) == len(rows)
    assert json.loads((tmp_path / "sweep" / "plan.json").read_text())["skipped"]
    with pytest.raises(ScalingError, match="exists"):
        write_plan(spec)


def test_isoflop_plan_centres_each_budgets_grid_on_its_own_n_star(tmp_path):
    """--centers: budget i's sizes span centers[i]/span .. centers[i]*span (each within the shape rule's 25%)."""
    spec = PlanSpec(
        "isoflop",
        tmp_path / "sweep",
        None,
        {**FINE, "model.vocab_size": 512},
        budgets=[1e13, 1e14],
        centers=[1e5, 4e5],
        n_sizes=3,
        span=2.0,
    )
    rows, skipped = plan_rows(spec)
    assert not skipped
    for budget, center in ((1e13, 1e5), (1e14, 4e5)):
        got = sorted(r["N"] for r in rows if r["budget"] == budget)
        assert len(got) == 3
        for n, want in zip(got, (center / 2, center, center * 2)):
            assert abs(n / want - 1) < 0.25, (budget, got)
    for centers, extra, message in (
        ([1e5], {}, "one positive N per budget: 2 budget"),
        ([1e5, -1.0], {}, "one positive N per budget"),
        ([1e5, 4e5], {"n_min": 1e4, "n_max": 1e6}, "give one of them"),
    ):
        bad = PlanSpec("isoflop", tmp_path / "bad", None, FINE, budgets=[1e13, 1e14], centers=centers, **extra)
        with pytest.raises(ScalingError, match=message):
            write_plan(bad)
        assert not (tmp_path / "bad").exists()


def test_token_and_lr_plans(tmp_path):
    rows, _ = plan_rows(PlanSpec("tokens", tmp_path, None, FINE, sizes=[2e5], tokens=[1e5, 4e5]))
    assert [r["D"] for r in rows] == [49 * 2048, 195 * 2048] and len({r["N"] for r in rows}) == 1
    rows, _ = plan_rows(
        PlanSpec(
            "lr",
            tmp_path,
            None,
            FINE,
            sizes=[1e5, 4e5],
            tokens=[1e5],
            lrs=[1e-3, 1e-2],
            variants=["plain", "qk_norm+z_loss"],
        )
    )
    assert len(rows) == 8
    for r in rows:
        qk, z = r["config"]["model"]["qk_norm"], r["config"]["train"]["z_loss_coef"]
        assert (qk, z) == ((False, 0.0) if r["variant"] == "plain" else (True, 1e-4))
        assert r["config"]["optim"]["lr"] == r["lr"]
    with pytest.raises(ScalingError, match="variant"):
        plan_rows(PlanSpec("lr", tmp_path, None, FINE, sizes=[1e5], tokens=[1e5], lrs=[1e-3], variants=["qk"]))


# --------------------------------------------------------------------------- fits


def test_parabola_recovers_a_known_vertex():
    x = np.linspace(-2, 3, 7)
    p, vertex = fit_parabola(x, 0.7 * (x - 1.3) ** 2 + 2.5)
    assert vertex == pytest.approx(1.3, abs=1e-9) and p[0] == pytest.approx(0.7)
    noisy = 0.7 * (x - 1.3) ** 2 + 2.5 + np.random.default_rng(0).normal(0, 0.01, len(x))
    assert fit_parabola(x, noisy)[1] == pytest.approx(1.3, abs=0.05)
    with pytest.raises(ScalingError, match="no minimum"):
        fit_parabola(x, -(x**2))


def test_parametric_fit_recovers_the_law():
    """Noise-free: every parameter to 1e-4 relative. 1% log-normal noise on 80 points: alpha, beta
    within 0.03, E within 3%, a = beta/(alpha+beta) within 0.03; the estimates inside their intervals."""
    rng = np.random.default_rng(1)
    n = np.exp(rng.uniform(np.log(1e7), np.log(1e10), 80))
    d = np.exp(rng.uniform(np.log(1e9), np.log(1e12), 80))
    exact = fit_parametric(n, d, law(n, d), bootstrap=0)
    for k, v in CHINCHILLA.items():
        assert getattr(exact, k) == pytest.approx(v, rel=1e-4), k
    noisy = fit_parametric(n, d, law(n, d) * np.exp(rng.normal(0, 0.01, 80)), bootstrap=8)
    assert abs(noisy.alpha - 0.34) < 0.03 and abs(noisy.beta - 0.28) < 0.03
    assert abs(noisy.E / 1.69 - 1) < 0.03 and abs(noisy.a - 0.28 / 0.62) < 0.03
    for k in ("E", "alpha", "beta"):
        lo, hi = noisy.intervals[k]
        assert lo <= hi and lo - 1e-9 <= getattr(noisy, k) <= hi + 1e-9 or abs(getattr(noisy, k) - lo) < 0.05 * hi
    n_opt, d_opt, loss = exact.optimal(1e21)
    assert n_opt * d_opt * 6 == pytest.approx(1e21) and loss == pytest.approx(law(n_opt, d_opt))


def test_approach2_recovers_the_compute_optimal_exponent(tmp_path):
    """IsoFLOP profiles of the known law: a within 0.02 of beta/(alpha+beta), N_opt within 10% of the truth."""
    pts = read_points(write_csv(tmp_path / "iso.csv", isoflop_rows()))
    a2 = approach2(pts)
    assert len(a2["budgets"]) == 3
    assert a2["a"] == pytest.approx(0.28 / 0.62, abs=0.02) and a2["b"] == pytest.approx(0.34 / 0.62, abs=0.02)
    exact = fit_parametric(pts.n, pts.d, pts.loss, bootstrap=0)
    for b in a2["budgets"]:
        assert b["N_opt"] == pytest.approx(float(exact.optimal(b["C"])[0]), rel=0.1)


def test_approach1_envelope_over_training_curves():
    """Curves L(N, D_t) of 6 sizes: the envelope's N_opt ~ C^a has a within 0.1 of beta/(alpha+beta)."""
    n = np.repeat(np.geomspace(1e7, 1e10, 7), 60)
    d = np.tile(np.geomspace(1e8, 1e12, 60), 7)
    pts = Points(n, d, law(n, d), 6 * n * d, False, "curves")
    a1 = approach1(pts, bins=12)
    assert a1["a"] == pytest.approx(0.28 / 0.62, abs=0.1)


def test_approach1_reads_each_runs_final_loss_not_its_mid_schedule_points(tmp_path, capsys):
    """A sweep dir whose curves' intermediate points carry a mid-cosine excess loss, larger the earlier in
    the schedule and the larger the model (the LR has not decayed there): the default envelope of final
    losses picks each budget's best run and recovers a within 0.06; ``envelope="curves"`` reads the biased
    curves and its a falls more than 0.07 below the truth; curves without a curves.csv are refused."""
    rows = [
        {**r, "status": "ok", "flops": r["budget"]} for r in isoflop_rows(budgets=(1e18, 1e19, 1e20, 1e21), sizes=13)
    ]
    write_csv(tmp_path / "results.csv", rows)
    curves = []
    for i, r in enumerate(rows):
        for t in np.linspace(0.05, 1, 20):  # fraction of the run's schedule
            d = r["D"] * t
            curves.append(
                {
                    "id": f"r{i}",
                    "N": r["N"],
                    "D": d,
                    "flops": 6 * r["N"] * d,
                    "loss": float(law(r["N"], d)) + (1 - t) * (r["N"] / 1e9) ** 0.3,
                }
            )
    write_csv(tmp_path / "curves.csv", curves)
    out = fit_report(tmp_path, approach="1")
    a1 = out["approach1"]
    assert a1["source"].endswith("results.csv") and a1["envelope_of"] == "final"
    assert len(a1["envelope"]) == 4
    for e in a1["envelope"]:
        same = [r for r in rows if r["budget"] == e["C"]]
        assert e["N"] == min(same, key=lambda r: r["loss"])["N"]
    assert a1["a"] == pytest.approx(0.28 / 0.62, abs=0.06)
    biased = fit_report(tmp_path, approach="1", envelope="curves")["approach1"]
    assert biased["source"].endswith("curves.csv") and biased["a"] < 0.28 / 0.62 - 0.07  # biased towards small N
    for flag, what in (([], "envelope of the final losses"), (["--envelope", "curves"], "of the training curves")):
        assert cli_main(["scaling", "fit", str(tmp_path), "--approach", "1", *flag]) == 0
        assert what in capsys.readouterr().out
    (tmp_path / "curves.csv").unlink()
    with pytest.raises(ScalingError, match="needs a sweep dir with a curves.csv"):
        fit_report(tmp_path, approach="1", envelope="curves")


def test_fit_cli_json_and_text(tmp_path, capsys):
    path = write_csv(tmp_path / "published.csv", [{**r, "other": "x"} for r in isoflop_rows(sizes=7, noise=0.002)])
    assert (
        cli_main(["scaling", "fit", str(path), "--approach", "all", "--bootstrap", "4", "--budgets", "1e21", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    for key in ("E", "A", "B", "alpha", "beta", "a"):
        assert set(out[key]) == {"value", "interval"} and len(out[key]["interval"]) == 2, key
    assert out["alpha"]["value"] == pytest.approx(0.34, abs=0.05)
    assert out["budgets"][0]["C"] == 1e21 and out["budgets"][0]["N_opt"] > 0 and out["budgets"][0]["loss"] > 1.69
    assert out["approach2"]["a"] == pytest.approx(0.45, abs=0.03) and "approach1" in out
    assert cli_main(["scaling", "fit", str(path), "--approach", "2"]) == 0
    assert "N_opt =" in capsys.readouterr().out


def test_fit_all_fits_what_it_can_and_names_what_it_could_not(tmp_path, capsys):
    """Two budgets, one with only 2 sizes (no parabola): approach 2 cannot fit, 1 and 3 can and report;
    with too few points for any approach, one line naming each reason."""
    rows = isoflop_rows(budgets=(1e18,), sizes=9, noise=0.002) + isoflop_rows(budgets=(1e19,), sizes=9)[3:5]
    path = write_csv(tmp_path / "results.csv", rows)
    out = fit_report(path, approach="all", bootstrap=0, budgets=[1e20])
    assert "approach1" in out and "alpha" in out and "approach2" not in out
    assert set(out["left_out"]) == {"2"} and "approach 2 needs at least 2 IsoFLOP budgets" in out["left_out"]["2"]
    assert cli_main(["scaling", "fit", str(path), "--bootstrap", "0"]) == 0
    text = capsys.readouterr().out
    assert "approach 1 (min-loss envelope" in text and "approach 3 (L = E" in text
    assert "approach 2 not fitted: approach 2 needs at least 2 IsoFLOP budgets" in text
    with pytest.raises(ScalingError, match="no approach could be fitted: approach 1: .*; approach 2: .*; approach 3: "):
        fit_report(write_csv(tmp_path / "few.csv", rows[:3]), approach="all", bootstrap=0)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "missing column\\(s\\) loss"),
        ("nan", "column loss has 1 missing, NaN"),
        ("one_budget", "approach 2 needs at least 2 IsoFLOP budgets"),
        ("few", "needs more points than that; got 4"),
    ],
)
def test_fit_refuses_bad_results_with_one_clear_line(tmp_path, capsys, case, message):
    rows = isoflop_rows(sizes=5)
    approach = "all"
    if case == "missing":
        rows = [{k: v for k, v in r.items() if k != "loss"} for r in rows]
    elif case == "nan":
        rows[3]["loss"] = float("nan")
    elif case == "one_budget":
        rows, approach = [r for r in rows if r["budget"] == 1e18], "2"
    else:
        rows, approach = rows[:4], "3"
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(ScalingError, match=message):
        fit_report(path, approach=approach, bootstrap=0)
    assert cli_main(["scaling", "fit", str(path), "--approach", approach, "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshforge: error:") and "\n" not in err
