"""A replica group's ranks watching each other's processes, so that a rank's death takes its group down at once.

Under ``parallel.fault_tolerance = "torchft"`` a group whose rank died must leave the lighthouse's quorum quickly:
the other groups wait on it at their next quorum for as long as its torchft Manager (on its rank 0) still beats,
and a surviving rank does not notice the death while it waits in torchft's commit vote or quorum (those wait
for every rank of the group, up to ``parallel.ft_timeout_s``), nor act on torchrun's SIGTERM there.

Each rank but 0 holds one TCP connection to the group's rank 0, which watches them all. The kernel closes a
dead process's connections however it died (SIGKILL, the OOM killer, a crash), so the other end reads EOF at
once. A rank that ends on purpose (the run is over, or it raised) says ``bye`` first, and its end is not taken
for a death. On a death the watching thread calls ``on_death(what)``; the rank 0 that sees one leaves, which
the other ranks then see too. A host that vanishes without closing its connections is not seen here: the
lighthouse's heartbeat timeout and the collectives' timeouts cover it.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from typing import Callable

BYE = b"bye"


class GroupLiveness:
    """This rank's end of the group's liveness connections; ``publish(port)`` gives rank 0's port (None on
    rank 0's side, which has just bound it) to every rank of the group and returns it."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        host: str,
        publish: Callable[[int | None], int],
        on_death: Callable[[str], None],
        timeout_s: float = 60.0,
    ):
        self.rank = rank
        self.on_death = on_death
        self.closing = False
        self._conns: dict[int, socket.socket] = {}
        self._clean: set[int] = set()
        server = None
        if rank == 0:
            server = socket.create_server(("", 0), backlog=max(world_size, 8))
            server.settimeout(timeout_s)
        port = publish(server.getsockname()[1] if server is not None else None)
        if server is not None:
            with server:
                for _ in range(world_size - 1):
                    conn, _ = server.accept()
                    conn.settimeout(timeout_s)
                    (peer,) = struct.unpack("!I", _read_exactly(conn, 4))
                    conn.settimeout(None)
                    self._conns[peer] = conn
        elif world_size > 1:
            conn = socket.create_connection((host, port), timeout=timeout_s)
            conn.sendall(struct.pack("!I", rank))
            conn.settimeout(None)
            self._conns[0] = conn
        self._thread = threading.Thread(target=self._watch, name="meshforge-group-liveness", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        sel = selectors.DefaultSelector()
        for peer, conn in self._conns.items():
            sel.register(conn, selectors.EVENT_READ, peer)
        while sel.get_map():
            for key, _ in sel.select():
                peer = key.data
                try:
                    data = key.fileobj.recv(64)
                except OSError:
                    data = b""
                if data.startswith(BYE):
                    self._clean.add(peer)
                if not data or peer in self._clean:
                    sel.unregister(key.fileobj)
                    if not data and peer not in self._clean and not self.closing:
                        self.on_death(
                            f"rank {peer} of this replica group died (its liveness connection to rank {self.rank} "
                            "closed without a goodbye)"
                        )

    def close(self) -> None:
        """This rank ends on purpose: say so to the peers it is connected to (once)."""
        if self.closing:
            return
        self.closing = True
        for conn in self._conns.values():
            try:
                conn.sendall(BYE)
            except OSError:
                pass


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            raise ConnectionError("a rank of the group closed its liveness connection while joining")
        data += part
    return data
