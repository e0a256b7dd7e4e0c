"""The end-to-end CPU ladder (bench/scaling_ladder.sh): slow, ~10-20 minutes on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cpu_ladder_fits_a_compute_optimal_n_that_grows_with_c(tmp_path):
    docs = tmp_path / "docs"
    env = {**os.environ, "DOCS": str(docs)}
    subprocess.run(["bash", str(REPO / "bench" / "scaling_ladder.sh"), str(tmp_path / "sweep")], cwd=REPO, env=env,
                   check=True, timeout=3600)
    fit = json.loads((docs / "fit.json").read_text())
    n_opt = [b["N_opt"] for b in fit["budgets"]]
    assert n_opt == sorted(n_opt) and n_opt[-1] > n_opt[0]  # approach 3: N_opt grows with C
    assert 0 < fit["a"]["value"] < 1
    a2 = fit["approach2"]  # every budget's minimum inside its sizes, and growing with C
    assert len(a2["budgets"]) == 3 and all(b["vertex_inside"] for b in a2["budgets"]) and a2["a"] > 0
    assert fit["approach1"]["envelope_of"] == "final" and fit["approach1"]["a"] > 0
    for name in ("isoflop", "loss_vs_compute", "optimal", "residuals"):
        assert (docs / f"{name}.png").is_file() and (docs / f"{name}.svg").is_file()
