"""The heartbeat that tells a lost rank from a slow one (meshforge/pretrain/heartbeat.py), on a real TCPStore."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import torch.distributed as dist

from meshforge.pretrain.heartbeat import Heartbeat, name_by_host, within


def test_a_rank_whose_beat_stops_is_named_with_its_host_and_a_beating_one_is_not():
    store = dist.TCPStore(
        "127.0.0.1", 0, world_size=1, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    beats = [Heartbeat(store, rank, 4, interval_s=0.1) for rank in range(3)]  # rank 3 never starts
    time.sleep(0.3)
    beats[2].close()  # rank 2's link goes down
    time.sleep(0.2)
    try:
        assert beats[0].stopped() == {2: socket.gethostname()}
        assert beats[1].stopped() == {2: socket.gethostname()}
    finally:
        for b in beats:
            b.close()


def test_name_by_host_groups_ranks():
    assert name_by_host({3: "node1", 2: "node1"}) == "ranks 2, 3 on node1"
    assert name_by_host({2: "node1", 5: "node2", 4: "node1"}) == "ranks 2, 4 on node1 and rank 5 on node2"
    assert name_by_host({r: "n" for r in range(10)}, show=2) == "ranks 0, 1 on n and 8 more"


def test_within_gives_up_on_a_call_that_blocks():
    t0 = time.monotonic()
    assert within(0.2, lambda: time.sleep(5), default="unknown") == "unknown"
    assert time.monotonic() - t0 < 2
    assert within(2, lambda: 42) == 42
