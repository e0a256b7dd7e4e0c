"""parallel.fault_tolerance = torchft: replica groups (2 x 2 ranks, FSDP2 inside) under a real lighthouse.

Default suite: the option's config errors, and two groups that train together matching one process
(FSDP2, TP 2, CP 2 or PP 2 inside each; EP 2 in the slow set), and a group healing at the vote.
``-m slow``: a rank of group 1 SIGKILLed mid-run (group 0 trains on alone, group 1 is restarted and
heals from group 0's live state; also under PP 2), a group lost for good, the lighthouse dying, a
replacement group with another layout.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchft")

from ft_harness import (  # noqa: E402
    Lighthouse,
    final_weights,
    finish,
    group_args,
    logs_on_failure,
    records,
    replay,
    start_group,
    wait_for_steps,
)
from meshforge.config import ConfigError, load_config  # noqa: E402
from meshforge.parallel.job_checks import check_job  # noqa: E402
from meshforge.parallel.mesh import resolve_degrees  # noqa: E402
from parallel_harness import REPO, TP_ATOL  # noqa: E402

LOSS_ATOL = 1e-6


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between the replica groups"


def assert_all_finished(results: list) -> None:
    failed = [
        f"group {g} rank {r} (exit {status}):\n{err[-2000:]}"
        for g, ranks in enumerate(results)
        for r, (status, err) in enumerate(ranks)
        if status != 0
    ]
    assert not failed, "\n".join(failed)


def assert_matches_reference(out, loss_atol: float = LOSS_ATOL, atol: float = 1e-6) -> None:
    got, want, weights = replay(out, 0)
    assert len(got) >= 5
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), rtol=0, atol=loss_atol
    )
    for name, value in final_weights(out, 0).items():
        torch.testing.assert_close(value, weights[name], rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")
    assert want[-1] < want[0]


# --------------------------------------------------------------------------- config errors (table)

BAD = [
    (["parallel.ft_groups=2", "parallel.ft_replica_group=2"], "is not a group of parallel.ft_groups = 2"),
    (["parallel.ft_groups=2", "parallel.ft_min_replicas=3"], "ft_min_replicas = 3 must be between 1"),
    (["parallel.ft_groups=2", "parallel.ft_timeout_s=0"], "must be > 0"),
    (["parallel.ft_groups=2", "parallel.dp_replicate=2"], "does not work with parallel.dp_replicate = 2"),
    (["parallel.ft_groups=2", "parallel.dp_backend=deepspeed"], "does not work with parallel.dp_backend = 'deepspeed'"),
    (
        ["parallel.ft_groups=2", "model.moe_experts=4", "model.moe_bias_update_rate=0.001"],
        "does not work with model.moe_bias_update_rate = 0.001",
    ),
    (["parallel.ft_groups=4", "train.micro_batch_size=0", "train.global_batch_size=4"], "does not divide"),
    (["parallel.ft_groups=2", "parallel.ft_lighthouse="], "needs the lighthouse's address"),
    # standby groups (tests/parallel/test_ft_standby.py)
    (["parallel.ft_groups=2", "parallel.ft_spares=-1"], "parallel.ft_spares = -1 must be >= 0"),
    (["parallel.ft_groups=2", "parallel.ft_spares=1", "parallel.ft_replica_group=3"], "number the groups 0 ... 2"),
    (
        ["parallel.ft_groups=2", "parallel.ft_spares=1", "parallel.pp=2", "parallel.dp_shard=1"],
        "ft_spares = 1 does not work with pipeline",
    ),
    (["parallel.ft_groups=2", "parallel.ft_spares=1", "model.moe_experts=4"], "ft_spares = 1 does not work with MoE"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m for _, m in BAD])
def test_config_errors(overrides, message, monkeypatch):
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    args = [
        "parallel.fault_tolerance=torchft",
        "parallel.ft_lighthouse=http://127.0.0.1:1",
        "train.micro_batch_size=2",
        *overrides,
    ]
    cfg = load_config("tiny-test", [f"--{a.split('=')[0]}={a.split('=', 1)[1]}" for a in args])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_job(cfg, resolve_degrees(cfg.parallel, 2), "cpu")


def test_missing_extra_is_one_line(monkeypatch):
    import sys

    from meshforge.parallel.fault_tolerance import require_torchft

    monkeypatch.setitem(sys.modules, "torchft.manager", None)  # as if the ft extra were not installed
    with pytest.raises(ConfigError, match=r"install the ft extra: pip install -e \"\.\[ft\]\""):
        require_torchft()


# --------------------------------------------------------------------------- two groups, no failure


def test_two_groups_match_one_process(tiny_data, tmp_path):
    """Both groups in every step: they hold the same bits, and their losses and weights are one process's
    on the whole global batch."""
    with Lighthouse(min_replicas=2) as lh:  # no quorum until both groups are up
        args = group_args(tiny_data, tmp_path, lh, 8, 2, "--optim.warmup_steps", "2")  # the loss must fall in 8 steps
        groups = [start_group(args, g) for g in range(2)]
        results = [finish(procs, 300) for procs in groups]
    assert_all_finished(results)
    rows = records(tmp_path, 0)
    assert [r["ft_groups"] for r in rows] == [[0, 1]] * 8
    assert rows[0]["ft_samples"] == [[0, 4], [4, 8]] and rows[1]["ft_samples"] == [[8, 12], [12, 16]]
    # the health metrics: both groups alive, one quorum throughout, nothing lost
    assert [(r["ft_groups_alive"], r["ft_quorum_changes"], r["ft_lost_s"]) for r in rows] == [(2, 0, 0.0)] * 8
    assert all(r["ft_quorum_s"] >= 0 and r["ft_allreduce_s"] > 0 and r["ft_commit_s"] > 0 for r in rows)
    assert [r["loss"] for r in rows] == [r["loss"] for r in records(tmp_path, 1)]
    assert_same_weights(final_weights(tmp_path, 0), final_weights(tmp_path, 1))
    assert_matches_reference(tmp_path)


LAYOUTS = [
    pytest.param(("--parallel.dp_shard", "1", "--parallel.tp", "2"), id="tp2"),
    pytest.param(("--parallel.dp_shard", "1", "--parallel.cp", "2"), id="cp2"),
    pytest.param(("--parallel.dp_shard", "1", "--parallel.pp", "2"), id="pp2"),
    # EP: the experts over the group's 2 ranks, FSDP2 shards the rest; slow to keep the default suite's share ~40 s
    pytest.param(("--parallel.ep", "2", "--model.moe_experts", "4"), id="ep2", marks=pytest.mark.slow),
]
"""The layouts inside each group of :func:`test_two_groups_with_a_layout_inside_match_one_process`."""


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_groups_with_a_layout_inside_match_one_process(layout, tiny_data, tmp_path):
    """2 groups x 2 ranks with TP, CP or EP inside each group: the groups hold the same bits, and their
    losses and weights are one process's on the whole global batch."""
    with Lighthouse(min_replicas=2) as lh:
        args = group_args(tiny_data, tmp_path, lh, 6, 2, "--optim.warmup_steps", "2", *layout)
        groups = [start_group(args, g) for g in range(2)]
        results = [finish(procs, 300) for procs in groups]
    assert_all_finished(results)
    rows = records(tmp_path, 0)
    assert [r["ft_groups"] for r in rows] == [[0, 1]] * 6
    assert rows[0]["ft_samples"] == [[0, 4], [4, 8]]
    assert [r["loss"] for r in rows] == [r["loss"] for r in records(tmp_path, 1)]
    assert_same_weights(final_weights(tmp_path, 0), final_weights(tmp_path, 1))
    assert_matches_reference(tmp_path, atol=TP_ATOL)


FAILED_VOTE = 4
"""The step whose vote group 1 fails (tests/harness/ft_rank.py fail-vote)."""


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param((), id="fsdp2"),
        pytest.param(("--parallel.dp_shard", "1", "--parallel.pp", "2"), id="pp2", marks=pytest.mark.slow),
    ],
)
def test_group_behind_heals_at_the_vote(layout, tiny_data, tmp_path):
    """Group 1's vote fails at one step while group 0's passes: at the next step group 1 is behind the
    quorum and heals at the vote (its quorum ran during its forward). Its own gradients of that step are
    discarded (it sends zeros: both groups' records leave its samples out), it loads group 0's state with
    the loader past the step's batch, and from then on both hold the same bits. Under pp 2 each stage heals
    from the same stage of group 0."""
    script = [str(REPO / "tests" / "harness" / "ft_rank.py"), "fail-vote", "1", str(FAILED_VOTE)]
    with Lighthouse(min_replicas=2) as lh:
        args = group_args(tiny_data, tmp_path, lh, 10, 2, *layout)
        groups = [start_group(args, g, script=script) for g in range(2)]
        results = [finish(procs, 300) for procs in groups]
    assert_all_finished(results)
    rows0, rows1 = records(tmp_path, 0), records(tmp_path, 1)
    assert [r["step"] for r in rows0] == [r["step"] for r in rows1] == list(range(1, 11))
    failed, healed = rows1[FAILED_VOTE - 1], rows1[FAILED_VOTE]
    assert (failed["ft_committed"], failed["ft_samples"]) == (0, [])
    assert rows0[FAILED_VOTE - 1]["ft_committed"] == 1  # group 0 committed: its record names both shares
    assert "ft_healed_from_step" not in rows1[FAILED_VOTE - 1]
    assert (healed["ft_heal_at"], healed["ft_healed_from_step"]) == ("commit", FAILED_VOTE)
    batch = 8 * FAILED_VOTE  # step FAILED_VOTE + 1 reads samples from here
    for rows in (rows0, rows1):  # the heal's step: group 0's share only, in both records
        assert rows[FAILED_VOTE]["ft_groups"] == [0] and rows[FAILED_VOTE]["ft_samples"] == [[batch, batch + 4]]
        assert all(r["ft_groups"] == [0, 1] for r in rows[:FAILED_VOTE] + rows[FAILED_VOTE + 1 :])
    assert [r["loss"] for r in rows0[FAILED_VOTE:]] == [r["loss"] for r in rows1[FAILED_VOTE:]]
    assert rows1[-1]["ft_samples"] == rows0[-1]["ft_samples"] == [[72, 76], [76, 80]]  # the loader followed
    assert_same_weights(final_weights(tmp_path, 0), final_weights(tmp_path, 1))
    assert_matches_reference(tmp_path)


# --------------------------------------------------------------------------- failures (slow)

STEPS = 300
"""Long enough for group 1 to be restarted while group 0 trains on alone (~0.1 s a step here)."""
PACE_S = 0.25
"""Group 0's extra time per step while a peer restarts (tests/harness/ft_rank.py pace): under load a
replacement can take longer to start than group 0 needs to finish, and would then train alone from step 0."""


def paced(tmp_path: Path) -> tuple[list[str], Path]:
    """The script that paces a group while the returned file exists (it does not yet)."""
    flag = tmp_path / "pace"
    return [str(REPO / "tests" / "harness" / "ft_rank.py"), "pace", str(flag), str(PACE_S)], flag


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [pytest.param((), id="fsdp2"), pytest.param(("--parallel.dp_shard", "1", "--parallel.pp", "2"), id="pp2")]
)
def test_killed_rank_heals_from_live_peer(layout, tiny_data, tmp_path):
    """Under pp 2 the restarted group's stages heal each from the same stage of group 0."""
    script, pacing = paced(tmp_path)
    with Lighthouse() as lh:
        args = group_args(tiny_data, tmp_path, lh, STEPS, 2, *layout)
        group0 = start_group(args, 0, script=script)
        wait_for_steps(tmp_path, 0, 1, 180)  # group 0 trains from step 1 (the one the reference replays)
        group1 = start_group(args, 1)
        wait_for_steps(tmp_path, 1, 10, 180)
        pacing.touch()
        os.kill(group1[1].pid, signal.SIGKILL)  # one rank of group 1 dies mid-run
        first = finish(group1, 120)  # its peer rank stops on the broken collective (torchrun would restart both)
        assert first[1][0] == -signal.SIGKILL and first[0][0] != 0
        lost_at = len(records(tmp_path, 0))
        group1 = start_group(args, 1)  # the replacement: heals from group 0's live state
        wait_for_heal(tmp_path, group0, lost_at - 1, 1, 300)
        pacing.unlink()
        results = [finish(group0, 600), finish(group1, 600)]
    assert_all_finished(results)
    rows = records(tmp_path, 0)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # group 0 never restarted nor lost a step
    # the same processes from start to end, and no checkpoint to read but the final one
    assert [c.name for c in (tmp_path / "group_0" / "checkpoints").iterdir()] == [f"step_{STEPS:08d}"]
    after = [r for r in rows if r["step"] >= lost_at - 1]
    failed = [r for r in after if not r["ft_committed"]]  # the step the kill broke: not committed, its data skipped
    assert len(failed) <= 2 and all(r["ft_samples"] == [] and r.get("skipped") for r in failed), failed
    assert any(r["ft_groups"] == [0] and r["ft_committed"] for r in after), "group 0 trained on alone after the kill"
    assert all(
        r["ft_samples"] == [[8 * (r["step"] - 1), 8 * (r["step"] - 1) + 4]]
        for r in after
        if r["ft_groups"] == [0] and r["ft_committed"]
    )  # group 1's share skipped
    healed = [r for r in records(tmp_path, 1) if "ft_healed_from_step" in r]
    assert healed and healed[-1]["step"] > lost_at, healed
    assert rows[-1]["ft_groups"] == [0, 1]  # together again at the end
    # health metrics: group 0 alone while group 1 was away, then both; two quorum changes (away, back) at
    # least; the seconds lost are each step's time times the share not trained, summed
    assert {r["ft_groups_alive"] for r in after} == {1, 2} and rows[-1]["ft_quorum_changes"] >= 2
    for r in rows:
        share = 0.0 if not r["ft_committed"] else len(r["ft_groups"]) / 2
        assert r["ft_lost_s"] == pytest.approx(r["step_time_s"] * (1 - share), rel=0.2, abs=0.02), r
    assert rows[-1]["ft_lost_total_s"] == pytest.approx(sum(r["ft_lost_s"] for r in rows))
    assert rows[-1]["ft_lost_total_s"] > 0
    assert_same_weights(final_weights(tmp_path, 0), final_weights(tmp_path, 1))
    assert_matches_reference(tmp_path)


def wait_for_heal(out, group0, after_step: int, more: int, timeout: float) -> None:
    """Until group 1 has healed at a step past ``after_step`` and trained ``more`` steps beyond it, while
    group 0 (its ranks ``group0``) still runs."""
    deadline = time.monotonic() + timeout
    while True:
        rows = records(out, 1)
        healed = [r["step"] for r in rows if "ft_healed_from_step" in r and r["step"] > after_step]
        if healed and rows[-1]["step"] >= healed[-1] + more:
            return
        assert all(p.poll() is None for p in group0), (
            f"group 0 ended (at step {len(records(out, 0))}) before group 1 healed past step {after_step}"
        )
        assert time.monotonic() < deadline, f"group 1 did not heal past step {after_step} in {timeout:.0f}s"
        time.sleep(0.2)


@pytest.mark.slow
def test_two_failures_in_a_row(tiny_data, tmp_path):
    """Group 1 loses a rank, heals, then loses the other rank and heals again; group 0 never stops.
    On a failure the message carries every rank's stderr tail and the lighthouse's log."""
    running, finished = {}, {}
    script, pacing = paced(tmp_path)
    with Lighthouse() as lh, logs_on_failure(lh, running, finished):
        args = group_args(tiny_data, tmp_path, lh, STEPS)
        running["group 0"] = start_group(args, 0, script=script)
        wait_for_steps(tmp_path, 0, 1, 180)
        running["group 1"] = start_group(args, 1)
        wait_for_steps(tmp_path, 1, 10, 180)
        heals_at = []
        for n, victim in enumerate((1, 0)):  # a different rank of group 1 each time
            pacing.touch()
            os.kill(running["group 1"][victim].pid, signal.SIGKILL)
            finished[f"group 1, run {n}"] = first = finish(running.pop("group 1"), 120)
            assert first[victim][0] == -signal.SIGKILL
            heals_at.append(len(records(tmp_path, 0)))
            running["group 1"] = start_group(args, 1)
            wait_for_heal(tmp_path, running["group 0"], heals_at[-1] - 1, 5, 300)
            pacing.unlink()
        results = [finish(running.pop(f"group {g}"), 600) for g in range(2)]
        finished.update({"group 0": results[0], "group 1, last run": results[1]})
        assert_all_finished(results)
        rows = records(tmp_path, 0)
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # group 0: no restart, no step lost
        assert [c.name for c in (tmp_path / "group_0" / "checkpoints").iterdir()] == [f"step_{STEPS:08d}"]
        for lost_at in heals_at:  # after each failure group 0 trained alone, then both again
            after = [r for r in rows if r["step"] >= lost_at]
            assert any(r["ft_groups"] == [0] and r["ft_committed"] for r in after), lost_at
        assert rows[-1]["ft_groups"] == [0, 1] and rows[-1]["ft_quorum_changes"] >= 4
        assert_same_weights(final_weights(tmp_path, 0), final_weights(tmp_path, 1))
        assert_matches_reference(tmp_path)


@pytest.mark.slow
def test_group_lost_for_good(tiny_data, tmp_path):
    script, pacing = paced(tmp_path)
    pacing.touch()  # group 0 (paced: >= 50 s for its steps) must still train when group 1 has trained 5 steps
    with Lighthouse() as lh:
        args = group_args(tiny_data, tmp_path, lh, 200)
        group0 = start_group(args, 0, script=script)
        wait_for_steps(tmp_path, 0, 1, 180)
        group1 = start_group(args, 1)
        wait_for_steps(tmp_path, 1, 5, 180, peer=group0)
        for p in group1:
            p.kill()
        finish(group1, 60)
        pacing.unlink()
        results = finish(group0, 600)
    assert all(status == 0 for status, _ in results), results[0][1][-3000:]
    rows = records(tmp_path, 0)
    assert [r["step"] for r in rows] == list(range(1, 201)) and rows[-1]["ft_groups"] == [0]
    assert_matches_reference(tmp_path)


@pytest.mark.slow
def test_lighthouse_dying_stops_groups_with_one_line(tiny_data, tmp_path):
    with Lighthouse() as lh:
        args = group_args(tiny_data, tmp_path, lh, STEPS)
        groups = [start_group(args, g) for g in range(2)]
        wait_for_steps(tmp_path, 0, 5, 180)
        lh.kill()
        results = [finish(procs, 120) for procs in groups]  # within the quorum timeout (15 s), no hang
    for ranks in results:
        status, err = ranks[0]
        assert status == 1, err[-3000:]
        assert "no quorum from the torchft lighthouse" in err.strip().splitlines()[-1], err[-3000:]


@pytest.mark.slow
def test_replacement_with_other_layout_is_refused(tiny_data, tmp_path):
    with Lighthouse() as lh:
        args = group_args(tiny_data, tmp_path, lh, STEPS, 2, "--train.micro_batch_size", "1")
        group0 = start_group(args, 0)
        wait_for_steps(tmp_path, 0, 3, 180)
        other = finish(start_group(args, 1, ranks=4), 120)  # 4 ranks where group 0 has 2
        for p in group0:
            p.kill()
        finish(group0, 60)
    status, err = other[0]
    assert status != 0
    assert "cannot heal from its peer: the peer's layout inside its group is" in err, err[-3000:]


# --------------------------------------------------------------------------- meshforge launch --ft-groups


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, deepest first."""
    found = []
    for kid in children(pid):
        found += [*descendants(kid), kid]
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_launch_restarts_a_killed_group(tiny_data, tmp_path):
    """``meshforge launch --ft-groups 2``: a rank of group 1 SIGKILLed; torchrun restarts the group (a new
    attempt on the store it keeps), which heals from group 0; the run ends with both groups' weights equal."""
    import subprocess
    import sys

    from ft_harness import FT_LR
    from parallel_harness import PARITY_ARGS, free_port

    steps = 600  # group 0 must still be training when torchrun has restarted group 1 (~0.1 s a step alone)
    log = (tmp_path / "launch.log").open("w")
    launch = subprocess.Popen(
        [sys.executable, "-m", "meshforge", "launch", "--cpu", "--gpus-per-node", "2", "--ft-groups", "2"]
        + ["--ft-port", str(free_port()), "--", "train", *PARITY_ARGS, "--optim.lr", FT_LR]
        + ["--data.path", str(tiny_data), "--train.output_dir", str(tmp_path), "--train.steps", str(steps)]
        + ["--parallel.ft_timeout_s", "10", "--parallel.ft_quorum_timeout_s", "15"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=REPO,
    )
    try:
        wait_for_steps(tmp_path, 1, 10, 300)
        agent = next(p for p in children(launch.pid) if "--parallel.ft_replica_group 1" in cmdline(p))
        killed_at = len(records(tmp_path, 0))
        os.kill(children(agent)[0], signal.SIGKILL)
        assert launch.wait(900) == 0, (tmp_path / "launch.log").read_text()[-6000:]
    finally:
        for pid in [*descendants(launch.pid), launch.pid] if launch.poll() is None else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launch.wait()
        log.close()
    rows = records(tmp_path, 0)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # group 0 never restarted
    healed = [r for r in records(tmp_path, 1) if r.get("ft_healed_from_step", -1) >= killed_at - 1]
    assert healed, (tmp_path / "launch.log").read_text()[-6000:]
    assert rows[-1]["ft_groups"] == [0, 1]
    assert_same_weights(final_weights(tmp_path, 0), final_weights(tmp_path, 1))
