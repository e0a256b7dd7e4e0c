"""Crashes, for real: `kill -9` of a rank, kills while a checkpoint is being written, a stalled rank.

- A rank killed with SIGKILL mid-run: its peers stop within seconds with one line naming the
  operation (not a hang until the collective timeout, not a traceback); the rerun resumes from
  the newest complete checkpoint and its losses equal an uninterrupted run's, bit for bit.
- SIGKILL at random moments of runs that checkpoint every step (so most kills land inside a
  save, a rename or a keep-last-k deletion): after every kill, each directory that counts as a
  checkpoint loads; the run that finally completes has exactly the uninterrupted losses.
  A few kills by default; many under ``-m slow``.
- A rank that stalls (tests/harness/stalling_rank.py): after ``train.collective_timeout_s`` the waiting
  rank fails with an error naming the operation, itself, and the rank that never arrived.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from meshforge.pretrain.checkpoint import list_checkpoints, read_meta
from meshforge.pretrain.metrics import read_metrics
from parallel_harness import PARITY_ARGS, REPO
from parallel_harness import start_ranks as start_harness_ranks

ARGS = tuple(a for a in PARITY_ARGS)  # tiny 4-layer decoder, no periodic checkpoints unless asked


def start_ranks(world: int, argv: list[str], script: list[str] | None = None) -> list[subprocess.Popen]:
    """The harness's ranks with stdout piped too (the tests read rank 0's "saved" lines)."""
    return start_harness_ranks(world, argv, script=script, stdout=subprocess.PIPE)


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    """Wait for every rank; (exit status, stdout, stderr) of each. Kills them all on a timeout."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out.decode(errors="replace"), err.decode(errors="replace")))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((r["step"] for r in read_metrics(out) if "loss" in r), default=0)


def wait_until(predicate, procs, timeout: float = 300, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if any(p.poll() is not None for p in procs):
            raise AssertionError(
                "a rank ended early: " + "".join(p.stderr.read().decode(errors="replace")[-2000:] for p in procs)
            )
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(poll)


def losses_by_step(out: Path) -> dict[int, float]:
    """step -> loss; a step run twice (before a kill and again after the resume) keeps its last record."""
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def check_every_checkpoint_loads(out: Path) -> list[int]:
    """Every directory that counts as a checkpoint (the ones resume and generate would pick) loads
    fully: meta.json, and the model weights from its DCP files. Returns their steps."""
    from meshforge.config import config_from_dict
    from meshforge.models import build_model
    from meshforge.pretrain.checkpoint import load_model_weights

    steps = []
    for ckpt in list_checkpoints(out / "checkpoints"):
        meta = read_meta(ckpt)
        model = build_model(config_from_dict(meta["config"]).model, "cpu")
        load_model_weights(ckpt, model)
        assert meta["step"] == int(ckpt.name.split("_")[1])
        steps.append(meta["step"])
    return steps


@pytest.fixture(scope="module")
def reference_2rank(tiny_data, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("crash_ref") / "run"
    results = finish(
        start_ranks(
            2, ["train", *ARGS, "--train.steps", "30", "--data.path", str(tiny_data), "--train.output_dir", str(out)]
        )
    )
    assert [r[0] for r in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    return losses_by_step(out)


def test_kill_9_of_one_rank_stops_the_job_promptly_and_the_rerun_resumes_exactly(tiny_data, reference_2rank, tmp_path):
    out = tmp_path / "run"
    argv = [
        "train",
        *ARGS,
        "--train.steps",
        "30",
        "--checkpoint.interval",
        "4",
        "--data.path",
        str(tiny_data),
        "--train.output_dir",
        str(out),
    ]
    procs = start_ranks(2, argv)
    wait_until(lambda: steps_logged(out) >= 9, procs)
    os.kill(procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    rc0 = procs[0].wait(timeout=120)  # the default collective timeout is 600 s: this must not wait for it
    stopped_after = time.monotonic() - killed_at
    err0 = procs[0].stderr.read().decode(errors="replace")
    finish(procs)
    assert procs[1].returncode == -signal.SIGKILL
    assert rc0 == 1, err0[-3000:]
    assert stopped_after < 60, f"rank 0 took {stopped_after:.0f} s to stop after its peer was killed"
    assert "Traceback" not in err0, err0[-3000:]
    line = [ln for ln in err0.splitlines() if ln.startswith("meshforge: error:")]
    assert len(line) == 1 and "rank 0 of 2:" in line[0] and "failed" in line[0], err0[-3000:]
    done = steps_logged(out)
    saved = check_every_checkpoint_loads(out)
    assert saved and max(saved) <= done < 30, (saved, done)

    results = finish(start_ranks(2, argv))  # the rerun: automatic resume
    assert [r[0] for r in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert f"(step {max(saved)})" in results[0][1], results[0][1][-2000:]
    got = losses_by_step(out)
    assert sorted(got) == sorted(reference_2rank) == list(range(1, 31))
    assert [got[s] for s in sorted(got)] == [reference_2rank[s] for s in sorted(reference_2rank)]


def test_stalled_rank_times_out_with_the_operation_and_the_missing_rank(tiny_data, tmp_path):
    out = tmp_path / "run"
    argv = [
        "train",
        *ARGS,
        "--train.steps",
        "30",
        "--train.collective_timeout_s",
        "8",
        "--data.path",
        str(tiny_data),
        "--train.output_dir",
        str(out),
    ]
    # rank 1 sleeps 120 s after the gradient norm of step 3, before the all-reduce of the loss
    procs = start_ranks(2, argv, script=[str(REPO / "tests" / "harness" / "stalling_rank.py"), "1", "3", "120"])
    start = time.monotonic()
    try:
        rc0 = procs[0].wait(timeout=150)
        waited = time.monotonic() - start
    finally:
        procs[1].kill()
    err0 = procs[0].stderr.read().decode(errors="replace")
    finish(procs)
    assert rc0 == 1, err0[-3000:]
    assert waited < 110, f"rank 0 waited {waited:.0f} s, not about train.collective_timeout_s"
    assert "Traceback" not in err0, err0[-3000:]
    line = [ln for ln in err0.splitlines() if ln.startswith("meshforge: error:")]
    assert len(line) == 1, err0[-3000:]
    msg = line[0]
    assert "rank 0 of 2: all_reduce of the loss at step 3 timed out after 8 s" in msg, msg
    assert "rank 1 never reached it (rank 1 last at: forward/backward collectives of step 3)" in msg, msg


def _kill_during_checkpoints(tiny_data, tmp_path, kills: int, seed: int) -> None:
    """Kill a run that saves every step at random points, ``kills`` times, checking after each
    kill that whatever counts as a checkpoint loads; then let it finish and compare losses."""
    rng = random.Random(seed)
    steps = 24
    common = ["train", *ARGS, "--train.steps", str(steps), "--data.path", str(tiny_data)]
    ref = tmp_path / "ref"
    results = finish(start_ranks(1, [*common, "--train.output_dir", str(ref)]))
    assert results[0][0] == 0, results[0][2][-2000:]
    out = tmp_path / "run"
    argv = [*common, "--checkpoint.interval", "1", "--checkpoint.keep_last", "2", "--train.output_dir", str(out)]
    ckpts = out / "checkpoints"
    newest = 0
    kinds = {"in a .tmp write": 0, "between saves": 0}  # where the kills landed, as far as a poll can tell
    for i in range(kills):
        before = steps_logged(out)
        if before >= steps - 2:
            break
        procs = start_ranks(1, argv)
        # wait for this attempt's first new step; then every other kill waits for a save to be in
        # flight (a .tmp directory) and strikes a few milliseconds into it, the others at a random time
        wait_until(lambda: steps_logged(out) > before, procs)
        if i % 2 == 0:
            wait_until(lambda: any(ckpts.glob("step_*.tmp")), procs, poll=0.001)
            time.sleep(rng.uniform(0.0, 0.01))
        else:
            time.sleep(rng.uniform(0.0, 0.25))
        writing = any(ckpts.glob("step_*.tmp"))
        os.kill(procs[0].pid, signal.SIGKILL)
        finish(procs)
        kinds["in a .tmp write" if writing else "between saves"] += 1
        saved = check_every_checkpoint_loads(out)
        # a complete checkpoint is only ever removed after a newer one is complete
        assert max(saved, default=0) >= newest, f"kill {i}: newest checkpoint went from step {newest} to {saved}"
        newest = max(saved, default=0)
        assert len(saved) <= 3, saved  # keep_last 2, plus the newest one while the oldest awaits deletion
    results = finish(start_ranks(1, argv))
    assert results[0][0] == 0, results[0][2][-2000:]
    got, want = losses_by_step(out), losses_by_step(ref)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]
    assert not list(ckpts.glob("*.tmp")), "a finished run leaves no partial directories"
    print(f"kills: {kinds}")


def test_kills_during_checkpoint_writes_never_leave_a_checkpoint_that_fails_to_load(tiny_data, tmp_path):
    _kill_during_checkpoints(tiny_data, tmp_path, kills=4, seed=1)


@pytest.mark.slow
def test_many_kills_during_checkpoint_writes(tiny_data, tmp_path):
    _kill_during_checkpoints(tiny_data, tmp_path, kills=20, seed=2)
