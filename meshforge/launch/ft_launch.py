"""``meshforge launch --ft-groups N``: a torchft lighthouse and one torchrun per replica group, on this node.

Each group is its own torchrun job (``--standalone``: a rendezvous of its own) with
``--max-restarts``, so a rank that dies restarts its group, which then heals from a live group;
the other groups never stop. The lighthouse (``torchft_lighthouse``, shipped by the ``ft`` extra)
listens on ``--ft-port`` of every interface; the groups get its address, their id and the group
count as ``--parallel.*`` overrides appended to the command. With GPUs, group g sees GPUs
g*G ... g*G+G-1 (``CUDA_VISIBLE_DEVICES``; G = ``--gpus-per-node``, the ranks of one group).

Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from ..errors import LaunchError


@dataclass
class FtPlan:
    lighthouse: list[str]
    groups: list[list[str]]
    envs: list[dict[str, str]]


def add_ft_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fault-tolerant replica groups (--ft-groups, torchrun on this node)")
    g.add_argument(
        "--ft-groups",
        type=int,
        default=0,
        metavar="N",
        help="start a torchft lighthouse and N replica groups of --gpus-per-node ranks each "
        "(parallel.fault_tolerance = torchft; needs the ft extra)",
    )
    g.add_argument("--ft-port", type=int, default=29510, help="the lighthouse's port (default 29510)")
    g.add_argument(
        "--ft-min-replicas", type=int, default=1, help="groups the lighthouse needs for a quorum (default 1)"
    )
    g.add_argument(
        "--ft-max-restarts", type=int, default=3, help="torchrun restarts of each group after a failure (default 3)"
    )


def ft_plan(args: argparse.Namespace, cmd: list[str]) -> FtPlan:
    """The lighthouse's argv and each group's torchrun argv and extra environment."""
    n, per_group = args.ft_groups, args.gpus_per_node
    if args.nodes != 1 or args.slurm or args.mpi:
        raise LaunchError(
            "--ft-groups starts every replica group on this node with torchrun; on several nodes "
            "run the lighthouse and one torchrun per group yourself (README: Fault-tolerant replica "
            "groups)"
        )
    if n < 1 or not 1 <= args.ft_min_replicas <= n:
        raise LaunchError(f"--ft-groups {n} --ft-min-replicas {args.ft_min_replicas}: need 1 <= min replicas <= groups")
    if not cmd or cmd[0] != "train":
        raise LaunchError("--ft-groups launches `train` (give `-- train ...`)")
    lighthouse = shutil.which("torchft_lighthouse")
    if lighthouse is None and not args.dry_run:
        raise LaunchError('--ft-groups needs the torchft_lighthouse program of the ft extra: pip install -e ".[ft]"')
    address = f"http://127.0.0.1:{args.ft_port}"
    groups, envs = [], []
    for g in range(n):
        groups.append(
            [
                args.python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nnodes",
                "1",
                "--nproc-per-node",
                str(per_group),
                "--max-restarts",
                str(args.ft_max_restarts),
                "-m",
                "meshforge",
                *cmd,
                "--parallel.fault_tolerance",
                "torchft",
                "--parallel.ft_groups",
                str(n),
                "--parallel.ft_replica_group",
                str(g),
                "--parallel.ft_lighthouse",
                address,
            ]
        )
        envs.append(
            {} if args.cpu else {"CUDA_VISIBLE_DEVICES": ",".join(str(g * per_group + i) for i in range(per_group))}
        )
    return FtPlan(
        [
            lighthouse or "torchft_lighthouse",
            "--bind",
            f"[::]:{args.ft_port}",
            "--min_replicas",
            str(args.ft_min_replicas),
        ],
        groups,
        envs,
    )


def run_ft(args: argparse.Namespace, cmd: list[str], env: dict[str, str]) -> int:
    """Start the lighthouse, then every group; wait for the groups; stop the lighthouse. -> the worst exit status."""
    plan = ft_plan(args, cmd)
    print(shlex.join(plan.lighthouse), flush=True)
    for argv, extra in zip(plan.groups, plan.envs):
        print(" ".join(f"{k}={v}" for k, v in extra.items()) + (" " if extra else "") + shlex.join(argv), flush=True)
    if args.dry_run:
        return 0
    house = subprocess.Popen(plan.lighthouse, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # bound before the first group asks it for a quorum (the groups retry anyway)
        if house.poll() is not None:
            print(
                f"meshforge launch: error: torchft_lighthouse exited at once (status {house.returncode}); is port "
                f"{args.ft_port} taken? choose another with --ft-port",
                file=sys.stderr,
            )
            return 2
        procs = [subprocess.Popen(argv, env={**env, **extra}) for argv, extra in zip(plan.groups, plan.envs)]
        return max(p.wait() for p in procs)
    finally:
        house.terminate()
        house.wait()
