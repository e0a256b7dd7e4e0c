"""MPI (``mpiexec``/``mpirun``): rank, size and local rank from mpi4py, rendezvous by broadcast.

The MPI launcher knows every rank, so nothing has to be derived: COMM_WORLD gives the rank
and size, a split by shared memory gives the ranks on this host (the local rank), and rank 0
broadcasts its hostname and a free port for torch.distributed's TCP store. mpi4py is only
imported when the environment says an MPI launcher started this process (importing it
initializes MPI).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import LaunchError

RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
"""Set by Open MPI, MPICH/Intel MPI (hydra, PMI-1/2), PMIx launchers, MVAPICH2."""


def mpi_world_size_hint(env: Mapping[str, str]) -> int | None:
    """The world size an MPI launcher announced in the environment, or None if none did."""
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    if any(env.get(name, "").strip() for name in RANK_VARS):
        return -1  # an MPI launcher, size unknown until MPI is initialized
    return None


@dataclass(frozen=True)
class MpiRank:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def read_mpi(master_addr: str | None = None, master_port: int | None = None) -> MpiRank:
    """Ask MPI who we are; rank 0 chooses the rendezvous (unless given) and broadcasts it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError(
            "this process was started by an MPI launcher (mpiexec/mpirun) but mpi4py is not installed: "
            "`pip install mpi4py` (built against the MPI that runs it, e.g. `pip install mpich mpi4py`), "
            f"or set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT yourself ({e})"
        ) from None
    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    try:
        local_rank, local_size = local.Get_rank(), local.Get_size()
    finally:
        local.Free()
    rendezvous = None
    if world.Get_rank() == 0:
        rendezvous = (master_addr or socket.gethostname(), master_port or free_port())
    addr, port = world.bcast(rendezvous, root=0)
    return MpiRank(
        rank=world.Get_rank(),
        world_size=world.Get_size(),
        local_rank=local_rank,
        local_world_size=local_size,
        master_addr=addr,
        master_port=int(port),
    )
