"""``parallel/group_liveness.py``: a replica group's rank sees a peer process die at once (SIGKILL, no goodbye),
and does not take a peer that ended on purpose for a death. One end in this process, the other a real
process the test starts (and kills)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

from meshforge.parallel.group_liveness import GroupLiveness

PEER = """
import sys, time
from meshforge.parallel.group_liveness import GroupLiveness
rank, port, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def publish(mine):
    if mine is not None:
        print(mine, flush=True)
        return mine
    return port
live = GroupLiveness(rank, 2, "127.0.0.1", publish, lambda what: print("death:", what, flush=True), 30)
print("joined", flush=True)
if mode == "bye":
    live.close()
    sys.exit(0)
time.sleep(60)
"""


@pytest.fixture
def start_peer():
    """``start_peer(rank, port, mode)``: the other end as a real process (port 0: it is rank 0 and prints its
    own); every one started is killed when the test ends, passed or not."""
    started: list[subprocess.Popen] = []

    def start(rank: int, port: int, mode: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", PEER, str(rank), str(port), mode], stdout=subprocess.PIPE, text=True
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()
        proc.stdout.close()


class Here:
    """This process's end: rank ``rank`` of 2, deaths collected."""

    def __init__(self):
        self.deaths: list[str] = []
        self.died = threading.Event()

    def on_death(self, what: str) -> None:
        self.deaths.append(what)
        self.died.set()


@pytest.mark.parametrize("mode", ["kill", "bye"])
def test_rank_0_sees_rank_1(mode, start_peer):
    here = Here()
    box = {}

    def publish(port):
        box["peer"] = start_peer(1, port, mode)
        return port

    live = GroupLiveness(0, 2, "127.0.0.1", publish, here.on_death, 30)
    peer = box["peer"]
    assert peer.stdout.readline().strip() == "joined"
    if mode == "kill":
        peer.send_signal(signal.SIGKILL)
        assert here.died.wait(30), "rank 0 did not see rank 1 die"
        assert here.deaths == [
            "rank 1 of this replica group died (its liveness connection to rank 0 closed without a goodbye)"
        ]
    else:
        assert peer.wait(30) == 0
        assert not here.died.wait(1.0), here.deaths
        assert live._clean == {1}
    live.close()


def test_rank_1_sees_rank_0_die_and_no_death_after_its_own_close(start_peer):
    rank0 = start_peer(0, 0, "kill")
    port = int(rank0.stdout.readline())
    here = Here()
    live = GroupLiveness(1, 2, "127.0.0.1", lambda _: port, here.on_death, 30)
    assert rank0.stdout.readline().strip() == "joined"
    rank0.send_signal(signal.SIGKILL)
    rank0.wait()
    assert here.died.wait(30) and "rank 0 of this replica group died" in here.deaths[0]
    live.close()

    # a rank that is itself ending ignores its peers' ends
    rank0 = start_peer(0, 0, "kill")
    port = int(rank0.stdout.readline())
    here = Here()
    live = GroupLiveness(1, 2, "127.0.0.1", lambda _: port, here.on_death, 30)
    assert rank0.stdout.readline().strip() == "joined"
    live.close()
    rank0.kill()
    rank0.wait()
    assert not here.died.wait(1.0), here.deaths
