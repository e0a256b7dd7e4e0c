"""Each rank's pulse in the rendezvous store: how a lost rank is told from a slow one.

:class:`~meshforge.pretrain.faults.CollectiveWatch` names the ranks that never reached a failed
operation by their marks in the store. A rank whose link went down (or whose host died) right after
it marked the operation looks, by its marks alone, as if it had reached it. So each rank also runs a
:class:`Heartbeat`: a daemon thread that adds 1 to ``beat/<rank>`` every ``interval_s`` and wrote its
host name once under ``host/<rank>``. When a collective fails, :meth:`Heartbeat.stopped` reads every
other rank's count twice, :data:`STOPPED_AFTER` intervals apart: a rank whose count did not move has
stopped -- its host or link is gone, or the process is frozen (a rank that is only slow, or stuck in
Python, keeps beating). Counts rather than timestamps, so the nodes' clocks need not agree.
"""

from __future__ import annotations

import socket
import threading
import time

STOPPED_AFTER = 2.5
"""Heartbeat intervals without a beat after which a rank counts as stopped."""


class Heartbeat:
    """This rank's heartbeat thread (started at once) and the reading of the others'."""

    def __init__(self, store, rank: int, world_size: int, interval_s: float = 1.0):
        try:  # a connection of its own: a beat stuck on a lost link must not hold the trainer's store calls
            store = store.clone()
        except (AttributeError, RuntimeError, NotImplementedError):
            pass
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.interval_s = interval_s
        self.hostname = socket.gethostname()
        self._stop = threading.Event()
        store.set(f"host/{rank}", self.hostname)
        self._thread = threading.Thread(target=self._beat, name="meshforge-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while True:
            try:
                self.store.add(f"beat/{self.rank}", 1)
            except Exception:  # the store's host is gone: there is no one left to tell
                return
            if self._stop.wait(self.interval_s):
                return

    def close(self) -> None:
        """Stop beating (the end of the run)."""
        self._stop.set()

    def _counts(self, ranks: list[int]) -> list[int]:
        return [self.store.add(f"beat/{r}", 0) for r in ranks]

    def stopped(self) -> dict[int, str] | None:
        """The other ranks whose heartbeat stopped, with their host names (waits :data:`STOPPED_AFTER`
        intervals); None when the store cannot be read. A rank that never started beating is not
        counted: it is still starting up (its marks say so)."""
        try:
            started = [r for r in range(self.world_size) if r != self.rank and self.store.check([f"host/{r}"])]
            before = self._counts(started)
            time.sleep(STOPPED_AFTER * self.interval_s)
            after = self._counts(started)
            stopped = [r for r, b, a in zip(started, before, after) if a == b]
            hosts = self.store.multi_get([f"host/{r}" for r in stopped]) if stopped else []
        except Exception:
            return None
        return {r: bytes(h).decode(errors="replace") for r, h in zip(stopped, hosts)}


def within(seconds: float, call, default=None):
    """``call()``'s result, or ``default`` when it has not returned within ``seconds`` (a store call on a
    node that lost its link to the store's host blocks far longer than the job's timeouts; it is left to
    finish, or not, on a daemon thread)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(call()), name="meshforge-store-read", daemon=True)
    thread.start()
    thread.join(seconds)
    return result[0] if result else default


def name_by_host(ranks: dict[int, str], show: int = 8) -> str:
    """``ranks 2, 3 on node1 and rank 5 on node2``: ranks grouped by host, the first ``show`` ranks named."""
    by_host: dict[str, list[int]] = {}
    for r in sorted(ranks)[:show]:
        by_host.setdefault(ranks[r], []).append(r)
    parts = [f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} on {host}" for host, rs in by_host.items()]
    more = f" and {len(ranks) - show} more" if len(ranks) > show else ""
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] + more
