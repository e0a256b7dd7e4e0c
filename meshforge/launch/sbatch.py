"""The parts every batch script of ``meshforge launch --slurm`` shares: the ``#SBATCH`` header and the
run-then-requeue tail (a preemption checkpoint requeues the job; anything else exits with its status).

The script of a plain job (``launcher.sbatch_script``: one srun task per GPU) and of replica groups
(``ft_launch.ft_sbatch_script``: the lighthouse and one srun step per group) put their own lines between.
Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

from ..errors import LaunchError

EXIT_PREEMPTED = 42
"""The trainer's exit status after a preemption checkpoint (meshforge.pretrain.faults.EXIT_PREEMPTED)."""
PREEMPTED_MARKER_ENV = "MESHFORGE_PREEMPTED_MARKER"
"""The file rank 0 creates after its preemption checkpoint (meshforge.pretrain.faults.PREEMPTED_MARKER_ENV)."""
PREEMPT_WARNING_S = 120
"""``--signal=TERM@120``: SIGTERM two minutes before the time limit, time for a checkpoint."""


def sbatch_header(args: argparse.Namespace) -> list[str]:
    """``#!/bin/bash``, the ``#SBATCH`` lines (``--gpus-per-node`` tasks on each of ``--nodes``), the
    thread count and the preemption marker's path, up to where the job's own steps start."""
    if args.time and not re.fullmatch(r"(\d+-)?\d+(:\d\d){0,2}", args.time):
        raise LaunchError(f"--time {args.time!r}: expected [D-]HH:MM:SS")
    log_dir = Path(args.log_dir or ".").resolve()
    lines = [
        "#!/bin/bash",
        "# written by `meshforge launch --slurm`; submit with sbatch",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        f"#SBATCH --ntasks-per-node={args.gpus_per_node}",
    ]
    if not args.cpu:
        lines.append(f"#SBATCH --gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={args.cpus_per_task}")
    for flag, value in (("partition", args.partition), ("account", args.account), ("time", args.time)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    return lines + [
        f"#SBATCH --signal=TERM@{PREEMPT_WARNING_S}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={log_dir / '%x-%j.out'}",
        f"#SBATCH --chdir={Path.cwd()}",
        *(f"#SBATCH {extra}" for extra in args.sbatch_arg),
        "",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
        'echo "meshforge: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST (restart ${SLURM_RESTART_COUNT:-0})"',
        "# rank 0 creates this file once its preemption checkpoint is complete (the exit status alone",
        "# is not enough: --kill-on-bad-exit signals the ranks still exiting and srun reports that)",
        f"export {PREEMPTED_MARKER_ENV}={shlex.quote(str(log_dir))}/.meshforge-preempted-$SLURM_JOB_ID",
        f'rm -f "${PREEMPTED_MARKER_ENV}"',
    ]


def requeue_tail() -> list[str]:
    """After the job's steps set ``$rc``: requeue after a preemption checkpoint, else exit with ``$rc``."""
    return [
        f'if [ "$rc" -eq {EXIT_PREEMPTED} ] || {{ [ "$rc" -ne 0 ] && [ -e "${PREEMPTED_MARKER_ENV}" ]; }}; then',
        "  # SIGTERM before the time limit (or scancel --signal=TERM): the trainer saved a checkpoint;",
        "  # requeue, and the next run resumes from it",
        f'  rm -f "${PREEMPTED_MARKER_ENV}"',
        '  echo "meshforge: preempted (srun exit $rc), requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'exit "$rc"',
        "",
    ]
