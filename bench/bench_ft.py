"""Fault-tolerant replica groups (torchft) on CPU: step-time overhead, and training lost per failure.

1. Overhead with no failure: 2 replica groups x 2 ranks under ``parallel.fault_tolerance = torchft``
   (a real ``torchft_lighthouse``) against the same layout as one job, HSDP ``dp_replicate 2 x
   dp_shard 2``: median ``step_time_s`` after a warm-up, run one after the other in this process.
2. Seconds of training lost by one failure (one rank SIGKILLed):
   - torchft: group 1 loses a rank after ``--kill-at`` steps and is restarted at once (as torchrun's
     --max-restarts would); group 0 trains on. Lost = the global-batch samples not trained (group 1's
     share while it was away, whole batches of steps that did not commit), in seconds of full-speed
     training (median step time with both groups), plus group 0's stall beyond its median step time
     from the failure to the heal.
   - restart from checkpoint: the HSDP job, ``checkpoint.interval = --interval``, every rank killed
     at step ``--kill-at`` (half an interval after a checkpoint: the average case) and the job
     restarted at once (it resumes from the newest checkpoint). Lost = wall time from the kill until
     the restarted job has trained that step again (process start, checkpoint load, redone steps);
     the time a scheduler needs to notice and restart is not counted, which favours this side.

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
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO, loadavg, record  # noqa: E402  (bench/ is on sys.path when run as a script)

sys.path.insert(0, str(REPO / "tests" / "harness"))
from ft_harness import Lighthouse, finish, group_args, read_records, records, start_group, wait_for_steps  # noqa: E402
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


def lost_torchft(data: str, tmp: Path, steps: int, kill_at: int) -> dict:
    out = tmp / "ft_kill"
    with Lighthouse() as lh:
        args = group_args(Path(data), out, lh, steps)
        group0 = start_group(args, 0)
        wait_for_steps(out, 0, 1, 300)
        group1 = start_group(args, 1)
        wait_for_steps(out, 1, kill_at, 600)
        os.kill(group1[1].pid, signal.SIGKILL)
        finish(group1, 120)
        group1 = start_group(args, 1)
        results = [finish(group0, 1800), finish(group1, 1800)]
    assert all(status == 0 for ranks in results for status, _ in ranks), results
    rows = records(out, 0)
    both = [r for r in rows if r["ft_groups"] == [0, 1] and r["ft_committed"]]
    full = statistics.median(r["step_time_s"] for r in both)
    g = rows[0]["ft_samples"][0][1] - rows[0]["ft_samples"][0][0]  # one group's share of a batch
    batch = 2 * g
    first_bad = next(r["step"] for r in rows if r["step"] > kill_at // 2 and r["ft_groups"] != [0, 1])
    back = next(r["step"] for r in rows if r["step"] > first_bad and r["ft_groups"] == [0, 1])
    window = [r for r in rows if first_bad <= r["step"] <= back]
    skipped = sum(batch - sum(e - s for s, e in r["ft_samples"]) for r in window)
    stall = sum(max(0.0, r["step_time_s"] - full) for r in window)
    return {
        "full_step_s": full,
        "skipped_samples": skipped,
        "batch": batch,
        "steps_away": len(window),
        "uncommitted": sum(1 for r in window if not r["ft_committed"]),
        "stall_s": stall,
        "lost_s": skipped / batch * full + stall,
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
        t = lost_torchft(data, tmp, args.failure_steps, args.kill_at)
        print(f"torchft, one failure: {t}", flush=True)
        r = lost_restart(data, tmp, args.kill_at + 2 * args.interval, args.kill_at, args.interval)
        print(f"restart from checkpoint, one failure: {r}", flush=True)
    load_end = loadavg()
    lines = [
        "tiny 4-layer decoder (`PARITY_ARGS`: global batch 8 x 32 tokens, fp32), 4 ranks on this machine, "
        f"OMP_NUM_THREADS=1; load average {load_start} at start, {load_end} at the end.",
        "",
        "| measure | HSDP 2 x 2 (one job) | torchft 2 groups x 2 | ratio |",
        "|---|---|---|---|",
        f"| median step, no failure ({args.steps} steps, first {args.warmup} left out; median of {args.rounds} "
        f"rounds, ratio within a round) | {plain * 1e3:.1f} ms | {ft * 1e3:.1f} ms | {ratio[ticks[-1]]:.3f} |",
        f"| training lost by one failure (restart: checkpoint every {args.interval}, killed at step "
        f"{r['killed_at']}, {r['redone']} steps redone) | {r['lost_s']:.1f} s | {t['lost_s']:.1f} s | "
        f"{t['lost_s'] / r['lost_s']:.3f} |",
        "",
        f"torchft failure: group 1 away {t['steps_away']} steps ({t['uncommitted']} not committed), "
        f"{t['skipped_samples']} samples skipped = {t['skipped_samples'] / t['batch']:.1f} batches at "
        f"{t['full_step_s'] * 1e3:.1f} ms, plus {t['stall_s']:.1f} s of stall in group 0; group 0's metrics.jsonl "
        f"says {t['metrics_lost_s']:.1f} s lost (`ft_lost_total_s`).",
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
