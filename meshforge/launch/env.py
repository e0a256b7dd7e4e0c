"""Who am I in the job: rank, world size, local rank, whichever launcher started us.

:func:`discover` reads, in this order:

1. torchrun (or anything that sets its variables): RANK / WORLD_SIZE / LOCAL_RANK /
   MASTER_ADDR / MASTER_PORT. Explicit variables always win, so torchrun inside an srun
   step, or a hand-made environment, is taken as it is.
2. a SLURM ``srun`` task: SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID; the master
   is the step's first host, the port derived from the job id (:mod:`.slurm`).
3. an MPI launcher (``mpiexec``/``mpirun``): rank and size from mpi4py's COMM_WORLD, the
   local rank from a shared-memory split, rank 0's hostname and a free port broadcast
   (:mod:`.mpi`). When srun starts MPI ranks (``srun --mpi=pmi2``) both agree; when
   ``mpiexec`` runs inside an allocation its ranks are not srun's tasks, so MPI wins then.
4. otherwise rank 0 of a world of 1.

``MESHFORGE_LAUNCHER=torchrun|slurm|mpi|none`` forces one. For a job of more than one
process, :func:`discover` writes RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT into the environment (not overwriting MASTER_ADDR/MASTER_PORT
a user set), so ``torch.distributed.init_process_group`` with the default ``env://``
rendezvous works the same however the job started, and a second call returns the same.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..errors import LaunchError
from . import mpi, slurm

LAUNCHERS = ("torchrun", "slurm", "mpi", "none")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    local_world_size: int | None = None
    """Processes on this node, when the launcher says."""
    launcher: str = "none"
    """Who started the job: torchrun, slurm, mpi or none."""
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _num(environ, name: str, default: int | None) -> int | None:
    value = environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def detect_launcher(environ=None) -> str:
    """Which launcher started this process (see the module docs for the order)."""
    environ = os.environ if environ is None else environ
    forced = environ.get("MESHFORGE_LAUNCHER", "").strip().lower()
    if forced:
        if forced not in LAUNCHERS:
            raise LaunchError(f"MESHFORGE_LAUNCHER={forced!r}: expected one of {', '.join(LAUNCHERS)}")
        return forced
    if environ.get("RANK", "").strip() and environ.get("WORLD_SIZE", "").strip():
        return "torchrun"
    mpi_size = mpi.mpi_world_size_hint(environ)
    if slurm.in_srun_step(environ):
        ntasks = _num(environ, "SLURM_STEP_NUM_TASKS", None) or _num(environ, "SLURM_NTASKS", None)
        if mpi_size is None or mpi_size == ntasks:
            return "slurm"
    if mpi_size is not None:
        return "mpi"
    return "none"


def discover(environ: MutableMapping[str, str] | None = None) -> DistEnv:
    """This process's place in the job; exports the torchrun variables for ``env://``."""
    environ = os.environ if environ is None else environ
    launcher = detect_launcher(environ)
    user_addr = environ.get("MASTER_ADDR") or None
    user_port = _num(environ, "MASTER_PORT", None)

    if launcher == "torchrun":
        world = _num(environ, "WORLD_SIZE", 1)
        rank = _num(environ, "RANK", 0)
        env = DistEnv(
            rank=rank,
            world_size=world,
            local_rank=_num(environ, "LOCAL_RANK", rank),
            local_world_size=_num(environ, "LOCAL_WORLD_SIZE", None),
            launcher="torchrun",
            master_addr=user_addr,
            master_port=user_port,
        )
    elif launcher == "slurm":
        task = slurm.read_slurm(environ)
        env = DistEnv(
            rank=task.rank,
            world_size=task.world_size,
            local_rank=task.local_rank,
            local_world_size=task.local_world_size,
            launcher="slurm",
            master_addr=user_addr or task.master_addr,
            master_port=user_port or task.master_port,
        )
    elif launcher == "mpi":
        r = mpi.read_mpi(user_addr, user_port)
        env = DistEnv(
            rank=r.rank,
            world_size=r.world_size,
            local_rank=r.local_rank,
            local_world_size=r.local_world_size,
            launcher="mpi",
            master_addr=r.master_addr,
            master_port=r.master_port,
        )
    else:
        env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="none")

    if not 0 <= env.rank < env.world_size:
        raise LaunchError(f"rank {env.rank} is outside world size {env.world_size} (launcher: {env.launcher})")
    if env.world_size > 1 and launcher != "torchrun":
        environ.update(
            {
                "RANK": str(env.rank),
                "WORLD_SIZE": str(env.world_size),
                "LOCAL_RANK": str(env.local_rank),
                "LOCAL_WORLD_SIZE": str(env.local_world_size or 1),
                "MASTER_ADDR": env.master_addr,
                "MASTER_PORT": str(env.master_port),
            }
        )
    return env


def init_distributed(
    env: DistEnv, device: torch.device, timeout_s: float = 600.0, setup_timeout_s: float = 300.0
) -> dist.Store | None:
    """Create the default process group when the job has more than one process.

    Every rank first checks in through the rendezvous store (:func:`meshforge.launch.setup.check_in`):
    a rank that reported a failure stops the others at once, one that never arrives within
    ``setup_timeout_s`` is named. Returns the job's rendezvous store under a ``meshforge/`` key
    prefix (for small coordination keys, such as where each rank is among its collectives), or
    None with one process or when a process group already exists. The group is made on the
    store ``init_process_group``'s own ``env://`` path would use (same ``default_pg/`` prefix).

    torchrun keeps one store for all the restarts of its workers (its agent's, shared since torch 2.4),
    and it still holds the keys of the attempt that died: gloo's (and NCCL's) addresses of the dead
    ranks. A restarted rank reading its peer's old address before the peer has written the new one
    connects to a dead port (refused, or a hang when the port has been reused). So after the first
    attempt both prefixes carry the restart count (``default_pg/restart_<n>``, ``meshforge/restart_<n>``).
    """
    if env.world_size == 1 or dist.is_initialized():
        return None
    from .setup import check_in, connect_store

    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    store = connect_store(env, setup_timeout_s)
    check_in(store, env, setup_timeout_s)
    store.set_timeout(timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    scope = "" if attempt == "0" else f"/restart_{attempt}"
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("default_pg" + scope, store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    return dist.PrefixStore("meshforge" + scope, store)


def shutdown_distributed(barrier: bool = False) -> None:
    """Destroy every process group (idempotent); ``barrier`` first waits for all ranks to get here.

    Use ``barrier`` on the normal way out only: after a failure a peer may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """``auto`` picks this process's GPU when CUDA is present, else the CPU.

    The GPU is ``local_rank`` modulo the visible devices: with all of a node's GPUs visible
    that is the local rank; where the launcher gives each task its own GPU
    (``srun --gpus-per-task=1``, CUDA_VISIBLE_DEVICES of length 1) it is device 0.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device = 'cuda' but this machine has no CUDA device (torch sees none); use 'cpu' or 'auto'"
            )
        index = env.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")
