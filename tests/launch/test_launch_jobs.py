"""Real launches on this machine (CPU, gloo), each checked against the single-process run.

- SLURM: a 2-task job from `meshforge launch --slurm --submit`, run by real slurmctld/slurmd
  (scripts/slurm/start.sh starts a one-node cluster; .ci/run does it in CI).
- MPI: `meshforge launch --mpi` = `mpiexec -n 2 python -m meshforge train ...` with the
  PyPI mpich and mpi4py; ranks find each other through mpi4py.
- Multi-node rendezvous: two torchrun agents ("nodes" 0 and 1 on one machine) meet at a c10d
  endpoint and form one 2-rank job.

A missing SLURM or MPI skips its test on a developer machine and fails it in CI (CI=true).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel_harness import PARITY_ARGS, REPO, assert_parity, free_port, read_result

TIMEOUT = 420
RANK_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run this test, but {reason}")
    pytest.skip(reason)


def train_args(data_dir: Path, out: Path) -> list[str]:
    return ["train", *PARITY_ARGS, "--data.path", str(data_dir), "--train.output_dir", str(out)]


def launch(*argv: str) -> list[str]:
    return [sys.executable, "-m", "meshforge", "launch", *argv]


def slurm_problem() -> str | None:
    """Why a SLURM job cannot run here, or None."""
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        return (
            "slurmctld is not installed (apt-get install slurmctld slurmd munge slurm-client, "
            "then `sudo bash scripts/slurm/start.sh`)"
        )
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        return (
            f"slurmctld is not running (`scontrol ping`: {(ping.stdout + ping.stderr).strip()!r}); "
            "start it with `sudo bash scripts/slurm/start.sh`"
        )
    states = subprocess.run(["sinfo", "-h", "-o", "%t %c"], capture_output=True, text=True, timeout=30).stdout
    if not any(s.split()[0] in ("idle", "mix") and int(s.split()[1].rstrip("+")) >= 2 for s in states.splitlines()):
        return f"no idle SLURM node with 2 CPUs (sinfo: {states.strip()!r})"
    return None


def test_slurm_sbatch_job_matches_single_process(tiny_data, single_process_ref, tmp_path):
    problem = slurm_problem()
    if problem:
        unavailable(problem)
    out = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    cmd = launch(
        "--slurm",
        "--cpu",
        "--nodes",
        "1",
        "--gpus-per-node",
        "2",
        "--job-name",
        "meshforge-test",
        "--time",
        "00:15:00",
        "--script",
        str(script),
        "--log-dir",
        str(tmp_path),
        "--submit",
        "--wait",
        "--",
        *train_args(tiny_data, out),
    )
    proc = subprocess.Popen(cmd, cwd=REPO, env=RANK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job = None
    try:
        lines = []
        for line in proc.stdout:  # "wrote ...", "submitted job N", then "job N COMPLETED (exit 0)"
            lines.append(line)
            m = re.match(r"submitted job (\d+)", line)
            if m:
                job = m.group(1)
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
        if job is not None and proc.returncode != 0:
            subprocess.run(["scancel", job], timeout=30)
    log = "".join(p.read_text() for p in tmp_path.glob("meshforge-test-*.out"))
    assert job is not None, "".join(lines)
    assert rc == 0, f"job {job} failed (rc={rc}):\n{''.join(lines)}\n{log[-4000:]}"
    assert f"meshforge: job {job}" in log
    assert_parity(single_process_ref, read_result(out))


def test_mpiexec_job_matches_single_process(tiny_data, single_process_ref, tmp_path):
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        unavailable("mpi4py is not installed (pip install mpich mpi4py, or pip install -e '.[test]')")
    beside = Path(sys.executable).parent / "mpiexec"
    if not beside.exists() and shutil.which("mpiexec") is None:
        unavailable("mpiexec is not installed (pip install mpich)")
    out = tmp_path / "run"
    # mpiexec -n 2 -ppn 2 ... python -m meshforge train ...
    r = subprocess.run(
        launch("--mpi", "--gpus-per-node", "2", "--", *train_args(tiny_data, out)),
        cwd=REPO,
        env=RANK_ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "mpiexec -n 2" in r.stdout.splitlines()[0]
    assert_parity(single_process_ref, read_result(out))


def test_two_node_rendezvous_matches_single_process(tiny_data, single_process_ref, tmp_path):
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            launch(
                "--nodes",
                "2",
                "--gpus-per-node",
                "1",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                f"test-{os.getpid()}",
                "--node-rank",
                str(node),
                "--",
                *train_args(tiny_data, out),
            ),
            cwd=REPO,
            env=RANK_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {node} failed:\n{log[-4000:]}"
    assert_parity(single_process_ref, read_result(out))


def test_slurm_preemption_requeues_and_resumes_exactly(tiny_data, tmp_path):
    """`scancel --signal=TERM` mid-run: the ranks checkpoint and exit 42, the batch script requeues
    the job, the requeued run resumes from that checkpoint, and every step's loss equals an
    uninterrupted local 2-rank run's."""
    problem = slurm_problem()
    if problem:
        unavailable(problem)
    from meshforge.launch.launcher import wait_for_job
    from meshforge.pretrain.metrics import read_metrics

    steps = ("--train.steps", "60")
    out, ref_out = tmp_path / "run", tmp_path / "ref"
    script = tmp_path / "job.sbatch"
    r = subprocess.run(
        launch(
            "--slurm",
            "--cpu",
            "--nodes",
            "1",
            "--gpus-per-node",
            "2",
            "--job-name",
            "meshforge-pre",
            "--time",
            "00:15:00",
            "--script",
            str(script),
            "--log-dir",
            str(tmp_path),
            "--submit",
            "--",
            *train_args(tiny_data, out),
            *steps,
        ),
        cwd=REPO,
        env=RANK_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    m = re.search(r"submitted job (\d+)", r.stdout)
    assert r.returncode == 0 and m, r.stdout + r.stderr
    job = m.group(1)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((out / "metrics.jsonl").exists() and any(rec.get("step", 0) >= 3 for rec in read_metrics(out))):
            assert time.monotonic() < deadline, "the job never reached step 3"
            time.sleep(0.1)
        subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=30)
        # SLURM holds a requeued job back for two minutes (its BeginTime); release it at once
        while (
            "Restarts=0"
            in (
                info := subprocess.run(
                    ["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30
                ).stdout
            )
            or "JobState=PENDING" not in info
        ):
            assert time.monotonic() < deadline and "JobState=COMPLETED" not in info and "JobState=FAILED" not in info, (
                info
            )
            time.sleep(0.2)
        subprocess.run(["scontrol", "update", f"JobId={job}", "BeginTime=now"], timeout=30)
        state, rc = wait_for_job(job)
    finally:
        subprocess.run(["scancel", job], timeout=30)
    log = "".join(p.read_text() for p in tmp_path.glob("meshforge-pre-*.out"))
    assert (state, rc) == ("COMPLETED", 0), log[-4000:]
    assert "meshforge: preempted" in log and "(restart 1)" in log, log[-4000:]
    from parallel_harness import run_ranks

    run_ranks(2, [*train_args(tiny_data, ref_out), *steps])

    def by_step(o):
        return {rec["step"]: rec["loss"] for rec in read_metrics(o) if "loss" in rec}

    got, want = by_step(out), by_step(ref_out)
    assert sorted(got) == sorted(want) == list(range(1, 61))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]
