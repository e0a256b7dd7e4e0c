"""``meshforge launch --ft-groups``: the plan on one node, on several nodes and under SLURM (dry runs, and the
batch script run with stand-ins for srun and scontrol), and the requests it refuses with one line.

The real runs: tests/parallel/test_fault_tolerance.py (groups on this machine) and tests/launch/test_ft_slurm.py
(two groups on a two-node SLURM cluster)."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from meshforge.cli import build_parser
from meshforge.launch import ft_launch, launcher

TRAIN = ("--", "train", "--config", "tiny-test")


def launch_args(*argv: str):
    args, rest = build_parser().parse_known_args(["launch", "--python", "py", *argv])
    assert rest == []
    return args


def ft_tail(group: int, groups: int, lighthouse: str, min_replicas: int = 1, spares: int = 0) -> list[str]:
    return [
        "--parallel.fault_tolerance",
        "torchft",
        "--parallel.ft_groups",
        str(groups),
        "--parallel.ft_spares",
        str(spares),
        "--parallel.ft_replica_group",
        str(group),
        "--parallel.ft_min_replicas",
        str(min_replicas),
        "--parallel.ft_lighthouse",
        lighthouse,
    ]


LIGHTHOUSE_ARGS = [
    "--bind",
    "[::]:29510",
    "--min_replicas",
    "1",
    "--heartbeat_timeout_ms",
    "500",
    "--join_timeout_ms",
    "60000",
]
"""The lighthouse's options by default: a group counts as gone 0.5 s after its last heartbeat."""

# --------------------------------------------------------------------------- one node, several, per node rank

# (launch options, node rank) -> (lighthouse here?, [(torchrun options after the module, CUDA_VISIBLE_DEVICES)])
PLANS = [
    (
        ("--cpu", "--gpus-per-node", "2", "--ft-groups", "2"),
        True,
        [
            ("--standalone --nnodes 1 --nproc-per-node 2 --max-restarts 3", None, 0, "http://127.0.0.1:29510"),
            ("--standalone --nnodes 1 --nproc-per-node 2 --max-restarts 3", None, 1, "http://127.0.0.1:29510"),
        ],
    ),
    (
        ("--cpu", "--ft-groups", "2", "--ft-spares", "1"),  # the standby is group 2, on this node too
        True,
        [
            ("--standalone --nnodes 1 --nproc-per-node 1 --max-restarts 3", None, g, "http://127.0.0.1:29510")
            for g in range(3)
        ],
    ),
    (
        ("--gpus-per-node", "2", "--ft-groups", "2", "--ft-max-restarts", "7"),
        True,
        [
            ("--standalone --nnodes 1 --nproc-per-node 2 --max-restarts 7", "0,1", 0, "http://127.0.0.1:29510"),
            ("--standalone --nnodes 1 --nproc-per-node 2 --max-restarts 7", "2,3", 1, "http://127.0.0.1:29510"),
        ],
    ),
    *(
        (
            (
                "--nodes",
                "4",
                "--node-rank",
                str(r),
                "--hosts",
                "n0,n1,n2,n3",
                "--gpus-per-node",
                "8",
                "--ft-groups",
                "2",
            ),
            r == 0,
            [
                (
                    f"--nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint {'n0:29400' if r < 2 else 'n2:29401'}"
                    f" --rdzv-id meshforge-group{r // 2} --node-rank {r % 2} --max-restarts 3",
                    None,
                    r // 2,
                    "http://n0:29510",
                )
            ],
        )
        for r in range(4)
    ),
    (
        ("--nodes", "2", "--node-rank", "1", "--hosts", "a,b", "--ft-groups", "2", "--ft-rdzv-port", "3000"),
        False,
        [
            (
                "--nnodes 1 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint b:3001 --rdzv-id meshforge-group1 "
                "--node-rank 0 --max-restarts 3",
                None,
                1,
                "http://a:29510",
            )
        ],
    ),
]


@pytest.mark.parametrize("options,lighthouse,groups", PLANS, ids=[" ".join(o) for o, _, _ in PLANS])
def test_ft_plan(options, lighthouse, groups):
    args = launch_args("--dry-run", *options, *TRAIN)
    plan = ft_launch.ft_plan(args, launcher.rank_command(args))
    assert (plan.lighthouse is not None) == lighthouse
    if lighthouse:
        assert plan.lighthouse[1:] == LIGHTHOUSE_ARGS
    assert len(plan.groups) == len(groups) == len(plan.envs)
    for argv, env, (torchrun, gpus, group, address) in zip(plan.groups, plan.envs, groups):
        n, spares = args.ft_groups, args.ft_spares
        assert argv == [
            "py",
            "-m",
            "torch.distributed.run",
            *torchrun.split(),
            "-m",
            "meshforge",
            "train",
            "--config",
            "tiny-test",
            *ft_tail(group, n, address, spares=spares),
        ]
        assert env == ({"CUDA_VISIBLE_DEVICES": gpus} if gpus else {})


def test_ft_dry_run_prints_the_commands(capsys):
    assert (
        launcher.run_launch(launch_args("--dry-run", "--cpu", "--gpus-per-node", "2", "--ft-groups", "2", *TRAIN)) == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and shlex.split(lines[0])[1:] == LIGHTHOUSE_ARGS
    for g, line in enumerate(lines[1:]):
        assert shlex.split(line)[-12:] == ft_tail(g, 2, "http://127.0.0.1:29510")


# --------------------------------------------------------------------------- SLURM


def test_ft_sbatch_script_runs_a_lighthouse_and_a_step_per_group(tmp_path):
    """The batch script, run with stand-ins: srun logs its argv, scontrol lists four hosts. The lighthouse is an
    overlapping step on the first node; group g is one step on nodes 2g, 2g+1 (one torchrun task each), meeting on
    node 2g; the script waits for both groups and exits with the worse status."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "srun.log"
    # the lighthouse step runs until the script kills it; group 1's step fails with 3
    (bin_dir / "srun").write_text(
        f'#!/bin/bash\necho "$*" >> {log}\ncase "$*" in *torchft_lighthouse\\ *) exec sleep 60;; *ft_replica_group\\ 1*) exit 3;; esac\n'
    )
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "n0\\nn1\\nn2\\nn3\\n"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    args = launch_args(
        "--slurm", "--nodes", "4", "--gpus-per-node", "8", "--ft-groups", "2", "--log-dir", str(tmp_path), *TRAIN
    )
    plan = launcher.plan_launch(args)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"):
        assert line in plan.script.splitlines()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[0-3]"}
    r = subprocess.run(["bash", "-c", plan.script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    steps = sorted(log.read_text().splitlines())
    assert len(steps) == 3, steps
    group0, group1, house = steps[0], steps[1], steps[2]
    assert house.startswith("--overlap -N1 -n1 --kill-on-bad-exit=0 -w n0 ") and house.endswith(
        "torchft_lighthouse " + " ".join(LIGHTHOUSE_ARGS)
    )
    for g, line in enumerate((group0, group1)):
        words = line.split()
        assert words[:11] == [
            "--kill-on-bad-exit=1",
            "-N",
            "2",
            "-n",
            "2",
            "--ntasks-per-node=1",
            "-c",
            "8",
            "--gpus-per-node=8",
            "-w",
            f"n{2 * g},n{2 * g + 1}",
        ]
        assert words[11:14] == ["py", "-m", "torch.distributed.run"]
        assert f"--rdzv-endpoint n{2 * g}:{29400 + g} --rdzv-id meshforge-group{g} --max-restarts 3" in line
        assert words[-12:] == ft_tail(g, 2, "http://n0:29510")


# --------------------------------------------------------------------------- refused, one line each

REFUSED = [
    (("--nodes", "3", "--node-rank", "0", "--hosts", "a,b,c", "--ft-groups", "2"), "give a multiple of 2 nodes"),
    (("--slurm", "--nodes", "3", "--ft-groups", "2"), "--nodes 3 --ft-groups 2: each replica group takes whole nodes"),
    (("--slurm", "--ft-groups", "2"), "--nodes 1 --ft-groups 2: each replica group takes whole nodes"),
    (("--mpi", "--ft-groups", "2"), "use it without --mpi"),
    (
        ("--slurm", "--nodes", "4", "--ft-groups", "2", "--ft-spares", "1"),
        "--ft-spares 1: each replica group takes whole",
    ),
    (("--ft-groups", "2", "--ft-spares", "-1"), "parallel.ft_spares = -1 must be >= 0"),
    (("--ft-spares", "1"), "--ft-spares 1 adds standbys to replica groups: give --ft-groups N too"),
    (("--ft-groups", "2", "--ft-heartbeat-timeout-ms", "0"), "both must be >= 1"),
    (("--ft-groups", "2", "--ft-min-replicas", "3"), "parallel.ft_min_replicas = 3 must be between 1 and"),
    (("--ft-groups", "2", "--rdzv-endpoint", "n0:1"), "drop --rdzv-endpoint"),
    (("--nodes", "2", "--ft-groups", "2"), "--hosts naming the 2 nodes in order"),
    (("--nodes", "2", "--node-rank", "0", "--hosts", "a", "--ft-groups", "2"), "--hosts naming the 2 nodes"),
    (("--nodes", "2", "--node-rank", "2", "--hosts", "a,b", "--ft-groups", "2"), "--node-rank 0 ... 1"),
]


@pytest.mark.parametrize("options,message", REFUSED, ids=[m for _, m in REFUSED])
def test_ft_launch_refused_with_one_line(options, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert launcher.run_launch(launch_args("--dry-run", *options, *TRAIN)) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1, out
    assert out.err.startswith("meshforge launch: error: ") and message in out.err, out.err
    assert not list(tmp_path.iterdir())  # no script written


def test_ft_launch_refuses_a_command_other_than_train(capsys):
    assert launcher.run_launch(launch_args("--ft-groups", "2", "--", "sample", "--config", "x")) == 2
    assert "--ft-groups launches `train`" in capsys.readouterr().err


def test_ft_launch_host_that_does_not_resolve_is_one_line(capsys):
    """Node 1 of 2, the hosts' names unknown: one line before anything starts (torchrun would retry the name)."""
    args = launch_args(
        "--nodes", "2", "--node-rank", "1", "--hosts", "n0.invalid,n1.invalid", "--ft-groups", "2", *TRAIN
    )
    assert launcher.run_launch(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meshforge launch: error: --hosts n1.invalid:29401: the host name"), err


@pytest.mark.parametrize(
    "group_exits, marks, requeued, script_exit",
    [((0, 0), False, False, 0), ((42, 143), True, True, 0), ((0, 1), False, False, 1), ((143, 143), False, False, 143)],
)
def test_ft_sbatch_script_requeues_after_a_preemption_checkpoint(tmp_path, group_exits, marks, requeued, script_exit):
    """The groups' worst exit decides, as srun's does for a plain job: a preemption checkpoint (exit 42, or the
    marker rank 0 writes) requeues the job; any other failure is the script's status."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mark = f'echo 42 > "${launcher.PREEMPTED_MARKER_ENV}"; ' if marks else ""
    (bin_dir / "srun").write_text(
        '#!/bin/bash\ncase "$*" in *torchft_lighthouse\\ *) exec sleep 60;; '
        f"*ft_replica_group\\ 0*) exit {group_exits[0]};; *) {mark}exit {group_exits[1]};; esac\n"
    )
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\n[ "$1" = show ] && printf "n0\\nn1\\n" || echo "$@" >> {tmp_path / "scontrol.log"}\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    args = launch_args("--slurm", "--cpu", "--nodes", "2", "--ft-groups", "2", "--log-dir", str(tmp_path), *TRAIN)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[0-1]"}
    r = subprocess.run(
        ["bash", "-c", launcher.plan_launch(args).script], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == script_exit, r.stdout + r.stderr
    log = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    assert ("requeue 7" in log) == requeued and ("meshforge: preempted" in r.stdout) == requeued, (log, r.stdout)
