"""Which node of a multi-node data preparation this process is (``meshforge data prepare``).

Training ranks come from ``meshforge.launch.env`` (a room above); data preparation runs one process per
node and only needs (node rank, node count), without mpi4py or torch unless they are there.
"""

from __future__ import annotations

import os
import sys


def default_node_rank() -> tuple[int, int]:
    """(node rank, node count) from torchrun's ``RANK``/``WORLD_SIZE``, else MPI, else (0, 1)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")) or "mpi4py" in sys.modules:
        try:
            from mpi4py import MPI  # optional: only under an MPI launcher

            return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        except ImportError:
            for r, n in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
                if n in os.environ:
                    return int(os.environ.get(r, "0")), int(os.environ[n])
    return 0, 1
