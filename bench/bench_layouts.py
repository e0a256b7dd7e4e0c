"""CPU step time of the small preset under each parallel layout of ``meshforge train`` (gloo).

Every layout is launched as tests/harness/parallel_harness.py does: ``world`` subprocesses of
``python -m meshforge train`` with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT set and OMP_NUM_THREADS=1 (the single-process layout too, so each rank has one
compute thread). ``step_time_s`` is read from rank 0's metrics.jsonl; the table gives the
median (and min/max) over the steps after ``--warmup``.

Layouts that are not implemented yet (or fail) are reported as such and the script goes on.
On a machine with fewer cores than ranks (2 cores: hsdp 2x2 and tp2 x fsdp2 run 4 ranks)
the ranks oversubscribe the cores: the numbers track regressions of one layout over time,
they are not scaling claims.

Run: ``python bench/bench_layouts.py --record``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SECTION = "## Parallel layouts (CPU)"

# name, world size, overrides, required (a failure of a required layout is an error, not "not available").
# The preset's global batch of 16 is one microbatch; with data parallel degree dp each rank's local batch
# (16/dp) stays one microbatch, so every layout does the same work per step.
LAYOUTS = [
    ("single process", 1, (), True),
    ("fsdp2 (dp_shard 2)", 2, ("--train.micro_batch_size", "8"), True),
    (
        "hsdp 2x2 (dp_replicate 2, dp_shard 2)",
        4,
        ("--parallel.dp_replicate", "2", "--parallel.dp_shard", "2", "--train.micro_batch_size", "4"),
        True,
    ),
    ("tp2", 2, ("--parallel.tp", "2"), False),
    (
        "pp2 1f1b (untied, 4 microbatches)",
        2,
        (
            "--parallel.pp",
            "2",
            "--parallel.pp_schedule",
            "1f1b",
            "--parallel.pp_microbatches",
            "4",
            "--model.tie_embeddings",
            "false",
        ),
        False,
    ),
    ("tp2 x fsdp2", 4, ("--parallel.tp", "2", "--parallel.dp_shard", "2", "--train.micro_batch_size", "8"), False),
]


from benchlib import REPO, loadavg, record  # noqa: E402  (bench/ is on sys.path when run as a script)

sys.path.insert(0, str(REPO / "tests" / "harness"))
import parallel_harness  # noqa: E402  (the launcher the parity tests use)


def run_ranks(world: int, args: list[str], timeout: float, extra_env: dict) -> None:
    """``parallel_harness.run_ranks``; a failure becomes RuntimeError with the failed rank's last stderr line
    (the table's note), a timeout with the harness's message."""
    try:
        parallel_harness.run_ranks(world, args, timeout, extra_env)
    except parallel_harness.RanksFailed as e:
        raise RuntimeError(e.last_line()) from None


def step_times(out: Path) -> list[float]:
    path = out / "metrics.jsonl"
    return [r["step_time_s"] for r in map(json.loads, path.read_text().splitlines()) if "step_time_s" in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=14, help="train.steps of each run")
    ap.add_argument("--warmup", type=int, default=4, help="leading steps left out of the median")
    ap.add_argument("--only", nargs="*", default=None, help="run only layouts whose name starts with one of these")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per layout")
    ap.add_argument(
        "--cache",
        default=os.environ.get("MESHFORGE_CACHE") or str(Path(tempfile.gettempdir()) / "meshforge-bench-cache"),
        help="MESHFORGE_CACHE for the builtin corpus (prepared once, before the layouts)",
    )
    ap.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error("--steps must be larger than --warmup")

    from meshforge.data_pipeline.builtin import ensure_builtin

    ensure_builtin("shakespeare", args.cache, 2048, progress=False)  # so no layout pays for it
    common = [
        "train",
        "--config",
        "small",
        "--train.steps",
        str(args.steps),
        "--train.eval_interval",
        "0",
        "--train.sample_prompt",
        "",
        "--checkpoint.interval",
        "0",
        "--train.progress",
        "false",
        "--logging.tensorboard",
        "false",
        "--train.device",
        "cpu",
    ]
    load_start = loadavg()
    cores = os.cpu_count() or 1
    print(
        f"{cores} CPU cores; OMP_NUM_THREADS=1 per rank; MESHFORGE_CACHE={args.cache}; load average {load_start}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="mf-layouts-") as tmp:
        for name, world, extra, required in LAYOUTS:
            if args.only and not any(name.startswith(o) for o in args.only):
                continue
            out = Path(tmp) / f"layout{len(rows)}"
            t0 = time.perf_counter()
            try:
                run_ranks(
                    world,
                    [*common, "--train.output_dir", str(out), *extra],
                    args.timeout,
                    {"MESHFORGE_CACHE": args.cache},
                )
                st = step_times(out)[args.warmup :]
                if not st:
                    raise RuntimeError("no step_time_s after the warmup in metrics.jsonl")
            except Exception as e:  # noqa: BLE001 -- a layout not implemented yet must not stop the others
                status = "FAILED" if required else "not available"
                msg = " ".join(str(e).split())[:160]
                print(f"{name}: {status}: {msg}", flush=True)
                rows.append((name, world, extra, None, f"{status}: {msg}"))
                continue
            wall = time.perf_counter() - t0
            med = statistics.median(st)
            print(
                f"{name}: {world} rank(s), median {med * 1e3:.1f} ms/step over {len(st)} steps "
                f"(min {min(st) * 1e3:.1f}, max {max(st) * 1e3:.1f}); wall {wall:.0f} s",
                flush=True,
            )
            rows.append((name, world, extra, (med, min(st), max(st), len(st), wall), ""))
    load_end = loadavg()

    ref = next((r[3][0] for r in rows if r[0] == "single process" and r[3]), None)
    tokens = 16 * 128
    lines = [
        f"small preset (global batch 16 x 128 tokens, fp32), `meshforge train --train.steps {args.steps}`, "
        f"eval/checkpoints/sample/tensorboard off; median of `step_time_s` (rank 0's metrics.jsonl) over steps "
        f"{args.warmup + 1}..{args.steps}; OMP_NUM_THREADS=1 per rank, gloo",
        f"load average at start / end: {load_start} / {load_end}",
        "",
        "| layout | ranks | median ms/step | min – max ms | tokens/s | vs single | overrides |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, world, extra, res, note in rows:
        ov = " ".join(extra) or "(none)"
        if res is None:
            lines.append(f"| {name} | {world} | — | — | — | — | {ov} — {note} |")
            continue
        med, lo, hi, n, _ = res
        rel = f"{med / ref:.2f}x" if ref else "—"
        lines.append(
            f"| {name} | {world} | {med * 1e3:.1f} | {lo * 1e3:.1f} – {hi * 1e3:.1f} | "
            f"{tokens / med:,.0f} | {rel} | {ov} |"
        )
    lines += [
        "",
        f"{cores} cores: layouts with more than {cores} ranks oversubscribe them (each rank computes with one "
        "thread and gloo moves data through loopback), so these are regression-tracking numbers for each layout, "
        "not scaling claims.",
    ]
    print()
    print("\n".join(lines))
    if args.record:
        record(SECTION, lines)
    return 1 if any(r[3] is None and r[4].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
