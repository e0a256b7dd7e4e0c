"""``meshforge launch``: start a job with torchrun, SLURM (sbatch + srun) or MPI (mpiexec).

Everything after ``--`` is the meshforge command each rank runs (``train --config ...``).
Inside the job every rank finds its place with :func:`meshforge.launch.env.discover`,
whichever launcher started it, so the command is the same in all three modes.

SLURM layout: one ``srun`` task per GPU (``--ntasks-per-node = --gpus-per-node``), not one
torchrun per node. SLURM then starts, signals, accounts for and kills every rank itself:
``--signal=TERM@120`` reaches each rank directly (the trainer checkpoints and exits with
EXIT_PREEMPTED, and the script requeues the job), ``--kill-on-bad-exit`` stops the step
when one rank dies, and there is no second rendezvous service whose port has to be agreed
on. What torchrun-per-node would add (elastic restarts inside the allocation) is covered by
``--requeue`` plus the trainer's automatic resume from its newest checkpoint.

Nothing here imports torch: generating a script or a command line is instant.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import LaunchError  # a launch request that cannot work (says what to change)
from .ft_launch import add_ft_arguments, ft_sbatch_script, run_ft
from .sbatch import EXIT_PREEMPTED, PREEMPTED_MARKER_ENV, requeue_tail, sbatch_header
from .torchrun_cmd import check_rendezvous_host, torchrun_argv


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="processes per node, one per GPU (default 1)")
    p.add_argument(
        "--cpu",
        action="store_true",
        help="a CPU job: --gpus-per-node processes per node, but ask the scheduler for no GPUs",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--slurm", action="store_true", help="write an sbatch script (srun, one task per GPU)")
    mode.add_argument("--mpi", action="store_true", help="run with mpiexec (ranks find each other with mpi4py)")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun/mpiexec command instead of running it")
    p.add_argument(
        "--python", default=sys.executable, help="Python that runs meshforge on the nodes (default: this one)"
    )
    g = p.add_argument_group("torchrun (default mode)")
    g.add_argument(
        "--rdzv-endpoint",
        default=None,
        help="HOST:PORT of the rendezvous (node 0's address); required with --nodes > 1",
    )
    g.add_argument("--node-rank", type=int, default=None, help="this node's rank (0..nodes-1)")
    g.add_argument("--rdzv-id", default="meshforge", help="job id for the rendezvous (default meshforge)")
    g = p.add_argument_group("SLURM (--slurm)")
    g.add_argument("--partition", default=None)
    g.add_argument("--time", default=None, help="time limit, [D-]HH:MM:SS")
    g.add_argument("--account", default=None)
    g.add_argument("--job-name", default="meshforge")
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)",
    )
    g.add_argument("--script", default=None, help="where to write the sbatch script (default ./JOB_NAME.sbatch)")
    g.add_argument("--log-dir", default=None, help="where SLURM writes JOB_NAME-JOBID.out (default: cwd)")
    g.add_argument("--submit", action="store_true", help="submit the script with sbatch")
    g.add_argument("--wait", action="store_true", help="with --submit: wait until the job ends; exit with its status")
    add_ft_arguments(p)
    g = p.add_argument_group("MPI (--mpi)")
    g.add_argument(
        "--hosts",
        default=None,
        help="comma-separated hosts, one per node (default: the MPI default); --ft-groups without SLURM on "
        "several nodes: the nodes in order, node 0 first (it runs the lighthouse)",
    )
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="after --: the meshforge command each rank runs, e.g. -- train --config small",
    )


@dataclass
class Plan:
    """What to run: an argv (torchrun/mpiexec/sbatch) and, for SLURM, a script to write first."""

    argv: list[str]
    script: str | None = None
    script_path: Path | None = None
    env: dict[str, str] | None = None


def rank_command(args: argparse.Namespace) -> list[str]:
    """``python -m meshforge <command...>`` from what followed ``--``."""
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if cmd and cmd[0] == "meshforge":
        cmd = cmd[1:]
    if not cmd:
        raise LaunchError(
            "nothing to launch: give the meshforge command after --, e.g. "
            "`meshforge launch --gpus-per-node 8 -- train --config small`"
        )
    if cmd[0] == "launch":
        raise LaunchError("the command after -- is what each rank runs; it cannot be `launch` itself")
    return cmd


def _check_counts(args: argparse.Namespace) -> None:
    if args.nodes < 1:
        raise LaunchError(f"--nodes {args.nodes}: need at least 1")
    if args.gpus_per_node < 1:
        raise LaunchError(f"--gpus-per-node {args.gpus_per_node}: need at least 1 process per node")
    if args.ft_spares and not args.ft_groups:
        raise LaunchError(f"--ft-spares {args.ft_spares} adds standbys to replica groups: give --ft-groups N too")


def torchrun_plan(args: argparse.Namespace) -> Plan:
    cmd = rank_command(args)
    if args.nodes == 1 and args.rdzv_endpoint is None:
        return Plan(torchrun_argv(args.python, args.gpus_per_node) + cmd)
    if args.rdzv_endpoint is None:
        raise LaunchError(
            f"--nodes {args.nodes} needs --rdzv-endpoint HOST:PORT (a port on node 0 that every "
            "node can reach), and run the same command on every node; or use --slurm / --mpi"
        )
    if args.node_rank is not None and not 0 <= args.node_rank < args.nodes:
        raise LaunchError(f"--node-rank {args.node_rank} is outside --nodes {args.nodes}")
    argv = torchrun_argv(args.python, args.gpus_per_node, args.nodes, args.rdzv_endpoint, args.rdzv_id, args.node_rank)
    return Plan(argv + cmd)


def mpi_flavor(mpiexec: str) -> str:
    """``mpich`` (hydra: MPICH, Intel MPI, the PyPI mpich) or ``openmpi``, from ``mpiexec --version``."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired):
        return "mpich"
    return "openmpi" if ("Open MPI" in text or "OpenRTE" in text) else "mpich"


def mpi_plan(args: argparse.Namespace) -> Plan:
    cmd = rank_command(args)
    beside = Path(args.python).parent / "mpiexec"  # a venv's own (pip install mpich) comes first
    mpiexec = str(beside) if beside.exists() else (shutil.which("mpiexec") or shutil.which("mpirun") or "mpiexec")
    flavor = mpi_flavor(mpiexec) if os.path.isabs(mpiexec) else "mpich"
    n = args.nodes * args.gpus_per_node
    hosts = [h for h in (args.hosts or "").split(",") if h]
    if hosts and len(hosts) != args.nodes:
        raise LaunchError(f"--hosts names {len(hosts)} hosts but --nodes is {args.nodes}")
    omp = os.environ.get("OMP_NUM_THREADS", "1")
    if flavor == "openmpi":
        argv = [mpiexec, "-n", str(n), "--map-by", f"ppr:{args.gpus_per_node}:node", "-x", f"OMP_NUM_THREADS={omp}"]
        if hosts:
            argv += ["--host", ",".join(f"{h}:{args.gpus_per_node}" for h in hosts)]
    else:
        argv = [mpiexec, "-n", str(n), "-ppn", str(args.gpus_per_node), "-genv", "OMP_NUM_THREADS", omp]
        if hosts:
            argv += ["-hosts", ",".join(hosts)]
    return Plan(argv + [args.python, "-m", "meshforge", *cmd])


def sbatch_script(args: argparse.Namespace) -> str:
    """The batch script: one srun task per GPU, preemption warning, requeue on a preemption exit."""
    header = sbatch_header(args)
    cmd = rank_command(args)
    return "\n".join(
        [
            *header,
            "# Each srun task is one rank; meshforge reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the",
            "# node list itself (meshforge/launch/env.py): rendezvous on the first node, port from the job id.",
            "rc=0",
            "srun --kill-on-bad-exit=1 " + shlex.join([args.python, "-m", "meshforge", *cmd]) + " || rc=$?",
            *requeue_tail(),
        ]
    )


def slurm_plan(args: argparse.Namespace) -> Plan:
    script = ft_sbatch_script(args, rank_command(args)) if args.ft_groups else sbatch_script(args)
    path = Path(args.script or f"{args.job_name}.sbatch").resolve()
    argv = ["sbatch", "--parsable", str(path)]
    return Plan(argv, script=script, script_path=path)


FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
}


def job_state(job: str) -> tuple[str, int] | None:
    """(JobState, exit status) from ``scontrol show job``; None once SLURM has forgotten the job."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=60)
    state = re.search(r"\bJobState=(\S+)", out.stdout)
    if out.returncode != 0 or state is None:
        return None
    code = re.search(r"\bExitCode=(\d+):(\d+)", out.stdout)
    rc = int(code.group(1)) if code else 0
    if code and int(code.group(2)):
        rc = 128 + int(code.group(2))  # killed by a signal
    return state.group(1), rc


def wait_for_job(job: str, poll_s: float = 1.0) -> tuple[str, int]:
    """Poll until the job ends (a requeued job is waited for again); return its state and exit status.

    Polls ``scontrol`` every second instead of ``sbatch --wait``, whose back-off can leave a
    finished job unnoticed for half a minute.
    """
    import time

    last = None
    while True:
        got = job_state(job)
        if got is None:
            if last is None:
                raise LaunchError(f"SLURM does not know job {job}")
            return "GONE", 0 if last == "COMPLETED" else 1
        last = got[0]
        if last in FINAL_STATES:
            rc = got[1]
            if last != "COMPLETED" and rc == 0:
                rc = 1  # cancelled, timed out, node failure: a failure even without an exit status
            return last, rc
        time.sleep(poll_s)


def plan_launch(args: argparse.Namespace) -> Plan:
    _check_counts(args)
    if args.wait and not args.submit:
        raise LaunchError("--wait only makes sense with --submit")
    if args.slurm:
        return slurm_plan(args)
    if args.submit:
        raise LaunchError("--submit is for --slurm")
    if args.mpi:
        return mpi_plan(args)
    return torchrun_plan(args)


def run_launch(args: argparse.Namespace) -> int:
    """The ``meshforge launch`` command."""
    if args.ft_groups and not args.slurm:  # the lighthouse and this node's replica groups (launch/ft_launch.py)
        try:
            _check_counts(args)
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", "1")
            return run_ft(args, rank_command(args), env)
        except LaunchError as e:
            print(f"meshforge launch: error: {e}", file=sys.stderr)
            return 2
    try:
        plan = plan_launch(args)
    except LaunchError as e:
        print(f"meshforge launch: error: {e}", file=sys.stderr)
        return 2
    if plan.script is not None:
        plan.script_path.parent.mkdir(parents=True, exist_ok=True)
        plan.script_path.write_text(plan.script)
        plan.script_path.chmod(0o755)
        print(f"wrote {plan.script_path}")
        if not args.submit:
            print(f"submit with: sbatch {shlex.quote(str(plan.script_path))}")
            return 0
        if shutil.which("sbatch") is None:
            print("meshforge launch: error: sbatch not found; is this a SLURM login node?", file=sys.stderr)
            return 2
        out = subprocess.run(plan.argv, stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            return out.returncode
        job = out.stdout.strip().split(";")[0]  # --parsable: JOBID[;CLUSTER]
        print(f"submitted job {job}", flush=True)
        if not args.wait:
            return 0
        state, rc = wait_for_job(job)
        print(f"job {job} {state} (exit {rc})", flush=True)
        return rc
    if not args.dry_run and not args.mpi and args.rdzv_endpoint is not None:
        try:
            check_rendezvous_host(args.rdzv_endpoint)
        except LaunchError as e:
            print(f"meshforge launch: error: {e}", file=sys.stderr)
            return 2
    print(shlex.join(plan.argv), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if args.mpi:
        os.execvpe(plan.argv[0], plan.argv, env)
    return run_torchrun(plan.argv, env)


def run_torchrun(argv: list[str], env: dict[str, str]) -> int:
    """Run torchrun and exit as the ranks did: torchrun reports any failed rank as status 1, but a
    scheduler must see EXIT_PREEMPTED (42) to requeue a job whose ranks checkpointed on SIGTERM.

    The ranks create the file named by PREEMPTED_MARKER_ENV once their preemption checkpoint is
    complete; SIGTERM and SIGUSR1 reaching this process are passed on to torchrun as SIGTERM
    (which it forwards to every rank; SIGUSR1 would kill torchrun itself).
    """
    import signal
    import tempfile

    with tempfile.TemporaryDirectory(prefix="meshforge-launch-") as tmp:
        marker = Path(env.setdefault(PREEMPTED_MARKER_ENV, str(Path(tmp) / "preempted")))
        marker.unlink(missing_ok=True)
        proc = subprocess.Popen(argv, env=env)

        def forward(signum, frame):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        try:
            rc = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if marker.exists():
            marker.unlink(missing_ok=True)
            print(
                f"meshforge launch: the ranks wrote a checkpoint on a preemption signal; exiting with status "
                f"{EXIT_PREEMPTED} so a scheduler requeues (the rerun resumes)",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_PREEMPTED
        return rc
