"""Calibrate the planner's ``cpu`` device: one thread's matmul rate and gloo's alpha-beta over loopback.

1. Compute: fp32 ``[M, K] @ [K, N]`` matmuls on one thread (torch.set_num_threads(1), as every
   rank of the CPU benches runs), forward-and-backward shapes of the small preset's blocks; the
   best of several repeats is the ``peak_bf16_flops`` of the ``cpu`` entry (the key is the
   compute dtype's peak; on the CPU the compute dtype is fp32).
2. Links: two processes on this machine (gloo, loopback): all-gather, reduce-scatter and
   send/recv of 4 KiB .. 8 MiB messages, the median of 20 calls each; a least-squares fit of
   ``t = alpha + moved / bw`` per call (ring of 2: one step; relative errors) gives the bandwidth
   ``nvlink_bw`` (every rank of the CPU benches shares one "node").

Prints a TOML table to paste into a ``--devices`` file (or to compare with the built-in
``[cpu]`` entry). The machine is shared: run it a few times and look at the spread.

Run: ``python bench/bench_plan_calibrate.py [--record]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import loadavg, record  # noqa: E402

SECTION = "## Planner CPU calibration"
SIZES = [4096, 65536, 524288, 2097152, 8388608]


def matmul_rate(repeats: int) -> float:
    """Best FLOP/s of one thread over the small preset's block matmuls (tokens 2048, dim 192, ffn 512)."""
    torch.set_num_threads(1)
    shapes = [(2048, 192, 192), (2048, 192, 512), (2048, 512, 192), (2048, 192, 2048)]
    best = 0.0
    for _ in range(repeats):
        flops, t0 = 0.0, time.perf_counter()
        for m, k, n in shapes:
            a, b = torch.randn(m, k), torch.randn(k, n)
            for _ in range(5):
                a @ b
            flops += 5 * 2 * m * k * n
        best = max(best, flops / (time.perf_counter() - t0))
    return best


def _rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    rows = []
    for nbytes in SIZES:
        n = nbytes // 4
        for op in ("all_gather", "reduce_scatter", "p2p"):
            whole, part = torch.zeros(n), torch.zeros(n // world)
            times = []
            for _ in range(22):
                dist.barrier()
                t0 = time.perf_counter()
                if op == "all_gather":
                    dist.all_gather_into_tensor(whole, part)
                elif op == "reduce_scatter":
                    dist.reduce_scatter_tensor(part, whole)
                elif rank == 0:
                    dist.send(whole, 1)
                else:
                    dist.recv(whole, 0)
                times.append(time.perf_counter() - t0)
            rows.append((op, nbytes, statistics.median(times[2:])))
    # a collective inside a step: both ranks compute between calls (as in training); the extra time per
    # call over the compute alone is the latency a step sees (waiting for the other rank included)
    a, b, small = torch.randn(256, 256), torch.randn(256, 256), torch.zeros(1024)
    for with_comm in (False, True, False, True):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(40):
            for _ in range(40):
                a @ b
            if with_comm:
                dist.all_reduce(small)
        rows.append(("in_step" if with_comm else "compute_only", 4096, (time.perf_counter() - t0) / 40))
    if rank == 0:
        with open(out, "w") as f:
            f.writelines(f"{op} {nb} {t}\n" for op, nb, t in rows)
    dist.destroy_process_group()


def link_fit() -> tuple[float, float, list[tuple[str, int, float]]]:
    """alpha (s), bw (bytes/s) of ``t = alpha + moved / bw`` over the measured calls; moved = S/2 for a ring of 2."""
    import numpy as np
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows")
        init = f"file://{os.path.join(tmp, 'store')}"
        mp.start_processes(_rank, args=(2, init, out), nprocs=2, start_method="spawn")
        rows = []
        for line in open(out):
            op, nb, t = line.split()
            rows.append((op, int(nb), float(t)))
    step = {op: [] for op in ("in_step", "compute_only")}
    for op, _, t in rows:
        if op in step:
            step[op].append(t)
    in_step = max(min(step["in_step"]) - min(step["compute_only"]), 0.0)
    rows = [r for r in rows if r[0] not in step]
    moved = np.array([nb / 2 if op != "p2p" else nb for op, nb, _ in rows], dtype=float)
    t = np.array([r[2] for r in rows])
    slope, alpha = np.polyfit(moved, t, 1, w=1 / t)  # relative errors: small messages weigh as much as large
    return max(alpha, 1e-6), 1.0 / max(slope, 1e-15), in_step, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    start = loadavg()
    rate = matmul_rate(args.repeats)
    alpha, bw, in_step, rows = link_fit()
    lines = [
        f"load average at start / end: {start} / {loadavg()}",
        "",
        "| gloo op (2 ranks, loopback) | bytes | median s per call |",
        "|---|---:|---:|",
    ]
    lines += [f"| {op} | {nb:,} | {t:.6f} |" for op, nb, t in rows]
    lines += [
        "",
        f"one-thread fp32 matmul rate (best of {args.repeats}): {rate:.3e} FLOP/s; "
        f"gloo fit t = alpha + moved/bw: alpha {alpha:.2e} s, bw {bw:.2e} B/s; "
        f"a 4 KiB all-reduce between compute (both ranks busy, as in a step) adds {in_step:.2e} s per call "
        "(the latency the cpu entry uses)",
        "",
        "```toml",
        "[cpu-measured]",
        'name = "CPU (measured)"',
        f"peak_bf16_flops = {rate:.3e}",
        "peak_fp8_flops = 0.0",
        "hbm_bytes = 137_438_953_472",
        f"nvlink_bw = {bw:.3e}",
        f"internode_bw = {bw:.3e}",
        f"nvlink_latency = {in_step:.2e}",
        f"internode_latency = {in_step:.2e}",
        f"cores = {os.cpu_count()}",
        "comm_overlap = false",
        "```",
    ]
    print("\n".join(lines))
    if args.record:
        record(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
