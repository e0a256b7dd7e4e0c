"""Launch: node-list parsing, environment discovery for torchrun/SLURM/MPI, generated commands."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meshforge.cli import build_parser
from meshforge.errors import LaunchError
from meshforge.launch import launcher, mpi, slurm
from meshforge.launch.env import DistEnv, detect_launcher, discover

# --------------------------------------------------------------------------- node lists


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("vm", ["vm"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[08-11]", ["n08", "n09", "n10", "n11"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("a[1,3]-ib,b2", ["a1-ib", "a3-ib", "b2"]),
        ("gpu-[001-002],cpu-[1-4:2]", ["gpu-001", "gpu-002", "cpu-1", "cpu-3"]),
        ("host1.example.com,host2.example.com", ["host1.example.com", "host2.example.com"]),
    ],
)
def test_expand_nodelist(text, hosts):
    assert slurm.expand_nodelist(text) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node]1[", "node[a-b]", "node[5-3]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="node list"):
        slurm.expand_nodelist(bad)


def test_expand_nodelist_matches_scontrol():
    import shutil

    if shutil.which("scontrol") is None:
        pytest.skip("scontrol is not installed")
    text = "node[01-03,07],gpu5,r[1-2]n[8-10]"
    out = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert slurm.expand_nodelist(text) == out.stdout.split()


def test_tasks_per_node_and_port():
    assert slurm.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert slurm.expand_tasks_per_node("8") == [8]
    assert slurm.rendezvous_port(123456, 0) == slurm.rendezvous_port(123456, 0) == 20000 + 4560
    assert slurm.rendezvous_port(123456, 1) != slurm.rendezvous_port(123456, 0)
    assert all(20000 <= slurm.rendezvous_port(j, s) < 30000 for j in (0, 999, 10**9 + 7) for s in (0, 12))


def test_gpus_on_node():
    assert slurm.gpus_on_node({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0"}) == 4
    assert slurm.gpus_on_node({"CUDA_VISIBLE_DEVICES": "2,3"}) == 2
    assert slurm.gpus_on_node({}) == 0


# --------------------------------------------------------------------------- discovery


def srun_env(procid: int, localid: int, nodeid: int, **extra) -> dict:
    """What srun gives task ``procid`` of a 2-node x 4-task step of job 4242."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_GPUS_ON_NODE": "4",
        **extra,
    }


def test_discover_single_process():
    environ: dict = {}
    env = discover(environ)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "none")
    assert environ == {}


def test_discover_torchrun():
    environ = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500",
    }
    env = discover(environ)
    assert env == DistEnv(3, 4, 1, 2, "torchrun", "n1", 29500)


def test_discover_torchrun_bad_rank():
    with pytest.raises(ValueError, match="outside world size 2"):
        discover({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="not an integer"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})


def test_discover_slurm_exports_rendezvous():
    environ = srun_env(6, 2, 1)
    env = discover(environ)
    port = slurm.rendezvous_port(4242, 0)
    assert env == DistEnv(6, 8, 2, 4, "slurm", "gpu07", port)
    assert {
        k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    } == {
        "RANK": "6",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "2",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(port),
    }
    # every task computes the same rendezvous; a second call reads it back unchanged
    assert discover(srun_env(0, 0, 0)).master_port == port
    again = discover(environ)
    assert (again.rank, again.world_size, again.local_rank, again.master_addr, again.master_port) == (
        6,
        8,
        2,
        "gpu07",
        port,
    )


def test_discover_slurm_user_rendezvous_wins():
    env = discover(srun_env(0, 0, 0, MASTER_ADDR="10.0.0.7", MASTER_PORT="1234"))
    assert (env.master_addr, env.master_port) == ("10.0.0.7", 1234)


def test_batch_script_is_not_a_rank():
    """The batch shell has SLURM_PROCID/SLURM_NTASKS but no step: a plain python run there is one process."""
    batch = {
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_NODELIST": "vm",
        "SLURM_LOCALID": "0",
        "SLURM_TASKS_PER_NODE": "2",
    }
    assert detect_launcher(batch) == "none"
    assert discover(batch).world_size == 1


def test_launcher_precedence():
    assert detect_launcher({**srun_env(1, 1, 0), "RANK": "1", "WORLD_SIZE": "8"}) == "torchrun"
    # srun --mpi=pmi2 starts MPI ranks: both agree, SLURM's variables are read
    assert detect_launcher({**srun_env(1, 1, 0), "PMI_RANK": "1", "PMI_SIZE": "8"}) == "slurm"
    # mpiexec inside an allocation: its ranks are not srun's tasks
    assert detect_launcher({**srun_env(0, 0, 0), "PMI_RANK": "3", "PMI_SIZE": "16"}) == "mpi"
    assert detect_launcher({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert detect_launcher({"PMI_RANK": "0", "PMI_SIZE": "1"}) == "mpi"
    assert detect_launcher({"MESHFORGE_LAUNCHER": "none", "PMI_RANK": "0", "PMI_SIZE": "2"}) == "none"
    with pytest.raises(ValueError, match="MESHFORGE_LAUNCHER"):
        detect_launcher({"MESHFORGE_LAUNCHER": "pbs"})


def test_discover_mpi_without_mpi4py_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails
    with pytest.raises(LaunchError, match="pip install mpi4py"):
        mpi.read_mpi()


# --------------------------------------------------------------------------- meshforge launch


def launch_args(*argv: str):
    args, rest = build_parser().parse_known_args(["launch", *argv])
    assert rest == []
    return args


TRAIN = ("--", "train", "--config", "small", "--train.steps", "5")


def test_launch_torchrun_single_node():
    plan = launcher.plan_launch(launch_args("--gpus-per-node", "8", "--python", "py", *TRAIN))
    assert plan.argv == [
        "py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "8",
        "-m",
        "meshforge",
        "train",
        "--config",
        "small",
        "--train.steps",
        "5",
    ]


def test_launch_torchrun_multi_node():
    plan = launcher.plan_launch(
        launch_args(
            "--nodes",
            "4",
            "--gpus-per-node",
            "8",
            "--rdzv-endpoint",
            "n0:29400",
            "--node-rank",
            "2",
            "--python",
            "py",
            *TRAIN,
        )
    )
    assert plan.argv[:15] == [
        "py",
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "4",
        "--nproc-per-node",
        "8",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "n0:29400",
        "--rdzv-id",
        "meshforge",
        "--node-rank",
        "2",
    ]
    with pytest.raises(launcher.LaunchError, match="needs --rdzv-endpoint"):
        launcher.plan_launch(launch_args("--nodes", "2", *TRAIN))
    with pytest.raises(launcher.LaunchError, match="outside --nodes 2"):
        launcher.plan_launch(launch_args("--nodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "2", *TRAIN))


def test_launch_mpi_line():
    plan = launcher.plan_launch(
        launch_args("--mpi", "--nodes", "2", "--gpus-per-node", "4", "--hosts", "a,b", "--python", "py", *TRAIN)
    )
    assert plan.argv[1:3] == ["-n", "8"]
    assert plan.argv[-8:] == ["py", "-m", "meshforge", "train", "--config", "small", "--train.steps", "5"]
    assert ("-hosts" in plan.argv) or ("--host" in plan.argv)
    with pytest.raises(launcher.LaunchError, match="names 1 hosts"):
        launcher.plan_launch(launch_args("--mpi", "--nodes", "2", "--hosts", "a", *TRAIN))


def test_sbatch_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = launch_args(
        "--slurm",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--time",
        "04:00:00",
        "--account",
        "proj",
        "--python",
        "/venv/bin/python",
        *TRAIN,
    )
    plan = launcher.plan_launch(args)
    s = plan.script
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=04:00:00",
        "#SBATCH --account=proj",
        "#SBATCH --signal=TERM@120",
        "#SBATCH --requeue",
        "srun --kill-on-bad-exit=1 /venv/bin/python -m meshforge train --config small --train.steps 5",
    ):
        assert line in s.splitlines() or any(x.startswith(line) for x in s.splitlines()), line
    assert plan.argv == ["sbatch", "--parsable", str(tmp_path / "meshforge.sbatch")]
    cpu = launcher.plan_launch(launch_args("--slurm", "--cpu", "--gpus-per-node", "2", *TRAIN)).script
    assert "--gpus-per-node" not in cpu and "#SBATCH --ntasks-per-node=2" in cpu
    with pytest.raises(launcher.LaunchError, match="--time"):
        launcher.plan_launch(launch_args("--slurm", "--time", "forever", *TRAIN))
    subprocess.run(["bash", "-n"], input=s, text=True, check=True)  # valid shell


def test_preempted_exit_status_matches_trainer():
    from meshforge.pretrain.faults import EXIT_PREEMPTED, PREEMPTED_MARKER_ENV

    assert launcher.EXIT_PREEMPTED == EXIT_PREEMPTED
    assert launcher.PREEMPTED_MARKER_ENV == PREEMPTED_MARKER_ENV


@pytest.mark.parametrize(
    "srun_exit, marks, requeued, script_exit",
    [
        (0, False, False, 0),  # finished
        (42, True, True, 0),  # every rank exited 42
        (143, True, True, 0),  # rank 0 exited 42, --kill-on-bad-exit signalled a rank still exiting
        (143, False, False, 143),  # killed without a preemption checkpoint: a failure, no requeue
        (1, False, False, 1),
    ],
)
def test_sbatch_script_requeues_only_after_a_preemption_checkpoint(tmp_path, srun_exit, marks, requeued, script_exit):
    """Run the generated batch script with stand-ins for srun (which plays rank 0: it may create
    the marker file, as the trainer does after its preemption checkpoint) and scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mark = f'echo 42 > "${launcher.PREEMPTED_MARKER_ENV}"; ' if marks else ""
    (bin_dir / "srun").write_text(f"#!/bin/bash\n{mark}exit {srun_exit}\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    logs = tmp_path / "logs"
    script = launcher.sbatch_script(launch_args("--slurm", "--cpu", "--log-dir", str(logs), *TRAIN))
    logs.mkdir()
    (logs / ".meshforge-preempted-7").write_text("stale, from an earlier run of job 7")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7"}
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == script_exit, r.stdout + r.stderr
    requeue_log = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    assert ("requeue 7" in requeue_log) == requeued, (requeue_log, r.stdout)
    assert ("meshforge: preempted" in r.stdout) == requeued
    assert not (logs / ".meshforge-preempted-7").exists() or not requeued


def test_launch_cli_writes_script_and_refuses_empty(tmp_path):
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "meshforge", "launch", *a], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    out = run("--slurm", "--cpu", "--gpus-per-node", "2", "--script", "j.sbatch", *TRAIN)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "j.sbatch").read_text().startswith("#!/bin/bash")
    out = run("--gpus-per-node", "2")
    assert out.returncode == 2 and "nothing to launch" in out.stderr
