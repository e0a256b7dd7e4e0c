"""torchrun's command line, the one builder: one node on its own (``--standalone``) or one node of
several meeting at a c10d rendezvous, with or without restarts. Used by ``meshforge launch`` for a
plain job and for each replica group of ``--ft-groups``. Nothing here imports torch.
"""

from __future__ import annotations

import re
import socket

from ..errors import LaunchError


def torchrun_argv(
    python: str,
    nproc: int,
    nnodes: int = 1,
    endpoint: str | None = None,
    rdzv_id: str = "meshforge",
    node_rank: int | None = None,
    max_restarts: int = 0,
) -> list[str]:
    """``python -m torch.distributed.run ... -m meshforge``: ``endpoint`` None -> ``--standalone`` (one node,
    a rendezvous of its own on a free port); else ``--rdzv-backend c10d`` at ``endpoint`` (HOST:PORT)."""
    argv = [python, "-m", "torch.distributed.run"]
    if endpoint is None:
        argv += ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc)]
    else:
        if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", endpoint):
            raise LaunchError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT")
        argv += [
            "--nnodes",
            str(nnodes),
            "--nproc-per-node",
            str(nproc),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            rdzv_id,
        ]
        if node_rank is not None:
            argv += ["--node-rank", str(node_rank)]
    if max_restarts:
        argv += ["--max-restarts", str(max_restarts)]
    return argv + ["-m", "meshforge"]


def check_rendezvous_host(endpoint: str, option: str = "--rdzv-endpoint") -> None:
    """Raise LaunchError unless the host of ``endpoint`` (HOST:PORT, from ``option``) resolves here: torchrun
    would otherwise retry the name until its rendezvous timeout, with no line saying why."""
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as e:
        raise LaunchError(
            f"{option} {endpoint}: the host name {host} does not resolve on this node "
            f"({socket.gethostname()}): {getattr(e, 'strerror', None) or e}; add it to /etc/hosts "
            "or DNS on every node, or give node 0's address"
        ) from None
