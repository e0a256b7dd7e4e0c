"""The end-to-end CPU ladder (bench/scaling/scaling_ladder.sh): slow, ~10-20 minutes on 2 cores; and,
fast, where the script writes by default and the time it states."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LADDER = REPO / "bench" / "scaling" / "scaling_ladder.sh"

# stands in for `python -m meshforge scaling ...` (the script's plumbing is under test, not the ladder):
# records each call and writes the files the real command would
FAKE_PYTHON = """#!{python}
import json, pathlib, sys
args = sys.argv[3:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
sweep = pathlib.Path(args[args.index("--output") + 1] if args[1] == "plan" else args[2])
if args[1] == "plan":
    sweep.mkdir(parents=True)
    (sweep / "sweep.jsonl").write_text("")
elif args[1] == "run":
    (sweep / "results.csv").write_text("N,D,loss\\n")
    (sweep / "curves.csv").write_text("step,loss\\n")
elif args[1] == "fit":
    print("{{}}")
elif args[1] == "plot":
    (pathlib.Path(args[args.index("--output") + 1]) / "isoflop.png").write_bytes(b"")
"""


def test_ladder_writes_outside_the_tracked_docs_by_default(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON.format(python=sys.executable, log=str(log)))
    (bin_dir / "python").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "DOCS"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    subprocess.run(["bash", str(LADDER)], cwd=work, env=env, check=True, capture_output=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[1] for c in calls] == ["plan", "run", "fit", "fit", "plot"]
    report = work / "runs" / "scaling_ladder" / "report"
    assert sorted(p.name for p in report.iterdir()) == [
        "curves.csv",
        "fit.json",
        "fit.txt",
        "isoflop.png",
        "results.csv",
    ]
    assert not (work / "docs").exists()


def test_ladder_states_the_readmes_time():
    def minutes(text: str) -> list[str]:
        return re.findall(r"(\d+(?:\.\d+)?) minutes", text)

    readme = (REPO / "README.md").read_text()
    paragraph = readme[readme.index("**The CPU ladder**") :]
    header = "".join(line for line in LADDER.read_text().splitlines(True) if line.startswith("#"))
    assert minutes(header)[0] == minutes(paragraph)[0]


@pytest.mark.slow
def test_cpu_ladder_fits_a_compute_optimal_n_that_grows_with_c(tmp_path):
    docs = tmp_path / "docs"
    env = {**os.environ, "DOCS": str(docs)}
    subprocess.run(
        ["bash", str(REPO / "bench" / "scaling" / "scaling_ladder.sh"), str(tmp_path / "sweep")],
        cwd=REPO,
        env=env,
        check=True,
        timeout=3600,
    )
    fit = json.loads((docs / "fit.json").read_text())
    n_opt = [b["N_opt"] for b in fit["budgets"]]
    assert n_opt == sorted(n_opt) and n_opt[-1] > n_opt[0]  # approach 3: N_opt grows with C
    assert 0 < fit["a"]["value"] < 1
    a2 = fit["approach2"]  # every budget's minimum inside its sizes, and growing with C
    assert len(a2["budgets"]) == 3 and all(b["vertex_inside"] for b in a2["budgets"]) and a2["a"] > 0
    assert fit["approach1"]["envelope_of"] == "final" and fit["approach1"]["a"] > 0
    for name in ("isoflop", "loss_vs_compute", "optimal", "residuals"):
        assert (docs / f"{name}.png").is_file() and (docs / f"{name}.svg").is_file()
