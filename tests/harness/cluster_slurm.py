"""A SLURM cluster on the nodes of tests/harness/cluster_harness.py: slurmctld on node 0, one slurmd per node.

Its own config (``slurm.conf`` in a directory of the test's, ``SLURM_CONF`` pointing at it: the
machine's ``/etc/slurm`` is not touched), each node a ``NodeName`` with its ``NodeAddr`` in the
cluster's subnet, state, spool, pid and log files in that directory. The daemons run in the nodes'
network namespaces, so ``Cluster.close`` kills them with everything else there. slurmd is started with
``nsenter --net`` plus a mount namespace of its own holding the node's hosts file, not with ``ip netns
exec``: that one mounts a fresh /sys, without the cgroup file systems slurmd needs. munged is the
machine's (its socket is a file: every namespace reaches it); :func:`slurm_problem` says when
something is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from cluster_harness import Cluster

SETTINGS = [
    "ClusterName=mft",
    "SlurmUser=root",
    "SlurmdUser=root",
    "AuthType=auth/munge",
    "CredType=cred/munge",
    "MpiDefault=none",
    "ProctrackType=proctrack/linuxproc",
    "TaskPlugin=task/none",
    "SwitchType=switch/none",
    "SelectType=select/cons_tres",
    "SelectTypeParameters=CR_Core",
    "SchedulerType=sched/backfill",
    "JobAcctGatherType=jobacct_gather/none",
    "AccountingStorageType=accounting_storage/none",
    "JobCompType=jobcomp/none",
    "ReturnToService=2",
    "SlurmdParameters=config_overrides",
    "SlurmctldTimeout=30",
    "SlurmdTimeout=30",
    "InactiveLimit=0",
    "KillWait=5",
    "MinJobAge=300",
]


def slurm_problem() -> str | None:
    """Why the SLURM daemons cannot run here, or None."""
    for exe in ("slurmctld", "slurmd", "sbatch", "munge", "nsenter"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (apt-get install slurmctld slurmd slurm-client munge util-linux)"
    if subprocess.run(["munge", "-n"], stdin=subprocess.DEVNULL, capture_output=True).returncode != 0:
        return "munged is not running (`sudo bash scripts/ci_slurm.sh` starts it)"
    return None


def start_slurm(cluster: Cluster, root: Path, cpus: int = 2, timeout: float = 60) -> dict[str, str]:
    """Start slurmctld on node 0 and a slurmd on every node; wait until every node is idle. Returns the
    environment (``SLURM_CONF``) for commands run on the nodes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ctld").mkdir(exist_ok=True)
    conf = root / "slurm.conf"
    nodes = [
        f"NodeName={h} NodeAddr={a} CPUs={cpus} State=UNKNOWN" for h, a in zip(cluster.hostnames, cluster.addresses)
    ]
    conf.write_text(
        "\n".join(
            [
                *SETTINGS,
                f"SlurmctldHost={cluster.hostnames[0]}({cluster.addresses[0]})",
                f"StateSaveLocation={root}/ctld",
                f"SlurmdSpoolDir={root}/spool-%n",
                f"SlurmctldPidFile={root}/ctld.pid",
                f"SlurmdPidFile={root}/slurmd-%n.pid",
                f"SlurmctldLogFile={root}/ctld.log",
                f"SlurmdLogFile={root}/slurmd-%n.log",
                *nodes,
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            ]
        )
        + "\n"
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster.popen(
        0, ["slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for ns, host in zip(cluster.namespaces, cluster.hostnames):
        (root / f"spool-{host}").mkdir(exist_ok=True)
        script = (
            f"mount --bind /etc/netns/{ns}/hosts /etc/hosts && hostname {host} && exec slurmd -D -N {host} -f {conf}"
        )
        cluster.procs.append(
            subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--uts", "sh", "-c", script],
                env=env,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    deadline = time.monotonic() + timeout
    while True:
        p = cluster.popen(
            0,
            ["sinfo", "-h", "-N", "-o", "%N %t"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        states = p.communicate(timeout=30)[0]
        if states.count("idle") == cluster.n:
            return env
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the SLURM nodes did not become idle in {timeout:.0f} s: {states.strip()!r}; see {root}/*.log"
            )
        time.sleep(0.5)


def submit_launch(
    cluster: Cluster, env: dict, log_dir: Path, job_name: str, launch: list[str], train: list[str]
) -> subprocess.Popen:
    """``meshforge launch --slurm --cpu --nodes N --gpus-per-node 2 LAUNCH ... --submit --wait -- TRAIN`` on
    node 0 (where slurmctld answers); the script and the job's log (:func:`job_log`) in ``log_dir``."""
    argv = ["launch", "--slurm", "--cpu", "--nodes", str(cluster.n), "--gpus-per-node", "2", *launch]
    argv += ["--job-name", job_name, "--time", "00:15:00", "--script", str(log_dir / "job.sbatch")]
    return cluster.meshforge(0, [*argv, "--log-dir", str(log_dir), "--submit", "--wait", "--", *train], env)


def job_log(log_dir: Path, job_name: str) -> str:
    """What the job of :func:`submit_launch` wrote to its SLURM output file(s)."""
    return "".join(f.read_text() for f in log_dir.glob(f"{job_name}-*.out"))
