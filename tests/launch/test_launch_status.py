"""`meshforge launch` (torchrun) exits as its ranks did: 42 after a preemption checkpoint, so a
scheduler requeues; SIGTERM/SIGUSR1 to the launcher reach the ranks (as SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshforge.launch.launcher import EXIT_PREEMPTED, PREEMPTED_MARKER_ENV
from parallel_harness import PARITY_ARGS, REPO

# Stands in for torchrun: waits for SIGTERM (or exits at once with "now"), then does what the
# ranks do after a preemption checkpoint (create the marker) and exits 1 as torchrun does when
# any rank exited non-zero.
FAKE_TORCHRUN = (
    r"""
import os, pathlib, signal, sys, time
mode = sys.argv[1]
def preempted(*_):
    if mode != "fail":
        pathlib.Path(os.environ[%r]).write_text("42\n")
    sys.exit(1)
signal.signal(signal.SIGTERM, preempted)
print("ready", flush=True)
if mode in ("now", "fail"):
    preempted()
time.sleep(60)
sys.exit(3)
"""
    % PREEMPTED_MARKER_ENV
)

LAUNCH = "import sys; from meshforge.launch.launcher import run_torchrun; import os; sys.exit(run_torchrun(sys.argv[1:], dict(os.environ)))"


def launch_fake(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "fake_torchrun.py"
    script.write_text(FAKE_TORCHRUN)
    env = {k: v for k, v in os.environ.items() if k != PREEMPTED_MARKER_ENV}
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, sys.executable, str(script), mode],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("mode, status", [("now", EXIT_PREEMPTED), ("fail", 1)])
def test_status_follows_the_preemption_marker(mode, status, tmp_path):
    p = launch_fake(tmp_path, mode)
    _, err = p.communicate(timeout=60)
    assert p.returncode == status, err
    assert ("requeue" in err) == (status == EXIT_PREEMPTED)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signals_to_the_launcher_reach_torchrun_and_42_comes_back(sig, tmp_path):
    p = launch_fake(tmp_path, "wait")
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(sig)
    p.communicate(timeout=60)
    assert p.returncode == EXIT_PREEMPTED


@pytest.mark.slow
def test_real_torchrun_job_preempted_exits_42_and_resumes(tiny_data, tmp_path):
    out = tmp_path / "run"
    train = [
        "train",
        *PARITY_ARGS,
        "--train.steps",
        "400",
        "--data.path",
        str(tiny_data),
        "--train.output_dir",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k != PREEMPTED_MARKER_ENV}
    p = subprocess.Popen(
        [sys.executable, "-m", "meshforge", "launch", "--cpu", "--gpus-per-node", "2", "--", *train],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=240)
    assert p.returncode == EXIT_PREEMPTED, err[-3000:]
    assert list((out / "checkpoints").glob("step_*"))
