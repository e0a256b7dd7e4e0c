"""``meshforge launch --ft-groups N``: a torchft lighthouse and one torchrun per replica group.

Each group is its own torchrun job with ``--max-restarts``, so a rank that dies restarts its group,
which then heals from a live group; the other groups never stop. The groups get the lighthouse's
address, their id, the group count and ``--ft-min-replicas`` as ``--parallel.*`` overrides appended
to the command. Where they run (``--gpus-per-node`` G is the ranks of a group on each of its nodes):

- one node (``--nodes 1``): every group here, each ``--standalone``; with GPUs group g sees GPUs
  g*G ... g*G+G-1 (``CUDA_VISIBLE_DEVICES``); the lighthouse on 127.0.0.1.
- ``--nodes M`` (M a multiple of N; ``--hosts`` names the M nodes in order, ``--node-rank R``): group g
  is nodes g*M/N ... (g+1)*M/N - 1, meeting at a c10d rendezvous on its first node, port
  ``--ft-rdzv-port`` + g; node R starts its group's torchrun, node 0 also the lighthouse
  (``--ft-port``, every interface), which every rank reaches at ``http://<node 0>:<ft-port>``.
- ``--slurm``: the batch script (:func:`ft_sbatch_script`) does the same inside the allocation: the
  lighthouse as an ``srun --overlap`` step on the first node, one srun step per group (one torchrun
  task on each of its nodes), the nodes taken in the order of ``scontrol show hostnames``.

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
from pathlib import Path

from ..config import ConfigError, ParallelConfig, check_ft_groups
from ..errors import LaunchError
from .sbatch import requeue_tail, sbatch_header
from .torchrun_cmd import check_rendezvous_host, torchrun_argv

HEARTBEAT_TIMEOUT_MS = 500
"""The lighthouse's ``--heartbeat_timeout_ms`` under ``launch --ft-groups``: five of the Manager's 100 ms beats."""
JOIN_TIMEOUT_MS = 60000
"""The lighthouse's ``--join_timeout_ms`` under ``launch --ft-groups`` (torchft's default)."""


def total_groups(args: argparse.Namespace) -> int:
    """The groups ``--ft-groups N --ft-spares S`` starts: N + S."""
    return args.ft_groups + args.ft_spares


@dataclass
class FtPlan:
    """What one node starts: the lighthouse (None: another node runs it) and its groups' torchrun argv and
    extra environment."""

    lighthouse: list[str] | None
    groups: list[list[str]]
    envs: list[dict[str, str]]
    endpoints: list[str]


def add_ft_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "fault-tolerant replica groups (--ft-groups: torchrun per group, on one node, several, or SLURM)"
    )
    g.add_argument(
        "--ft-groups",
        type=int,
        default=0,
        metavar="N",
        help="start a torchft lighthouse and N replica groups, each --nodes/N nodes (all on the one node with "
        "--nodes 1) of --gpus-per-node ranks (parallel.fault_tolerance = torchft; needs the ft extra)",
    )
    g.add_argument(
        "--ft-port", type=int, default=29510, help="the lighthouse's port, on node 0 / the first node (default 29510)"
    )
    g.add_argument(
        "--ft-rdzv-port",
        type=int,
        default=29400,
        help="several nodes: group g's c10d rendezvous listens on its first node at this port + g (default 29400)",
    )
    g.add_argument(
        "--ft-min-replicas",
        type=int,
        default=1,
        help="groups a step needs: the lighthouse's quorum and parallel.ft_min_replicas (default 1)",
    )
    g.add_argument(
        "--ft-spares",
        type=int,
        default=0,
        metavar="S",
        help="also start S standby groups (ids N ... N+S-1, placed after the N groups): each holds the live weights "
        "and trains a failed group's share of every batch at once, until that group is back (parallel.ft_spares)",
    )
    g.add_argument(
        "--ft-max-restarts", type=int, default=3, help="torchrun restarts of each group after a failure (default 3)"
    )
    g.add_argument(
        "--ft-heartbeat-timeout-ms",
        type=int,
        default=HEARTBEAT_TIMEOUT_MS,
        help="the lighthouse counts a group gone this long after its last heartbeat (each group's rank 0 beats "
        "every 100 ms): how long the others wait on a dead group before going on without it (default "
        f"{HEARTBEAT_TIMEOUT_MS}; torchft's own is 5000)",
    )
    g.add_argument(
        "--ft-join-timeout-ms",
        type=int,
        default=JOIN_TIMEOUT_MS,
        help="how long a quorum waits for a group that still beats but has not asked (a slow or hung group) before "
        f"going on without it (default {JOIN_TIMEOUT_MS}, torchft's)",
    )


def check_ft_launch(args: argparse.Namespace, cmd: list[str]) -> int:
    """The checks every form of ``--ft-groups`` shares (LaunchError, one line); -> nodes per group."""
    n = total_groups(args)
    try:
        check_ft_groups(
            ParallelConfig(
                fault_tolerance="torchft",
                ft_groups=args.ft_groups,
                ft_spares=args.ft_spares,
                ft_min_replicas=args.ft_min_replicas,
            )
        )
    except ConfigError as e:
        raise LaunchError(
            f"--ft-groups {args.ft_groups} --ft-spares {args.ft_spares} --ft-min-replicas {args.ft_min_replicas}: {e}"
        ) from None
    if args.ft_heartbeat_timeout_ms < 1 or args.ft_join_timeout_ms < 1:
        raise LaunchError(
            f"--ft-heartbeat-timeout-ms {args.ft_heartbeat_timeout_ms} --ft-join-timeout-ms {args.ft_join_timeout_ms}: "
            "both must be >= 1"
        )
    if not cmd or cmd[0] != "train":
        raise LaunchError("--ft-groups launches `train` (give `-- train ...`)")
    if args.mpi:
        raise LaunchError("--ft-groups runs each replica group as a torchrun job: use it without --mpi")
    if args.rdzv_endpoint is not None:
        raise LaunchError(
            "--ft-groups gives each replica group its own rendezvous (on its first node, port --ft-rdzv-port + "
            "its id): drop --rdzv-endpoint"
        )
    if args.nodes == 1 and not args.slurm:
        return 1
    if args.nodes % n:
        raise LaunchError(
            f"--nodes {args.nodes} --ft-groups {args.ft_groups}"
            + (f" --ft-spares {args.ft_spares}" if args.ft_spares else "")
            + f": each replica group takes whole nodes; give a multiple of {n} "
            "nodes" + ("" if args.slurm else " (or --nodes 1: every group on this node)")
        )
    return args.nodes // n


def group_command(args: argparse.Namespace, cmd: list[str], group: int, lighthouse: str) -> list[str]:
    """What each rank of group ``group`` runs: ``cmd`` with the replica group settings appended."""
    return [
        *cmd,
        "--parallel.fault_tolerance",
        "torchft",
        "--parallel.ft_groups",
        str(args.ft_groups),
        "--parallel.ft_spares",
        str(args.ft_spares),
        "--parallel.ft_replica_group",
        str(group),
        "--parallel.ft_min_replicas",
        str(args.ft_min_replicas),
        "--parallel.ft_lighthouse",
        lighthouse,
    ]


def lighthouse_argv(args: argparse.Namespace) -> list[str]:
    exe = Path(args.python).parent / "torchft_lighthouse"  # the venv's own first, as for mpiexec
    found = str(exe) if exe.exists() else shutil.which("torchft_lighthouse")
    if found is None and not args.dry_run and not args.slurm:
        raise LaunchError('--ft-groups needs the torchft_lighthouse program of the ft extra: pip install -e ".[ft]"')
    return [
        found or "torchft_lighthouse",
        "--bind",
        f"[::]:{args.ft_port}",
        "--min_replicas",
        str(args.ft_min_replicas),
        "--heartbeat_timeout_ms",
        str(args.ft_heartbeat_timeout_ms),
        "--join_timeout_ms",
        str(args.ft_join_timeout_ms),
    ]


def ft_plan(args: argparse.Namespace, cmd: list[str]) -> FtPlan:
    """This node's part: the lighthouse (on node 0) and its groups' torchrun argv and extra environment."""
    per_group = check_ft_launch(args, cmd)
    n, nproc = total_groups(args), args.gpus_per_node
    if args.nodes == 1:
        address = f"http://127.0.0.1:{args.ft_port}"
        groups = [
            torchrun_argv(args.python, nproc, max_restarts=args.ft_max_restarts) + group_command(args, cmd, g, address)
            for g in range(n)
        ]
        return FtPlan(lighthouse_argv(args), groups, [_gpus(args, g) for g in range(n)], [])
    hosts = [h for h in (args.hosts or "").split(",") if h]
    if len(hosts) != args.nodes or args.node_rank is None or not 0 <= args.node_rank < args.nodes:
        raise LaunchError(
            f"--ft-groups on --nodes {args.nodes} without SLURM: run the same command on every node with "
            f"--hosts naming the {args.nodes} nodes in order (node 0 runs the lighthouse) and --node-rank 0 ... "
            f"{args.nodes - 1}"
        )
    g, rank = divmod(args.node_rank, per_group)
    endpoint = f"{hosts[g * per_group]}:{args.ft_rdzv_port + g}"
    argv = torchrun_argv(
        args.python, nproc, per_group, endpoint, f"{args.rdzv_id}-group{g}", rank, args.ft_max_restarts
    )
    group = argv + group_command(args, cmd, g, f"http://{hosts[0]}:{args.ft_port}")
    house = lighthouse_argv(args) if args.node_rank == 0 else None
    return FtPlan(house, [group], [{}], [endpoint, f"{hosts[0]}:{args.ft_port}"])


def _gpus(args: argparse.Namespace, g: int) -> dict[str, str]:
    """Group ``g``'s GPUs on a node shared by every group."""
    n = args.gpus_per_node
    return {} if args.cpu else {"CUDA_VISIBLE_DEVICES": ",".join(str(g * n + i) for i in range(n))}


def ft_sbatch_script(args: argparse.Namespace, cmd: list[str]) -> str:
    """The batch script of replica groups: the lighthouse on the first node, one srun step per group (a
    torchrun task on each of its nodes, restarted by torchrun), waited for together; requeue as usual."""
    k = check_ft_launch(args, cmd)
    n, nproc = total_groups(args), args.gpus_per_node
    cpus = nproc * (args.cpus_per_task or 1)
    house = shlex.join(["srun", "--overlap", "-N1", "-n1", "--kill-on-bad-exit=0"]) + ' -w "${hosts[0]}" '
    lines = [
        *sbatch_header(args),
        f"# {n} torchft replica groups of {k} node(s) x {nproc} ranks: group g is nodes g*{k} ... g*{k}+{k - 1} of",
        "# the allocation (in `scontrol show hostnames` order), one torchrun task per node with restarts,",
        f"# meeting at a c10d rendezvous on the group's first node, port {args.ft_rdzv_port} + g; the lighthouse",
        f"# listens on the first node, port {args.ft_port}. Every node must reach both by hostname (README).",
        'mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        f'lighthouse="http://${{hosts[0]}}:{args.ft_port}"',
        house + shlex.join(lighthouse_argv(args)) + " &",
        "house=$!",
        "groups=()",
    ]
    for g in range(n):
        step = ["srun", "--kill-on-bad-exit=1", "-N", str(k), "-n", str(k), "--ntasks-per-node=1", "-c", str(cpus)]
        if not args.cpu:
            step.append(f"--gpus-per-node={nproc}")
        argv = torchrun_argv(args.python, nproc, k, "HOST:1", f"{args.rdzv_id}-group{g}", None, args.ft_max_restarts)
        words = [shlex.quote(a) for a in step + argv + group_command(args, cmd, g, "LIGHTHOUSE")]
        words[words.index("HOST:1")] = f'"${{hosts[{g * k}]}}:{args.ft_rdzv_port + g}"'
        words[words.index("LIGHTHOUSE")] = '"$lighthouse"'
        lines += [
            f"# group {g}",
            f'srun_nodes=$(IFS=,; echo "${{hosts[*]:{g * k}:{k}}}")',
            " ".join(words[: len(step)]) + ' -w "$srun_nodes" ' + " ".join(words[len(step) :]) + " &",
            "groups+=($!)",
        ]
    lines += [
        "rc=0",
        'for pid in "${groups[@]}"; do',
        '  wait "$pid"; s=$?',
        '  if [ "$s" -gt "$rc" ]; then rc=$s; fi',
        "done",
        'kill "$house" 2>/dev/null; wait "$house" 2>/dev/null',
        *requeue_tail(),
    ]
    return "\n".join(lines)


def run_ft(args: argparse.Namespace, cmd: list[str], env: dict[str, str]) -> int:
    """Start the lighthouse (node 0), then this node's groups; wait for the groups; stop the lighthouse.
    -> the worst exit status."""
    plan = ft_plan(args, cmd)
    if plan.lighthouse:
        print(shlex.join(plan.lighthouse), flush=True)
    for argv, extra in zip(plan.groups, plan.envs):
        print(" ".join(f"{k}={v}" for k, v in extra.items()) + (" " if extra else "") + shlex.join(argv), flush=True)
    if args.dry_run:
        return 0
    for endpoint in plan.endpoints:
        check_rendezvous_host(endpoint, "--hosts")
    house = None
    if plan.lighthouse:
        house = subprocess.Popen(plan.lighthouse, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # bound before the first group asks it for a quorum (the groups retry anyway)
        if house is not None and house.poll() is not None:
            print(
                f"meshforge launch: error: torchft_lighthouse exited at once (status {house.returncode}); is port "
                f"{args.ft_port} taken? choose another with --ft-port",
                file=sys.stderr,
            )
            return 2
        procs = [subprocess.Popen(argv, env={**env, **extra}) for argv, extra in zip(plan.groups, plan.envs)]
        return max(p.wait() for p in procs)
    finally:
        if house is not None:
            house.terminate()
            house.wait()
