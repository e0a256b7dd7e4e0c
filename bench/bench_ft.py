"""Fault-tolerant replica groups (torchft) on CPU: step-time overhead, and training lost per failure.

1. Overhead with no failure: 2 replica groups x 2 ranks under ``parallel.fault_tolerance = torchft``
   (a real ``torchft_lighthouse``) against the same layout as one job, HSDP ``dp_replicate 2 x
   dp_shard 2``: median ``step_time_s`` after a warm-up, run one after the other in this process.
2. Seconds of training lost by one failure (one rank SIGKILLed):
   - torchft, with 0 and with 1 standby group (``--spares``): group 1 loses a rank after ``--kill-at`` steps and
     is restarted at once, once its other rank has left (as torchrun's --max-restarts would); group 0 trains
     on, a standby (group 2) trains group 1's slot from the step the quorum drops group 1. The lighthouse
     runs with ``launch --ft-groups``'s timeouts. Lost = the global-batch samples not trained (group 1's share
     while it was away and nobody stood in, whole batches of steps that did not commit), in seconds of
     full-speed training (median step time with both slots trained), plus group 0's stall from the failure to
     the return, counted two ways: its step time beyond the median (wall) and its waits on torchft (quorum,
     cross-group all-reduce, vote) beyond their median (what the failure made it wait, without the slowdown
     of the replacement's start-up sharing this machine's two cores).
   - restart from checkpoint: the HSDP job, ``checkpoint.interval = --interval``, failing at step
     ``--kill-at`` (half an interval after a checkpoint: the average case) and resuming from the newest
     checkpoint, two ways: every rank killed and restarted at once by the bench (the ideal), and one rank
     killed under ``torchrun --max-restarts 1``, which stops the others and restarts the job (what
     ``meshforge launch`` does). Lost = wall time from the kill until the restarted job has trained that
     step again (process start, checkpoint load, redone steps); the time a scheduler needs to notice and
     restart is not counted, which favours this side.

The no-failure runs alternate (``--rounds``, the order rotated each round) between HSDP and torchft
with each lighthouse ``--quorum_tick_ms`` of ``--ticks``; the ratio is taken within a round, and the
torchft records' timed pieces (quorum, cross-group all-reduce, commit vote) are reported per tick, and
what torchft adds to a step is measured inside each torchft run, free of the noise between runs: the
time the step waits for its quorum (it runs in torchft's thread during the forward and backward, see
``ReplicaGroups.start_step``) plus the commit vote, as a share of that step's time (median over steps;
the cross-group all-reduce is not counted: it is HSDP's replicate all-reduce, moved).

Model: the tests' 4-layer tiny decoder, global batch 8, fp32, one thread per rank (``PARITY_ARGS``).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO, loadavg, record  # noqa: E402  (bench/ is on sys.path when run as a script)

sys.path.insert(0, str(REPO / "tests" / "harness"))
from ft_harness import Lighthouse, finish, group_args, read_records, records, start_group, wait_for_steps  # noqa: E402
from meshforge.launch.ft_launch import HEARTBEAT_TIMEOUT_MS, JOIN_TIMEOUT_MS  # noqa: E402
from parallel_harness import PARITY_ARGS, run_ranks, start_ranks  # noqa: E402

SECTION = "## Fault-tolerant replica groups (torchft)"


def hsdp_args(data: str, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train",
        *PARITY_ARGS,
        "--data.path",
        data,
        "--train.output_dir",
        str(out),
        "--train.steps",
        str(steps),
        "--parallel.dp_replicate",
        "2",
        "--train.collective_timeout_s",
        "20",
        *extra,
    ]


def median_step(rows: list[dict], warmup: int) -> float:
    return statistics.median(r["step_time_s"] for r in rows[warmup:])


PIECES = ("ft_quorum_s", "ft_allreduce_s", "ft_commit_s")
"""The parts of a torchft step its records time: the quorum, the cross-group all-reduce, the commit vote."""


def plain_step(data: str, tmp: Path, steps: int, warmup: int) -> float:
    run_ranks(4, hsdp_args(data, tmp / "hsdp", steps), timeout=900)
    return median_step(read_records(tmp / "hsdp" / "metrics.jsonl"), warmup)


def ft_step(data: str, out: Path, steps: int, warmup: int, tick_ms: int) -> dict:
    """Median step time and median of each timed piece, 2 groups x 2 ranks, no failure."""
    with Lighthouse(min_replicas=2, tick_ms=tick_ms) as lh:
        args = group_args(Path(data), out, lh, steps)
        groups = [start_group(args, g) for g in range(2)]
        for procs in groups:
            assert all(status == 0 for status, _ in finish(procs, 900))
    rows = records(out, 0)[warmup:]
    return {
        "step_time_s": median_step(rows, 0),
        **{k: statistics.median(r[k] for r in rows) for k in PIECES},
        "own_share": statistics.median((r["ft_quorum_s"] + r["ft_commit_s"]) / r["step_time_s"] for r in rows),
    }


def lost_torchft(data: str, tmp: Path, steps: int, kill_at: int, spares: int = 0) -> dict:
    """One rank of group 1 SIGKILLed after ``kill_at`` of its steps, the group restarted at once; ``spares``
    standby groups (ids 2, ...) started with the others. The lighthouse runs with ``launch --ft-groups``'s
    timeouts: a dead group is dropped from the quorum ``HEARTBEAT_TIMEOUT_MS`` after its last heartbeat."""
    out = tmp / f"ft_kill_{spares}"
    with Lighthouse(heartbeat_ms=HEARTBEAT_TIMEOUT_MS, join_ms=JOIN_TIMEOUT_MS) as lh:
        args = group_args(Path(data), out, lh, steps, 2, "--parallel.ft_spares", str(spares))
        group0 = start_group(args, 0)
        standbys = [start_group(args, 2 + k) for k in range(spares)]
        wait_for_steps(out, 0, 1, 300)
        group1 = start_group(args, 1)
        wait_for_steps(out, 1, kill_at, 600)
        at = len(records(out, 0))  # group 0's steps when the rank dies
        os.kill(group1[1].pid, signal.SIGKILL)
        finish(group1, 120)
        group1 = start_group(args, 1)
        results = [finish(group0, 1800), finish(group1, 1800), *(finish(g, 1800) for g in standbys)]
    assert all(status == 0 for ranks in results for status, _ in ranks), results
    rows = records(out, 0)
    g = rows[0]["ft_samples"][0][1] - rows[0]["ft_samples"][0][0]  # one group's share of a batch
    batch = 2 * g

    def skipped(r: dict) -> int:
        return batch - sum(e - s for s, e in r["ft_samples"])

    def whole(r: dict) -> bool:  # both groups in their own slots
        return r["ft_groups"] == [0, 1] and bool(r["ft_committed"]) and "ft_standby" not in r

    full = statistics.median(r["step_time_s"] for r in rows if whole(r))
    first_bad = next(r["step"] for r in rows if r["step"] >= at and not whole(r))
    back = next(r["step"] for r in rows if r["step"] > first_bad and whole(r))
    window = [r for r in rows if first_bad <= r["step"] <= back]
    lost_samples = sum(skipped(r) for r in window)
    stall = sum(max(0.0, r["step_time_s"] - full) for r in window)

    def waits(r: dict) -> float:  # what the step waited on torchft: quorum, cross-group all-reduce, vote
        return sum(r[k] for k in PIECES)

    usual = statistics.median(waits(r) for r in rows if whole(r))
    # the waits beyond the usual ones; a step that did not commit is lost whole (its share counted above, its
    # time here), so only the stall that the failure itself caused, not the restarting group's processes
    # competing for this machine's cores, which a cluster gives their own nodes
    wait = sum(max(0.0, waits(r) - usual) for r in window if r["ft_committed"])
    wait += sum(r["step_time_s"] - full for r in window if not r["ft_committed"] and r["step_time_s"] > full)
    return {
        "full_step_s": full,
        "skipped_samples": lost_samples,
        "batch": batch,
        "steps_away": len(window),
        "covered": sum(1 for r in window if "ft_standby" in r and r["ft_committed"]),
        "uncommitted": sum(1 for r in window if not r["ft_committed"]),
        "stall_s": stall,
        "lost_s": lost_samples / batch * full + stall,
        "wait_s": wait,
        "lost_waits_s": lost_samples / batch * full + wait,
        "metrics_lost_s": rows[-1]["ft_lost_total_s"],  # group 0's own count (step time x share not trained)
    }


def lost_restart(data: str, tmp: Path, steps: int, kill_at: int, interval: int) -> dict:
    out = tmp / "restart"
    args = hsdp_args(data, out, steps, "--checkpoint.interval", str(interval))
    procs = start_ranks(4, args)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 900
    while len(read_records(metrics)) < kill_at:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for p in procs:  # the whole job goes down, as it does when one rank dies
        p.kill()
    killed = time.perf_counter()
    for p in procs:
        p.communicate()
    at = max(r["step"] for r in read_records(metrics))
    procs = start_ranks(4, args)  # restarted at once: resumes from the newest checkpoint
    resumed = False  # the resumed run first cuts metrics.jsonl back to its checkpoint's step
    while True:
        steps = [r["step"] for r in read_records(metrics)]
        resumed = resumed or (bool(steps) and max(steps) < at)
        if resumed and steps and max(steps) >= at:
            break
        assert time.monotonic() < deadline + 900
        time.sleep(0.05)
    lost = time.perf_counter() - killed
    finish(procs, 900)
    full = statistics.median(r["step_time_s"] for r in read_records(metrics)[5:])
    return {"killed_at": at, "redone": at - (at // interval) * interval, "lost_s": lost, "full_step_s": full}


def lost_torchrun(data: str, tmp: Path, steps: int, kill_at: int, interval: int) -> dict:
    """The same failure handled by torchrun: the HSDP job under ``torchrun --max-restarts 1`` (as ``meshforge
    launch`` runs it), one worker SIGKILLed; torchrun stops the others, restarts all four, and they resume from
    the newest checkpoint. Lost = wall time from the kill until the restarted job has trained that step again."""
    from meshforge.launch.torchrun_cmd import torchrun_argv

    out = tmp / "torchrun"
    argv = torchrun_argv(sys.executable, 4, max_restarts=1) + hsdp_args(
        data, out, steps, "--checkpoint.interval", str(interval)
    )
    agent = subprocess.Popen(
        argv, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 900
    while len(read_records(metrics)) < kill_at:
        assert time.monotonic() < deadline and agent.poll() is None
        time.sleep(0.05)
    workers = sorted(_children(agent.pid))
    assert len(workers) == 4, workers
    os.kill(workers[1], signal.SIGKILL)
    killed = time.perf_counter()
    at = max(r["step"] for r in read_records(metrics))
    resumed = False
    while True:
        done = [r["step"] for r in read_records(metrics)]
        resumed = resumed or (bool(done) and max(done) < at)
        if resumed and done and max(done) >= at:
            break
        assert time.monotonic() < deadline + 900 and agent.poll() is None
        time.sleep(0.05)
    lost = time.perf_counter() - killed
    assert agent.wait(900) == 0
    return {"killed_at": at, "redone": at - (at // interval) * interval, "lost_s": lost}


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="steps of the overhead runs")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--failure-steps", type=int, default=300, help="steps of the torchft failure run")
    ap.add_argument("--kill-at", type=int, default=75, help="the step after which the failure happens")
    ap.add_argument("--interval", type=int, default=50, help="checkpoint.interval of the restart run")
    ap.add_argument(
        "--cache",
        default=os.environ.get("MESHFORGE_CACHE") or str(Path(tempfile.gettempdir()) / "meshforge-bench-cache"),
    )
    ap.add_argument(
        "--ticks",
        default="10,100",
        help="lighthouse --quorum_tick_ms values of the overhead runs (the last is used: 100, torchft's default, as `launch --ft-groups` runs it)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the no-failure runs (ratios within a round)")
    ap.add_argument("--overhead-only", action="store_true", help="the no-failure runs only (not recordable)")
    ap.add_argument(
        "--spares", default="0,1", help="standby groups of the torchft failure runs, one run each (default 0,1)"
    )
    ap.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    os.environ["MESHFORGE_CACHE"] = args.cache
    from meshforge.data_pipeline.builtin import ensure_builtin

    ensure_builtin("shakespeare", args.cache, 512, progress=False)
    data = "builtin:shakespeare"
    load_start = loadavg()
    with tempfile.TemporaryDirectory(prefix="mf-ft-") as tmp:
        tmp = Path(tmp)
        ticks = [int(t) for t in args.ticks.split(",")]
        plains, runs = [], {tick: [] for tick in ticks}
        for n in range(args.rounds):  # HSDP and each tick in turn, the order rotated: ratios within a round
            jobs = [None, *ticks]
            for job in jobs[n % len(jobs) :] + jobs[: n % len(jobs)]:
                if job is None:
                    plains.append(plain_step(data, tmp / f"hsdp_{n}", args.steps, args.warmup))
                else:
                    runs[job].append(ft_step(data, tmp / f"ft_{job}_{n}", args.steps, args.warmup, job))
            print(
                f"round {n}: HSDP 2x2 {plains[-1] * 1e3:.1f} ms/step; "
                + "; ".join(
                    f"torchft, quorum tick {tick} ms: "
                    + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in run[-1].items() if k != "own_share")
                    + f", quorum wait + vote {run[-1]['own_share']:.1%} of the step"
                    + f" ({run[-1]['step_time_s'] / plains[-1]:.3f}x)"
                    for tick, run in runs.items()
                ),
                flush=True,
            )
        plain = statistics.median(plains)
        ratio = {t: statistics.median(r["step_time_s"] / h for r, h in zip(rs, plains)) for t, rs in runs.items()}
        pieces = {t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in runs.items()}
        ft = pieces[ticks[-1]]["step_time_s"]
        if args.overhead_only:
            return 0
        fails = {}
        for spares in (int(k) for k in args.spares.split(",")):
            fails[spares] = lost_torchft(data, tmp, args.failure_steps, args.kill_at, spares)
            print(f"torchft with {spares} standby group(s), one failure: {fails[spares]}", flush=True)
        r = lost_restart(data, tmp, args.kill_at + 2 * args.interval, args.kill_at, args.interval)
        print(f"restart from checkpoint at once, one failure: {r}", flush=True)
        tr = lost_torchrun(data, tmp, args.kill_at + 2 * args.interval, args.kill_at, args.interval)
        print(f"restart from checkpoint by torchrun, one failure: {tr}", flush=True)
    load_end = loadavg()
    lines = [
        "tiny 4-layer decoder (`PARITY_ARGS`: global batch 8 x 32 tokens, fp32), 4 ranks on this machine (6 with a "
        f"standby group), OMP_NUM_THREADS=1; load average {load_start} at start, {load_end} at the end.",
        "",
        "| measure | HSDP 2 x 2 (one job) | torchft 2 groups x 2 | ratio |",
        "|---|---|---|---|",
        f"| median step, no failure ({args.steps} steps, first {args.warmup} left out; median of {args.rounds} "
        f"rounds, ratio within a round) | {plain * 1e3:.1f} ms | {ft * 1e3:.1f} ms | {ratio[ticks[-1]]:.3f} |",
        "",
        f"Training lost by one failure (one rank SIGKILLed; restart: checkpoint every {args.interval}, killed at step "
        f"{r['killed_at']}, {r['redone']} steps redone). torchft: the samples not trained plus group 0's stall, the "
        "stall counted two ways: its step time beyond the median (wall: on this 2-core machine that includes the "
        "replacement group's start-up competing for the same cores, which a cluster runs on other nodes) and its "
        "waits on torchft (quorum, cross-group all-reduce, vote) beyond their median:",
        "",
        "| failure handled by | lost, wall | lost, torchft waits | / restart at once | / restart by torchrun |",
        "|---|---|---|---|---|",
        f"| restart at once (every rank killed and restarted by the bench) | {r['lost_s']:.2f} s | | 1 | |",
        f"| restart by `torchrun --max-restarts 1` (it stops the others, restarts all) | {tr['lost_s']:.2f} s | | | 1 |",
        *(
            f"| torchft, {k} standby group{'s' if k != 1 else ''} | {t['lost_s']:.2f} s | {t['lost_waits_s']:.2f} s | "
            f"{t['lost_s'] / r['lost_s']:.3f} / {t['lost_waits_s'] / r['lost_s']:.3f} | "
            f"{t['lost_s'] / tr['lost_s']:.3f} / {t['lost_waits_s'] / tr['lost_s']:.3f} |"
            for k, t in fails.items()
        ),
        "",
        *(
            f"torchft, {k} standby: slot 1 short for {t['steps_away']} steps ({t['uncommitted']} not committed, "
            f"{t['covered']} trained by the standby), {t['skipped_samples']} samples skipped = "
            f"{t['skipped_samples'] / t['batch']:.1f} batches at {t['full_step_s'] * 1e3:.1f} ms, plus {t['stall_s']:.2f} s "
            f"of stall in group 0 (waits: {t['wait_s']:.2f} s); group 0's metrics.jsonl says {t['metrics_lost_s']:.2f} s "
            "lost (`ft_lost_total_s`, from its start).  "
            for k, t in fails.items()
        ),
        "",
        "torchft step pieces, no failure (medians; the lighthouse's `--quorum_tick_ms`, the last one in the table):",
        "",
        "| quorum tick | step | quorum (wait) | cross-group all-reduce | commit vote | quorum + vote / step | ratio to HSDP |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {tick} ms | "
            + " | ".join(f"{pieces[tick][k] * 1e3:.1f} ms" for k in ("step_time_s", *PIECES))
            + f" | {pieces[tick]['own_share']:.1%} | {ratio[tick]:.3f} |"
            for tick in ticks
        ),
    ]
    print("\n".join(lines))
    if args.record:
        record(SECTION, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
