"""Standby replica groups (``parallel.ft_spares``): who trains which slot, and a standby taking a killed group's
slot at once under a real lighthouse (groups of one rank each, to keep the default suite's share small). Their
config errors are in test_fault_tolerance.py's table.
"""

from __future__ import annotations

import os
import signal

import pytest

pytest.importorskip("torchft")

from ft_harness import Lighthouse, final_weights, finish, group_args, records, start_group, wait_for_steps  # noqa: E402
from meshforge.parallel.fault_tolerance import group_of, slot_owners  # noqa: E402
from test_fault_tolerance import (  # noqa: E402
    assert_all_finished,
    assert_matches_reference,
    assert_same_weights,
    paced,
    wait_for_heal,  # noqa: E402
)

# (quorum members, training groups) -> {slot: group}
OWNERS = [
    ([0, 1], 2, {0: 0, 1: 1}),  # everyone there, no standby
    ([0, 1, 2], 2, {0: 0, 1: 1}),  # the standby idle
    ([0, 2], 2, {0: 0, 1: 2}),  # group 1 missing: the standby takes its slot
    ([1, 2], 2, {0: 2, 1: 1}),
    ([2], 2, {0: 2}),  # one standby for two missing slots: the first; slot 1 is skipped
    ([0, 3, 4], 3, {0: 0, 1: 3, 2: 4}),  # two standbys, two missing slots, in order
    ([0, 2, 4, 5], 3, {0: 0, 1: 4, 2: 2}),  # the second standby (5) idle
    ([1], 2, {1: 1}),  # no standby: slot 0 skipped
]


@pytest.mark.parametrize("members,groups,owners", OWNERS)
def test_slot_owners(members, groups, owners):
    assert slot_owners(members, groups) == owners


def test_group_of_reads_torchfts_replica_id():
    assert group_of("meshforge_group_12:0f1e2d3c-aaaa-bbbb-cccc-000000000000") == 12
    assert group_of("meshforge_group_0") == 0


STEPS = 120


def test_standby_trains_a_killed_groups_slot(tiny_data, tmp_path):
    """Groups 0 and 1 train, group 2 stands by. Group 1 is killed: from the step its quorum goes on without it,
    the standby trains slot 1, so no committed step skips data; group 1, restarted, heals and takes its slot
    back while the standby idles again. All three hold the same bits; the losses are one process's."""
    script, pacing = paced(tmp_path)
    pacing.touch()  # group 0 (and so every quorum) goes slowly until group 1 is back after its kill
    started: list = []  # every rank this test starts: killed on the way out, whatever happened
    with Lighthouse(min_replicas=2) as lh:
        try:
            args = group_args(tiny_data, tmp_path, lh, STEPS, 2, "--parallel.ft_spares", "1")
            group0 = start_group(args, 0, ranks=1, script=script)
            standby = start_group(args, 2, ranks=1)
            started += group0 + standby
            wait_for_steps(tmp_path, 0, 1, 180, peer=group0)
            group1 = start_group(args, 1, ranks=1)
            started += group1
            wait_for_steps(tmp_path, 1, 5, 180, peer=group0)
            os.kill(group1[0].pid, signal.SIGKILL)
            assert finish(group1, 60)[0][0] == -signal.SIGKILL
            lost_at = len(records(tmp_path, 0))
            wait_for_steps(tmp_path, 0, lost_at + 4, 180, peer=group0)
            group1 = start_group(args, 1, ranks=1)  # the replacement heals from a live group
            started += group1
            wait_for_heal(tmp_path, group0, lost_at + 4, 2, 300)
            pacing.unlink()
            results = [finish(group0, 600), finish(group1, 600), finish(standby, 600)]
        finally:
            for proc in started:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert_all_finished(results)
    rows = records(tmp_path, 0)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    after = [r for r in rows if r["step"] > lost_at]
    failed = [r for r in after if not r["ft_committed"]]
    assert len(failed) <= 2 and all(r["ft_samples"] == [] for r in failed), failed
    # every committed step trained the whole batch: slot 1 by the standby while group 1 was away
    committed = [r for r in rows if r["ft_committed"] and r["step"] >= lost_at - 1]
    assert all(
        r["ft_samples"] == [[8 * (r["step"] - 1), 8 * r["step"] - 4], [8 * r["step"] - 4, 8 * r["step"]]]
        for r in committed
    )
    covered = [r["step"] for r in after if r.get("ft_standby") == {"1": 2}]
    assert covered, "the standby never trained slot 1"
    assert "ft_standby" not in rows[-1] and rows[-1]["ft_groups"] == [0, 1]  # group 1 back in its slot
    assert rows[-1]["ft_quorum_changes"] >= 3  # the groups that trained: joined, standby in for 1, 1 back
    # the standby's own records say the same
    spare = {r["step"]: r for r in records(tmp_path, 2)}
    assert all(spare[s].get("ft_standby") == {"1": 2} for s in covered if s in spare)
    assert all(r["ft_lost_s"] == 0.0 for r in rows if r["ft_committed"] and r["step"] > lost_at)
    weights = final_weights(tmp_path, 0)
    assert_same_weights(weights, final_weights(tmp_path, 1))
    assert_same_weights(weights, final_weights(tmp_path, 2))
    assert_matches_reference(tmp_path)
